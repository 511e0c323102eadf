"""manager.n_workers: a supervisor and N worker processes serving one listening socket.

With `manager.n_workers = N` (N > 0) the process twistd starts is the
supervisor (SupervisorService). It does everything a single manager does
before serving: raises the file limit, listens on manager.connection_spec
(with the UNIX socket's mode, group and stale-file handling), writes
manager.pid_file, forks the cleanup process and drops privileges. Then it
stops reading from the socket (it accepts nothing itself) and, once its
reactor runs, starts N workers.

A worker is a fresh interpreter (fork and exec, never a fork of a running
reactor): `twistd -n --pidfile= milter-manager OPTIONS`, with the same
plugin options the supervisor got and twistd's logging options, so it
loads the same configuration. The listening socket is its descriptor 3;
the environment names it (MILTER_MANAGER_LISTEN_FD) and the worker's
number (MILTER_MANAGER_WORKER, 1 to N). makeService then builds a
WorkerService: a full ManagerService on its own reactor that adopts the
inherited socket instead of listening, and writes no pid file, starts no
launcher and drops no privileges (the supervisor did, and the worker runs
with what it was left). All workers wait on the same socket and the
kernel hands each new connection to one of them. Each worker's log lines
carry its number: `[worker 2 miltermanager.session#info]`.

The supervisor
- restarts a worker that exits while it is not stopping, logging the pid and
  the exit status; a worker that dies within MIN_UPTIME of its start is
  restarted after a delay that doubles each time (up to MAX_RESTART_DELAY),
  so a worker that cannot start does not spin. Sessions on the other
  workers are not touched.
- forwards SIGHUP (reload; it also re-reads the configuration for its own
  log settings) and SIGUSR1 (reopen the log) to every worker.
- at SIGTERM sends SIGTERM to every worker, waits while they drain their
  MTA connections (service.DRAIN_TIMEOUT, plus STOP_GRACE), SIGKILLs what
  is left, then closes its socket (removing a UNIX socket file as usual)
  and its pid file, and twistd exits 0.
- holds the write end of each worker's standard input: a worker whose
  standard input reaches end of file (the supervisor is gone, even by
  SIGKILL) stops as at SIGTERM instead of serving on, unsupervised.

With controller.connection_spec or web.connection_spec, the supervisor
also makes a private channel per worker (a socketpair; the worker's end is
its descriptor 4, named by MILTER_MANAGER_CONTROL_FD), made anew at each
restart (controller.channel). The supervisor listens on the controller
socket (after dropping privileges, as a single manager does) and answers
get-status, get-trace and reload from its workers over their channels
(controller.supervisor.SupervisorController); get-configuration and
set-configuration are its own. With web.connection_spec in metrics-only
mode it serves /metrics whose counts are the workers' added up at each
scrape (controller.supervisor.WorkersScrape). Statistics need nothing: the
workers' statistics lines share the log, each tagged with its worker.

Not with workers (problems() refuses them, so nothing half works): the web
pages (web.password_file; their live views of the sessions are per
worker), and security.privilege_mode's process launcher (the workers run
without root). Settings that are per process (max_connections, connection
checks, maintenance) are per worker.
"""

import os
import signal
import socket
import sys
import time

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger, formatTime

from .config import ConfigurationError
from .config.model import located
from .controller.channel import CONTROL_FD, CONTROL_FD_ENV, WorkerChannel, open_channel
from .logs import STATISTICS, SYSLOG_PATH, LogFile, LogRouter, Stream, twistd_base, upstream_level
from .logs import _write_text
from .service import DRAIN_TIMEOUT, error_lines, startup_problems
from .tap import _FLAG_OVERRIDES, _OVERRIDES, TwistdService

WORKER_ENV = "MILTER_MANAGER_WORKER"
LISTEN_FD_ENV = "MILTER_MANAGER_LISTEN_FD"
LISTEN_FD = 3  # the listening socket's descriptor in a worker
# A worker that exits sooner than this after its start is restarted after a growing delay.
MIN_UPTIME = 5.0
FIRST_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
# Beyond the workers' own drain time, how long SIGTERM waits before SIGKILLing workers.
STOP_GRACE = 10.0
# twistd's entry point under this interpreter, whatever `twistd` on PATH is.
TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"

log = Logger(namespace="miltermanager.workers")


