"""Tests for reloading the configuration (SIGHUP): in process, and a real manager under load."""

import os
import re
import signal
import subprocess
import time

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from miltermanager import config, service
from miltermanager.config import ConfigurationError

from .peers.fixtures import (
    HOST, LibmilterMilter, MiltermanagerProcess, _listening, _stop_process, free_port,
    wait_for_port,
)


def configuration(*children, spec="inet:10025@[127.0.0.1]", **manager):
    """A configuration listening on spec with the named children (all on port 1)."""
    result = config.default()
    result.manager.connection_spec = spec
    for name, value in manager.items():
        config.set_value(result.manager, name, value)
    for name in children:
        milter = config.MilterConfig(name)
        milter.connection_spec = "inet:1@[127.0.0.1]"
        result.milters.append(milter)
    return result


class _Reactor(MemoryReactorClock):
    """A memory reactor whose listening ports record being stopped; listen_error fails listening."""

    listen_error = None

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if self.listen_error is not None:
            raise self.listen_error
        listening = super().listenTCP(port, factory, backlog, interface)
        listening.stopped = False

        def stop():
            listening.stopped = True
        listening.stopListening = stop
        return listening


class ReloadTests(SynchronousTestCase):
    """ManagerService.reload on a memory reactor."""

    def setUp(self):
        self.loads = []
        self.reactor = _Reactor()
        self.service = service.ManagerService(self.reactor, configuration("a"), load=self.load)
        self.events = []
        self.patch(self.service, "log", Logger(namespace="test", observer=self.events.append))
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def load(self):
        result = self.loads.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    def reload(self, result):
        self.loads.append(result)
        return self.successResultOf(self.service.reload())

    def texts(self):
        return [formatEvent(event) for event in self.events]

    def session_children(self):
        return [child.name for child in self.service.factory.milter_factory(None).children]

    def test_new_sessions_use_new_configuration(self):
        """After a reload new sessions get the new children; a session in flight keeps its own."""
        in_flight = self.service.factory.milter_factory(None)
        self.assertTrue(self.reload(configuration("a", "b")))
        self.assertEqual(self.session_children(), ["a", "b"])
        self.assertEqual([child.name for child in in_flight.children], ["a"])
        self.assertTrue(any(text.startswith("[reload][success] child milters: a, b")
                            for text in self.texts()))

    def test_removed_child(self):
        """A child removed by the reload is not contacted by new sessions."""
        self.reload(configuration())
        self.assertEqual(self.session_children(), [])

    def test_errors_keep_configuration(self):
        """A file with errors keeps the running configuration and logs each error."""
        running = self.service.configuration
        error = ConfigurationError("manager.chunk_size must be ...", "/etc/m.conf:3")
        self.assertFalse(self.reload(error))
        self.assertIs(self.service.configuration, running)
        self.assertIs(self.service.factory.configuration, running)
        self.assertIn("[reload][error] /etc/m.conf:3: manager.chunk_size must be ...",
                      self.texts())
        self.assertIn("[reload][error] keeping the running configuration", self.texts())

    def test_every_error_logged(self):
        """A ConfigurationError carrying several errors logs each one."""
        error = ConfigurationError("2 errors", "/etc/m.conf")
        error.errors = [ConfigurationError("x", "/etc/m.conf:1"),
                        ConfigurationError("y", "/etc/m.conf:2")]
        self.reload(error)
        self.assertIn("[reload][error] /etc/m.conf:1: x", self.texts())
        self.assertIn("[reload][error] /etc/m.conf:2: y", self.texts())

    def test_unknown_user_keeps_configuration(self):
        """A new configuration naming an unknown user is refused like a file error."""
        running = self.service.configuration
        bad = configuration("b")
        bad.security.effective_user = "no-such-user-here"
        self.assertFalse(self.reload(bad))
        self.assertIs(self.service.configuration, running)

    def test_rebind(self):
        """A new connection_spec listens on the new port, then closes the old one."""
        old = self.service.port
        self.assertTrue(self.reload(configuration("a", spec="inet:10026@[127.0.0.1]")))
        self.assertEqual([server[0] for server in self.reactor.tcpServers], [10025, 10026])
        self.assertTrue(old.stopped)
        self.assertIsNot(self.service.port, old)
        self.assertEqual(self.service.factory.ports, [self.service.port])

    def test_same_spec_not_rebound(self):
        """The same socket written another way is not listened on again."""
        self.reload(configuration("b", spec="inet:10025@127.0.0.1"))
        self.assertEqual(len(self.reactor.tcpServers), 1)

    def test_rebind_failure_keeps_everything(self):
        """A new socket that cannot be listened on keeps the old socket and configuration."""
        running, old = self.service.configuration, self.service.port
        self.reactor.listen_error = CannotListenError("127.0.0.1", 10026, "in use")
        self.assertFalse(self.reload(configuration("b", spec="inet:10026@[127.0.0.1]")))
        self.assertIs(self.service.configuration, running)
        self.assertIs(self.service.port, old)
        self.assertFalse(old.stopped)
        self.assertTrue(any(text.startswith("[reload][error] cannot listen on inet:10026")
                            for text in self.texts()))

    def test_restart_needed(self):
        """Settings read only at start say so when a reload changes them."""
        new = configuration("a")
        new.manager.pid_file = "/run/m.pid"
        self.reload(new)
        self.assertIn("[reload][restart-needed] manager.pid_file changed from None to "
                      "'/run/m.pid': it takes effect at the next start", self.texts())

    def test_max_connections_applied(self):
        """A lower max_connections applies at once to the accepting state."""
        self.service.factory.connections = 3
        self.reload(configuration("a", max_connections=2))
        self.assertTrue(self.service.factory.paused)
        self.reload(configuration("a"))
        self.assertFalse(self.service.factory.paused)

    def test_log_settings_applied(self):
        """log.level of the new configuration filters from now on."""
        self.service.start_logging(syslog_path="/nonexistent/log")
        new = configuration("a")
        new.log.level = "error"
        self.reload(new)
        self.assertEqual(self.service.log_router.levels, {"error"})

    def test_unexpected_error_keeps_configuration(self):
        """An unexpected exception while reloading is logged and keeps the running configuration."""
        running = self.service.configuration
        self.assertFalse(self.reload(RuntimeError("surprise")))
        self.assertIs(self.service.configuration, running)
        failures = [event for event in self.events if "log_failure" in event]
        self.assertEqual([formatEvent(event) for event in failures],
                         ["[reload][error] reloading failed"])
        self.assertIsInstance(failures[0]["log_failure"].value, RuntimeError)
        self.assertEqual(self.texts()[-1], "[reload][error] keeping the running configuration")

    def test_unexpected_error_after_the_swap(self):
        """An exception after the new configuration took over says that it is in use."""
        new = configuration("b")
        self.patch(self.service, "_configure_log", lambda *args: 1 / 0)
        self.assertTrue(self.reload(new))
        self.assertIs(self.service.configuration, new)
        self.assertEqual(self.texts()[-1], "[reload][error] the new configuration is in use, "
                                           "but applying it did not finish")

    def test_reload_after_an_unexpected_error(self):
        """The next reload runs normally after one failed unexpectedly."""
        self.reload(RuntimeError("surprise"))
        self.assertTrue(self.reload(configuration("b")))
        self.assertEqual(self.session_children(), ["b"])

    def test_old_port_not_closing(self):
        """A rebind whose old port fails to close still adopts the new configuration."""
        self.service.port.stopListening = lambda: defer.fail(OSError("busy"))
        self.assertTrue(self.reload(configuration("a", spec="inet:10026@[127.0.0.1]")))
        self.assertEqual(self.service.factory.ports, [self.service.port])
        self.assertIn("[reload][error] cannot close the previous listening socket", self.texts())

    def test_reloads_in_order(self):
        """Two reloads asked at once run one after the other, the last one winning."""
        self.loads.extend([configuration("b"), configuration("c")])
        first, second = self.service.reload(), self.service.reload()
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)),
                         (True, True))
        self.assertEqual(self.session_children(), ["c"])


