"""Tests for listening: the UNIX socket's mode, group, stale file and removal at close."""

import grp
import os
import shutil
import socket
import stat
import tempfile

from twisted.internet import defer, protocol, reactor
from twisted.internet.error import CannotListenError
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from miltermanager import config, listening, twisted_internals


def plain_factory():
    return protocol.Factory.forProtocol(protocol.Protocol)


class UNIXSocketTests(TestCase):
    """Listening on a UNIX socket: mode, group, and what happens to an old socket file."""

    def setUp(self):
        # sun_path holds 108 bytes: trial's _trial_temp paths may be too long.
        self.directory = tempfile.mkdtemp(prefix="mm-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.directory)
        self.path = os.path.join(self.directory, "s.sock")

    def listen(self, **settings):
        """The Deferred of listening on self.path with manager.* settings (it fires at once)."""
        manager = config.ManagerConfig(connection_spec=f"unix:{self.path}", **settings)
        return listening.listen_endpoint(reactor, manager).listen(plain_factory())

    def start(self, **settings):
        port = self.successResultOf(self.listen(**settings))
        self.addCleanup(port.stopListening)
        return port

    def stale_socket(self):
        """Leave a socket file nobody listens on, as a crashed manager does."""
        old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old.bind(self.path)
        old.close()
        self.assertTrue(stat.S_ISSOCK(os.lstat(self.path).st_mode))

    def test_mode_0660(self):
        """The socket gets manager.unix_socket_mode, 0660 by default (Twisted's is 0666)."""
        self.start()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o660)

    def test_mode_from_configuration(self):
        """Another unix_socket_mode is applied too."""
        self.start(unix_socket_mode=0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_nothing_before_listen(self):
        """Building the endpoint leaves an existing socket file alone."""
        self.stale_socket()
        listening.listen_endpoint(
            reactor, config.ManagerConfig(connection_spec=f"unix:{self.path}"))
        self.assertTrue(os.path.exists(self.path))

    def test_stale_socket_removed(self):
        """A stale socket file is removed before listening."""
        self.stale_socket()
        self.start()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.connect(self.path)

    def test_stale_socket_kept_when_told(self):
        """With remove_unix_socket_on_create False, a stale socket makes listening fail."""
        self.stale_socket()
        self.failureResultOf(self.listen(remove_unix_socket_on_create=False), CannotListenError)

    def test_regular_file_kept(self):
        """A file that is no socket is never removed: listening fails instead."""
        with open(self.path, "w") as file:
            file.write("precious")
        self.failureResultOf(self.listen(), CannotListenError)
        with open(self.path) as file:
            self.assertEqual(file.read(), "precious")

    def test_live_socket_kept(self):
        """A socket another process listens on is not taken over: listening fails."""
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(live.close)
        live.bind(self.path)
        live.listen(1)
        failure = self.failureResultOf(self.listen(), CannotListenError)
        self.assertIn("another process is listening", str(failure.value))
        self.assertTrue(os.path.exists(self.path))

    def test_group(self):
        """unix_socket_group gives the socket to that group."""
        group = grp.getgrgid(os.getgid()).gr_name
        self.start(unix_socket_group=group)
        self.assertEqual(os.stat(self.path).st_gid, os.getgid())

    def test_unknown_group(self):
        """An unknown unix_socket_group stops listening with an error naming it."""
        failure = self.failureResultOf(self.listen(unix_socket_group="no-such-group-here"),
                                       CannotListenError)
        self.assertIn("no-such-group-here", str(failure.value))
        self.assertFalse(os.path.exists(self.path))

    def test_connections_read_plainly(self):
        """The port's connections read with recv(): see twisted_internals.read_plainly."""
        port = self.start()
        self.assertIs(port.port.transport, twisted_internals._PlainReadServer)

    @defer.inlineCallbacks
    def test_removed_at_close(self):
        """By default the socket file is removed at close."""
        yield self.successResultOf(self.listen()).stopListening()
        self.assertFalse(os.path.exists(self.path))

    @defer.inlineCallbacks
    def test_kept_at_close(self):
        """remove_unix_socket_on_close = False keeps the file."""
        yield self.successResultOf(self.listen(remove_unix_socket_on_close=False)).stopListening()
        self.assertTrue(os.path.exists(self.path))

    @defer.inlineCallbacks
    def test_already_gone(self):
        """A socket file someone removed already does not break the close."""
        port = self.successResultOf(self.listen())
        os.unlink(self.path)
        yield port.stopListening()
        self.assertFalse(port.connected)

    @defer.inlineCallbacks
    def test_replaced_file_kept(self):
        """A file now at the path that is not our socket is not removed."""
        port = self.successResultOf(self.listen())
        os.unlink(self.path)
        with open(self.path, "w") as file:
            file.write("someone else's")
        yield port.stopListening()
        self.assertTrue(os.path.exists(self.path))


class _TwistedPort:
    """A listening port as a Twisted that cannot be told to keep the file: it unlinks at close."""

    def __init__(self, path):
        self.elsewhere = path
        self.stopped = False

    def stopListening(self):
        self.stopped = True
        os.unlink(self.elsewhere)
        return defer.succeed(None)


class FallbackTests(SynchronousTestCase):
    """UNIXPort on a Twisted whose port cannot be told to leave the socket file alone."""

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="mm-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.directory)
        self.path = os.path.join(self.directory, "s.sock")
        bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound.bind(self.path)
        bound.close()
        self.events = []
        self.patch(listening.UNIXPort, "log",
                   Logger(namespace="test", observer=self.events.append))

    def test_twisted_removes_the_file(self):
        """Twisted's own removal is left to run (ours would make it fail), and that is said."""
        port = listening.UNIXPort(_TwistedPort(self.path), self.path)
        self.assertTrue(port.twisted_removes)
        self.successResultOf(port.stopListening())
        self.assertTrue(port.port.stopped)
        self.assertFalse(os.path.exists(self.path))
        self.assertEqual([formatEvent(event) for event in self.events], [
            f"[socket][fallback] this Twisted removes {self.path} itself when the port closes: "
            "remove_unix_socket_on_close = false cannot keep it"])


class RemoveSocketFileTests(SynchronousTestCase):
    def setUp(self):
        self.path = os.path.abspath(self.mktemp())
        with open(self.path, "w"):
            pass
        info = os.lstat(self.path)
        self.identity = (info.st_dev, info.st_ino)

    def test_same_file_removed(self):
        """The file identity names is removed."""
        listening.remove_socket_file(self.path, self.identity)
        self.assertFalse(os.path.exists(self.path))

    def test_other_file_kept(self):
        """A file with another identity is kept."""
        listening.remove_socket_file(self.path, (self.identity[0], self.identity[1] + 1))
        self.assertTrue(os.path.exists(self.path))

    def test_failure_logged(self):
        """A removal that fails is logged, not raised."""
        events = []

        def refused(path):
            raise PermissionError(13, "no")

        self.patch(os, "unlink", refused)
        listening.remove_socket_file(self.path, self.identity,
                                     Logger(namespace="test", observer=events.append))
        self.assertEqual([formatEvent(event) for event in events],
                         [f"[socket][remove][error] cannot remove {self.path}: no"])