def worker_number(environ=None):
    """This process's worker number when it is a worker the supervisor started, else None."""
    value = (os.environ if environ is None else environ).get(WORKER_ENV)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def problems(configuration):
    """ConfigurationErrors for what n_workers > 0 cannot serve yet (see the module docstring)."""
    manager = configuration.manager
    if not manager.n_workers:
        return []
    found = []
    origin = manager.origins.get("n_workers")

    def refuse(section, name, text):
        where = section.origins.get(name) or origin
        found.append(ConfigurationError(located(where, f"{section.SECTION}.{name}: {text}")
                                        if where else f"{section.SECTION}.{name}: {text}"))

    web = configuration.web
    if web.connection_spec is not None and web.password_file is not None:
        refuse(web, "password_file",
               f"the web pages are not available with manager.n_workers = "
               f"{manager.n_workers} (their live views of the sessions are per worker); "
               "unset it to serve /metrics alone (web.metrics_without_login = True, summed "
               "over the workers), or use the controller (milter-manager-ctl)")
    security = configuration.security
    if security.privilege_mode and any(milter.command for milter in configuration.enabled_milters):
        refuse(security, "privilege_mode",
               f"starting child milters (milter.command) is not available with "
               f"manager.n_workers = {manager.n_workers} yet; start them yourself or unset one")
    return found


def worker_command(plugin_options, twistd_options):
    """The argument list that starts one worker: twistd in the foreground, the same options."""
    twistd = twistd_options or {}
    arguments = [sys.executable, "-c", TWISTD, "-n", "--pidfile="]
    daemonized = not (twistd.get("nodaemon") or twistd.get("debug"))
    logfile = twistd.get("logfile")
    if daemonized and not logfile:
        logfile = "twistd.log"  # where twistd logs a daemon by default
    if logfile:
        arguments.append(f"--logfile={logfile if logfile == '-' else os.path.abspath(logfile)}")
    if twistd.get("syslog"):
        arguments.append("--syslog")
        if twistd.get("prefix"):
            arguments.append(f"--prefix={twistd['prefix']}")
    if twistd.get("logger"):
        arguments.append(f"--logger={twistd['logger']}")
    if twistd.get("reactor"):
        arguments.append(f"--reactor={twistd['reactor']}")
    arguments.append("milter-manager")
    arguments.extend(plugin_arguments(plugin_options))
    return arguments


def plugin_arguments(options):
    """The `milter-manager` options that load the configuration options loaded, nothing else."""
    arguments = []
    if options.path is not None:
        arguments += ["--config", os.path.abspath(options.path)]
    elif options["config-dir"]:
        arguments += ["--config-dir", os.path.abspath(options["config-dir"])]
    for option, _, _ in _OVERRIDES:
        if options[option] is not None:
            arguments += [f"--{option}", str(options[option])]
    for flag, *_ in _FLAG_OVERRIDES:
        if options[flag] and flag not in ("daemon", "no-daemon"):
            arguments.append(f"--{flag}")
    return arguments


# ---------------------------------------------------------------- the supervisor


class WorkerProcess(protocol.ProcessProtocol):
    """The supervisor's end of one worker process."""

    def __init__(self, supervisor, number):
        self.supervisor = supervisor
        self.number = number
        self.pid = None
        self.started = None
        self.channel = None  # controller.channel.WorkerChannel, when the supervisor asks it
        self.ended = defer.Deferred()  # fires with the exit status (or -signal) at exit

    def connectionMade(self):
        self.pid = self.transport.pid

    def processEnded(self, reason):
        value = reason.value
        status = -value.signal if getattr(value, "signal", None) else (value.exitCode or 0)
        self.supervisor.worker_ended(self, status)
        self.ended.callback(status)

    def signal(self, name):
        try:
            self.transport.signalProcess(name)
        except Exception:  # already gone: processEnded follows
            pass


