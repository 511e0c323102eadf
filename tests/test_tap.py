"""Tests for the twistd plugin, its options and the no-children fallback milter."""

import io
import os
import shutil
import stat
import sys
import tempfile

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from miltermanager import config, tap
from miltermanager.merge import Status
from miltermanager.macros import Macros
from miltermanager.protocol import messages


class PluginTests(SynchronousTestCase):
    def test_plugin_is_found(self):
        """`twistd milter-manager` is discoverable as a twistd plugin."""
        names = [maker.tapname for maker in getPlugins(IServiceMaker)]
        self.assertIn("milter-manager", names)


def isolated_options(test, default_directory=None):
    """Options that see neither /etc/milter-manager nor $MILTER_MANAGER_CONFIG_DIR.

    Nor whether the default address (port 10025) is free on this machine: the
    checks before start bind it for a moment, and these tests listen on
    nothing (test_startup_errors runs that check on free ports).
    """
    from miltermanager import service

    test.patch(service, "listen_problem", lambda settings: None)
    environ = dict(os.environ)
    environ.pop(config.DIRECTORY_VARIABLE, None)
    test.patch(os, "environ", environ)
    if default_directory is None:
        default_directory = os.path.abspath(test.mktemp())
    options = tap.Options()
    options.default_config_directory = default_directory
    options.detect_root = os.path.abspath(test.mktemp())  # an empty tree: no milter found
    return options


def refused(test, options, arguments):
    """Parse arguments, which must stop start-up; return the stderr lines (exit status 1)."""
    err = io.StringIO()
    test.patch(sys, "stderr", err)
    error = test.assertRaises(SystemExit, options.parseOptions, arguments)
    test.assertEqual(error.code, 1)
    return err.getvalue().splitlines()


def write_config(test, text, name="milter-manager.conf"):
    """Write a configuration file in a fresh directory; return its absolute path."""
    directory = os.path.abspath(test.mktemp())
    os.makedirs(directory)
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
    return path


