"""Tests for milter-manager-greylist's Prometheus metrics (--metrics-listen)."""

import io
import os
import sqlite3
import subprocess
import urllib.request

from prometheus_client.parser import text_string_to_metric_families as text_families
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python import usage
from twisted.trial import unittest

from miltermanager.greylist import main as greylist_main
from miltermanager.greylist.metrics import GreylistCollector, GreylistMetrics
from miltermanager.greylist.milter import GreylistMilter, server_factory
from miltermanager.greylist.store import Greylist, Reason, Verdict
from miltermanager.protocol import FrameDecoder, decode_reply, messages, negotiation
from miltermanager.protocol import constants as c
from tests.peers.fixtures import GreylistMilter as GreylistProcess
from tests.peers.fixtures import free_port, wait_for_port
from tests.test_metrics import samples

G = "milter_manager_greylist_"
CLIENT = b"192.0.2.10"


def decisions(found):
    """{(result, reason): count} of the decisions counter."""
    return {(dict(labels)["result"], dict(labels)["reason"]): value
            for (name, labels), value in found.items() if name == G + "decisions_total"}


class Driver:
    """An MTA driving one GreylistMilter connection that reports to a GreylistMetrics."""

    def __init__(self, greylist, clock, metrics):
        factory = server_factory(greylist, clock, b"mx.example", metrics)
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.decoder = FrameDecoder()
        self.send(negotiation.offer(6))

    def send(self, *commands):
        self.protocol.dataReceived(b"".join(command.encode() for command in commands))
        data = self.transport.value()
        self.transport.clear()
        return [decode_reply(code, payload) for code, payload in self.decoder.feed(data)]

    def message(self, *recipients, sender=b"<s@example.com>", address=CLIENT,
                family=c.FAMILY_INET):
        self.send(messages.Connect(b"client.example.net", family, 50443, address),
                  messages.Mail(sender))
        return [self.send(messages.Rcpt(recipient)) for recipient in recipients]


class SlowGreylist:
    """A greylist whose decisions are Deferreds the test fires (or fails) itself."""

    def __init__(self, store):
        self.store = store
        self.pending = []

    def is_whitelisted(self, address):
        return self.store.is_whitelisted(address)

    def client_network(self, address):
        return self.store.client_network(address)

    def decide(self, triplet):
        d = defer.Deferred()
        self.pending.append(d)
        return d


