"""Start-up failures through the real twistd: one line on stderr, exit 1, --check-config agrees.

Each case runs `twistd -n milter-manager -c FILE` and `... --check-config` in real
processes: the start prints exactly one line, "milter-manager: " and the line
--check-config prints for the same cause, on standard error, exits 1, prints no usage
text and leaves no file behind. The cases that need a non-root process (switching
user, a file only root may read or write in) run as nobody when the tests run as root,
with Debian's /usr/bin/python3 (pyenv's interpreter lives under /root, which nobody
cannot enter); otherwise as the user running the tests.

Also twistd's pid file: none by default in the foreground, so two instances from the
same directory both run and nothing is written to it.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from miltermanager import config

from .peers.fixtures import (
    DEBIAN_PYTHON, HOST, REPO, TWISTD, _stop_process, free_port, wait_for_port,
)

AS_ROOT = os.getuid() == 0


def twistd(arguments, cwd, daemon=False, as_nobody=False):
    """Start `twistd [-n] milter-manager ARGUMENTS` in cwd; return the Popen (text pipes)."""
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop(config.DIRECTORY_VARIABLE, None)
    python, user = sys.executable, {}
    if as_nobody and AS_ROOT:
        python, user = DEBIAN_PYTHON, {"user": "nobody", "group": "nogroup", "extra_groups": []}
    return subprocess.Popen(
        [python, "-c", TWISTD, *([] if daemon else ["-n"]), "milter-manager", *arguments],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True, **user)


def finish(process, timeout=60):
    """Wait for process; return (exit status, stdout, stderr). Killed by PID if it hangs."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_process(process)
        raise
    return process.returncode, out, err


