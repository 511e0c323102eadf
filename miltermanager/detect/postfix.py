"""The milters Postfix talks to itself: smtpd_milters and non_smtpd_milters.

They are reported so that an admin can move them behind the manager (and
see a milter that would otherwise run twice). Asked with `postconf -x -h`;
no postconf, no answer.
"""

import subprocess

from .report import Direct
from .specs import BadSpec, normalise

PARAMETERS = ("smtpd_milters", "non_smtpd_milters")


def direct(postconf="postconf", run=subprocess.run, timeout=10):
    """The Direct records of Postfix's milter lists; [] when postconf cannot be run."""
    command = [postconf] if isinstance(postconf, str) else list(postconf)
    try:
        result = run([*command, "-x", "-h", *PARAMETERS], capture_output=True, text=True,
                     errors="replace", timeout=timeout, check=False)
    except (OSError, ValueError, subprocess.SubprocessError):
        return []
    if result.returncode != 0:
        return []
    lines = result.stdout.splitlines()
    records = []
    for parameter, line in zip(PARAMETERS, lines):
        for written in entries(line):
            records.append(_record(parameter, written))
    return records


def entries(value):
    """The milters of one list: separated by commas or spaces, `{ spec, options }` kept whole."""
    items, current, depth = [], [], 0
    for char in value:
        if char == "{":
            depth += 1
        elif char == "}":
            depth = max(0, depth - 1)
        if depth == 0 and (char in ", \t"):
            if current:
                items.append("".join(current))
            current = []
        else:
            current.append(char)
    if current:
        items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def _record(parameter, written):
    spec_text = written
    if written.startswith("{"):
        # Postfix 3's per-milter settings: { inet:host:port, default_action=accept }
        spec_text = written.strip("{} ").split(",")[0].strip()
    try:
        return Direct(parameter, written, normalise(spec_text))
    except BadSpec as error:
        return Direct(parameter, written, None, str(error))
