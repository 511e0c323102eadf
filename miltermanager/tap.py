"""`twistd milter-manager`: the command-line options, and makeService.

    twistd [twistd options] milter-manager [milter-manager options]

twistd's own options come before `milter-manager`, ours after it. Where the
two overlap:

- `-n` (twistd) runs in the foreground. `--no-daemon` does the same and
  `--daemon` makes twistd daemonize even with `-n`; without either, a file's
  `manager.daemon = False` also keeps it in the foreground. Without any of
  them twistd daemonizes (`twistd milter-manager`).
- `--pidfile` (twistd) is twistd's own pid file. Unless it is given there is
  none in the foreground, and when daemonized
  /run/milter-manager/milter-manager.pid if that directory is writable and
  manager.pid_file is unset (never twistd's ./twistd.pid). `--pid-file` /
  `manager.pid_file` is upstream's: written after listening, before
  dropping privileges, removed at stop. Use one of them.
- `-u/--uid`, `-g/--gid` (twistd) switch after our start-up, so files made
  as root are left behind at stop; prefer `--user-name`/`--group-name`
  (`security.effective_user/effective_group`), which switch after listening
  and leave the socket and pid file to a cleanup process.
- `-l/--logfile`, `--syslog` (twistd) say where the log goes when `log.path`
  is unset; `--log-path`, `--log-level`, `--syslog` (ours, after
  `milter-manager`) set `log.*`. `--logger` (twistd) replaces our logging and
  makes `log.*` do nothing.

Every override goes through the configuration's checks (`config.set_value`)
and is shown by `--show-config` with the option as its origin.

A configuration that cannot start (an error in a file, an unknown user, an
address in use, ...) stops twistd before it starts anything, with one line
per problem on standard error and exit status 1 (`refuse`); only a wrong
command line gets twistd's usage text.
"""

import getopt
import os
import sys

from twisted.logger import Logger
from twisted.python import usage

import miltermanager
from miltermanager.paths import directory_problem
from miltermanager.process import StartError, remove_pid_file, settle_heap
from miltermanager.service import ManagerService, error_lines, start_problems, startup_problems
from miltermanager.twisted_internals import lean_event_loop

# twistd's --pidfile when daemonized and neither --pidfile nor manager.pid_file is given.
DAEMON_PID_FILE = "/run/milter-manager/milter-manager.pid"
_log = Logger(namespace="miltermanager.tap")

# option -> (section, setting); the value is the option's text unless noted in _value().
_OVERRIDES = (
    ("connection-spec", "manager", "connection_spec"),
    ("fallback-status", "manager", "fallback_status"),
    ("unix-socket-mode", "manager", "unix_socket_mode"),
    ("unix-socket-group", "manager", "unix_socket_group"),
    ("pid-file", "manager", "pid_file"),
    ("n-workers", "manager", "n_workers"),
    ("log-level", "log", "level"),
    ("log-path", "log", "path"),
    ("syslog-facility", "log", "syslog_facility"),
    ("user-name", "security", "effective_user"),
    ("group-name", "security", "effective_group"),
)
# flag -> (section, setting, value)
_FLAG_OVERRIDES = (
    ("verbose", "log", "level", "all"),
    ("syslog", "log", "use_syslog", True),
    ("no-syslog", "log", "use_syslog", False),
    ("daemon", "manager", "daemon", True),
    ("no-daemon", "manager", "daemon", False),
)


