"""Tests for the running manager's process settings: pid file, limits, hooks, sockets, privileges."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase

from miltermanager import config, service
from miltermanager.config import Hook


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
    from twisted.logger import formatEvent

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
        error = self.assertRaises(service.StartError, made.privilegedStartService)
        self.assertIn("cannot write /nonexistent/dir/m.pid", str(error))
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

    def test_n_workers_said(self):
        """n_workers > 0 says that one process serves, not silently."""
        made = self.make(n_workers=4)
        events = capture(self, made)
        made.startService()
        self.assertTrue(any("several worker processes are not implemented yet" in text
                            for text in texts(events)))

    def test_signals_restored(self):
        """SIGHUP and SIGUSR1 are ours while running and given back at stop."""
        before = signal.getsignal(signal.SIGHUP)
        made = self.make()
        made.startService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), made._on_sighup)
        made.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)


class MaintenanceTests(SynchronousTestCase):
    def test_every_interval(self):
        """The maintained hooks run every maintenance_interval finished connections."""
        settings = configuration(maintenance_interval=2)
        calls = []
        settings.manager.maintained_hooks.append(
            Hook("maintained", "f", function=lambda: calls.append(1)))
        factory = service.ManagerFactory(settings, MemoryReactorClock())
        for _ in range(5):
            factory.connection_made()
            factory.connection_lost()
        self.assertEqual(len(calls), 2)

    def test_failing_hook(self):
        """A failing hook is logged and the next hook still runs."""
        settings = configuration(maintenance_interval=1)
        calls = []
        settings.manager.maintained_hooks.extend([
            Hook("maintained", "bad", function=lambda: 1 / 0),
            Hook("maintained", "good", function=lambda: calls.append(1))])
        factory = service.ManagerFactory(settings, MemoryReactorClock())
        factory.connection_made()
        factory.connection_lost()
        self.assertEqual(calls, [1])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_disabled(self):
        """maintenance_interval 0 never runs them."""
        settings = configuration(maintenance_interval=0)
        settings.manager.maintained_hooks.append(Hook("maintained", "f", function=lambda: 1 / 0))
        factory = service.ManagerFactory(settings, MemoryReactorClock())
        factory.connection_made()
        factory.connection_lost()


class DrainTests(SynchronousTestCase):
    """At stop, MTA connections in flight are waited for, within DRAIN_TIMEOUT."""

    def test_fires_when_the_last_connection_ends(self):
        """drain() waits until the last MTA connection has ended."""
        clock = MemoryReactorClock()
        factory = service.ManagerFactory(configuration(), clock)
        factory.connection_made()
        d = factory.drain(30, clock)
        self.assertNoResult(d)
        factory.connection_lost()
        self.successResultOf(d)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_nothing_open(self):
        """With no connection open, drain() fires at once."""
        clock = MemoryReactorClock()
        self.successResultOf(service.ManagerFactory(configuration(), clock).drain(30, clock))

    def test_connections_closed_after_the_timeout(self):
        """Connections still open after the timeout are closed."""
        clock = MemoryReactorClock()
        factory = service.ManagerFactory(configuration(), clock)
        connection = factory.buildProtocol(None)
        transport = StringTransport()
        connection.makeConnection(transport)
        d = factory.drain(30, clock)
        clock.advance(29)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)
        connection.connectionLost(None)
        self.successResultOf(d)


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
        self.assertNotIn(self.service.port.port, reactor.getReaders())
        yield self.connect()  # completes in the kernel's backlog
        self.assertEqual(factory.connections, 2)
        first.transport.loseConnection()
        yield self.until(lambda: len(self.made_server) == 3)
        self.assertEqual((factory.connections, len(self.lost_server)), (2, 1))
        self.assertTrue(factory.paused)


class UNIXSocketCloseTests(TestCase):
    """manager.remove_unix_socket_on_close, with the real reactor."""

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="mm-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.directory)
        self.path = os.path.join(self.directory, "s.sock")

    def start(self, **manager):
        made = service.ManagerService(
            reactor, configuration(connection_spec=f"unix:{self.path}", **manager))
        made.startService()
        return made

    @defer.inlineCallbacks
    def test_removed(self):
        """By default the socket file is removed at stop."""
        yield self.start().stopService()
        self.assertFalse(os.path.exists(self.path))

    @defer.inlineCallbacks
    def test_kept(self):
        """remove_unix_socket_on_close = False keeps the file."""
        yield self.start(remove_unix_socket_on_close=False).stopService()
        self.assertTrue(os.path.exists(self.path))

    @defer.inlineCallbacks
    def test_already_gone(self):
        """A socket file someone removed already does not break the stop."""
        made = self.start()
        os.unlink(self.path)
        yield made.stopService()
        self.assertFalse(made.factory.ports)

    @defer.inlineCallbacks
    def test_replaced_file_kept(self):
        """A file now at the path that is not our socket is not removed."""
        made = self.start()
        os.unlink(self.path)
        with open(self.path, "w") as file:
            file.write("someone else's")
        yield made.stopService()
        self.assertTrue(os.path.exists(self.path))


def _status(pid, field):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return line.split()[1:]
    return None


def _wait(condition, timeout=20):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


class ProcessTests(SynchronousTestCase):
    """The real `twistd -n milter-manager` process: privileges, the cleanup process, SIGUSR1."""

    def setUp(self):
        # A root-owned 0755 directory: only root can remove what is in it.
        self.directory = tempfile.mkdtemp(prefix="mm-", dir="/tmp")
        os.chmod(self.directory, 0o755)
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.socket = os.path.join(self.directory, "m.sock")
        self.pid_file = os.path.join(self.directory, "m.pid")
        self.output = os.path.join(self.directory, "out.log")

    def start(self, text):
        from tests.peers.fixtures import REPO, TWISTD, stop_pid

        path = os.path.join(self.directory, "milter-manager.conf")
        with open(path, "w") as file:
            file.write(text)
        env = dict(os.environ, PYTHONPATH=REPO)
        with open(self.output, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "milter-manager", "-c", path],
                cwd=self.directory, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        self.addCleanup(lambda: process.poll() is None and (stop_pid(process.pid),
                                                            process.wait()))
        try:
            _wait(lambda: os.path.exists(self.socket) or process.poll() is not None)
        except AssertionError:
            self.fail(self.log())
        self.assertIsNone(process.poll(), self.log())
        return process

    def log(self):
        with open(self.output, errors="replace") as out:
            return out.read()

    def serve_once(self):
        """One milter-test-server session through the manager's socket gets the fallback accept."""
        result = subprocess.run(["milter-test-server", "-s", f"unix:{self.socket}"],
                                capture_output=True, text=True, timeout=60)
        self.assertIn("status: accept", result.stdout, result.stdout + result.stderr + self.log())

    def test_privileges_dropped_and_files_removed(self):
        """As nobody/nogroup after listening; the socket and pid file are still removed at stop."""
        if os.getuid() != 0:
            self.fail("needs root to switch users (CI runs as root)")
        process = self.start(
            f'manager.connection_spec = "unix:{self.socket}"\n'
            f'manager.pid_file = "{self.pid_file}"\n'
            'manager.unix_socket_mode = 0o666\n'
            'security.effective_user = "nobody"\n'
            'security.effective_group = "nogroup"\n')
        _wait(lambda: os.path.exists(self.pid_file))
        # The pid file is written as root, just before the cleanup process is
        # forked and privileges are dropped: wait for the drop.
        _wait(lambda: _status(process.pid, "Uid") != ["0"] * 4, timeout=5)
        self.assertEqual(_status(process.pid, "Uid"), ["65534"] * 4)
        self.assertEqual(_status(process.pid, "Gid"), ["65534"] * 4)
        with open(self.pid_file) as file:
            self.assertEqual(file.read(), f"{process.pid}\n")
        self.serve_once()
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        _wait(lambda: not os.path.exists(self.socket) and not os.path.exists(self.pid_file))
        self.assertNotIn("Traceback", self.log())

    def test_sigusr1_reopens_log_file(self):
        """SIGUSR1 reopens log.path, so logrotate can move the file away."""
        log_path = os.path.join(self.directory, "m.log")
        process = self.start(f'manager.connection_spec = "unix:{self.socket}"\n'
                             f'log.path = "{log_path}"\nlog.use_syslog = False\n')
        _wait(lambda: os.path.exists(log_path))
        os.rename(log_path, log_path + ".1")
        process.send_signal(signal.SIGUSR1)
        _wait(lambda: os.path.exists(log_path))
        with open(log_path) as new:
            self.assertIn("[log][reopen]", new.read())
        with open(log_path + ".1") as old:
            self.assertIn("[manager][start]", old.read())
