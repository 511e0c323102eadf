"""Tests for manager.n_workers: the supervisor's rules in process, and real workers under load."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from miltermanager import config, twisted_internals, workers
from miltermanager.logs import Stream
from miltermanager.service import startup_problems
from miltermanager.tap import Options

from .peers.fixtures import (
    HOST, REPO, TWISTD, LibmilterMilter, MiltermanagerProcess, _alive, _stop_process,
)


def configuration(n_workers=2, **sections):
    """The default configuration with n_workers and section.name = value for each section=dict."""
    result = config.default()
    config.set_value(result.manager, "n_workers", n_workers)
    for section, values in sections.items():
        for name, value in values.items():
            config.set_value(getattr(result, section), name, value)
    return result


class _Transport:
    def __init__(self, pid):
        self.pid = pid
        self.signals = []

    def signalProcess(self, name):
        self.signals.append(name)


class _ProcessReactor(MemoryReactorClock):
    """A memory reactor whose spawnProcess records the worker and connects a fake transport."""

    def __init__(self):
        super().__init__()
        self.spawned = []
        self.next_pid = 100

    def spawnProcess(self, process_protocol, executable, args=(), env=None, path=None,
                     uid=None, gid=None, usePTY=False, childFDs=None):
        self.next_pid += 1
        self.spawned.append((process_protocol, args, env, childFDs))
        process_protocol.makeConnection(_Transport(self.next_pid))
        return process_protocol.transport


class SupervisorTests(SynchronousTestCase):
    """SupervisorService's restarts, back-off, signals and stop on a memory reactor."""

    def setUp(self):
        self.reactor = _ProcessReactor()
        self.supervisor = workers.SupervisorService(
            self.reactor, configuration(3), command=["python3", "-c", "worker"])
        self.supervisor.listen_fd = 7
        self.supervisor._start_all()

    def end(self, number, reason=None):
        worker = self.supervisor.workers[number]
        worker.processEnded(Failure(reason or ProcessTerminated(signal=signal.SIGKILL)))
        return worker

    def test_starts_each_worker_on_the_socket(self):
        """Each worker gets its number, the socket as fd 3 and a stdin pipe from the supervisor."""
        self.assertEqual(sorted(self.supervisor.workers), [1, 2, 3])
        numbers = [env[workers.WORKER_ENV] for _, _, env, _ in self.reactor.spawned]
        self.assertEqual(numbers, ["1", "2", "3"])
        _, _, env, fds = self.reactor.spawned[0]
        self.assertEqual(env[workers.LISTEN_FD_ENV], "3")
        self.assertEqual(fds, {0: "w", 1: 1, 2: 2, 3: 7})

    def test_restarts_a_worker_that_ran_a_while_at_once(self):
        """A worker that dies after MIN_UPTIME is replaced at once, by a new process."""
        self.reactor.advance(workers.MIN_UPTIME)
        old = self.end(2)
        new = self.supervisor.workers[2]
        self.assertIsNot(new, old)
        self.assertNotEqual(new.pid, old.pid)
        self.assertEqual(len(self.reactor.spawned), 4)

    def test_backs_off_a_worker_that_dies_at_once(self):
        """A worker dying right after its start waits 0.5 s, then 1 s, ... before restarting."""
        self.end(1)
        self.assertNotIn(1, self.supervisor.workers)
        self.reactor.advance(workers.FIRST_RESTART_DELAY)
        self.assertIn(1, self.supervisor.workers)
        self.end(1)
        self.reactor.advance(workers.FIRST_RESTART_DELAY)
        self.assertNotIn(1, self.supervisor.workers)
        self.reactor.advance(workers.FIRST_RESTART_DELAY)
        self.assertIn(1, self.supervisor.workers)

    def test_signals_reach_every_worker(self):
        """reload and reopen_logs send SIGHUP and SIGUSR1 to each worker."""
        self.supervisor.reload()
        self.supervisor.reopen_logs()
        for worker in self.supervisor.workers.values():
            self.assertEqual(worker.transport.signals, ["HUP", "USR1"])

    def test_stop_terminates_waits_and_does_not_restart(self):
        """stopService sends SIGTERM to each, fires once all exited, and restarts none."""
        stopping = self.supervisor.stopService()
        running = list(self.supervisor.workers.values())
        self.assertEqual([w.transport.signals for w in running], [["TERM"]] * 3)
        self.end(1, ProcessDone(0))
        self.end(2, ProcessDone(0))
        self.assertNoResult(stopping)
        self.end(3, ProcessDone(0))
        self.successResultOf(stopping)
        self.assertEqual(self.supervisor.workers, {})
        self.assertEqual(len(self.reactor.spawned), 3)

    def test_stop_kills_a_worker_that_hangs(self):
        """A worker still running DRAIN_TIMEOUT + STOP_GRACE after SIGTERM gets SIGKILL."""
        self.supervisor.stopService()
        worker = self.supervisor.workers[1]
        self.end(2, ProcessDone(0))
        self.end(3, ProcessDone(0))
        self.reactor.advance(workers.DRAIN_TIMEOUT + workers.STOP_GRACE)
        self.assertEqual(worker.transport.signals, ["TERM", "KILL"])


