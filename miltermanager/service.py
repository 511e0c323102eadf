"""The running manager: start and stop in twistd's order, signals, and reloading on SIGHUP.

ManagerService is what `twistd milter-manager` runs. In twistd's order:

1. makeService builds it (the configuration is loaded and checked already);
   setServiceParent makes its LogRouter twistd's log observer.
2. twistd daemonizes, then privilegedStartService: setrlimit(NOFILE) to
   manager.max_file_descriptors, listen on manager.connection_spec
   (listening.py), write manager.pid_file, then drop privileges to
   security.effective_user/group (upstream's order; process.py). Files
   root made that the effective user might not be able to remove (the UNIX
   socket, the pid file) are left to a small cleanup process forked before
   dropping: it waits for this process to exit and removes them (see
   process.spawn_cleaner).
3. startService: SIGHUP reloads, SIGUSR1 reopens the log file; the
   `event_loop_created` hooks run once the reactor runs.
4. stopService (SIGTERM): stop listening, then wait for the MTA connections
   in flight to end, up to DRAIN_TIMEOUT, so no message is cut off
   (factory.ManagerFactory.drain).

Each MTA connection gets a ManagerSession on the configuration current when
it connected and keeps it to the end: a reload swaps `factory.configuration`
for new connections only (see ManagerService.reload).
"""

import os
import signal
import stat

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, Logger

from . import connection_spec
from .config import ConfigurationError
from .config.model import located
from .factory import ManagerFactory
from .launcher import configuration_problems, reconfigured, start_launcher
from .listening import cannot_listen_reason, listen_endpoint, listen_problem
from .logs import LogRouter
from .paths import directory_problem
from .process import (
    StartError, drop_privileges, max_file_descriptors_problem, remove_pid_file, resolve_identity,
    set_max_file_descriptors, spawn_cleaner, switch_problem, write_pid_file,
)

# How long SIGTERM waits for MTA connections in flight before closing them. Postfix keeps a
# milter connection for a whole SMTP session, which may idle; messages in flight finish
# well within this, and the MTA applies its milter_default_action to what is left.
DRAIN_TIMEOUT = 30.0

# Settings read only at start: a reload that changes them says they need a restart.
RESTART_SETTINGS = (
    ("manager", "daemon"), ("manager", "pid_file"), ("manager", "max_file_descriptors"),
    ("manager", "n_workers"), ("security", "effective_user"), ("security", "effective_group"),
    *(("controller", name) for name in (
        "connection_spec", "unix_socket_mode", "unix_socket_group",
        "remove_unix_socket_on_create", "remove_unix_socket_on_close", "trace_sessions")),
    ("web", "connection_spec"),
)


def hooks(configuration, name):
    """The functions registered with @manager.<name> (maintained, event_loop_created)."""
    return [hook.function for hook in getattr(configuration.manager, f"{name}_hooks")]


def error_lines(error):
    """Every problem a ConfigurationError reports, one "FILE:LINE: reason" per item."""
    errors = getattr(error, "errors", None)
    return [str(item) for item in errors] if errors else [str(error)]


