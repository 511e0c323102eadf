"""Whether each SMTP client is still there while its session waits for the children.

A message can keep the children busy for minutes (a virus scan, a slow
DNS blocklist) while the SMTP client that sent it has long hung up: the
MTA, blocked on the manager's reply, does not notice. Every
manager.connection_check_interval seconds, one timer for the whole factory
(as upstream's periodical checker) asks the registered connection checkers
about every session whose MTA waits for a reply. When one says the client
is gone, the session answers the MTA manager.fallback_status_at_disconnect
and lets its children go (ManagerSession.client_gone).

Checkers are `@manager.define_connection_checker(name)` functions of a
CheckContext, and the built-in "netstat" one
(`manager.use_netstat_connection_checker(interval)`), which reads the
kernel's TCP tables (/proc/net/tcp, /proc/net/tcp6) instead of running
netstat. With no checker or an interval of 0 there is no timer at all.
"""

import ipaddress
import sys

from twisted.internet import task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import Logger

from .conditions.context import SocketAddress, macro_name, text

TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")

# The kernel's TCP states (include/net/tcp_states.h) as /proc/net/tcp prints them.
TCP_STATES = {
    0x01: "ESTABLISHED", 0x02: "SYN_SENT", 0x03: "SYN_RECV", 0x04: "FIN_WAIT1",
    0x05: "FIN_WAIT2", 0x06: "TIME_WAIT", 0x07: "CLOSE", 0x08: "CLOSE_WAIT",
    0x09: "LAST_ACK", 0x0A: "LISTEN", 0x0B: "CLOSING", 0x0C: "NEW_SYN_RECV",
}


class CheckContext:
    """What a connection checker is given (upstream's ConnectionCheckContext).

    smtp_client_address: the SMTP client as the MTA gave it at connect (a
    conditions.context.SocketAddress). smtp_server_address: the MTA's end of
    its connection to the manager, also a SocketAddress (family "unix" for a
    UNIX socket). context["v"], context["{daemon_addr}"]: an MTA macro as
    str, or None (braces optional). smtp_server_name: the "v" macro.
    """

    __slots__ = ("smtp_client_address", "smtp_server_address", "_macros")

    def __init__(self, smtp_client_address, smtp_server_address, macros):
        self.smtp_client_address = smtp_client_address
        self.smtp_server_address = smtp_server_address
        self._macros = macros

    def __getitem__(self, name):
        return text(self._macros.get(macro_name(name)))

    @property
    def smtp_server_name(self):
        return self["v"]


def server_address(transport):
    """The MTA's end of its connection to the manager as a SocketAddress."""
    peer = transport.getPeer()
    if isinstance(peer, IPv4Address):
        return SocketAddress("inet", peer.host, peer.port)
    if isinstance(peer, IPv6Address):
        return SocketAddress("inet6", peer.host, peer.port)
    if isinstance(peer, UNIXAddress):
        name = peer.name  # bytes, str or None, as the platform gave it
        return SocketAddress("unix", path=text(name) if isinstance(name, bytes) else name)
    return SocketAddress("unknown")


def same_host(transport):
    """Whether the MTA runs on this machine, so that our TCP tables hold its connections.

    Upstream asks whether the MTA's address is "local", which includes
    private networks: an MTA on another host of 192.168/16 would have every
    client found gone. Here: a UNIX socket, a loopback address, or the MTA
    connecting from the address it reached us on.
    """
    peer = transport.getPeer()
    if isinstance(peer, UNIXAddress):
        return True
    host = getattr(peer, "host", None)
    if host is None:
        return False
    ip = SocketAddress("inet", host).ip_address
    if ip is None:
        return False
    if _unmapped(ip).is_loopback:
        return True
    return host == getattr(transport.getHost(), "host", None)


def _unmapped(ip):
    """ip, or the IPv4 address an IPv4-mapped IPv6 address carries (as the tables list it)."""
    return ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped is not None else ip


def _hex_address(field):
    """An address of /proc/net/tcp(6): 32-bit words in hex, each in the host's byte order."""
    words = [int(field[start:start + 8], 16).to_bytes(4, sys.byteorder)
             for start in range(0, len(field), 8)]
    return _unmapped(ipaddress.ip_address(b"".join(words)))


def parse_tcp_table(lines, table=None):
    """{(remote ip, remote port): set of state names} from the lines of /proc/net/tcp(6).

    The remote end is the key: on the SMTP server's socket it is the SMTP
    client, as upstream looks up netstat's "foreign address". A line that
    does not parse is skipped.
    """
    table = {} if table is None else table
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or not fields[0].endswith(":"):
            continue  # the heading
        try:
            address, port = fields[2].split(":")
            key = (_hex_address(address), int(port, 16))
            state = TCP_STATES.get(int(fields[3], 16), fields[3])
        except ValueError:
            continue
        table.setdefault(key, set()).add(state)
    return table