class Options(usage.Options):
    """Options of `twistd milter-manager`, named as upstream's milter-manager.

    After parsing, `configuration` holds the loaded Configuration with the
    command-line overrides applied; `load_configuration()` loads it again
    the same way (a reload).
    """

    synopsis = "[twistd options] milter-manager [options]"
    optParameters = [
        ["config", "c", None,
         "Configuration file (a directory means its milter-manager.conf). Default: "
         "/etc/milter-manager/milter-manager.conf if it exists, else built-in defaults"],
        ["config-dir", None, None,
         "Directory holding milter-manager.conf, as upstream's option "
         "($MILTER_MANAGER_CONFIG_DIR does the same)"],
        ["connection-spec", "s", None,
         "manager.connection_spec, where the MTA connects: unix:/path, "
         "inet:PORT@HOST, inet:PORT@[ADDR], inet6:... (default inet:10025@[127.0.0.1])"],
        ["fallback-status", None, None,
         "manager.fallback_status, the answer when no child milter can: "
         "accept, temporary-failure, reject, discard (default accept)"],
        ["log-level", None, None,
         "log.level: levels joined with |, from default, all, none, critical, error, "
         "warning, message, info, debug, statistics, profile, trace"],
        ["log-path", None, None, "log.path: the log file ('-': standard output)"],
        ["syslog-facility", None, None, "log.syslog_facility (mail, daemon, local0, ...)"],
        ["user-name", None, None,
         "security.effective_user: switch to it after listening (rather than twistd's "
         "-u, which leaves the socket and pid file behind at stop)"],
        ["group-name", None, None, "security.effective_group: switch to it after listening"],
        ["unix-socket-mode", None, None, "manager.unix_socket_mode, in octal (0660)"],
        ["unix-socket-group", None, None, "manager.unix_socket_group"],
        ["pid-file", None, None,
         "manager.pid_file, written after listening and removed at stop (twistd's own "
         "--pidfile, before milter-manager, is another file, none unless given)"],
        ["n-workers", None, None, "manager.n_workers"],
    ]
    optFlags = [
        ["show-config", None,
         "Print the resolved configuration, each value with where it was set, and exit"],
        ["check-config", None,
         "Check that the configuration can start and exit: 0 and 'configuration OK: FILE' "
         "(warnings on standard error), or 1 and every problem on its own line: errors with "
         "their FILE:LINE, unknown users and groups, missing directories, an address that "
         "cannot be bound now (a test bind, closed at once). For ExecStartPre="],
        ["check-reload", None,
         "As --check-config, for the configuration a running manager would reload on SIGHUP "
         "(ExecReload=): its address in use and what only a start does are not checked"],
        ["strict", None, "Make every configuration warning an error"],
        ["verbose", "v", "log.level = all"],
        ["syslog", None, "log.use_syslog = True"],
        ["no-syslog", None, "log.use_syslog = False"],
        ["daemon", None, "manager.daemon = True: daemonize, even with twistd's -n"],
        ["no-daemon", None, "manager.daemon = False: stay in the foreground, as twistd's -n"],
        ["version", None, "Print milter-manager's version and exit"],
    ]
    # Where the configuration is looked for without --config; tests point it elsewhere.
    default_config_directory = "/etc/milter-manager"
    # Where milter detection looks for installed milters; tests point it at a fake tree.
    detect_root = "/"

    configuration = None
    path = None  # the configuration file, None for the built-in configuration

    def opt_version(self):
        """Print milter-manager's version and exit."""
        print(f"milter-manager {miltermanager.__version__}")
        sys.exit(0)

    def postOptions(self):
        from miltermanager import config

        for first, second in (("syslog", "no-syslog"), ("daemon", "no-daemon"),
                              ("check-config", "check-reload"), ("config", "config-dir")):
            if self[first] and self[second]:
                raise usage.UsageError(f"give --{first} or --{second}, not both")
        try:
            self.path = config.locate(self["config"], self["config-dir"],
                                      default_directory=self.default_config_directory)
            configuration = self.load_configuration()
        except config.ConfigurationError as error:
            configuration, problems = None, [error]
        else:
            problems = self.problems(configuration)
        if self["check-config"] or self["check-reload"]:
            self._report_check(configuration, problems)
        if problems:
            refuse(problems)
        self.configuration = configuration
        if self["show-config"]:
            sys.stdout.write(config.dump(configuration))
            sys.stdout.flush()
            raise SystemExit(0)
        self._choose_daemon()
        self._choose_pidfile()

    def problems(self, configuration):
        """Why configuration cannot start (--check-reload: cannot be reloaded), as errors.

        --show-config shows a configuration a start would refuse for what it
        finds on this system now (e.g. the running manager's address in use),
        as a reload would load it. With --strict, each warning is one too.
        """
        from miltermanager.config import ConfigurationError

        from miltermanager.workers import worker_number

        # A worker serves the supervisor's socket: binding its address again would fail.
        if self["check-reload"] or worker_number() is not None or (
                self["show-config"] and not self["check-config"]):
            problems = startup_problems(configuration)
        else:
            problems = start_problems(configuration) + self._twistd_problems()
        if self["strict"]:
            problems += [ConfigurationError(f"{warning} (an error with --strict)")
                         for warning in configuration.warnings]
        return problems

    def load_configuration(self, custom=None):
        """Load the configuration file (or the built-in one) and apply the overrides.

        custom: a file read in place of milter-manager.custom.conf (None: that file).
        """
        from miltermanager import config

        load_paths = config.load_paths(
            self["config-dir"], default_directory=self.default_config_directory)
        if self.path is None:
            configuration = config.embedded(load_paths, detect_root=self.detect_root,
                                            overrides=self._apply_overrides, custom=custom)
        else:
            configuration = config.load(self.path, load_paths=load_paths,
                                        detect_root=self.detect_root,
                                        overrides=self._apply_overrides, custom=custom)
        # Again, over what the custom file set: the command line wins.
        self._apply_overrides(configuration)
        return configuration

    def _apply_overrides(self, configuration):
        from miltermanager import config

        for option, section, name, value in self._overrides():
            config.set_value(getattr(configuration, section), name, value, origin=f"--{option}")

    def _overrides(self):
        for option, section, name in _OVERRIDES:
            value = self[option]
            if value is None:
                continue
            if option == "n-workers":
                try:
                    value = int(value)
                except ValueError:
                    pass  # the setting's check says what it wants
            elif option == "log-path" and value == "-":
                value = None
            yield option, section, name, value
        for flag, section, name, value in _FLAG_OVERRIDES:
            if self[flag]:
                yield flag, section, name, value

    def _report_check(self, configuration, problems):
        """--check-config, --check-reload: print the verdict and exit 0 or 1; nothing starts."""
        if problems:
            for problem in problems:
                for line in error_lines(problem):
                    sys.stderr.write(f"{line}\n")
            sys.stderr.flush()
            raise SystemExit(1)
        for warning in configuration.warnings:
            sys.stderr.write(f"warning: {warning}\n")
        sys.stderr.flush()
        sys.stdout.write(f"configuration OK: {self.path or 'built-in configuration'}\n")
        sys.stdout.flush()
        raise SystemExit(0)

    def _twistd_problems(self):
        """twistd's own --pidfile and --logfile, which it opens without a word on failure."""
        from miltermanager.config import ConfigurationError

        twistd = self.parent
        if twistd is None:
            return []
        problems = []
        for option in ("pidfile", "logfile"):
            path = twistd.get(option)
            if path and path != "-" and _given(twistd, option):
                reason = directory_problem(path)
                if reason is not None:
                    problems.append(ConfigurationError(f"--{option} {path}: {reason}"))
        return problems

    def _choose_daemon(self):
        """Tell twistd whether to daemonize, when --daemon, --no-daemon or the file says so."""
        twistd = self.parent
        manager = self.configuration.manager
        if twistd is None or "daemon" not in getattr(manager, "origins", {}):
            return
        if self["daemon"] or self["no-daemon"] or not manager.daemon:
            twistd["nodaemon"] = not manager.daemon
        # A file's daemon = True leaves it to twistd, which daemonizes unless -n was given.

    def _choose_pidfile(self):
        """twistd's pid file: only where asked, never ./twistd.pid by default.

        In the foreground there is none unless --pidfile is given. Daemonized,
        manager.pid_file is the pid file when set; else DAEMON_PID_FILE if its
        directory is writable (a second daemon then stops at twistd's check),
        else none. With security.effective_user or effective_group, twistd could
        not remove its file after the switch: DAEMON_PID_FILE becomes
        manager.pid_file instead, which the cleanup process removes.
        """
        from miltermanager import config

        twistd = self.parent
        if twistd is None or "pidfile" not in twistd or _given(twistd, "pidfile"):
            return
        daemon = not (twistd.get("nodaemon") or twistd.get("debug"))
        manager, security = self.configuration.manager, self.configuration.security
        twistd["pidfile"] = ""
        if not daemon or manager.pid_file is not None or directory_problem(DAEMON_PID_FILE):
            return
        if security.effective_user is None and security.effective_group is None:
            twistd["pidfile"] = DAEMON_PID_FILE
        else:
            config.set_value(manager, "pid_file", DAEMON_PID_FILE,
                             origin="the daemon's default, as the user switches")


