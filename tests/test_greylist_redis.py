"""The greylist's Redis store on real redis-servers on loopback: two "hosts", Sentinel failovers."""

import io
import os
import signal
import subprocess
import sys
import threading
import time

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial import unittest
from zope.interface.verify import verifyObject

import tests.test_greylist as sqlite_tests
from miltermanager.greylist import main as greylist_main
from miltermanager.greylist import redis_store
from miltermanager.greylist.interfaces import IGreylist
from miltermanager.greylist.milter import GreylistMilter
from miltermanager.greylist.redis_store import TTL_SLACK, RedisGreylist, parse_url
from miltermanager.greylist.store import Reason, StoreError, Triplet, Verdict
from miltermanager.greylist.threaded import ThreadedGreylist
from miltermanager.protocol import messages
from tests.peers import redis as redis_peer
from tests.peers.fixtures import Postfix, free_port, wait_for_port

try:
    import redis
except ImportError:
    redis = None

MISSING = None
if redis is None:
    MISSING = "the redis Python library is not installed (python3-redis or pip redis)"
elif not redis_peer.available():
    MISSING = "redis-server is not installed"

TRIPLET = Triplet("192.0.2.0/24", "s@example.com", "r@example.org")
DAY = 86400
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RedisTestCase(unittest.TestCase):
    """A fresh redis-server for each test; stores on it on a task.Clock at 1000 s."""

    def setUp(self):
        # Not skipped: a machine without them would prove nothing. install-test-deps has both.
        self.assertIsNone(MISSING, "scripts/install-test-deps installs redis-server and redis-py")
        self.server = redis_peer.RedisServer(self.mktemp())
        self.addCleanup(self.server.stop)
        self.server.start()
        self.client = self.server.client()
        self.addCleanup(self.client.close)
        self.clock = Clock()
        self.clock.advance(1000)

    def store(self, url=None, **settings):
        greylist = RedisGreylist.from_url(parse_url(url or self.server.url), self.clock,
                                          **settings)
        self.addCleanup(greylist.close)
        return greylist

    def assertTTL(self, key, seconds):
        """The key expires in seconds (give or take the 5 s a slow test may take)."""
        milliseconds = self.client.pttl(key)
        self.assertTrue(seconds - 5 <= milliseconds / 1000 <= seconds,
                        f"{key!r} expires in {milliseconds} ms, not {seconds} s")


# The SQLite store's decision tests, run on the Redis store: the same semantics.

class RedisDecisionTests(RedisTestCase, sqlite_tests.DecisionTests):
    """New, early, retried, known, expired: as with SQLite (tests.test_greylist)."""


class RedisAutoWhitelistTests(RedisTestCase, sqlite_tests.AutoWhitelistTests):
    """Auto-whitelisting by network: as with SQLite (tests.test_greylist)."""


class RedisNormalisationTests(RedisTestCase, sqlite_tests.NormalisationTests):
    """Addresses are normalised before they key anything: as with SQLite."""


