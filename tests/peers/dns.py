"""An authoritative test DNS server on a loopback address, in-process (trial) or as a process.

Records are twisted.names record objects; A, AAAA, TXT and SOA build them briefly. A name whose
records include an SOA is a zone apex: the server answers for names at or under an apex (the
record, NODATA or NXDOMAIN, with the apex's SOA in the authority section of a negative answer)
and REFUSES every other name. Delay, DROP and SERVFAIL make one name slow, silent or broken::

    server = TestDNSServer({
        "zen.test": [SOA(minimum=60)],
        "2.0.0.127.zen.test": [A("127.0.0.2", ttl=300), TXT("listed")],
        "3.0.0.127.zen.test": [Delay(2.0), A("127.0.0.3")],
        "4.0.0.127.zen.test": [DROP],
        "5.0.0.127.zen.test": [SERVFAIL],
    })
    port = server.start()                 # UDP and TCP on 127.0.0.1:port (0: free)
    self.addCleanup(server.stop)
    ...
    self.assertEqual(server.queries, [("2.0.0.127.zen.test", "A")])

As a process (for end-to-end tests of a running manager), with the records in a zone file of
one record a line, ``NAME [TTL] TYPE DATA`` as in a BIND zone file but with full names
(``zen.test SOA 60``, ``2.0.0.127.zen.test 300 A 127.0.0.2``, ``x.zen.test TXT "a text"``,
``y.zen.test DELAY 2``, ``z.zen.test DROP``, ``w.zen.test SERVFAIL``; ``#`` starts a comment)::

    python3 -m tests.peers.dns --address 127.0.0.1 --port 0 --zone-file F [--query-log L]

It prints ``listening on ADDRESS:PORT`` once both sockets are bound, appends each question it
receives to L as a JSON line (``{"name": ..., "type": ..., "transport": "udp"}``) and stops
on SIGTERM. It binds a loopback address only and never forwards a query anywhere.
"""

import argparse
import ipaddress
import json
import shlex
import socket
import sys
from dataclasses import dataclass
from typing import NamedTuple

from twisted.internet import defer, protocol
from twisted.names import dns
from twisted.protocols.basic import Int16StringReceiver

_UDP_LIMIT = 512


def A(address, ttl=300):
    """An A record."""
    return dns.Record_A(address, ttl)


def AAAA(address, ttl=300):
    """An AAAA record."""
    return dns.Record_AAAA(address, ttl)


def TXT(*texts, ttl=300):
    """A TXT record of one or more strings."""
    return dns.Record_TXT(*(text.encode() if isinstance(text, str) else text for text in texts),
                          ttl=ttl)


def SOA(minimum=60, ttl=None, mname="ns.test", rname="hostmaster.test", serial=1):
    """An SOA record; minimum is the negative-caching TTL (RFC 2308), ttl defaults to it."""
    return dns.Record_SOA(mname=mname, rname=rname, serial=serial, refresh=3600, retry=600,
                          expire=86400, minimum=minimum, ttl=minimum if ttl is None else ttl)


@dataclass(frozen=True)
class Delay:
    """Answer queries for this name after this many seconds."""

    seconds: float