class OptionsTests(SynchronousTestCase):
    def test_default_connection_spec(self):
        """Without options it listens on inet:10025@[127.0.0.1], as upstream's generic default."""
        options = isolated_options(self)
        options.parseOptions([])
        self.assertEqual(options.configuration, config.embedded(detect_root=options.detect_root))
        self.assertEqual(options.configuration.milters, [])
        self.assertIn("S25R", options.configuration.conditions)
        self.assertEqual(options.configuration.manager.connection_spec, "inet:10025@[127.0.0.1]")

    def test_default_file_when_it_exists(self):
        """Without --config the default directory's milter-manager.conf is loaded if present."""
        path = write_config(self, "manager.chunk_size = 3\n")
        options = isolated_options(self, os.path.dirname(path))
        options.parseOptions([])
        self.assertEqual(options.configuration.manager.chunk_size, 3)
        self.assertEqual(options.configuration.files, [path])

    def test_custom_file_of_the_user_name_option(self):
        """--user-name decides whose ~/.milter-manager/milter-manager.custom.conf is loaded.

        The command line still wins over what the custom file sets.
        """
        import pwd

        home = os.path.abspath(self.mktemp())
        custom = write_config(self, "manager.chunk_size = 9\nmanager.progress_interval = 4\n"
                                    'manager.connection_spec = "inet:1@[127.0.0.1]"\n',
                              "milter-manager.custom.conf")
        os.makedirs(home)
        os.chmod(home, 0o755)
        os.rename(os.path.dirname(custom), os.path.join(home, ".milter-manager"))
        nobody = pwd.getpwnam("nobody")
        real_getpwnam = pwd.getpwnam

        def getpwnam(name):
            # nobody's passwd entry with a home this test owns.
            if name == "nobody":
                return pwd.struct_passwd((*nobody[:5], home, nobody.pw_shell))
            return real_getpwnam(name)

        self.patch(pwd, "getpwnam", getpwnam)
        path = write_config(self, "manager.chunk_size = 3\n")
        options = isolated_options(self)
        options.parseOptions(["-c", path, "--user-name", "nobody", "-s",
                              "inet:10025@[127.0.0.1]"])
        manager = options.configuration.manager
        self.assertEqual((manager.chunk_size, manager.progress_interval), (9, 4.0))
        self.assertEqual(options.configuration.files[-1],
                         os.path.join(home, ".milter-manager", "milter-manager.custom.conf"))
        self.assertEqual((manager.connection_spec, manager.origins["connection_spec"]),
                         ("inet:10025@[127.0.0.1]", "--connection-spec"))

    def test_config(self):
        """--config (-c) loads the file."""
        path = write_config(self, 'define_milter("a").connection_spec = "inet:1@[127.0.0.1]"\n')
        for flag in ("--config", "-c"):
            options = isolated_options(self)
            options.parseOptions([flag, path])
            self.assertEqual([milter.name for milter in options.configuration.milters], ["a"])

    def test_config_directory(self):
        """--config-dir, or -c naming a directory (upstream's -c), loads its milter-manager.conf."""
        path = write_config(self, "manager.chunk_size = 5\n")
        for arguments in (["--config-dir", os.path.dirname(path)],
                          ["-c", os.path.dirname(path)]):
            options = isolated_options(self)
            options.parseOptions(arguments)
            self.assertEqual(options.configuration.manager.chunk_size, 5)

    def test_environment_directory(self):
        """$MILTER_MANAGER_CONFIG_DIR names the directory, as upstream."""
        path = write_config(self, "manager.chunk_size = 6\n")
        options = isolated_options(self)
        os.environ[config.DIRECTORY_VARIABLE] = os.path.dirname(path)
        options.parseOptions([])
        self.assertEqual(options.configuration.manager.chunk_size, 6)

    def test_overrides(self):
        """--connection-spec and --fallback-status override the file, and say so in origins."""
        path = write_config(
            self, 'manager.connection_spec = "inet:1@[127.0.0.1]"\n'
                  'manager.fallback_status = "reject"\n')
        options = isolated_options(self)
        options.parseOptions(["-c", path, "-s", "unix:/tmp/m.sock",
                              "--fallback-status", "temporary_failure"])
        manager = options.configuration.manager
        self.assertEqual(manager.connection_spec, "unix:/tmp/m.sock")
        self.assertIs(manager.fallback_status, Status.TEMPORARY_FAILURE)
        self.assertEqual(manager.origins, {"connection_spec": "--connection-spec",
                                           "fallback_status": "--fallback-status"})

    def test_bad_config(self):
        """A bad configuration stops start-up (exit 1), one line per error with its FILE:LINE."""
        path = write_config(self, '\nwith define_milter("clamav") as milter:\n'
                                  '    milter.fallback_status = "maybe"\n')
        self.assertEqual(refused(self, isolated_options(self), ["--config", path]), [
            f'milter-manager: {path}:3: milter "clamav": fallback_status must be one of accept, '
            "temporary-failure, reject, discard; got 'maybe'",
            f'milter-manager: {path}:2: milter "clamav": connection_spec is required (where the '
            'child milter listens, e.g. "inet:8891@[127.0.0.1]")'])

    def test_missing_config(self):
        """A --config file that does not exist stops start-up with one line."""
        path = os.path.abspath(self.mktemp())
        self.assertEqual(refused(self, isolated_options(self), ["--config", path]),
                         [f"milter-manager: cannot read {path}: No such file or directory"])

    def test_config_and_config_dir(self):
        """--config and --config-dir together are refused."""
        options = isolated_options(self)
        self.assertRaises(usage.UsageError, options.parseOptions,
                          ["--config", "/a.conf", "--config-dir", "/etc"])

    def test_bad_connection_spec(self):
        """A connection spec that is no milter or endpoint form is a usage error."""
        [line] = refused(self, isolated_options(self), ["--connection-spec", "bogus:1"])
        self.assertIn("bogus:1", line)
        self.assertTrue(line.startswith(
            "milter-manager: --connection-spec: manager.connection_spec: "), line)

    def test_bad_fallback_status(self):
        """An unknown fallback status is refused at start-up."""
        [line] = refused(self, isolated_options(self), ["--fallback-status", "maybe"])
        self.assertTrue(line.startswith(
            "milter-manager: --fallback-status: manager.fallback_status must be"), line)

    def test_show_config(self):
        """--show-config prints the resolved configuration with origins and exits 0."""
        path = write_config(self, "manager.chunk_size = 4096\n")
        options = isolated_options(self)
        output = io.StringIO()
        self.patch(sys, "stdout", output)
        error = self.assertRaises(SystemExit, options.parseOptions, ["-c", path, "--show-config"])
        self.assertEqual(error.code, 0)
        self.assertIn(f"manager.chunk_size = 4096  # {path}:1\n", output.getvalue())

    def test_make_service(self):
        """makeService builds a named listening service that exposes the configuration."""
        options = isolated_options(self)
        options.parseOptions(["--connection-spec", "inet:0@[127.0.0.1]"])
        made = tap.makeService(options)
        self.assertEqual(made.name, "milter-manager")
        self.assertIs(made.configuration, options.configuration)
        self.assertIs(made.factory.configuration, options.configuration)

    def test_make_service_fallback(self):
        """The service answers with manager.fallback_status from the configuration.

        A discard waits for the first MAIL: the MTAs refuse it at connect.
        """
        path = write_config(self, 'manager.fallback_status = "reject"\n')
        options = isolated_options(self)
        options.parseOptions(["-c", path])
        milter = tap.makeService(options).factory.milter_factory(None)
        self.assertIs(milter.connect(None, Macros()), messages.REJECT)
        path = write_config(self, 'manager.fallback_status = "discard"\n')
        options = isolated_options(self)
        options.parseOptions(["-c", path])
        milter = tap.makeService(options).factory.milter_factory(None)
        self.assertIs(milter.connect(None, Macros()), messages.CONTINUE)
        self.assertIs(milter.helo(None, Macros()), messages.CONTINUE)
        self.assertIs(milter.mail(None, Macros()), messages.DISCARD)


