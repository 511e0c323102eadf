"""DNSBL lookups against a twisted.names test server on 127.0.0.1; never the system resolver."""

from twisted.internet import defer, reactor, task
from twisted.logger import Logger
from twisted.names import client, dns
from twisted.trial import unittest

from miltermanager.conditions import dnsbl
from miltermanager.conditions.dnsbl import DNSBL, DNSBLService, ListedResult
from tests.peers.dns import DROP, SERVFAIL, SOA, TXT, A, Delay, TestDNSServer

V6 = "2001:db8::1"
V6_NAME = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
ZONES = {
    "zen.test": [SOA(minimum=30, ttl=60)],
    "2.0.0.127.zen.test": [A("127.0.0.2", ttl=300), TXT("listed")],
    "4.0.0.127.zen.test": [A("127.0.0.4", ttl=120), A("127.0.0.10", ttl=100)],
    "5.0.0.127.zen.test": [A("10.0.0.1", ttl=200)],
    "6.0.0.127.zen.test": [SERVFAIL],
    "7.0.0.127.zen.test": [TXT("no A record here")],
    f"{V6_NAME}.zen.test": [A("127.0.0.2", ttl=300)],
    "slow.test": [SOA(minimum=30)],
    "2.0.0.127.slow.test": [Delay(3.0), A("127.0.0.2")],
    "broken.test": [SOA(minimum=30)],
    "2.0.0.127.broken.test": [SERVFAIL],
    "silent.test": [SOA(minimum=30)],
    "2.0.0.127.silent.test": [DROP],
    "3.0.0.127.silent.test": [DROP],
}
ZEN = DNSBLService("zen.test", ["127.0.0.2/31"])


def dns_timers():
    """The twisted.names query timers still pending on the reactor."""
    return [call for call in reactor.getDelayedCalls()
            if call.active() and getattr(call.func, "__name__", "") == "_clearFailed"]


def dns_client_ports():
    """The UDP ports twisted.names clients still read from."""
    return [reader for reader in reactor.getReaders()
            if isinstance(getattr(reader, "protocol", None), dns.DNSDatagramProtocol)]