class _Behaviour:
    """A marker among a name's records that changes how the server answers it."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


DROP = _Behaviour("DROP")
SERVFAIL = _Behaviour("SERVFAIL")


class Question(NamedTuple):
    """A question the server received; equal to a plain (name, type) tuple."""

    name: str
    type: str


def _normalise(name):
    """A domain name as text, lower case, without the trailing dot."""
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return name.rstrip(".").lower()


def _type_name(type_code):
    """The mnemonic for a query type code ("A", "TXT", ...), or TYPEnnn."""
    return dns.QUERY_TYPES.get(type_code) or dns.EXT_QUERIES.get(type_code) or f"TYPE{type_code}"


class TestDNSServer:
    """An authoritative DNS server for in-memory zones on a loopback address, UDP and TCP."""

    __test__ = False  # a fixture, not a test case, for collectors that look at the name

    def __init__(self, zones, address="127.0.0.1", reactor=None):
        if not ipaddress.ip_address(address).is_loopback:
            raise ValueError(f"the test DNS server binds loopback addresses only, not {address}")
        if reactor is None:
            from twisted.internet import reactor
        self.address = address
        self.port = None
        self.queries = []
        self.transports = []
        self._reactor = reactor
        self._names = {}
        self._behaviour = {}
        for name, records in zones.items():
            name = _normalise(name)
            for record in records:
                if isinstance(record, (Delay, _Behaviour)):
                    self._behaviour[name] = record
                else:
                    self._names.setdefault(name, []).append(record)
        self._apexes = {name for name, records in self._names.items()
                        if any(record.TYPE == dns.SOA for record in records)}
        orphans = [name for name in {*self._names, *self._behaviour} if self._zone_of(name) is None]
        if orphans:
            raise ValueError(f"names outside every zone (give the apex an SOA): {sorted(orphans)}")
        self._udp = None
        self._tcp = None
        self._connections = set()
        self._delayed = set()
        self.query_log = None

    @property
    def server_address(self):
        """The (address, port) pair a resolver's servers list takes."""
        return (self.address, self.port)

    def start(self, port=0):
        """Listen on UDP and TCP on the same port (0: a free one) of the address; return it."""
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        for _ in range(100):
            tcp = socket.socket(family, socket.SOCK_STREAM)
            udp = socket.socket(family, socket.SOCK_DGRAM)
            try:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((self.address, port))
                udp.bind((self.address, tcp.getsockname()[1]))
                tcp.listen(50)
                for sock in (tcp, udp):
                    sock.setblocking(False)
                # Bound here and adopted, because Twisted 22.4 leaks the socket of a
                # listenUDP/listenTCP whose bind fails.
                self._tcp = self._reactor.adoptStreamPort(tcp.fileno(), family,
                                                          _StreamFactory(self))
                self._udp = self._reactor.adoptDatagramPort(udp.fileno(), family,
                                                            _Datagram(self))
                self.port = self._tcp.getHost().port
                return self.port
            except OSError:
                if port:
                    raise
            finally:
                tcp.close()
                udp.close()
        raise RuntimeError(f"no port free for both UDP and TCP on {self.address}")

    def stop(self):
        """Stop listening, drop delayed answers and TCP connections; fire when all are closed."""
        for call in self._delayed:
            if call.active():
                call.cancel()
        self._delayed.clear()
        waiting = []
        for port in (self._udp, self._tcp):
            if port is not None:
                waiting.append(defer.maybeDeferred(port.stopListening))
        for connection in list(self._connections):
            waiting.append(connection.closed)
            connection.transport.abortConnection()
        self._udp = self._tcp = None
        return defer.gatherResults(waiting).addCallback(lambda _: None)

    def _zone_of(self, name):
        """The apex of the zone holding name, or None."""
        labels = name.split(".")
        for start in range(len(labels)):
            candidate = ".".join(labels[start:])
            if candidate in self._apexes:
                return candidate
        return None

    def _answer(self, message, transport_name, send):
        """Build the reply to a query message and pass its bytes to send (now or later)."""
        response = dns.Message(id=message.id, answer=1, opCode=message.opCode,
                               recDes=message.recDes, auth=1)
        response.queries = message.queries
        if message.opCode != dns.OP_QUERY or len(message.queries) != 1:
            response.rCode = dns.ENOTIMP
            response.auth = 0
            send(response)
            return
        query = message.queries[0]
        name = _normalise(query.name.name)
        self.queries.append(Question(name, _type_name(query.type)))
        if self.query_log is not None:
            self.query_log.write(json.dumps({"name": name, "type": _type_name(query.type),
                                             "transport": transport_name}) + "\n")
            self.query_log.flush()
        apex = self._zone_of(name)
        behaviour = self._behaviour.get(name)
        if apex is None or query.cls != dns.IN:
            response.rCode = dns.EREFUSED
            response.auth = 0
        elif behaviour is DROP:
            return
        elif behaviour is SERVFAIL:
            response.rCode = dns.ESERVER
            response.auth = 0
        else:
            records = self._names.get(name, [])
            response.answers = [self._header(name, record) for record in records
                                if query.type in (record.TYPE, dns.ALL_RECORDS)]
            if not response.answers:
                if not records and not self._has_descendants(name):
                    response.rCode = dns.ENAME
                soa = next(record for record in self._names[apex] if record.TYPE == dns.SOA)
                response.authority = [self._header(apex, soa)]
        if isinstance(behaviour, Delay):
            call = self._reactor.callLater(behaviour.seconds, self._send_later, send, response)
            self._delayed.add(call)
        else:
            send(response)

    def _send_later(self, send, response):
        """Send a delayed response and forget its timer."""
        self._delayed = {call for call in self._delayed if call.active()}
        send(response)

    def _has_descendants(self, name):
        """Tell whether some name below name holds records (an empty non-terminal is NODATA)."""
        suffix = "." + name
        return any(other.endswith(suffix) for other in self._names)

    @staticmethod
    def _header(name, record):
        """Wrap a record for name in an authoritative resource record header."""
        return dns.RRHeader(name=name, type=record.TYPE, cls=dns.IN, ttl=record.ttl,
                            payload=record, auth=True)


