"""Tests for the manager's process: limits, users, the pid file and the cleanup process."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from miltermanager import process


class LimitTests(SynchronousTestCase):
    def test_zero_keeps_the_system_limit(self):
        """0 does not call setrlimit."""
        import resource

        calls = []
        self.patch(resource, "setrlimit", lambda *args: calls.append(args))
        process.set_max_file_descriptors(0)
        self.assertEqual(calls, [])

    def test_refused(self):
        """A limit the system refuses is a StartError naming the setting."""
        import resource

        def refuse(*args):
            raise ValueError("not allowed to raise maximum limit")

        self.patch(resource, "setrlimit", refuse)
        error = self.assertRaises(process.StartError, process.set_max_file_descriptors, 10**9)
        self.assertTrue(str(error).startswith("manager.max_file_descriptors 1000000000: "))


class IdentityTests(SynchronousTestCase):
    def test_unset(self):
        """No user and no group: nothing to switch to."""
        self.assertEqual(process.resolve_identity(None, None), (None, None, None))

    def test_user_and_group(self):
        """A user brings its uid, primary gid and name; a group overrides the gid."""
        import grp
        import pwd

        nobody = pwd.getpwnam("nobody")
        self.assertEqual(process.resolve_identity("nobody", None),
                         (nobody.pw_uid, nobody.pw_gid, "nobody"))
        root_group = grp.getgrgid(0).gr_name
        self.assertEqual(process.resolve_identity("nobody", root_group),
                         (nobody.pw_uid, 0, "nobody"))

    def test_unknown(self):
        """An unknown user or group is a StartError naming the setting."""
        error = self.assertRaises(process.StartError, process.resolve_identity,
                                  "no-such-user-here", None)
        self.assertEqual(str(error), "security.effective_user: no such user 'no-such-user-here'")
        error = self.assertRaises(process.StartError, process.resolve_identity,
                                  None, "no-such-group-here")
        self.assertEqual(str(error),
                         "security.effective_group: no such group 'no-such-group-here'")

    def test_not_root(self):
        """Not root, switching to ourselves does nothing and to anyone else is an error."""
        import pwd

        self.patch(os, "getuid", lambda: 1000)
        self.patch(os, "getgid", lambda: 1000)
        self.patch(pwd, "getpwnam", lambda name: pwd.struct_passwd(
            (name, "x", 1000 if name == "me" else 1001, 1000, "", "/", "/bin/sh")))
        self.assertFalse(process.drop_privileges("me", None))
        self.assertFalse(process.drop_privileges(None, None))
        error = self.assertRaises(process.StartError, process.drop_privileges, "other", None)
        self.assertIn("not running as root", str(error))


class PidFileTests(SynchronousTestCase):
    def setUp(self):
        self.path = os.path.abspath(self.mktemp())

    def test_written(self):
        """The pid file holds our pid and a newline, mode 0644."""
        process.write_pid_file(self.path)
        with open(self.path) as file:
            self.assertEqual(file.read(), f"{os.getpid()}\n")
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o644)

    def test_removed_if_ours(self):
        """remove_pid_file removes the file only while it holds the pid given."""
        process.write_pid_file(self.path)
        process.remove_pid_file(self.path, os.getpid() + 1)
        self.assertTrue(os.path.exists(self.path))
        process.remove_pid_file(self.path, os.getpid())
        self.assertFalse(os.path.exists(self.path))

    def test_already_gone(self):
        """A pid file gone already is no error."""
        process.remove_pid_file(self.path, os.getpid())

    def test_failure_logged(self):
        """A pid file that cannot be removed is logged, not raised."""
        process.write_pid_file(self.path)
        events = []

        def refused(path):
            raise PermissionError(13, "no")

        self.patch(os, "unlink", refused)
        process.remove_pid_file(self.path, os.getpid(),
                                Logger(namespace="test", observer=events.append))
        self.assertEqual([formatEvent(event) for event in events],
                         [f"[pid-file][remove][error] cannot remove {self.path}: no"])


class CleanerTests(SynchronousTestCase):
    """spawn_cleaner's process, forked from this one: it removes our files once we are gone."""

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="mm-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.directory)
        self.socket = os.path.join(self.directory, "m.sock")
        self.pid_file = os.path.join(self.directory, "m.pid")
        bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound.bind(self.socket)
        bound.close()
        process.write_pid_file(self.pid_file)

    def finish(self, spawned):
        """Close the pipe as our exit would, and wait for the cleanup process to end."""
        write_end, pid = spawned
        os.close(write_end)
        _, status = os.waitpid(pid, 0)
        self.assertEqual(status, 0)

    def test_nothing_to_remove(self):
        """No socket and no pid file: no process."""
        self.assertIsNone(process.spawn_cleaner(None, None))
        self.assertIsNone(process.spawn_cleaner(os.path.join(self.directory, "none"), None))

    def test_files_removed_after_exit(self):
        """The socket and pid file stay while we run and are gone once the pipe closes."""
        spawned = process.spawn_cleaner(self.socket, self.pid_file)
        self.assertTrue(os.path.exists(self.socket) and os.path.exists(self.pid_file))
        self.finish(spawned)
        self.assertFalse(os.path.exists(self.socket) or os.path.exists(self.pid_file))

    def test_newer_files_kept(self):
        """A socket replaced and a pid file rewritten by a newer manager are kept."""
        spawned = process.spawn_cleaner(self.socket, self.pid_file)
        # Moved aside, not removed: a removed file's inode number may be reused at once.
        os.rename(self.socket, self.socket + ".old")
        with open(self.socket, "w") as file:
            file.write("a newer manager's")
        with open(self.pid_file, "w") as file:
            file.write("1\n")
        self.finish(spawned)
        self.assertTrue(os.path.exists(self.socket) and os.path.exists(self.pid_file))


