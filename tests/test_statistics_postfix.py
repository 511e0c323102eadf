"""Statistics and summary lines behind a real Postfix, in the log file and through syslog.

Postfix -> `twistd -n milter-manager` (log.level "default", a log file and a private syslog
socket) -> two libmilter children and a signing opendkim; one SMTP session per case:
accepted, rejected at RCPT, rejected at end of message, tempfailed at RCPT, a child stopped
by a condition; a child nothing listens for stands in with its fallback in every session.
The lines are compared one by one with the expected text, times, queue ids and the DKIM
signature masked; the log analyzer then reads the same file.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.peers.fixtures import (
    LibmilterMilter, MiltermanagerProcess, OpenDKIM, Postfix, free_port,
)

MESSAGE = b"""\
From: alice@harness.test
To: bob@example.com
Subject: %s
Message-Id: <stats@harness.test>

Hello.
"""

CONFIG = """\
manager.connection_spec = "{{spec}}"
log.level = "default"
log.path = {log!r}
log.use_syslog = True
log.syslog_socket = {syslog!r}

with define_applicable_condition("Not Trusted") as condition:
    condition.description = "stops for trusted senders"

    @condition.define_envelope_from_stopper
    def trusted(context, sender):
        return "trusted" in sender

with define_milter("one") as milter:
    milter.connection_spec = {one!r}
with define_milter("two") as milter:
    milter.connection_spec = {two!r}
    milter.applicable_conditions = ["Not Trusted"]
with define_milter("opendkim") as milter:
    milter.connection_spec = {dkim!r}
with define_milter("gone") as milter:
    milter.connection_spec = "inet:{dead}@[127.0.0.1]"
    milter.fallback_status = "accept"