class ManagerService(service.Service):
    """Listens for the MTA on the current configuration and reloads it on SIGHUP.

    load() re-reads the same files with the same command-line overrides and
    returns a new Configuration or raises ConfigurationError. twistd_options
    are twistd's own (for where its log would go), or None.
    """

    name = "milter-manager"
    log = Logger()
    statistics = None  # the StatisticsObserver while the statistics log level is on
    web_scrape = None  # the supervisor's (workers.py): what /metrics gathers from its workers

    def __init__(self, reactor, configuration, load=None, twistd_options=None, clock=None):
        self.reactor = reactor
        self.configuration = configuration
        self.load = load
        self.twistd_options = twistd_options
        self.factory = ManagerFactory(configuration, reactor, clock)
        self.port = None
        self.web = None  # the web endpoint (metrics.WebEndpoint) while web.connection_spec
        self.pid_file = None  # the pid file we wrote
        self.log_router = None
        self._cleaner = None
        self._reloading = defer.DeferredLock()
        self._previous_handlers = {}
        self.reload_errors = []  # why the last reload kept the running configuration
        # The controller socket (miltermanager.controller), when controller.connection_spec is set.
        self.controller = None
        self.controller_port = None
        # The web pages show the same status and trace: the Controller serves both.
        if configuration.controller.connection_spec is not None or (
                configuration.web.connection_spec is not None
                and configuration.web.password_file is not None):
            self.controller = self._build_controller(clock or reactor)

    def _build_controller(self, clock):
        """The Controller the controller socket and the web pages act on."""
        from .controller.server import Controller

        controller = Controller(self, clock)
        controller.observe()
        return controller

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
            if tag == "log":  # at start: a log nobody reads is no way to run
                raise StartError(_located(configuration.log, "path", _log_path_problem(
                    error.filename) or f"cannot open it: {error.strerror}")) from None
            self.log.error("[{tag}][error] cannot open the log file {path}: {error}; "
                           "logging where it did", tag=tag, path=error.filename,
                           error=error.strerror)
            return
        for note in notes:
            self.log.warn(note)
        self._follow_statistics_level("statistics" in self.log_router.levels)

    def _follow_statistics_level(self, on):
        """Attach the statistics observer while the statistics level is on, else detach it.

        Off, the sessions' event stream has one observer fewer (none at all,
        unless something else listens): no statistics line is even formatted.
        """
        from .statistics import StatisticsObserver

        observer = self.statistics
        if on and observer is None:
            self.statistics = StatisticsObserver(self._in_evaluation_mode,
                                                 self.log_router.statistics)
            self.factory.add_observer(self.statistics)
        elif not on and observer is not None:
            self.factory.remove_observer(observer)
            self.statistics = None

    def _in_evaluation_mode(self, name):
        return any(milter.name == name and milter.evaluation_mode
                   for milter in self.factory.configuration.milters)

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
        try:
            self.port = _now(listen_endpoint(self.reactor, manager).listen(self.factory))
        except CannotListenError as error:
            raise StartError(_located(manager, "connection_spec", cannot_listen_reason(error),
                                      manager.connection_spec)) from None
        self.factory.add_port(self.port)
        self._start_web()
        pid_file = manager.pid_file
        if pid_file is not None:
            try:
                write_pid_file(pid_file)
            except OSError as error:
                self._close_port_now()
                self._stop_web()
                raise StartError(_located(
                    manager, "pid_file", directory_problem(pid_file)
                    or f"cannot write it: {error.strerror}", pid_file)) from None
            self.pid_file = pid_file
        # Forked while still root: it starts child milters (milter.command) later on.
        self.factory.launcher = start_launcher(self.configuration, self.reactor)
        if security.effective_user is not None or security.effective_group is not None:
            socket_path = getattr(self.port, "path", None)
            if not getattr(self.port, "remove_on_close", False):
                socket_path = None
            if os.getuid() == 0:
                self._cleaner = spawn_cleaner(socket_path, self.pid_file)
            if self._cleaner is not None and socket_path is not None:
                self.port.cleaner = True
            try:
                dropped = drop_privileges(security.effective_user, security.effective_group)
            except StartError:
                self._undo_start()
                raise
            if dropped:
                self.log.info(
                    "[manager][privileges] now uid {uid} gid {gid}{cleaner}", uid=os.getuid(),
                    gid=os.getgid(), cleaner=(
                        f"; process {self._cleaner[1]} removes the socket and pid file "
                        "after we exit" if self._cleaner else ""))
        self._start_controller()

    def _start_controller(self):
        """Listen on controller.connection_spec, after dropping privileges (upstream's order).

        The Controller may exist without its socket: the web pages use it.
        """
        if self.controller is None or self.configuration.controller.connection_spec is None:
            return
        from .controller.server import ControllerFactory

        settings = self.configuration.controller
        try:
            self.controller_port = _now(listen_endpoint(self.reactor, settings).listen(
                ControllerFactory(self.controller)))
        except CannotListenError as error:
            self._undo_start()
            raise StartError(_located(settings, "connection_spec", cannot_listen_reason(error),
                                      settings.connection_spec)) from None
        self.log.info("[controller][start] listening on {spec}", spec=settings.connection_spec)

    def _start_web(self):
        """Listen on web.connection_spec (before dropping privileges): pages and /metrics."""
        web = self.configuration.web
        if web.connection_spec is None:
            return
        try:
            from .web import app  # twisted.web and prometheus_client only when asked for

            self.web = _now(app.start(self, self.reactor, web, self.web_scrape))
        except ImportError as error:
            self._close_port_now()
            raise StartError(_located(web, "connection_spec", f"the web interface needs the "
                                      f"Python package prometheus_client ({error})")) from None
        except CannotListenError as error:
            self._close_port_now()
            raise StartError(_located(web, "connection_spec", cannot_listen_reason(error))) \
                from None
        except ValueError as error:  # TLS files that cannot be used
            self._close_port_now()
            raise StartError(str(error)) from None
        self.log.info("[web][start] web interface and /metrics on {spec}",
                      spec=web.connection_spec)

    def _stop_web(self):
        web, self.web = self.web, None
        if web is None:
            return defer.succeed(None)
        return web.stop().addErrback(self._log_failure,
                                     "[web][error] cannot close the web endpoint's socket")

    def _undo_start(self):
        """Start failed after listening: close the sockets and remove the pid file now."""
        self._close_port_now()
        self._stop_web()
        if self.pid_file is not None:
            remove_pid_file(self.pid_file, os.getpid(), self.log)
            self.pid_file = None

    def _close_port_now(self):
        port, self.port = self.port, None
        self.factory.remove_port(port)
        defer.maybeDeferred(port.stopListening).addErrback(
            self._log_failure, "[manager][error] cannot close the listening socket")

    def _close_controller(self):
        port, self.controller_port = self.controller_port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening).addErrback(
            self._log_failure, "[controller][error] cannot close the controller socket")

    def startService(self):
        if self.port is None:
            self.privilegedStartService()
        super().startService()
        for number, handler in ((signal.SIGHUP, self._on_sighup),
                                (signal.SIGUSR1, self._on_sigusr1)):
            self._previous_handlers[number] = signal.signal(number, handler)
        self.reactor.callWhenRunning(self._event_loop_created)
        self.configuration.ldap.start(self.configuration, self.reactor)
        manager = self.configuration.manager
        self.log.info("[manager][start] listening on {spec}; {children}",
                      spec=manager.connection_spec, children=_children(self.configuration))

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
        stopping = self._close_controller()
        stopping.addCallback(lambda _: self._stop_web())
        if self.port is not None:
            port, self.port = self.port, None
            self.factory.remove_port(port)
            stopping.addCallback(lambda _: port.stopListening())
            # A socket that does not close cleanly must not cut the connections in flight.
            stopping.addErrback(self._log_failure,
                                "[stop][error] cannot close the listening socket")
        # No new connections from here on; those in flight finish their message.
        stopping.addCallback(lambda _: self.factory.drain(DRAIN_TIMEOUT, self.reactor))
        stopping.addErrback(self._log_failure,
                            "[stop][error] waiting for the MTA connections failed")
        # The connections are done with their policies: stop the LDAP searches' threads.
        stopping.addCallback(lambda _: self.configuration.ldap.stop())
        stopping.addErrback(self._log_failure, "[stop][error] stopping the LDAP lookups failed")
        if self.pid_file is not None:
            remove_pid_file(self.pid_file, os.getpid(), None if self._cleaner else self.log)
        return stopping

    def _log_failure(self, failure, text):
        """Errback: log failure under text; the chain goes on with None."""
        self.log.failure(text, failure)

    # ------------------------------------------------------------ reload

    def reload(self):
        """Re-read the configuration; new MTA connections use it, those in flight keep theirs.

        Fires with True when the new configuration is in use. A file with
        errors, or a new connection_spec that cannot be listened on, keeps
        the running configuration (False) and logs why. Reloads run one at
        a time, in the order asked. It never fails: an unexpected error is
        logged, and the result still says which configuration is in use.
        """
        return self._reloading.run(self._reload_guarded)

    def _reload_guarded(self):
        running = self.configuration

        def unexpected(failure):
            self.log.failure("[reload][error] reloading failed", failure)
            if self.configuration is running:
                self.reload_errors = [f"unexpected error: {failure.getErrorMessage()}"]
                self.log.error("[reload][error] keeping the running configuration")
                return False
            # Failed after the swap (applying the log settings, say): say what is in use.
            self.log.error("[reload][error] the new configuration is in use, "
                           "but applying it did not finish")
            return True

        return defer.maybeDeferred(self._reload).addErrback(unexpected)

    def _reload(self):
        self.log.info("[reload][start] reloading {files}",
                      files=", ".join(self.configuration.files) or "the built-in configuration")
        try:
            configuration = self.load()
            problems = startup_problems(configuration)
        except ConfigurationError as error:
            problems = [error]
        self.reload_errors = []
        if problems:
            for error in problems:
                for line in error_lines(error):
                    self.reload_errors.append(line)
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
            self.reload_errors = [f"cannot listen on {new.connection_spec}: "
                                  f"{failure.getErrorMessage()}"]
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
            # The new socket serves already: the old one failing to close is no reason to
            # report the reload as failed.
            return defer.maybeDeferred(old.stopListening).addErrback(
                self._log_failure, "[reload][error] cannot close the previous listening socket")

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
        # A fresh policy cache; the LDAP connections stay when their settings did not change.
        configuration.ldap.start(configuration, self.reactor, previous=old.ldap)
        self._configure_log(configuration, "reload")
        reconfigured(self.factory.launcher, configuration)
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
    """ConfigurationErrors for what only this system can tell: do the users and groups exist?

    Warnings that need the whole configuration, command-line overrides
    included (the launcher's settings, n_workers), are added to
    configuration.warnings and logged.
    """
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
    errors, warnings = configuration_problems(configuration)
    problems.extend(errors)
    from .workers import problems as worker_problems

    problems.extend(worker_problems(configuration))
    warnings.extend(_without_effect(configuration.manager))
    from .web.app import problems as web_problems

    for name, text in web_problems(configuration.web, configuration.security.effective_user):
        problems.append(ConfigurationError(text, configuration.web.origins.get(name)))
    controller = configuration.controller
    if (controller.connection_spec is None and configuration.web.password_file is None
            and "trace_sessions" in controller.origins):
        warnings.append(located(controller.origins["trace_sessions"],
                                "controller.trace_sessions: no effect without a controller "
                                "(controller.connection_spec) or the web pages "
                                "(web.password_file)"))
    # The loader logged its own warnings already; these need the whole configuration,
    # command-line overrides included.
    for text in warnings:
        if text not in configuration.warnings:
            configuration.warnings.append(text)
            ManagerService.log.warn("[configuration][warning] {text}", text=text)
    return problems