class MilterCountingTests(unittest.TestCase):
    """The milter counts each recipient once, with the reason it passed or was greylisted."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = Greylist(self.mktemp(), self.clock, delay=300, auto_whitelist=0)
        self.addCleanup(self.store.close)
        self.metrics = GreylistMetrics()
        self.events = []
        self.patch(GreylistMilter, "log", Logger(observer=self.events.append))

    def driver(self, greylist=None):
        return Driver(greylist or self.store, self.clock, self.metrics)

    def test_store_reasons(self):
        """new, early, retried and known are counted as the store decided them."""
        self.driver().message(b"<r@example.org>")
        self.clock.advance(100)
        self.driver().message(b"<r@example.org>")
        self.clock.advance(200)
        self.driver().message(b"<r@example.org>")
        self.driver().message(b"<r@example.org>")
        self.assertEqual(self.metrics.decisions, {
            ("greylisted", "new"): 1, ("greylisted", "early"): 1, ("passed", "retried"): 1,
            ("passed", "known"): 1})
        self.assertEqual(sum(self.metrics.latency.counts), 4)

    def test_not_greylisted_reasons(self):
        """Whitelisted, non-IP and odd clients, odd senders and recipients pass, each counted."""
        self.driver().message(b"<r@example.org>", address=b"127.0.0.1")
        self.driver().message(b"<r@example.org>", b"<q@example.org>", address=b"/run/x.sock",
                              family=c.FAMILY_UNIX)
        self.driver().message(b"<r@example.org>", address=b"not-an-address")
        self.driver().message(b"<r@example.org>", sender=b"<bad\x01@example.com>")
        self.driver().message(b"<>")
        self.assertEqual(self.metrics.decisions, {
            ("passed", "whitelisted"): 1, ("passed", "not-ip"): 2,
            ("passed", "bad-input"): 3})
        self.assertEqual(sum(self.metrics.latency.counts), 0)  # the store was never asked

    def test_latency_of_a_deferred_decision(self):
        """The time from asking the store to its answer goes to the histogram's bucket."""
        slow = SlowGreylist(self.store)
        driver = self.driver(slow)
        driver.message(b"<r@example.org>")
        self.clock.advance(0.003)
        slow.pending[0].callback(Verdict(False, Reason.NEW, remaining=300))
        self.assertEqual(driver.send(), [messages.ReplyCode(
            b"451 4.7.1 Greylisted, please try again in 300 seconds")])
        self.assertEqual(self.metrics.latency.counts[:7], [0, 0, 0, 0, 0, 1, 0])  # le 0.005
        self.assertAlmostEqual(self.metrics.latency.sum, 0.003)

    def test_errors_pass_and_count(self):
        """A database error and a bug both pass (fail open), counted by kind."""
        slow = SlowGreylist(self.store)
        self.driver(slow).message(b"<r@example.org>")
        self.driver(slow).message(b"<r@example.org>")
        slow.pending[0].errback(sqlite3.OperationalError("database is locked"))
        slow.pending[1].errback(RuntimeError("bug"))
        self.assertEqual([event["log_level"].name for event in self.events
                          if event["log_format"].startswith("[greylist][error]")],
                         ["error", "critical"])
        self.assertEqual(self.metrics.decisions, {("passed", "error"): 2})
        self.assertEqual(self.metrics.errors, {("decide", "database"): 1,
                                               ("decide", "internal"): 1})

    def test_cancelled_is_not_counted(self):
        """A decision the MTA stopped waiting for (connection lost) counts nothing."""
        slow = SlowGreylist(self.store)
        driver = self.driver(slow)
        driver.message(b"<r@example.org>")
        slow.pending[0].cancel()
        self.assertEqual((self.metrics.decisions, self.metrics.errors), ({}, {}))

    def test_without_metrics(self):
        """A milter without metrics (the default) answers as before."""
        driver = Driver(self.store, self.clock, None)
        self.assertEqual(driver.message(b"<r@example.org>"), [[messages.ReplyCode(
            b"451 4.7.1 Greylisted, please try again in 300 seconds")]])


class CollectorTests(unittest.SynchronousTestCase):
    """GreylistCollector writes the counts as prometheus_client families."""

    def test_no_store_counts_no_gauge_samples(self):
        """Before a count (or after a failed one) the triplet gauges have no sample."""
        metrics = GreylistMetrics()
        metrics.decided(False, "new")
        families = {family.name: family for family in GreylistCollector(metrics).collect()}
        self.assertEqual(families[G + "triplets"].samples, [])
        self.assertEqual(families[G + "auto_whitelisted_networks"].samples, [])
        self.assertEqual(families[G + "decision_seconds"].samples, [])
        self.assertEqual([(s.labels, s.value) for s in families[G + "decisions"].samples],
                         [({"result": "greylisted", "reason": "new"}, 1)])


