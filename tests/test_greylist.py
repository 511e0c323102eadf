"""Tests for the greylisting milter: the SQLite store, the milter, the thread pool, the program."""

import email.utils
import io
import os
import signal
import sqlite3
import subprocess
import time

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python import usage
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from miltermanager import client as milter_client
from miltermanager.greylist import main as greylist_main
from miltermanager.greylist import milter as greylist_milter
from miltermanager.greylist import store
from miltermanager.greylist.interfaces import IGreylist
from miltermanager.greylist.milter import GreylistMilter, server_factory
from miltermanager.greylist.store import BadInput, Greylist, Reason, Triplet, Verdict
from miltermanager.greylist.threaded import ThreadedGreylist
from miltermanager.protocol import FrameDecoder, constants as c, decode_reply, messages
from miltermanager.protocol import negotiation
from miltermanager.server import IMilter
from tests.peers.fixtures import free_port, wait_for_port

DAY = 86400
CLIENT = "192.0.2.10"
NETWORK = "192.0.2.0/24"


def greylisted(remaining, reason=Reason.NEW):
    return Verdict(False, reason, remaining=remaining)


class StoreTestCase(unittest.TestCase):
    """A Greylist on a fresh file in the test's directory, on a task.Clock at 1000 s."""

    def setUp(self):
        self.path = self.mktemp()
        self.clock = Clock()
        self.clock.advance(1000)

    def store(self, **settings):
        greylist = Greylist(self.path, self.clock, **settings)
        self.addCleanup(greylist.close)
        return greylist


class DecisionTests(StoreTestCase):
    """The life of a triplet: first seen, too early, retried, known, expired."""

    def test_first_seen(self):
        """An unknown triplet is recorded and greylisted for the whole delay."""
        greylist = self.store()
        self.assertEqual(greylist.check(CLIENT, b"<s@example.com>", b"<r@example.org>"),
                         greylisted(300))
        self.assertEqual(greylist.counts(), (1, 0, 0))

    def test_too_early(self):
        """A retry before the delay is greylisted again with the remaining whole seconds."""
        greylist = self.store()
        greylist.check(CLIENT, "s@example.com", "r@example.org")
        self.clock.advance(100.5)
        self.assertEqual(greylist.check(CLIENT, "s@example.com", "r@example.org"),
                         greylisted(200, Reason.EARLY))
        self.clock.advance(199)
        self.assertEqual(greylist.check(CLIENT, "s@example.com", "r@example.org"),
                         greylisted(1, Reason.EARLY))

    def test_after_delay(self):
        """A retry once the delay is over passes and says how long it waited."""
        greylist = self.store()
        greylist.check(CLIENT, "s@example.com", "r@example.org")
        self.clock.advance(300)
        self.assertEqual(greylist.check(CLIENT, "s@example.com", "r@example.org"),
                         Verdict(True, Reason.RETRIED, delayed=300.0))
        self.assertEqual(greylist.counts(), (0, 1, 0))

    def test_outside_retry_window(self):
        """A retry after delay + retry window starts the triplet over."""
        greylist = self.store(delay=60, retry_window=3600)
        greylist.check(CLIENT, "s@example.com", "r@example.org")
        self.clock.advance(60 + 3600 + 1)
        self.assertEqual(greylist.check(CLIENT, "s@example.com", "r@example.org"),
                         greylisted(60))
        self.clock.advance(60)
        self.assertTrue(greylist.check(CLIENT, "s@example.com", "r@example.org").passed)

    def test_known_until_expiry(self):
        """A passed triplet passes while used within the expiry, which each use renews."""
        greylist = self.store(expiry=10 * DAY)
        greylist.check(CLIENT, "s@example.com", "r@example.org")
        self.clock.advance(300)
        greylist.check(CLIENT, "s@example.com", "r@example.org")
        for _ in range(3):
            self.clock.advance(9 * DAY)
            self.assertEqual(greylist.check(CLIENT, "s@example.com", "r@example.org"),
                             Verdict(True, Reason.KNOWN))

    def test_expired(self):
        """A passed triplet unused for longer than the expiry is greylisted anew."""
        greylist = self.store(expiry=10 * DAY)
        greylist.check(CLIENT, "s@example.com", "r@example.org")
        self.clock.advance(300)
        greylist.check(CLIENT, "s@example.com", "r@example.org")
        self.clock.advance(10 * DAY + 1)
        self.assertEqual(greylist.check(CLIENT, "s@example.com", "r@example.org"),
                         greylisted(300))

    def test_zero_delay(self):
        """With no delay the first attempt is still refused and any retry passes."""
        greylist = self.store(delay=0)
        self.assertEqual(greylist.check(CLIENT, "s@example.com", "r@example.org"),
                         greylisted(0))
        self.assertTrue(greylist.check(CLIENT, "s@example.com", "r@example.org").passed)

    def test_triplet_parts_are_independent(self):
        """Another sender, recipient or network is another triplet."""
        greylist = self.store()
        greylist.check(CLIENT, "s@example.com", "r@example.org")
        self.clock.advance(300)
        greylist.check(CLIENT, "s@example.com", "r@example.org")
        for address, sender, recipient in [("192.0.3.10", "s@example.com", "r@example.org"),
                                           (CLIENT, "t@example.com", "r@example.org"),
                                           (CLIENT, "s@example.com", "q@example.org")]:
            self.assertEqual(greylist.check(address, sender, recipient), greylisted(300))


