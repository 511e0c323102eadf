"""Write what milter-test-server sends per session, for bench/load_generator.c.

    python3 bench/load_script.py [milter-test-server's message options] > FILE

The options are milter-test-server's own (-s is optional here): its parser
builds the offer, every command packet and each stage's macros, so the C load
generator sends exactly what `milter-test-server --n-sessions` sends. One item
a line, bytes in hex:

    offer HEX                  the NEGOTIATE packet
    step CODE HEX HEX|-        a command packet, and the header with SMFIP_HDR_LEADSPC
    macro NAMEHEX VALUEHEX     a macro sent before the step above it
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from miltermanager.tools import test_server  # noqa: E402  (needs the repo root on sys.path)


def script(argv=()):
    """The script's text for milter-test-server options argv."""
    argv = list(argv)
    if not {"-s", "--connection-spec"} & {arg.partition("=")[0] for arg in argv}:
        argv += ["-s", "inet:25@127.0.0.1"]  # required by the parser, unused here
    settings = test_server.parse_options(argv)
    steps = settings.steps
    lines = [f"offer {settings.offer.encode().hex()}"]

    def add(step, leading_space=None):
        if step is None:
            return
        code = step.command.code.decode("ascii")
        alternative = leading_space.command.encode().hex() if leading_space is not None else "-"
        lines.append(f"step {code} {step.command.encode().hex()} {alternative}")
        for name, value in step.macros.items():
            lines.append(f"macro {name.hex() or '-'} {value.hex() or '-'}")

    add(steps["connect"])
    add(steps["helo"])
    add(steps["mail"])
    for rcpt in steps["rcpts"]:
        add(rcpt)
    add(steps["unknown"])
    add(steps["data"])
    for header, spaced in zip(steps["headers"], steps["headers_leading_space"]):
        add(header, spaced)
    add(steps["end_of_headers"])
    for chunk in steps["body"]:
        add(chunk)
    add(steps["end_of_message"])
    return "\n".join(lines) + "\n"


def write_script(path, argv=()):
    with open(path, "w") as output:
        output.write(script(argv))
    return path


if __name__ == "__main__":
    try:
        sys.stdout.write(script(sys.argv[1:]))
    except test_server.UsageError as problem:
        sys.exit(f"load_script: {problem}")