class KeysTests(RedisTestCase):
    """What the store leaves in Redis, and for how long."""

    def test_provides_igreylist(self):
        """RedisGreylist provides IGreylist."""
        verifyObject(IGreylist, self.store())

    def test_pending_expires_after_retry_window(self):
        """A new triplet's key lives delay + retry window (+ slack): no purge needed."""
        greylist = self.store(delay=300, retry_window=3600)
        greylist.decide(TRIPLET)
        keys = greylist.keys(TRIPLET)
        self.assertEqual(self.client.hgetall(keys.triplet),
                         {b"first_seen": b"1000.0", b"last_seen": b"1000.0", b"passed": b"0"})
        self.assertTTL(keys.triplet, 300 + 3600 + TTL_SLACK)
        self.assertEqual(self.client.exists(keys.passed, keys.network), 0)

    def test_passed_expires_after_expiry(self):
        """A passed triplet's key, and its network's count, live the expiry from the last use."""
        greylist = self.store(delay=300, expiry=7 * DAY)
        greylist.decide(TRIPLET)
        self.clock.advance(400)
        self.assertEqual(greylist.decide(TRIPLET).reason, Reason.RETRIED)
        keys = greylist.keys(TRIPLET)
        self.assertTTL(keys.triplet, 7 * DAY + TTL_SLACK)
        self.assertTTL(keys.passed, 7 * DAY + TTL_SLACK)
        self.assertEqual(self.client.zrange(keys.passed, 0, -1, withscores=True),
                         [(b"s@example.com\0r@example.org", 1400.0)])

    def test_auto_whitelist_key(self):
        """An auto-whitelisted network's key lives the expiry from its last use."""
        greylist = self.store(auto_whitelist=1, expiry=2 * DAY)
        greylist.decide(TRIPLET)
        self.clock.advance(400)
        greylist.decide(TRIPLET)
        network = greylist.keys(TRIPLET).network
        self.assertEqual(self.client.get(network), b"1400.0")
        self.assertTTL(network, 2 * DAY + TTL_SLACK)
        self.assertEqual(greylist.decide(Triplet("192.0.2.0/24", "x@y", "z@w")),
                         Verdict(True, Reason.AUTO_WHITELISTED))

    def test_vanished_key_starts_over(self):
        """A key Redis expired is a triplet seen for the first time."""
        greylist = self.store()
        greylist.decide(TRIPLET)
        self.client.delete(greylist.keys(TRIPLET).triplet)
        self.clock.advance(400)
        self.assertEqual(greylist.decide(TRIPLET).reason, Reason.NEW)

    def test_prefix(self):
        """?prefix= starts every key; other prefixes are other greylists."""
        one = self.store(self.server.url + "?prefix=mx-a:")
        two = self.store(self.server.url + "?prefix=mx-b:")
        one.decide(TRIPLET)
        self.assertEqual(two.decide(TRIPLET).reason, Reason.NEW)
        self.assertEqual(sorted(key.split(b":")[0] for key in self.client.keys("*")),
                         [b"mx-a", b"mx-b"])

    def test_purge_is_nothing(self):
        """purge() deletes nothing: Redis expires the keys."""
        greylist = self.store()
        greylist.decide(TRIPLET)
        self.assertEqual(greylist.purge(), 0)
        self.assertEqual(greylist.counts(), (1, 0, 0))