class RefreshTests(unittest.SynchronousTestCase):
    """/metrics with a refresh hook (metrics.web_root) waits for it before writing."""

    def setUp(self):
        from miltermanager import metrics as manager_metrics
        from miltermanager.greylist.metrics import registry_for

        self.counting = defer.Deferred()
        self.metrics = GreylistMetrics()
        self.metrics.greylist = self  # counts() below stands for the thread pool's
        root = manager_metrics.web_root(registry_for(self.metrics), self.metrics.refresh)
        self.page = root.children[b"metrics"]

    def counts(self):
        return self.counting

    def request(self):
        from twisted.web.server import NOT_DONE_YET
        from twisted.web.test.requesthelper import DummyRequest

        request = DummyRequest([b"metrics"])
        self.assertEqual(self.page.render(request), NOT_DONE_YET)
        return request

    def test_written_after_the_count(self):
        """Nothing is written until the count fires; then the page has the counted triplets."""
        request = self.request()
        self.assertEqual((request.written, request.finished), ([], 0))
        self.counting.callback((3, 5, 1))
        self.assertEqual(request.finished, 1)
        found = samples(b"".join(request.written).decode(), text_families)
        self.assertEqual(found[(G + "triplets", (("state", "pending"),))], 3)
        self.assertEqual(found[(G + "triplets", (("state", "passed"),))], 5)
        self.assertEqual(found[(G + "auto_whitelisted_networks", ())], 1)

    def test_scraper_gone(self):
        """A scraper that went away before the count fired gets nothing written."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        request = self.request()
        request.processingFailed(Failure(ConnectionDone()))
        self.counting.callback((3, 5, 1))
        self.assertEqual(request.written, [])

    def test_failed_count(self):
        """A failed count: the page without the gauges, the error counted, one log line."""
        events = []
        self.patch(GreylistMetrics, "log", Logger(observer=events.append))
        request = self.request()
        self.counting.errback(sqlite3.OperationalError("disk I/O error"))
        found = samples(b"".join(request.written).decode(), text_families)
        self.assertEqual(found[(G + "errors_total", (("kind", "database"),
                                                     ("operation", "count")))], 1)
        self.assertEqual([key for key in found if key[0] == G + "triplets"], [])
        self.assertEqual([event["log_format"] for event in events],
                         ["[greylist][metrics][error] cannot count the triplets: {error}"])


class OptionTests(unittest.TestCase):
    """--metrics-listen: off by default, checked like --connection-spec."""

    def parse(self, *argv):
        options = greylist_main.Options()
        options.parseOptions(list(argv))
        return options

    def test_off_by_default(self):
        """Without --metrics-listen there is no metrics endpoint."""
        self.assertIsNone(self.parse()["metrics-listen"])

    def test_value(self):
        """A connection spec is taken as given."""
        self.assertEqual(self.parse("--metrics-listen", "inet:10031@[127.0.0.1]")[
            "metrics-listen"], "inet:10031@[127.0.0.1]")

    def test_bad_spec(self):
        """A bad spec is a usage error naming the option; main() returns 2."""
        error = self.assertRaises(usage.UsageError, self.parse, "--metrics-listen", "bogus")
        self.assertIn("--metrics-listen: bad connection spec 'bogus'", str(error))
        stderr = io.StringIO()
        self.assertEqual(greylist_main.main(["--metrics-listen", "bogus"], stderr=stderr), 2)
        self.assertTrue(stderr.getvalue().startswith(
            "milter-manager-greylist: --metrics-listen: bad connection spec 'bogus'"))

    def test_same_as_milter_socket(self):
        """The milter's own spec is refused for the metrics."""
        error = self.assertRaises(usage.UsageError, self.parse, "-s", "inet:10030@[127.0.0.1]",
                                  "--metrics-listen", "inet:10030@[127.0.0.1]")
        self.assertIn("--metrics-listen: the same as --connection-spec", str(error))


def run_test_server(spec, client, *recipients):
    """One milter-test-server run from client with recipients; its status line."""
    argv = ["milter-test-server", "-s", spec, "--connect-address", client]
    for recipient in recipients:
        argv += ["-r", recipient]
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
                            text=True)
    if result.returncode:
        raise AssertionError(f"milter-test-server exited {result.returncode}: {result.stderr!r}")
    return result.stdout.splitlines()[0]


