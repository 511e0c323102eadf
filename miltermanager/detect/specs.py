"""Socket specs as milters and MTAs write them, turned into milter-manager's syntax.

Each milter has its own dialect: libmilter's `local:`/`unix:`/`inet:PORT@HOST`
with or without a host, bare paths (clamav-milter, spamass-milter),
Postfix's `inet:HOST:PORT`, rspamd's `HOST:PORT` and `*:PORT`, and
prefixes written twice. A milter listening on every address (no host,
`0.0.0.0`, `::`, `*`) or on `localhost` is reached on the loopback address
of its family, so that no name is looked up: IPv6 (`::`, `::1`,
`ip6-localhost`, `inet6:` without a host) stays IPv6, `inet6:PORT@[::1]`.
"""

import ipaddress
import re

from miltermanager import connection_spec

# Host names meaning the loopback address of the family written (localhost: both exist).
_LOOPBACK_NAMES = {"": None, "*": None, "localhost": None, "ip6-localhost": "inet6",
                   "ip6-loopback": "inet6", "localhost6": "inet6"}
_LOOPBACK = {"inet": "127.0.0.1", "inet6": "::1"}
_PREFIXES = re.compile(r"((?:unix|local|inet6?):)+", re.IGNORECASE)


class BadSpec(ValueError):
    """A socket that cannot be read as one; the text says why."""


def normalise(text):
    """text (a milter's or MTA's socket) in milter-manager's syntax; BadSpec if it is none."""
    written = text
    text = text.strip().strip("\"'").strip()
    if not text:
        raise BadSpec("empty socket")
    if "$" in text or "`" in text:
        raise BadSpec(f"socket {written!r} uses a shell variable or command that is not set "
                      f"where it is read")
    match = _PREFIXES.match(text)
    if match:
        # Keep the last of repeated prefixes (unix:local:/x, inet:inet:25), as upstream.
        last = match.group(0).rstrip(":").split(":")[-1].lower()
        text = f"{last}:{text[match.end():]}"
    if text.startswith("/"):
        text = "unix:" + text
    kind, colon, rest = text.partition(":")
    kind = kind.lower()
    if not colon:
        raise BadSpec(f"socket {written!r} has no type and is not a path")
    if kind in ("unix", "local"):
        if not rest.startswith("/"):
            raise BadSpec(f"socket {written!r} is not an absolute path")
        result = f"unix:{rest}"
    elif kind in ("inet", "inet6"):
        result = _inet(kind, rest, written)
    else:
        raise BadSpec(f"socket {written!r} has an unknown type {kind!r}")
    try:
        connection_spec.parse(result)
    except ValueError as error:
        raise BadSpec(f"socket {written!r}: {str(error).split(';')[0]}") from None
    return result


def host_port(text, written=None):
    """rspamd's bind_socket and the like: `HOST:PORT`, `*:PORT`, `[ADDR]:PORT` or a path."""
    written = text if written is None else written
    text = text.strip()
    if text.startswith("/"):
        return normalise(text)
    host, colon, port = text.rpartition(":")
    if not colon:
        raise BadSpec(f"socket {written!r} is neither a path nor HOST:PORT")
    family = "inet6" if _version(host.strip("[]")) == 6 else "inet"
    return _finish(family, host, port, written)


def _inet(family, rest, written):
    if "@" in rest:
        port, _, host = rest.partition("@")
    elif ":" in rest:
        # Postfix writes inet:HOST:PORT; an address in brackets may hold colons.
        host, _, port = rest.rpartition(":")
        if family == "inet" and _version(host.strip("[]")) == 6:
            family = "inet6"
    else:
        port, host = rest, ""
    return _finish(family, host, port, written)


def _finish(family, host, port, written):
    port = port.strip()
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) <= 65535:
        raise BadSpec(f"socket {written!r} has no valid port")
    bare = host.strip().strip("[]")
    if bare.lower() in _LOOPBACK_NAMES:
        family = _LOOPBACK_NAMES[bare.lower()] or family
        return f"{family}:{int(port)}@[{_LOOPBACK[family]}]"
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        return f"{family}:{int(port)}@{bare}"
    family = "inet6" if address.version == 6 else "inet"
    if address.is_unspecified:  # listening on every address: reached on the loopback one
        bare = _LOOPBACK[family]
    return f"{family}:{int(port)}@[{bare}]"


def _version(text):
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return None