class UNIXSocketServiceTests(TestCase):
    """makeService on a UNIX socket (the socket itself: test_listening)."""

    def setUp(self):
        # sun_path holds 108 bytes: trial's _trial_temp paths may be too long.
        self.directory = tempfile.mkdtemp(prefix="mm-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.directory)
        self.path = os.path.join(self.directory, "s.sock")

    def test_make_service_on_unix_socket(self):
        """makeService listens where the configuration says, with its mode."""
        options = isolated_options(self)
        options.parseOptions(["-s", f"unix:{self.path}"])
        made = tap.makeService(options)
        made.privilegedStartService()
        made.startService()
        self.addCleanup(made.stopService)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o660)

    def test_cannot_listen_stops_twistd(self):
        """The socket path taken after the checks: one line, exit 1, twistd's pid file gone.

        The line goes to the original standard error and to twistd's status
        pipe (which the process that daemonized prints); the file stays.
        """
        options = isolated_options(self)
        options.parseOptions(["-s", f"unix:{self.path}"])
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        pidfile = os.path.join(self.directory, "twistd.pid")
        with open(pidfile, "w") as file:
            file.write(str(os.getpid()))
        options.parent = {"statusPipe": write_end, "pidfile": pidfile}
        made = tap.makeService(options)
        with open(self.path, "w") as file:
            file.write("precious")
        err = io.StringIO()
        self.patch(sys, "__stderr__", err)
        error = self.assertRaises(SystemExit, made.privilegedStartService)
        self.assertEqual(error.code, 1)
        line = f"manager.connection_spec unix:{self.path}: address already in use"
        self.assertEqual(err.getvalue(), f"milter-manager: {line}\n")
        self.assertEqual(os.read(read_end, 200), f"1 {line}".encode())
        self.assertIsNone(options.parent["statusPipe"])
        self.assertFalse(os.path.exists(pidfile))
        self.assertIsNone(made.port)
        with open(self.path) as file:
            self.assertEqual(file.read(), "precious")