class SharedTests(RedisTestCase):
    """Two hosts' stores on one Redis."""

    def test_first_seen_on_a_passes_on_b(self):
        """First seen through A: greylisted; retried through B after the delay: passes."""
        host_a, host_b = self.store(), self.store()
        self.assertEqual(host_a.decide(TRIPLET), Verdict(False, Reason.NEW, remaining=300))
        self.clock.advance(100)
        self.assertEqual(host_b.decide(TRIPLET), Verdict(False, Reason.EARLY, remaining=200))
        self.clock.advance(201)
        self.assertEqual(host_b.decide(TRIPLET), Verdict(True, Reason.RETRIED, delayed=301))
        self.assertEqual(host_a.decide(TRIPLET), Verdict(True, Reason.KNOWN))

    def test_race_on_a_first_attempt(self):
        """B writes the triplet between A's read and A's write: A decides again on B's record."""
        host_b = self.store()
        raced = []

        class RacedHost(RedisGreylist):
            def _read(self, pipe, keys):
                if not raced:
                    raced.append(host_b.decide(TRIPLET))

        host_a = RacedHost.from_url(parse_url(self.server.url), self.clock)
        self.addCleanup(host_a.close)
        self.clock.advance(5)
        verdict = host_a.decide(TRIPLET, now=self.clock.seconds() + 1)
        self.assertEqual(raced, [Verdict(False, Reason.NEW, remaining=300)])
        self.assertEqual(verdict, Verdict(False, Reason.EARLY, remaining=299))
        self.assertEqual(self.client.hgetall(host_a.keys(TRIPLET).triplet)[b"first_seen"],
                         b"1005.0")

    def test_concurrent_first_attempts(self):
        """Many threads of two hosts on one new triplet: one record, one NEW, all greylisted."""
        hosts = [self.store(), self.store()]
        barrier = threading.Barrier(16)
        verdicts = []

        def attempt(host):
            barrier.wait()
            verdicts.append(host.decide(TRIPLET))

        threads = [threading.Thread(target=attempt, args=(hosts[n % 2],)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual(len(verdicts), 16)
        self.assertFalse(any(verdict.passed for verdict in verdicts))
        self.assertEqual(sorted(verdict.reason.value for verdict in verdicts),
                         ["early"] * 15 + ["new"])
        self.assertEqual(len(self.client.keys("greylist:triplet:*")), 1)


class Driver(sqlite_tests.Driver):
    """An MTA driving one host's GreylistMilters."""

    def message(self, recipient=b"<r@example.org>"):
        """One message with one recipient; (RCPT reply, EOM replies)."""
        assert self.send(*sqlite_tests.envelope()) == []
        (reply,) = self.send(messages.Rcpt(recipient))
        return reply, self.send(messages.END_OF_MESSAGE)


class MilterTests(RedisTestCase):
    """Two hosts' milters on one Redis, and a Redis outage."""

    def setUp(self):
        super().setUp()
        self.events = []
        self.patch(GreylistMilter, "log", Logger(observer=self.events.append))

    def driver(self, greylist):
        driver = Driver(greylist, self.clock)
        self.assertEqual(len(driver.send(sqlite_tests.OFFER_V6)), 1)
        return driver

    def logged(self, level):
        from twisted.logger import formatEvent
        return [formatEvent(event) for event in self.events if event["log_level"].name == level]

    def test_greylisted_on_a_passed_on_b(self):
        """The MTA tries host A: 451; it retries on host B after the delay: passes, X-Greylist."""
        host_a, host_b = self.driver(self.store()), self.driver(self.store())
        reply, end = host_a.message()
        self.assertEqual(reply, messages.ReplyCode(
            b"451 4.7.1 Greylisted, please try again in 300 seconds"))
        self.clock.advance(301)
        reply, end = host_b.message()
        self.assertEqual(reply, messages.CONTINUE)
        self.assertEqual(end[0].name, b"X-Greylist")

    def test_outage_fails_open_and_recovers(self):
        """Redis down: every recipient passes, one error line; back: one recovery line."""
        driver = self.driver(self.store(self.server.url + "?timeout=0.5"))
        self.assertIsInstance(driver.message()[0], messages.ReplyCode)
        self.server.stop()
        for _ in range(3):
            self.clock.advance(10)
            self.assertEqual(driver.message(), (messages.CONTINUE, [messages.CONTINUE]))
        (error,) = self.logged("error")
        self.assertIn("[greylist][error] database: redis ConnectionError: ", error)
        self.assertIn("passing 192.0.2.0/24 <s@example.com> -> <r@example.org> (fail open)",
                      error)
        self.assertEqual(self.logged("critical"), [])  # no traceback
        self.server.start()
        self.clock.advance(10)
        reply, end = driver.message()  # the data is gone (no persistence): new again
        self.assertEqual(reply, messages.ReplyCode(
            b"451 4.7.1 Greylisted, please try again in 300 seconds"))
        (recovered,) = self.logged("warn")
        self.assertEqual(recovered, "[greylist][recovered] the store answers again after "
                                    "30.0 s; 3 decisions failed open meanwhile")
        self.assertEqual(len(self.logged("error")), 1)

    def test_read_only_replica_fails_open(self):
        """A store pointed at a read-only replica fails open with READONLY, logged once."""
        replica = redis_peer.RedisServer(self.mktemp())
        self.addCleanup(replica.stop)
        replica.start()
        replica_client = replica.client()
        self.addCleanup(replica_client.close)
        replica_client.replicaof("127.0.0.1", self.server.port)
        driver = self.driver(self.store(replica.url))
        for _ in range(2):
            self.assertEqual(driver.message()[0], messages.CONTINUE)
        (error,) = self.logged("error")
        self.assertIn("database: redis ReadOnlyError: You can't write against a read only "
                      "replica.; passing", error)

    @defer.inlineCallbacks
    def test_threaded(self):
        """Through the thread pool, as the program runs it: 451, then pass after the delay."""
        greylist = ThreadedGreylist(self.store(), reactor, self.clock, purge_interval=0)
        greylist.start()
        self.addCleanup(greylist.stop)
        verdict = yield greylist.decide(TRIPLET)
        self.assertEqual(verdict.reason, Reason.NEW)
        self.clock.advance(301)
        verdict = yield greylist.decide(TRIPLET)
        self.assertEqual(verdict.reason, Reason.RETRIED)
        counts = yield greylist.counts()
        self.assertEqual(counts, (0, 1, 0))


class SentinelTests(RedisTestCase):
    """The store finds the master through a Sentinel."""

    def setUp(self):
        super().setUp()
        self.sentinel = redis_peer.Sentinel(self.mktemp(), self.server)
        self.addCleanup(self.sentinel.stop)
        self.sentinel.start()

    def test_through_sentinel(self):
        """sentinel://HOST:PORT/MASTER/DB: decisions on the master the Sentinel names."""
        through_sentinel = self.store(self.sentinel.url)
        direct = self.store()
        self.assertEqual(through_sentinel.decide(TRIPLET).reason, Reason.NEW)
        self.clock.advance(301)
        self.assertEqual(direct.decide(TRIPLET).reason, Reason.RETRIED)
        self.assertEqual(through_sentinel.decide(TRIPLET).reason, Reason.KNOWN)

    def test_unknown_master(self):
        """A master name the Sentinel does not know is a StoreError."""
        greylist = self.store(self.sentinel.url.replace("mymaster", "other"))
        error = self.assertRaises(StoreError, greylist.decide, TRIPLET)
        self.assertIn("MasterNotFoundError", str(error))


class FailoverTests(unittest.TestCase):
    """A master, its replica and a Sentinel: the store follows failovers by itself."""

    def setUp(self):
        self.assertIsNone(MISSING, "scripts/install-test-deps installs redis-server and redis-py")
        self.redis = redis_peer.ReplicatedRedis(self.mktemp())
        self.addCleanup(self.redis.stop)
        self.redis.start()
        self.clock = Clock()
        self.clock.advance(1000)
        self.events = []
        self.patch(GreylistMilter, "log", Logger(observer=self.events.append))

    def store(self, query="?timeout=0.5"):
        greylist = RedisGreylist.from_url(parse_url(self.redis.url + query), self.clock)
        self.addCleanup(greylist.close)
        return greylist

    def logged(self, level):
        from twisted.logger import formatEvent
        return [formatEvent(event) for event in self.events if event["log_level"].name == level]

    def stored_on(self, server, greylist, triplet):
        """Does server (a RedisServer) hold the triplet's record?"""
        with server.client() as client:
            return client.exists(greylist.keys(triplet).triplet) == 1

    def test_master_killed(self):
        """Master killed: fails open, logs once; replica promoted: one recovery line, data kept."""
        greylist = self.store()
        driver = Driver(greylist, self.clock)
        self.assertEqual(len(driver.send(sqlite_tests.OFFER_V6)), 1)
        greylisted = messages.ReplyCode(b"451 4.7.1 Greylisted, please try again in 300 seconds")
        self.assertEqual(driver.message(b"<waiting@example.org>")[0], greylisted)
        self.assertEqual(driver.message(b"<passed@example.org>")[0], greylisted)
        self.clock.advance(301)
        self.assertEqual(driver.message(b"<passed@example.org>")[0], messages.CONTINUE)
        self.redis.replicated()
        self.redis.master.kill()
        failed_open = 0
        deadline = time.monotonic() + 15
        while True:  # a new triplet each time: 451 once a decision is taken again
            reply, end = driver.message(f"<during-{failed_open}@example.org>".encode())
            if reply != messages.CONTINUE:
                break
            self.assertEqual(end, [messages.CONTINUE])  # failed open: no X-Greylist
            failed_open += 1
            self.assertLess(time.monotonic(), deadline, "no decision 15 s after the kill")
            time.sleep(0.02)
        self.assertEqual(reply, greylisted)
        self.assertGreater(failed_open, 0)
        self.assertEqual(self.redis.sentinel.master_port(), self.redis.replica.port)
        (error,) = self.logged("error")
        self.assertRegex(error, r"^\[greylist\]\[error\] database: redis "
                                r"(ConnectionError|MasterNotFoundError): .*; passing "
                                r"192\.0\.2\.0/24 <s@example\.com> -> <during-0@example\.org> "
                                r"\(fail open\)")
        (recovered,) = self.logged("warn")
        self.assertRegex(recovered, r"^\[greylist\]\[recovered\] the store answers again after "
                                    rf"[0-9.]+ s; {failed_open} decisions failed open meanwhile$")
        self.assertEqual(self.logged("critical"), [])
        # What the old master had replicated decides on the new one.
        self.clock.advance(300)
        waiting = Triplet("192.0.2.0/24", "s@example.com", "waiting@example.org")
        self.assertEqual(greylist.decide(waiting).reason, Reason.RETRIED)
        passed = Triplet("192.0.2.0/24", "s@example.com", "passed@example.org")
        self.assertEqual(greylist.decide(passed).reason, Reason.KNOWN)
        self.assertTrue(self.stored_on(self.redis.replica, greylist, waiting))

    def test_manual_failover_moves_writes(self):
        """SENTINEL FAILOVER, old master still up and writable: writes move within about 1 s."""
        greylist = self.store()
        triplet = Triplet("192.0.2.0/24", "s@example.com", "r@example.org")
        self.assertEqual(greylist.decide(triplet).reason, Reason.NEW)
        self.redis.replicated()
        with self.redis.sentinel.client() as sentinel:
            self.assertTrue(sentinel.execute_command("SENTINEL", "FAILOVER", "mymaster"))
        self.redis.wait_master(self.redis.replica)
        named = time.monotonic()
        count = 0
        while True:  # every decision is taken; the first ones may still land on the old master
            count += 1
            fresh = Triplet("192.0.2.0/24", "s@example.com", f"r{count}@example.org")
            self.assertEqual(greylist.decide(fresh).reason, Reason.NEW)
            if self.stored_on(self.redis.replica, greylist, fresh):
                break
            self.assertLess(time.monotonic() - named, 3, "still writing to the old master")
            time.sleep(0.02)
        # The Sentinel has not reconfigured the old master yet (it waits some 10 s): the store
        # moved by itself, not because the Sentinel closed its connections.
        self.assertEqual(redis_peer.info(self.redis.master, "role"), "master")
        self.assertFalse(self.stored_on(self.redis.master, greylist, fresh))
        self.clock.advance(301)
        self.assertEqual(greylist.decide(triplet).reason, Reason.RETRIED)

    def test_readonly_rediscovers(self):
        """A pooled connection to a master demoted under it (READONLY): the decision moves on."""
        greylist = self.store()
        greylist.master.interval = 3600  # only the READONLY reply can tell of the failover
        triplet = Triplet("192.0.2.0/24", "s@example.com", "r@example.org")
        self.assertEqual(greylist.decide(triplet).reason, Reason.NEW)
        self.redis.replicated()
        with self.redis.sentinel.client() as sentinel:
            sentinel.execute_command("SENTINEL", "FAILOVER", "mymaster")
        self.redis.wait_master(self.redis.replica)
        # What the Sentinel does some 10 s later, but without closing the clients' connections.
        with self.redis.master.client() as old_master:
            old_master.replicaof(redis_peer.HOST, self.redis.replica.port)
        self.assertEqual(redis_peer.info(self.redis.master, "role"), "slave")
        fresh = Triplet("192.0.2.0/24", "s@example.com", "fresh@example.org")
        self.assertEqual(greylist.decide(fresh).reason, Reason.NEW)
        with self.redis.replica.client() as new_master:
            self.assertEqual(new_master.exists(greylist.keys(fresh).triplet), 1)
        self.clock.advance(301)
        self.assertEqual(greylist.decide(triplet).reason, Reason.RETRIED)


class _Sentinels:
    """A stand-in for redis.sentinel.Sentinel: names answers in turn, counts the questions."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.asked = 0

    def discover_master(self, service_name):
        assert service_name == "mymaster"
        self.asked += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


class SentinelMasterTests(unittest.TestCase):
    """How often the store asks the Sentinels where the master is."""

    def setUp(self):
        self.assertIsNone(MISSING, "scripts/install-test-deps installs redis-server and redis-py")
        self.now = 100.0

    def master(self, *answers):
        self.sentinels = _Sentinels(*answers)
        return redis_store.SentinelMaster(self.sentinels, "mymaster", interval=1.0,
                                          monotonic=lambda: self.now)

    def test_asks_once_an_interval(self):
        """Within the interval the last answer serves; after it, the Sentinels are asked again."""
        master = self.master(("127.0.0.1", 1), ("127.0.0.1", 2))
        self.assertEqual(master.address(), ("127.0.0.1", 1))
        self.now += 0.9
        self.assertEqual(master.address(), ("127.0.0.1", 1))
        self.now += 0.1
        self.assertEqual(master.address(), ("127.0.0.1", 2))
        self.assertEqual(self.sentinels.asked, 2)

    def test_now(self):
        """now=True asks at once, whatever the interval."""
        master = self.master(("127.0.0.1", 1), ("127.0.0.1", 2))
        master.address()
        self.assertEqual(master.address(now=True), ("127.0.0.1", 2))

    def test_no_master(self):
        """No master named (down, failing over, no Sentinel answers): None, asked again later."""
        from redis.sentinel import MasterNotFoundError

        master = self.master(("127.0.0.1", 1), MasterNotFoundError("No master found"),
                             ("127.0.0.1", 2))
        master.address()
        self.now += 1
        self.assertIsNone(master.address())
        self.now += 0.5
        self.assertIsNone(master.address())
        self.now += 0.5
        self.assertEqual(master.address(), ("127.0.0.1", 2))

    def test_one_asker(self):
        """A thread finding another one asking takes the last answer instead of waiting."""
        master = self.master(("127.0.0.1", 1))
        master.address()
        self.now += 5
        with master._lock:
            self.assertEqual(master.address(), ("127.0.0.1", 1))
        self.assertEqual(self.sentinels.asked, 1)


class URLTests(unittest.TestCase):
    """--store URLs."""

    def test_redis(self):
        """redis://: host, port, database, password hidden in the text; defaults."""
        url = parse_url("redis://:secret@db.example:6380/2?prefix=mx:&timeout=0.25")
        self.assertEqual((url.scheme, url.url, url.db, url.prefix, url.timeout, url.text),
                         ("redis", "redis://:secret@db.example:6380/2", 2, "mx:", 0.25,
                          "redis://:***@db.example:6380/2?prefix=mx:&timeout=0.25"))
        url = parse_url("redis://127.0.0.1")
        self.assertEqual((url.db, url.prefix, url.timeout), (0, "greylist:", 1.0))

    def test_sentinel(self):
        """sentinel://: several sentinels (default port 26379), the master name, the database."""
        url = parse_url("sentinel://:pw@s1:26380,s2/mymaster/3")
        self.assertEqual((url.sentinels, url.master, url.db, url.password),
                         ((("s1", 26380), ("s2", 26379)), "mymaster", 3, "pw"))

    def test_unix(self):
        """unix://PATH?db=N."""
        url = parse_url("unix:///run/redis/redis.sock?db=4")
        self.assertEqual((url.url, url.db), ("unix:///run/redis/redis.sock?db=4", 4))

    def test_errors(self):
        """Bad URLs: a ValueError naming the problem."""
        for text, words in [("http://x", "expected a URL"), ("redis://", "no host"),
                            ("redis://h/x", "not a whole number"), ("redis://h:99999", "port"),
                            ("redis://h?db=1", "as the path"), ("redis://h?x=1", "unknown"),
                            ("redis://h?timeout=0", "more than 0"),
                            ("sentinel://h1", "MASTERNAME"), ("sentinel://,h2/m", "empty"),
                            ("unix://", "no socket path")]:
            error = self.assertRaises(ValueError, parse_url, text)
            self.assertIn(words, str(error))

    def test_no_redis_import(self):
        """Parsing a URL does not import redis (the program checks it before it needs it)."""
        script = ("import sys; from miltermanager.greylist import main, redis_store; "
                  "redis_store.parse_url('redis://h'); print('redis' in sys.modules)")
        result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                                text=True, cwd=REPO, timeout=60)
        self.assertEqual(result.stdout.strip(), "False", result.stderr)


class OptionsTests(unittest.TestCase):
    """--store on the command line."""

    def test_store(self):
        """--store takes a URL; --database is then unset, and both together are an error."""
        options = greylist_main.Options()
        options.parseOptions(["--store", "redis://127.0.0.1/0"])
        self.assertEqual((options["store"], options["database"]), ("redis://127.0.0.1/0", None))
        options = greylist_main.Options()
        error = self.assertRaises(greylist_main.usage.UsageError, options.parseOptions,
                                  ["--store", "redis://h", "--database", "/tmp/g"])
        self.assertIn("--store and --database", str(error))

    def test_bad_url(self):
        """A bad --store URL: one line on stderr, status 1, before listening."""
        stderr = io.StringIO()
        self.assertEqual(greylist_main.main(["--store", "redis://h/x"], reactor=object(),
                                            stderr=stderr), 1)
        self.assertEqual(stderr.getvalue(), "milter-manager-greylist: --store: 'redis://h/x': "
                                            "database 'x' is not a whole number\n")

    def test_no_redis_library(self):
        """Without redis-py: one line saying which package to install, status 1."""
        self.patch(redis_store, "connect", _no_redis)
        stderr = io.StringIO()
        self.assertEqual(greylist_main.main(["--store", "redis://:pw@h/0"], reactor=object(),
                                            stderr=stderr), 1)
        self.assertEqual(stderr.getvalue(), "milter-manager-greylist: --store redis://:***@h/0: "
                                            "the redis Python library is not installed "
                                            "(Debian: python3-redis; pip: redis)\n")


def _no_redis(store_url):
    raise ImportError("No module named 'redis'")


def _postfix_spec(spec):
    """inet:PORT@[127.0.0.1] (the milter's -s) as Postfix writes it: inet:127.0.0.1:PORT."""
    port = spec.partition(":")[2].partition("@")[0]
    return f"inet:127.0.0.1:{port}"


def run_test_server(spec, *args):
    return sqlite_tests.run_test_server(spec, *args)


class ProcessTests(RedisTestCase):
    """Two milter-manager-greylist processes (two MX hosts) on one redis-server."""

    def start(self, *args):
        port = free_port()
        log_path = os.path.join(self.mktemp() + ".log")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [REPO, *filter(None, [os.environ.get("PYTHONPATH")])]))
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "miltermanager.greylist.main",
                 "-s", f"inet:{port}@[127.0.0.1]", "--store", self.server.url, *args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)

        def stop():
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
            process.wait()

        self.addCleanup(stop)
        wait_for_port(port, timeout=30, process=process)
        return process, f"inet:{port}@[127.0.0.1]", log_path

    def test_two_hosts_behind_postfix(self):
        """Postfix A answers a first attempt 451; the retry via Postfix B after --delay passes."""
        delay = 2
        # Postfix connects from 127.0.0.1: a whitelist without loopback greylists it.
        options = ["--delay", str(delay), "--verbose", "--whitelist", "192.0.2.0/24"]
        (_, spec_a, log_a), (_, spec_b, log_b) = self.start(*options), self.start(*options)
        postfix_a = Postfix(self.mktemp(), milters=[_postfix_spec(spec_a)])
        postfix_b = Postfix(self.mktemp(), milters=[_postfix_spec(spec_b)])
        for postfix in (postfix_a, postfix_b):
            self.addCleanup(postfix.stop)
            postfix.start()
        message = (b"From: s@example.com\nTo: r@example.org\nSubject: greylisted once\n\n"
                   b"hello\n")
        first = postfix_a.send("s@example.com", ["r@example.org"], message)
        self.assertEqual(first.rcpts, {"r@example.org": (
            451, f"4.7.1 Greylisted, please try again in {delay} seconds")})
        self.assertIsNone(first.data)
        key = "greylist:triplet:127.0.0.0/24\0s@example.com\0r@example.org"
        record = self.client.hgetall(key)
        self.assertEqual(record[b"passed"], b"0")
        early = postfix_b.send("s@example.com", ["r@example.org"], message)
        self.assertEqual(early.rcpts["r@example.org"][0], 451)  # B knows A's record: still early
        self.assertEqual(float(self.client.hget(key, "first_seen")),
                         float(record[b"first_seen"]))
        # The processes decide on the wall clock: wait until the delay is over by it.
        time.sleep(max(0.0, float(record[b"first_seen"]) + delay + 0.1 - time.time()))
        retry = postfix_b.send("s@example.com", ["r@example.org"], message)
        self.assertEqual(retry.rcpts, {"r@example.org": (250, "2.1.5 Ok")})
        self.assertTrue(retry.accepted, retry)
        (delivered,) = postfix_b.wait_delivered(1)
        self.assertRegex(delivered.decode(), r"(?m)^X-Greylist: delayed [0-9]+ seconds by "
                                             r"milter-manager-greylist at mta\.harness\.test; ")
        self.assertEqual(self.client.hget(key, "passed"), b"1")
        with open(log_a) as log:
            self.assertIn("[greylist][greylisted] 127.0.0.0/24 <s@example.com> -> "
                          f"<r@example.org> (new): retry in {delay} s", log.read())
        with open(log_b) as log:
            text = log.read()
        self.assertRegex(text, r"\[greylist\]\[greylisted\] 127\.0\.0\.0/24 <s@example\.com> -> "
                               r"<r@example\.org> \(early\): retry in [0-9]+ s")
        self.assertRegex(text, r"\[greylist\]\[pass\] 127\.0\.0\.0/24 <s@example\.com> -> "
                               r"<r@example\.org> retried after [0-9]+ s")
        self.assertNotIn("Traceback", text)
        postfix_b.wait_maillog("status=sent (250 2.0.0 Ok")

    def test_two_hosts(self):
        """Greylisted on host A; retried on host B after --delay: passes; Redis down: passes."""
        host_a, spec_a, log_a = self.start("--delay", "1")
        host_b, spec_b, log_b = self.start("--delay", "1")
        self.assertRegex(run_test_server(spec_a), r"(?m)^status: temporary-failure \[451\]")
        time.sleep(1.1)  # real processes: their clock is the wall clock
        self.assertRegex(run_test_server(spec_b), r"(?m)^status: pass$")
        self.server.stop()
        for _ in range(2):
            self.assertRegex(run_test_server(spec_b, "-r", "other@example.com"),
                             r"(?m)^status: pass$")
        for process in (host_a, host_b):
            os.kill(process.pid, signal.SIGTERM)
            self.assertEqual(process.wait(30), 0)
        with open(log_b) as log:
            text = log.read()
        self.assertIn("[greylist][listen]", text)
        self.assertIn("store redis://127.0.0.1:", text)
        self.assertEqual(text.count("[greylist][error] database: redis ConnectionError"), 1,
                         text)
        self.assertNotIn("Traceback", text)