class ConfigurationTests(SynchronousTestCase):
    """What n_workers refuses, and the worker's command line."""

    def test_web_pages_refused_controller_and_metrics_not(self):
        """With n_workers the controller and /metrics alone are fine; the web pages are refused."""
        self.assertEqual(workers.problems(configuration(
            2, controller={"connection_spec": "inet:1@[127.0.0.1]"},
            web={"connection_spec": "inet:2@[127.0.0.1]", "metrics_without_login": True})), [])
        texts = [str(problem) for problem in workers.problems(configuration(
            2, web={"connection_spec": "inet:2@[127.0.0.1]", "password_file": "/x"}))]
        self.assertEqual(len(texts), 1)
        self.assertIn("web.password_file: the web pages are not available with "
                      "manager.n_workers = 2", texts[0])
        self.assertEqual(workers.problems(configuration(0, web={
            "connection_spec": "inet:2@[127.0.0.1]", "password_file": "/x"})), [])

    def test_no_warning_any_more(self):
        """n_workers alone is neither a problem nor a warning."""
        settings = configuration(4)
        self.assertEqual(startup_problems(settings), [])
        self.assertFalse([w for w in settings.warnings if "n_workers" in w])

    def test_worker_command_replays_the_options(self):
        """The worker runs twistd -n with the same configuration and overrides, never --daemon."""
        path = self.mktemp()
        with open(path, "w") as out:
            out.write("manager.n_workers = 2\n")
        options = Options()
        options.parseOptions(["--config", path, "--log-level", "all", "--daemon",
                              "--fallback-status", "reject"])
        command = workers.worker_command(options, {"nodaemon": True, "logfile": None})
        self.assertEqual(command[:5], [sys.executable, "-c", workers.TWISTD, "-n", "--pidfile="])
        plugin = command[command.index("milter-manager") + 1:]
        self.assertEqual(plugin, ["--config", os.path.abspath(path), "--fallback-status",
                                  "reject", "--log-level", "all"])
        daemon = workers.worker_command(options, {"nodaemon": False, "logfile": None})
        self.assertIn(f"--logfile={os.path.abspath('twistd.log')}", daemon)

    def test_worker_number(self):
        """Only a positive integer in MILTER_MANAGER_WORKER makes a worker."""
        self.assertEqual(workers.worker_number({workers.WORKER_ENV: "3"}), 3)
        self.assertIsNone(workers.worker_number({}))
        self.assertIsNone(workers.worker_number({workers.WORKER_ENV: "x"}))


class _Lines:
    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text += text

    def flush(self):
        pass


class AdoptTests(SynchronousTestCase):
    """A worker's adoption of the listening socket it inherited."""

    def test_blocking_socket_made_non_blocking(self):
        """An inherited blocking socket is adopted non-blocking, and the inherited fd is closed."""
        listening = socket.socket()
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(5)
        os.set_blocking(listening.fileno(), True)
        inherited = os.dup(listening.fileno())
        reactor = MemoryReactorClock()
        factory = object()
        workers.adopt_listening_socket(reactor, inherited, factory)
        self.assertFalse(os.get_blocking(listening.fileno()))  # one open file, shared
        self.assertEqual([(port[1], port[2]) for port in reactor.adoptedPorts],
                         [(socket.AF_INET, factory)])
        self.assertRaises(OSError, os.fstat, inherited)


class AdoptUNIXTests(TestCase):
    """Adopting an inherited UNIX socket on the real reactor."""

    def test_unix_socket_adopted_reading_plainly(self):
        """The port keeps the socket file at close and its connections read with recv()."""
        directory = tempfile.mkdtemp(prefix="mm-", dir="/tmp")
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "s.sock")
        listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listening.close)
        listening.bind(path)
        listening.listen(5)
        port = workers.adopt_listening_socket(reactor, os.dup(listening.fileno()),
                                              protocol.Factory.forProtocol(protocol.Protocol))
        self.assertIs(port.transport, twisted_internals._PlainReadServer)
        d = defer.maybeDeferred(port.stopListening)
        d.addCallback(lambda _: self.assertTrue(os.path.exists(path)))
        return d