class AutoWhitelistTests(StoreTestCase):
    """A network that passed N different triplets passes without greylisting."""

    def pass_triplets(self, greylist, count, address=CLIENT):
        for number in range(count):
            greylist.check(address, f"s{number}@example.com", "r@example.org")
        self.clock.advance(300)
        for number in range(count):
            self.assertTrue(greylist.check(address, f"s{number}@example.com",
                                           "r@example.org").passed)

    def test_after_n_triplets(self):
        """After the third passed triplet the whole /24 passes new triplets at once."""
        greylist = self.store(auto_whitelist=3)
        self.pass_triplets(greylist, 2)
        self.assertFalse(greylist.check("192.0.2.99", "new@example.com", "r@example.org").passed)
        greylist = self.store(auto_whitelist=3)
        self.pass_triplets(greylist, 3, "192.0.2.11")
        self.assertEqual(greylist.check("192.0.2.99", "other@example.com", "x@example.org"),
                         Verdict(True, Reason.AUTO_WHITELISTED))
        self.assertEqual(greylist.check("192.0.3.1", "other@example.com", "x@example.org"),
                         greylisted(300))
        self.assertEqual(greylist.counts()[2], 1)

    def test_expires(self):
        """An auto-whitelisted network unused for longer than the expiry is greylisted again."""
        greylist = self.store(auto_whitelist=2, expiry=10 * DAY)
        self.pass_triplets(greylist, 2)
        self.clock.advance(9 * DAY)
        self.assertTrue(greylist.check(CLIENT, "a@example.com", "b@example.org").passed)
        self.clock.advance(10 * DAY + 1)
        self.assertEqual(greylist.check(CLIENT, "c@example.com", "d@example.org"),
                         greylisted(300))

    def test_disabled(self):
        """auto_whitelist=0 never whitelists a network."""
        greylist = self.store(auto_whitelist=0)
        self.pass_triplets(greylist, 10)
        self.assertEqual(greylist.check(CLIENT, "new@example.com", "r@example.org"),
                         greylisted(300))
        self.assertEqual(greylist.counts(), (1, 10, 0))


class ClientTests(StoreTestCase):
    """Whitelists and the grouping of client addresses into networks."""

    def test_default_whitelist(self):
        """Loopback clients, IPv4 and IPv6, pass without touching the database."""
        greylist = self.store()
        for address in ("127.0.0.1", "127.1.2.3", "::1", b"127.0.0.1", "::ffff:127.0.0.1"):
            self.assertEqual(greylist.check(address, "s@example.com", "r@example.org"),
                             Verdict(True, Reason.WHITELISTED))
        self.assertEqual(greylist.counts(), (0, 0, 0))

    def test_whitelist_cidr(self):
        """A configured CIDR (host bits allowed) replaces the default whitelist."""
        greylist = self.store(whitelist=["10.1.2.3/16", "2001:db8:1::/48"])
        self.assertTrue(greylist.is_whitelisted("10.1.200.1"))
        self.assertTrue(greylist.is_whitelisted("2001:db8:1:ff::1"))
        self.assertFalse(greylist.is_whitelisted("10.2.0.1"))
        self.assertFalse(greylist.is_whitelisted("127.0.0.1"))

    def test_bad_whitelist(self):
        """A whitelist entry that is no network is refused, naming it."""
        error = self.assertRaises(ValueError, self.store, whitelist=["10.0.0.0/33"])
        self.assertIn("'10.0.0.0/33'", str(error))

    def test_ipv4_grouping(self):
        """IPv4 clients are grouped by /24 (or the prefix configured)."""
        greylist = self.store()
        self.assertEqual(greylist.client_network("192.0.2.10"), NETWORK)
        self.assertEqual(greylist.client_network(b"192.0.2.250"), NETWORK)
        self.assertEqual(greylist.client_network("192.0.3.10"), "192.0.3.0/24")
        self.assertEqual(greylist.client_network("::ffff:192.0.2.7"), NETWORK)
        greylist.check("192.0.2.10", "s@example.com", "r@example.org")
        self.clock.advance(300)
        self.assertTrue(greylist.check("192.0.2.77", "s@example.com", "r@example.org").passed)
        narrow = Greylist(self.mktemp(), self.clock, ipv4_prefix=32)
        self.addCleanup(narrow.close)
        self.assertEqual(narrow.client_network("192.0.2.10"), "192.0.2.10/32")

    def test_ipv6_grouping(self):
        """IPv6 clients are grouped by /64 (or the prefix configured)."""
        greylist = self.store()
        self.assertEqual(greylist.client_network("2001:db8::1"), "2001:db8::/64")
        self.assertEqual(greylist.client_network("2001:DB8::ffff:1:2"), "2001:db8::/64")
        self.assertEqual(greylist.client_network("2001:db8:0:1::1"), "2001:db8:0:1::/64")
        self.assertEqual(greylist.client_network("fe80::1%eth0"), "fe80::/64")
        wide = Greylist(self.mktemp(), self.clock, ipv6_prefix=48)
        self.addCleanup(wide.close)
        self.assertEqual(wide.client_network("2001:db8:0:1::1"), "2001:db8::/48")

    def test_not_an_address(self):
        """Something that is no IP address raises BadInput."""
        greylist = self.store()
        for address in (b"", b"localhost", b"/var/run/x", "300.1.1.1"):
            self.assertRaises(BadInput, greylist.client_network, address)
            self.assertRaises(BadInput, greylist.is_whitelisted, address)

    def test_bad_prefixes(self):
        """Prefix lengths outside the address size are refused."""
        self.assertRaises(ValueError, self.store, ipv4_prefix=33)
        self.assertRaises(ValueError, self.store, ipv6_prefix=129)