class DNSBLTestCase(unittest.TestCase):
    """A DNSBL whose only name server is a TestDNSServer on 127.0.0.1."""

    def setUp(self):
        self.server = TestDNSServer(ZONES)
        self.server.start()
        self.addCleanup(self.server.stop)
        self.events = []

    def make(self, services=(ZEN,), **options):
        """A DNSBL asking only the test server, logging into self.events."""
        options.setdefault("timeout", 2.0)
        blacklist = DNSBL(list(services), name_servers=[self.server.server_address],
                          reactor=reactor, **options)
        blacklist.log = Logger(observer=self.events.append)
        self.addCleanup(lambda: self.assertEqual(dns_timers(), []))
        return blacklist

    def log_lines(self):
        """The formatted log lines the DNSBL emitted."""
        from twisted.logger import formatEvent
        return [formatEvent(event) for event in self.events]

    @defer.inlineCallbacks
    def test_listed_inside_expected_cidr(self):
        """An A answer inside the expected CIDR lists the address, with the answer and its TTL."""
        result = yield self.make().lookup("127.0.0.2")
        self.assertEqual(result, ListedResult(ZEN, "127.0.0.2", "127.0.0.2", 300))
        self.assertEqual(self.server.queries, [("2.0.0.127.zen.test", "A")])

    @defer.inlineCallbacks
    def test_answer_outside_expected_cidr_is_not_listed(self):
        """An A answer outside the expected CIDRs means not listed."""
        service = DNSBLService("zen.test", ["127.0.0.10/31"])
        self.assertIsNone((yield self.make([service]).lookup("127.0.0.2")))

    @defer.inlineCallbacks
    def test_any_matching_answer_of_several_lists(self):
        """Among several A answers the one inside the expected CIDR is reported."""
        service = DNSBLService("zen.test", ["127.0.0.10/31"])
        result = yield self.make([service]).lookup("127.0.0.4")
        self.assertEqual((result.answer, result.ttl), ("127.0.0.10", 100))

    @defer.inlineCallbacks
    def test_no_expected_cidr_means_any_loopback_answer(self):
        """Without expected CIDRs a 127.0.0.0/8 answer lists and any other answer does not."""
        blacklist = self.make([DNSBLService("zen.test")])
        self.assertEqual((yield blacklist.lookup("127.0.0.4")).answer, "127.0.0.4")
        self.assertIsNone((yield blacklist.lookup("127.0.0.5")))

    @defer.inlineCallbacks
    def test_nxdomain_is_not_listed(self):
        """NXDOMAIN means not listed, and is not logged."""
        self.assertIsNone((yield self.make().lookup("192.0.2.1")))
        self.assertEqual(self.server.queries, [("1.2.0.192.zen.test", "A")])
        self.assertEqual(self.events, [])

    @defer.inlineCallbacks
    def test_no_a_record_is_not_listed(self):
        """A name with records but no A record (NODATA) means not listed."""
        self.assertIsNone((yield self.make().lookup("127.0.0.7")))

    @defer.inlineCallbacks
    def test_first_positive_wins_and_cancels_the_others(self):
        """The first listing fires at once; the slower service's query is cancelled."""
        slow = DNSBLService("slow.test")
        blacklist = self.make([slow, ZEN], timeout=5.0)
        started = reactor.seconds()
        result = yield blacklist.lookup("127.0.0.2")
        self.assertEqual(result.service, ZEN)
        self.assertLess(reactor.seconds() - started, 1.0)
        self.assertEqual(sorted(self.server.queries),
                         [("2.0.0.127.slow.test", "A"), ("2.0.0.127.zen.test", "A")])
        self.assertEqual(dns_timers(), [])
        self.assertEqual(dns_client_ports(), [])
        self.assertEqual(self.events, [])

    @defer.inlineCallbacks
    def test_ipv6_nibble_name(self):
        """An IPv6 address is asked as its 32 reversed nibbles under the service's domain."""
        result = yield self.make().lookup(V6)
        self.assertEqual(result, ListedResult(ZEN, V6, "127.0.0.2", 300))
        self.assertEqual(self.server.queries, [(f"{V6_NAME}.zen.test", "A")])

    @defer.inlineCallbacks
    def test_ipv4_mapped_ipv6_is_asked_as_ipv4(self):
        """An IPv4-mapped IPv6 address is looked up as the IPv4 address it carries."""
        result = yield self.make().lookup("::ffff:127.0.0.2")
        self.assertEqual(result.address, "127.0.0.2")
        self.assertEqual(self.server.queries, [("2.0.0.127.zen.test", "A")])

    @defer.inlineCallbacks
    def test_positive_answer_is_cached_for_its_ttl(self):
        """A listing is answered from the cache until its TTL runs out, then asked again."""
        clock = task.Clock()
        blacklist = self.make(clock=clock)
        first = yield blacklist.lookup("127.0.0.2")
        clock.advance(299)
        self.assertIs(self.successResultOf(blacklist.lookup("127.0.0.2")), first)
        self.assertEqual(len(self.server.queries), 1)
        clock.advance(1)
        self.assertEqual((yield blacklist.lookup("127.0.0.2")), first)
        self.assertEqual(len(self.server.queries), 2)

    @defer.inlineCallbacks
    def test_negative_answer_is_cached_for_the_soa_minimum(self):
        """NXDOMAIN is cached for min(SOA minimum, SOA TTL) from the authority section."""
        clock = task.Clock()
        blacklist = self.make(clock=clock)
        self.assertIsNone((yield blacklist.lookup("192.0.2.1")))
        clock.advance(29)
        self.assertIsNone(self.successResultOf(blacklist.lookup("192.0.2.1")))
        self.assertEqual(len(self.server.queries), 1)
        clock.advance(1)
        self.assertIsNone((yield blacklist.lookup("192.0.2.1")))
        self.assertEqual(len(self.server.queries), 2)

    @defer.inlineCallbacks
    def test_unlisting_answer_is_cached_for_its_ttl(self):
        """An A answer outside the expected CIDRs is cached for its own TTL."""
        clock = task.Clock()
        blacklist = self.make([DNSBLService("zen.test")], clock=clock)
        self.assertIsNone((yield blacklist.lookup("127.0.0.5")))
        clock.advance(199)
        self.assertIsNone(self.successResultOf(blacklist.lookup("127.0.0.5")))
        clock.advance(1)
        self.assertIsNone((yield blacklist.lookup("127.0.0.5")))
        self.assertEqual(len(self.server.queries), 2)

    @defer.inlineCallbacks
    def test_cached_listing_answers_without_asking_the_other_services(self):
        """A cached listing of one service answers at once even if others are not cached."""
        clock = task.Clock()
        blacklist = self.make([ZEN], clock=clock)
        yield blacklist.lookup("127.0.0.2")
        blacklist.services.insert(0, DNSBLService("slow.test"))
        self.assertEqual(self.successResultOf(blacklist.lookup("127.0.0.2")).service, ZEN)
        self.assertEqual(self.server.queries, [("2.0.0.127.zen.test", "A")])

    @defer.inlineCallbacks
    def test_cache_is_bounded_least_recently_used_first(self):
        """Beyond cache_size entries the least recently used one is forgotten."""
        blacklist = self.make(cache_size=2, clock=task.Clock())
        for address in ("127.0.0.2", "192.0.2.1", "127.0.0.2", "192.0.2.2", "127.0.0.2",
                        "192.0.2.1"):
            yield blacklist.lookup(address)
        self.assertEqual([name for name, _ in self.server.queries],
                         ["2.0.0.127.zen.test", "1.2.0.192.zen.test", "2.2.0.192.zen.test",
                          "1.2.0.192.zen.test"])

    @defer.inlineCallbacks
    def test_overall_timeout_fires_none_and_cancels(self):
        """A server that never answers: None after the timeout, one log line, nothing left."""
        blacklist = self.make([DNSBLService("silent.test")], timeout=0.5)
        started = reactor.seconds()
        self.assertIsNone((yield blacklist.lookup("127.0.0.2")))
        self.assertGreaterEqual(reactor.seconds() - started, 0.5)
        self.assertLess(reactor.seconds() - started, 1.0)
        # Asked again after a quarter of the timeout; the retry is cancelled as well.
        self.assertEqual(self.server.queries, [("2.0.0.127.silent.test", "A")] * 2)
        self.assertEqual(self.log_lines(),
                         ["[dnsbl][timeout] 127.0.0.2: no answer from silent.test within 0.5 s"])
        self.assertEqual(dns_timers(), [])
        self.assertEqual(dns_client_ports(), [])

    @defer.inlineCallbacks
    def test_timeout_keeps_the_answers_that_came(self):
        """At the timeout the answers that came are cached; the log names the silent service."""
        clock = task.Clock()
        blacklist = self.make([DNSBLService("silent.test"), ZEN], clock=clock)
        lookup = blacklist.lookup("127.0.0.3")
        while len(blacklist._cache) < 1:
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertNoResult(lookup)
        clock.advance(2.0)
        self.assertIsNone(self.successResultOf(lookup))
        self.assertEqual(self.log_lines(),
                         ["[dnsbl][timeout] 127.0.0.3: no answer from silent.test within 2.0 s"])
        blacklist.services.remove(ZEN)
        again = blacklist.lookup("127.0.0.3")
        again.cancel()
        self.failureResultOf(again, defer.CancelledError)
        self.assertEqual(sorted(self.server.queries)[-1], ("3.0.0.127.zen.test", "A"))

    @defer.inlineCallbacks
    def test_servfail_is_not_listed_and_logged_once(self):
        """SERVFAIL means not listed for that service, one log line, and is not cached."""
        blacklist = self.make()
        self.assertIsNone((yield blacklist.lookup("127.0.0.6")))
        self.assertEqual(self.log_lines(),
                         ["[dnsbl][error] zen.test: no answer for 127.0.0.6: SERVFAIL"])
        self.assertIsNone((yield blacklist.lookup("127.0.0.6")))
        self.assertEqual(len(self.server.queries), 2)

    @defer.inlineCallbacks
    def test_servfail_of_one_service_does_not_hide_another_listing(self):
        """A broken service does not stop a listing by another."""
        service = DNSBLService("zen.test", ["127.0.0.2"])
        result = yield self.make([DNSBLService("broken.test"), service]).lookup("127.0.0.2")
        self.assertEqual(result.service, service)

    def test_invalid_address_is_not_listed_without_a_query(self):
        """Text that is no IPv4 or IPv6 address fires None at once and asks nothing."""
        blacklist = self.make()
        for address in ("", "localhost", "999.0.0.1", "127.0.0.1.2", "IPv4:127.0.0.2", "[::1]",
                        "unix:/tmp/socket", "::1/128", b"\x7f\x00\x00\x02", 2130706434, None):
            self.assertIsNone(self.successResultOf(blacklist.lookup(address)), address)
        self.assertEqual(self.server.queries, [])
        self.assertEqual(dns_client_ports(), [])

    @defer.inlineCallbacks
    def test_cancel_stops_every_query(self):
        """Cancelling a lookup fails it with CancelledError and leaves no timer or socket."""
        blacklist = self.make([DNSBLService("silent.test")], timeout=5.0)
        lookup = blacklist.lookup("127.0.0.2")
        while not self.server.queries:
            yield task.deferLater(reactor, 0.01, lambda: None)
        lookup.cancel()
        self.failureResultOf(lookup, defer.CancelledError)
        self.assertEqual(dns_timers(), [])
        self.assertEqual(dns_client_ports(), [])
        self.assertEqual(self.events, [])

    @defer.inlineCallbacks
    def test_only_the_configured_server_is_asked(self):
        """No resolv.conf is read and every query goes to the configured server only."""
        sent = []
        write_message = dns.DNSDatagramProtocol.writeMessage

        def record(protocol, message, address):
            sent.append((address, [str(query.name) for query in message.queries]))
            return write_message(protocol, message, address)

        self.patch(dns.DNSDatagramProtocol, "writeMessage", record)
        self.patch(client.Resolver, "_openFile",
                   lambda resolver, path: self.fail(f"{path} was opened"))
        blacklist = self.make([ZEN, DNSBLService("slow.test")])
        self.assertIsNone(blacklist._resolver.resolv)
        self.assertEqual(list(blacklist._resolver.dynServers), [])
        yield blacklist.lookup("127.0.0.2")
        yield blacklist.lookup("192.0.2.1")
        yield blacklist.lookup(V6)
        self.assertEqual({address for address, _ in sent}, {self.server.server_address})
        asked = sorted(name for _, names in sent for name in names)
        self.assertEqual(asked, sorted(name for name, _ in self.server.queries))
        self.assertEqual(sorted(self.server.queries), sorted([
            ("2.0.0.127.zen.test", "A"), ("2.0.0.127.slow.test", "A"),
            ("1.2.0.192.zen.test", "A"), ("1.2.0.192.slow.test", "A"),
            (f"{V6_NAME}.zen.test", "A"), (f"{V6_NAME}.slow.test", "A"),
        ]))


