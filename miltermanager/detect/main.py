"""milter-manager-detect: the milters installed here, as the platform defaults define them.

Text by default, one JSON document with --json. Exit status 0 whether or
not anything is found; 2 for a usage error.
"""

import argparse
import json
import os
import shlex
import sys

from . import PLATFORMS, check_reachable, detect


def build_parser():
    """The command line (also what the manual page is made from)."""
    parser = argparse.ArgumentParser(
        prog="milter-manager-detect",
        description="Find the milters installed and configured on this system, as "
                    "detect_milters() in the platform defaults does, and show where each "
                    "listens, whether its service is enabled, which file said so, whether its "
                    "socket answers, what was skipped and why, and the milters Postfix lists "
                    "itself.")
    parser.add_argument("--platform", choices=PLATFORMS, default="debian",
                        help="the platform's services to read (default: debian)")
    parser.add_argument("--root", default="/",
                        help="read the system's files under this directory (default: /)")
    parser.add_argument("--package-options", metavar="NAME=VALUE,...", default=None,
                        help="as package.options: pkgsrc reads prefix= and rcddir=")
    parser.add_argument("--postconf", metavar="COMMAND", default=None,
                        help="the postconf command asked for Postfix's own milters "
                             "(default: postconf, only when --root is /)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--no-check", action="store_true",
                        help="do not connect to the sockets found to see if they answer")
    return parser


def _options(parser, text):
    if text is None:
        return {}
    options = {}
    for option in text.split(","):
        name, equals, value = option.partition("=")
        if not equals or not name.strip():
            parser.error(f"--package-options: expected NAME=VALUE,...; got {text!r}")
        options[name.strip()] = value.strip()
    return options


def main(argv=None, stdout=None):
    """Run the command; return its exit status."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    stdout = sys.stdout if stdout is None else stdout
    if not os.path.isdir(arguments.root):
        parser.error(f"--root {arguments.root}: no such directory")
    postconf = shlex.split(arguments.postconf) if arguments.postconf else None
    report = detect(arguments.platform, arguments.root,
                    _options(parser, arguments.package_options), postconf)
    if not arguments.no_check:
        check_reachable(report)
    output = (json.dumps(report.as_dict(), indent=2) + "\n" if arguments.json
              else text(report, checked=not arguments.no_check))
    try:
        stdout.write(output)
        stdout.flush()
    except BrokenPipeError:
        # The reader left (`| head`): no traceback, and none at exit's flush either.
        if stdout is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def text(report, checked=True):
    """The report for a person: found, skipped, Postfix's own list, the lines to paste."""
    lines = [f"milter detection for {report.platform} under {report.root}", ""]
    lines.append(f"found ({len(report.found)}):" if report.found else "found: none")
    for found in report.found:
        state = "enabled" if found.enabled else "disabled"
        if checked and found.reachable is None:
            state += f", {found.reach_error}"
        elif checked:
            reach = "reachable" if found.reachable else f"NOT reachable ({found.reach_error})"
            state += f", {reach}"
        lines.append(f"  {found.name}: {found.connection_spec} ({state})")
        lines.append(f"    from {found.source}")
        if found.note:
            lines.append(f"    {found.note}")
        conditions = ", ".join(found.applicable_conditions) or "none"
        lines.append(f"    applicable conditions: {conditions}")
    lines.append("")
    lines.append(f"skipped ({len(report.skipped)}):" if report.skipped else "skipped: none")
    for skipped in report.skipped:
        lines.append(f"  {skipped.name}: {skipped.path}: {skipped.reason}")
    if report.direct:
        lines.append("")
        lines.append("listed by Postfix itself (move them behind milter-manager, or they "
                     "run outside it):")
        specs = {found.connection_spec: found.name for found in report.found}
        for direct in report.direct:
            if direct.spec is None:
                lines.append(f"  {direct.parameter}: {direct.written}: {direct.reason}")
                continue
            also = f" (found above: {specs[direct.spec]})" if direct.spec in specs else ""
            lines.append(f"  {direct.parameter}: {direct.written} = {direct.spec}{also}")
    if report.found:
        lines.append("")
        lines.append("as configuration (detect_milters() in defaults/"
                     f"{report.platform}.conf defines these; to pin them instead):")
        for found in report.found:
            lines.append(f"with define_milter({_quote(found.name)}) as milter:")
            lines.append(f"    milter.connection_spec = {_quote(found.connection_spec)}")
            lines.append(f"    milter.enabled = {found.enabled!r}")
            lines.append(f"    milter.applicable_conditions = "
                         f"{_quote(list(found.applicable_conditions))}")
    return "\n".join(lines) + "\n"


def _quote(value):
    """A string or list of strings as configuration source (JSON's quoting is Python's too)."""
    return json.dumps(value, ensure_ascii=False)


if __name__ == "__main__":
    sys.exit(main())