class NormalisationTests(StoreTestCase):
    """Senders and recipients are compared without case, brackets and spaces."""

    def test_addresses(self):
        """Brackets and surrounding spaces go, case folds, <> is the empty sender."""
        self.assertEqual(store.normalize_address(b"<Sender@Example.COM>"), "sender@example.com")
        self.assertEqual(store.normalize_address(" <a@b> "), "a@b")
        self.assertEqual(store.normalize_address(b"a@b"), "a@b")
        self.assertEqual(store.normalize_address(b"<>"), "")
        self.assertEqual(store.normalize_address(b"<caf\xc3\xa9@b>"), "caf\u00e9@b")
        self.assertEqual(store.normalize_address(b"<\xff@b>"), "\\xff@b")

    def test_odd_addresses(self):
        """An empty recipient, control characters or a huge address are BadInput."""
        self.assertRaises(BadInput, store.normalize_recipient, b"<>")
        self.assertRaises(BadInput, store.normalize_recipient, b"")
        self.assertRaises(BadInput, store.normalize_address, b"<a\r\nb@c>")
        self.assertRaises(BadInput, store.normalize_address, b"<" + b"a" * 600 + b">")
        self.assertRaises(BadInput, store.normalize_address, None)

    def test_same_triplet(self):
        """Spellings of one triplet share its state."""
        greylist = self.store()
        greylist.check(CLIENT, b"<S@Example.com>", b"<R@EXAMPLE.org>")
        self.clock.advance(300)
        self.assertEqual(greylist.check("192.0.2.200", b"s@example.com", b" <r@example.org> "),
                         Verdict(True, Reason.RETRIED, delayed=300.0))

    def test_null_sender(self):
        """Bounces (the <> sender) are greylisted like any sender."""
        greylist = self.store()
        self.assertEqual(greylist.check(CLIENT, b"<>", b"<r@example.org>"), greylisted(300))
        self.assertEqual(greylist.triplet(CLIENT, b"<>", b"<r@example.org>"),
                         Triplet(NETWORK, "", "r@example.org"))


class DatabaseTests(StoreTestCase):
    """The file: WAL mode, several processes, purging, schema versions."""

    def test_wal_mode(self):
        """The file is in WAL mode so readers and a writer of other processes coexist."""
        self.store()
        with sqlite3.connect(self.path) as db:
            self.assertEqual(db.execute("PRAGMA journal_mode").fetchone(), ("wal",))

    def test_two_stores_agree(self):
        """Two Greylist objects on one file (as two processes) see each other's decisions."""
        first, second = self.store(), self.store()
        self.assertEqual(first.check(CLIENT, "s@example.com", "r@example.org"), greylisted(300))
        self.clock.advance(100)
        self.assertEqual(second.check(CLIENT, "s@example.com", "r@example.org"),
                         greylisted(200, Reason.EARLY))
        self.clock.advance(200)
        self.assertEqual(second.check(CLIENT, "s@example.com", "r@example.org").reason,
                         Reason.RETRIED)
        self.assertEqual(first.check(CLIENT, "s@example.com", "r@example.org").reason,
                         Reason.KNOWN)

    def test_locked_database_raises(self):
        """A write lock held past the busy timeout raises sqlite3.OperationalError."""
        greylist = self.store(busy_timeout=0)
        holder = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(holder.close)
        holder.execute("BEGIN IMMEDIATE")
        self.assertRaises(sqlite3.OperationalError, greylist.check,
                          CLIENT, "s@example.com", "r@example.org")
        holder.execute("ROLLBACK")
        self.assertEqual(greylist.check(CLIENT, "s@example.com", "r@example.org"),
                         greylisted(300))

    def test_purge(self):
        """Purging deletes stale pending triplets, expired ones and expired networks only."""
        greylist = self.store(delay=60, retry_window=600, expiry=DAY, auto_whitelist=2)
        for number in range(2):  # two passed triplets: the network is auto-whitelisted
            greylist.check(CLIENT, f"s{number}@example.com", "r@example.org")
        self.clock.advance(60)
        for number in range(2):
            greylist.check(CLIENT, f"s{number}@example.com", "r@example.org")
        greylist.check("192.0.3.1", "pending@example.com", "r@example.org")
        self.assertEqual(greylist.counts(), (1, 2, 1))
        self.assertEqual(greylist.purge(), 0)
        self.clock.advance(661)
        self.assertEqual(greylist.purge(), 1)
        self.assertEqual(greylist.counts(), (0, 2, 1))
        self.clock.advance(DAY)
        self.assertEqual(greylist.purge(), 3)
        self.assertEqual(greylist.counts(), (0, 0, 0))

    def test_purge_in_batches(self):
        """A purge larger than one batch deletes everything, batch by batch."""
        self.patch(store, "PURGE_BATCH", 7)
        greylist = self.store(retry_window=0)
        for number in range(20):
            greylist.check(CLIENT, f"s{number}@example.com", "r@example.org")
        self.clock.advance(301)
        self.assertEqual(greylist.purge(), 20)

    def test_newer_schema_refused(self):
        """A file written by a newer schema version is refused, not misread."""
        self.store().close()
        with sqlite3.connect(self.path) as db:
            db.execute("PRAGMA user_version = 99")
        error = self.assertRaises(sqlite3.DatabaseError, self.store)
        self.assertIn("schema version 99", str(error))

    def test_closed(self):
        """A closed store refuses to open new connections."""
        greylist = self.store()
        greylist.close()
        self.assertRaises(sqlite3.ProgrammingError, greylist.check, CLIENT, "a@b", "c@d")

    def test_provides_igreylist(self):
        """Greylist and ThreadedGreylist provide IGreylist."""
        greylist = self.store()
        verifyObject(IGreylist, greylist)
        verifyObject(IGreylist, ThreadedGreylist(greylist, reactor))


