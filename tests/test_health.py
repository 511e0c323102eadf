"""A down child costs nothing: marked down after failures in a row, probed with back-off.

Unit tests drive miltermanager.health.ChildHealth on a task.Clock; the
integration tests run MTA sessions through the manager's factory against a
child that drops every connection, then comes back.
"""

from types import SimpleNamespace

from twisted.internet import defer, protocol, reactor, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from miltermanager import client
from miltermanager.config import Configuration, ManagerConfig, MilterConfig
from miltermanager.events import Cause, ChildFellBack, ChildHealthChanged
from miltermanager.factory import ManagerFactory
from miltermanager.health import Admission, ChildHealth
from miltermanager.merge import Status
from miltermanager.protocol import constants as c
from miltermanager.protocol.messages import CONTINUE, TEMPFAIL, Connect, Negotiate
from miltermanager.server import MilterServerFactory
from miltermanager.testing import RecordingObserver, ScriptedMilter, Script

MILTER = SimpleNamespace(name="scanner", connection_spec="inet:1@[127.0.0.1]")


def settings(**values):
    return ManagerConfig(**values)


class ChildHealthTests(unittest.TestCase):
    """Failures in a row, the back-off and the one probe, on a fake clock."""

    def setUp(self):
        self.clock = task.Clock()
        self.settings = settings()
        self.observer = RecordingObserver()
        self.health = ChildHealth(self.clock, lambda: self.settings, lambda: self.observer)

    def fail(self, times=1):
        for _ in range(times):
            self.health.failed(MILTER, "connection refused")

    def test_up_until_the_third_failure_in_a_row(self):
        """Two failures: still tried; the third marks it down; sessions then skip it."""
        self.fail(2)
        self.assertIs(self.health.admit(MILTER), Admission.CONNECT)
        self.fail()
        self.assertIs(self.health.admit(MILTER), Admission.SKIP)
        self.assertEqual(self.observer.events, [
            ChildHealthChanged("scanner", False, 3, "connection refused", 5.0)])

    def test_a_success_resets_the_count(self):
        """Two failures, a success, two failures: never three in a row, never down."""
        self.fail(2)
        self.health.succeeded(MILTER)
        self.fail(2)
        self.assertIs(self.health.admit(MILTER), Admission.CONNECT)
        self.assertEqual(self.observer.events, [])

    def test_one_probe_after_the_interval(self):
        """After 5 s one session probes; the others still skip while it does."""
        self.fail(3)
        self.clock.advance(4.9)
        self.assertIs(self.health.admit(MILTER), Admission.SKIP)
        self.clock.advance(0.1)
        self.assertIs(self.health.admit(MILTER), Admission.PROBE)
        self.assertIs(self.health.admit(MILTER), Admission.SKIP)

    def test_failed_probes_double_the_interval_up_to_the_cap(self):
        """Each failed probe doubles the wait: 5, 10, 20, 40, then 60 (the cap), 60."""
        self.fail(3)
        waits = []
        for _ in range(6):
            waited = 0.0
            while self.health.admit(MILTER) is not Admission.PROBE:
                self.clock.advance(1)
                waited += 1
            waits.append(waited)
            self.fail()
        self.assertEqual(waits, [5, 10, 20, 40, 60, 60])

    def test_successful_probe_brings_it_back_once(self):
        """A probe that works: the child is up, told once with how long it was down."""
        self.fail(3)
        self.clock.advance(5)
        self.assertIs(self.health.admit(MILTER), Admission.PROBE)
        self.health.succeeded(MILTER)
        self.assertIs(self.health.admit(MILTER), Admission.CONNECT)
        self.assertEqual(self.observer.events[1:], [
            ChildHealthChanged("scanner", True, 0, "down 5.0 s", None)])

    def test_abandoned_probe_lets_another_session_probe(self):
        """A probe whose session went away: the next session probes."""
        self.fail(3)
        self.clock.advance(5)
        self.assertIs(self.health.admit(MILTER), Admission.PROBE)
        self.health.abandoned(MILTER)
        self.assertIs(self.health.admit(MILTER), Admission.PROBE)

    def test_zero_never_marks_down(self):
        """down_after_failures = 0: a child is always tried."""
        self.settings = settings(down_after_failures=0)
        self.fail(10)
        self.assertIs(self.health.admit(MILTER), Admission.CONNECT)

    def test_another_spec_is_another_child(self):
        """A reload that points the name elsewhere starts afresh."""
        self.fail(3)
        moved = SimpleNamespace(name="scanner", connection_spec="inet:2@[127.0.0.1]")
        self.assertIs(self.health.admit(moved), Admission.CONNECT)

    def test_down_and_up_logged_once_each(self):
        """One error line when it goes down, none per failed probe above debug, one when up."""
        lines = []

        def observe(event):
            lines.append((event["log_level"], formatEvent(event)))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.fail(3)
        for _ in range(3):
            self.clock.advance(60)
            self.health.admit(MILTER)
            self.fail()
        self.clock.advance(60)
        self.health.admit(MILTER)
        self.health.succeeded(MILTER)
        loud = [(level, text) for level, text in lines if level > LogLevel.debug]
        self.assertEqual([level for level, _ in loud], [LogLevel.error, LogLevel.info])
        self.assertIn("[children][down] scanner: 3 failures in a row (last: connection refused)",
                      loud[0][1])
        self.assertIn("[children][up] scanner: reachable again after", loud[1][1])


