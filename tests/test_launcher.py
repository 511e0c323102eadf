"""Tests for the process launcher: framing, what it agrees to run, children started on demand.

The launcher process and the manager are the real ones (a forked launcher; `twistd -n
milter-manager` started as root with privilege mode); the child is a real libmilter milter
(Debian's python3-milter) that the launcher starts as `nobody` when a session cannot reach it.
"""

import json
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import tempfile
import shutil

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from miltermanager import config, launcher
from miltermanager.client import MilterConnectError
from miltermanager.config import MilterConfig, set_value

from .peers.fixtures import DEBIAN_PYTHON, LIBMILTER_MILTER, stop_pid
from .test_process import ManagerProcess, _status, wait_until


def _alive(pid):
    """Whether pid runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False  # gone before the open, or between the open and the read (ESRCH)


def _milter(name="m1", command="run-m1", options=None, user=None, enabled=True):
    milter = MilterConfig(name=name, connection_spec="unix:/nonexistent/m1.sock")
    milter.command, milter.command_options, milter.user_name = command, options, user
    milter.enabled = enabled
    return milter


# ------------------------------------------------------------ framing and validation


class FramingTests(SynchronousTestCase):
    """JSON lines: one object per line, whatever the chunks the socket delivers."""

    def test_round_trip_across_chunks(self):
        """Lines split anywhere come out whole, in order."""
        data = launcher.encode({"id": 1, "pid": 42}) + launcher.encode({"exited": 42, "status": 3})
        buffer = launcher.LineBuffer()
        lines = []
        for start in range(0, len(data), 5):
            lines.extend(buffer.feed(data[start:start + 5]))
        self.assertEqual([launcher.decode(line) for line in lines],
                         [{"id": 1, "pid": 42}, {"exited": 42, "status": 3}])

    def test_not_an_object(self):
        """A line holding no JSON object is refused by name."""
        self.assertRaises(launcher.FramingError, launcher.decode, b"[1, 2]")
        error = self.assertRaises(launcher.FramingError, launcher.decode, b"{launch")
        self.assertIn("not JSON", str(error))

    def test_overlong_line_dropped(self):
        """A line longer than the limit is an error; the next line is read normally."""
        buffer = launcher.LineBuffer(max_line=10)
        self.assertRaises(launcher.FramingError, buffer.feed, b"x" * 11)
        self.assertEqual(buffer.feed(b'{"a":1}\n'), [b'{"a":1}'])


class RequestTests(SynchronousTestCase):
    """The launcher runs exactly what the configuration at start names, as that user."""

    table = {"m1": ["run-m1 --flag", "nobody"], "m2": ["run-m2", None]}

    def request(self, **fields):
        return {"id": 1, "launch": "m1", "command": "run-m1 --flag", "user": "nobody", **fields}

    def test_configured_command_accepted(self):
        """The configured command line and user come back as what to run."""
        self.assertEqual(launcher.check_request(self.table, self.request()),
                         ("run-m1 --flag", "nobody"))
        self.assertEqual(launcher.check_request(
            self.table, self.request(launch="m2", command="run-m2", user=None)),
            ("run-m2", None))

    def test_other_command_refused(self):
        """A command line, user or milter the configuration does not name is refused."""
        for fields in ({"command": "rm -rf /"}, {"user": None}, {"user": "root"},
                       {"launch": "m3"}, {"launch": None}):
            self.assertRaises(launcher.Refused, launcher.check_request, self.table,
                              self.request(**fields))

    def test_command_line(self):
        """command and command_options joined by a space, as upstream; a list is shell-quoted."""
        configuration = config.default()
        for name, options in (("a", None), ("b", "start"), ("c", ["start", "a b"])):
            milter = MilterConfig(name=name)
            set_value(milter, "command", "/etc/init.d/x")
            set_value(milter, "command_options", options)
            configuration.milters.append(milter)
        configuration.milters.append(MilterConfig(name="d"))
        self.assertEqual(launcher.commands(configuration), {
            "a": ["/etc/init.d/x", None], "b": ["/etc/init.d/x start", None],
            "c": ["/etc/init.d/x start 'a b'", None]})


class ConfigurationProblemsTests(SynchronousTestCase):
    """Settings that cannot work are errors, settings that do nothing are warnings."""

    def problems(self, privilege_mode, *milters):
        configuration = config.default()
        configuration.security.privilege_mode = privilege_mode
        configuration.milters.extend(milters)
        errors, warnings = launcher.configuration_problems(configuration)
        return [str(error) for error in errors], warnings

    def test_command_without_privilege_mode_warned(self):
        """A command with privilege mode off is never run: a warning says so."""
        milter = _milter()
        milter.origins["command"] = "f.conf:7"
        errors, warnings = self.problems(False, milter)
        self.assertEqual(errors, [])
        self.assertEqual(len(warnings), 1)
        self.assertTrue(warnings[0].startswith('f.conf:7: milter "m1": command is never run'),
                        warnings)

    def test_unknown_user_is_an_error(self):
        """user_name naming no user stops the start, naming the milter and the user."""
        errors, warnings = self.problems(True, _milter(user="no-such-user-here"))
        self.assertEqual(errors, ['milter "m1": user_name: no such user \'no-such-user-here\''])
        self.assertEqual(warnings, [])

    def test_options_without_command_warned(self):
        """command_options or user_name without a command do nothing: warned.

        Privilege mode then has nothing to start: warned too.
        """
        errors, warnings = self.problems(True, _milter(command=None, options="x", user="nobody"))
        self.assertEqual(errors, [])
        self.assertEqual(warnings, [
            "security.privilege_mode = True: no enabled milter has a command: nothing is "
            "ever started",
            'milter "m1": command_options has no effect without milter.command',
            'milter "m1": user_name has no effect without milter.command'])

    def test_fine(self):
        """Privilege mode with a command as an existing user, or a disabled milter: silence."""
        self.assertEqual(self.problems(True, _milter(user="nobody")), ([], []))
        self.assertEqual(self.problems(False, _milter(enabled=False)), ([], []))

    def test_startup_problems_include_them(self):
        """The manager's start-up check reports the launcher's errors and keeps its warnings."""
        from miltermanager.service import startup_problems

        configuration = config.default()
        configuration.security.privilege_mode = True
        configuration.milters.append(_milter(user="no-such-user-here"))
        configuration.milters.append(_milter(name="m2", command=None, user="nobody"))
        problems = startup_problems(configuration)
        self.assertEqual([str(problem) for problem in problems],
                         ['milter "m1": user_name: no such user \'no-such-user-here\''])
        self.assertEqual(configuration.warnings,
                         ['milter "m2": user_name has no effect without milter.command'])


class CheckConfigTests(SynchronousTestCase):
    """`--check-config` refuses what start-up refuses and prints the warnings."""

    def check(self, text):
        """(path, result) of --check-config on a file holding text."""
        from .peers.fixtures import REPO, TWISTD

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "milter-manager.conf")
        with open(path, "w") as file:
            file.write('manager.connection_spec = "inet:0@[127.0.0.1]"\n'
                       'with define_milter("m1") as milter:\n'
                       '    milter.connection_spec = "inet:1@[127.0.0.1]"\n'
                       '    milter.command = "/usr/sbin/m1"\n' + text)
        os.chmod(path, 0o644)
        return path, subprocess.run(
            [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "milter-manager", "-c", path,
             "--check-config"], capture_output=True, text=True, timeout=60, cwd=directory,
            env=dict(os.environ, PYTHONPATH=REPO))

    def test_command_without_privilege_mode_warned(self):
        """A command that will never run: --check-config passes and prints why."""
        path, result = self.check("")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(result.stderr, f'warning: {path}:4: milter "m1": command is never run: '
                         "security.privilege_mode is False (True starts it when it cannot be "
                         "reached)\n")

    def test_unknown_user_refused(self):
        """An unknown user_name: --check-config exits 1 with one line naming milter and user."""
        path, result = self.check('    milter.user_name = "no-such-user-here"\n'
                                  'security.privilege_mode = True\n')
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn(f'{path}:5: milter "m1": user_name: no such user \'no-such-user-here\'',
                      result.stderr)
        self.assertNotIn("Traceback", result.stderr)


class StartAndReloadTests(SynchronousTestCase):
    """What the service is told about the launcher at start and at reload."""

    def setUp(self):
        self.events = []
        self.patch(launcher, "log", Logger(namespace="test", observer=self.events.append))
        self.configuration = config.default()
        self.configuration.security.privilege_mode = True
        self.configuration.milters.append(_milter(command="run-m1"))

    def texts(self):
        return [formatEvent(event) for event in self.events]

    def test_not_root_said(self):
        """Privilege mode without root: no launcher, and a warning naming the children."""
        self.patch(launcher.os, "geteuid", lambda: 1000)
        self.assertIsNone(launcher.start_launcher(self.configuration, None))
        self.assertEqual(len(self.texts()), 1)
        self.assertIn("[launcher][disabled] security.privilege_mode is True but milter-manager "
                      "did not start as root: m1 will not be started", self.texts()[0])

    def test_nothing_to_start(self):
        """No command, or privilege mode off: no launcher, no word."""
        self.configuration.security.privilege_mode = False
        self.assertIsNone(launcher.start_launcher(self.configuration, None))
        self.assertEqual(self.texts(), [])

    def test_reload_with_a_new_command_needs_a_restart(self):
        """A command changed by a reload is not run: the reload says a restart is needed."""
        running = launcher.Launcher(self.configuration, None, Clock())
        new = config.default()
        new.security.privilege_mode = True
        new.milters.append(_milter(command="run-m1 --other"))
        launcher.reconfigured(running, new)
        self.assertEqual(len(self.texts()), 1)
        self.assertIn("[reload][restart-needed] milter m1", self.texts()[0])
        self.assertIn("'run-m1 --other'", self.texts()[0])
        launcher.reconfigured(running, self.configuration)
        self.assertEqual(len(self.texts()), 1)

    def test_reload_turning_privilege_mode_on_needs_a_restart(self):
        """Without a launcher from the start, a reload cannot start one: it says so."""
        launcher.reconfigured(None, self.configuration)
        self.assertIn("[reload][restart-needed] security.privilege_mode", self.texts()[0])


# ------------------------------------------------------------ the launcher process


class LauncherProcessTests(SynchronousTestCase):
    """The real launcher process, forked as the manager forks it, driven over its socket."""

    def setUp(self):
        # Reachable by nobody, unlike trial's private directories.
        self.directory = tempfile.mkdtemp(prefix="mm-launcher-", dir="/tmp")
        os.chmod(self.directory, 0o777)
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.table = {
            "sleeper": ["exec sleep 30", None],
            "fails": ["exit 3", None],
            "missing": ["/nonexistent/milter-x", None],
            "as-nobody": [f"id -u > {self.directory}/uid", "nobody"],
            "ghost": ["true", "no-such-user-here"],
        }
        self.socket, self.pid = launcher.spawn(self.table)
        self.addCleanup(self._stop)
        self.reader = self.socket.makefile("rb")
        self.started = []

    def _stop(self):
        for pid in self.started:
            if _alive(pid):
                stop_pid(pid)
        self.reader.close()
        self.socket.close()
        if _alive(self.pid):
            stop_pid(self.pid)
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass  # reaped already

    def ask(self, name, **fields):
        command, user = self.table.get(name, ["x", None])
        request = {"id": 7, "launch": name, "command": command, "user": user, **fields}
        self.socket.sendall(launcher.encode(request))
        reply = self.next()
        if "pid" in reply:
            self.started.append(reply["pid"])
        return reply

    def next(self):
        self.socket.settimeout(10)
        return json.loads(self.reader.readline())

    def test_duplicate_launch_refused(self):
        """A command still running is not started again: the reply names the running pid."""
        first = self.ask("sleeper")
        self.assertEqual(set(first), {"id", "pid"})
        self.assertTrue(_alive(first["pid"]))
        self.assertEqual(self.ask("sleeper"), {"id": 7, "running": first["pid"]})
        os.kill(first["pid"], signal.SIGTERM)
        self.assertEqual(self.next(), {"exited": first["pid"], "status": -signal.SIGTERM})
        again = self.ask("sleeper")
        self.assertNotEqual(again.get("pid"), first["pid"])

    def test_exit_statuses_reported(self):
        """A command's end is reported with its status: 3 for exit 3, 127 for not found."""
        for name, status in (("fails", 3), ("missing", 127)):
            pid = self.ask(name)["pid"]
            self.assertEqual(self.next(), {"exited": pid, "status": status})

    def test_runs_as_user_name(self):
        """user_name: setgid, initgroups, setuid to that user before the command runs."""
        if os.getuid() != 0:
            self.fail("needs root to switch users (CI runs as root)")
        pid = self.ask("as-nobody")["pid"]
        self.assertEqual(self.next(), {"exited": pid, "status": 0})
        with open(os.path.join(self.directory, "uid")) as uid:
            self.assertEqual(int(uid.read()), pwd.getpwnam("nobody").pw_uid)

    def test_refusals(self):
        """Unknown milter, changed command, unknown user, a second table, garbage: refused."""
        self.assertIn("has no command", self.ask("other")["error"])
        self.assertIn("differs", self.ask("sleeper", command="sh -c 'rm -rf /'")["error"])
        self.assertEqual(self.ask("ghost")["error"], "no such user 'no-such-user-here'")
        # The table is the first line only: a later one is a request, and not a launch.
        self.socket.sendall(launcher.encode({"commands": {"x": ["rm -rf /", None]}}))
        self.assertEqual(self.next(), {"id": None, "error": "not a launch request"})
        self.socket.sendall(b"not json\n")
        self.assertIn("not JSON", self.next()["error"])
        self.assertEqual(self.started, [])

    def test_exits_when_the_manager_goes(self):
        """End of file on its socket (the manager exited) ends the launcher; nothing lingers."""
        self.reader.close()
        self.socket.close()
        wait_until(lambda: os.waitpid(self.pid, os.WNOHANG)[0] == self.pid, timeout=10)
        self.assertFalse(_alive(self.pid))


