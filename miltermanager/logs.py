"""Where the running manager's log goes: upstream's level sets, a log file, syslog.

`log.level` is a set of upstream's level names joined with "|". A Twisted
log event is given an upstream level and shown if that level is in the set:

    Twisted critical (and log.failure)  -> critical
    Twisted error                       -> error
    Twisted warn                        -> warning
    Twisted info                        -> message
    Twisted debug                       -> debug

An event may name its upstream level itself with a `milter_log_level` key
(`log.info("[session][end]...", milter_log_level="statistics")`); that is
how statistics, info, profile and trace lines are told apart. "default" is
critical|error|warning|message|statistics as upstream's code, "all" every
level and "none" nothing.

LogRouter is the one observer twistd gets: it filters with the current level
set and writes to the current destinations, both replaced on reload.
"""

import errno
import os
import socket
import sys
import time

from twisted.logger import ILogObserver, LogLevel, eventAsText, formatEvent, formatTime
from zope.interface import implementer

LEVELS = ("critical", "error", "warning", "message", "info", "debug", "statistics", "profile",
          "trace")
DEFAULT_LEVELS = frozenset({"critical", "error", "warning", "message", "statistics"})
_FROM_TWISTED = {
    LogLevel.critical: "critical",
    LogLevel.error: "error",
    LogLevel.warn: "warning",
    LogLevel.info: "message",
    LogLevel.debug: "debug",
}
# Upstream's syslog priorities (milter-syslog-logger.c).
_PRIORITIES = {
    "critical": 2, "error": 3, "warning": 4, "message": 5, "statistics": 5, "info": 6,
    "debug": 7, "profile": 7, "trace": 7,
}
FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "lpr": 6, "news": 7, "uucp": 8,
    "cron": 9, "authpriv": 10, **{f"local{n}": 16 + n for n in range(8)},
}
SYSLOG_PATH = "/dev/log"


def parse_levels(text):
    """The set of upstream level names that `log.level` text (e.g. "error|warning") shows."""
    levels = set()
    for name in (part.strip() for part in text.split("|")):
        if name == "all":
            levels.update(LEVELS)
        elif name == "default":
            levels.update(DEFAULT_LEVELS)
        elif name in LEVELS:
            levels.add(name)
        elif name != "none":
            raise ValueError(f"unknown log level {name!r}")
    return frozenset(levels)


def upstream_level(event):
    """The upstream level name of a Twisted log event."""
    level = event.get("milter_log_level")
    if level in _PRIORITIES:
        return level
    return _FROM_TWISTED.get(event.get("log_level"), "message")


@implementer(ILogObserver)
class LogRouter:
    """Shows the events whose upstream level is in `levels`, on every destination.

    base is where the log goes without `log.path` (twistd's choice: standard
    output in the foreground, twistd.log or --logfile as a daemon); None
    means standard output.
    """

    def __init__(self, base=None, syslog_path=SYSLOG_PATH):
        # The stream itself, not sys.stdout later: twistd then points
        # sys.stdout at the log, which would loop.
        self.base = base if base is not None else Stream(sys.stdout)
        self.syslog_path = syslog_path
        self.levels = DEFAULT_LEVELS
        self.file = None  # a LogFile for log.path
        self.syslog = None
        self._syslog_missing = False  # said so already
        self._destinations = [self.base]

    def __call__(self, event):
        if upstream_level(event) not in self.levels:
            return
        for destination in self._destinations:
            destination(event)

    def statistics(self, *lines):
        """Write statistics lines (the statistics observer's) as if they were logged, cheaply.

        The same text as Logger events at the statistics level would give, but
        without the events' trip through twisted.logger (five such lines a
        session made logging a fifth of the manager's work), and the lines of
        one call in one write. A destination that is not ours gets the events.
        """
        for destination in self._destinations:
            write = getattr(destination, "statistics", None)
            if write is not None:
                write(*lines)
            else:
                for line in lines:
                    destination({"log_format": "{line}", "line": line,
                                 "log_level": LogLevel.info, "milter_log_level": "statistics",
                                 "log_namespace": STATISTICS, "log_time": time.time()})

    def configure(self, settings, force_syslog=False):
        """Apply `log.*` settings (level, path, use_syslog, syslog_facility, syslog_socket);
        return notes.

        Opens the new file before closing the old one, so a path that cannot
        be opened raises OSError and leaves everything as it was. The notes
        are lines worth logging (e.g. syslog wanted but no /dev/log).
        """
        levels = parse_levels(settings.level)
        notes = []
        path = settings.path if settings.path not in (None, "-") else None
        new_file = self.file
        if path is None:
            new_file = None
        elif self.base.__class__ is LogFile and self.base.path == path:
            new_file = None  # twistd's own file already
        elif self.file is None or self.file.path != path:
            new_file = LogFile(path)
        syslog = None
        socket_path = getattr(settings, "syslog_socket", None) or self.syslog_path
        if settings.use_syslog or force_syslog:
            if os.path.exists(socket_path):
                syslog = self.syslog
                if (syslog is None or syslog.facility_name != settings.syslog_facility
                        or syslog.path != socket_path):
                    syslog = SyslogObserver(settings.syslog_facility, path=socket_path)
            elif not self._syslog_missing:
                notes.append(f"[log][syslog] {socket_path} does not exist: not logging "
                             "to syslog")
        self._syslog_missing = bool(settings.use_syslog or force_syslog) and syslog is None
        if self.file is not None and self.file is not new_file:
            self.file.close()
        if self.syslog is not None and self.syslog is not syslog:
            self.syslog.close()
        self.file, self.syslog, self.levels = new_file, syslog, levels
        destinations = [self.file if self.file is not None else self.base]
        if syslog is not None:
            destinations.append(syslog)
        self._destinations = destinations
        return notes

    def reopen(self):
        """Reopen the log file (after logrotate moved it away): SIGUSR1."""
        for destination in (self.file, self.base):
            if isinstance(destination, LogFile):
                destination.reopen()

    def close(self):
        """Close the log file and the syslog socket."""
        if self.file is not None:
            self.file.close()
        if self.syslog is not None:
            self.syslog.close()


