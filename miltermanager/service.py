"""The running manager: listening for the MTA, reloading on SIGHUP, and the process around it.

ManagerService is what `twistd milter-manager` runs. In twistd's order:

1. makeService builds it (the configuration is loaded and checked already);
   setServiceParent makes its LogRouter twistd's log observer.
2. twistd daemonizes, then privilegedStartService: setrlimit(NOFILE) to
   manager.max_file_descriptors, listen on manager.connection_spec, write
   manager.pid_file, then drop privileges to security.effective_user/group
   (upstream's order). Files root made that the effective user might not
   be able to remove (the UNIX socket, the pid file) are left to a small
   cleanup process forked before dropping: it waits for this process to
   exit and removes them (see spawn_cleaner).
3. startService: SIGHUP reloads, SIGUSR1 reopens the log file; the
   `event_loop_created` hooks run once the reactor runs.
4. stopService (SIGTERM): stop listening, then wait for the MTA connections
   in flight to end, up to DRAIN_TIMEOUT, so no message is cut off.

Each MTA connection gets a ManagerSession on the configuration current when
it connected and keeps it to the end: a reload swaps `factory.configuration`
for new connections only (see ManagerService.reload).
"""

import errno
import os
import signal
import socket
import stat

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import ILogObserver, Logger
from zope.interface import implementer

from . import connection_spec
from .config import ConfigurationError
from .logs import LogRouter
from .server import MilterServerFactory, MilterServerProtocol
from .session import ManagerSession

# How long SIGTERM waits for MTA connections in flight before closing them. Postfix keeps a
# milter connection for a whole SMTP session, which may idle; messages in flight finish
# well within this, and the MTA applies its milter_default_action to what is left.
DRAIN_TIMEOUT = 30.0

# Settings read only at start: a reload that changes them says they need a restart.
RESTART_SETTINGS = (
    ("manager", "daemon"), ("manager", "pid_file"), ("manager", "max_file_descriptors"),
    ("manager", "n_workers"), ("security", "effective_user"), ("security", "effective_group"),
)


def hooks(configuration, name):
    """The functions registered with @manager.<name> (maintained, event_loop_created)."""
    return [hook.function for hook in getattr(configuration.manager, f"{name}_hooks")]


def error_lines(error):
    """Every problem a ConfigurationError reports, one "FILE:LINE: reason" per item."""
    errors = getattr(error, "errors", None)
    return [str(item) for item in errors] if errors else [str(error)]


# ---------------------------------------------------------------- MTA connections


class ManagerConnection(MilterServerProtocol):
    """One MTA connection, counted by its factory."""

    def connectionMade(self):
        self.factory.connection_made(self)
        super().connectionMade()

    def connectionLost(self, reason=None):
        try:
            super().connectionLost(reason)
        finally:
            self.factory.connection_lost(self)


class ManagerFactory(MilterServerFactory):
    """MTA connections on the current configuration, limited by manager.max_connections.

    At max_connections concurrent connections the listening ports stop
    accepting; the kernel queues new connections in the backlog until one
    ends. Upstream polls again every suspend_time_on_unacceptable seconds;
    here the port resumes as soon as a connection ends, so nothing waits
    longer than needed. Every manager.maintenance_interval finished
    connections the `maintained` hooks run.
    """

    protocol = ManagerConnection
    noisy = False  # no "Starting factory" line per port
    log = Logger()

    def __init__(self, configuration, reactor, clock=None):
        super().__init__(self._session, clock=clock or reactor)
        self.configuration = configuration
        self.reactor = reactor
        self.session_clock = clock
        self.connections = 0  # open now
        self.finished = 0  # since start
        self.ports = []
        self.paused = False
        self._drained = []  # Deferreds waiting for connections to reach 0
        self._open = set()  # the ManagerConnections, to close what a drain leaves

    def _session(self, server):
        return ManagerSession(server, self.configuration, self.reactor, self.session_clock)

    def connection_made(self, connection=None):
        self.connections += 1
        if connection is not None:
            self._open.add(connection)
        self.update_accepting()

    def connection_lost(self, connection=None):
        self.connections -= 1
        self.finished += 1
        self._open.discard(connection)
        if not self.connections:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)
        interval = self.configuration.manager.maintenance_interval
        if interval and self.finished % interval == 0:
            self.maintain()
        self.update_accepting()

    def maintain(self):
        """Run the `maintained` hooks; one that fails is logged and the others still run."""
        for hook in hooks(self.configuration, "maintained"):
            try:
                hook()
            except Exception:
                self.log.failure("[maintain][error] a maintained hook failed")

    def update_accepting(self):
        """Stop or resume accepting for max_connections (after a change of either)."""
        limit = self.configuration.manager.max_connections
        full = bool(limit) and self.connections >= limit
        if full == self.paused:
            return
        self.paused = full
        for port in self.ports:
            _set_accepting(port, not full)
        if full:
            self.log.info("[accept][suspend] {n} connections (max_connections): not accepting "
                          "until one ends", n=self.connections)
        else:
            self.log.info("[accept][resume] {n} connections", n=self.connections)

    def drain(self, timeout, clock):
        """Fire once every MTA connection has ended, closing those left after timeout seconds.

        Sessions in flight finish their message instead of being cut off
        at stop; an MTA that keeps an idle connection open is not waited
        for forever.
        """
        if not self.connections:
            return defer.succeed(None)
        self.log.info("[stop][drain] waiting up to {timeout} s for {n} MTA connections",
                      timeout=timeout, n=self.connections)
        d = defer.Deferred()
        self._drained.append(d)

        def too_long():
            if d.called:
                return
            self.log.warn("[stop][drain] closing {n} MTA connections still open after {timeout} s",
                          n=self.connections, timeout=timeout)
            for connection in list(self._open):
                connection.transport.loseConnection()

        timer = clock.callLater(timeout, too_long)
        d.addBoth(lambda result: timer.cancel() if timer.active() else None)
        return d

    def add_port(self, port):
        self.ports.append(port)
        if self.paused:
            _set_accepting(port, False)

    def remove_port(self, port):
        self.ports.remove(port)


