"""Tests for the running manager: start and stop, pid file, limits, hooks, signals."""

import os
import signal

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from miltermanager import config, process, service
from miltermanager.config import Hook

from .test_process import ManagerProcess, wait_until


def configuration(**manager):
    """A default configuration listening on a free loopback port, with manager.* settings."""
    result = config.default()
    result.manager.connection_spec = "inet:0@[127.0.0.1]"
    for name, value in manager.items():
        config.set_value(result.manager, name, value)
    return result


def capture(test, target):
    """Collect the events target.log emits."""
    events = []
    test.patch(target, "log", Logger(namespace="test", observer=events.append))
    return events


def texts(events):
    return [formatEvent(event) for event in events]


class ServiceTests(SynchronousTestCase):
    """ManagerService on a memory reactor."""

    def make(self, settings=None, **manager):
        settings = settings or configuration(**manager)
        made = service.ManagerService(MemoryReactorClock(), settings)
        self.addCleanup(lambda: made.running and made.stopService())
        return made

    def test_pid_file(self):
        """manager.pid_file holds our pid after start and is gone after stop."""
        path = os.path.abspath(self.mktemp())
        made = self.make(pid_file=path)
        made.startService()
        with open(path) as file:
            self.assertEqual(file.read(), f"{os.getpid()}\n")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o644)
        made.stopService()
        self.assertFalse(os.path.exists(path))

    def test_pid_file_of_another_process_kept(self):
        """A pid file that names another process by now is left alone at stop."""
        path = os.path.abspath(self.mktemp())
        made = self.make(pid_file=path)
        made.startService()
        with open(path, "w") as file:
            file.write("1\n")
        made.stopService()
        self.assertTrue(os.path.exists(path))

    def test_unwritable_pid_file(self):
        """A pid file that cannot be written stops start-up with a clear error."""
        made = self.make(pid_file="/nonexistent/dir/m.pid")
        error = self.assertRaises(process.StartError, made.privilegedStartService)
        self.assertEqual(str(error), "manager.pid_file /nonexistent/dir/m.pid: "
                                     "directory /nonexistent/dir does not exist")
        self.assertIsNone(made.port)

    def test_max_file_descriptors(self):
        """manager.max_file_descriptors sets RLIMIT_NOFILE soft and hard; 0 leaves it."""
        import resource

        calls = []
        self.patch(resource, "setrlimit", lambda *args: calls.append(args))
        self.make(max_file_descriptors=0).privilegedStartService()
        self.make(max_file_descriptors=4096).privilegedStartService()
        self.assertEqual(calls, [(resource.RLIMIT_NOFILE, (4096, 4096))])

    def test_event_loop_created(self):
        """The event_loop_created hooks run once, with the reactor, when it runs."""
        settings = configuration()
        seen = []
        settings.manager.event_loop_created_hooks.append(
            Hook("event_loop_created", "f", function=seen.append))
        made = self.make(settings)
        made.startService()
        self.assertEqual(seen, [])
        for function, args, kwargs in made.reactor.whenRunningHooks:
            function(*args, **kwargs)
        self.assertEqual(seen, [made.reactor])

    def test_n_workers_alone_is_no_warning(self):
        """n_workers > 0 is served by worker processes: no warning, no problem."""
        settings = configuration(n_workers=4)
        self.assertEqual(service.startup_problems(settings), [])
        self.assertEqual(settings.warnings, [])

    def test_stop_goes_on_when_the_port_does_not_close(self):
        """A listening port failing to close is logged; the stop still drains and fires."""
        made = self.make()
        events = capture(self, made)
        made.startService()
        made.port.stopListening = lambda: defer.fail(OSError(13, "Permission denied"))
        made.factory.connection_made()
        stopping = made.stopService()
        self.assertNoResult(stopping)
        made.factory.connection_lost()
        self.assertIsNone(self.successResultOf(stopping))
        failures = [event for event in events if "log_failure" in event]
        self.assertEqual([formatEvent(event) for event in failures],
                         ["[stop][error] cannot close the listening socket"])
        self.assertIsInstance(failures[0]["log_failure"].value, OSError)

    def test_port_closed_when_the_pid_file_fails(self):
        """A pid file that cannot be written closes the port; a failing close is only logged."""
        made = self.make(pid_file="/nonexistent/dir/m.pid")
        events = capture(self, made)
        closed = []

        def refuse_to_close():
            closed.append(1)
            return defer.fail(OSError("busy"))

        def listen_tcp(port, factory, backlog=50, interface=""):
            listening = MemoryReactorClock.listenTCP(made.reactor, port, factory, backlog,
                                                     interface)
            listening.stopListening = refuse_to_close
            return listening

        made.reactor.listenTCP = listen_tcp
        self.assertRaises(process.StartError, made.privilegedStartService)
        self.assertEqual(closed, [1])
        self.assertEqual([formatEvent(event) for event in events if "log_failure" in event],
                         ["[manager][error] cannot close the listening socket"])

    def test_signals_restored(self):
        """SIGHUP and SIGUSR1 are ours while running and given back at stop."""
        before = signal.getsignal(signal.SIGHUP)
        made = self.make()
        made.startService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), made._on_sighup)
        made.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)