class ServiceTests(unittest.TestCase):
    """DNSBLService, the query names and the defaults, without a network."""

    def test_expected_cidrs_are_ipv4_networks(self):
        """Expected answers are IPv4 CIDRs; a bare address is a /32."""
        service = DNSBLService("Zen.Spamhaus.org.", ["127.0.0.10/31", "127.0.0.4"])
        self.assertEqual(service.domain, "zen.spamhaus.org")
        self.assertTrue(service.lists("127.0.0.11"))
        self.assertTrue(service.lists("127.0.0.4"))
        self.assertFalse(service.lists("127.0.0.2"))
        self.assertRaises(ValueError, DNSBLService, "x.test", ["::1/128"])
        self.assertRaises(TypeError, DNSBLService, "x.test", "127.0.0.2")

    def test_query_label(self):
        """IPv4 reverses its octets, IPv6 its 32 nibbles (with or without "IPv6:"); else none."""
        self.assertEqual(dnsbl.query_label("192.0.2.10"), ("192.0.2.10", "10.2.0.192"))
        self.assertEqual(dnsbl.query_label("2001:DB8:0::1"), (V6, V6_NAME))
        self.assertEqual(dnsbl.query_label("IPv6:2001:db8::1"), (V6, V6_NAME))
        self.assertEqual(dnsbl.query_label(b"192.0.2.10"), ("192.0.2.10", "10.2.0.192"))
        self.assertEqual(dnsbl.query_label("nonsense"), (None, None))

    def test_default_services_are_upstreams(self):
        """The defaults are upstream's four services and their expected answers."""
        self.assertEqual(
            [(service.domain, [str(network) for network in service.expected])
             for service in dnsbl.default_services()],
            [("zen.spamhaus.org", ["127.0.0.10/31"]), ("dnsbl.sorbs.net", ["127.0.0.10/32"]),
             ("bl.spamcop.net", ["127.0.0.2/32"]), ("b.barracudacentral.org", ["127.0.0.2/32"])])

    def test_negative_ttl_without_soa(self):
        """A negative answer without an SOA is cached for NEGATIVE_TTL."""
        self.assertEqual(dnsbl._negative_ttl([]), dnsbl.NEGATIVE_TTL)

    def test_name_servers_are_addresses(self):
        """Name servers are IP addresses: a host name would need the system resolver."""
        self.assertRaises(ValueError, DNSBL, [ZEN], name_servers=[("localhost", 53)],
                          reactor=task.Clock())
        self.assertRaises(ValueError, DNSBL, [ZEN], name_servers=[], reactor=task.Clock())