def _set_accepting(port, accepting):
    # Reading is accepting for Twisted's listening ports (tcp.Port, unix.Port).
    method = getattr(port, "startReading" if accepting else "stopReading", None)
    if method is not None:
        method()


# ---------------------------------------------------------------- listening


def listen_endpoint(reactor, settings, backlog=50):
    """The server endpoint for settings.connection_spec with upstream's UNIX socket handling.

    settings carries connection_spec, unix_socket_mode, unix_socket_group,
    remove_unix_socket_on_create and remove_unix_socket_on_close: `manager.*`
    now, `controller.*` (same names upstream) later.
    """
    spec = connection_spec.parse(settings.connection_spec)
    endpoint = spec.server_endpoint(reactor, backlog, settings.unix_socket_mode)
    if spec.is_unix:
        endpoint = UNIXSocketEndpoint(
            endpoint, spec.path, settings.remove_unix_socket_on_create,
            settings.unix_socket_group,
            settings.remove_unix_socket_on_close)
    return endpoint


def listen_service(reactor, settings, factory, backlog=50):
    """A service listening on settings.connection_spec (see listen_endpoint).

    Preparing the socket file happens when the service starts listening
    (privilegedStartService), never when it is built: building also happens
    for checks and tests, and must not delete a running manager's socket.
    """
    from twisted.application.internet import StreamServerEndpointService

    service = StreamServerEndpointService(listen_endpoint(reactor, settings, backlog), factory)
    # As twisted.application.strports.service does: a socket that cannot be
    # bound stops twistd with the error instead of a process that serves nothing.
    service._raiseSynchronously = True
    return service


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
    left half closed. So Twisted is told the socket has no file, and at
    close the file is removed here if remove_on_close, only if it is still
    the socket this port made (same device and inode), and a failure is
    only logged (after dropping privileges the cleanup process removes it).
    """

    log = Logger()
    cleaner = False  # True: the cleanup process removes the file if we cannot

    def __init__(self, port, path, remove_on_close=True):
        self.port = port
        self.path = path
        self.remove_on_close = remove_on_close
        info = os.lstat(path)
        self.identity = (info.st_dev, info.st_ino)
        # Twisted ≥ 23 keeps the path in _bindPath, 22.4 in port; a path
        # starting with NUL is in Linux's abstract namespace: nothing to unlink.
        attribute = "_bindPath" if hasattr(port, "_bindPath") else "port"
        current = getattr(port, attribute)
        setattr(port, attribute, b"\0" if isinstance(current, bytes) else "\0")

    def stopListening(self):
        if self.remove_on_close:
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


# ---------------------------------------------------------------- the process


class StartError(Exception):
    """The manager cannot start as configured (a user, a limit, a pid file)."""


def set_max_file_descriptors(count):
    """setrlimit(NOFILE) soft and hard to count, as upstream; 0 keeps the system's."""
    if not count:
        return
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))
    except (OSError, ValueError) as error:
        raise StartError(f"manager.max_file_descriptors = {count}: {error}") from None


