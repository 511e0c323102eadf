"""Upstream's [statistics] lines and our message summary, written by StatisticsObserver.

Each scenario runs through the session harness with the observer attached;
the statistics lines it logged are compared, line by line, with the text
written out here. The harness's clock never moves unless a step says so,
so every elapsed figure is exact. The last tests parse the lines with the
regular expressions of upstream's milter-manager-log-analyzer.
"""

import re

from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from miltermanager import stages
from miltermanager.config import ConditionConfig, Hook
from miltermanager.events import ISessionObserver, SessionEnded, SessionStarted
from miltermanager.merge import Status
from miltermanager.protocol import constants as c
from miltermanager.protocol.messages import (
    CONTINUE, REJECT, TEMPFAIL, AddHeader, ChangeHeader, InsertHeader, Quarantine, ReplyCode,
)
from miltermanager.statistics import StatisticsObserver, status_word
from tests.test_session import (
    CONNECT, DATA, HELO, MAIL, RCPT, SLOW, Hang, Kid, Scenario, ScenarioTestCase, Send,
    _message,
)

A, T = Status.ACCEPT, Status.TEMPORARY_FAILURE
CLIENT = "client=client.example.net[192.0.2.10], from=<sender@example.net>"


def statistics_lines(case):
    """The text of every statistics-level log event from now on, as a list that fills up."""
    lines = []

    def observe(event):
        if event.get("milter_log_level") == "statistics":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    case.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


def _with_queue_id(steps, queue_id=b"4Bq1x52Zz9"):
    """steps with the MTA's {i} macro sent at MAIL, as Postfix does."""
    out = []
    for step in steps:
        command, expect = step if isinstance(step, tuple) else (step.command, step.expect)
        if command is MAIL:
            out.append(Send(MAIL, expect, macros={b"i": queue_id}))
        else:
            out.append(step)
    return out


