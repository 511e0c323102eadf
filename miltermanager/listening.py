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
from .paths import directory_problem
from .twisted_internals import forget_socket_file, read_plainly


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
        problem = directory_problem(self.path)
        if problem is not None:
            return defer.fail(CannotListenError(None, self.path, problem))
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
    told, Twisted removes the file itself, as it does for anyone. Its
    connections read with recv() (see twisted_internals.read_plainly).
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
        read_plainly(port)
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
        alive = _socket_alive(path)
    except FileNotFoundError:
        return
    if alive is None:
        return
    if alive:
        raise CannotListenError(None, path, ANOTHER_LISTENER)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def listen_problem(settings):
    """Why listening on settings.connection_spec would fail now, or None; nothing is kept.

    For --check-config and the checks before start: a TCP address is bound
    and closed again (with SO_REUSEADDR, as Twisted listens); for a UNIX
    socket its directory must exist and be writable, and a socket file there
    must not belong to a live listener. The reasons are worded as
    cannot_listen_reason words the real failure. Endpoint strings passed to
    Twisted as written (systemd:, ssl:, ...) are not probed.
    """
    spec = connection_spec.parse(settings.connection_spec)
    if spec.is_unix:
        problem = directory_problem(spec.path)
        if problem is not None:
            return problem
        try:
            alive = _socket_alive(spec.path)
        except FileNotFoundError:
            return None
        if alive is None:  # not a socket: left alone, and in the way
            return _in_use()
        if alive:
            return ANOTHER_LISTENER
        return None if settings.remove_unix_socket_on_create else _in_use()
    if spec.family not in ("inet", "inet6"):
        return None
    family = socket.AF_INET6 if spec.family == "inet6" else socket.AF_INET
    host = spec.host or ("::" if spec.family == "inet6" else "0.0.0.0")
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, spec.port))
    except OSError as error:
        return _lower(error.strerror or str(error))
    finally:
        probe.close()
    return None


def cannot_listen_reason(error):
    """The reason in a CannotListenError, worded as listen_problem words it."""
    reason = error.socketError
    if isinstance(reason, OSError):
        return _lower(reason.strerror or str(reason))
    return str(reason)


ANOTHER_LISTENER = "another process is listening on this socket"


def _in_use():
    return _lower(os.strerror(errno.EADDRINUSE))


def _lower(text):
    return text[:1].lower() + text[1:]


def _socket_alive(path):
    """True if a process listens on the UNIX socket path, False if it is stale, None: no socket.

    Raises FileNotFoundError if nothing is at path.
    """
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        return None
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except OSError as error:
        # EAGAIN: the listener's backlog is full, so it is alive.
        return error.errno in (errno.EAGAIN, errno.EINPROGRESS)
    finally:
        probe.close()
    return True
