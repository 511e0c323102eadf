"""DNSBL lookups for the `DNSBL Listed` conditions: every service asked in parallel, first hit wins.

A client address is listed by a service when the A record of its reversed form under the
service's domain (``2.0.0.127.zen.spamhaus.org``; IPv6 in 32 reversed nibbles) falls in the
networks the service is expected to answer with. Only the name servers given are asked, with
twisted.names; the system's resolv.conf is never read. Answers and negative answers are cached
for the TTL the zone gives.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass

from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.names import client, dns, error

from miltermanager import probes

# Upstream's default services (dnsbl.conf).
DEFAULT_SERVICES = (
    ("zen.spamhaus.org", ["127.0.0.10/31"]),
    ("dnsbl.sorbs.net", ["127.0.0.10"]),
    ("bl.spamcop.net", ["127.0.0.2"]),
    ("b.barracudacentral.org", ["127.0.0.2"]),
)
# Negative-caching TTL when a negative answer carries no SOA.
NEGATIVE_TTL = 60
_LISTED_BY_DEFAULT = (ipaddress.IPv4Network("127.0.0.0/8"),)
_MISSING = object()


@dataclass(frozen=True)
class DNSBLService:
    """A DNSBL zone and the IPv4 networks its A answer must fall in to mean "listed"."""

    domain: str
    expected: tuple | None = None

    def __post_init__(self):
        domain = self.domain.strip().rstrip(".").lower()
        if not domain:
            raise ValueError("a DNSBL service needs a domain")
        object.__setattr__(self, "domain", domain)
        if self.expected is not None:
            if isinstance(self.expected, str):
                raise TypeError(f"expected is a list of CIDRs, not the string {self.expected!r}")
            networks = tuple(ipaddress.IPv4Network(cidr, strict=False) for cidr in self.expected)
            object.__setattr__(self, "expected", networks)

    def lists(self, answer):
        """Tell whether an A answer (an IPv4 address string) means listed."""
        address = ipaddress.IPv4Address(answer)
        return any(address in network for network in self.expected or _LISTED_BY_DEFAULT)


@dataclass(frozen=True)
class ListedResult:
    """A positive answer: the service, the address looked up, the A answer and its TTL."""

    service: DNSBLService
    address: str
    answer: str
    ttl: int


def default_services():
    """Upstream's default DNSBL services."""
    return [DNSBLService(domain, expected) for domain, expected in DEFAULT_SERVICES]


def query_label(address):
    """(normalised address, reversed label under which DNSBLs list it), or (None, None).

    The label is the reversed octets of an IPv4 address or the 32 reversed nibbles of an IPv6
    one. Text or ASCII bytes are taken, with Sendmail's "IPv6:" prefix; an IPv4-mapped IPv6
    address is looked up as the IPv4 address it carries.
    """
    if isinstance(address, bytes):
        address = address.decode("ascii", "replace")
    if not isinstance(address, str):
        return None, None
    address = address.strip()
    if address[:5].lower() == "ipv6:":
        address = address[5:]
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return None, None
    if parsed.version == 6 and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    # reverse_pointer is "4.3.2.1.in-addr.arpa" or 32 nibbles + ".ip6.arpa".
    return str(parsed), parsed.reverse_pointer.rsplit(".", 2)[0]


class _Resolver(client.Resolver):
    """A client.Resolver whose UDP queries cancel cleanly and stay on loopback for a local server.

    client.Resolver's own queries have no canceller: cancelling one leaves its retry timer
    pending (a dirty reactor in trial, a stray timer in the manager). Twisted 22.4 to 26 share
    this `_query`, which this override keeps but for the canceller and the bound interface.
    """

    def _query(self, address, queries, timeout, id=None):
        host = address[0]
        if ipaddress.ip_address(host).is_loopback:
            interface = host if isIPv6Address(host) else "127.0.0.1"
        else:
            interface = "::" if isIPv6Address(host) else ""
        protocol = self._connectedProtocol(interface=interface)

        def cancel(_):
            for _, call in list(protocol.liveMessages.values()):
                if call.active():
                    call.cancel()
            protocol.liveMessages.clear()

        result = Deferred(cancel)
        protocol.query(address, queries, timeout, id).chainDeferred(result)

        def stop_listening(passthrough):
            protocol.transport.stopListening()
            return passthrough

        return result.addBoth(stop_listening)


class _Cache:
    """A bounded LRU of (service, address) → result with an expiry time."""

    def __init__(self, size):
        self.size = size
        self._entries = OrderedDict()

    def get(self, key, now):
        """The cached value for key (a ListedResult or None), or _MISSING."""
        entry = self._entries.get(key)
        if entry is None:
            return _MISSING
        expires, value = entry
        if now >= expires:
            del self._entries[key]
            return _MISSING
        self._entries.move_to_end(key)
        return value

    def put(self, key, value, ttl, now):
        """Keep value for ttl seconds, dropping the least recently used entries beyond size."""
        if ttl <= 0 or self.size <= 0:
            return
        self._entries[key] = (now + ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self):
        return len(self._entries)