class OverrideTests(SynchronousTestCase):
    """Upstream's command-line overrides: each checked by the configuration, each its own origin."""

    def parse(self, *arguments):
        options = isolated_options(self)
        options.parseOptions(list(arguments))
        return options.configuration

    def test_log_options(self):
        """--log-level, --log-path, --syslog-facility and --no-syslog set log.*."""
        configuration = self.parse("--log-level", "error|debug", "--log-path", "/tmp/m.log",
                                   "--syslog-facility", "local2", "--no-syslog")
        log = configuration.log
        self.assertEqual((log.level, log.path, log.syslog_facility, log.use_syslog),
                         ("error|debug", "/tmp/m.log", "local2", False))
        self.assertEqual(log.origins, {"level": "--log-level", "path": "--log-path",
                                       "syslog_facility": "--syslog-facility",
                                       "use_syslog": "--no-syslog"})

    def test_verbose(self):
        """--verbose (-v) is log.level all."""
        for flag in ("--verbose", "-v"):
            log = self.parse(flag).log
            self.assertEqual((log.level, log.origins["level"]), ("all", "--verbose"))

    def test_log_path_dash(self):
        """--log-path - is standard output (no log file)."""
        self.assertIsNone(self.parse("--log-path", "-").log.path)

    def test_process_options(self):
        """--user-name, --group-name, --pid-file, --n-workers, --unix-socket-* set their items."""
        configuration = self.parse(
            "--user-name", "nobody", "--group-name", "nogroup", "--pid-file", "/tmp/m.pid",
            "--n-workers", "3", "--unix-socket-mode", "0600", "--unix-socket-group", "nogroup")
        manager, security = configuration.manager, configuration.security
        self.assertEqual((security.effective_user, security.effective_group),
                         ("nobody", "nogroup"))
        self.assertEqual((manager.pid_file, manager.n_workers, manager.unix_socket_mode,
                          manager.unix_socket_group), ("/tmp/m.pid", 3, 0o600, "nogroup"))
        self.assertEqual(security.origins["effective_user"], "--user-name")
        self.assertEqual(manager.origins["n_workers"], "--n-workers")

    def test_bad_values(self):
        """A bad override is refused with the option and what the setting expects."""
        for option, value, expected in (
                ("--n-workers", "many", "--n-workers: manager.n_workers must be"),
                ("--log-level", "loud", "--log-level: log.level has no level 'loud'"),
                ("--unix-socket-mode", "999", "--unix-socket-mode: manager.unix_socket_mode"),
                ("--syslog-facility", "mailx", "--syslog-facility: log.syslog_facility")):
            [line] = refused(self, isolated_options(self), [option, value])
            self.assertTrue(line.startswith(f"milter-manager: {expected}"), line)

    def test_unknown_user(self):
        """An unknown --user-name is refused at start-up, not after listening."""
        self.assertEqual(
            refused(self, isolated_options(self), ["--user-name", "no-such-user-here"]),
            ["milter-manager: --user-name: security.effective_user: no such user "
             "'no-such-user-here'"])

    def test_contradicting_flags(self):
        """--syslog with --no-syslog, or --daemon with --no-daemon, is refused."""
        for flags in (["--syslog", "--no-syslog"], ["--daemon", "--no-daemon"]):
            options = isolated_options(self)
            self.assertRaises(usage.UsageError, options.parseOptions, flags)

    def test_show_config_names_the_option(self):
        """--show-config shows an override's origin as the option."""
        options = isolated_options(self)
        output = io.StringIO()
        self.patch(sys, "stdout", output)
        self.assertRaises(SystemExit, options.parseOptions,
                          ["--log-level", "error", "--show-config"])
        self.assertIn('log.level = "error"  # --log-level\n', output.getvalue())

    def test_reload_applies_overrides_again(self):
        """load_configuration re-reads the file and applies the same overrides."""
        path = write_config(self, "manager.chunk_size = 7\nlog.level = \"debug\"\n")
        options = isolated_options(self)
        options.parseOptions(["-c", path, "--log-level", "error"])
        with open(path, "w") as file:
            file.write("manager.chunk_size = 8\nlog.level = \"debug\"\n")
        again = options.load_configuration()
        self.assertEqual((again.manager.chunk_size, again.log.level), (8, "error"))
        self.assertIsNot(again, options.configuration)

    def test_version(self):
        """--version prints milter-manager's version."""
        import miltermanager

        output = io.StringIO()
        self.patch(sys, "stdout", output)
        self.assertRaises(SystemExit, isolated_options(self).parseOptions, ["--version"])
        self.assertEqual(output.getvalue(), f"milter-manager {miltermanager.__version__}\n")