def _status(pid, field):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return line.split()[1:]
    return None


def wait_until(condition, timeout=20):
    """Poll condition() until it holds: for real processes, which send no events to wait on."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


class ManagerProcess:
    """Mixin: run the real `twistd -n milter-manager` on a UNIX socket in a root-owned directory."""

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
            manager = subprocess.Popen(
                [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "milter-manager", "-c", path],
                cwd=self.directory, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        self.addCleanup(lambda: manager.poll() is None and (stop_pid(manager.pid),
                                                            manager.wait()))
        try:
            wait_until(lambda: os.path.exists(self.socket) or manager.poll() is not None)
        except AssertionError:
            self.fail(self.log())
        self.assertIsNone(manager.poll(), self.log())
        return manager

    def log(self):
        with open(self.output, errors="replace") as out:
            return out.read()

    def serve_once(self):
        """One milter-test-server session through the manager's socket gets the fallback accept."""
        result = subprocess.run(["milter-test-server", "-s", f"unix:{self.socket}"],
                                capture_output=True, text=True, timeout=60)
        self.assertIn("status: accept", result.stdout, result.stdout + result.stderr + self.log())


class ManagerProcessTests(ManagerProcess, SynchronousTestCase):
    """The real manager process: privileges and the cleanup process."""

    def test_privileges_dropped_and_files_removed(self):
        """As nobody/nogroup after listening; the socket and pid file are still removed at stop."""
        if os.getuid() != 0:
            self.fail("needs root to switch users (CI runs as root)")
        manager = self.start(
            f'manager.connection_spec = "unix:{self.socket}"\n'
            f'manager.pid_file = "{self.pid_file}"\n'
            'manager.unix_socket_mode = 0o666\n'
            'security.effective_user = "nobody"\n'
            'security.effective_group = "nogroup"\n')
        wait_until(lambda: os.path.exists(self.pid_file))
        # The pid file is written as root, just before the cleanup process is
        # forked and privileges are dropped: wait for the drop.
        wait_until(lambda: _status(manager.pid, "Uid") != ["0"] * 4, timeout=5)
        self.assertEqual(_status(manager.pid, "Uid"), ["65534"] * 4)
        self.assertEqual(_status(manager.pid, "Gid"), ["65534"] * 4)
        with open(self.pid_file) as file:
            self.assertEqual(file.read(), f"{manager.pid}\n")
        self.serve_once()
        manager.send_signal(signal.SIGTERM)
        manager.wait(30)
        wait_until(lambda: not os.path.exists(self.socket) and not os.path.exists(self.pid_file))
        self.assertNotIn("Traceback", self.log())


class SettleHeapTests(SynchronousTestCase):
    """process.settle_heap: the long-lived heap frozen, and what a reload freed released."""

    def setUp(self):
        import gc

        self.addCleanup(gc.unfreeze)

    def test_freezes_what_is_alive(self):
        """After it, the objects alive then are frozen: full collections skip them."""
        import gc

        gc.unfreeze()
        self.assertEqual(gc.get_freeze_count(), 0)
        alive = [[] for _ in range(100)]
        process.settle_heap()
        self.assertGreaterEqual(gc.get_freeze_count(), len(alive))

    def test_frees_frozen_garbage_next_time(self):
        """Cyclic garbage frozen by one call (a replaced configuration) is freed by the next."""
        import gc
        import weakref

        class Node:
            pass

        node = Node()
        node.cycle = node
        gone = weakref.ref(node)
        process.settle_heap()
        del node
        gc.collect()
        self.assertIsNotNone(gone())  # frozen: a collection does not see it
        process.settle_heap()
        self.assertIsNone(gone())

    def test_twistd_service_settles_once_running_and_after_reload(self):
        """The twistd service settles the heap when the reactor runs and after a reload."""
        from twisted.internet.testing import MemoryReactorClock

        from miltermanager import config, tap

        calls = []
        self.patch(tap, "settle_heap", lambda: calls.append("settled"))
        configuration = config.default()
        config.set_value(configuration.manager, "connection_spec", "inet:10025@[127.0.0.1]")
        reactor = MemoryReactorClock()  # listens on nothing
        service = tap.TwistdService(reactor, configuration, load=lambda: configuration)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(calls, [])
        reactor.running = True
        for hook in reactor.whenRunningHooks:
            hook[0](*hook[1], **hook[2])
        self.assertEqual(calls, ["settled"])
        reload = []
        service.reload().addCallback(reload.append)
        self.assertEqual((reload, calls), ([True], ["settled", "settled"]))

    def test_twistd_service_takes_the_lean_event_loop(self):
        """The twistd service hands its reactor to twisted_internals.lean_event_loop when it starts."""
        from twisted.internet.testing import MemoryReactorClock

        from miltermanager import config, tap

        leaned = []
        self.patch(tap, "lean_event_loop", leaned.append)
        configuration = config.default()
        config.set_value(configuration.manager, "connection_spec", "inet:10025@[127.0.0.1]")
        reactor = MemoryReactorClock()
        service = tap.TwistdService(reactor, configuration, load=lambda: configuration)
        self.assertEqual(leaned, [])
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(leaned, [reactor])