# ---------------------------------------------------------------- a real manager


def _count(text, pattern):
    return len(re.findall(re.escape(pattern), text))


class ReloadProcessTests(SynchronousTestCase):
    """`twistd -n milter-manager` with real children, reloaded by SIGHUP."""

    def setUp(self):
        self.first = LibmilterMilter(self.mktemp(), "first", "--no-rcpt-rules")
        self.first.start()
        self.addCleanup(self.first.stop)
        self.second_port = free_port()
        self.second = subprocess.Popen(
            ["milter-test-client", "--quiet", "-s", f"inet:{self.second_port}@[{HOST}]",
             "--add-header", "X-Second:yes"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
        self.addCleanup(_stop_process, self.second)
        wait_for_port(self.second_port, 20, self.second)
        self.manager = MiltermanagerProcess(self.mktemp(), self.text(second=False))
        self.manager.start()
        self.addCleanup(self.manager.stop)

    def text(self, second, spec="{spec}", extra=""):
        """The manager's configuration: the first child, and the second if asked."""
        text = (f'manager.connection_spec = "{spec}"\nlog.use_syslog = False\n'
                f'with define_milter("first") as milter:\n'
                f'    milter.connection_spec = "{self.first.spec}"\n')
        if second:
            text += (f'with define_milter("second") as milter:\n'
                     f'    milter.connection_spec = "inet:{self.second_port}@[{HOST}]"\n')
        return self.manager._fill(text + extra) if hasattr(self, "manager") else text + extra

    def rewrite(self, text):
        # Write a new file and rename it over: the manager never reads half a file.
        temporary = self.manager.config_path + ".new"
        with open(temporary, "w") as file:
            file.write(text)
        os.rename(temporary, self.manager.config_path)

    def reload(self, text, tag="[reload][success]", timeout=20):
        """Write text, SIGHUP the manager and wait until it logs tag once more."""
        before = _count(self.manager.log(), tag)
        self.rewrite(text)
        os.kill(self.manager.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while _count(self.manager.log(), tag) <= before:
            if time.monotonic() > deadline:
                self.fail(f"no {tag} after SIGHUP; log:\n{self.manager.log()}")
            time.sleep(0.02)

    def one_session(self, port=None):
        """Run one milter-test-server session; return its output."""
        spec = f"inet:{port or self.manager.port}@[{HOST}]"
        result = subprocess.run(["milter-test-server", "-s", spec, "--output-message"],
                                capture_output=True, text=True, timeout=60)
        return result.stdout + result.stderr

    def test_reload_under_load(self):
        """SIGHUPs during 300 sessions (10 at once) lose none; later sessions see the new child."""
        load = subprocess.Popen(
            ["milter-test-server", "-s", self.manager.spec, "--n-sessions", "300",
             "--concurrency", "10"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.addCleanup(_stop_process, load)
        reloads = 0
        while load.poll() is None:
            self.reload(self.text(second=reloads % 2 == 0))
            reloads += 1
        output = load.communicate(timeout=60)[0]
        self.assertEqual(load.returncode, 0, output)
        self.assertIn("status pass: 300", output)
        self.assertNotIn("error:", output)
        self.assertGreaterEqual(reloads, 3, output)
        self.reload(self.text(second=True))
        self.assertIn("X-Second: yes", self.one_session())
        self.assertNotIn("Traceback", self.manager.log())

    def test_broken_reload_keeps_serving(self):
        """A reload whose file has errors logs each with FILE:LINE and keeps serving as before."""
        self.reload(self.text(second=True))
        self.reload(self.text(second=False, extra='manager.chunk_size = 0\n'
                                                  'log.syslog_facility = "mial"\n'
                                                  'manager.conection_spec = "inet:1"\n'),
                    tag="[reload][error] keeping the running configuration")
        log = self.manager.log()
        for line, start in ((5, "manager.chunk_size must be"),
                            (6, "log.syslog_facility must be"),
                            (7, "manager has no setting 'conection_spec'")):
            self.assertIn(f"[reload][error] {self.manager.config_path}:{line}: {start}", log)
        output = self.one_session()
        self.assertIn("status: pass", output)
        self.assertIn("X-Second: yes", output)

    def test_rebind(self):
        """A new connection_spec: the new port serves and the old port closes."""
        old_port, new_port = self.manager.port, free_port()
        self.reload(self.text(second=False, spec=f"inet:{new_port}@[{HOST}]"))
        self.assertIn("status: pass", self.one_session(new_port))
        self.assertFalse(_listening(old_port))
        self.assertIn(f"[reload][listen] listening on inet:{new_port}@[{HOST}]",
                      self.manager.log())


class StopProcessTests(SynchronousTestCase):
    """SIGTERM lets the MTA connections in flight finish their message."""

    def test_sigterm_drains_sessions_in_flight(self):
        """A session whose child is still at end of message when SIGTERM arrives completes
        with the child's verdict and edits, then the manager exits."""
        child_port = free_port()
        child = subprocess.Popen(
            ["milter-test-client", "--quiet", "-s", f"inet:{child_port}@[{HOST}]",
             "--wait", "1.5@end-of-message", "--add-header", "X-Slow:done"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
        self.addCleanup(_stop_process, child)
        wait_for_port(child_port, 20, child)
        manager = MiltermanagerProcess(self.mktemp(), (
            'manager.connection_spec = "{spec}"\nlog.use_syslog = False\n'
            'with define_milter("slow") as milter:\n'
            f'    milter.connection_spec = "inet:{child_port}@[{HOST}]"\n'))
        manager.start()
        self.addCleanup(manager.stop)
        session = subprocess.Popen(
            ["milter-test-server", "-s", manager.spec, "--output-message"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        self.addCleanup(_stop_process, session)
        time.sleep(0.7)  # the session is now waiting for the slow end of message
        os.kill(manager.process.pid, signal.SIGTERM)
        output, _ = session.communicate(timeout=30)
        self.assertTrue(output.startswith("status: pass"), output)
        self.assertIn("+ X-Slow: done", output)
        # twistd reports a stop by SIGTERM by ending with that signal (Twisted >= 17).
        self.assertIn(manager.process.wait(timeout=30), (0, -signal.SIGTERM), manager.log())
        self.assertIn("[stop][drain]", manager.log())