class StatisticsLineTests(ScenarioTestCase):
    """Every line kind, from real sessions through the harness."""

    def setUp(self):
        self.observer = StatisticsObserver()
        self.lines = statistics_lines(self)

    def test_provides_the_interface(self):
        """StatisticsObserver is an ISessionObserver."""
        verifyObject(ISessionObserver, StatisticsObserver())

    @defer.inlineCallbacks
    def test_accepted_message(self):
        """Two children that continue: the summary, each child's end, the session's end."""
        yield self.run_scenario(Scenario(
            children=[Kid("one"), Kid("two")], steps=_with_queue_id(_message(CONTINUE))))
        self.assertEqual(self.lines, [
            f"[message][end](1) 4Bq1x52Zz9: {CLIENT}, nrcpt=1, verdict=pass, "
            "stage=end-of-message, by=-, elapsed=0.0, milters=one/pass/0.0 two/pass/0.0, "
            "stopped=-",
            "[milter][end][end-of-message][pass][0](1): one",
            "[milter][end][end-of-message][pass][0](1): two",
            "[session][end][end-of-message][pass][0](1)",
            "[sessions][finished] 1(+1) 0",
        ])

    @defer.inlineCallbacks
    def test_rejected_at_rcpt(self):
        """A child refusing the only recipient: the MTA's client gives up, verdict abort."""
        refusal = ReplyCode(b"550 5.7.1 spamtrap says no")
        yield self.run_scenario(Scenario(
            children=[Kid("clean"), Kid("spamtrap", replies={"rcpt": refusal})],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, CONTINUE),
                   (RCPT, refusal)]))
        self.assertEqual(self.lines, [
            f"[message][end](1) NOQUEUE: {CLIENT}, nrcpt=1, verdict=abort, "
            "stage=envelope-recipient, by=-, elapsed=0.0, "
            "milters=clean/pass/0.0 spamtrap/reject/0.0, stopped=-",
            "[milter][end][envelope-recipient][pass][0](1): clean",
            "[milter][end][envelope-recipient][reject][0](1): spamtrap",
            "[session][end][envelope-recipient][reject][0](1)",
            "[sessions][finished] 1(+1) 0",
        ])

    @defer.inlineCallbacks
    def test_rejected_at_end_of_message(self):
        """A reject at end of message names its child; the next child never sees the message."""
        yield self.run_scenario(Scenario(
            children=[Kid("virus", replies={"end_of_message": REJECT}), Kid("spam")],
            steps=_with_queue_id(_message(REJECT), b"ABCDEF")))
        self.assertEqual(self.lines, [
            f"[message][end](1) ABCDEF: {CLIENT}, nrcpt=1, verdict=reject, "
            "stage=end-of-message, by=virus, elapsed=0.0, "
            "milters=virus/reject/0.0 spam/pass/0.0, stopped=-",
            "[milter][end][end-of-message][reject][0](1): virus",
            "[milter][end][data][pass][0](1): spam",
            "[session][end][end-of-message][reject][0](1)",
            "[sessions][finished] 1(+1) 0",
        ])

    @defer.inlineCallbacks
    def test_tempfailed_at_data(self):
        """A temporary failure at DATA ends the message there."""
        yield self.run_scenario(Scenario(
            children=[Kid("busy", replies={"data": TEMPFAIL})],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, CONTINUE), (RCPT, CONTINUE),
                   (RCPT, CONTINUE), (DATA, TEMPFAIL)]))
        self.assertEqual(self.lines, [
            f"[message][end](1) NOQUEUE: {CLIENT}, nrcpt=2, verdict=temporary-failure, "
            "stage=data, by=busy, elapsed=0.0, milters=busy/temporary-failure/0.0, "
            "stopped=-",
            "[milter][end][data][temporary-failure][0](1): busy",
            "[session][end][data][temporary-failure][0](1)",
            "[sessions][finished] 1(+1) 0",
        ])

    @defer.inlineCallbacks
    def test_stopped_by_a_condition(self):
        """A child a condition stops at MAIL: status stop, and the condition in the summary."""
        def trusted(context, sender):
            return True

        def configure(configuration):
            configuration.conditions = {"Trusted Senders": ConditionConfig(
                "Trusted Senders", stoppers=[
                    Hook("envelope_from", "trusted", trusted, "conf:3")])}
            configuration.milters[0].applicable_conditions = ["Trusted Senders"]

        self.configure = configure
        yield self.run_scenario(Scenario(
            children=[Kid("greylist"), Kid("spam")], steps=_message(CONTINUE)))
        self.assertEqual(self.lines, [
            f"[message][end](1) NOQUEUE: {CLIENT}, nrcpt=1, verdict=pass, "
            "stage=end-of-message, by=-, elapsed=0.0, "
            "milters=greylist/pass/0.0 spam/pass/0.0, "
            "stopped=greylist/envelope-from/Trusted%20Senders",
            "[milter][end][envelope-from][stop][0](1): greylist",
            "[milter][end][end-of-message][pass][0](1): spam",
            "[session][end][end-of-message][pass][0](1)",
            "[sessions][finished] 1(+1) 0",
        ])

    @defer.inlineCallbacks
    def test_fallback_after_a_timeout(self):
        """A child timing out at MAIL: error in its end line, its fallback and cause in ours."""
        yield self.run_scenario(Scenario(
            children=[Kid("slow", replies={"mail": Hang()}, fallback=T, timeouts=SLOW)],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), Send(MAIL, TEMPFAIL, advance=10)]))
        self.assertEqual(self.lines, [
            f"[message][end](1) NOQUEUE: {CLIENT}, nrcpt=0, verdict=temporary-failure, "
            "stage=envelope-from, by=slow, elapsed=10000.0, "
            "milters=slow/temporary-failure(timeout)/0.0, stopped=-",
            "[milter][end][envelope-from][error][0](1): slow",
            "[session][end][envelope-from][temporary-failure][10](1)",
            "[sessions][finished] 1(+1) 0",
        ])

    @defer.inlineCallbacks
    def test_unreachable_child(self):
        """A child nobody listens for: error at negotiate; its fallback shows in the summary."""
        yield self.run_scenario(Scenario(
            children=[Kid("down", down=True, fallback=A), Kid("up")],
            steps=_message(CONTINUE)))
        self.assertEqual(self.lines, [
            f"[message][end](1) NOQUEUE: {CLIENT}, nrcpt=1, verdict=pass, "
            "stage=end-of-message, by=-, elapsed=0.0, "
            "milters=down/accept(unreachable)/0.0 up/pass/0.0, stopped=-",
            "[milter][end][negotiate][error][0](1): down",
            "[milter][end][end-of-message][pass][0](1): up",
            "[session][end][end-of-message][pass][0](1)",
            "[sessions][finished] 1(+1) 0",
        ])

    @defer.inlineCallbacks
    def test_header_edits(self):
        """Add, insert and change each give a header line, a folded value unfolded."""
        edits = [AddHeader(b"X-Spam-Flag", b"YES"),
                 InsertHeader(0, b"Authentication-Results",
                              b"mx.example.org;\r\n\tdkim=pass header.d=example.net"),
                 ChangeHeader(1, b"Subject", b"[SPAM] hello")]
        yield self.run_scenario(Scenario(
            children=[Kid("spamd", actions=c.SMFIF_ADDHDRS | c.SMFIF_CHGHDRS,
                          replies={"end_of_message": [*edits, CONTINUE]})],
            # The MTA gets the edits merged: the change, the insertion, the addition.
            steps=_message([edits[2], edits[1], edits[0], CONTINUE])))
        self.assertEqual(self.lines[:3], [
            "[milter][header][add](1): <X-Spam-Flag>=<YES>: spamd",
            "[milter][header][add](1): <Authentication-Results>="
            "<mx.example.org;\tdkim=pass header.d=example.net>: spamd",
            "[milter][header][add](1): <Subject>=<[SPAM] hello>: spamd",
        ])
        self.assertTrue(self.lines[3].startswith("[message][end](1) NOQUEUE: "), self.lines)

    @defer.inlineCallbacks
    def test_header_deletion_is_no_addition(self):
        """A change to an empty value deletes the header: no header line."""
        edit = ChangeHeader(1, b"Subject", b"")
        yield self.run_scenario(Scenario(
            children=[Kid("strip", actions=c.SMFIF_CHGHDRS,
                          replies={"end_of_message": [edit, CONTINUE]})],
            steps=_message([edit, CONTINUE])))
        self.assertEqual([line for line in self.lines if "[header]" in line], [])

    @defer.inlineCallbacks
    def test_header_edits_in_evaluation_mode(self):
        """An evaluation-mode child's header additions are still reported, as upstream."""
        edit = AddHeader(b"X-Virus-Status", b"Infected")
        yield self.run_scenario(Scenario(
            children=[Kid("clam", actions=c.SMFIF_ADDHDRS, evaluation=True,
                          replies={"end_of_message": [edit, CONTINUE]})],
            steps=_message(CONTINUE)))
        self.assertEqual(self.lines[0],
                         "[milter][header][add](1): <X-Virus-Status>=<Infected>: clam")

    @defer.inlineCallbacks
    def test_quarantine(self):
        """A child's quarantine at end of message: upstream's quarantine line, before ours."""
        edit = Quarantine(b"virus found")
        yield self.run_scenario(Scenario(
            children=[Kid("clam", actions=c.SMFIF_QUARANTINE,
                          replies={"end_of_message": [edit, CONTINUE]})],
            steps=_message([edit, CONTINUE])))
        self.assertEqual(self.lines[0], "[reply][end-of-message][quarantine](1)")
        self.assertTrue(self.lines[1].startswith("[message][end](1) "), self.lines)

    @defer.inlineCallbacks
    def test_no_quarantine_line_in_evaluation_mode(self):
        """An evaluation-mode child's quarantine is not applied, so no quarantine line."""
        edit = Quarantine(b"virus found")
        self.observer = StatisticsObserver(lambda name: name == "clam")
        yield self.run_scenario(Scenario(
            children=[Kid("clam", actions=c.SMFIF_QUARANTINE, evaluation=True,
                          replies={"end_of_message": [edit, CONTINUE]})],
            steps=_message(CONTINUE)))
        self.assertNotIn("[reply][end-of-message][quarantine](1)", self.lines)

    @defer.inlineCallbacks
    def test_two_messages_in_one_session(self):
        """A summary per message; one end line per child and one session end for both."""
        steps = _message(REJECT)
        yield self.run_scenario(Scenario(
            children=[Kid("one", replies={"end_of_message": REJECT})],
            steps=steps + [(MAIL, CONTINUE), (RCPT, CONTINUE), (RCPT, CONTINUE)]))
        self.assertEqual(self.lines, [
            f"[message][end](1) NOQUEUE: {CLIENT}, nrcpt=1, verdict=reject, "
            "stage=end-of-message, by=one, elapsed=0.0, milters=one/reject/0.0, stopped=-",
            f"[message][end](1) NOQUEUE: {CLIENT}, nrcpt=2, verdict=abort, "
            "stage=envelope-recipient, by=-, elapsed=0.0, milters=one/pass/0.0, stopped=-",
            "[milter][end][envelope-recipient][pass][0](1): one",
            # The session's last verdict: the continue the last RCPT got.
            "[session][end][envelope-recipient][pass][0](1)",
            "[sessions][finished] 1(+1) 0",
        ])