class _Dropper(protocol.Protocol):
    """A child that accepts the connection and drops it at once (negotiation fails)."""

    def connectionMade(self):
        self.factory.accepted += 1
        self.transport.loseConnection()


OFFER = Negotiate(6, c.SMFI_CURR_ACTS, c.SMFI_CURR_PROT, {})
CONNECT = Connect(b"client.example.net", c.FAMILY_INET, 52258, b"192.0.2.10")


class DownChildTests(unittest.TestCase):
    """Sessions through the manager's factory with a child that keeps failing, then recovers."""

    timeout = 20

    def setUp(self):
        self.dropper = protocol.Factory.forProtocol(_Dropper)
        self.dropper.accepted = 0
        self.child_port = reactor.listenTCP(0, self.dropper, interface="127.0.0.1")
        self.addCleanup(self._stop_child)
        port = self.child_port.getHost().port
        self.spec = f"inet:{port}@[127.0.0.1]"
        self.clock = task.Clock()
        self.observer = RecordingObserver()
        configuration = Configuration(manager=ManagerConfig(), milters=[MilterConfig(
            name="scanner", connection_spec=self.spec,
            fallback_status=Status.TEMPORARY_FAILURE)])
        self.factory = ManagerFactory(configuration, reactor, self.clock)
        self.factory.add_observer(self.observer)
        listening = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.manager_spec = f"inet:{listening.getHost().port}@[127.0.0.1]"

    def _stop_child(self):
        return defer.maybeDeferred(self.child_port.stopListening)

    @defer.inlineCallbacks
    def session(self):
        """One MTA session: negotiate, connect; return the reply to connect."""
        mta = yield client.connect(reactor, self.manager_spec, None, task.Clock())
        try:
            yield mta.negotiate(OFFER)
            response = yield mta.send(CONNECT)
        finally:
            mta.close()
            yield mta.when_closed()
        return response.reply

    @defer.inlineCallbacks
    def test_down_child_is_not_tried(self):
        """Three failing sessions try the child; then sessions use its fallback without it."""
        for _ in range(3):
            reply = yield self.session()
            self.assertEqual(reply, TEMPFAIL)
        self.assertEqual(self.dropper.accepted, 3)
        for _ in range(5):
            reply = yield self.session()
            self.assertEqual(reply, TEMPFAIL)
        self.assertEqual(self.dropper.accepted, 3)
        causes = [event.cause for event in self.observer.of(ChildFellBack)]
        self.assertEqual(causes, [Cause.DISCONNECTED] * 3 + [Cause.DOWN] * 5)
        [down] = self.observer.of(ChildHealthChanged)
        self.assertEqual((down.child, down.up, down.failures), ("scanner", False, 3))

    @defer.inlineCallbacks
    def test_one_probe_brings_it_back(self):
        """After the back-off one session probes; a healthy child is used again at once."""
        for _ in range(3):
            yield self.session()
        yield self._stop_child()
        events = []
        healthy = MilterServerFactory(lambda server: ScriptedMilter(server, Script(), events, 1))
        self.child_port = reactor.listenTCP(int(self.spec.split(":")[1].split("@")[0]), healthy,
                                            interface="127.0.0.1")
        reply = yield self.session()
        self.assertEqual(reply, TEMPFAIL)  # still down: not probed before the interval
        self.clock.advance(5)
        reply = yield self.session()
        self.assertEqual(reply, CONTINUE)
        reply = yield self.session()
        self.assertEqual(reply, CONTINUE)
        changes = [(event.up, event.failures) for event in self.observer.of(ChildHealthChanged)]
        self.assertEqual(changes, [(False, 3), (True, 0)])
        self.assertEqual([event.name for event in events].count("connect"), 2)
