"""Listening for the MTA: the endpoint for a connection spec and the UNIX socket file's life."""

import errno
import os
import socket
import stat

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from . import connection_spec
from .twisted_internals import forget_socket_file


def listen_endpoint(reactor, settings, backlog=50):
    """The server endpoint for settings.connection_spec with upstream's UNIX socket handling.

    settings carries connection_spec, unix_socket_mode, unix_socket_group,
    remove_unix_socket_on_create and remove_unix_socket_on_close: `manager.*`
    now, `controller.*` (same names upstream) later. Nothing happens to the
    socket file until listen() is called: building the endpoint also
    happens for checks, and must not delete a running manager's socket.
    """
    spec = connection_spec.parse(settings.connection_spec)
    endpoint = spec.server_endpoint(reactor, backlog, settings.unix_socket_mode)
    if spec.is_unix:
        endpoint = UNIXSocketEndpoint(
            endpoint, spec.path, settings.remove_unix_socket_on_create,
            settings.unix_socket_group,
            settings.remove_unix_socket_on_close)
    return endpoint


@implementer(IStreamServerEndpoint)
class UNIXSocketEndpoint:
    """Wraps a UNIX server endpoint: removes a stale socket file first, sets the group after.

    Twisted's own mode handling (chmod after bind) applies the mode. The
    port it gives is a UNIXPort, which removes the socket file at close only
    if remove_on_close (upstream's remove_unix_socket_on_close).
    """

    def __init__(self, endpoint, path, remove_stale=True, group=None, remove_on_close=True):
        self.endpoint = endpoint
        self.path = path
        self.remove_stale = remove_stale
        self.group = group
        self.remove_on_close = remove_on_close

    def listen(self, factory):
        gid = None
        if self.group is not None:
            import grp

            try:
                gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                return defer.fail(self._group_error("no such group"))
        if self.remove_stale:
            try:
                remove_stale_socket(self.path)
            except CannotListenError:
                return defer.fail()
        listening = self.endpoint.listen(factory)
        listening.addCallback(UNIXPort, self.path, self.remove_on_close)
        if gid is not None:
            listening.addCallback(self._give_to_group, gid)
        return listening

    def _give_to_group(self, port, gid):
        try:
            os.chown(self.path, -1, gid)
        except OSError as error:
            problem = self._group_error(error.strerror)

            def stopped(_):
                raise problem

            # Fail once the port is closed, so nothing unlinks the socket later.
            return defer.maybeDeferred(port.stopListening).addBoth(stopped)
        return port

    def _group_error(self, reason):
        return CannotListenError(
            None, self.path, f"cannot give the socket to group {self.group}: {reason}")


class UNIXPort:
    """A listening UNIX port whose socket file we remove ourselves, or keep.

    Twisted unlinks the file when the port closes, unconditionally, and if
    that fails (the file is gone, or privileges were dropped) the port is
    left half closed. So Twisted is told the socket has no file (see
    twisted_internals.forget_socket_file), and at close the file is removed
    here if remove_on_close, only if it is still the socket this port made
    (same device and inode), and a failure is only logged (after dropping
    privileges the cleanup process removes it). On a Twisted that cannot be
    told, Twisted removes the file itself, as it does for anyone.
    """

    log = Logger()
    cleaner = False  # True: the cleanup process removes the file if we cannot

    def __init__(self, port, path, remove_on_close=True):
        self.port = port
        self.path = path
        self.remove_on_close = remove_on_close
        info = os.lstat(path)
        self.identity = (info.st_dev, info.st_ino)
        self.twisted_removes = not forget_socket_file(port, path)
        if self.twisted_removes:
            self.log.warn("[socket][fallback] this Twisted removes {path} itself when the "
                          "port closes: remove_unix_socket_on_close = false cannot keep it",
                          path=path)

    def stopListening(self):
        if self.remove_on_close and not self.twisted_removes:
            remove_socket_file(self.path, self.identity, None if self.cleaner else self.log)
        return self.port.stopListening()

    loseConnection = stopListening

    def getHost(self):
        return self.port.getHost()

    def __getattr__(self, name):
        return getattr(self.port, name)


def remove_socket_file(path, identity, log=None):
    """Unlink path if it is still the socket file identity (st_dev, st_ino) names."""
    try:
        info = os.lstat(path)
        if (info.st_dev, info.st_ino) == identity:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        if log is not None:
            log.warn("[socket][remove][error] cannot remove {path}: {error}",
                     path=path, error=error.strerror)


def remove_stale_socket(path):
    """Remove path if it is a UNIX socket nobody listens on.

    Anything else is left alone: a regular file makes the bind fail with its
    own error, and a socket that accepts connections belongs to a running
    process (upstream removes it anyway, leaving that process unreachable);
    that raises CannotListenError.
    """
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except OSError as error:
        # EAGAIN: the listener's backlog is full, so it is alive.
        alive = error.errno in (errno.EAGAIN, errno.EINPROGRESS)
    else:
        alive = True
    finally:
        probe.close()
    if alive:
        raise CannotListenError(None, path, "another process is listening on this socket")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