class ObserverUnitTests(unittest.TestCase):
    """Counting and wording, on records written out by hand."""

    def setUp(self):
        self.lines = statistics_lines(self)

    def test_sessions_finished_counts_total_and_processing(self):
        """Each end: total so far (+1), then the sessions still in flight."""
        observer = StatisticsObserver()
        for number in (1, 2, 3):
            observer.session_started(SessionStarted(number, ()))
        observer.session_ended(SessionEnded(2, stages.HELO, None, None, 0, 0.25))
        observer.session_ended(SessionEnded(1, stages.CONNECT, Status.REJECT, "a", 0, 1.5))
        self.assertEqual(self.lines, [
            "[session][end][helo][pass][0.25](2)",
            "[sessions][finished] 1(+1) 2",
            "[session][end][connect][reject][1.5](1)",
            "[sessions][finished] 2(+1) 1",
        ])

    def test_elapsed_as_c_g(self):
        """Elapsed seconds are written as C's %g: six significant digits, no trailing zeros."""
        observer = StatisticsObserver()
        observer.session_started(SessionStarted(7, ()))
        observer.session_ended(SessionEnded(7, stages.END_OF_MESSAGE, Status.DISCARD, None, 1,
                                            0.0123456789))
        self.assertEqual(self.lines[0], "[session][end][end-of-message][discard][0.0123457](7)")

    def test_status_words(self):
        """pass for continue, skip or nothing; the status's name otherwise."""
        self.assertEqual([status_word(status) for status in (
            None, Status.NOT_CHANGE, Status.CONTINUE, Status.SKIP, Status.ACCEPT,
            Status.TEMPORARY_FAILURE, Status.REJECT, Status.DISCARD)],
            ["pass", "pass", "pass", "pass", "accept", "temporary-failure", "reject",
             "discard"])