def read_tcp_tables(paths=TCP_TABLES):
    """parse_tcp_table of every file in paths that can be read; None if none can.

    (/proc/net/tcp6 is missing where IPv6 is off; all of them where there is
    no Linux /proc.)
    """
    table = None
    for path in paths:
        try:
            with open(path, encoding="ascii", errors="replace") as file:
                table = parse_tcp_table(file, table)
        except OSError:
            continue
    return table


# The states of a socket whose peer is still there (the handshake counts).
_LIVE = frozenset({"ESTABLISHED", "SYN_RECV", "NEW_SYN_RECV"})


class NetstatChecker:
    """Upstream's netstat checker on the kernel's TCP tables, read at most once per round.

    The client is gone when no socket has its address and port as the
    remote end, or only sockets in CLOSE_WAIT (the client closed, the server
    did not yet) or in another closing state: a TIME_WAIT left for a minute
    by an earlier connection from the same port must not keep a client
    "there" (upstream's netstat parse keeps whichever line came last).
    Asked only when the MTA runs on this machine (same_host): elsewhere our
    tables do not hold its connections. Without readable tables (no Linux
    /proc) every client counts as connected, said once.
    """

    name = "netstat"
    log = Logger()

    def __init__(self, paths=TCP_TABLES):
        self.paths = paths
        self.table = None  # read when first needed in a round
        self._read = False
        self._unreadable_told = False

    def new_round(self):
        self.table = None
        self._read = False

    def connected(self, context, transport):
        if not same_host(transport):
            return True
        client = context.smtp_client_address
        ip = client.ip_address  # None for a UNIX socket, an unknown or unparsable address
        if ip is None or client.port is None:
            return True
        key = (_unmapped(ip), client.port)
        if not self._read:
            self.table = read_tcp_tables(self.paths)
            self._read = True
            if self.table is None and not self._unreadable_told:
                self._unreadable_told = True
                self.log.warn("[connection-check][netstat] cannot read {paths}: the netstat "
                              "checker takes every SMTP client as connected",
                              paths=" or ".join(self.paths))
        if self.table is None:
            return True
        states = self.table.get(key)
        return states is not None and not states.isdisjoint(_LIVE)


class ConnectionChecks:
    """The factory's one timer: each round asks the checkers about every waiting session.

    Started when a connection arrives while manager.connection_check_interval
    and a checker are configured; it stops when no connection is left, or
    when a reload turned checking off. Checkers, interval and
    fallback_status_at_disconnect are the current configuration's, reloads
    included, as upstream's one global checker. Upstream asks 30 sessions
    per tick; here every waiting session is asked each round: the netstat
    table is read once per round, so a session costs a dict lookup.
    """

    log = Logger()

    def __init__(self, factory, clock):
        self.factory = factory
        self.clock = clock
        self.interval = 0
        self._loop = None
        self._netstat = None
        self._failing = set()  # names of checkers whose last call raised (logged once)

    def connection_made(self):
        if self._loop is not None:
            return
        manager = self.factory.configuration.manager
        if manager.connection_check_interval and manager.connection_checkers:
            self._start(manager.connection_check_interval)

    def connection_lost(self):
        if not self.factory.connections:
            self.stop()

    def _start(self, interval):
        self.interval = interval
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(interval, now=False).addErrback(
            lambda failure: self.log.failure("[connection-check][error] the check failed",
                                             failure))

    def stop(self):
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def check(self):
        """One round: ask about every session whose MTA waits for a reply now."""
        manager = self.factory.configuration.manager
        checkers = manager.connection_checkers
        if not (manager.connection_check_interval and checkers):
            self.stop()  # a reload turned it off
            return
        if manager.connection_check_interval != self.interval:
            self.stop()
            self._start(manager.connection_check_interval)
        if self._netstat is not None:
            self._netstat.new_round()
        for connection in list(self.factory.open_connections()):
            session = connection.milter
            command = getattr(session, "smtp_client", None)
            if command is None or not connection.waiting:
                continue
            context = CheckContext(SocketAddress.from_connect(command),
                                   server_address(connection.transport), connection.macros)
            gone = self._gone(checkers, context, connection.transport)
            if gone is not None:
                try:
                    session.client_gone(gone, context.smtp_client_address,
                                        manager.fallback_status_at_disconnect)
                except Exception:
                    # One session's trouble must not stop the checks of the others.
                    self.log.failure("[connection-check][error] letting session {number} go "
                                     "failed", number=getattr(session, "number", None))

    def _gone(self, checkers, context, transport):
        """The name of the first checker that finds the client gone; None if none does."""
        for hook in checkers.values():
            try:
                if hook.builtin == "netstat":
                    if self._netstat is None:
                        self._netstat = NetstatChecker()
                    connected = self._netstat.connected(context, transport)
                else:
                    connected = hook.function(context)
            except Exception as error:
                if hook.name not in self._failing:  # once until it works again
                    self._failing.add(hook.name)
                    self.log.error("[connection-check][error] checker {name} ({origin}) "
                                   "failed: {error!r}; taken as still connected until it works",
                                   name=hook.name, origin=hook.origin, error=error)
                continue
            self._failing.discard(hook.name)
            if not connected:
                return hook.name
        return None