"""

# What each session writes at the statistics level, in order; E: seconds, MS: milliseconds,
# T: the session's number, QID: Postfix's queue id.
EXPECTED = [  # noqa: E501 (the lines as the manager writes them)
    # accepted
    '[milter][header][add](T): <X-Libmilter>=<one saw QID>: one',
    '[milter][header][add](T): <X-Libmilter>=<two saw QID>: two',
    '[milter][header][add](T): <DKIM-Signature>=<SIGNATURE>: opendkim',
    '[message][end](T) QID: client=localhost[127.0.0.1], from=<alice@harness.test>, nrcpt=1, verdict=pass, stage=end-of-message, by=-, elapsed=MS, milters=one/pass/MS two/pass/MS opendkim/pass/MS gone/accept(unreachable)/MS, stopped=-',
    '[milter][end][end-of-message][pass][E](T): one',
    '[milter][end][end-of-message][pass][E](T): two',
    '[milter][end][end-of-message][accept][E](T): opendkim',
    '[milter][end][negotiate][error][E](T): gone',
    '[session][end][end-of-message][pass][E](T)',
    '[sessions][finished] 1(+1) 0',
    # the only recipient rejected at RCPT by one: the client gives up
    '[message][end](T) NOQUEUE: client=localhost[127.0.0.1], from=<alice@harness.test>, nrcpt=1, verdict=abort, stage=envelope-recipient, by=-, elapsed=MS, milters=one/reject/MS two/pass/MS opendkim/pass/MS gone/accept(unreachable)/MS, stopped=-',
    '[milter][end][envelope-recipient][reject][E](T): one',
    '[milter][end][envelope-recipient][pass][E](T): two',
    '[milter][end][envelope-recipient][pass][E](T): opendkim',
    '[milter][end][negotiate][error][E](T): gone',
    '[session][end][envelope-recipient][reject][E](T)',
    '[sessions][finished] 2(+1) 0',
    # rejected by one at end of message: two and opendkim never got the message
    '[message][end](T) QID: client=localhost[127.0.0.1], from=<alice@harness.test>, nrcpt=1, verdict=reject, stage=end-of-message, by=one, elapsed=MS, milters=one/reject/MS two/pass/MS opendkim/pass/MS gone/accept(unreachable)/MS, stopped=-',
    '[milter][end][end-of-message][reject][E](T): one',
    '[milter][end][data][pass][E](T): two',
    '[milter][end][data][pass][E](T): opendkim',
    '[milter][end][negotiate][error][E](T): gone',
    '[session][end][end-of-message][reject][E](T)',
    '[sessions][finished] 3(+1) 0',
    # tempfailed at RCPT by one; gone is marked down by now (three failures in a row)
    '[message][end](T) NOQUEUE: client=localhost[127.0.0.1], from=<alice@harness.test>, nrcpt=1, verdict=abort, stage=envelope-recipient, by=-, elapsed=MS, milters=one/temporary-failure/MS two/pass/MS opendkim/pass/MS gone/accept(down)/MS, stopped=-',
    '[milter][end][envelope-recipient][temporary-failure][E](T): one',
    '[milter][end][envelope-recipient][pass][E](T): two',
    '[milter][end][envelope-recipient][pass][E](T): opendkim',
    '[milter][end][negotiate][error][E](T): gone',
    '[session][end][envelope-recipient][temporary-failure][E](T)',
    '[sessions][finished] 4(+1) 0',
    # two stopped by the Not Trusted condition at MAIL
    '[milter][header][add](T): <X-Libmilter>=<one saw QID>: one',
    '[milter][header][add](T): <DKIM-Signature>=<SIGNATURE>: opendkim',
    '[message][end](T) QID: client=localhost[127.0.0.1], from=<trusted@harness.test>, nrcpt=1, verdict=pass, stage=end-of-message, by=-, elapsed=MS, milters=one/pass/MS two/pass/MS opendkim/pass/MS gone/accept(down)/MS, stopped=two/envelope-from/Not%20Trusted',
    '[milter][end][end-of-message][pass][E](T): one',
    '[milter][end][envelope-from][stop][E](T): two',
    '[milter][end][end-of-message][accept][E](T): opendkim',
    '[milter][end][negotiate][error][E](T): gone',
    '[session][end][end-of-message][pass][E](T)',
    '[sessions][finished] 5(+1) 0',
]


# How the log file marks the statistics observer's lines (twistd's file format).
STATISTICS = "[miltermanager.statistics.StatisticsObserver#info] "


def masked(line):
    """line with its times, session number and queue id replaced by E, MS, T and QID."""
    line = re.sub(r"\]\[[0-9.e+-]+\]\((\d+)\)", "][E](T)", line)
    line = re.sub(r"\((\d+)\)", "(T)", line)
    line = re.sub(r"/[0-9.]+(?= |,|$)", "/MS", line)
    line = re.sub(r"elapsed=[0-9.]+", "elapsed=MS", line)
    line = re.sub(r"<DKIM-Signature>=<.*>: opendkim$", "<DKIM-Signature>=<SIGNATURE>: opendkim",
                  line)
    line = re.sub(r"\b[0-9A-F]{8,12}\b|\b[0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-z]{10,15}\b", "QID",
                  line)
    return line


class StatisticsBehindPostfixTests(SynchronousTestCase):
    """The manager's statistics and summary lines for real Postfix sessions."""

    def setUp(self):
        directory = os.path.realpath(self.mktemp())
        os.makedirs(directory)
        # A UNIX socket's path must fit in 108 bytes; trial's mktemp() paths do not.
        short = tempfile.mkdtemp(prefix="mm-syslog-")
        self.addCleanup(shutil.rmtree, short, True)
        self.syslog_path = os.path.join(short, "log")
        self.syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.syslog.bind(self.syslog_path)
        self.syslog.settimeout(0.1)
        self.addCleanup(self.syslog.close)
        # A datagram socket queues only net.unix.max_dgram_qlen (10) datagrams, and the
        # manager drops what syslog cannot take: read them as they come, as a daemon does.
        self.datagrams = []
        self.listening = True
        reader = threading.Thread(target=self.read_syslog, daemon=True)
        reader.start()
        self.addCleanup(reader.join)
        self.addCleanup(setattr, self, "listening", False)
        self.log_path = os.path.join(directory, "manager.log")
        self.one = LibmilterMilter(self.mktemp(), "one", "--reject-subject", "SPAM")
        self.two = LibmilterMilter(self.mktemp(), "two", "--no-rcpt-rules")
        self.dkim = OpenDKIM(self.mktemp())  # signs mail from harness.test
        for child in (self.one, self.two, self.dkim):
            child.start()
            self.addCleanup(child.stop)
        self.manager = MiltermanagerProcess(self.mktemp(), CONFIG.format(
            log=self.log_path, syslog=self.syslog_path, one=self.one.spec, two=self.two.spec,
            dkim=self.dkim.spec, dead=free_port()))
        self.manager.start()
        self.addCleanup(self.manager.stop)
        self.postfix = Postfix(self.mktemp(), milters=[self.manager.postfix_spec])
        self.postfix.start()
        self.addCleanup(self.postfix.stop)

    def statistics(self, count, timeout=10):
        """The first count [statistics] lines of the log file, masked (waits for them)."""
        deadline = time.monotonic() + timeout
        while True:
            with open(self.log_path, encoding="utf-8") as log:
                lines = [line.split(STATISTICS, 1)[1].rstrip("\n") for line in log
                         if STATISTICS in line]
            if len(lines) >= count or time.monotonic() > deadline:
                return [masked(line) for line in lines]
            time.sleep(0.05)

    def test_sessions(self):
        """Each case's lines, in the file and through syslog (at LOG_NOTICE, "[statistics] ")."""
        send = self.postfix.send
        self.assertEqual(send("alice@harness.test", ["bob@example.com"],
                              MESSAGE % b"hi").data[0], 250)
        self.assertEqual(send("alice@harness.test", ["reject@example.com"],
                              MESSAGE % b"hi").rcpts["reject@example.com"][0], 550)
        self.assertEqual(send("alice@harness.test", ["bob@example.com"],
                              MESSAGE % b"SPAM offer").data[0], 554)
        self.assertEqual(send("alice@harness.test", ["tempfail@example.com"],
                              MESSAGE % b"hi").rcpts["tempfail@example.com"][0], 451)
        self.assertEqual(send("trusted@harness.test", ["bob@example.com"],
                              MESSAGE % b"hi").data[0], 250)
        lines = self.statistics(len(EXPECTED))
        self.assertEqual(lines, EXPECTED, self.manager.log())
        self.assertEqual(self.syslog_statistics(len(EXPECTED)), EXPECTED)
        self.check_report()

    def read_syslog(self):
        while self.listening:
            try:
                self.datagrams.append(self.syslog.recv(65536).decode("utf-8"))
            except TimeoutError:
                continue
            except OSError:
                return

    def syslog_statistics(self, count, timeout=10):
        """The [statistics] datagrams the syslog socket got, masked; each at mail.notice."""
        deadline = time.monotonic() + timeout
        while True:
            lines = []
            for datagram in list(self.datagrams):
                match = re.fullmatch(r"<(\d+)>\w{3} [ \d]\d \d\d:\d\d:\d\d "
                                     r"milter-manager\[(\d+)\]: (.*)", datagram)
                self.assertIsNotNone(match, datagram)
                if match.group(3).startswith("[statistics] "):
                    self.assertEqual(match.group(1), "21")  # LOG_MAIL (2) * 8 + LOG_NOTICE (5)
                    self.assertEqual(int(match.group(2)), self.manager.process.pid)
                    lines.append(masked(match.group(3)[len("[statistics] "):]))
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def check_report(self):
        """milter-manager-log-analyzer reads the log file: its counts are the sessions'."""
        output = os.path.join(self.mktemp(), "report")
        subprocess.run([sys.executable, "-m", "miltermanager.tools.log_analyzer", "--log",
                        self.log_path, "--output-directory", output, "--no-progress"],
                       check=True, capture_output=True)
        with open(os.path.join(output, "index.html"), encoding="utf-8") as page:
            text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page.read()))
        # day, SMTP sessions, milter sessions, disconnected, pass, reject, temporary-failure
        self.assertRegex(text, r"\d{4}-\d\d-\d\d 5 20 0 2 2 1 ")
        # milter, sessions, pass, accept, reject, temporary-failure, error, stop
        self.assertIn(" one 5 2 0 2 1 0 0 ", text)
        self.assertIn(" two 5 4 0 0 0 0 1 ", text)
        self.assertIn(" opendkim 5 3 2 0 0 0 0 ", text)
        self.assertIn(" gone 5 0 0 0 0 5 0 ", text)