# The analyzer's regular expressions (upstream tool/milter-manager-log-analyzer), in
# Python's spelling: \A and \z become ^ and $ with fullmatch.
ANALYZER_SYSLOG = re.compile(r"(\w{3} +\d+ \d+:\d+:\d+) [\w\-]+ ([\w\-]+)\[\d+\]: ")
ANALYZER_STATISTICS = re.compile(r"\[statistics\] ")
ANALYZER_SESSION_END = re.compile(r"\[session\]\[end\]\[(.+)\]\[(.+)\]\[(.+)\]\((.+)\)")
ANALYZER_MILTER_END = re.compile(
    r"\[milter\]\[end\]\[(.+?)\]\[(.+?)\]\[(.+?)\]\((.+?)\): (.+)")
ANALYZER_HEADER_ADD = re.compile(r"\[milter\]\[header\]\[add\]\((.+)\): <(.+?)>=<(.+?)>: (.+)")


def analyze(log):
    """What upstream's analyzer reads in a syslog text: (kind, fields) of each line it counts."""
    found = []
    for line in log.splitlines():
        match = ANALYZER_SYSLOG.match(line)
        if match is None or match.group(2) != "milter-manager":
            continue
        content = line[match.end():]
        if not ANALYZER_STATISTICS.match(content):
            continue
        content = content[len("[statistics] "):]
        for kind, pattern in (("session", ANALYZER_SESSION_END), ("milter", ANALYZER_MILTER_END),
                              ("header", ANALYZER_HEADER_ADD)):
            matched = pattern.fullmatch(content)
            if matched:
                found.append((kind, matched.groups()))
                break
    return found