class ThreadedTests(StoreTestCase):
    """The store in its thread pool, on the real reactor; time still from a task.Clock."""

    def threaded(self, **settings):
        greylist = ThreadedGreylist(self.store(**settings), reactor, self.clock,
                                    purge_interval=0)
        greylist.start()
        self.addCleanup(greylist.stop)
        return greylist

    @defer.inlineCallbacks
    def test_decide(self):
        """decide fires with the store's Verdict at the clock's time when it was called."""
        greylist = self.threaded()
        triplet = Triplet(NETWORK, "s@example.com", "r@example.org")
        self.assertEqual((yield greylist.decide(triplet)), greylisted(300))
        self.clock.advance(300)
        self.assertEqual((yield greylist.decide(triplet)),
                         Verdict(True, Reason.RETRIED, delayed=300.0))

    @defer.inlineCallbacks
    def test_many_at_once(self):
        """Concurrent decisions on one triplet record it once: one new, the rest early."""
        greylist = self.threaded()
        triplet = Triplet(NETWORK, "s@example.com", "r@example.org")
        verdicts = yield defer.gatherResults([greylist.decide(triplet) for _ in range(20)])
        reasons = [verdict.reason for verdict in verdicts]
        self.assertEqual(sorted(reasons, key=lambda r: r.value),
                         [Reason.EARLY] * 19 + [Reason.NEW])

    @defer.inlineCallbacks
    def test_database_error(self):
        """A database error fails the Deferred with the sqlite3 error."""
        greylist = self.threaded()
        with sqlite3.connect(self.path) as db:
            db.execute("DROP TABLE triplets")
        yield self.assertFailure(
            greylist.decide(Triplet(NETWORK, "s@example.com", "r@example.org")),
            sqlite3.OperationalError)

    def test_periodic_purge(self):
        """start() purges at once and then every purge_interval."""
        fake = Clock()
        greylist = ThreadedGreylist(self.store(), fake, self.clock, purge_interval=3600)
        purged = []
        greylist.purge = lambda: purged.append(None) or defer.succeed(0)
        greylist.start()
        self.addCleanup(greylist.stop)
        fake.advance(3600)
        fake.advance(3600)
        self.assertEqual(len(purged), 3)

    @defer.inlineCallbacks
    def test_purge(self):
        """purge runs the store's purge in the pool at the clock's time."""
        greylist = self.threaded(retry_window=0)
        greylist.greylist.check(CLIENT, "s@example.com", "r@example.org")
        self.clock.advance(301)
        self.assertEqual((yield greylist.purge()), 1)

    def test_failed_purge_goes_on(self):
        """A failed purge is logged and the next one still runs."""
        fake = Clock()
        greylist = ThreadedGreylist(self.store(), fake, self.clock, purge_interval=60)
        calls = []

        def purge():
            calls.append(None)
            return defer.fail(sqlite3.OperationalError("database is locked"))

        greylist.purge = purge
        greylist.start()
        self.addCleanup(greylist.stop)
        fake.advance(60)
        self.assertEqual(len(calls), 2)


# ---------------------------------------------------------------- the milter

OFFER_V6 = negotiation.offer(6)
OFFER_V2 = negotiation.offer(2, actions=c.SMFI_V2_ACTS)  # as Sendmail 8.13 offers
HOST_MACROS = messages.Macro(c.CONNECT, {b"j": b"mx.example.org"})


def envelope(sender=b"<s@example.com>", address=CLIENT.encode(), family=c.FAMILY_INET):
    return [HOST_MACROS, messages.Connect(b"client.example.net", family, 50443, address),
            messages.Mail(sender)]


class Driver:
    """An MTA driving GreylistMilters through the real server protocol over StringTransport."""

    def __init__(self, greylist, clock):
        self.factory = server_factory(greylist, clock, b"fallback.example")
        self.protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.decoder = FrameDecoder()

    def send(self, *commands):
        """Send commands in one write; return the replies written so far."""
        self.protocol.dataReceived(b"".join(command.encode() for command in commands))
        data = self.transport.value()
        self.transport.clear()
        return [decode_reply(code, payload) for code, payload in self.decoder.feed(data)]


