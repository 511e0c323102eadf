"""Tests for the manager's log: upstream's level sets, the log file and syslog datagrams."""

import os
import shutil
import socket
import tempfile
from types import SimpleNamespace

from twisted.logger import LogLevel, Logger
from twisted.trial.unittest import SynchronousTestCase

from miltermanager import logs


def settings(level="default", path=None, use_syslog=False, syslog_facility="mail"):
    """log.* settings as LogRouter.configure reads them."""
    return SimpleNamespace(level=level, path=path, use_syslog=use_syslog,
                           syslog_facility=syslog_facility)


class LevelTests(SynchronousTestCase):
    def test_default(self):
        """"default" is critical|error|warning|message|statistics, as upstream's code."""
        self.assertEqual(logs.parse_levels("default"),
                         {"critical", "error", "warning", "message", "statistics"})

    def test_all_and_none(self):
        """"all" is every level and "none" no level."""
        self.assertEqual(logs.parse_levels("all"), set(logs.LEVELS))
        self.assertEqual(logs.parse_levels("none"), set())

    def test_union(self):
        """Names joined with | add up."""
        self.assertEqual(logs.parse_levels("error | debug"), {"error", "debug"})

    def test_twisted_levels(self):
        """Twisted's levels map to upstream's; info is upstream's message."""
        for level, name in ((LogLevel.critical, "critical"), (LogLevel.error, "error"),
                            (LogLevel.warn, "warning"), (LogLevel.info, "message"),
                            (LogLevel.debug, "debug")):
            self.assertEqual(logs.upstream_level({"log_level": level}), name)

    def test_event_names_its_level(self):
        """An event's milter_log_level wins (statistics, info, profile, trace)."""
        event = {"log_level": LogLevel.info, "milter_log_level": "statistics"}
        self.assertEqual(logs.upstream_level(event), "statistics")


class RouterTests(SynchronousTestCase):
    def setUp(self):
        self.seen = []
        self.router = logs.LogRouter(base=self.seen.append)
        self.addCleanup(self.router.close)
        self.log = Logger(namespace="test", observer=self.router)

    def texts(self):
        return [event["log_format"] for event in self.seen]

    def test_filters_by_level_set(self):
        """Only events whose upstream level is in log.level are written."""
        self.router.configure(settings("error|statistics"))
        self.log.error("e")
        self.log.warn("w")
        self.log.info("m")
        self.log.info("s", milter_log_level="statistics")
        self.assertEqual(self.texts(), ["e", "s"])

    def test_default_hides_debug(self):
        """By default debug lines are hidden and message lines shown."""
        self.log.debug("d")
        self.log.info("m")
        self.assertEqual(self.texts(), ["m"])

    def test_log_file_and_reopen(self):
        """log.path receives the log; reopen() after a rename writes to a new file."""
        path = os.path.abspath(self.mktemp())
        self.router.configure(settings(path=path))
        self.log.info("[x] first")
        os.rename(path, path + ".1")
        self.log.info("[x] second")
        self.router.reopen()
        self.log.info("[x] third")
        with open(path + ".1") as old, open(path) as new:
            self.assertEqual([line.count("[x]") for line in old], [1, 1])
            self.assertIn("[x] third", new.read())
        self.assertEqual(self.seen, [])

    def test_bad_log_file_changes_nothing(self):
        """A log.path that cannot be opened raises OSError and leaves the router as it was."""
        self.router.configure(settings("all"))
        self.assertRaises(OSError, self.router.configure,
                          settings("error", path="/nonexistent/dir/log"))
        self.log.debug("d")
        self.assertEqual(self.texts(), ["d"])

    def test_twistd_base(self):
        """Without log.path the log goes where twistd's would: stdout with -n, else a file."""
        self.assertIsNone(logs.twistd_base(None))
        self.assertIsNone(logs.twistd_base({"nodaemon": True, "logfile": None}))
        self.assertIsNone(logs.twistd_base({"nodaemon": False, "logfile": "-"}))
        path = os.path.abspath(self.mktemp())
        base = logs.twistd_base({"nodaemon": True, "logfile": path})
        self.addCleanup(base.close)
        self.assertEqual(base.path, path)


