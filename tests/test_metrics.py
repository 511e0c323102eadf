"""Tests for the Prometheus metrics: counting the event stream, the probes, /metrics and web.*."""

import gzip
import os
import urllib.request

from prometheus_client import generate_latest, openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.parser import text_string_to_metric_families as text_families
from twisted.internet import defer, reactor, task
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger
from twisted.trial import unittest
from twisted.web import client as web_client
from twisted.web.http_headers import Headers
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from miltermanager import config, metrics, probes, service, stages
from miltermanager.body import BodyBuffer
from miltermanager.events import (
    Cause, ChildFellBack, ChildHealthChanged, ChildReplied, ChildStopped, ISessionObserver,
    MessageEnded, SessionEnded, SessionStarted,
)
from miltermanager.factory import ManagerFactory
from miltermanager.merge import Status

P = "milter_manager_"


def samples(text, parser=text_string_to_metric_families):
    """{(sample name, ((label, value), ...)): value} of an exposition text."""
    found = {}
    for family in parser(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def openmetrics_text(registry):
    return openmetrics.exposition.generate_latest(registry).decode("utf-8")


def configuration(*milters, web=None):
    result = config.default()
    result.manager.connection_spec = "inet:0@[127.0.0.1]"
    for name in milters:
        result.milters.append(config.MilterConfig(name, "inet:1@[127.0.0.1]"))
    result.web.connection_spec = web
    result.web.metrics_without_login = True
    return result


class MetricsTests(unittest.SynchronousTestCase):
    """Metrics counts the event stream; the collector writes it for prometheus_client."""

    def setUp(self):
        self.factory = ManagerFactory(configuration("clamav", "opendkim"), MemoryReactorClock())
        self.metrics = metrics.Metrics(self.factory)
        self.registry = metrics.registry_for(self.metrics)

    def feed(self):
        """Two sessions: one message accepted after a reject at RCPT, one aborted."""
        m = self.metrics
        m.session_started(SessionStarted(1, ("clamav", "opendkim")))
        m.session_started(SessionStarted(2, ("clamav", "opendkim")))
        for elapsed in (0.0005, 0.001, 0.2):
            m.child_replied(ChildReplied(1, "clamav", stages.RCPT, None, Status.CONTINUE,
                                         Status.CONTINUE, elapsed))
        m.child_replied(ChildReplied(1, "opendkim", stages.RCPT, None, Status.REJECT,
                                     Status.REJECT, 0.003))
        m.child_stopped(ChildStopped(1, "opendkim", stages.DATA, "S25R", "check", "s25r.conf:3"))
        m.child_fell_back(ChildFellBack(1, "clamav", stages.END_OF_MESSAGE, Status.ACCEPT,
                                        Cause.TIMEOUT, "no reply in 297 s"))
        m.message_ended(MessageEnded(1, stages.END_OF_MESSAGE, Status.ACCEPT, None, False,
                                     1.5, "4Q1"))
        m.message_ended(MessageEnded(2, stages.RCPT, Status.REJECT, "opendkim", False, 0.1,
                                     None))
        m.message_ended(MessageEnded(2, stages.DATA, None, None, True, 0.1, None))
        m.session_ended(SessionEnded(1, stages.CLOSED, Status.ACCEPT, None, 1, 2.0))

    def test_observer_interface(self):
        """Metrics is an ISessionObserver."""
        verifyObject(ISessionObserver, self.metrics)

    def test_counters_exact(self):
        """Sessions, verdicts, replies, stops and fallbacks are counted with their labels."""
        self.feed()
        found = samples(openmetrics_text(self.registry))
        self.assertEqual(found[(P + "sessions_total", ())], 2)
        self.assertEqual(found[(P + "messages_total", (("verdict", "accept"),))], 1)
        self.assertEqual(found[(P + "messages_total", (("verdict", "reject"),))], 1)
        self.assertEqual(found[(P + "messages_total", (("verdict", "aborted"),))], 1)
        self.assertEqual(found[(P + "child_replies_total", (
            ("child", "clamav"), ("stage", "rcpt"), ("status", "continue")))], 3)
        self.assertEqual(found[(P + "child_replies_total", (
            ("child", "opendkim"), ("stage", "rcpt"), ("status", "reject")))], 1)
        self.assertEqual(found[(P + "child_stops_total", (
            ("child", "opendkim"), ("condition", "S25R")))], 1)
        self.assertEqual(found[(P + "child_fallbacks_total", (
            ("cause", "timeout"), ("child", "clamav"), ("stage", "end_of_message")))], 1)

    def test_latency_histogram_buckets(self):
        """A reply taking exactly a bucket's bound counts in that bucket; buckets cumulate."""
        self.feed()
        found = samples(openmetrics_text(self.registry))
        labels = (("child", "clamav"), ("stage", "rcpt"))

        def bucket(le):
            return found[(P + "child_reply_seconds_bucket", tuple(sorted((*labels, ("le", le)))))]

        self.assertEqual([bucket("0.001"), bucket("0.0025"), bucket("0.1"), bucket("0.25"),
                          bucket("+Inf")], [2, 2, 2, 3, 3])
        self.assertEqual(found[(P + "child_reply_seconds_count", labels)], 3)
        self.assertAlmostEqual(found[(P + "child_reply_seconds_sum", labels)], 0.2015)

    def test_in_flight_and_children_up_read_at_scrape(self):
        """sessions_in_flight and child_up are what the factory says when scraped."""
        self.factory.connection_made()
        for _ in range(3):  # manager.down_after_failures
            self.factory.health.failed(self.factory.configuration.milters[1], "refused")
        found = samples(openmetrics_text(self.registry))
        self.assertEqual(found[(P + "sessions_in_flight", ())], 1)
        self.assertEqual(found[(P + "child_up", (("child", "clamav"),))], 1)
        self.assertEqual(found[(P + "child_up", (("child", "opendkim"),))], 0)

    def test_health_changes(self):
        """Marking a child down and up again is counted per child and state."""
        self.metrics.child_health_changed(ChildHealthChanged("clamav", False, 3, "refused", 5.0))
        self.metrics.child_health_changed(ChildHealthChanged("clamav", True, 0, "down 5 s", None))
        found = samples(openmetrics_text(self.registry))
        self.assertEqual(found[(P + "child_health_changes_total", (
            ("child", "clamav"), ("state", "down")))], 1)
        self.assertEqual(found[(P + "child_health_changes_total", (
            ("child", "clamav"), ("state", "up")))], 1)

    def test_text_format_parses_too(self):
        """The Prometheus text format has the same counters as the OpenMetrics one."""
        self.feed()
        found = samples(generate_latest(self.registry).decode("utf-8"), text_families)
        self.assertEqual(found[(P + "sessions_total", ())], 2)
        self.assertEqual(found[(P + "messages_total", (("verdict", "reject"),))], 1)

    def test_own_registry(self):
        """The manager's metrics are not in prometheus_client's global registry."""
        from prometheus_client import REGISTRY

        self.feed()
        self.assertNotIn(P + "sessions_total", generate_latest(REGISTRY).decode("utf-8"))


class ProbeTests(unittest.TestCase):
    """Body spooling, DNSBL and LDAP lookups reach the metrics through probes."""

    def setUp(self):
        self.metrics = metrics.Metrics()
        self.metrics.start()
        self.addCleanup(self.metrics.stop)
        self.registry = metrics.registry_for(self.metrics)

    def found(self):
        return samples(openmetrics_text(self.registry))

    def test_stop_clears_the_probes(self):
        """After stop() no probe is set: the modules pay one test per report."""
        self.metrics.stop()
        self.assertEqual((probes.body_spooled, probes.dnsbl_lookup, probes.ldap_lookup,
                          probes.ldap_search), (None, None, None, None))

    def test_spooled_body_bytes(self):
        """A body that went to a temporary file counts its bytes once; one in memory does not."""
        spooled = BodyBuffer(max_memory=10)
        spooled.append(b"x" * 25)
        spooled.close()
        spooled.close()
        kept = BodyBuffer(max_memory=100)
        kept.append(b"y" * 25)
        kept.close()
        found = self.found()
        self.assertEqual(found[(P + "body_spooled_bytes_total", ())], 25)
        self.assertEqual(found[(P + "body_spooled_messages_total", ())], 1)

    def test_ldap_lookups(self):
        """A search, a lookup sharing it, a cache hit and a failed search are counted."""
        from tests.test_policy import Controlled, make_lookup

        clock = task.Clock()
        source = Controlled()
        lookup = make_lookup(source, clock)
        first = lookup.lookup("<alice@example.org>")
        lookup.lookup("<alice@example.org>")
        clock.advance(0.25)
        source.answer(0, [])
        self.successResultOf(first)
        lookup.lookup("<alice@example.org>")
        failing = lookup.lookup("<bob@example.org>")
        clock.advance(0.5)
        source.fail(1, "server down")
        self.successResultOf(failing)
        found = self.found()
        for result, count in (("hit", 1), ("shared", 1), ("miss", 2)):
            self.assertEqual(found[(P + "ldap_policy_lookups_total", (("result", result),))],
                             count, result)
        self.assertEqual(found[(P + "ldap_policy_searches_total", (("result", "ok"),))], 1)
        self.assertEqual(found[(P + "ldap_policy_searches_total", (("result", "error"),))], 1)
        self.assertEqual(found[(P + "ldap_policy_search_seconds_count", ())], 2)
        self.assertEqual(found[(P + "ldap_policy_search_seconds_sum", ())], 0.75)

    @defer.inlineCallbacks
    def test_dnsbl_lookups(self):
        """DNSBL lookups by result and source: listed by DNS, then from the cache, not listed."""
        from miltermanager.conditions.dnsbl import DNSBL
        from tests.peers.dns import TestDNSServer
        from tests.test_dnsbl import ZEN, ZONES

        server = TestDNSServer(ZONES)
        server.start()
        self.addCleanup(server.stop)
        blacklist = DNSBL([ZEN], name_servers=[server.server_address], reactor=reactor,
                          timeout=2.0)
        yield blacklist.lookup("127.0.0.2")
        yield blacklist.lookup("127.0.0.2")
        yield blacklist.lookup("192.0.2.1")
        found = self.found()
        self.assertEqual(found[(P + "dnsbl_lookups_total", (
            ("result", "listed"), ("source", "dns")))], 1)
        self.assertEqual(found[(P + "dnsbl_lookups_total", (
            ("result", "listed"), ("source", "cache")))], 1)
        self.assertEqual(found[(P + "dnsbl_lookups_total", (
            ("result", "not_listed"), ("source", "dns")))], 1)
        self.assertEqual(found[(P + "dnsbl_lookup_seconds_count", ())], 2)

    @defer.inlineCallbacks
    def test_dnsbl_timeout(self):
        """A DNSBL that never answers is counted as a timeout."""
        from miltermanager.conditions.dnsbl import DNSBL, DNSBLService
        from tests.peers.dns import TestDNSServer
        from tests.test_dnsbl import ZONES

        server = TestDNSServer(ZONES)
        server.start()
        self.addCleanup(server.stop)
        blacklist = DNSBL([DNSBLService("silent.test")], name_servers=[server.server_address],
                          reactor=reactor, timeout=0.2)
        blacklist.log = Logger(observer=lambda event: None)
        self.assertIsNone((yield blacklist.lookup("127.0.0.2")))
        self.assertEqual(self.found()[(P + "dnsbl_lookups_total", (
            ("result", "timeout"), ("source", "dns")))], 1)


class WebTests(unittest.TestCase):
    """The twisted.web tree on a loopback port, fetched with twisted.web's Agent."""

    def setUp(self):
        self.metrics = metrics.Metrics()
        self.metrics.session_started(SessionStarted(1, ()))
        self.port = reactor.listenTCP(0, Site(metrics.web_root(
            metrics.registry_for(self.metrics))), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.agent = web_client.Agent(reactor, pool=web_client.HTTPConnectionPool(reactor, False))

    @defer.inlineCallbacks
    def get(self, path, method=b"GET", **headers):
        url = f"http://127.0.0.1:{self.port.getHost().port}{path}".encode("ascii")
        response = yield self.agent.request(method, url, Headers(
            {name.replace("_", "-").encode(): [value.encode()] for name, value in headers.items()}))
        body = yield web_client.readBody(response)
        return response, body

    def header(self, response, name):
        return response.headers.getRawHeaders(name, [None])[0]

    @defer.inlineCallbacks
    def test_plain_scrape_gets_prometheus_text(self):
        """Without an Accept header the Prometheus text format is served."""
        response, body = yield self.get("/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(self.header(response, b"content-type").startswith(b"text/plain"))
        self.assertEqual(samples(body.decode(), text_families)[(P + "sessions_total", ())], 1)

    @defer.inlineCallbacks
    def test_openmetrics_when_asked(self):
        """Accept: application/openmetrics-text gets valid OpenMetrics, ending in # EOF."""
        response, body = yield self.get(
            "/metrics", accept="application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
        self.assertTrue(self.header(response, b"content-type").startswith(
            b"application/openmetrics-text"))
        self.assertTrue(body.endswith(b"# EOF\n"))
        self.assertEqual(samples(body.decode())[(P + "sessions_total", ())], 1)

    @defer.inlineCallbacks
    def test_gzip_when_accepted(self):
        """Accept-Encoding: gzip gets a gzip body."""
        response, body = yield self.get("/metrics", accept_encoding="gzip")
        self.assertEqual(self.header(response, b"content-encoding"), b"gzip")
        self.assertIn(b"milter_manager_sessions_total 1.0", gzip.decompress(body))

    @defer.inlineCallbacks
    def test_index_and_unknown_pages(self):
        """/ lists the pages; an unknown page is 404 and POST is 405, without a traceback."""
        response, body = yield self.get("/")
        self.assertEqual((response.code, body), (200, b"/metrics\n"))
        response, body = yield self.get("/nothing")
        self.assertEqual(response.code, 404)
        response, body = yield self.get("/metrics", method=b"POST")
        self.assertEqual(response.code, 405)
        self.assertNotIn(b"Traceback", body)

    @defer.inlineCallbacks
    def test_failing_collector_is_a_500_and_one_log_line(self):
        """A collector that raises gives a 500 with a short text and one logged failure."""
        def broken():
            raise RuntimeError("broken")

        self.metrics.in_flight = broken
        response, body = yield self.get("/metrics")
        self.assertEqual(response.code, 500)
        self.assertEqual(body, b"cannot write the metrics; the log says why\n")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class WebSettingTests(unittest.TestCase):
    """web.connection_spec: off by default, checked, shown and started by the service."""

    def test_off_by_default(self):
        """The default configuration has no web endpoint, and the service listens only once."""
        settings = configuration()
        self.assertIsNone(settings.web.connection_spec)
        made = service.ManagerService(MemoryReactorClock(), settings)
        made.privilegedStartService()
        self.addCleanup(made.stopService)
        self.assertEqual(len(made.reactor.tcpServers), 1)
        self.assertIsNone(made.web)

    def test_bad_spec_refused(self):
        """A bad web.connection_spec is refused with the file's line."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as file:
            file.write('web.connection_spec = "inet:x"\n')
        error = self.assertRaises(config.ConfigurationError, config.load, path, strict=False)
        self.assertEqual(str(error), f"{path}:1: web.connection_spec: bad connection spec "
                         "'inet:x': port 'x' is not a number; " + _expected())

    def test_shown_by_show_config(self):
        """dump() writes web.connection_spec with where it was set."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as file:
            file.write('web.connection_spec = "inet:10027@[127.0.0.1]"\n')
        text = config.dump(config.load(path, strict=False))
        self.assertIn(f'web.connection_spec = "inet:10027@[127.0.0.1]"  # {path}:1\n', text)

    def test_service_listens_and_observes(self):
        """With web.connection_spec the service listens on it, observes, and stops both."""
        made = service.ManagerService(MemoryReactorClock(), configuration(
            web="inet:10027@[127.0.0.1]"))
        made.privilegedStartService()
        ports = [(port, interface) for port, _, _, interface in made.reactor.tcpServers]
        self.assertEqual(ports, [(0, "127.0.0.1"), (10027, "127.0.0.1")])
        self.assertEqual(made.factory.observer.observers, [made.web.metrics])
        self.assertIsNotNone(probes.body_spooled)
        made.stopService()
        self.assertIsNone(made.factory.observer)
        self.assertIsNone(probes.body_spooled)

    def test_reload_needs_restart(self):
        """web.connection_spec is among the settings a reload says need a restart."""
        self.assertIn(("web", "connection_spec"), service.RESTART_SETTINGS)


def _expected():
    from miltermanager.connection_spec import EXPECTED

    return EXPECTED


class ManagerProcessTests(unittest.TestCase):
    """/metrics of a real manager process after known traffic from milter-test-server."""

    CONFIG = """\
manager.connection_spec = "{spec}"
web.connection_spec = "inet:%(web)d@[127.0.0.1]"
web.metrics_without_login = True
log.use_syslog = False

with define_applicable_condition("Not For Skip") as condition:
    @condition.define_envelope_from_stopper
    def skip(context, sender):
        return "skip" in sender

with define_milter("lm") as milter:
    milter.connection_spec = "%(lm)s"

with define_milter("beta") as milter:
    milter.connection_spec = "%(beta)s"
    milter.applicable_conditions = ["Not For Skip"]

with define_milter("gone") as milter:
    milter.connection_spec = "inet:%(gone)d@[127.0.0.1]"
    milter.fallback_status = "accept"
"""

    def setUp(self):
        from tests.peers.fixtures import LibmilterMilter, MiltermanagerProcess, free_port

        directory = os.path.abspath(self.mktemp())
        self.lm = LibmilterMilter(directory, "lm", "--reject-subject", "SPAM", "--no-add-header")
        self.beta = LibmilterMilter(directory, "beta", "--no-add-header")
        for child in (self.lm, self.beta):
            child.start()
            self.addCleanup(child.stop)
        self.web_port = free_port()
        self.manager = MiltermanagerProcess(directory, self.CONFIG % {
            "web": self.web_port, "lm": self.lm.spec, "beta": self.beta.spec,
            "gone": free_port()})
        self.manager.start()
        self.addCleanup(self.manager.stop)

    def send(self, *argv):
        from tests.peers.fixtures import send_with_test_server

        return send_with_test_server(self.manager.spec, *argv)

    def scrape(self, accept):
        request = urllib.request.Request(f"http://127.0.0.1:{self.web_port}/metrics",
                                         headers={"Accept": accept} if accept else {})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read().decode("utf-8")

    def test_counters_after_known_traffic(self):
        """Accepted, rejected at RCPT, rejected at EOM and stopped: the counters are exact."""
        self.assertEqual(self.send("-r", "ok@example.org"), "status: pass")
        self.assertEqual(self.send("-r", "reject@example.org").split(" [")[0], "status: reject")
        self.assertEqual(self.send("-h", "Subject:SPAM here").split(" [")[0], "status: reject")
        self.assertEqual(self.send("-f", "skip@example.com"), "status: pass")
        found = samples(self.scrape("application/openmetrics-text"))
        self.assertEqual(found, samples(self.scrape(None), text_families) | {
            key: value for key, value in found.items() if key[0].endswith("_created")})
        self.assertEqual(found[(P + "sessions_total", ())], 4)
        self.assertEqual(found[(P + "sessions_in_flight", ())], 0)
        verdicts = {dict(labels)["verdict"]: value for (name, labels), value in found.items()
                    if name == P + "messages_total"}
        # A reject at RCPT refuses that recipient: with none left the MTA aborts the message.
        self.assertEqual(verdicts, {"continue": 2, "reject": 1, "aborted": 1})
        self.assertEqual(found[(P + "child_replies_total", (
            ("child", "lm"), ("stage", "rcpt"), ("status", "reject")))], 1)
        self.assertEqual(found[(P + "child_replies_total", (
            ("child", "lm"), ("stage", "end_of_message"), ("status", "reject")))], 1)
        self.assertEqual(found[(P + "child_replies_total", (
            ("child", "lm"), ("stage", "end_of_message"), ("status", "continue")))], 2)
        self.assertEqual(found[(P + "child_replies_total", (
            ("child", "beta"), ("stage", "end_of_message"), ("status", "continue")))], 1)
        self.assertEqual(found[(P + "child_stops_total", (
            ("child", "beta"), ("condition", "Not For Skip")))], 1)
        self.assertEqual(found[(P + "child_reply_seconds_count", (
            ("child", "lm"), ("stage", "connect")))], 4)
        fallbacks = {tuple(dict(labels).values()): value for (name, labels), value
                     in found.items() if name == P + "child_fallbacks_total"}
        self.assertEqual(fallbacks, {("unreachable", "gone", "negotiate"): 3,
                                     ("down", "gone", "negotiate"): 1})
        self.assertEqual(found[(P + "child_up", (("child", "lm"),))], 1)
        self.assertEqual(found[(P + "child_up", (("child", "gone"),))], 0)
        self.assertEqual(found[(P + "child_health_changes_total", (
            ("child", "gone"), ("state", "down")))], 1)


class DashboardTests(unittest.SynchronousTestCase):
    """etc/examples/grafana-dashboard.json asks only for what the manager exposes."""

    def test_every_metric_exists(self):
        """Each milter_manager_* name in the dashboard's queries is a sample the manager or milter-manager-greylist writes."""  # noqa: E501
        import json
        import re

        from miltermanager.greylist import metrics as greylist_metrics

        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "etc", "examples", "grafana-dashboard.json")
        with open(path, encoding="utf-8") as file:
            dashboard = json.load(file)
        expressions = [target["expr"] for panel in dashboard["panels"]
                       for target in panel["targets"]]
        self.assertEqual(len(expressions), 23)
        used = {name for text in expressions for name in re.findall(r"milter_manager_\w+", text)}
        suffixes = {"counter": ("_total",), "gauge": ("",),
                    "histogram": ("_bucket", "_count", "_sum")}
        families = [*metrics.MetricsCollector(metrics.Metrics()).collect(),
                    *greylist_metrics.GreylistCollector(greylist_metrics.GreylistMetrics())
                    .collect()]
        written = {family.name + suffix for family in families
                   for suffix in suffixes[family.type]}
        self.assertEqual(sorted(used - written), [])
        self.assertIn("milter_manager_child_reply_seconds_bucket", used)
        self.assertEqual(sorted(name for name in used if "greylist" in name), [
            "milter_manager_greylist_auto_whitelisted_networks",
            "milter_manager_greylist_decision_seconds_bucket",
            "milter_manager_greylist_decisions_total",
            "milter_manager_greylist_errors_total",
            "milter_manager_greylist_purged_rows_total",
            "milter_manager_greylist_triplets"])