class MilterTestCase(StoreTestCase):

    def setUp(self):
        super().setUp()
        self.events = []
        self.patch(GreylistMilter, "log", Logger(observer=self.events.append))

    def driver(self, greylist=None):
        driver = Driver(greylist or self.store(), self.clock)
        self.assertEqual(len(driver.send(OFFER_V6)), 1)
        return driver

    def logged(self, level=None):
        from twisted.logger import formatEvent
        return [formatEvent(event) for event in self.events
                if level is None or event["log_level"].name == level]


class NegotiationTests(MilterTestCase):
    """What the milter asks of the MTA."""

    def test_v6(self):
        """Version 6: add headers; no helo, data, headers, body, unknown; no reply to connect and MAIL; j at connect."""  # noqa: E501
        driver = Driver(self.store(), self.clock)
        (reply,) = driver.send(OFFER_V6)
        self.assertEqual(reply, messages.Negotiate(
            6, c.SMFIF_ADDHDRS | c.SMFIF_SETSYMLIST,
            greylist_milter.NO_EVENTS | c.SMFIP_NR_CONN | c.SMFIP_NR_MAIL, {0: [b"j"]}))
        self.assertFalse(reply.protocol & c.SMFIP_NR_RCPT)

    def test_v2(self):
        """Version 2: only the no-event flags it offers; the server answers connect and MAIL."""
        driver = Driver(self.store(), self.clock)
        (reply,) = driver.send(OFFER_V2)
        self.assertEqual(reply, messages.Negotiate(
            2, c.SMFIF_ADDHDRS,
            c.SMFIP_NOHELO | c.SMFIP_NOHDRS | c.SMFIP_NOEOH | c.SMFIP_NOBODY, {}))
        self.assertEqual(driver.send(*envelope()), [messages.CONTINUE, messages.CONTINUE])

    def test_provides_imilter(self):
        """GreylistMilter provides IMilter."""
        verifyObject(IMilter, GreylistMilter(self.store(), self.clock))