class SupervisorService(TwistdService):
    """The process twistd starts when manager.n_workers > 0: listens, then runs the workers.

    plugin_options are our parsed Options (for the worker's command line),
    spawn a reactor.spawnProcess replacement for tests.
    """

    log = Logger(namespace="miltermanager.workers")

    def __init__(self, reactor, configuration, load=None, twistd_options=None,
                 plugin_options=None, command=None, clock=None):
        super().__init__(reactor, configuration, load=load, twistd_options=twistd_options)
        self.clock = clock or reactor
        self.n_workers = configuration.manager.n_workers
        self.command = command or worker_command(plugin_options, twistd_options)
        self.workers = {}  # number -> WorkerProcess running now
        self.restarts = {}  # number -> the pending restart's DelayedCall
        self.delays = {}  # number -> the delay before its next quick restart
        self.restart_counts = {}  # number -> how many times it was restarted
        self.stopping = False
        self.listen_fd = None
        # The controller and /metrics ask the workers over a channel each (controller.channel).
        self.with_channels = (configuration.controller.connection_spec is not None
                              or configuration.web.connection_spec is not None)
        if configuration.web.connection_spec is not None:
            from .controller.supervisor import WorkersScrape

            self.web_scrape = WorkersScrape(self)

    def _build_controller(self, clock):
        from .controller.supervisor import SupervisorController

        return SupervisorController(self, clock)

    def privilegedStartService(self):
        # Listen, pid file, cleanup process, drop privileges: as a single manager does.
        super().privilegedStartService()
        # The workers accept; this process only keeps the socket open for them.
        self.factory.remove_port(self.port)
        self.port.stopReading()
        self.listen_fd = self.port.fileno()

    def startService(self):
        if self.port is None:
            self.privilegedStartService()
        service.Service.startService(self)
        for number, handler in ((signal.SIGHUP, self._on_sighup),
                                (signal.SIGUSR1, self._on_sigusr1)):
            self._previous_handlers[number] = signal.signal(number, handler)
        self.log.info("[workers][start] listening on {spec}; starting {n} workers",
                      spec=self.configuration.manager.connection_spec, n=self.n_workers)
        self.reactor.callWhenRunning(self._start_all)

    def _start_all(self):
        for number in range(1, self.n_workers + 1):
            if not self.stopping:
                self.start_worker(number)

    def start_worker(self, number):
        """Start worker number on the listening socket."""
        self.restarts.pop(number, None)
        worker = WorkerProcess(self, number)
        env = dict(os.environ)
        env[WORKER_ENV] = str(number)
        env[LISTEN_FD_ENV] = str(LISTEN_FD)
        child_fds = {0: "w", 1: 1, 2: 2, LISTEN_FD: self.listen_fd}
        theirs = None
        try:
            if self.with_channels:
                worker.channel = WorkerChannel(self.clock)
                theirs = open_channel(self.reactor, worker.channel)
                child_fds[CONTROL_FD] = theirs.fileno()
                env[CONTROL_FD_ENV] = str(CONTROL_FD)
            self.reactor.spawnProcess(worker, self.command[0], self.command, env=env,
                                      childFDs=child_fds)
        except OSError as error:
            self.log.error("[workers][error] cannot start worker {number}: {error}",
                           number=number, error=error)
            _close_channel(worker)
            self._restart_later(number)
            return None
        finally:
            if theirs is not None:
                theirs.close()  # the worker has its own copy
        worker.started = self.clock.seconds()
        self.workers[number] = worker
        self.log.info("[workers][started] worker {number} is pid {pid}", number=number,
                      pid=worker.pid)
        return worker

    def worker_ended(self, worker, status):
        """A worker exited: restart it, unless we are stopping."""
        from .launcher import status_text

        if self.workers.get(worker.number) is worker:
            del self.workers[worker.number]
        _close_channel(worker)
        if self.stopping:
            self.log.info("[workers][stopped] worker {number} (pid {pid}) {how}",
                          number=worker.number, pid=worker.pid, how=status_text(status))
            return
        self.log.error("[workers][exit] worker {number} (pid {pid}) {how}; restarting it",
                       number=worker.number, pid=worker.pid, how=status_text(status))
        self.restart_counts[worker.number] = self.restart_counts.get(worker.number, 0) + 1
        if self.clock.seconds() - worker.started >= MIN_UPTIME:
            self.delays.pop(worker.number, None)
            self.start_worker(worker.number)
        else:
            self._restart_later(worker.number)

    def _restart_later(self, number):
        delay = self.delays.get(number, FIRST_RESTART_DELAY)
        self.delays[number] = min(delay * 2, MAX_RESTART_DELAY)
        self.log.warn("[workers][backoff] worker {number} died soon after its start: "
                      "restarting it in {delay} s", number=number, delay=delay)
        self.restarts[number] = self.clock.callLater(delay, self.start_worker, number)

    def signal_workers(self, name):
        """Send signal name ("HUP", "TERM", ...) to every running worker."""
        for worker in list(self.workers.values()):
            worker.signal(name)

    def _on_sighup(self, number, frame):
        self.reactor.callFromThread(self.reload)

    def _on_sigusr1(self, number, frame):
        self.reactor.callFromThread(self.reopen_logs)

    def reload(self):
        """SIGHUP: every worker reloads; the supervisor takes the new log settings.

        (The controller's reload asks the workers over their channels and
        answers how each did: controller.supervisor.)
        """
        self.log.info("[workers][reload] asking {n} workers to reload", n=len(self.workers))
        self.signal_workers("HUP")
        return defer.succeed(not self.reload_own())

    def reload_own(self, log_errors=False):
        """Load the configuration again for the supervisor itself: [] once it is in use.

        Else why not, as lines, logged with log_errors (on SIGHUP each worker
        logs them itself).
        """
        if self.load is None:
            return ["no configuration to load again"]
        try:
            configuration = self.load()
            problems = startup_problems(configuration)
        except ConfigurationError as error:
            problems = [error]
        lines = [line for error in problems for line in error_lines(error)]
        if lines:
            if log_errors:
                for line in lines:
                    self.log.error("[reload][error] {error}", error=line)
                self.log.error("[reload][error] keeping the running configuration")
            return lines
        if configuration.manager.n_workers != self.n_workers:
            self.log.warn("[reload][restart-needed] manager.n_workers changed from {before} to "
                          "{after}: it takes effect at the next start", before=self.n_workers,
                          after=configuration.manager.n_workers)
        self.configuration = configuration
        self._configure_log(configuration, "reload")
        self.log.info("[workers][reload] the supervisor uses the new configuration")
        return []

    def reopen_logs(self):
        super().reopen_logs()
        self.signal_workers("USR1")

    def stopService(self):
        """SIGTERM: stop every worker (they drain), then close the socket and the pid file."""
        service.Service.stopService(self)
        self.stopping = True
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers.clear()
        for call in self.restarts.values():
            if call.active():
                call.cancel()
        self.restarts.clear()
        workers = list(self.workers.values())
        self.log.info("[workers][stop] stopping {n} workers", n=len(workers))
        for worker in workers:
            worker.signal("TERM")
        killing = self.clock.callLater(DRAIN_TIMEOUT + STOP_GRACE, self._kill, workers)
        waiting = defer.DeferredList([worker.ended for worker in workers])

        def gone(_):
            if killing.active():
                killing.cancel()
            return self._close()

        return waiting.addCallback(gone)

    def _kill(self, workers):
        for worker in workers:
            if worker.ended.called:
                continue
            self.log.error("[workers][kill] worker {number} (pid {pid}) did not stop in time",
                           number=worker.number, pid=worker.pid)
            worker.signal("KILL")

    def _close(self):
        from .process import remove_pid_file

        stopping = self._close_controller()
        stopping.addCallback(lambda _: self._stop_web())
        if self.port is not None:
            port, self.port = self.port, None
            stopping.addCallback(lambda _: port.stopListening())
            stopping.addErrback(self._log_failure,
                                "[stop][error] cannot close the listening socket")
        if self.pid_file is not None:
            remove_pid_file(self.pid_file, os.getpid(), None if self._cleaner else self.log)
        return stopping