class SyslogTests(SynchronousTestCase):
    """Syslog datagrams, received by a datagram socket standing in for /dev/log."""

    def setUp(self):
        directory = tempfile.mkdtemp(prefix="mm-", dir="/tmp")
        self.addCleanup(shutil.rmtree, directory)
        self.path = os.path.join(directory, "log")
        self.daemon = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(self.daemon.close)
        self.daemon.bind(self.path)
        self.daemon.setblocking(False)
        self.router = logs.LogRouter(base=lambda event: None, syslog_path=self.path)
        self.addCleanup(self.router.close)
        self.log = Logger(namespace="test", observer=self.router)

    def received(self):
        datagrams = []
        while True:
            try:
                datagrams.append(self.daemon.recv(4096).decode())
            except BlockingIOError:
                return datagrams

    def test_priority_facility_and_statistics_prefix(self):
        """Lines carry facility*8+priority (mail: 2) and statistics get "[statistics] "."""
        self.assertEqual(self.router.configure(settings("all", use_syslog=True)), [])
        self.log.error("[a][error] broken")
        self.log.info("[session][end]", milter_log_level="statistics")
        first, second = self.received()
        self.assertTrue(first.startswith("<19>"), first)  # mail.err
        self.assertTrue(first.endswith(f"milter-manager[{os.getpid()}]: [a][error] broken"))
        self.assertTrue(second.startswith("<21>"), second)  # mail.notice
        self.assertTrue(second.endswith(": [statistics] [session][end]"), second)

    def test_facility_changes_on_configure(self):
        """A new syslog_facility applies to the next line."""
        self.router.configure(settings(use_syslog=True, syslog_facility="local3"))
        self.log.warn("w")
        self.assertTrue(self.received()[0].startswith(f"<{19 * 8 + 4}>"))

    def test_filtered_like_the_rest(self):
        """Syslog gets only the levels of log.level."""
        self.router.configure(settings("error", use_syslog=True))
        self.log.info("m")
        self.assertEqual(self.received(), [])

    def test_no_syslog_daemon(self):
        """Without the socket, syslog is skipped with one note, not an error per line."""
        os.unlink(self.path)
        notes = self.router.configure(settings(use_syslog=True))
        self.assertEqual(len(notes), 1)
        self.assertIn("does not exist", notes[0])
        self.assertIsNone(self.router.syslog)
        self.assertEqual(self.router.configure(settings(use_syslog=True)), [])

    def test_use_syslog_false(self):
        """log.use_syslog = False sends nothing to syslog."""
        self.router.configure(settings(use_syslog=False))
        self.log.error("e")
        self.assertEqual(self.received(), [])


class StatisticsLineTests(SynchronousTestCase):
    """LogRouter.statistics: the statistics observer's lines, written without twisted.logger."""

    def test_file_text_is_the_logged_text(self):
        """A statistics line in a log file reads as the same line logged through a Logger."""
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        fast, slow = (os.path.join(directory, name) for name in ("fast.log", "slow.log"))
        router = logs.LogRouter(base=logs.LogFile(fast))
        self.addCleanup(router.close)
        router.statistics("[sessions][finished] 1(+1) 0")
        logged = logs.LogRouter(base=logs.LogFile(slow))
        self.addCleanup(logged.close)
        Logger(namespace=logs.STATISTICS, observer=logged).info(
            "{line}", line="[sessions][finished] 1(+1) 0", milter_log_level="statistics")
        for router_ in (router, logged):
            router_.base.close()
        with open(fast) as first, open(slow) as second:
            fast_line, slow_line = first.read(), second.read()
        self.assertEqual(fast_line.split(" ", 1)[1], slow_line.split(" ", 1)[1])
        self.assertEqual(fast_line.split(" ", 1)[1],
                         "[miltermanager.statistics.StatisticsObserver#info] "
                         "[sessions][finished] 1(+1) 0\n")
        self.assertRegex(fast_line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} ")

    def test_foreign_destination_gets_an_event(self):
        """A destination that is not ours gets a statistics-level event with the line."""
        seen = []
        router = logs.LogRouter(base=seen.append)
        self.addCleanup(router.close)
        router.statistics("[session][end][connect][pass][0.1](1)")
        [event] = seen
        self.assertEqual(logs.upstream_level(event), "statistics")
        self.assertEqual(event["line"], "[session][end][connect][pass][0.1](1)")

    def test_syslog(self):
        """Through syslog: mail.notice (21) and the "[statistics] " prefix, as upstream."""
        directory = tempfile.mkdtemp(prefix="mm-log-")
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "log")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        server.bind(path)
        self.addCleanup(server.close)
        observer = logs.SyslogObserver("mail", path=path)
        self.addCleanup(observer.close)
        observer.statistics("[sessions][finished] 1(+1) 0")
        datagram = server.recv(4096).decode()
        self.assertRegex(datagram, rf"^<21>\w{{3}} [ \d]\d \d\d:\d\d:\d\d "
                                   rf"milter-manager\[{os.getpid()}\]: "
                                   r"\[statistics\] \[sessions\]\[finished\] 1\(\+1\) 0$")