class TwistdPidFileTests(SynchronousTestCase):
    """twistd's --pidfile as twistd's own option parser leaves it after ours ran."""

    def twistd(self, *arguments):
        """Parse `twistd ARGUMENTS` (sys.argv too, as twistd does); return twistd's options."""
        from twisted.scripts.twistd import ServerOptions

        isolated_options(self)
        directory = os.path.abspath(self.mktemp())
        self.patch(tap.Options, "default_config_directory", directory)
        self.patch(sys, "argv", ["twistd", *arguments])
        options = ServerOptions()
        options.parseOptions(list(arguments))
        return options

    def test_foreground(self):
        """In the foreground there is no pid file unless --pidfile is given, even as its default."""
        self.assertEqual(self.twistd("-n", "milter-manager")["pidfile"], "")
        self.assertEqual(self.twistd("-n", "--pidfile", "twistd.pid", "milter-manager")["pidfile"],
                         os.path.abspath("twistd.pid"))
        self.assertEqual(self.twistd("-n", "--pidf=/tmp/m.pid", "milter-manager")["pidfile"],
                         "/tmp/m.pid")

    def test_daemon(self):
        """Daemonized: DAEMON_PID_FILE if its directory is writable and manager.pid_file unset."""
        directory = os.path.abspath(self.mktemp())
        self.patch(tap, "DAEMON_PID_FILE", os.path.join(directory, "m.pid"))
        self.assertEqual(self.twistd("milter-manager")["pidfile"], "")
        os.mkdir(directory)
        self.assertEqual(self.twistd("milter-manager")["pidfile"], tap.DAEMON_PID_FILE)
        self.assertEqual(self.twistd("milter-manager", "--pid-file", "/tmp/m.pid")["pidfile"], "")

    def test_daemon_switching_user(self):
        """Switching user, the default pid file is manager.pid_file, which the cleaner removes."""
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory)
        self.patch(tap, "DAEMON_PID_FILE", os.path.join(directory, "m.pid"))
        options = self.twistd("milter-manager", "--user-name", "nobody")
        self.assertEqual(options["pidfile"], "")
        manager = options.subOptions.configuration.manager
        self.assertEqual(manager.pid_file, tap.DAEMON_PID_FILE)


class LogFileAtStartTests(SynchronousTestCase):
    """A log file that cannot be opened when twistd sets up logging stops it with one line."""

    def test_log_file_gone(self):
        from twisted.application.service import Application

        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory)
        log_path = os.path.join(directory, "m.log")
        options = isolated_options(self)
        options.parseOptions(["--log-path", log_path])
        options.parent = {"nodaemon": True}
        os.rmdir(directory)  # after the checks, before twistd opens it
        made = tap.makeService(options)
        err = io.StringIO()
        self.patch(sys, "__stderr__", err)
        error = self.assertRaises(SystemExit, made.setServiceParent, Application("m"))
        self.assertEqual(error.code, 1)
        self.assertEqual(err.getvalue(), f"milter-manager: log.path {log_path}: directory "
                                         f"{directory} does not exist\n")


class DaemonTests(SynchronousTestCase):
    """--daemon, --no-daemon and manager.daemon tell twistd whether to daemonize."""

    def nodaemon(self, arguments, twistd_n=False, text=None):
        options = isolated_options(self)
        options.parent = {"nodaemon": twistd_n}
        if text is not None:
            arguments = ["-c", write_config(self, text), *arguments]
        options.parseOptions(arguments)
        return options.parent["nodaemon"]

    def test_twistd_decides_by_default(self):
        """Without any of them, twistd's -n decides."""
        self.assertFalse(self.nodaemon([]))
        self.assertTrue(self.nodaemon([], twistd_n=True))

    def test_flags(self):
        """--no-daemon keeps it in the foreground, --daemon daemonizes even with -n."""
        self.assertTrue(self.nodaemon(["--no-daemon"]))
        self.assertFalse(self.nodaemon(["--daemon"], twistd_n=True))

    def test_file(self):
        """A file's manager.daemon = False keeps it in the foreground; True leaves -n in charge."""
        self.assertTrue(self.nodaemon([], text="manager.daemon = False\n"))
        self.assertTrue(self.nodaemon([], twistd_n=True, text="manager.daemon = True\n"))
        self.assertFalse(self.nodaemon([], text="manager.daemon = True\n"))