# ------------------------------------------------------------ the manager's side


class _Sent:
    """What the manager's side writes to the launcher, kept instead of written."""

    def __init__(self):
        self.messages = []

    def send(self, message):
        self.messages.append(message)


def _refused(spec="unix:/nonexistent/m1.sock"):
    import errno

    return Failure(MilterConnectError(spec, "No such file or directory", errno.ENOENT))


class ManagerSideTests(SynchronousTestCase):
    """Launcher: one start for all the sessions failing meanwhile, retries, and giving up."""

    def setUp(self):
        self.clock = Clock()
        self.configuration = config.default()
        self.configuration.security.privilege_mode = True
        self.milter = _milter(command="run-m1")
        self.configuration.milters.append(self.milter)
        self.launcher = launcher.Launcher(self.configuration, None, self.clock)
        self.sent = self.launcher.connection = _Sent()
        self.listening = False
        self.attempts = 0

    def attempt(self):
        self.attempts += 1
        if self.listening:
            return defer.succeed("negotiated")
        return defer.fail(_refused())

    def test_one_start_for_concurrent_sessions(self):
        """Two sessions failing together ask once; both connect once the child listens."""
        first = self.launcher.connect_after_launch(self.milter, _refused(), self.attempt)
        second = self.launcher.connect_after_launch(self.milter, _refused(), self.attempt)
        self.assertEqual(self.sent.messages, [
            {"id": 1, "launch": "m1", "command": "run-m1", "user": None}])
        self.launcher.received({"id": 1, "pid": 99})
        self.clock.advance(0.05)
        self.assertNoResult(first)
        self.listening = True
        self.clock.advance(0.1)
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)),
                         ("negotiated", "negotiated"))
        # The child came up: a later failure starts it afresh.
        self.listening = False
        self.launcher.connect_after_launch(self.milter, _refused(), self.attempt)
        self.assertEqual(len(self.sent.messages), 2)

    def test_failed_command_ends_the_wait(self):
        """A non-zero exit fails every waiting session at once, naming command and status."""
        waiting = self.launcher.connect_after_launch(self.milter, _refused(), self.attempt)
        self.launcher.received({"id": 1, "pid": 99})
        self.clock.advance(0.05)
        self.launcher.received({"exited": 99, "status": 127})
        error = self.failureResultOf(waiting, launcher.LaunchError).value
        self.assertEqual(str(error), (
            "cannot connect to the milter at unix:/nonexistent/m1.sock: No such file or "
            'directory; started "run-m1" as root (pid 99): it exited with status 127 '
            "(command not found)"))
        # Until down_retry_interval passes, sessions get their own failure, no new start.
        self.clock.advance(1)
        again = self.launcher.connect_after_launch(self.milter, _refused(), self.attempt)
        self.assertTrue(str(self.failureResultOf(again, launcher.LaunchError).value).endswith(
            'No such file or directory; the start of "run-m1" as root 1 s ago did not help; '
            "the next one in 4 s"))
        self.assertEqual(len(self.sent.messages), 1)
        self.clock.advance(self.configuration.manager.down_retry_interval - 1)
        self.launcher.connect_after_launch(self.milter, _refused(), self.attempt)
        self.assertEqual(len(self.sent.messages), 2)

    def test_nothing_listens_in_time(self):
        """A command that runs but never listens: given up after STARTUP_WAIT, saying so."""
        waiting = self.launcher.connect_after_launch(self.milter, _refused(), self.attempt)
        self.launcher.received({"id": 1, "pid": 99})
        self.clock.pump([0.5] * int(launcher.STARTUP_WAIT * 2 + 2))
        error = self.failureResultOf(waiting, launcher.LaunchError).value
        self.assertIn(f"nothing listens there {launcher.STARTUP_WAIT:g} s after the start: "
                      '"run-m1" as root still runs as pid 99', str(error))
        # Retries back off to MAX_RETRY: far fewer attempts than polling every 50 ms.
        self.assertLess(self.attempts, launcher.STARTUP_WAIT / launcher.MAX_RETRY + 10)

    def test_refused_by_the_launcher(self):
        """The launcher's refusal is the session's cause, word for word."""
        waiting = self.launcher.connect_after_launch(self.milter, _refused(), self.attempt)
        self.launcher.received({"id": 1, "error": "no such user 'x'"})
        self.clock.advance(0.05)
        self.assertIn('cannot start "run-m1" as root: no such user \'x\'',
                      str(self.failureResultOf(waiting, launcher.LaunchError).value))

    def test_cancelled_session_stops_retrying(self):
        """The MTA going away cancels the wait: no more attempts for that session."""
        waiting = self.launcher.connect_after_launch(self.milter, _refused(), self.attempt)
        waiting.cancel()
        self.failureResultOf(waiting, defer.CancelledError)
        self.clock.advance(5)
        self.assertEqual(self.attempts, 0)

    def test_only_nothing_listening_is_cured(self):
        """Only refused or missing sockets start the child; privilege mode off starts nothing."""
        self.assertTrue(self.launcher.can_launch(self.milter, _refused()))
        timeout = Failure(MilterConnectError("inet:1@[127.0.0.1]", "timed out"))
        self.assertFalse(self.launcher.can_launch(self.milter, timeout))
        self.assertFalse(self.launcher.can_launch(_milter(command=None), _refused()))
        self.configuration.security.privilege_mode = False
        self.assertFalse(self.launcher.can_launch(self.milter, _refused()))


