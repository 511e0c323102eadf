"""`twistd milter-manager`: the command-line options, and makeService.

    twistd [twistd options] milter-manager [milter-manager options]

twistd's own options come before `milter-manager`, ours after it. Where the
two overlap:

- `-n` (twistd) runs in the foreground. `--no-daemon` does the same and
  `--daemon` makes twistd daemonize even with `-n`; without either, a file's
  `manager.daemon = False` also keeps it in the foreground. Without any of
  them twistd daemonizes (`twistd milter-manager`).
- `--pidfile` (twistd) is twistd's own pid file (twistd.pid when daemonized;
  `--pidfile=` for none). `--pid-file` / `manager.pid_file` is upstream's:
  written after listening, before dropping privileges, removed at stop.
  Use one of them.
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
"""

import sys

from twisted.python import usage

import miltermanager

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
         "--pidfile is another file: give --pidfile= to have only this one)"],
        ["n-workers", None, None, "manager.n_workers"],
    ]
    optFlags = [
        ["show-config", None,
         "Print the resolved configuration, each value with where it was set, and exit"],
        ["check-config", None,
         "Check the configuration and exit: 0 and 'configuration OK: FILE', or 1 and every "
         "error with its FILE:LINE. Listens on nothing (for ExecStartPre= and before a reload)"],
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

        for first, second in (("syslog", "no-syslog"), ("daemon", "no-daemon")):
            if self[first] and self[second]:
                raise usage.UsageError(f"give --{first} or --{second}, not both")
        try:
            self.path = config.locate(self["config"], self["config-dir"],
                                      default_directory=self.default_config_directory)
        except config.ConfigurationError as error:
            raise usage.UsageError(str(error)) from None
        if self["check-config"]:
            self._check_config()
        try:
            configuration = self.load_configuration()
        except config.ConfigurationError as error:
            raise usage.UsageError(str(error)) from None
        from miltermanager.service import startup_problems

        problems = startup_problems(configuration)
        if problems:
            raise usage.UsageError("\n".join(str(problem) for problem in problems))
        self.configuration = configuration
        if self["show-config"]:
            sys.stdout.write(config.dump(configuration))
            sys.stdout.flush()
            raise SystemExit(0)
        self._choose_daemon()

    def load_configuration(self):
        """Load the configuration file (or the built-in one) and apply the overrides."""
        from miltermanager import config

        load_paths = config.load_paths(
            self["config-dir"], default_directory=self.default_config_directory)
        if self.path is None:
            configuration = config.embedded(load_paths, detect_root=self.detect_root)
        else:
            configuration = config.load(self.path, load_paths=load_paths,
                                        detect_root=self.detect_root)
        for option, section, name, value in self._overrides():
            config.set_value(getattr(configuration, section), name, value, origin=f"--{option}")
        return configuration

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

    def _check_config(self):
        """--check-config: print the verdict and exit 0 or 1; nothing is started."""
        from miltermanager import config
        from miltermanager.service import error_lines, startup_problems

        try:
            problems = startup_problems(self.load_configuration())
        except config.ConfigurationError as error:
            problems = [error]
        if problems:
            for problem in problems:
                for line in error_lines(problem):
                    sys.stderr.write(f"{line}\n")
            sys.stderr.flush()
            raise SystemExit(1)
        sys.stdout.write(f"configuration OK: {self.path or 'built-in configuration'}\n")
        sys.stdout.flush()
        raise SystemExit(0)

    def _choose_daemon(self):
        """Tell twistd whether to daemonize, when --daemon, --no-daemon or the file says so."""
        twistd = self.parent
        manager = self.configuration.manager
        if twistd is None or "daemon" not in getattr(manager, "origins", {}):
            return
        if self["daemon"] or self["no-daemon"] or not manager.daemon:
            twistd["nodaemon"] = not manager.daemon
        # A file's daemon = True leaves it to twistd, which daemonizes unless -n was given.


def makeService(options):
    """The manager service: listens for the MTA, reloads on SIGHUP (miltermanager.service)."""
    from twisted.internet import reactor

    from miltermanager.service import ManagerService

    return ManagerService(reactor, options.configuration, load=options.load_configuration,
                          twistd_options=options.parent)