class DNSBL:
    """Looks client addresses up in DNSBL services through the given name servers only."""

    log = Logger()

    def __init__(self, services, name_servers=(("127.0.0.1", 53),), timeout=5.0, reactor=None,
                 cache_size=10000, clock=None):
        if reactor is None:
            from twisted.internet import reactor
        self.services = [service if isinstance(service, DNSBLService) else DNSBLService(service)
                         for service in services]
        # client.Resolver takes addresses only; a host name would need the system resolver.
        self.name_servers = [(str(ipaddress.ip_address(host)), int(port))
                             for host, port in name_servers]
        if not self.name_servers:
            raise ValueError("DNSBL needs at least one name server")
        self.timeout = timeout
        self._clock = reactor if clock is None else clock
        # resolv=None: client.Resolver then reads no resolv.conf and asks only these servers;
        # one retry per server after a quarter of the timeout, the last try outlives it.
        self._resolver = _Resolver(resolv=None, servers=self.name_servers,
                                   timeout=(timeout / 4, timeout), reactor=reactor)
        self._cache = _Cache(cache_size)

    def lookup(self, address) -> Deferred[ListedResult | None]:
        """Fire with the first ListedResult among the services, or None; never fail.

        Cancelling the Deferred cancels the queries in flight.
        """
        address, label = query_label(address)
        if label is None:
            return succeed(None)
        now = self._clock.seconds()
        to_ask = []
        probe = probes.dnsbl_lookup
        for service in self.services:
            cached = self._cache.get((service, address), now)
            if cached is _MISSING:
                to_ask.append(service)
            elif cached is not None:
                if probe is not None:
                    probe("listed", None)
                return succeed(cached)
        if not to_ask:
            if probe is not None:
                probe("not_listed", None)
            return succeed(None)
        race = _Race(self, address, label, to_ask)
        if probe is not None:
            race.result.addCallback(race.report, probe, now)
        return race.result

    def _query(self, service, label):
        """Ask for the A records of label under service's domain; fire with the sections."""
        query = dns.Query(f"{label}.{service.domain}", dns.A, dns.IN)
        return self._resolver.queryUDP([query]).addCallback(self._resolver.filterAnswers)

    def _cache_put(self, service, address, value, ttl):
        """Remember a service's verdict on address for ttl seconds."""
        self._cache.put((service, address), value, ttl, self._clock.seconds())


def _negative_ttl(authority):
    """The negative-caching TTL of a negative answer: its SOA's (RFC 2308), else NEGATIVE_TTL."""
    for record in authority:
        if record.type == dns.SOA:
            return min(record.ttl, record.payload.minimum)
    return NEGATIVE_TTL


class _Race:
    """One lookup: a query per service, the first positive answer wins and cancels the rest."""

    def __init__(self, dnsbl, address, label, services):
        self.dnsbl = dnsbl
        self.address = address
        self.result = Deferred(self._cancel)
        self._done = False
        self._timed_out_after = None
        self._silent = []
        # Every query exists before any callback runs: one may fire synchronously.
        self._pending = {service: dnsbl._query(service, label) for service in services}
        for service, query in list(self._pending.items()):
            query.addCallbacks(self._answered, self._failed, (service,), None, (service,))
        self.result.addTimeout(dnsbl.timeout, dnsbl._clock, onTimeoutCancel=self._timed_out)

    def _answered(self, sections, service):
        """Judge one service's answer; the first listing fires the result."""
        if self._done:
            return
        del self._pending[service]
        answers, authority, _ = sections
        records = [record for record in answers if record.type == dns.A]
        for record in records:
            answer = record.payload.dottedQuad()
            if service.lists(answer):
                listed = ListedResult(service, self.address, answer, record.ttl)
                self.dnsbl._cache_put(service, self.address, listed, record.ttl)
                self._finish(listed)
                return
        ttl = min((record.ttl for record in records), default=None)
        self.dnsbl._cache_put(service, self.address, None,
                              _negative_ttl(authority) if ttl is None else ttl)
        self._finish_if_all_answered()

    def _failed(self, reason, service):
        """A service that cannot answer does not list the address; say so once."""
        if self._done:
            return
        del self._pending[service]
        if reason.check(error.DNSNameError):
            # NXDOMAIN: client.Resolver gives the response message as the error's argument.
            message = reason.value.args[0] if reason.value.args else None
            authority = message.authority if isinstance(message, dns.Message) else []
            self.dnsbl._cache_put(service, self.address, None, _negative_ttl(authority))
        else:
            self.dnsbl.log.warn(
                "[dnsbl][error] {service}: no answer for {address}: {error}",
                service=service.domain, address=self.address, error=_describe(reason))
        self._finish_if_all_answered()

    def _finish_if_all_answered(self):
        """Fire None once no service is left to answer."""
        if not self._pending:
            self._finish(None)

    def _finish(self, value):
        """Fire the result and cancel the queries still in flight."""
        self._cancel_pending()
        self.result.callback(value)

    def _cancel_pending(self):
        """Cancel every query in flight; the CancelledErrors they fire with are ignored."""
        self._done = True
        pending, self._pending = self._pending, {}
        for query in pending.values():
            query.cancel()
        return pending

    def _cancel(self, _):
        """The caller or the timeout cancelled the lookup: stop the queries in flight."""
        self._silent = [service.domain for service in self._cancel_pending()]

    def report(self, result, probe, started):
        """Callback: tell probe (probes.dnsbl_lookup) how the lookup ended and how long it took."""
        outcome = ("listed" if result is not None
                   else "timeout" if self._timed_out_after is not None else "not_listed")
        probe(outcome, self.dnsbl._clock.seconds() - started)
        return result

    def _timed_out(self, result, timeout):
        """The overall timeout: not listed, logged once with the services that were silent."""
        self._timed_out_after = timeout
        self.dnsbl.log.warn(
            "[dnsbl][timeout] {address}: no answer from {services} within {timeout} s",
            address=self.address, services=", ".join(self._silent), timeout=timeout)
        return None


def _describe(reason):
    """A short text for a failed query: the DNS error class or the exception."""
    if reason.check(error.DNSServerError):
        return "SERVFAIL"
    if reason.check(error.DNSQueryRefusedError):
        return "REFUSED"
    return reason.getErrorMessage() or reason.type.__name__