class MilterTests(MilterTestCase):
    """Replies per recipient and the X-Greylist header at the end of the message."""

    def message(self, driver, *recipients, sender=b"<s@example.com>", address=CLIENT.encode(),
                family=c.FAMILY_INET):
        """One connection with one message: the RCPT replies and the EOM replies."""
        self.assertEqual(driver.send(*envelope(sender, address, family)), [])
        replies = [driver.send(messages.Rcpt(recipient)) for recipient in recipients]
        return [reply for (reply,) in replies], driver.send(messages.END_OF_MESSAGE)

    def test_greylisted_then_passed(self):
        """First attempt 451 with the delay; after it, the retry passes and gets X-Greylist."""
        replies, end = self.message(self.driver(), b"<r@example.org>")
        self.assertEqual(replies, [messages.ReplyCode(
            b"451 4.7.1 Greylisted, please try again in 300 seconds")])
        self.assertEqual(end, [messages.CONTINUE])
        self.clock.advance(120)
        replies, end = self.message(self.driver(), b"<r@example.org>")
        self.assertEqual(replies, [messages.ReplyCode(
            b"451 4.7.1 Greylisted, please try again in 180 seconds")])
        self.clock.advance(200)
        replies, end = self.message(self.driver(), b"<r@example.org>")
        self.assertEqual(replies, [messages.CONTINUE])
        date = email.utils.formatdate(self.clock.seconds(), localtime=True).encode()
        self.assertEqual(end, [
            messages.AddHeader(b"X-Greylist", b"delayed 320 seconds by milter-manager-greylist"
                               b" at mx.example.org; " + date),
            messages.CONTINUE])
        self.assertEqual(
            [line for line in self.logged("info")],
            ["[greylist][greylisted] 192.0.2.0/24 <s@example.com> -> <r@example.org> (new): "
             "retry in 300 s",
             "[greylist][greylisted] 192.0.2.0/24 <s@example.com> -> <r@example.org> (early): "
             "retry in 180 s",
             "[greylist][pass] 192.0.2.0/24 <s@example.com> -> <r@example.org> retried after "
             "320 s"])

    def test_header_only_when_delayed(self):
        """A known triplet and a whitelisted client pass without the header."""
        greylist = self.store()
        self.message(self.driver(greylist), b"<r@example.org>")
        self.clock.advance(300)
        self.message(self.driver(greylist), b"<r@example.org>")
        replies, end = self.message(self.driver(greylist), b"<r@example.org>")
        self.assertEqual((replies, end), ([messages.CONTINUE], [messages.CONTINUE]))
        replies, end = self.message(self.driver(greylist), b"<r@example.org>",
                                    address=b"127.0.0.1")
        self.assertEqual((replies, end), ([messages.CONTINUE], [messages.CONTINUE]))

    def test_mixed_recipients(self):
        """One recipient passes after its delay, another is new: 451 for it, header for the message."""  # noqa: E501
        greylist = self.store()
        self.message(self.driver(greylist), b"<old@example.org>")
        self.clock.advance(400)
        replies, end = self.message(self.driver(greylist), b"<old@example.org>",
                                    b"<new@example.org>")
        self.assertEqual(replies, [messages.CONTINUE, messages.ReplyCode(
            b"451 4.7.1 Greylisted, please try again in 300 seconds")])
        self.assertEqual(end[0].value[:31], b"delayed 400 seconds by milter-m")

    def test_every_message_starts_clean(self):
        """The next message on the connection gets no header from the one before."""
        greylist = self.store()
        self.message(self.driver(greylist), b"<r@example.org>")
        self.clock.advance(300)
        driver = self.driver(greylist)
        replies, end = self.message(driver, b"<r@example.org>")
        self.assertEqual(len(end), 2)
        self.assertEqual(driver.send(messages.Mail(b"<s@example.com>")), [])
        self.assertEqual(driver.send(messages.Rcpt(b"<r@example.org>")), [messages.CONTINUE])
        self.assertEqual(driver.send(messages.END_OF_MESSAGE), [messages.CONTINUE])
        driver.send(messages.Mail(b"<s@example.com>"))
        self.clock.advance(1)
        self.message(self.driver(greylist), b"<x@example.org>")
        self.clock.advance(300)
        driver.send(messages.Rcpt(b"<x@example.org>"))
        driver.send(messages.ABORT, messages.Mail(b"<s@example.com>"))
        self.assertEqual(driver.send(messages.END_OF_MESSAGE), [messages.CONTINUE])

    def test_host_from_hostname(self):
        """Without a j macro the header names the host given to the factory."""
        greylist = self.store()
        self.message(self.driver(greylist), b"<r@example.org>")
        self.clock.advance(300)
        driver = self.driver(greylist)
        driver.send(messages.Connect(b"c", c.FAMILY_INET, 1, CLIENT.encode()),
                    messages.Mail(b"<s@example.com>"), messages.Rcpt(b"<r@example.org>"))
        (header, _) = driver.send(messages.END_OF_MESSAGE)
        self.assertIn(b" at fallback.example; ", header.value)

    def test_not_ip(self):
        """UNIX-socket and unknown clients pass without greylisting."""
        greylist = self.store()
        for family, address in ((c.FAMILY_UNIX, b"/var/run/sock"), (c.FAMILY_UNKNOWN, b"")):
            driver = self.driver(greylist)
            command = messages.Connect(b"localhost", family, 0, address)
            driver.send(command, messages.Mail(b"<s@example.com>"))
            self.assertEqual(driver.send(messages.Rcpt(b"<r@example.org>")),
                             [messages.CONTINUE])
        self.assertEqual(greylist.counts(), (0, 0, 0))

    def test_ipv6_client(self):
        """An IPv6 client is greylisted by its /64."""
        greylist = self.store()
        replies, _ = self.message(self.driver(greylist), b"<r@example.org>",
                                  address=b"2001:db8::25", family=c.FAMILY_INET6)
        self.assertFalse(replies[0] == messages.CONTINUE)
        self.clock.advance(300)
        replies, _ = self.message(self.driver(greylist), b"<r@example.org>",
                                  address=b"2001:db8::26", family=c.FAMILY_INET6)
        self.assertEqual(replies, [messages.CONTINUE])

    def test_odd_input_passes(self):
        """An odd address, sender or recipient, or a RCPT without MAIL, passes with a warning."""
        greylist = self.store()
        replies, _ = self.message(self.driver(greylist), b"<r@example.org>",
                                  address=b"not-an-address")
        self.assertEqual(replies, [messages.CONTINUE])
        replies, _ = self.message(self.driver(greylist), b"<r@example.org>",
                                  sender=b"<a\x01b@example.com>")
        self.assertEqual(replies, [messages.CONTINUE])
        replies, _ = self.message(self.driver(greylist), b"<>", b"<x\x7f@example.org>")
        self.assertEqual(replies, [messages.CONTINUE, messages.CONTINUE])
        driver = self.driver(greylist)
        driver.send(messages.Connect(b"c", c.FAMILY_INET, 1, CLIENT.encode()))
        self.assertEqual(driver.send(messages.Rcpt(b"<r@example.org>")), [messages.CONTINUE])
        self.assertEqual(greylist.counts(), (0, 0, 0))
        warnings = self.logged("warn")
        self.assertEqual(len(warnings), 5, warnings)
        self.assertIn("odd client address", warnings[0])
        self.assertIn("without a sender", warnings[4])

    def test_database_failure_fails_open(self):
        """A broken database lets the recipient pass and logs an error."""
        greylist = self.store()
        with sqlite3.connect(self.path) as db:
            db.execute("DROP TABLE triplets")
        replies, end = self.message(self.driver(greylist), b"<r@example.org>")
        self.assertEqual((replies, end), ([messages.CONTINUE], [messages.CONTINUE]))
        (error,) = self.logged("error")
        self.assertIn("[greylist][error] database: no such table: triplets; passing "
                      "192.0.2.0/24 <s@example.com> -> <r@example.org> (fail open)", error)

    def test_deferred_failure_fails_open(self):
        """A Deferred failing with a database error or a bug answers continue."""
        results = []

        class Failing:
            def is_whitelisted(self, address):
                return False

            def client_network(self, address):
                return NETWORK

            def decide(self, triplet):
                d = defer.Deferred()
                results.append(d)
                return d

        driver = self.driver(Failing())
        driver.send(*envelope())
        self.assertEqual(driver.send(messages.Rcpt(b"<r@example.org>")), [])
        results[0].errback(sqlite3.OperationalError("database is locked"))
        self.assertEqual(driver.decoder.feed(driver.transport.value()),
                         [(c.CONTINUE, b"")])
        driver.transport.clear()
        driver.send(messages.Rcpt(b"<q@example.org>"))
        results[1].errback(RuntimeError("bug"))
        self.assertEqual(driver.decoder.feed(driver.transport.value()),
                         [(c.CONTINUE, b"")])
        self.assertEqual([event["log_failure"].type for event in self.events
                          if "log_failure" in event], [RuntimeError])

    def test_raising_fails_open(self):
        """decide raising at once (a bug) answers continue too."""
        class Raising:
            def is_whitelisted(self, address):
                return False

            def client_network(self, address):
                return NETWORK

            def decide(self, triplet):
                raise KeyError("bug")

        driver = self.driver(Raising())
        driver.send(*envelope())
        self.assertEqual(driver.send(messages.Rcpt(b"<r@example.org>")), [messages.CONTINUE])
        self.assertEqual([event["log_failure"].type for event in self.events
                          if "log_failure" in event], [KeyError])

    def test_mta_gone_while_deciding(self):
        """A decision pending when the MTA disconnects is cancelled quietly."""
        pending = []

        class Slow:
            def is_whitelisted(self, address):
                return False

            def client_network(self, address):
                return NETWORK

            def decide(self, triplet):
                pending.append(defer.Deferred())
                return pending[-1]

        driver = self.driver(Slow())
        driver.send(*envelope(), messages.Rcpt(b"<r@example.org>"))
        driver.protocol.connectionLost(None)
        self.assertIsNone(self.successResultOf(pending[0]))  # cancelled, then handled
        self.assertEqual(self.logged("error") + self.logged("critical"), [])