class StartupErrorTests(SynchronousTestCase):
    """Each failure to start: one line naming the setting and the cause, like --check-config."""

    def setUp(self):
        # A short path (UNIX socket paths hold 107 bytes) that nobody can enter.
        self.dir = tempfile.mkdtemp(prefix="mm-start-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.dir, True)
        os.chmod(self.dir, 0o755)
        self.spec = f"inet:{free_port()}@[{HOST}]"

    def write(self, text, name="milter-manager.conf", mode=0o644):
        """A configuration file in self.dir listening on a free port unless text says else."""
        path = os.path.join(self.dir, name)
        with open(path, "w") as file:
            file.write(f'manager.connection_spec = "{self.spec}"\n{text}')
        os.chmod(path, mode)
        return path

    def refused(self, text=None, arguments=(), path=None, daemon=False, as_nobody=False):
        """Start and --check-config on the same configuration; both must refuse it.

        Returns the one line --check-config prints, after checking that the
        start printed exactly "milter-manager: " and that line, nothing on
        standard output (no usage text, no log), and left self.dir as it was.
        """
        if path is None:
            path = self.write(text)
        before = sorted(os.listdir(self.dir))
        arguments = ["-c", path, *arguments]
        starting = twistd(arguments, self.dir, daemon=daemon, as_nobody=as_nobody)
        checking = twistd([*arguments, "--check-config"], self.dir, as_nobody=as_nobody)
        start, check = finish(starting), finish(checking)
        self.assertEqual(check[:2], (1, ""), check)
        [line] = check[2].splitlines() or [""]
        self.assertEqual(start, (1, "", f"milter-manager: {line}\n"))
        self.assertEqual(sorted(os.listdir(self.dir)), before)
        return line

    def test_address_in_use(self):
        """An address another process listens on, in the foreground and daemonized."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind((HOST, 0))
        taken.listen()
        self.spec = f"inet:{taken.getsockname()[1]}@[{HOST}]"
        path = self.write("")
        for daemon in (False, True):
            self.assertEqual(self.refused(path=path, daemon=daemon),
                             f"{path}:1: manager.connection_spec {self.spec}: "
                             "address already in use")

    def test_socket_directory_missing(self):
        """A UNIX socket in a directory that does not exist."""
        missing = os.path.join(self.dir, "missing")
        self.spec = f"unix:{missing}/m.sock"
        self.assertEqual(self.refused(""), f"{self.dir}/milter-manager.conf:1: "
                                           f"manager.connection_spec {self.spec}: directory "
                                           f"{missing} does not exist")

    def test_live_socket(self):
        """A UNIX socket another process listens on is neither removed nor taken over."""
        socket_path = os.path.join(self.dir, "m.sock")
        live = socket.socket(socket.AF_UNIX)
        self.addCleanup(live.close)
        live.bind(socket_path)
        live.listen()
        self.spec = f"unix:{socket_path}"
        self.assertTrue(self.refused("").endswith(
            f"manager.connection_spec {self.spec}: another process is listening on this socket"))
        self.assertTrue(os.path.exists(socket_path))

    def test_file_in_the_way(self):
        """A file that is no socket where the socket goes is kept, and the address is in use."""
        socket_path = os.path.join(self.dir, "m.sock")
        with open(socket_path, "w") as file:
            file.write("precious")
        self.spec = f"unix:{socket_path}"
        self.assertTrue(self.refused("").endswith(
            f"manager.connection_spec {self.spec}: address already in use"))
        with open(socket_path) as file:
            self.assertEqual(file.read(), "precious")

    def test_unknown_user_and_group(self):
        """security.effective_user, effective_group and manager.unix_socket_group name nobody."""
        for setting, kind in (("security.effective_user", "user"),
                              ("security.effective_group", "group"),
                              ("manager.unix_socket_group", "group")):
            path = self.write(f'{setting} = "no-such-{kind}-mm"\n')
            self.assertEqual(self.refused(path=path),
                             f"{path}:2: {setting}: no such {kind} 'no-such-{kind}-mm'")

    def test_not_root(self):
        """Asked to switch to another user without being root."""
        user = "root" if AS_ROOT else "nobody"
        path = self.write(f'security.effective_user = "{user}"\n')
        self.assertEqual(self.refused(path=path, as_nobody=True),
                         f"{path}:2: security.effective_user '{user}': cannot switch to it: "
                         "not running as root")

    def test_unreadable_configuration(self):
        """A configuration file we may not read."""
        path = self.write("", mode=0o600 if AS_ROOT else 0o000)
        self.assertEqual(self.refused(path=path, as_nobody=True),
                         f"cannot read {path}: Permission denied")

    def test_untrusted_configuration(self):
        """A configuration file others may change (it runs as code, as root)."""
        path = self.write("", mode=0o666)
        self.assertEqual(self.refused(path=path),
                         f"{path}: refusing to load: mode 0666 lets others change code "
                         "that runs as root")

    def test_pid_file_directory(self):
        """manager.pid_file in a directory that does not exist, or that we may not write."""
        missing = os.path.join(self.dir, "missing")
        path = self.write(f'manager.pid_file = "{missing}/m.pid"\n')
        self.assertEqual(self.refused(path=path), f"{path}:2: manager.pid_file {missing}/m.pid: "
                                                  f"directory {missing} does not exist")
        closed = os.path.join(self.dir, "closed")
        os.mkdir(closed, 0o555)
        path = self.write(f'manager.pid_file = "{closed}/m.pid"\n')
        self.assertEqual(self.refused(path=path, as_nobody=True),
                         f"{path}:2: manager.pid_file {closed}/m.pid: "
                         f"directory {closed} is not writable")

    def test_twistd_pid_file_directory(self):
        """twistd's own --pidfile in a directory that does not exist."""
        missing = os.path.join(self.dir, "missing")
        env = dict(os.environ, PYTHONPATH=REPO)
        env.pop(config.DIRECTORY_VARIABLE, None)
        result = subprocess.run(
            [sys.executable, "-c", TWISTD, "-n", f"--pidfile={missing}/t.pid", "milter-manager",
             "-c", self.write("")],
            cwd=self.dir, env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual((result.returncode, result.stdout, result.stderr), (
            1, "", f"milter-manager: --pidfile {missing}/t.pid: directory {missing} "
                   "does not exist\n"))

    def test_log_file(self):
        """log.path in a directory that does not exist."""
        missing = os.path.join(self.dir, "missing")
        path = self.write(f'log.path = "{missing}/m.log"\n')
        self.assertEqual(self.refused(path=path), f"{path}:2: log.path {missing}/m.log: "
                                                  f"directory {missing} does not exist")

    def test_max_file_descriptors(self):
        """manager.max_file_descriptors above what the system allows this process."""
        with open("/proc/sys/fs/nr_open") as file:
            most = int(file.read())
        path = self.write(f"manager.max_file_descriptors = {most + 1}\n")
        line = self.refused(path=path)
        self.assertTrue(line.startswith(f"{path}:2: manager.max_file_descriptors {most + 1}: "
                                        "above "), line)

    def test_every_problem_at_once(self):
        """Several problems: each on its own line, in the start and in --check-config alike."""
        missing = os.path.join(self.dir, "missing")
        path = self.write(f'security.effective_user = "no-such-user-mm"\n'
                          f'manager.pid_file = "{missing}/m.pid"\n')
        starting = twistd(["-c", path], self.dir)
        checking = twistd(["-c", path, "--check-config"], self.dir)
        start, check = finish(starting), finish(checking)
        expected = [f"{path}:2: security.effective_user: no such user 'no-such-user-mm'",
                    f"{path}:3: manager.pid_file {missing}/m.pid: directory {missing} "
                    "does not exist"]
        self.assertEqual(check, (1, "", "".join(f"{line}\n" for line in expected)))
        self.assertEqual(start, (1, "", "".join(f"milter-manager: {line}\n"
                                                for line in expected)))

    def test_usage_error_keeps_usage_text(self):
        """An unknown option is a usage error: twistd prints the usage text, and starts nothing."""
        code, out, err = finish(twistd(["--no-such-option"], self.dir))
        self.assertIn("Usage:", out)
        self.assertIn("option --no-such-option not recognized", out)
        self.assertEqual(os.listdir(self.dir), [])


class CheckConfigTests(SynchronousTestCase):
    """--check-config's warnings, --strict, and --check-reload."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="mm-check-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def test_warnings(self):
        """A setting without effect: "warning: FILE:LINE: ..." and exit 0; with --strict, exit 1."""
        path = os.path.join(self.dir, "milter-manager.conf")
        with open(path, "w") as file:
            file.write(f'manager.connection_spec = "inet:{free_port()}@[{HOST}]"\n'
                       'manager.event_loop_backend = "glib"\n')
        code, out, err = finish(twistd(["-c", path, "--check-config"], self.dir))
        self.assertEqual((code, out), (0, f"configuration OK: {path}\n"))
        [warning] = err.splitlines()
        self.assertTrue(warning.startswith(f"warning: {path}:2: manager.event_loop_backend = "
                                           "'glib': "), warning)
        code, out, err = finish(twistd(["-c", path, "--check-config", "--strict"], self.dir))
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, f"{warning[len('warning: '):]} (an error with --strict)\n")

    def test_n_workers_checks(self):
        """n_workers with a controller and /metrics checks clean; the web pages are refused."""
        path = os.path.join(self.dir, "milter-manager.conf")
        users = os.path.join(self.dir, "users")
        open(users, "w").close()
        with open(path, "w") as file:
            file.write(f'manager.connection_spec = "inet:{free_port()}@[{HOST}]"\n'
                       'manager.n_workers = 2\n'
                       f'controller.connection_spec = "inet:{free_port()}@[{HOST}]"\n'
                       f'web.connection_spec = "inet:{free_port()}@[{HOST}]"\n'
                       'web.metrics_without_login = True\n')
        code, out, err = finish(twistd(["-c", path, "--check-config"], self.dir))
        self.assertEqual((code, out, err), (0, f"configuration OK: {path}\n", ""))
        with open(path, "a") as file:
            file.write(f'web.password_file = "{users}"\n')
        code, out, err = finish(twistd(["-c", path, "--check-config"], self.dir))
        self.assertEqual((code, out), (1, ""))
        self.assertIn(f"{path}:6: web.password_file: the web pages are not available with "
                      "manager.n_workers = 2", err)
        self.assertEqual(len(err.splitlines()), 1, err)

    def test_check_reload(self):
        """--check-reload and --show-config pass the address a running manager holds.

        --check-config does not: it is the check before a start.
        """
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind((HOST, 0))
        taken.listen()
        path = os.path.join(self.dir, "milter-manager.conf")
        with open(path, "w") as file:
            file.write(f'manager.connection_spec = "inet:{taken.getsockname()[1]}@[{HOST}]"\n')
        self.assertEqual(finish(twistd(["-c", path, "--check-reload"], self.dir)),
                         (0, f"configuration OK: {path}\n", ""))
        self.assertEqual(finish(twistd(["-c", path, "--check-config"], self.dir))[0], 1)
        code, out, err = finish(twistd(["-c", path, "--show-config"], self.dir))
        self.assertEqual((code, err), (0, ""))
        self.assertIn(f"manager.connection_spec = \"inet:{taken.getsockname()[1]}", out)
        with open(path, "a") as file:
            file.write('security.effective_user = "no-such-user-mm"\n')
        self.assertEqual(finish(twistd(["-c", path, "--check-reload"], self.dir)), (
            1, "", f"{path}:2: security.effective_user: no such user 'no-such-user-mm'\n"))


class PidFileTests(SynchronousTestCase):
    """twistd's pid file: only where asked, never ./twistd.pid by default."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="mm-pid-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ports = set()

    def config(self):
        """An empty configuration file, outside self.dir."""
        directory = tempfile.mkdtemp(prefix="mm-conf-", dir="/tmp")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "milter-manager.conf")
        open(path, "w").close()
        return path

    def run_manager(self, *twistd_options):
        """`twistd -n [twistd_options] milter-manager` in self.dir on a free port, until stopped.

        Each on a port of its own: free_port may give the same port twice.
        """
        port = free_port()
        while port in self.ports:
            port = free_port()
        self.ports.add(port)
        env = dict(os.environ, PYTHONPATH=REPO)
        env.pop(config.DIRECTORY_VARIABLE, None)
        process = subprocess.Popen(
            [sys.executable, "-c", TWISTD, "-n", *twistd_options, "milter-manager",
             "-s", f"inet:{port}@[{HOST}]", "-c", self.config()],
            cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        self.addCleanup(_stop_process, process)
        wait_for_port(port, 30, process)
        return process

    def test_two_instances_in_one_directory(self):
        """Two foreground managers started from one directory both run; it stays empty."""
        first = self.run_manager()
        second = self.run_manager()
        self.assertEqual((first.poll(), second.poll()), (None, None))
        self.assertEqual(os.listdir(self.dir), [])

    def test_pidfile_given(self):
        """--pidfile, given, is twistd's pid file, even when it names twistd's default."""
        process = self.run_manager("--pidfile", "twistd.pid")
        with open(os.path.join(self.dir, "twistd.pid")) as file:
            self.assertEqual(file.read().strip(), str(process.pid))

    def test_daemon(self):
        """Daemonized with manager.pid_file, that is the only pid file; the cwd stays empty."""
        port = free_port()
        pid_file = os.path.join(self.dir, "run", "m.pid")
        os.mkdir(os.path.dirname(pid_file))
        log = os.path.join(self.dir, "run", "m.log")
        env = dict(os.environ, PYTHONPATH=REPO)
        env.pop(config.DIRECTORY_VARIABLE, None)
        result = subprocess.run(
            [sys.executable, "-c", TWISTD, f"--logfile={log}", "milter-manager",
             "-s", f"inet:{port}@[{HOST}]", "-c", self.config(), "--pid-file", pid_file],
            cwd=self.dir, env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        with open(pid_file) as file:
            pid = int(file.read())
        self.addCleanup(_kill, pid)
        wait_for_port(port, 30)
        self.assertEqual(sorted(os.listdir(self.dir)), ["run"])
        self.assertEqual(sorted(os.listdir(os.path.dirname(pid_file))), ["m.log", "m.pid"])


def _kill(pid, timeout=10.0):
    """SIGTERM a daemon we did not fork ourselves and wait until it is gone."""
    import time

    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)


class WarningLogTests(SynchronousTestCase):
    """A configuration warning reaches the running manager's log once per load."""

    def test_once_at_start_and_once_per_reload(self):
        import time

        directory = tempfile.mkdtemp(prefix="mm-warn-", dir="/tmp")
        self.addCleanup(shutil.rmtree, directory, True)
        port = free_port()
        path = os.path.join(directory, "milter-manager.conf")
        with open(path, "w") as file:
            file.write(f'manager.connection_spec = "inet:{port}@[{HOST}]"\n'
                       'manager.event_loop_backend = "glib"\n')
        log_path = os.path.join(directory, "out.log")
        env = dict(os.environ, PYTHONPATH=REPO)
        env.pop(config.DIRECTORY_VARIABLE, None)
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", TWISTD, "-n", "milter-manager", "-c", path],
                cwd=directory, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        self.addCleanup(_stop_process, process)
        wait_for_port(port, 30, process)

        def lines():
            with open(log_path) as file:
                return file.read().splitlines()

        def wait_for(text):
            deadline = time.monotonic() + 30
            while not any(text in line for line in lines()):
                self.assertLess(time.monotonic(), deadline, lines())
                time.sleep(0.05)

        wait_for("[manager][start]")  # SIGHUP is ours from here on
        warning = f"[configuration][warning] {path}:2: manager.event_loop_backend = 'glib'"
        self.assertEqual(sum(warning in line for line in lines()), 1, lines())
        process.send_signal(signal.SIGHUP)
        wait_for("[reload][success]")
        reload_start = next(i for i, line in enumerate(lines()) if "[reload][start]" in line)
        self.assertEqual([i > reload_start for i, line in enumerate(lines()) if warning in line],
                         [False, True], lines())