def _given(twistd, option):
    """Whether twistd's own command line gave option (not just its default).

    usage.Options keeps no record of that: twistd's default is compared, and
    twistd's arguments (sys.argv, before the plugin's name) are parsed again
    with its own getopt tables to tell `--pidfile twistd.pid` from nothing.
    """
    defaults = {name: default for name, _, default, *_ in getattr(twistd, "optParameters", [])}
    if twistd.get(option) != defaults.get(option):
        return True
    try:
        given, _ = getopt.getopt(sys.argv[1:], twistd.shortOpt, twistd.longOpt)
    except (getopt.GetoptError, AttributeError):
        return False
    return any(name == f"--{option}" for name, _ in given)


def refuse(problems):
    """Stop twistd before it starts: each problem on one line on standard error, exit 1."""
    for problem in problems:
        for line in error_lines(problem):
            sys.stderr.write(f"milter-manager: {line}\n")
    sys.stderr.flush()
    raise SystemExit(1)


def makeService(options):
    """The manager service: listens for the MTA, reloads on SIGHUP (miltermanager.service).

    With manager.n_workers > 0, the supervisor of that many workers, and in
    each worker the worker's service (miltermanager.workers).
    """
    from twisted.internet import reactor

    from miltermanager import workers

    number = workers.worker_number()
    if number is not None:
        return workers.WorkerService(reactor, options.configuration, number,
                                     load=options.load_configuration,
                                     twistd_options=options.parent)
    if options.configuration.manager.n_workers:
        return workers.SupervisorService(reactor, options.configuration,
                                         load=options.load_configuration,
                                         twistd_options=options.parent, plugin_options=options)
    return TwistdService(reactor, options.configuration, load=options.load_configuration,
                         twistd_options=options.parent)