def _without_effect(manager):
    """Warnings for manager.* settings that the rest of the configuration leaves idle."""
    def said(name, text):
        origin, value = manager.origins.get(name), getattr(manager, name)
        shown = repr(getattr(value, "label", value))  # a Status as it is written
        return located(origin, f"manager.{name} = {shown}: {text}")

    checking = manager.connection_check_interval > 0 and manager.connection_checkers
    if manager.connection_check_interval > 0 and not manager.connection_checkers:
        yield said("connection_check_interval",
                   "no connection checker is registered (manager.use_netstat_connection_"
                   "checker() or @manager.define_connection_checker): nothing is checked")
    if manager.connection_checkers and manager.connection_check_interval <= 0:
        yield (f"connection checkers {', '.join(sorted(manager.connection_checkers))} never "
               "run: manager.connection_check_interval is 0")
    if "fallback_status_at_disconnect" in manager.origins and not checking:
        yield said("fallback_status_at_disconnect",
                   "no effect without connection checks (a connection checker and "
                   "connection_check_interval > 0)")
    if manager.report_memory_statistics and not manager.maintenance_interval:
        yield said("report_memory_statistics",
                   "never reported: manager.maintenance_interval is 0 (no maintenance)")


def start_problems(configuration):
    """Everything that would stop this configuration from starting now, as ConfigurationErrors.

    startup_problems, and what only an attempt tells: can we switch to the
    user and group, create the pid file and open the log file, raise the
    file limit, listen on manager.connection_spec (a test bind, closed at
    once). For --check-config and the checks before twistd starts anything;
    each is worded as the failure at start (StartError) would be.
    """
    problems = startup_problems(configuration)
    manager, security, log = configuration.manager, configuration.security, configuration.log
    try:
        resolve_identity(security.effective_user, security.effective_group)
    except StartError:
        pass  # startup_problems named it
    else:
        reason = switch_problem(security.effective_user, security.effective_group)
        if reason is not None:
            name = "effective_user" if security.effective_user is not None else "effective_group"
            problems.append(ConfigurationError(reason, security.origins.get(name)))
    for section, name, reason in (
            (manager, "max_file_descriptors",
             max_file_descriptors_problem(manager.max_file_descriptors)),
            (manager, "connection_spec", listen_problem(manager)),
            (configuration.controller, "connection_spec",
             configuration.controller.connection_spec and listen_problem(
                 configuration.controller)),
            (configuration.web, "connection_spec", _web_listen_problem(configuration.web)),
            (manager, "pid_file", manager.pid_file and directory_problem(manager.pid_file)),
            (log, "path", _log_path_problem(log.path))):
        if reason:
            problems.append(ConfigurationError(
                _located(section, name, reason), section.origins.get(name)))
    return problems


def _web_listen_problem(web):
    if web.connection_spec is None:
        return None
    from .metrics import WebSocketSettings

    return listen_problem(WebSocketSettings(web.connection_spec))


def _located(section, name, reason, value=None):
    """'manager.pid_file /run/x.pid: reason': the setting, its value and the cause."""
    value = getattr(section, name) if value is None else value
    return f"{section.SECTION}.{name} {value}: {reason}"


def _log_path_problem(path):
    if path in (None, "-"):
        return None
    if os.path.isdir(path):
        return "is a directory"
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else "the file is not writable"
    return directory_problem(path)