class _Datagram(protocol.DatagramProtocol):
    """The UDP side: one query per datagram, answers truncated at 512 bytes."""

    def __init__(self, server):
        self.server = server

    def datagramReceived(self, data, address):
        message = dns.Message()
        try:
            message.fromStr(data)
        except Exception:
            return
        if message.answer:
            return

        def send(response):
            data = response.toStr()
            if len(data) > _UDP_LIMIT:
                response.answers, response.authority, response.additional = [], [], []
                response.trunc = 1
                data = response.toStr()
            if self.transport is not None:
                self.transport.write(data, address)

        self.server._answer(message, "udp", send)


class _Stream(Int16StringReceiver):
    """The TCP side: length-prefixed messages (RFC 1035 4.2.2)."""

    def __init__(self, server):
        self.server = server
        self.closed = defer.Deferred()

    def connectionMade(self):
        self.server._connections.add(self)

    def stringReceived(self, data):
        message = dns.Message()
        try:
            message.fromStr(data)
        except Exception:
            self.transport.loseConnection()
            return
        self.server._answer(message, "tcp", self._send)

    def _send(self, response):
        if self.transport is not None and self in self.server._connections:
            self.sendString(response.toStr())

    def connectionLost(self, reason):
        self.server._connections.discard(self)
        self.closed.callback(None)


class _StreamFactory(protocol.ServerFactory):
    """Builds one _Stream per TCP connection."""

    noisy = False

    def __init__(self, server):
        self.server = server

    def buildProtocol(self, address):
        return _Stream(self.server)


def parse_zone_file(lines):
    """Parse ``NAME [TTL] TYPE DATA`` lines into the zones dict TestDNSServer takes."""
    zones = {}
    for number, line in enumerate(lines, 1):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        try:
            name, rest = words[0], words[1:]
            ttl = None
            if rest and rest[0].isdigit():
                ttl, rest = int(rest[0]), rest[1:]
            kind, data = rest[0].upper(), rest[1:]
            ttl_arg = {} if ttl is None else {"ttl": ttl}
            if kind == "A":
                record = A(data[0], **ttl_arg)
            elif kind == "AAAA":
                record = AAAA(data[0], **ttl_arg)
            elif kind == "TXT":
                record = TXT(*data, **ttl_arg)
            elif kind == "SOA":
                record = SOA(*(int(value) for value in data[:1]), **ttl_arg)
            elif kind == "DELAY":
                record = Delay(float(data[0]))
            elif kind in ("DROP", "SERVFAIL"):
                record = DROP if kind == "DROP" else SERVFAIL
            else:
                raise ValueError(f"unknown type {kind}")
        except (IndexError, ValueError) as error:
            raise ValueError(f"line {number}: {line.strip()!r}: {error}") from None
        zones.setdefault(name, []).append(record)
    return zones


def main(argv=None):
    """Run a TestDNSServer from a zone file until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python3 -m tests.peers.dns",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--address", default="127.0.0.1", help="a loopback address (127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="UDP and TCP port; 0 picks a free one")
    parser.add_argument("--zone-file", required=True, help="NAME [TTL] TYPE DATA lines")
    parser.add_argument("--query-log", help="append each question received as a JSON line")
    options = parser.parse_args(argv)
    with open(options.zone_file, encoding="utf-8") as zone_file:
        zones = parse_zone_file(zone_file)
    from twisted.internet import reactor
    server = TestDNSServer(zones, options.address, reactor)
    if options.query_log:
        server.query_log = open(options.query_log, "a", encoding="utf-8")
    port = server.start(options.port)
    print(f"listening on {options.address}:{port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