def _close_channel(worker):
    channel, worker.channel = worker.channel, None
    if channel is not None and channel.transport is not None:
        channel.transport.loseConnection()


# ---------------------------------------------------------------- a worker


class WorkerService(TwistdService):
    """A manager that serves on the listening socket it inherited from the supervisor."""

    def __init__(self, reactor, configuration, number, load=None, twistd_options=None,
                 listen_fd=None, clock=None):
        super().__init__(reactor, configuration, load=load, twistd_options=twistd_options,
                         clock=clock)
        self.number = number
        self.listen_fd = listen_fd if listen_fd is not None else int(
            os.environ.get(LISTEN_FD_ENV, LISTEN_FD))
        control = os.environ.get(CONTROL_FD_ENV)
        self.control_fd = int(control) if control and control.isdigit() else None
        self._stdin = None
        # Not for the child milters this worker may start or anything else it runs.
        for name in (WORKER_ENV, LISTEN_FD_ENV, CONTROL_FD_ENV):
            os.environ.pop(name, None)
        # The supervisor's /metrics adds up the workers' own counts.
        self.metrics = None
        if self.control_fd is not None and configuration.web.connection_spec is not None:
            from .metrics import Metrics

            self.metrics = Metrics(self.factory)

    def start_logging(self, syslog_path=None):
        self.log_router = WorkerLogRouter(self.number, twistd_base(self.twistd_options),
                                          syslog_path or SYSLOG_PATH)
        self._configure_log(self.configuration, "log")
        return self.log_router

    def privilegedStartService(self):
        service.Service.privilegedStartService(self)
        self.port = adopt_listening_socket(self.reactor, self.listen_fd, self.factory)
        self.factory.add_port(self.port)

    def startService(self):
        super().startService()
        self.reactor.callWhenRunning(self._watch_supervisor)
        if self.metrics is not None:
            self.factory.add_observer(self.metrics)
            self.metrics.start()
        if self.control_fd is not None:
            from .controller.channel import WorkerControl, serve_channel

            fd, self.control_fd = self.control_fd, None
            try:
                serve_channel(self.reactor, fd, WorkerControl(self, self.metrics))
            except OSError as error:
                self.log.error("[worker][error] cannot use the supervisor's channel (fd "
                               "{fd}): {error}; the controller and /metrics will not reach "
                               "worker {number}", fd=fd, error=error, number=self.number)
        self.log.info("[worker][start] worker {number} (pid {pid}) serving",
                      number=self.number, pid=os.getpid())

    def _watch_supervisor(self):
        try:
            self._stdin = SupervisorWatch(self.reactor, 0, self._orphaned)
        except OSError:
            return
        self.reactor.addReader(self._stdin)

    def _orphaned(self):
        self.log.error("[worker][orphan] the supervisor is gone: worker {number} stops",
                       number=self.number)
        self.reactor.stop()

    def stopService(self):
        watch, self._stdin = self._stdin, None
        if watch is not None:
            watch._gone = None
            self.reactor.removeReader(watch)
        if self.metrics is not None:
            self.metrics.stop()
        return super().stopService()

    def _rebind(self, settings):
        """A new connection_spec is the supervisor's to listen on: it needs a restart."""
        self.log.warn("[reload][restart-needed] manager.connection_spec changed to {spec}: "
                      "the workers keep serving the supervisor's socket until the next start",
                      spec=settings.connection_spec)
        return defer.succeed(None)