class TwistdService(ManagerService):
    """ManagerService that turns a failure to start into one line and exit 1 under twistd.

    The checks in postOptions catch what can be known before; what is left
    (the address taken since, a log file gone) fails here, after twistd has
    redirected standard error into the log and maybe daemonized. So the line
    goes to the log, to the original standard error, and, daemonized, to
    twistd's status pipe, whose reader (the process the user started)
    prints it. twistd's own pid file, if any, is removed as twistd would.

    It is also the process's own: it keeps the long-lived heap out of the
    garbage collector's full passes (process.settle_heap) once the reactor
    runs and after each reload, and takes the epoll reactor's lean event
    loop (twisted_internals.lean_event_loop).
    """

    def startService(self):
        super().startService()
        lean_event_loop(self.reactor)
        self.reactor.callWhenRunning(settle_heap)

    def _adopt(self, configuration):
        adopted = super()._adopt(configuration)
        settle_heap()
        return adopted

    def setServiceParent(self, parent):
        try:
            super().setServiceParent(parent)
        except StartError as error:
            self._stop_twistd(str(error))

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except StartError as error:
            self._stop_twistd(str(error))

    def _stop_twistd(self, line):
        twistd = self.twistd_options or {}
        _log.error("[manager][start][error] {line}", line=line)
        pipe = twistd.get("statusPipe")
        if pipe is not None:
            try:
                os.write(pipe, b"1 " + line.encode("utf-8", "backslashreplace")[:98])
                os.close(pipe)
            except OSError:
                pass
            twistd["statusPipe"] = None
        if twistd.get("pidfile"):
            remove_pid_file(twistd["pidfile"], os.getpid())
        stderr = sys.__stderr__
        if stderr is not None:
            try:
                stderr.write(f"milter-manager: {line}\n")
                stderr.flush()
            except (OSError, ValueError):
                pass
        raise SystemExit(1)
