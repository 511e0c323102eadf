"""Tests for the MTA connection factory: counting, max_connections, maintenance hooks, drain."""

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from miltermanager import config, factory
from miltermanager.config import Hook


def configuration(**manager):
    """A default configuration with manager.* settings."""
    result = config.default()
    for name, value in manager.items():
        config.set_value(result.manager, name, value)
    return result


class FakePort:
    """A listening port that records whether it accepts (reads)."""

    def __init__(self):
        self.reading = True

    def startReading(self):
        self.reading = True

    def stopReading(self):
        self.reading = False


class CountingTests(SynchronousTestCase):
    def test_processing_sessions(self):
        """processing_sessions() is the number of MTA connections open now."""
        made = factory.ManagerFactory(configuration(), MemoryReactorClock())
        first, second = made.buildProtocol(None), made.buildProtocol(None)
        first.makeConnection(StringTransport())
        second.makeConnection(StringTransport())
        self.assertEqual(made.processing_sessions(), 2)
        first.connectionLost(None)
        self.assertEqual((made.processing_sessions(), made.finished), (1, 1))


class MaxConnectionsTests(SynchronousTestCase):
    """manager.max_connections pauses and resumes the listening ports."""

    def test_pause_and_resume(self):
        """At max_connections every port stops accepting; one connection ending resumes them."""
        made = factory.ManagerFactory(configuration(max_connections=2), MemoryReactorClock())
        port = FakePort()
        made.add_port(port)
        made.connection_made()
        self.assertTrue(port.reading)
        made.connection_made()
        self.assertEqual((made.paused, port.reading), (True, False))
        made.connection_lost()
        self.assertEqual((made.paused, port.reading), (False, True))

    def test_port_added_while_paused(self):
        """A port added while paused (a rebind) does not accept either."""
        made = factory.ManagerFactory(configuration(max_connections=1), MemoryReactorClock())
        made.connection_made()
        port = FakePort()
        made.add_port(port)
        self.assertFalse(port.reading)

    def test_unlimited(self):
        """max_connections 0 never pauses."""
        made = factory.ManagerFactory(configuration(max_connections=0), MemoryReactorClock())
        port = FakePort()
        made.add_port(port)
        for _ in range(100):
            made.connection_made()
        self.assertTrue(port.reading)


class MaintenanceTests(SynchronousTestCase):
    def test_every_interval(self):
        """The maintained hooks run every maintenance_interval finished connections."""
        settings = configuration(maintenance_interval=2)
        calls = []
        settings.manager.maintained_hooks.append(
            Hook("maintained", "f", function=lambda: calls.append(1)))
        made = factory.ManagerFactory(settings, MemoryReactorClock())
        for _ in range(5):
            made.connection_made()
            made.connection_lost()
        self.assertEqual(len(calls), 2)

    def test_failing_hook(self):
        """A failing hook is logged and the next hook still runs."""
        settings = configuration(maintenance_interval=1)
        calls = []
        settings.manager.maintained_hooks.extend([
            Hook("maintained", "bad", function=lambda: 1 / 0),
            Hook("maintained", "good", function=lambda: calls.append(1))])
        made = factory.ManagerFactory(settings, MemoryReactorClock())
        made.connection_made()
        made.connection_lost()
        self.assertEqual(calls, [1])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_disabled(self):
        """maintenance_interval 0 never runs them."""
        settings = configuration(maintenance_interval=0)
        settings.manager.maintained_hooks.append(Hook("maintained", "f", function=lambda: 1 / 0))
        made = factory.ManagerFactory(settings, MemoryReactorClock())
        made.connection_made()
        made.connection_lost()


class DrainTests(SynchronousTestCase):
    """At stop, MTA connections in flight are waited for, within a timeout."""

    def test_fires_when_the_last_connection_ends(self):
        """drain() waits until the last MTA connection has ended."""
        clock = MemoryReactorClock()
        made = factory.ManagerFactory(configuration(), clock)
        made.connection_made()
        d = made.drain(30, clock)
        self.assertNoResult(d)
        made.connection_lost()
        self.successResultOf(d)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_nothing_open(self):
        """With no connection open, drain() fires at once."""
        clock = MemoryReactorClock()
        self.successResultOf(factory.ManagerFactory(configuration(), clock).drain(30, clock))

    def test_connections_closed_after_the_timeout(self):
        """Connections still open after the timeout are closed."""
        clock = MemoryReactorClock()
        made = factory.ManagerFactory(configuration(), clock)
        connection = made.buildProtocol(None)
        transport = StringTransport()
        connection.makeConnection(transport)
        d = made.drain(30, clock)
        clock.advance(29)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)
        connection.connectionLost(None)
        self.successResultOf(d)