class SupervisorWatch:
    """IReadDescriptor on the pipe from the supervisor: its end (EOF or hang-up) calls gone().

    The reactor may report a hang-up without a read (epoll's EPOLLHUP):
    connectionLost then says it.
    """

    def __init__(self, reactor, fd, gone):
        os.set_blocking(fd, False)
        self.fd = fd
        self._gone = gone

    def gone(self):
        gone, self._gone = self._gone, None
        if gone is not None:
            gone()

    def fileno(self):
        return self.fd

    def logPrefix(self):
        return "supervisor"

    def doRead(self):
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            self.gone()
            from twisted.internet.main import CONNECTION_DONE

            return CONNECTION_DONE
        return None

    def connectionLost(self, reason):
        self.gone()


def adopt_listening_socket(reactor, fd, factory):
    """A listening port for the inherited socket fd (TCP or UNIX); fd itself is closed.

    Twisted's adopted UNIX port would chmod the socket file to 0666 and
    unlink it at close; the supervisor owns the file, so the port is told
    it has none (twisted_internals.forget_socket_file) before it starts.
    The socket is made non-blocking here: Twisted's adopted port does not,
    and a blocking one would hang the worker in accept() whenever another
    worker took the connection first.
    """
    os.set_blocking(fd, False)
    probe = socket.socket(fileno=os.dup(fd))
    family = probe.family
    path = probe.getsockname() if family == socket.AF_UNIX else None
    probe.close()
    try:
        if family == socket.AF_UNIX and path:
            from twisted.internet import unix

            from .twisted_internals import forget_socket_file, read_plainly

            port = unix.Port._fromListeningDescriptor(reactor, fd, factory)
            forget_socket_file(port, path)
            read_plainly(port)
            port.startListening()
        else:
            port = reactor.adoptStreamPort(fd, family, factory)
    finally:
        os.close(fd)
    return port


class WorkerLogRouter(LogRouter):
    """LogRouter whose lines carry the worker's number in their system field."""

    def __init__(self, number, base=None, syslog_path=SYSLOG_PATH):
        super().__init__(base, syslog_path)
        self.number = number
        self.tag = f"worker {number}"

    def __call__(self, event):
        if upstream_level(event) not in self.levels:
            return
        event = dict(event)
        event["log_system"] = f"{self.tag} {_system(event)}"
        for destination in self._destinations:
            destination(event)

    def statistics(self, *lines):
        text = None
        for destination in self._destinations:
            if isinstance(destination, (Stream, LogFile)):
                if text is None:
                    prefix = f"{formatTime(time.time())} [{self.tag} {STATISTICS}#info] "
                    text = "".join([f"{prefix}{line}\n" for line in lines])
                _write_text(destination.stream if isinstance(destination, Stream)
                            else destination._file, text)
            else:
                destination.statistics(*lines)  # syslog: the pid tells the workers apart


def _system(event):
    """What eventAsText shows in brackets: log_system, else NAMESPACE#LEVEL."""
    system = event.get("log_system")
    if system is not None:
        return system
    level = event.get("log_level")
    return f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