def resolve_identity(user, group):
    """(uid, gid, user name) to switch to for effective_user/effective_group; None for unset.

    Raises StartError naming an unknown user or group.
    """
    import grp
    import pwd

    uid = gid = name = None
    if user is not None:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise StartError(f"security.effective_user: no such user {user!r}") from None
        uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise StartError(f"security.effective_group: no such group {group!r}") from None
    return uid, gid, name


def drop_privileges(user, group):
    """Switch to security.effective_user/effective_group (setgid, initgroups, setuid).

    Not running as root, switching to ourselves is a no-op and anything else
    is an error, rather than a manager that silently keeps other rights.
    """
    uid, gid, name = resolve_identity(user, group)
    if uid is None and gid is None:
        return False
    if os.getuid() != 0:
        if (uid is None or uid == os.getuid()) and (gid is None or gid == os.getgid()):
            return False
        raise StartError(f"cannot switch to user {user!r} group {group!r}: not running as root")
    os.setgid(gid)
    if name is not None:
        os.initgroups(name, gid)
        os.setuid(uid)
    else:
        os.setgroups([])
    return True


def write_pid_file(path):
    """Write our pid to path (mode 0644, as upstream's umask 022)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(descriptor, "w") as file:
        file.write(f"{os.getpid()}\n")


def remove_pid_file(path, pid, log=None):
    """Remove path if it still holds pid."""
    try:
        with open(path) as file:
            if file.read().strip() != str(pid):
                return
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        if log is not None:
            log.warn("[pid-file][remove][error] cannot remove {path}: {error}",
                     path=path, error=error.strerror)


def spawn_cleaner(socket_path=None, pid_file=None):
    """Fork a process that keeps our rights and removes socket_path and pid_file once we exit.

    Called just before dropping privileges: files root made in root's
    directories (/run/milter-manager/...) cannot be removed by the effective
    user, and DESIGN §3 wants the socket gone at stop. The child closes
    every descriptor but the read end of a pipe whose write end only this
    process holds; EOF means this process exited (by SIGTERM, a crash or
    SIGKILL alike). It ignores SIGTERM/SIGINT/SIGHUP, which systemd and
    terminals send to the whole group, so it outlives us. It removes the
    socket only if it is still the same file (device and inode) and the pid
    file only if it still holds our pid, so a newer manager's files stay.
    Returns (the pipe's write end, kept open until exit; the child's pid),
    or None when there is nothing to remove.
    """
    targets = []
    if socket_path is not None:
        try:
            info = os.lstat(socket_path)
            targets.append(("socket", socket_path, (info.st_dev, info.st_ino)))
        except FileNotFoundError:
            pass
    if pid_file is not None:
        targets.append(("pid", pid_file, os.getpid()))
    if not targets:
        return None
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the cleanup process: no Python cleanup, no Twisted, just wait
        try:
            for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                signal.signal(number, signal.SIG_IGN)
            os.closerange(0, read_end)
            os.closerange(read_end + 1, os.sysconf("SC_OPEN_MAX"))
            while True:
                try:
                    if not os.read(read_end, 64):
                        break
                except InterruptedError:
                    continue
            for kind, path, identity in targets:
                if kind == "socket":
                    remove_socket_file(path, identity)
                else:
                    remove_pid_file(path, identity)
        finally:
            os._exit(0)
    os.close(read_end)
    return write_end, pid


# ---------------------------------------------------------------- the service


class ManagerService(service.Service):
    """Listens for the MTA on the current configuration and reloads it on SIGHUP.

    load() re-reads the same files with the same command-line overrides and
    returns a new Configuration or raises ConfigurationError. twistd_options
    are twistd's own (for where its log would go), or None.
    """

    name = "milter-manager"
    log = Logger()

    def __init__(self, reactor, configuration, load=None, twistd_options=None, clock=None):
        self.reactor = reactor
        self.configuration = configuration
        self.load = load
        self.twistd_options = twistd_options
        self.factory = ManagerFactory(configuration, reactor, clock)
        self.port = None
        self.pid_file = None  # the pid file we wrote
        self.log_router = None
        self._cleaner = None
        self._reloading = defer.DeferredLock()
        self._previous_handlers = {}

    # ------------------------------------------------------------ logging

    def setServiceParent(self, parent):
        """Join parent; if it is twistd's Application, our LogRouter becomes its log observer.

        twistd asks the application for an ILogObserver before starting its
        own log (unless --logger names one: then log.* settings do nothing).
        """
        if hasattr(parent, "setComponent") and parent.getComponent(ILogObserver) is None:
            parent.setComponent(ILogObserver, self.start_logging())
        super().setServiceParent(parent)

    def start_logging(self, syslog_path=None):
        """Make the LogRouter for the configuration's log.* settings and return it."""
        from .logs import SYSLOG_PATH, twistd_base

        options = self.twistd_options
        self.log_router = LogRouter(twistd_base(options), syslog_path or SYSLOG_PATH)
        self._configure_log(self.configuration, "log")
        return self.log_router

    def _configure_log(self, configuration, tag):
        if self.log_router is None:
            return
        force_syslog = bool(self.twistd_options and self.twistd_options.get("syslog"))
        try:
            notes = self.log_router.configure(configuration.log, force_syslog)
        except OSError as error:
            self.log.error("[{tag}][error] cannot open the log file {path}: {error}; "
                           "logging where it did", tag=tag, path=error.filename,
                           error=error.strerror)
            return
        for note in notes:
            self.log.warn(note)

    def reopen_logs(self):
        """SIGUSR1: reopen the log file; if that fails, keep writing to the old one."""
        if self.log_router is None:
            return
        try:
            self.log_router.reopen()
        except OSError as error:
            self.log.error("[log][reopen][error] {path}: {error}", path=error.filename,
                           error=error.strerror)
        else:
            self.log.info("[log][reopen] log file reopened")

    # ------------------------------------------------------------ start and stop

    def privilegedStartService(self):
        super().privilegedStartService()
        manager = self.configuration.manager
        security = self.configuration.security
        set_max_file_descriptors(manager.max_file_descriptors)
        resolve_identity(security.effective_user, security.effective_group)
        self.port = _now(listen_endpoint(self.reactor, manager).listen(self.factory))
        self.factory.add_port(self.port)
        pid_file = manager.pid_file
        if pid_file is not None:
            try:
                write_pid_file(pid_file)
            except OSError as error:
                self._close_port_now()
                raise StartError(f"manager.pid_file: cannot write {pid_file}: "
                                 f"{error.strerror}") from None
            self.pid_file = pid_file
        if security.effective_user is not None or security.effective_group is not None:
            socket_path = getattr(self.port, "path", None)
            if not getattr(self.port, "remove_on_close", False):
                socket_path = None
            if os.getuid() == 0:
                self._cleaner = spawn_cleaner(socket_path, self.pid_file)
            if self._cleaner is not None and socket_path is not None:
                self.port.cleaner = True
            if drop_privileges(security.effective_user, security.effective_group):
                self.log.info(
                    "[manager][privileges] now uid {uid} gid {gid}{cleaner}", uid=os.getuid(),
                    gid=os.getgid(), cleaner=(
                        f"; process {self._cleaner[1]} removes the socket and pid file "
                        "after we exit" if self._cleaner else ""))

    def _close_port_now(self):
        port, self.port = self.port, None
        self.factory.remove_port(port)
        port.stopListening()

    def startService(self):
        if self.port is None:
            self.privilegedStartService()
        super().startService()
        for number, handler in ((signal.SIGHUP, self._on_sighup),
                                (signal.SIGUSR1, self._on_sigusr1)):
            self._previous_handlers[number] = signal.signal(number, handler)
        self.reactor.callWhenRunning(self._event_loop_created)
        manager = self.configuration.manager
        self.log.info("[manager][start] listening on {spec}; {children}",
                      spec=manager.connection_spec, children=_children(self.configuration))
        n_workers = manager.n_workers
        if n_workers:
            self.log.warn("[manager][workers] manager.n_workers = {n}: several worker processes "
                          "are not implemented yet; running one process", n=n_workers)

    def _on_sighup(self, number, frame):
        self.reactor.callFromThread(self.reload)

    def _on_sigusr1(self, number, frame):
        self.reactor.callFromThread(self.reopen_logs)

    def _event_loop_created(self):
        for hook in hooks(self.configuration, "event_loop_created"):
            try:
                hook(self.reactor)
            except Exception:
                self.log.failure("[manager][error] an event_loop_created hook failed")

    def stopService(self):
        super().stopService()
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers.clear()
        stopping = defer.succeed(None)
        if self.port is not None:
            port, self.port = self.port, None
            self.factory.remove_port(port)
            stopping = defer.maybeDeferred(port.stopListening)
        # No new connections from here on; those in flight finish their message.
        stopping.addCallback(lambda _: self.factory.drain(DRAIN_TIMEOUT, self.reactor))
        if self.pid_file is not None:
            remove_pid_file(self.pid_file, os.getpid(), None if self._cleaner else self.log)
        return stopping

    # ------------------------------------------------------------ reload

    def reload(self):
        """Re-read the configuration; new MTA connections use it, those in flight keep theirs.

        Fires with True when the new configuration is in use. A file with
        errors, or a new connection_spec that cannot be listened on, keeps
        the running configuration (False) and logs why. Reloads run one at
        a time, in the order asked.
        """
        return self._reloading.run(self._reload)

    def _reload(self):
        self.log.info("[reload][start] reloading {files}",
                      files=", ".join(self.configuration.files) or "the built-in configuration")
        try:
            configuration = self.load()
            problems = startup_problems(configuration)
        except ConfigurationError as error:
            problems = [error]
        if problems:
            for error in problems:
                for line in error_lines(error):
                    self.log.error("[reload][error] {error}", error=line)
            self.log.error("[reload][error] keeping the running configuration")
            return defer.succeed(False)
        old, new = self.configuration.manager, configuration.manager
        rebinding = defer.succeed(None)
        if self.port is not None:
            if _spec(new) != _spec(old):
                rebinding = self._rebind(new)
            else:
                self._retune_socket(new)

        def failed(failure):
            self.log.error("[reload][error] cannot listen on {spec}: {error}; keeping the "
                           "running configuration", spec=new.connection_spec,
                           error=failure.getErrorMessage())
            return False

        return rebinding.addCallbacks(lambda _: self._adopt(configuration), failed)

    def _rebind(self, settings):
        """Listen on the new socket, then close the old one; connections on it go on."""
        listening = listen_endpoint(self.reactor, settings).listen(self.factory)

        def listening_now(port):
            old, self.port = self.port, port
            self.factory.add_port(port)
            self.factory.remove_port(old)
            self.log.info("[reload][listen] listening on {spec}", spec=settings.connection_spec)
            return defer.maybeDeferred(old.stopListening)

        return listening.addCallback(listening_now)

    def _retune_socket(self, settings):
        """Same UNIX socket: apply a changed mode, group or remove-on-close to it."""
        path = getattr(self.port, "path", None)
        if path is None:
            return
        self.port.remove_on_close = settings.remove_unix_socket_on_close
        try:
            if stat.S_IMODE(os.stat(path).st_mode) != settings.unix_socket_mode:
                os.chmod(path, settings.unix_socket_mode)
            if settings.unix_socket_group is not None:
                import grp

                os.chown(path, -1, grp.getgrnam(settings.unix_socket_group).gr_gid)
        except (OSError, KeyError) as error:
            self.log.warn("[reload][socket][error] cannot set the mode or group of {path}: "
                          "{error}", path=path, error=error)

    def _adopt(self, configuration):
        old = self.configuration
        self.configuration = configuration
        self.factory.configuration = configuration
        self.factory.update_accepting()
        self._configure_log(configuration, "reload")
        for section, name in RESTART_SETTINGS:
            before = getattr(getattr(old, section), name)
            after = getattr(getattr(configuration, section), name)
            if before != after:
                self.log.warn("[reload][restart-needed] {section}.{name} changed from "
                              "{before!r} to {after!r}: it takes effect at the next start",
                              section=section, name=name, before=before, after=after)
        self.log.info("[reload][success] {children}; sessions in flight finish on the "
                      "previous configuration", children=_children(configuration))
        return True


def _now(deferred):
    """The result of a Deferred that has fired (listening on TCP or UNIX does at once)."""
    results = []
    deferred.addBoth(results.append)
    if not results:
        raise StartError("listening did not complete at once")
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def _spec(settings):
    return connection_spec.parse(settings.connection_spec)


def _children(configuration):
    names = [milter.name for milter in configuration.enabled_milters]
    return f"child milters: {', '.join(names)}" if names else "no child milter"


def startup_problems(configuration):
    """ConfigurationErrors for what only this system can tell: do the users and groups exist?"""
    import grp
    import pwd

    problems = []
    for section, name, lookup in (
            (configuration.security, "effective_user", pwd.getpwnam),
            (configuration.security, "effective_group", grp.getgrnam),
            (configuration.manager, "unix_socket_group", grp.getgrnam)):
        value = getattr(section, name)
        if value is None:
            continue
        try:
            lookup(value)
        except KeyError:
            kind = "user" if name.endswith("user") else "group"
            problems.append(ConfigurationError(
                f"{section.SECTION}.{name}: no such {kind} {value!r}", section.origins.get(name)))
    return problems
