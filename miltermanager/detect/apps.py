"""Each milter's own configuration file: where its socket is, and what else it implies.

opendkim.conf and opendmarc.conf `Socket`, clamav-milter.conf `MilterSocket`
(and `Example`: not configured yet), milter-greylist's `socket` (and its
longest `tarpit`), rspamd's proxy worker in milter mode. A socket given on
the milter's command line (`-p`) wins over its file, as the milters do.
"""

import re

from .base import Skip
from .specs import BadSpec, normalise

# The option naming each milter's configuration file, short and long.
CONF_OPTIONS = {
    "opendkim": ("-x", None),
    "opendmarc": ("-c", None),
    "clamav-milter": ("-c", "--config-file"),
    "milter-greylist": ("-f", None),
}
# Upstream's timeouts a tarpit is added to (the server's 10 s less 3 s leeway).
BASE_TIMEOUT = 7.0
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def resolve(tree, kind, command_sockets, conf=None, default_confs=(), named_by=None,
            fallback_path=None):
    """(spec, source, enabled, settings) for a milter; raise Skip if its socket is unusable.

    command_sockets: (socket, file) pairs given on the command line or in a
    socket variable, which the milter takes over its own file. conf is the
    file an option or variable names (named_by says where), else the first
    existing of default_confs is read. enabled is False when the file says
    the milter is not configured (clamav-milter's Example), else None.
    """
    distinct = list(dict.fromkeys(command_sockets))
    sockets = list(dict.fromkeys(socket for socket, _ in distinct))
    if len(sockets) > 1:
        (first, first_file), (second, second_file) = distinct[0], next(
            item for item in distinct if item[0] != distinct[0][0])
        raise Skip(second_file, f"contradictory sockets: {first!r} ({first_file}) and "
                                f"{second!r} ({second_file})")
    enabled, settings = None, {}
    spec, source = distinct[0] if distinct else (None, None)
    reader = _READERS.get(kind)
    if reader is not None and kind in CONF_OPTIONS:
        path = conf or tree.first_existing(default_confs)
        if path is None:
            if spec is None:
                raise Skip(default_confs[0] if default_confs else fallback_path,
                           "missing, and no socket is given on the command line")
        else:
            try:
                text = tree.read(path)
            except Skip as skip:
                if conf is not None and named_by:
                    raise Skip(skip.path, f"{skip.reason} (named in {named_by})") from None
                raise
            conf_spec, enabled, settings = reader(text, path)
            if spec is None:
                spec, source = conf_spec, path
            if spec is None:
                raise Skip(path, f"no {_KEYS[kind]} line, and no socket on the command line")
    elif kind == "rspamd":
        spec, source = rspamd_socket(tree, default_confs)
    if spec is None:
        raise Skip(fallback_path, "no socket found (no SOCKET variable, no -p option)")
    try:
        return normalise(spec), source, enabled, settings
    except BadSpec as error:
        raise Skip(source, str(error)) from None


def _entries(text):
    """(key, value, line number) of a `Key value` file; `#` starts a comment."""
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition(" ") if " " in line else line.partition("\t")
            yield key, value.strip(), number


def _single(values, path, key):
    """The one value of key, None if absent; raise Skip when the file gives two."""
    distinct = list(dict.fromkeys(value for value, _ in values))
    if len(distinct) > 1:
        lines = ", ".join(str(number) for _, number in values)
        raise Skip(path, f"contradictory {key} lines ({lines}): " + " and ".join(
            repr(value) for value in distinct[:2]))
    return distinct[0] if distinct else None


def _socket_key_reader(key):
    def read(text, path):
        values = [(value, number) for name, value, number in _entries(text)
                  if name.lower() == key.lower()]
        return _single(values, path, key), None, {}
    return read


def _clamav(text, path):
    entries = list(_entries(text))
    values = [(value, number) for name, value, number in entries if name == "MilterSocket"]
    unconfigured = any(name == "Example" for name, _, _ in entries)
    return _single(values, path, "MilterSocket"), (False if unconfigured else None), {}


def _greylist(text, path):
    values, tarpit = [], 0
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        match = re.match(r'socket\s+(?:"([^"]*)"|(\S+))', line)
        if match:
            values.append((match.group(1) if match.group(1) is not None else match.group(2),
                           number))
        for amount, unit in re.findall(r"\btarpit\s+(\d+)([smhdw]?)\b", line):
            tarpit = max(tarpit, int(amount) * _UNITS[unit])
    settings = {}
    if tarpit:
        settings = {"writing_timeout": BASE_TIMEOUT + tarpit,
                    "reading_timeout": BASE_TIMEOUT + tarpit}
    return _single(values, path, "socket"), None, settings


_READERS = {
    "opendkim": _socket_key_reader("Socket"),
    "opendmarc": _socket_key_reader("Socket"),
    "clamav-milter": _clamav,
    "milter-greylist": _greylist,
}
_KEYS = {"opendkim": "Socket", "opendmarc": "Socket", "clamav-milter": "MilterSocket",
         "milter-greylist": "socket"}

# rspamd's proxy worker files, lowest priority first (rspamd.conf includes them so).
RSPAMD_FILES = ("worker-proxy.inc", "local.d/worker-proxy.inc", "override.d/worker-proxy.inc")


def rspamd_socket(tree, directories):
    """(socket, file) of rspamd's proxy worker in milter mode; raise Skip if it is not one.

    The files are read, not `rspamadm configdump`: nothing is run. A later
    file (local.d, then override.d) wins for each key, as rspamd's priorities.
    """
    directory = tree.first_existing(directories)
    if directory is None:
        raise Skip(directories[0], "missing (rspamd's configuration directory)")
    milter, bind = None, None
    for name in RSPAMD_FILES:
        path = f"{directory}/{name}"
        if not tree.exists(path):
            continue
        text = tree.read(path)
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            match = re.match(r"(milter|bind_socket)\s*=\s*\"?([^\";]*)\"?\s*;?", line)
            if not match:
                continue
            key, value = match.group(1), match.group(2).strip()
            if key == "milter":
                milter = (value.lower() in ("yes", "true", "on", "1"), path)
            elif bind is None or bind[1] != path:
                bind = (value, path)  # the first bind_socket of the winning file
    if milter is None or not milter[0]:
        where = milter[1] if milter else f"{directory}/{RSPAMD_FILES[0]}"
        raise Skip(where, "rspamd's proxy worker is not in milter mode (milter = yes)")
    if bind is None:
        raise Skip(milter[1], "rspamd's proxy worker has no bind_socket")
    value, path = bind
    value = value.split()[0] if value.split() else value
    if value.startswith("/"):
        return f"unix:{value}", path
    host, colon, port = value.rpartition(":")
    if not colon:
        raise Skip(path, f"bind_socket {value!r} is neither /path nor HOST:PORT")
    host = host.strip("[]")
    if host in ("*", "localhost", ""):
        host = "127.0.0.1"
    family = "inet6" if ":" in host else "inet"
    return f"{family}:{port}@[{host}]" if family == "inet6" or host[0].isdigit() \
        else f"inet:{port}@{host}", path