class LoopbackTests(StoreTestCase):
    """The threaded milter on a real loopback socket, driven by the client library."""

    @defer.inlineCallbacks
    def setUp(self):
        super().setUp()
        self.greylist = ThreadedGreylist(self.store(), reactor, self.clock, purge_interval=0)
        self.greylist.start()
        self.addCleanup(self.greylist.stop)
        from twisted.internet.endpoints import TCP4ServerEndpoint
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            server_factory(self.greylist, self.clock, b"here.example"))
        self.addCleanup(port.stopListening)
        self.spec = f"inet:{port.getHost().port}@[127.0.0.1]"

    @defer.inlineCallbacks
    def session(self, recipient):
        """One MTA session; returns (RCPT reply, EOM Response)."""
        protocol = yield milter_client.connect(reactor, self.spec)
        try:
            yield protocol.negotiate()
            for command in envelope():
                yield protocol.send(command)
            rcpt = yield protocol.send(messages.Rcpt(recipient))
            for command in (messages.DATA, messages.Header(b"Subject", b"hi"),
                            messages.END_OF_HEADERS, messages.Body(b"hi\r\n")):
                yield protocol.send(command)
            end = yield protocol.send(messages.END_OF_MESSAGE)
        finally:
            closed = protocol.when_closed()
            protocol.close()
            yield closed
        return rcpt.reply, end

    @defer.inlineCallbacks
    def test_greylisted_then_passed(self):
        """Over TCP with the thread pool: 451 first, continue and X-Greylist after the delay."""
        reply, end = yield self.session(b"<r@example.org>")
        self.assertEqual(reply, messages.ReplyCode(
            b"451 4.7.1 Greylisted, please try again in 300 seconds"))
        self.clock.advance(301)
        reply, end = yield self.session(b"<r@example.org>")
        self.assertEqual(reply, messages.CONTINUE)
        self.assertEqual(end.reply, messages.CONTINUE)
        (header,) = end.modifications
        self.assertEqual(header.name, b"X-Greylist")
        self.assertTrue(header.value.startswith(
            b"delayed 301 seconds by milter-manager-greylist at mx.example.org; "))


# ---------------------------------------------------------------- the program