class ProcessTests(unittest.TestCase):
    """The real milter-manager-greylist with --metrics-listen, driven by milter-test-server."""

    def start(self, *options):
        self.metrics_port = free_port()
        process = GreylistProcess(os.path.abspath(self.mktemp()), 0, "--metrics-listen",
                                  f"inet:{self.metrics_port}@[127.0.0.1]", *options)
        process.start()
        self.addCleanup(process.stop)
        wait_for_port(self.metrics_port, 30, process.process)
        return process

    def scrape(self, accept=None):
        request = urllib.request.Request(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                         headers={"Accept": accept} if accept else {})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read().decode("utf-8")

    def test_counts_after_known_triplets(self):
        """New, retried, known, whitelisted, auto-whitelisted and non-IP: counts exact."""
        milter = self.start("--auto-whitelist", "2", "--whitelist", "10.0.0.0/8")
        greylisted = ("status: temporary-failure [451]<4.7.1>"
                      "(Greylisted, please try again in 0 seconds)")
        net = "inet:25@[192.0.2.10]"
        # --delay 0: a retry passes at once.
        self.assertEqual(run_test_server(milter.spec, net, "a@example.com"), greylisted)
        self.assertEqual(run_test_server(milter.spec, net, "a@example.com"), "status: pass")
        self.assertEqual(run_test_server(milter.spec, net, "a@example.com"), "status: pass")
        self.assertEqual(run_test_server(milter.spec, "inet:25@[10.1.2.3]", "a@example.com"),
                         "status: pass")
        self.assertEqual(run_test_server(milter.spec, net, "b@example.com"), greylisted)
        # b's retry is the network's second passed triplet: auto-whitelisted from now on.
        self.assertEqual(run_test_server(milter.spec, net, "b@example.com"), "status: pass")
        self.assertEqual(run_test_server(milter.spec, net, "c@example.com", "d@example.com"),
                         "status: pass")
        self.assertEqual(run_test_server(milter.spec, "unix:/run/mta.sock", "a@example.com"),
                         "status: pass")
        found = samples(self.scrape("application/openmetrics-text"))
        self.assertEqual(samples(self.scrape(), text_families), {
            key: value for key, value in found.items() if not key[0].endswith("_created")})
        self.assertEqual(decisions(found), {
            ("greylisted", "new"): 2, ("passed", "retried"): 2, ("passed", "known"): 1,
            ("passed", "whitelisted"): 1, ("passed", "auto-whitelisted"): 2,
            ("passed", "not-ip"): 1})
        self.assertEqual(found[(G + "decision_seconds_count", ())], 7)
        self.assertEqual(found[(G + "decision_seconds_bucket", (("le", "+Inf"),))], 7)
        self.assertEqual(found[(G + "triplets", (("state", "pending"),))], 0)
        self.assertEqual(found[(G + "triplets", (("state", "passed"),))], 2)
        self.assertEqual(found[(G + "auto_whitelisted_networks", ())], 1)
        self.assertEqual(found[(G + "purged_rows_total", ())], 0)
        self.assertEqual([key for key in found if key[0] == G + "errors_total"], [])

    def test_broken_database(self):
        """A dropped table: the recipient passes as an error, the triplet gauges are left out."""
        milter = self.start()
        with sqlite3.connect(milter.database) as db:
            db.execute("DROP TABLE triplets")
        self.assertEqual(run_test_server(milter.spec, "inet:25@[192.0.2.10]", "a@example.com"),
                         "status: pass")
        found = samples(self.scrape("application/openmetrics-text"))
        self.assertEqual(decisions(found), {("passed", "error"): 1})
        self.assertEqual(found[(G + "errors_total", (("kind", "database"),
                                                     ("operation", "decide")))], 1)
        self.assertEqual(found[(G + "errors_total", (("kind", "database"),
                                                     ("operation", "count")))], 1)
        self.assertEqual([key for key in found if key[0] == G + "triplets"], [])
        self.assertEqual(milter.log().count(
            "[greylist][metrics][error] cannot count the triplets: no such table: triplets"),
            1)

    def test_index_and_unknown_page(self):
        """/ lists /metrics, an unknown page is a 404: the manager's web tree."""
        self.start()
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/",
                                    timeout=10) as response:
            self.assertEqual(response.read(), b"/metrics\n")
        error = self.assertRaises(urllib.error.HTTPError, urllib.request.urlopen,
                                  f"http://127.0.0.1:{self.metrics_port}/nothing", timeout=10)
        self.assertEqual(error.code, 404)
        error.close()

    def test_port_taken(self):
        """A metrics port already in use: one clear line and exit status 1."""
        import socket
        import sys

        from tests.peers.fixtures import _repo_env

        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "miltermanager.greylist.main", "-s",
             f"inet:{free_port()}@[127.0.0.1]", "--database",
             os.path.join(os.path.abspath(self.mktemp()) + ".sqlite3"), "--quiet",
             "--metrics-listen", f"inet:{port}@[127.0.0.1]"],
            env=_repo_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=60)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr, f"milter-manager-greylist: cannot listen on "
                         f"inet:{port}@[127.0.0.1] (--metrics-listen): Couldn't listen on "
                         f"127.0.0.1:{port}: [Errno 98] Address already in use.\n")