class _Client(protocol.Protocol):
    def connectionMade(self):
        self.factory.made.callback(self)


class MaxConnectionsTests(TestCase):
    """manager.max_connections on a real socket."""

    def setUp(self):
        self.made_server = []
        self.lost_server = []
        self.service = service.ManagerService(reactor, configuration(max_connections=2))
        factory = self.service.factory
        made, lost = factory.connection_made, factory.connection_lost
        self.waiting = []

        def connection_made(connection=None):
            made(connection)
            self.made_server.append(1)
            self._wake()

        def connection_lost(connection=None):
            lost(connection)
            self.lost_server.append(1)
            self._wake()

        factory.connection_made, factory.connection_lost = connection_made, connection_lost
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.port = self.service.port.getHost().port

    def _wake(self):
        for condition, d in list(self.waiting):
            if condition():
                self.waiting.remove((condition, d))
                d.callback(None)

    def until(self, condition):
        """A Deferred that fires once condition() holds (checked on every server event)."""
        d = defer.Deferred()
        self.waiting.append((condition, d))
        self._wake()
        return d.addTimeout(10, reactor)

    def connect(self):
        factory = protocol.Factory.forProtocol(_Client)
        factory.made = defer.Deferred()
        TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(factory)
        return factory.made.addCallback(self._track)

    def _track(self, client):
        self.addCleanup(client.transport.abortConnection)
        return client

    @defer.inlineCallbacks
    def test_stops_and_resumes_accepting(self):
        """At max_connections the port stops accepting; it resumes when one connection ends."""
        first = yield self.connect()
        yield self.connect()
        yield self.until(lambda: len(self.made_server) == 2)
        factory = self.service.factory
        self.assertTrue(factory.paused)
        self.assertNotIn(self.service.port, reactor.getReaders())
        yield self.connect()  # completes in the kernel's backlog
        self.assertEqual(factory.connections, 2)
        first.transport.loseConnection()
        yield self.until(lambda: len(self.made_server) == 3)
        self.assertEqual((factory.connections, len(self.lost_server)), (2, 1))
        self.assertTrue(factory.paused)


class ProcessTests(ManagerProcess, SynchronousTestCase):
    """The real `twistd -n milter-manager` process and its signals."""

    def test_sigusr1_reopens_log_file(self):
        """SIGUSR1 reopens log.path, so logrotate can move the file away."""
        log_path = os.path.join(self.directory, "m.log")
        manager = self.start(f'manager.connection_spec = "unix:{self.socket}"\n'
                             f'log.path = "{log_path}"\nlog.use_syslog = False\n')
        wait_until(lambda: os.path.exists(log_path))
        os.rename(log_path, log_path + ".1")
        manager.send_signal(signal.SIGUSR1)
        wait_until(lambda: os.path.exists(log_path))
        with open(log_path) as new:
            self.assertIn("[log][reopen]", new.read())
        with open(log_path + ".1") as old:
            self.assertIn("[manager][start]", old.read())