class AnalyzerTests(ScenarioTestCase):
    """Upstream's milter-manager-log-analyzer reads our lines as its own."""

    def setUp(self):
        self.observer = StatisticsObserver()
        self.lines = statistics_lines(self)

    @defer.inlineCallbacks
    def test_analyzer_parses_our_lines(self):
        """Session and child ends, their statuses and names, and header additions parse."""
        edit = AddHeader(b"X-Spam-Flag", b"YES")
        yield self.run_scenario(Scenario(
            children=[Kid("spamd", actions=c.SMFIF_ADDHDRS,
                          replies={"end_of_message": [edit, REJECT]}), Kid("clam")],
            steps=_message(REJECT)))
        log = "".join(f"Jul 15 09:00:01 mail milter-manager[4242]: [statistics] {line}\n"
                      for line in self.lines)
        self.assertEqual(analyze(log), [
            ("header", ("1", "X-Spam-Flag", "YES", "spamd")),
            ("milter", ("end-of-message", "reject", "0", "1", "spamd")),
            ("milter", ("data", "pass", "0", "1", "clam")),
            ("session", ("end-of-message", "reject", "0", "1")),
        ])

    def test_analyzer_ignores_other_programs_and_levels(self):
        """Lines of other programs, or without [statistics], are not counted (the harness's own)."""
        self.assertEqual(analyze(
            "Jul 15 09:00:01 mail postfix[12]: [statistics] [session][end][a][b][1](2)\n"
            "Jul 15 09:00:01 mail milter-manager[4]: [session][end][a][b][1](2)\n"), [])


class LevelTests(unittest.TestCase):
    """The service attaches the observer only while the statistics level is on."""

    def test_follows_log_level(self):
        """On at "default", off at "error|warning" (the factory then has no observer), on at "all"."""
        from twisted.internet.testing import MemoryReactorClock

        from miltermanager import config
        from miltermanager.service import ManagerService

        configuration = config.default()
        made = ManagerService(MemoryReactorClock(), configuration)
        router = made.start_logging(syslog_path=self.mktemp())
        self.addCleanup(router.close)
        self.assertIsInstance(made.statistics, StatisticsObserver)
        self.assertIsNotNone(made.factory.observer)
        config.set_value(configuration.log, "level", "error|warning")
        made._configure_log(configuration, "reload")
        self.assertIsNone(made.statistics)
        self.assertIsNone(made.factory.observer)
        config.set_value(configuration.log, "level", "all")
        made._configure_log(configuration, "reload")
        self.assertIsInstance(made.statistics, StatisticsObserver)