class CheckConfigTests(SynchronousTestCase):
    """--check-config, in process and through the real twistd."""

    def check(self, arguments):
        options = isolated_options(self)
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        error = self.assertRaises(SystemExit, options.parseOptions, ["--check-config", *arguments])
        return error.code, out.getvalue(), err.getvalue()

    def test_ok(self):
        """A good file: exit 0 and "configuration OK: FILE"."""
        path = write_config(self, "manager.chunk_size = 9\n")
        self.assertEqual(self.check(["-c", path]), (0, f"configuration OK: {path}\n", ""))

    def test_errors(self):
        """A bad file: exit 1 and the error with FILE:LINE on standard error."""
        path = write_config(self, "\nmanager.chunk_size = 0\n")
        code, out, err = self.check(["-c", path])
        self.assertEqual((code, out), (1, ""))
        self.assertTrue(err.startswith(f"{path}:2: manager.chunk_size must be"), err)

    def test_every_startup_problem(self):
        """Unknown users and groups are all reported, each with where it was set."""
        path = write_config(self, 'security.effective_user = "no-such-user-x"\n'
                                  'manager.unix_socket_group = "no-such-group-x"\n')
        code, out, err = self.check(["-c", path])
        self.assertEqual(code, 1)
        self.assertEqual(err.splitlines(), [
            f"{path}:1: security.effective_user: no such user 'no-such-user-x'",
            f"{path}:2: manager.unix_socket_group: no such group 'no-such-group-x'"])

    def twistd_check(self, config_path, cwd):
        """Run `twistd milter-manager --check-config -c config_path` in a real process."""
        import subprocess

        from tests.peers.fixtures import REPO, TWISTD

        env = dict(os.environ, PYTHONPATH=REPO)
        env.pop(config.DIRECTORY_VARIABLE, None)
        return subprocess.run(
            [sys.executable, "-c", TWISTD, "--pidfile=", "milter-manager", "--check-config",
             "-c", config_path], capture_output=True, text=True, env=env, cwd=cwd, timeout=60)

    def test_real_twistd(self):
        """`twistd milter-manager --check-config` exits 0 or 1 and binds nothing."""
        directory = tempfile.mkdtemp(prefix="mm-", dir="/tmp")
        self.addCleanup(shutil.rmtree, directory)
        socket_path = os.path.join(directory, "m.sock")
        path = write_config(self, f'manager.connection_spec = "unix:{socket_path}"\n')

        good = self.twistd_check(path, directory)
        self.assertEqual((good.returncode, good.stdout), (0, f"configuration OK: {path}\n"))
        self.assertFalse(os.path.exists(socket_path))
        self.assertEqual(os.listdir(directory), [])  # no twistd.pid, no twistd.log
        with open(path, "a") as file:
            file.write('log.level = "loud"\n')
        bad = self.twistd_check(path, directory)
        self.assertEqual(bad.returncode, 1)
        self.assertIn(f"{path}:2: log.level has no level 'loud'", bad.stderr)
        self.assertFalse(os.path.exists(socket_path))

    def test_real_twistd_every_error(self):
        """Three bad lines: the real twistd exits 1 and prints each error on its own line."""
        directory = tempfile.mkdtemp(prefix="mm-", dir="/tmp")
        self.addCleanup(shutil.rmtree, directory)
        path = write_config(self, 'manager.chunk_size = 0\n'
                                  'log.syslog_facility = "mial"\n'
                                  'manager.conection_spec = "inet:10025"\n')
        bad = self.twistd_check(path, directory)
        self.assertEqual((bad.returncode, bad.stdout), (1, ""))
        lines = bad.stderr.splitlines()
        self.assertEqual(len(lines), 3, bad.stderr)
        for line, start in zip(lines, ("1: manager.chunk_size must be",
                                       "2: log.syslog_facility must be",
                                       "3: manager has no setting 'conection_spec'")):
            self.assertTrue(line.startswith(f"{path}:{start}"), bad.stderr)