class WorkerLogTests(SynchronousTestCase):
    """A worker's log lines carry its number."""

    def test_events_and_statistics_tagged(self):
        """Events and statistics lines show [worker N namespace#level]."""
        stream = _Lines()
        router = workers.WorkerLogRouter(2, Stream(stream))
        router({"log_format": "[x] hello", "log_level": LogLevel.warn,
                "log_namespace": "miltermanager.a", "log_time": 0})
        router.statistics("[session][end] one")
        lines = stream.text.splitlines()
        self.assertIn("[worker 2 miltermanager.a#warn] [x] hello", lines[0])
        self.assertIn("[worker 2 miltermanager.statistics.StatisticsObserver#info] "
                      "[session][end] one", lines[1])


# ------------------------------------------------------------------ real processes

CONFIG = """\
manager.connection_spec = "{spec}"
manager.n_workers = 4
log.level = "default"
with define_milter("child") as milter:
    milter.connection_spec = "%s"
"""
N_WORKERS = 4
_STARTED = re.compile(r"\[workers\]\[started\] worker (\d+) is pid (\d+)")
_SESSION_END = re.compile(r"\[worker (\d+) [^\]]*\] \[session\]\[end\]")


def _load(spec, n_sessions, concurrency=8):
    """Start milter-test-server --n-sessions against spec; return the Popen."""
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen(
        [sys.executable, "-m", "miltermanager.tools.test_server", "-s", spec,
         "--n-sessions", str(n_sessions), "--concurrency", str(concurrency),
         "--reading-timeout", "20"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        stdin=subprocess.DEVNULL, start_new_session=True)


def _report(process, timeout=120):
    out, _ = process.communicate(timeout=timeout)
    fields = dict(re.findall(r"^(sessions|messages): (\d+)$", out, re.M))
    errors = sum(int(n) for n in re.findall(r"^error: (\d+) ", out, re.M))
    return int(fields.get("sessions", 0)), int(fields.get("messages", 0)), errors, out


def _wait(predicate, timeout=30, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout} s")
        time.sleep(0.05)


class RealWorkers:
    """For tests with a real supervisor in self.manager: its workers, as its log tells."""

    def _stop_all(self):
        pids = list(self.pids().values())
        self.manager.stop()
        for pid in pids:  # by pid, should the supervisor have left any behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def pids(self):
        """{worker number: its latest pid} from the supervisor's log."""
        return {int(n): int(pid) for n, pid in _STARTED.findall(self.manager.log())}

    def served(self):
        """{worker number: sessions it logged as ended}."""
        counts = {}
        for number in _SESSION_END.findall(self.manager.log()):
            counts[int(number)] = counts.get(int(number), 0) + 1
        return counts


class WorkersProcessTests(RealWorkers, TestCase):
    """A real supervisor with four real workers and a real libmilter child."""

    timeout = 240

    def setUp(self):
        self.child = LibmilterMilter(self.mktemp(), "child")
        self.child.start()
        self.addCleanup(self.child.stop)
        self.manager = MiltermanagerProcess(self.mktemp(), CONFIG % self.child.spec)
        self.manager.start()
        self.addCleanup(self._stop_all)
        _wait(lambda: len(self.pids()) == N_WORKERS, what="four workers")

    def eoms(self):
        return sum(1 for event in self.child.events() if event["event"] == "eom")

    def test_workers_under_load_restart_reload_stop(self):
        """A killed worker is restarted and loses no other session; HUP and TERM reach all."""
        spec = f"inet:{self.manager.port}@{HOST}"
        before = self.pids()
        load = _load(spec, 600)
        _wait(lambda: sum(self.served().values()) >= 100, 60, "100 sessions")
        victim = 2
        os.kill(before[victim], signal.SIGKILL)
        sessions, messages, errors, out = _report(load)
        # Only the killed worker's sessions in flight (at most the concurrency) may fail.
        self.assertEqual(sessions, 600, out)
        self.assertLessEqual(600 - messages, 8, out)
        self.assertLessEqual(errors, 8, out)
        eoms = self.eoms()
        self.assertGreaterEqual(eoms, messages)
        self.assertLessEqual(eoms, 600)
        _wait(lambda: self.pids()[victim] != before[victim], 30, "the restart")
        self.assertIn(f"[workers][exit] worker {victim} (pid {before[victim]}) killed by SIGKILL",
                      self.manager.log())
        after = self.pids()
        self.assertEqual({n: p for n, p in after.items() if n != victim},
                         {n: p for n, p in before.items() if n != victim})
        # With the restarted worker: every message arrives, and every worker serves some.
        _wait(lambda: "[worker 2 miltermanager.workers.WorkerService#info] [worker][start]"
              in self.manager.log().split(f"is pid {after[victim]}")[-1], 30, "worker 2 serving")
        served, eoms = self.served(), self.eoms()
        sessions, messages, errors, out = _report(_load(spec, 400))
        self.assertEqual((sessions, messages, errors), (400, 400, 0), out)
        _wait(lambda: self.eoms() == eoms + 400, 20, "400 messages at the child")
        _wait(lambda: sum(self.served().values()) >= sum(served.values()) + 400, 20,
              "400 session ends logged")
        spread = {n: self.served().get(n, 0) - served.get(n, 0) for n in range(1, 5)}
        self.assertTrue(all(spread.values()), spread)
        # SIGHUP: every worker reloads.
        os.kill(self.manager.process.pid, signal.SIGHUP)
        reloaded = re.compile(r"\[worker (\d) [^\]]*\] \[reload\]\[success\]")
        _wait(lambda: len(set(reloaded.findall(self.manager.log()))) == N_WORKERS, 30,
              "every worker's reload")
        # SIGTERM: all workers stop and the supervisor exits as twistd does (0; newer
        # Twisted re-raises the signal).
        os.kill(self.manager.process.pid, signal.SIGTERM)
        self.assertIn(self.manager.process.wait(60), (0, -signal.SIGTERM),
                      self.manager.log()[-3000:])
        for pid in after.values():
            _wait(lambda: not _alive(pid), 10, f"worker pid {pid} gone")


class WorkersLifeTests(TestCase):
    """Two real workers without a child: the UNIX socket, and the supervisor's death."""

    timeout = 120

    def start(self, text):
        manager = MiltermanagerProcess(self.mktemp(), text)
        manager.start()
        self.addCleanup(manager.stop)
        _wait(lambda: manager.log().count("[worker][start]") == 2, 30, "two workers serving")
        pids = [int(pid) for _, pid in _STARTED.findall(manager.log())]
        self.addCleanup(lambda: [os.kill(pid, signal.SIGKILL) for pid in pids if _alive(pid)])
        return manager, pids

    def test_workers_stop_when_the_supervisor_is_killed(self):
        """SIGKILL to the supervisor: its workers notice and stop instead of serving on."""
        manager, pids = self.start('manager.connection_spec = "{spec}"\nmanager.n_workers = 2\n')
        os.kill(manager.process.pid, signal.SIGKILL)
        manager.process.wait(10)
        for pid in pids:
            _wait(lambda: not _alive(pid), 20, f"worker {pid} gone")
        self.assertEqual(manager.log().count("[worker][orphan] the supervisor is gone"), 2)

    def test_unix_socket_keeps_its_mode_and_is_removed_at_stop(self):
        """Workers serve a UNIX socket without changing its mode; it is gone after SIGTERM."""
        # A short directory: a UNIX socket's path must fit in 108 bytes.
        directory = tempfile.mkdtemp(prefix="mm-workers-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "manager.sock")
        env = dict(os.environ, PYTHONPATH=REPO)
        config_path = os.path.join(os.path.dirname(path), "unix.conf")
        with open(config_path, "w") as out:
            out.write(f'manager.connection_spec = "unix:{path}"\n'
                      'manager.unix_socket_mode = 0o660\nmanager.n_workers = 2\n')
        log_path = config_path + ".log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "milter-manager",
                 "--config", config_path], env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        self.addCleanup(_stop_process, process)

        def log_text():
            with open(log_path, encoding="utf-8", errors="replace") as log:
                return log.read()

        _wait(lambda: log_text().count("[worker][start]") == 2, 30, "two workers serving")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o660)
        load = _load(f"unix:{path}", 40, 4)
        sessions, _, errors, out = _report(load)
        self.assertEqual((sessions, errors), (40, 0), out)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o660)
        os.kill(process.pid, signal.SIGTERM)
        self.assertIn(process.wait(60), (0, -signal.SIGTERM), log_text())
        self.assertFalse(os.path.exists(path))
