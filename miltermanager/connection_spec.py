"""Connection specs: milter socket strings (unix:, inet:, inet6:) and Twisted endpoint strings."""

import functools
import ipaddress
import re
from dataclasses import dataclass

from twisted.internet import endpoints

from . import twisted_internals

EXPECTED = (
    "expected unix:/path, local:/path, inet:PORT[@HOST], inet:PORT@[ADDRESS], "
    "inet6:PORT[@HOST], inet6:PORT@[ADDRESS], inet:HOST:PORT (Postfix) "
    "or a Twisted endpoint string (tcp:host=HOST:port=PORT, unix:path=/path, ...)"
)
# Endpoint types Twisted itself knows; a spec naming one of them (and not in a
# milter form) is handed to Twisted's own parser when it is not one we translate.
TWISTED_TYPES = frozenset({"tcp", "tcp6", "unix", "ssl", "tls", "systemd", "stdio"})
# Keys of tcp:/tcp6:/unix: endpoint strings we translate ourselves, so that one
# string works for both listening and connecting, as milter specs do.
_TRANSLATED_KEYS = frozenset({"host", "interface", "port", "path"})
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?\Z")
# sun_path holds 108 bytes on Linux, NUL included. Twisted (22.4 to 26 at least)
# fails inside the reactor on a longer path and never fires the connect Deferred.
MAX_UNIX_PATH = 107
_ANY_ADDRESS = {"inet": "0.0.0.0", "inet6": "::"}
_LOOPBACK = {"inet": "127.0.0.1", "inet6": "::1"}


class _Invalid(Exception):
    """Why a spec is bad; parse() turns it into a ValueError naming the spec."""


@dataclass(frozen=True, slots=True)
class ConnectionSpec:
    """Where a milter listens: a UNIX socket path or an inet/inet6 host and port.

    family is "unix", "inet", "inet6", or "endpoint" for a Twisted endpoint
    string we pass to Twisted as written (endpoint then holds that string).
    """

    family: str
    host: str | None = None
    port: int | None = None
    path: str | None = None
    endpoint: str | None = None

    @property
    def is_unix(self):
        return self.family == "unix"

    def __str__(self):
        if self.endpoint is not None:
            return self.endpoint
        if self.family == "unix":
            return f"unix:{self.path}"
        if self.host is None:
            return f"{self.family}:{self.port}"
        return f"{self.family}:{self.port}@{_format_host(self.host)}"

    def connect(self, reactor, factory, timeout=30):
        """Dial this spec as reactor.connectTCP or connectUNIX would; the IConnector, or None.

        None for what only an endpoint dials (client_endpoint): a Twisted
        endpoint string, an inet6 host name (resolved for IPv6 addresses).
        The endpoint for the others would do what this does, wrapping the
        factory and every protocol it builds in one more object of its own.
        """
        if self.endpoint is not None:
            return None
        if self.family == "unix":
            return twisted_internals.connect_unix(reactor, self.path, factory, timeout)
        host = self.host or _LOOPBACK[self.family]
        if self.family == "inet6" and _ip_version(host) != 6:
            return None
        return twisted_internals.connect_tcp(reactor, host, self.port, factory, timeout)

    def client_endpoint(self, reactor, timeout=30):
        """An IStreamClientEndpoint connecting to this spec (inet without host: loopback)."""
        if self.endpoint is not None:
            return endpoints.clientFromString(reactor, self.endpoint)
        if self.family == "unix":
            return endpoints.UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        host = self.host or _LOOPBACK[self.family]
        if self.family == "inet6":
            return endpoints.TCP6ClientEndpoint(reactor, host, self.port, timeout=timeout)
        return endpoints.TCP4ClientEndpoint(reactor, host, self.port, timeout=timeout)

    def server_endpoint(self, reactor, backlog=50, mode=0o660):
        """An IStreamServerEndpoint listening on this spec (inet without host: all addresses)."""
        if self.endpoint is not None:
            return endpoints.serverFromString(reactor, self.endpoint)
        if self.family == "unix":
            return endpoints.UNIXServerEndpoint(reactor, self.path, backlog=backlog, mode=mode)
        host = self.host or _ANY_ADDRESS[self.family]
        if self.family == "inet6":
            return endpoints.TCP6ServerEndpoint(reactor, self.port, backlog, host)
        return endpoints.TCP4ServerEndpoint(reactor, self.port, backlog, host)


def parse(spec):
    """Parse a connection spec; raise ValueError naming the spec and the forms expected."""
    if not isinstance(spec, str):
        raise ValueError(f"connection spec {spec!r} is not a string; {EXPECTED}")
    try:
        return _parse(spec)
    except _Invalid as reason:
        raise ValueError(f"bad connection spec {spec!r}: {reason}; {EXPECTED}") from None