class OptionsTests(unittest.TestCase):
    """The command line."""

    def parse(self, *argv):
        options = greylist_main.Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self):
        """Defaults: port 10030 on loopback, /var/lib database, 300 s, 4 h, 36 d, 5, /24, /64."""
        options = self.parse()
        self.assertEqual(options["connection-spec"], "inet:10030@[127.0.0.1]")
        self.assertEqual(options["database"], "/var/lib/milter-manager/greylist.sqlite3")
        self.assertEqual(options.store_settings(), {
            "delay": 300, "retry_window": 4 * 3600, "expiry": 36 * DAY, "auto_whitelist": 5,
            "whitelist": ["127.0.0.0/8", "::1/128"], "ipv4_prefix": 24, "ipv6_prefix": 64})

    def test_values(self):
        """Durations take s/m/h/d/w suffixes; --whitelist repeats and replaces the default."""
        options = self.parse("--delay", "5m", "--retry-window", "2h", "--expiry", "1w",
                             "--auto-whitelist", "0", "--whitelist", "10.0.0.0/8",
                             "--whitelist", "2001:db8::/32", "--ipv4-prefix", "32",
                             "--ipv6-prefix", "56", "-s", "unix:/run/greylist.sock", "-v")
        self.assertEqual(options.store_settings(), {
            "delay": 300, "retry_window": 7200, "expiry": 7 * DAY, "auto_whitelist": 0,
            "whitelist": ["10.0.0.0/8", "2001:db8::/32"], "ipv4_prefix": 32, "ipv6_prefix": 56})

    def test_errors(self):
        """Bad values are usage errors that name the option."""
        for argv, option in [(["--delay", "soon"], "--delay"),
                             (["--expiry", "-1"], "--expiry"),
                             (["--auto-whitelist", "x"], "--auto-whitelist"),
                             (["--ipv4-prefix", "33"], "--ipv4-prefix"),
                             (["--ipv6-prefix", "129"], "--ipv6-prefix"),
                             (["--whitelist", "example.com"], "--whitelist"),
                             (["-s", "bogus"], "--connection-spec"),
                             (["-q", "-v"], "--quiet")]:
            error = self.assertRaises(usage.UsageError, self.parse, *argv)
            self.assertIn(option, str(error))

    def test_main_usage_error(self):
        """main() reports a usage error on stderr and returns 2."""
        stderr = io.StringIO()
        self.assertEqual(greylist_main.main(["--delay", "x"], stderr=stderr), 2)
        self.assertIn("milter-manager-greylist: --delay", stderr.getvalue())

    def test_main_bad_database(self):
        """main() reports a database it cannot open and returns 1, before listening."""
        stderr = io.StringIO()
        path = os.path.join(self.mktemp(), "missing-directory", "g.sqlite3")
        self.assertEqual(greylist_main.main(["--database", path], reactor=object(),
                                            stderr=stderr), 1)
        self.assertIn(f"cannot open the database {path}", stderr.getvalue())


def run_test_server(spec, *args):
    """Run milter-test-server once against spec; return its stdout."""
    result = subprocess.run(
        ["milter-test-server", "-s", spec, "-r", "a@example.com",
         "--connect-address", "inet:25@[192.0.2.10]", *args],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    if result.returncode:
        raise AssertionError(f"milter-test-server exited {result.returncode}: {result.stderr!r}")
    return result.stdout.decode()


class ProcessTests(unittest.TestCase):
    """The installed console script, driven by milter-test-server over loopback."""

    def start(self, *args):
        port = free_port()
        process = subprocess.Popen(
            ["milter-manager-greylist", "-s", f"inet:{port}@[127.0.0.1]", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True)

        def stop():
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
            process.wait()
            process.stdout.close()
            process.stderr.close()

        self.addCleanup(stop)
        wait_for_port(port, timeout=30, process=process)
        return process, f"inet:{port}@[127.0.0.1]"

    def test_greylisted_then_passed(self):
        """First run: temporary failure 451; a run after --delay passes with X-Greylist."""
        database = os.path.abspath(self.mktemp())
        process, spec = self.start("--database", database, "--delay", "1")
        first = run_test_server(spec)
        self.assertRegex(first, r"(?m)^status: temporary-failure \[451\]<4\.7\.1>"
                                r"\(Greylisted, please try again in 1 seconds\)$")
        time.sleep(1.1)  # a real process: its clock is the wall clock
        second = run_test_server(spec, "--output-message")
        self.assertRegex(second, r"(?m)^status: pass$")
        self.assertRegex(second, r"(?m)^\+ X-Greylist: delayed \d+ seconds by "
                                 r"milter-manager-greylist at \S+; \w{3}, \d+ \w{3} \d{4} ")
        os.kill(process.pid, signal.SIGTERM)
        self.assertEqual(process.wait(30), 0)
        log = process.stderr.read().decode()
        self.assertIn("[greylist][greylisted] 192.0.2.0/24 <sender@example.com> -> "
                      "<a@example.com> (new): retry in 1 s", log)
        self.assertRegex(log, r"\[greylist\]\[pass\] 192\.0\.2\.0/24 <sender@example\.com> -> "
                              r"<a@example\.com> retried after \d+ s")
        with sqlite3.connect(database) as db:
            self.assertEqual(db.execute("SELECT network, sender, recipient, passed FROM "
                                        "triplets").fetchall(),
                             [(NETWORK, "sender@example.com", "a@example.com", 1)])

    def test_broken_database_fails_open(self):
        """A database that breaks while running lets mail pass and logs the error."""
        database = os.path.abspath(self.mktemp())
        process, spec = self.start("--database", database, "--quiet")
        with sqlite3.connect(database) as db:
            db.execute("DROP TABLE triplets")
        self.assertRegex(run_test_server(spec), r"(?m)^status: pass$")
        os.kill(process.pid, signal.SIGTERM)
        self.assertEqual(process.wait(30), 0)
        log = process.stderr.read().decode()
        self.assertRegex(log, r"\[greylist\]\[error\] database: no such table: triplets; "
                              r"passing .* \(fail open\)")
        self.assertNotIn("[greylist][listen]", log)  # --quiet: warnings and errors only