# ------------------------------------------------------------ through the real manager


class LaunchedChildTests(ManagerProcess, SynchronousTestCase):
    """`twistd -n milter-manager` as root with privilege mode starts a down child as nobody."""

    def setUp(self):
        super().setUp()
        if os.getuid() != 0:
            self.fail("needs root: the manager starts as root, then drops to nobody (as CI runs)")
        # Where the child (as nobody) makes its socket and writes its log.
        self.child_dir = os.path.join(self.directory, "child")
        os.mkdir(self.child_dir)
        nobody = pwd.getpwnam("nobody")
        os.chown(self.child_dir, nobody.pw_uid, nobody.pw_gid)
        self.child_socket = os.path.join(self.child_dir, "launched.sock")
        self.addCleanup(self._stop_children)

    def _stop_children(self):
        """Stop every command the launcher started (its log names their process groups)."""
        if not os.path.exists(self.output):
            return
        for group in re.findall(r"\[launcher\]\[started\] .* pid (\d+)", self.log()):
            self._stop_child(int(group))

    def manager(self, command, options=None, fallback="reject"):
        """Start the manager with one child, "launched", whose socket nothing listens on."""
        return self.start(
            f'manager.connection_spec = "unix:{self.socket}"\n'
            'security.privilege_mode = True\n'
            'security.effective_user = "nobody"\n'
            'security.effective_group = "nogroup"\n'
            'with define_milter("launched") as milter:\n'
            f'    milter.connection_spec = "unix:{self.child_socket}"\n'
            f'    milter.command = {command!r}\n'
            f'    milter.command_options = {options!r}\n'
            '    milter.user_name = "nobody"\n'
            f'    milter.fallback_status = "{fallback}"\n')

    def session(self):
        result = subprocess.run(["milter-test-server", "-s", f"unix:{self.socket}",
                                 "--output-message"],
                                capture_output=True, text=True, timeout=60)
        return result.stdout + result.stderr

    def launcher_pid(self):
        return int(re.search(r"\[launcher\]\[start\] process launcher running as pid (\d+)",
                             self.log()).group(1))

    def test_down_child_started_on_demand(self):
        """The first session starts the child as nobody, once, and gets its changes; the
        launcher ends with the manager."""
        options = [LIBMILTER_MILTER, "--socket", f"unix:{self.child_socket}", "--name",
                   "launched", "--log", os.path.join(self.child_dir, "events")]
        manager = self.manager(DEBIAN_PYTHON, options)
        wait_until(lambda: "[manager][start]" in self.log())
        launcher_pid = self.launcher_pid()
        self.assertEqual(_status(launcher_pid, "Uid"), ["0"] * 4)
        wait_until(lambda: _status(manager.pid, "Uid") == ["65534"] * 4, timeout=5)

        sessions = [subprocess.Popen(["milter-test-server", "-s", f"unix:{self.socket}",
                                      "--output-message"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                    for _ in range(3)]
        outputs = [session.communicate(timeout=60)[0] for session in sessions]
        started = re.findall(r"\[launcher\]\[started\] launched: .* pid (\d+)", self.log())
        self.assertEqual(len(started), 1, self.log())
        # The command's shell, leader of the command's own process group.
        group = int(started[0])
        for output in outputs:
            self.assertIn("+ X-Libmilter: launched saw", output, output + self.log())
        members = _group(group)
        self.assertEqual(len(members), 2)  # /bin/sh -c and the milter
        for pid in members:
            self.assertEqual(_status(pid, "Uid"), [str(pwd.getpwnam("nobody").pw_uid)] * 4)
        # Up now: the next session connects without starting anything.
        self.assertIn("+ X-Libmilter: launched saw", self.session())
        self.assertEqual(len(re.findall(r"\[launcher\]\[started\]", self.log())), 1)
        self.assertNotIn("[children][error]", self.log())

        manager.send_signal(signal.SIGTERM)
        manager.wait(30)
        wait_until(lambda: not _alive(launcher_pid), timeout=10)
        self.assertTrue(_group(group))  # a started child is a service: it stays
        self.assertNotIn("Traceback", self.log())
        self.assertNotIn("[launcher][error]", self.log())  # its end at stop is no news

    def test_launcher_killed_said(self):
        """The launcher process ending under the manager is one error line; sessions go on."""
        manager = self.manager("/bin/false")
        wait_until(lambda: "[manager][start]" in self.log())
        os.kill(self.launcher_pid(), signal.SIGKILL)
        wait_until(lambda: "[launcher][error]" in self.log())
        self.assertIn("the process launcher (pid", self.log())
        output = self.session()
        self.assertTrue(output.startswith("status: reject"), output)
        self.assertIn("[children][error][negotiate][reject] launched: cannot connect", self.log())
        self.assertIsNone(manager.poll())

    def _stop_child(self, group):
        if not _group(group):
            return
        os.killpg(group, signal.SIGTERM)
        # libmilter notices SIGTERM when its listener wakes: one connection wakes it.
        for pid in _group(group):
            stop_pid(pid, wake=lambda: _poke(self.child_socket))

    def check_fallback(self, command, cause):
        self.manager(command)
        wait_until(lambda: "[manager][start]" in self.log())
        before = len(self.log())
        output = self.session()
        self.assertTrue(output.startswith("status: reject"), output + self.log())
        new = self.log()[before:].splitlines()
        # One error line; the statistics lines name the child too, as every session's do.
        lines = [line for line in new if "launched" in line and "StatisticsObserver" not in line]
        self.assertEqual(len(lines), 1, "\n".join(new))
        self.assertIn("[children][error][negotiate][reject] launched: cannot connect", lines[0])
        self.assertIn(f'started "{command}" as nobody', lines[0])
        self.assertIn(cause, lines[0])
        self.assertNotIn("Traceback", self.log())

    def test_failing_command_gives_the_fallback(self):
        """A command that exits 1: the child's fallback and one log line saying so."""
        self.check_fallback("/bin/false", "it exited with status 1")

    def test_missing_command_gives_the_fallback(self):
        """A command that does not exist: the child's fallback and one line saying not found."""
        self.check_fallback("/nonexistent/milter-x", "exited with status 127 (command not found)")


def _group(group):
    """The live processes of process group group."""
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as stat:
                    fields = stat.read().rpartition(")")[2].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if fields[0] != "Z" and int(fields[2]) == group:
                members.append(int(name))
    return members


def _poke(path):
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(1)
            sock.connect(path)
    except OSError:
        pass