@functools.lru_cache(maxsize=256)
def _parse(spec):
    # Cached: each child's spec is parsed again at every MTA connection (client.connect),
    # and its address check (ipaddress) was a tenth of a session's setup. A ConnectionSpec
    # is frozen, so one can be shared; a bad spec raises, and that is not cached.
    if spec.startswith("/"):
        return ConnectionSpec("unix", path=_check_path(spec))  # libmilter takes a bare path as unix too
    kind, colon, rest = spec.partition(":")
    kind = kind.lower()  # libmilter compares the prefix case-insensitively
    if not colon:
        raise _Invalid("no type prefix")
    if kind in ("unix", "local") and "=" not in rest:
        return ConnectionSpec("unix", path=_check_path(rest))
    if kind in ("inet", "inet6") and "=" not in rest:
        return _parse_inet(kind, rest)
    if kind in TWISTED_TYPES or "=" in rest:
        return _parse_twisted(spec, kind, rest)
    raise _Invalid(f"unknown type {kind!r}")


def _parse_inet(family, rest):
    """PORT, PORT@HOST, PORT@[ADDRESS] (libmilter) or HOST:PORT, [ADDRESS]:PORT (Postfix)."""
    if "@" in rest:
        port, _, host = rest.partition("@")
        if not host:
            raise _Invalid("empty host after '@'")
    elif ":" in rest:
        host, _, port = rest.rpartition(":")
        if not host:
            raise _Invalid("empty host before ':'")
        if family == "inet" and _ip_version(host.strip("[]")) == 6:
            family = "inet6"  # Postfix picks the family from the address
    else:
        port, host = rest, None
    return ConnectionSpec(family, _check_host(family, host), _parse_port(port))


def _parse_twisted(spec, kind, rest):
    """Translate tcp:, tcp6: and unix: strings; pass any other one to Twisted as written."""
    args, kwargs = _split_endpoint(rest)
    if kind not in ("tcp", "tcp6", "unix") or not kwargs.keys() <= _TRANSLATED_KEYS:
        return _twisted_as_written(spec, kind, args, kwargs)
    if kind == "unix":
        if len(args) > 1 or kwargs.keys() - {"path"} or args and "path" in kwargs:
            raise _Invalid("a unix endpoint takes only a path")
        path = args[0] if args else kwargs.get("path", "")
        return ConnectionSpec("unix", path=_check_path(path))
    family = "inet6" if kind == "tcp6" else "inet"
    host = kwargs.get("host", kwargs.get("interface"))
    port = kwargs.get("port")
    # Positionals as Twisted reads them: "tcp:PORT" listens, "tcp:HOST:PORT" connects.
    if len(args) == 2 and host is None and port is None:
        host, port = args
    elif len(args) == 1 and port is None:
        (port,) = args
    elif len(args) == 1 and host is None:
        (host,) = args
    elif args:
        raise _Invalid("too many positional arguments")
    if "host" in kwargs and "interface" in kwargs:
        raise _Invalid("give host or interface, not both")
    if port is None:
        raise _Invalid("no port")
    return ConnectionSpec(family, _check_host(family, host), _parse_port(port))


def _twisted_as_written(spec, kind, args, kwargs):
    """A spec Twisted parses itself; keep what we can see of where it points."""
    if kind == "unix":
        path = kwargs.get("path") or (args[0] if args else "")
        return ConnectionSpec("unix", path=_check_path(path), endpoint=spec)
    port = kwargs.get("port") or (args[-1] if args else None)
    try:
        port = int(port)
    except (TypeError, ValueError):
        port = None
    host = kwargs.get("host", kwargs.get("interface"))
    return ConnectionSpec("endpoint", host, port, endpoint=spec)


def _split_endpoint(rest):
    """Split Twisted's colon syntax (backslash escapes) into positional and key=value parts."""
    parts, current, chars = [], [], iter(rest)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    args, kwargs = [], {}
    for part in parts:
        key, equals, value = part.partition("=")
        if equals:
            kwargs[key] = value
        else:
            args.append(part)
    return args, kwargs


def _check_path(path):
    if not path:
        raise _Invalid("empty socket path")
    size = len(path.encode("utf-8", "surrogateescape"))
    if size > MAX_UNIX_PATH:
        raise _Invalid(f"socket path is {size} bytes long; at most {MAX_UNIX_PATH} fit")
    return path


def _parse_port(text):
    # isdigit() alone would take "²" or "٣"; int() alone would take "+1", " 1" and "1_0".
    if not (text.isascii() and text.isdigit()):
        raise _Invalid(f"port {text!r} is not a number")
    port = int(text)
    if port > 65535:
        raise _Invalid(f"port {port} is over 65535")
    return port  # 0 is kept: listening on it asks the kernel for a free port


def _check_host(family, host):
    """Return host without brackets, checked against the family."""
    if host is None:
        return None
    bracketed = host.startswith("[") or host.endswith("]")
    if bracketed:
        if not (host.startswith("[") and host.endswith("]")):
            raise _Invalid(f"unbalanced brackets in host {host!r}")
        host = host[1:-1]
    version = _ip_version(host)
    wanted = 6 if family == "inet6" else 4
    if version == wanted:
        return host
    if version is not None:
        other = "inet6" if version == 6 else "inet"
        raise _Invalid(f"{host} is an IPv{version} address: use {other}")
    if bracketed:
        raise _Invalid(f"[{host}] is not an IPv{wanted} address")
    if not _HOSTNAME.match(host):
        raise _Invalid(f"bad host name {host!r}")
    return host


def _ip_version(text):
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return None


def _format_host(host):
    return f"[{host}]" if _ip_version(host) else host
