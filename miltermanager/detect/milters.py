"""Each milter's own configuration file: where it says it listens.

opendkim.conf and opendmarc.conf (`Socket`), clamav-milter.conf
(`MilterSocket`; an `Example` line means never configured), milter-greylist's
greylist.conf (`socket "..."`, and the longest `tarpit` of its recipient
ACLs), ENMA's enma.conf (`milter.socket:`), rspamd's proxy worker
(`bind_socket` when `milter = yes`). Each reader returns an Own record, or
None when the file says nothing about the socket; it raises Skip when the
file cannot be read or contradicts itself.
"""

import re
from dataclasses import dataclass

from .report import Skip
from .shell import logical_lines, unquote
from .specs import BadSpec, host_port, normalise


@dataclass
class Own:
    """What a milter's own file says: its socket (our syntax) and what else matters."""

    spec: str
    path: str
    unconfigured: bool = False  # clamav-milter.conf still has its Example line
    tarpit: int | None = None


def _keyword_values(text, key, separator=None):
    """[(line number, value)] of the `Key value` lines for key (case-insensitive)."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, _, value = stripped.partition(separator) if separator else _split_first(stripped)
        if name.strip().lower() == key.lower():
            found.append((number, unquote(value.split(" #")[0].strip())))
    return found


def _split_first(line):
    parts = line.split(None, 1)
    return parts[0], " ", parts[1] if len(parts) > 1 else ""


def _one(found, path, key):
    """The single value of key, None when absent; Skip when it is set to different values."""
    values = dict.fromkeys(value for _, value in found)
    if len(values) > 1:
        lines = ", ".join(f"line {number}: {value!r}" for number, value in found)
        raise Skip(path, f"{key} is set more than once with different values ({lines}); "
                         f"which one the milter uses is unclear")
    return found[-1][1] if found else None


def _spec(value, path, key):
    try:
        return normalise(value)
    except BadSpec as error:
        raise Skip(path, f"{key}: {error}") from None


def key_value_socket(tree, path, key):
    """opendkim.conf, opendmarc.conf, dkim-filter.conf: the `Socket` line."""
    value = _one(_keyword_values(tree.read(path), key), path, key)
    return None if value is None else Own(_spec(value, path, key), path)


def clamav(tree, path):
    """clamav-milter.conf: MilterSocket; an Example line means the file was never edited."""
    text = tree.read(path)
    unconfigured = bool(_keyword_values(text, "Example"))
    value = _one(_keyword_values(text, "MilterSocket"), path, "MilterSocket")
    if value is None:
        if unconfigured:
            raise Skip(path, "still the example configuration (an Example line, no "
                             "MilterSocket): clamav-milter is not configured")
        return None
    return Own(_spec(value, path, "MilterSocket"), path, unconfigured=unconfigured)


_TARPIT = re.compile(r"\btarpit\s+(\d+)([smhdw]?)\b")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_GREYLIST_SOCKET = re.compile(r'\s*socket\s+"([^"]*)"(?:\s+\d+)?\s*')


def greylist(tree, path):
    """greylist.conf: `socket "..."` and the longest tarpit of its racl lines."""
    found, tarpit = [], None
    for number, line in enumerate(logical_lines(tree.read(path)), 1):
        if line.lstrip().startswith("#"):
            continue
        if re.match(r"\s*r?acl\s", line):
            for amount, unit in _TARPIT.findall(line):
                seconds = int(amount) * _UNITS[unit]
                tarpit = seconds if tarpit is None else max(tarpit, seconds)
        match = _GREYLIST_SOCKET.fullmatch(line)
        if match:
            found.append((number, match.group(1)))
    value = _one(found, path, "socket")
    return None if value is None else Own(_spec(value, path, "socket"), path, tarpit=tarpit)


def enma(tree, path):
    """enma.conf: `milter.socket: SPEC`."""
    value = _one(_keyword_values(tree.read(path), "milter.socket", ":"), path, "milter.socket")
    return None if value is None else Own(_spec(value, path, "milter.socket"), path)


def rspamd(tree, directory):
    """rspamd's proxy worker: worker-proxy.inc, then local.d/ and override.d/ over it.

    Only the proxy in milter mode speaks the milter protocol; a proxy
    without it is skipped with that reason. rspamadm is not run: the files
    are read as rspamd's own defaults lay them out.
    """
    settings, sources = {}, {}
    for name in ("worker-proxy.inc", "local.d/worker-proxy.inc", "override.d/worker-proxy.inc"):
        path = f"{directory}/{name}"
        if not tree.exists(path):
            continue
        for key, value in _ucl_top_level(tree.read(path)):
            if key == "bind_socket" and sources.get(key) == path:
                continue  # several binds in one file: the first is where we connect
            settings[key], sources[key] = value, path
    if not sources:
        return None
    if "bind_socket" not in settings:
        return None
    path = sources["bind_socket"]
    milter = settings.get("milter", "no").lower()
    if milter not in ("yes", "true", "on", "1"):
        raise Skip(sources.get("milter", path), "rspamd's proxy worker is not in milter mode "
                                                "(milter = yes)")
    address = settings["bind_socket"].split()[0]  # "/path mode=0660 owner=..." keeps the path
    try:
        return Own(host_port(address, settings["bind_socket"]), path)
    except BadSpec as error:
        raise Skip(path, f"bind_socket: {error}") from None


def _ucl_top_level(text):
    """(key, value) of the `key = value;` lines outside any block of an rspamd .inc file."""
    depth = 0
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if depth == 0:
            match = re.fullmatch(r'([A-Za-z_][\w-]*)\s*[=:]\s*("[^"]*"|[^;{}]*?)\s*;?', line)
            if match:
                yield match.group(1), unquote(match.group(2))
        depth = max(0, depth + line.count("{") - line.count("}"))