def _write(stream, event):
    _write_text(stream, eventAsText(event, includeSystem=True) + "\n")


# The namespace statistics lines are logged under (miltermanager.statistics.StatisticsObserver).
STATISTICS = "miltermanager.statistics.StatisticsObserver"
# The second last formatted and its text: statistics lines within one second share it.
_formatted_second = [None, "-"]


def _statistics_text(lines):
    """lines as eventAsText writes statistics events: time stamp, [namespace#info], text.

    Ends with a line break (the lines are written as one text).
    """
    second = int(time.time())
    if _formatted_second[0] != second:
        _formatted_second[:] = [second, f"{formatTime(second)} [{STATISTICS}#info] "]
    prefix = _formatted_second[1]
    return "".join([f"{prefix}{line}\n" for line in lines])


def _write_text(stream, text):
    """Write text (ending with a line break) and flush."""
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError):
        pass  # a closed or full stream must not break the manager


class Stream:
    """Writes events to a stream (standard output)."""

    def __init__(self, stream):
        self.stream = stream

    def __call__(self, event):
        _write(self.stream, event)

    def statistics(self, *lines):
        _write_text(self.stream, _statistics_text(lines))


class LogFile:
    """A log file opened for appending, reopened on request."""

    def __init__(self, path):
        self.path = path
        self._file = self._open()

    def _open(self):
        return open(self.path, "a", encoding="utf-8", errors="backslashreplace")

    def __call__(self, event):
        _write(self._file, event)

    def statistics(self, *lines):
        _write_text(self._file, _statistics_text(lines))

    def reopen(self):
        """Open the path again; if that fails, keep writing to the old file and raise."""
        new = self._open()
        self._file.close()
        self._file = new

    def close(self):
        self._file.close()


class SyslogObserver:
    """Sends events to the local syslog daemon as datagrams on /dev/log, never blocking.

    Libc's syslog() cannot be pointed at another socket and blocks when the
    daemon is slow; here a datagram the daemon cannot take now is dropped.
    Lines are "[statistics] "-prefixed at statistics level, as upstream.
    """

    def __init__(self, facility="mail", ident="milter-manager", path=SYSLOG_PATH):
        self.facility_name = facility
        self.facility = FACILITIES[facility]
        self.ident = ident
        self.path = path
        self._socket = None

    def __call__(self, event):
        level = upstream_level(event)
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}\n{failure.getTraceback()}"
        prefix = "[statistics] " if level == "statistics" else ""
        header = (f"<{self.facility * 8 + _PRIORITIES[level]}>"
                  f"{time.strftime('%b %e %H:%M:%S')} {self.ident}[{os.getpid()}]: ")
        for line in text.splitlines():
            if line:
                self._send((header + prefix + line).encode("utf-8", "backslashreplace"))

    def statistics(self, *lines):
        header = (f"<{self.facility * 8 + _PRIORITIES['statistics']}>"
                  f"{time.strftime('%b %e %H:%M:%S')} {self.ident}[{os.getpid()}]: [statistics] ")
        for line in lines:  # one datagram a line, as syslog takes them
            self._send((header + line).encode("utf-8", "backslashreplace"))

    def _send(self, data):
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
                self._socket.connect(self.path)
            self._socket.send(data)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.ENOBUFS):
                self.close()  # reconnect next time: the daemon may have restarted

    def close(self):
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def twistd_base(twistd_options):
    """Where twistd itself would log, as an observer (None: standard output).

    As twistd's UnixAppLogger: --logfile, else standard output with -n and
    twistd.log as a daemon. twistd's --syslog is handled by the caller
    (it turns syslog on).
    """
    if twistd_options is None:
        return None
    path = twistd_options.get("logfile") or ""
    if path == "-" or (not path and twistd_options.get("nodaemon")):
        return None
    return LogFile(path or "twistd.log")
