"""Tests for the twistd plugin, its options and the no-children fallback milter."""

import grp
import io
import os
import shutil
import socket
import stat
import sys
import tempfile

from twisted.application.service import IServiceMaker
from twisted.internet.error import CannotListenError
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from miltermanager import config, service, tap
from miltermanager.merge import Status
from miltermanager.macros import Macros
from miltermanager.protocol import messages


class PluginTests(SynchronousTestCase):
    def test_plugin_is_found(self):
        """`twistd milter-manager` is discoverable as a twistd plugin."""
        names = [maker.tapname for maker in getPlugins(IServiceMaker)]
        self.assertIn("milter-manager", names)


def isolated_options(test, default_directory=None):
    """Options that see neither /etc/milter-manager nor $MILTER_MANAGER_CONFIG_DIR."""
    environ = dict(os.environ)
    environ.pop(config.DIRECTORY_VARIABLE, None)
    test.patch(os, "environ", environ)
    if default_directory is None:
        default_directory = os.path.abspath(test.mktemp())
    options = tap.Options()
    options.default_config_directory = default_directory
    return options


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
        self.assertEqual(options.configuration, config.default())
        self.assertEqual(options.configuration.manager.connection_spec, "inet:10025@[127.0.0.1]")

    def test_default_file_when_it_exists(self):
        """Without --config the default directory's milter-manager.conf is loaded if present."""
        path = write_config(self, "manager.chunk_size = 3\n")
        options = isolated_options(self, os.path.dirname(path))
        options.parseOptions([])
        self.assertEqual(options.configuration.manager.chunk_size, 3)
        self.assertEqual(options.configuration.files, [path])

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
        """A bad configuration stops start-up with a usage error naming FILE:LINE."""
        path = write_config(self, '\nwith define_milter("clamav") as milter:\n'
                                  '    milter.fallback_status = "maybe"\n')
        options = isolated_options(self)
        error = self.assertRaises(usage.UsageError, options.parseOptions, ["--config", path])
        self.assertEqual(
            str(error), f'{path}:3: milter "clamav": fallback_status must be one of accept, '
                        "temporary-failure, reject, discard; got 'maybe'")

    def test_missing_config(self):
        """A --config file that does not exist is a usage error."""
        path = os.path.abspath(self.mktemp())
        options = isolated_options(self)
        error = self.assertRaises(usage.UsageError, options.parseOptions, ["--config", path])
        self.assertEqual(str(error), f"cannot read {path}: No such file or directory")

    def test_config_and_config_dir(self):
        """--config and --config-dir together are refused."""
        options = isolated_options(self)
        self.assertRaises(usage.UsageError, options.parseOptions,
                          ["--config", "/a.conf", "--config-dir", "/etc"])

    def test_bad_connection_spec(self):
        """A connection spec that is no milter or endpoint form is a usage error."""
        options = isolated_options(self)
        error = self.assertRaises(
            usage.UsageError, options.parseOptions, ["--connection-spec", "bogus:1"])
        self.assertIn("bogus:1", str(error))
        self.assertTrue(str(error).startswith("--connection-spec: manager.connection_spec: "))

    def test_bad_fallback_status(self):
        """An unknown fallback status is refused at start-up."""
        options = isolated_options(self)
        self.assertRaises(
            usage.UsageError, options.parseOptions, ["--fallback-status", "maybe"])

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
        """The service answers with manager.fallback_status from the configuration."""
        path = write_config(self, 'manager.fallback_status = "discard"\n')
        options = isolated_options(self)
        options.parseOptions(["-c", path])
        milter = tap.makeService(options).factory.milter_factory(None)
        self.assertIs(milter.connect(None, Macros()), messages.DISCARD)


class UNIXSocketTests(TestCase):
    """Listening on a UNIX socket: mode, group, and what happens to an old socket file."""

    def setUp(self):
        # sun_path holds 108 bytes: trial's _trial_temp paths may be too long.
        self.directory = tempfile.mkdtemp(prefix="mm-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.directory)
        self.path = os.path.join(self.directory, "s.sock")

    def service(self, **settings):
        manager = config.ManagerConfig(connection_spec=f"unix:{self.path}", **settings)
        from twisted.internet import reactor

        return service.listen_service(reactor, manager, tap_factory())

    def start(self, service):
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)

    def stale_socket(self):
        """Leave a socket file nobody listens on, as a crashed manager does."""
        old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old.bind(self.path)
        old.close()
        self.assertTrue(stat.S_ISSOCK(os.lstat(self.path).st_mode))

    def test_mode_0660(self):
        """The socket gets manager.unix_socket_mode, 0660 by default (Twisted's is 0666)."""
        self.start(self.service())
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o660)

    def test_mode_from_configuration(self):
        """Another unix_socket_mode is applied too."""
        self.start(self.service(unix_socket_mode=0o600))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_stale_socket_removed(self):
        """A stale socket file is removed before listening."""
        self.stale_socket()
        self.start(self.service())
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.connect(self.path)

    def test_stale_socket_kept_when_told(self):
        """With remove_unix_socket_on_create False, a stale socket makes listening fail."""
        self.stale_socket()
        service = self.service(remove_unix_socket_on_create=False)
        self.assertRaises(CannotListenError, service.privilegedStartService)

    def test_regular_file_kept(self):
        """A file that is no socket is never removed: listening fails instead."""
        with open(self.path, "w") as file:
            file.write("precious")
        self.assertRaises(CannotListenError, self.service().privilegedStartService)
        with open(self.path) as file:
            self.assertEqual(file.read(), "precious")

    def test_live_socket_kept(self):
        """A socket another process listens on is not taken over: listening fails."""
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(live.close)
        live.bind(self.path)
        live.listen(1)
        error = self.assertRaises(CannotListenError, self.service().privilegedStartService)
        self.assertIn("another process is listening", str(error))
        self.assertTrue(os.path.exists(self.path))

    def test_group(self):
        """unix_socket_group gives the socket to that group."""
        group = grp.getgrgid(os.getgid()).gr_name
        self.start(self.service(unix_socket_group=group))
        self.assertEqual(os.stat(self.path).st_gid, os.getgid())

    def test_unknown_group(self):
        """An unknown unix_socket_group stops listening with an error naming it."""
        service = self.service(unix_socket_group="no-such-group-here")
        error = self.assertRaises(CannotListenError, service.privilegedStartService)
        self.assertIn("no-such-group-here", str(error))

    def test_make_service_on_unix_socket(self):
        """makeService listens where the configuration says, with its mode."""
        options = isolated_options(self)
        options.parseOptions(["-s", f"unix:{self.path}"])
        self.start(tap.makeService(options))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o660)


def tap_factory():
    from twisted.internet import reactor

    from miltermanager.session import manager_factory

    return manager_factory(config.default(), reactor)


