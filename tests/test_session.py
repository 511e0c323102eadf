"""Scenario tests for the manager: an MTA, the manager and scripted children on loopback.

Each test is one table (a Scenario): the children and their scripts, the
commands the MTA sends with the replies it must get, and what each child
must have seen. The harness runs it against real sockets and waits on
Deferreds only; children's timeouts and the manager's progress run on a
task.Clock that a step advances.
"""

import socket
from dataclasses import dataclass, field

from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from miltermanager import client
from miltermanager.client import Timeouts
from miltermanager.merge import Status
from miltermanager.protocol import constants as c
from miltermanager.protocol.messages import (
    ABORT, ACCEPT, CONTINUE, DATA, DISCARD, END_OF_HEADERS, END_OF_MESSAGE, PROGRESS, REJECT, SKIP,
    TEMPFAIL, AddHeader, AddRecipient, AddRecipientPar, Body, ChangeFrom, ChangeHeader, Connect,
    DeleteRecipient, Header, Helo, InsertHeader, Macro, Mail, Negotiate, Quarantine, Rcpt,
    ReplaceBody, ReplyCode, Unknown,
)
from miltermanager.config import Configuration, ManagerConfig, MilterConfig
from miltermanager.factory import ManagerFactory
from miltermanager.testing import DISCONNECT, ConnectionTracker, Script, ScriptedChild

# ---------------------------------------------------------------- the MTA's words

# An MTA that reads a reply to every command: what the children's answers become at each
# one. Postfix and Sendmail also offer no reply to headers (HeldVerdictTests).
OFFER = Negotiate(6, c.SMFI_CURR_ACTS, c.SMFI_CURR_PROT & ~(c.SMFIP_NR_HDR | c.SMFIP_NR_EOH), {})
# Every step flag, no reply to headers among them, as Postfix offers.
FULL_OFFER = Negotiate(6, c.SMFI_CURR_ACTS, c.SMFI_CURR_PROT, {})
CONNECT = Connect(b"client.example.net", c.FAMILY_INET, 52258, b"192.0.2.10")
HELO = Helo(b"client.example.net")
MAIL = Mail(b"<sender@example.net>")
RCPT = Rcpt(b"<alice@example.org>")
RCPT2 = Rcpt(b"<bob@example.org>")
SUBJECT = Header(b"Subject", b"hello")
FROM = Header(b"From", b"sender@example.net")
EOH = END_OF_HEADERS
BODY = Body(b"Hi Alice,\r\nall well.\r\n")
EOM = END_OF_MESSAGE
UNKNOWN = Unknown(b"XYZZY")

ALL_ACTIONS = c.SMFI_CURR_ACTS & ~c.SMFIF_SETSYMLIST
# Child timeouts: only the fake clock makes them pass. A scenario moves the
# clock past SLOW's timeouts only, so a child that answered in time but whose
# reply is still on its way is never timed out by the test.
TIMEOUTS = Timeouts(connection=5.0, writing=500.0, reading=500.0, end_of_message=500.0)
SLOW = Timeouts(connection=5.0, writing=500.0, reading=10.0, end_of_message=60.0)
# The MTA's own timeouts run on a clock nobody advances.
MTA_TIMEOUTS = Timeouts(connection=5.0, writing=5.0, reading=5.0, end_of_message=5.0)

_EVENT_WORDS = {"end_of_headers": "eoh", "end_of_message": "eom"}


# ---------------------------------------------------------------- the tables


@dataclass
class Kid:
    """A child milter in a scenario: its script, its configuration, or that it is down."""

    name: str
    replies: dict = field(default_factory=dict)
    actions: int = 0
    protocol: int = 0
    macros: dict = field(default_factory=dict)
    version: int | None = None
    evaluation: bool = False
    fallback: Status = Status.ACCEPT
    down: bool = False  # nothing listens at its address
    spec: str | None = None  # a child started by the test itself (no script, no seen)
    enabled: bool = True
    timeouts: Timeouts = field(default_factory=lambda: TIMEOUTS)


@dataclass
class Send:
    """One MTA command and the reply it must get.

    expect: the final reply; a list means the modifications in order, then
    the final reply; None means no reply (ABORT, or a no-reply step).
    advance: once a child's Hang got a command, move the fake clock this far
    (children that should time out on it need timeouts=SLOW).
    """

    command: object
    expect: object = CONTINUE
    macros: dict | None = None
    progress: int | None = None
    advance: float | None = None


@dataclass
class Scenario:
    """The children, the MTA's commands, and what each child must have seen.

    seen: child name -> its events after negotiation, space separated
    ("connect helo mail rcpt data header eoh body eom abort close").
    aborted: the children that got ABORT (checked when not None).
    headers_seen / body_seen / chunks_seen: child -> (name, value) list, the
    body bytes joined, the body chunk sizes. macros_seen: child -> event ->
    macros it got with that event (its last one). negotiated: the manager's
    negotiation reply to the MTA.
    """

    children: list
    steps: list
    seen: dict = field(default_factory=dict)
    aborted: tuple | None = None
    offer: Negotiate = field(default_factory=lambda: OFFER)
    negotiated: Negotiate | None = None
    headers_seen: dict = field(default_factory=dict)
    body_seen: dict = field(default_factory=dict)
    chunks_seen: dict = field(default_factory=dict)
    macros_seen: dict = field(default_factory=dict)
    fallback: Status = Status.ACCEPT
    chunk_size: int = 65535
    max_body_memory: int = 5 * 1024 * 1024
    progress_interval: float = 0.0
    down_after_failures: int = 0  # most scenarios have children down on purpose


class Hang:
    """A scripted reply that does not come (or comes `after` fake seconds as `reply`).

    When a child gets the command, the harness hears of it: a Send with
    `advance` waits for that before moving the clock.
    """

    def __init__(self, reply=None, after=None):
        self.reply = reply
        self.after = after
        self._clock = self._reached = None

    def bind(self, clock, reached):
        self._clock, self._reached = clock, reached

    def __call__(self, command, macros):
        call = None

        def cancel(d):
            if call is not None and call.active():
                call.cancel()

        d = defer.Deferred(cancel)
        if self.after is not None:
            call = self._clock.callLater(self.after, d.callback, self.reply)
        self._reached.put(self)
        return d


def _steps(steps):
    return [step if isinstance(step, Send) else Send(*step) for step in steps]


def _unused_spec():
    """An address on loopback where nothing listens: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"inet:{port}@[127.0.0.1]"


def _words(events):
    return " ".join(_EVENT_WORDS.get(event.name, event.name)
                    for event in events if event.name != "negotiate")


def _flat(response):
    """What the MTA got for a command: None, the final reply, or modifications + final."""
    if response is None:
        return None
    if response.modifications:
        return [*response.modifications, response.reply]
    return response.reply


def _name(command):
    return type(command).__name__


# ---------------------------------------------------------------- the harness


class ScenarioTestCase(unittest.TestCase):
    """Runs Scenario tables against the manager's factory on loopback.

    self.observer, when a test sets it before running, is attached to the
    factory: a RecordingObserver then holds the session's event stream.
    self.configure(configuration), when set, completes the configuration
    (conditions, applicable_conditions) before the factory is made.
    """

    timeout = 15
    observer = None
    configure = None

    def logged(self):
        """The text of every log event from now on, as a list that fills up."""
        lines = []

        def observe(event):
            lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return lines

    def logged_at(self):
        """(LogLevel, text) of every log event from now on, as a list that fills up."""
        lines = []

        def observe(event):
            lines.append((event.get("log_level"), formatEvent(event)))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return lines

    def make_factory(self, configuration, clock):
        """The production factory on configuration, children's timeouts on clock."""
        factory = ManagerFactory(configuration, reactor, clock)
        if self.observer is not None:
            factory.add_observer(self.observer)
        return factory

    @defer.inlineCallbacks
    def run_scenario(self, scenario):
        clock = task.Clock()
        reached = defer.DeferredQueue()
        scripted = {}
        milters = []
        for kid in scenario.children:
            if kid.down:
                spec = _unused_spec()
            elif kid.spec is not None:
                spec = kid.spec
            else:
                for reply in kid.replies.values():
                    if isinstance(reply, Hang):
                        reply.bind(clock, reached)
                child = ScriptedChild(Script(kid.actions, kid.protocol, dict(kid.macros),
                                             kid.version, dict(kid.replies)))
                spec = child.start(reactor)
                self.addCleanup(child.stop)
                scripted[kid.name] = child
            milters.append(MilterConfig(
                name=kid.name, connection_spec=spec, enabled=kid.enabled,
                fallback_status=kid.fallback, evaluation_mode=kid.evaluation,
                connection_timeout=kid.timeouts.connection,
                writing_timeout=kid.timeouts.writing, reading_timeout=kid.timeouts.reading,
                end_of_message_timeout=kid.timeouts.end_of_message))
        configuration = Configuration(
            manager=ManagerConfig(
                fallback_status=scenario.fallback, chunk_size=scenario.chunk_size,
                max_body_memory=scenario.max_body_memory,
                progress_interval=scenario.progress_interval,
                down_after_failures=scenario.down_after_failures),
            milters=milters)

        if self.configure is not None:
            self.configure(configuration)
        factory = self.make_factory(configuration, clock)
        self.clock = clock
        self.factory = factory
        self.sessions = []
        sessions = []
        make_session = factory.milter_factory

        def milter_factory(server):
            session = make_session(server)
            self.sessions.append(session)
            sessions.append(list(session.children))
            return session

        factory.milter_factory = milter_factory
        manager_connections = ConnectionTracker()
        manager_connections.track(factory)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        steps = _steps(scenario.steps)
        expected = [(_name(step.command), step.expect) for step in steps]
        actual = []
        progress = []
        mta = yield client.connect(reactor, f"inet:{port.getHost().port}@[127.0.0.1]",
                                   MTA_TIMEOUTS, task.Clock())
        try:
            yield mta.negotiate(scenario.offer)
            negotiated = mta.negotiate_reply
            for step in steps:
                macro = None
                if step.macros is not None:
                    macro = Macro(step.command.code, step.macros)
                d = mta.send(step.command, macro)
                if step.advance is not None:
                    yield reached.get()
                    # A second at a time, as time passes: LoopingCall skips the
                    # intervals that one big jump would pass over.
                    for _ in range(int(step.advance)):
                        clock.advance(1)
                    clock.advance(step.advance - int(step.advance))
                response = yield d
                actual.append((_name(step.command), _flat(response)))
                if step.progress is not None:
                    progress.append((_name(step.command), step.progress,
                                     response.progress if response else 0))
        finally:
            mta.close()
            yield mta.when_closed()
            yield manager_connections.wait()
            for children in sessions:
                for child in children:
                    if child.connection is not None:
                        yield child.connection.when_closed()
            for child in scripted.values():
                yield child.when_closed()

        self.assertEqual(actual, expected)
        for name, wanted, got in progress:
            self.assertEqual((name, got), (name, wanted), "progress packets")
        if scenario.negotiated is not None:
            self.assertEqual(negotiated, scenario.negotiated)
        events = {name: child.events for name, child in scripted.items()}
        if scenario.seen:
            self.assertEqual({name: _words(events[name]) for name in scenario.seen},
                             scenario.seen)
        if scenario.aborted is not None:
            self.assertEqual(
                sorted(name for name, seen in events.items()
                       if any(event.name == "abort" for event in seen)),
                sorted(scenario.aborted))
        for name, headers in scenario.headers_seen.items():
            self.assertEqual([(event.command.name, event.command.value)
                              for event in events[name] if event.name == "header"],
                             headers, f"headers seen by {name}")
        for name, body in scenario.body_seen.items():
            self.assertEqual(b"".join(bytes(event.command.chunk) for event in events[name]
                                      if event.name == "body"),
                             body, f"body seen by {name}")
        for name, sizes in scenario.chunks_seen.items():
            self.assertEqual([len(event.command.chunk) for event in events[name]
                              if event.name == "body"],
                             sizes, f"body chunks seen by {name}")
        for name, wanted in scenario.macros_seen.items():
            got = {}
            for event in events[name]:
                if event.name in wanted:
                    got[event.name] = event.macros
            self.assertEqual(got, wanted, f"macros seen by {name}")
        return events


# A whole message, every step answered CONTINUE.
MESSAGE = [CONNECT, HELO, MAIL, RCPT, DATA, SUBJECT, EOH, BODY, EOM]
ALL_SEEN = "connect helo mail rcpt data header eoh body eom close"


class BasicTests(ScenarioTestCase):
    """The harness itself, and a plain message through two children."""

    def test_two_children_continue(self):
        """Two children that continue everywhere see the whole message; the MTA gets CONTINUE."""
        return self.run_scenario(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=[(command, CONTINUE) for command in MESSAGE],
            seen={"one": ALL_SEEN, "two": ALL_SEEN},
            aborted=(),
            headers_seen={"one": [(b"Subject", b"hello")], "two": [(b"Subject", b"hello")]},
            body_seen={"one": BODY.chunk, "two": BODY.chunk},
        ))


# ---------------------------------------------------------------- verdicts per stage

# The MTA's way to each stage, and the event word a child records for it.
PATH = {
    "connect": [CONNECT],
    "helo": [CONNECT, HELO],
    "mail": [CONNECT, HELO, MAIL],
    "rcpt": [CONNECT, HELO, MAIL, RCPT],
    "data": [CONNECT, HELO, MAIL, RCPT, DATA],
    "header": [CONNECT, HELO, MAIL, RCPT, DATA, SUBJECT],
    "end_of_headers": [CONNECT, HELO, MAIL, RCPT, DATA, SUBJECT, EOH],
    "body": [CONNECT, HELO, MAIL, RCPT, DATA, SUBJECT, EOH, BODY],
    "end_of_message": [CONNECT, HELO, MAIL, RCPT, DATA, SUBJECT, EOH, BODY, EOM],
    "unknown": [CONNECT, HELO, UNKNOWN],
}
WORDS = {
    "connect": "connect", "helo": "connect helo", "mail": "connect helo mail",
    "rcpt": "connect helo mail rcpt", "data": "connect helo mail rcpt data",
    "header": "connect helo mail rcpt data header",
    "end_of_headers": "connect helo mail rcpt data header eoh",
    "body": "connect helo mail rcpt data header eoh body",
    "end_of_message": "connect helo mail rcpt data header eoh body eom",
    "unknown": "connect helo unknown",
}
VERDICTS = {
    "continue": CONTINUE,
    "accept": ACCEPT,
    "reject": REJECT,
    "tempfail": TEMPFAIL,
    "discard": DISCARD,
    "reply_code_5xx": ReplyCode(b"550 5.7.1 refused"),
    "reply_code_4xx": ReplyCode(b"451 4.7.1 try later"),
}
FINAL = ("reject", "tempfail", "discard", "reply_code_5xx", "reply_code_4xx")
ENVELOPE = ("connect", "helo", "mail", "rcpt", "data", "unknown")
MESSAGE_STAGES = ("header", "end_of_headers", "body")


def _still_in_message(stage, verdict):
    """Whether the child that said verdict at stage still takes part in the message.

    Accept takes it out of the message; so does a final verdict at MAIL or
    DATA, which ends the message for it. A recipient's reject or tempfail
    leaves it in the message, and a discard at RCPT ends the message for
    everyone through ABORT, like a final verdict at header, EOH or body.
    """
    if stage in ("connect", "helo", "unknown", "end_of_message") or verdict == "accept":
        return False
    return not (verdict in FINAL and stage in ("mail", "data"))


def _one_child(stage, verdict):
    """A lone child's verdict is the MTA's reply; a child left in the message gets ABORT.

    The MTA quits after the verdict: children still in the message get ABORT
    then (as from the MTA), or already got it when the verdict ended the message.
    """
    reply = VERDICTS[verdict]
    steps = [(command, CONTINUE) for command in PATH[stage][:-1]]
    steps.append((PATH[stage][-1], reply))
    ending = " abort close" if _still_in_message(stage, verdict) else " close"
    return Scenario(
        children=[Kid("one", replies={stage: reply})],
        steps=steps,
        seen={"one": WORDS[stage] + ending},
    )


def _two_children(stage, verdict):
    """Child one says verdict at stage, child two continues: the merged reply.

    continue > accept, so one's accept gives CONTINUE while two takes part.
    Child two gets the message phase only at end of message (replayed), so
    it is aborted having seen the envelope when the message ends before.
    """
    reply = VERDICTS[verdict]
    merged = CONTINUE if verdict == "accept" else reply
    steps = [(command, CONTINUE) for command in PATH[stage][:-1]]
    steps.append((PATH[stage][-1], merged))
    one = WORDS[stage] + (" abort close" if _still_in_message(stage, verdict) else " close")
    if stage in ("connect", "helo", "unknown"):
        two = WORDS[stage] + " close"
    elif stage == "end_of_message" and verdict not in FINAL:
        two = WORDS[stage] + " close"
    else:
        two = WORDS[stage if stage in ENVELOPE else "data"] + " abort close"
    return Scenario(
        children=[Kid("one", replies={stage: reply}), Kid("two")],
        steps=steps,
        seen={"one": one, "two": two},
    )


# Replies the MTAs refuse from a filter there: see BogusReplyTests.
BOGUS = {("connect", "discard"), ("helo", "discard")}


def _add_tests(namespace, make, doc):
    for stage in PATH:
        for verdict in VERDICTS:
            if (stage, verdict) in BOGUS:
                continue

            def test(self, stage=stage, verdict=verdict):
                return self.run_scenario(make(stage, verdict))
            test.__name__ = f"test_{verdict}_at_{stage}"
            test.__doc__ = doc.format(verdict=verdict.replace("_", " "),
                                      stage=stage.replace("_", " "))
            namespace[test.__name__] = test


class OneChildVerdictTests(ScenarioTestCase):
    """Each verdict at each stage from a lone child reaches the MTA."""

    _add_tests(locals(), _one_child, "A lone child's {verdict} at {stage} is the MTA's reply.")


class TwoChildrenVerdictTests(ScenarioTestCase):
    """Each verdict at each stage from the first of two children, merged with a continue."""

    _add_tests(locals(), _two_children,
               "Child one's {verdict} at {stage} merged with child two's continue.")


# ---------------------------------------------------------------- precedence

PRECEDENCE = ("accept", "continue", "tempfail", "reject", "discard")
STRONGER = {name: rank for rank, name in enumerate(PRECEDENCE)}  # discard > ... > accept


def _precedence_at_mail(first, second):
    stronger = max(first, second, key=STRONGER.get)
    return Scenario(
        children=[Kid("one", replies={"mail": VERDICTS[first]}),
                  Kid("two", replies={"mail": VERDICTS[second]})],
        steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, VERDICTS[stronger])],
    )


def _precedence_at_end_of_message(first, second):
    """Child one's verdict at end of message is not final, so child two runs too."""
    stronger = max(first, second, key=STRONGER.get)
    return Scenario(
        children=[Kid("one", replies={"end_of_message": VERDICTS[first]}),
                  Kid("two", replies={"end_of_message": VERDICTS[second]})],
        steps=[(command, CONTINUE) for command in MESSAGE[:-1]] + [(EOM, VERDICTS[stronger])],
        seen={"one": ALL_SEEN, "two": ALL_SEEN},
    )


class PrecedenceTests(ScenarioTestCase):
    """discard > reject > tempfail > continue > accept between two children."""

    for _first in PRECEDENCE:
        for _second in PRECEDENCE:
            def test(self, first=_first, second=_second):
                return self.run_scenario(_precedence_at_mail(first, second))
            test.__name__ = f"test_mail_{_first}_and_{_second}"
            test.__doc__ = (f"At MAIL, {_first} from child one and {_second} from child two "
                            f"merge to the stronger.")
            locals()[test.__name__] = test
        if _first in ("accept", "continue"):
            for _second in PRECEDENCE:
                def test(self, first=_first, second=_second):
                    return self.run_scenario(_precedence_at_end_of_message(first, second))
                test.__name__ = f"test_end_of_message_{_first}_and_{_second}"
                test.__doc__ = (f"At end of message, {_first} from child one and {_second} "
                                f"from child two merge to the stronger.")
                locals()[test.__name__] = test
    del test, _first, _second


class ReplyCodeTests(ScenarioTestCase):
    """A child's reply code goes out only with the merged status it stands for."""

    def test_reply_code_wins_over_tempfail(self):
        """550 text from one child and tempfail from the other: the MTA gets the 550 text."""
        return self.run_scenario(Scenario(
            children=[Kid("one", replies={"mail": ReplyCode(b"550 5.7.1 no")}),
                      Kid("two", replies={"mail": TEMPFAIL})],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, ReplyCode(b"550 5.7.1 no"))],
        ))

    def test_4xx_text_not_sent_with_reject(self):
        """451 text from one child and reject from the other: a plain reject, not the 451 text."""
        return self.run_scenario(Scenario(
            children=[Kid("one", replies={"mail": ReplyCode(b"451 4.7.1 later")}),
                      Kid("two", replies={"mail": REJECT})],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, REJECT)],
        ))


# ---------------------------------------------------------------- RCPT


def _reject_bob(command, macros):
    return REJECT if command.recipient == RCPT2.recipient else CONTINUE


class RecipientTests(ScenarioTestCase):
    """A recipient's verdict counts for the child that gave it."""

    def test_one_child_rejects_a_recipient(self):
        """One child rejects a recipient: the MTA rejects it; none aborted; both get the message."""
        return self.run_scenario(Scenario(
            children=[Kid("one", replies={"rcpt": _reject_bob}), Kid("two")],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, CONTINUE), (RCPT, CONTINUE),
                   (RCPT2, REJECT), (DATA, CONTINUE), (SUBJECT, CONTINUE), (EOH, CONTINUE),
                   (BODY, CONTINUE), (EOM, CONTINUE)],
            seen={"one": "connect helo mail rcpt rcpt data header eoh body eom close",
                  "two": "connect helo mail rcpt rcpt data header eoh body eom close"},
            aborted=(),
        ))

    def test_tempfail_then_accepted_recipient(self):
        """A tempfailed recipient then an accepted one: the child keeps the message."""
        return self.run_scenario(Scenario(
            children=[Kid("one", replies={
                "rcpt": lambda command, macros: TEMPFAIL if command.recipient == RCPT.recipient
                else CONTINUE})],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, CONTINUE), (RCPT, TEMPFAIL),
                   (RCPT2, CONTINUE), (DATA, CONTINUE), (SUBJECT, CONTINUE), (EOH, CONTINUE),
                   (BODY, CONTINUE), (EOM, CONTINUE)],
            seen={"one": "connect helo mail rcpt rcpt data header eoh body eom close"},
        ))

    def test_child_without_recipient_dropped_at_data(self):
        """An evaluation child that rejected every recipient is aborted at DATA; the other goes on.

        Its reject is not applied (the MTA keeps the recipients), but it
        asked for none of them, so it has no part in the message: ABORT at
        DATA, as upstream's envelope-recipient-reject-evaluation fixture.
        """
        return self.run_scenario(Scenario(
            children=[Kid("one", replies={"rcpt": REJECT}, evaluation=True), Kid("two")],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, CONTINUE), (RCPT, CONTINUE),
                   (RCPT2, CONTINUE), (DATA, CONTINUE), (SUBJECT, CONTINUE), (EOH, CONTINUE),
                   (BODY, CONTINUE), (EOM, CONTINUE)],
            seen={"one": "connect helo mail rcpt rcpt abort close",
                  "two": "connect helo mail rcpt rcpt data header eoh body eom close"},
            aborted=("one",),
        ))

    def test_child_keeps_accepted_recipient_in_evaluation(self):
        """An evaluation child that rejected one recipient but kept another gets the message."""
        return self.run_scenario(Scenario(
            children=[Kid("one", replies={"rcpt": _reject_bob}, evaluation=True), Kid("two")],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, CONTINUE), (RCPT, CONTINUE),
                   (RCPT2, CONTINUE), (DATA, CONTINUE), (SUBJECT, CONTINUE), (EOH, CONTINUE),
                   (BODY, CONTINUE), (EOM, CONTINUE)],
            seen={"one": "connect helo mail rcpt rcpt data header eoh body eom close",
                  "two": "connect helo mail rcpt rcpt data header eoh body eom close"},
            aborted=(),
        ))

    def test_discard_at_rcpt_aborts_all(self):
        """A discard at RCPT aborts every child; the next RCPT gets the manager's fallback."""
        return self.run_scenario(Scenario(
            children=[Kid("one", replies={"rcpt": _reject_bob}),
                      Kid("two", replies={"rcpt": DISCARD})],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, CONTINUE), (RCPT, DISCARD),
                   (RCPT2, ACCEPT)],
            seen={"one": "connect helo mail rcpt abort close",
                  "two": "connect helo mail rcpt abort close"},
            aborted=("one", "two"),
        ))

    def test_accept_at_rcpt_leaves_the_message(self):
        """A child that accepts at RCPT takes no further part in the message; the other goes on."""
        return self.run_scenario(Scenario(
            children=[Kid("one", replies={"rcpt": ACCEPT}), Kid("two")],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, CONTINUE), (RCPT, CONTINUE),
                   (RCPT2, CONTINUE), (DATA, CONTINUE), (SUBJECT, CONTINUE), (EOH, CONTINUE),
                   (BODY, CONTINUE), (EOM, CONTINUE)],
            seen={"one": "connect helo mail rcpt close",
                  "two": "connect helo mail rcpt rcpt data header eoh body eom close"},
            aborted=(),
        ))


# ---------------------------------------------------------------- end of message


def _message(eom, headers=(SUBJECT,)):
    """The MTA's steps for one message, each answered CONTINUE, the EOM answered eom."""
    return ([(command, CONTINUE) for command in (CONNECT, HELO, MAIL, RCPT, DATA)]
            + [(header, CONTINUE) for header in headers]
            + [(EOH, CONTINUE), (BODY, CONTINUE), (EOM, eom)])


def _one_edit(edit, actions):
    return Scenario(
        children=[Kid("one", actions=actions, replies={"end_of_message": [edit, CONTINUE]})],
        steps=_message([edit, CONTINUE]),
        seen={"one": ALL_SEEN},
    )


class EndOfMessageActionTests(ScenarioTestCase):
    """Each modification a child makes at end of message reaches the MTA."""

    def test_add_header(self):
        """A child's add-header reaches the MTA."""
        return self.run_scenario(_one_edit(AddHeader(b"X-Spam", b"no"), c.SMFIF_ADDHDRS))

    def test_insert_header(self):
        """A child's insert-header at index 1 (below the MTA's Received:) reaches the MTA."""
        return self.run_scenario(_one_edit(InsertHeader(1, b"X-First", b"1"), c.SMFIF_ADDHDRS))

    def test_change_header(self):
        """A child's change-header reaches the MTA."""
        return self.run_scenario(_one_edit(ChangeHeader(1, b"Subject", b"[SPAM] hello"),
                                           c.SMFIF_CHGHDRS))

    def test_delete_header(self):
        """A child's delete-header (change with an empty value) reaches the MTA."""
        return self.run_scenario(_one_edit(ChangeHeader(1, b"Subject", b""), c.SMFIF_CHGHDRS))

    def test_change_from(self):
        """A child's change-from reaches the MTA."""
        return self.run_scenario(_one_edit(ChangeFrom(b"<bounce@example.net>", b"SIZE=10"),
                                           c.SMFIF_CHGFROM))

    def test_add_recipient(self):
        """A child's add-recipient reaches the MTA."""
        return self.run_scenario(_one_edit(AddRecipient(b"<carol@example.org>"),
                                           c.SMFIF_ADDRCPT))

    def test_add_recipient_with_args(self):
        """A child's add-recipient with ESMTP arguments reaches the MTA."""
        return self.run_scenario(_one_edit(AddRecipientPar(b"<dave@example.org>", b"NOTIFY=NEVER"),
                                           c.SMFIF_ADDRCPT_PAR))

    def test_delete_recipient(self):
        """A child's delete-recipient reaches the MTA."""
        return self.run_scenario(_one_edit(DeleteRecipient(b"<alice@example.org>"),
                                           c.SMFIF_DELRCPT))

    def test_replace_body(self):
        """A child's replace-body reaches the MTA."""
        return self.run_scenario(_one_edit(ReplaceBody(b"cleaned\r\n"), c.SMFIF_CHGBODY))

    def test_quarantine(self):
        """A child's quarantine reaches the MTA."""
        return self.run_scenario(_one_edit(Quarantine(b"virus found"), c.SMFIF_QUARANTINE))

    def test_all_actions_in_order(self):
        """Edits go out as replace-body, headers, change-from, recipients, quarantine."""
        edits = [Quarantine(b"odd"), AddRecipient(b"<carol@example.org>"),
                 ChangeFrom(b"<bounce@example.net>"), AddHeader(b"X-Spam", b"no"),
                 ChangeHeader(1, b"Subject", b"[ok] hello"), ReplaceBody(b"new\r\n"),
                 DeleteRecipient(b"<alice@example.org>")]
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=ALL_ACTIONS,
                          replies={"end_of_message": [*edits, ACCEPT]})],
            steps=_message([ReplaceBody(b"new\r\n"), ChangeHeader(1, b"Subject", b"[ok] hello"),
                            AddHeader(b"X-Spam", b"no"), ChangeFrom(b"<bounce@example.net>"),
                            AddRecipient(b"<carol@example.org>"),
                            DeleteRecipient(b"<alice@example.org>"), Quarantine(b"odd"),
                            ACCEPT]),
        ))

    def test_edit_without_its_action_is_dropped(self):
        """An edit whose action the child did not negotiate is dropped; the verdict stands."""
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": [
                AddHeader(b"X-One", b"1"), CONTINUE]}),
                Kid("two", actions=c.SMFIF_CHGBODY, replies={"end_of_message": [
                    ReplaceBody(b"new\r\n"), CONTINUE]})],
            steps=_message([ReplaceBody(b"new\r\n"), AddHeader(b"X-One", b"1"), CONTINUE]),
        ))

    def test_edits_with_reject_are_not_sent(self):
        """A child that rejects at end of message: the MTA gets the reject and no edits."""
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": [
                AddHeader(b"X-One", b"1"), CONTINUE]}),
                Kid("two", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": [
                    AddHeader(b"X-Two", b"2"), REJECT]})],
            steps=_message(REJECT),
        ))

    def test_child_progress_then_edits(self):
        """A child's progress at end of message is not relayed one for one (the manager's own
        progress_interval keeps the MTA waiting); its edits and verdict arrive."""
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": [
                PROGRESS, AddHeader(b"X-One", b"1"), PROGRESS, CONTINUE]})],
            steps=_message([AddHeader(b"X-One", b"1"), CONTINUE])[:-1]
            + [Send(EOM, [AddHeader(b"X-One", b"1"), CONTINUE], progress=0)],
        ))


class ChainTests(ScenarioTestCase):
    """The message phase is chained: each child sees what the ones before it left."""

    def test_second_child_sees_first_childs_headers_and_body(self):
        """Child two is replayed child one's header edits and replaced body."""
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=ALL_ACTIONS, replies={"end_of_message": [
                AddHeader(b"X-One", b"1"), ChangeHeader(1, b"Subject", b"[one] hello"),
                ChangeHeader(1, b"From", b""), InsertHeader(1, b"X-Top", b"top"),
                ReplaceBody(b"replaced by one\r\n"), CONTINUE]}),
                Kid("two")],
            steps=_message([ReplaceBody(b"replaced by one\r\n"),
                            ChangeHeader(1, b"Subject", b"[one] hello"),
                            ChangeHeader(1, b"From", b""), InsertHeader(1, b"X-Top", b"top"),
                            AddHeader(b"X-One", b"1"), CONTINUE], headers=(FROM, SUBJECT)),
            headers_seen={"one": [(b"From", b"sender@example.net"), (b"Subject", b"hello")],
                          "two": [(b"X-Top", b"top"), (b"Subject", b"[one] hello"),
                                  (b"X-One", b"1")]},
            body_seen={"one": BODY.chunk, "two": b"replaced by one\r\n"},
        ))

    def test_both_children_add_headers_in_configuration_order(self):
        """Headers added by both children reach the MTA in configuration order."""
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": [
                AddHeader(b"X-Added", b"by one"), CONTINUE]}),
                Kid("two", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": [
                    AddHeader(b"X-Added", b"by two"), CONTINUE]})],
            steps=_message([AddHeader(b"X-Added", b"by one"), AddHeader(b"X-Added", b"by two"),
                            CONTINUE]),
            headers_seen={"two": [(b"Subject", b"hello"), (b"X-Added", b"by one")]},
        ))

    def test_second_child_changes_header_the_first_added(self):
        """Child two changes the header child one added: one add-header with the changed value."""
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": [
                AddHeader(b"X-Score", b"1"), CONTINUE]}),
                Kid("two", actions=c.SMFIF_CHGHDRS, replies={"end_of_message": [
                    ChangeHeader(1, b"X-Score", b"7"), CONTINUE]})],
            steps=_message([AddHeader(b"X-Score", b"7"), CONTINUE]),
        ))

    def test_second_child_deletes_header_the_first_added(self):
        """Child two deletes the header child one added: the MTA gets no edit at all."""
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": [
                AddHeader(b"X-Score", b"1"), CONTINUE]}),
                Kid("two", actions=c.SMFIF_CHGHDRS, replies={"end_of_message": [
                    ChangeHeader(1, b"X-Score", b""), CONTINUE]})],
            steps=_message(CONTINUE),
        ))

    def test_last_replace_body_wins(self):
        """Both children replace the body: the MTA gets the last, once; child two saw the first."""
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=c.SMFIF_CHGBODY, replies={"end_of_message": [
                ReplaceBody(b"first\r\n"), CONTINUE]}),
                Kid("two", actions=c.SMFIF_CHGBODY, replies={"end_of_message": [
                    ReplaceBody(b"second "), ReplaceBody(b"body\r\n"), CONTINUE]})],
            steps=_message([ReplaceBody(b"second body\r\n"), CONTINUE]),
            body_seen={"two": b"first\r\n"},
        ))

    def test_last_change_from_and_quarantine_win(self):
        """Both children change the sender and quarantine: the MTA gets the last of each, once."""
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=ALL_ACTIONS, replies={"end_of_message": [
                ChangeFrom(b"<one@example.net>"), Quarantine(b"one"), CONTINUE]}),
                Kid("two", actions=ALL_ACTIONS, replies={"end_of_message": [
                    Quarantine(b"two"), ChangeFrom(b"<two@example.net>"), CONTINUE]})],
            steps=_message([ChangeFrom(b"<two@example.net>"), Quarantine(b"two"), CONTINUE]),
        ))

    def test_recipient_edits_of_both_children(self):
        """Recipient edits of both children all reach the MTA, in configuration order."""
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=ALL_ACTIONS, replies={"end_of_message": [
                AddRecipient(b"<carol@example.org>"), CONTINUE]}),
                Kid("two", actions=ALL_ACTIONS, replies={"end_of_message": [
                    DeleteRecipient(b"<alice@example.org>"),
                    AddRecipientPar(b"<dave@example.org>", b"NOTIFY=NEVER"), CONTINUE]})],
            steps=_message([AddRecipient(b"<carol@example.org>"),
                            DeleteRecipient(b"<alice@example.org>"),
                            AddRecipientPar(b"<dave@example.org>", b"NOTIFY=NEVER"), CONTINUE]),
        ))

    def test_first_child_accepts_at_header_second_gets_replay(self):
        """The live child accepts at a header: CONTINUE; child two is replayed the whole message."""
        return self.run_scenario(Scenario(
            children=[Kid("one", replies={"header": ACCEPT}),
                      Kid("two", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": [
                          AddHeader(b"X-Two", b"2"), CONTINUE]})],
            steps=_message([AddHeader(b"X-Two", b"2"), CONTINUE], headers=(FROM, SUBJECT)),
            seen={"one": "connect helo mail rcpt data header close", "two": ALL_SEEN.replace(
                "header", "header header")},
        ))

    def test_second_child_rejects_during_replay(self):
        """Child two rejects a replayed header: the end of message gets the reject, no edits."""
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": [
                AddHeader(b"X-One", b"1"), CONTINUE]}),
                Kid("two", replies={"header": ReplyCode(b"554 5.7.1 bad header")})],
            steps=_message(ReplyCode(b"554 5.7.1 bad header")),
            seen={"one": ALL_SEEN, "two": "connect helo mail rcpt data header abort close"},
        ))

    def test_second_child_accepts_during_replay(self):
        """Child two accepts at a replayed header: it leaves; child one's edits apply."""
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": [
                AddHeader(b"X-One", b"1"), CONTINUE]}),
                Kid("two", replies={"header": ACCEPT})],
            steps=_message([AddHeader(b"X-One", b"1"), CONTINUE]),
            seen={"one": ALL_SEEN, "two": "connect helo mail rcpt data header close"},
        ))


# ---------------------------------------------------------------- evaluation mode


def _evaluation(stage, verdict):
    """Evaluation child one says verdict at stage; child two adds a header at the end.

    At RCPT child one loses the only recipient (for itself), so it is aborted at DATA.
    """
    reply = VERDICTS[verdict]
    replies = {"end_of_message": [AddHeader(b"X-One", b"1"), ChangeFrom(b"<one@example.net>"),
                                  CONTINUE]}
    replies[stage] = [AddHeader(b"X-One", b"1"), reply] if stage == "end_of_message" else reply
    return Scenario(
        children=[Kid("one", actions=ALL_ACTIONS, evaluation=True, replies=replies),
                  Kid("two", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": [
                      AddHeader(b"X-Two", b"2"), CONTINUE]})],
        steps=_message([AddHeader(b"X-Two", b"2"), CONTINUE]),
        seen={"one": WORDS[stage] + (" abort close" if stage == "rcpt" else " close"),
              "two": ALL_SEEN},
        aborted=("one",) if stage == "rcpt" else (),
        headers_seen={"two": [(b"Subject", b"hello")]},
    )


class EvaluationTests(ScenarioTestCase):
    """An evaluation-mode child's verdict and edits are logged, never applied."""

    for _stage in ("mail", "rcpt", "data", "header", "end_of_headers", "body", "end_of_message"):
        for _verdict in FINAL:
            def test(self, stage=_stage, verdict=_verdict):
                return self.run_scenario(_evaluation(stage, verdict))
            test.__name__ = f"test_{_verdict}_at_{_stage}"
            test.__doc__ = (f"An evaluation child's {_verdict.replace('_', ' ')} at "
                            f"{_stage.replace('_', ' ')} is not applied; the next child "
                            f"gets the message and its edits apply.")
            locals()[test.__name__] = test
    del test, _stage, _verdict

    def test_lone_evaluation_child_rejects_at_end(self):
        """A lone evaluation child rejecting with edits at the end: accept, no edits."""
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=ALL_ACTIONS, evaluation=True, replies={
                "end_of_message": [AddHeader(b"X-One", b"1"), ReplaceBody(b"x"), REJECT]})],
            steps=_message(ACCEPT),
        ))

    def test_last_evaluation_child_keeps_earlier_edits(self):
        """An evaluation child after a normal one tempfails at the end: the first's edits apply."""
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": [
                AddHeader(b"X-One", b"1"), CONTINUE]}),
                Kid("two", actions=ALL_ACTIONS, evaluation=True, replies={"end_of_message": [
                    AddHeader(b"X-Two", b"2"), TEMPFAIL]})],
            steps=_message([AddHeader(b"X-One", b"1"), CONTINUE]),
        ))


# ---------------------------------------------------------------- negotiation


class NegotiateFallbackTests(ScenarioTestCase):
    """A child that cannot be reached contributes its own fallback status at connect."""

    def test_down_child_fallback_accept(self):
        """A down child whose fallback is accept: the mail goes on with the other child."""
        return self.run_scenario(Scenario(
            children=[Kid("scanner", down=True, fallback=Status.ACCEPT),
                      Kid("two", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": [
                          AddHeader(b"X-Two", b"2"), CONTINUE]})],
            steps=_message([AddHeader(b"X-Two", b"2"), CONTINUE]),
            negotiated=Negotiate(6, c.SMFIF_ADDHDRS, 0, {}),
            seen={"two": ALL_SEEN},
        ))

    def test_down_child_fallback_temporary_failure(self):
        """Down child, fallback temporary-failure: connect is decided; the other is not asked."""
        return self.run_scenario(Scenario(
            children=[Kid("scanner", down=True, fallback=Status.TEMPORARY_FAILURE), Kid("two")],
            steps=[(CONNECT, TEMPFAIL)],
            seen={"two": "close"},
        ))

    def test_down_child_fallback_reject(self):
        """A down child whose fallback is reject: connect is rejected; the other is not asked."""
        return self.run_scenario(Scenario(
            children=[Kid("two"), Kid("scanner", down=True, fallback=Status.REJECT)],
            steps=[(CONNECT, REJECT)],
            seen={"two": "close"},
        ))

    def test_down_child_fallback_temporary_failure_decides_the_connection(self):
        """After the down child's temporary failure at connect no child is left.

        An MTA sends nothing more after a temporary failure at connect; if
        it did, the manager's own fallback (accept) would answer.
        """
        return self.run_scenario(Scenario(
            children=[Kid("scanner", down=True, fallback=Status.TEMPORARY_FAILURE), Kid("two")],
            steps=[(CONNECT, TEMPFAIL), (HELO, ACCEPT), (MAIL, ACCEPT)],
            seen={"two": "close"},
        ))

    def test_down_child_fallback_discard_waits_for_mail(self):
        """A down child whose fallback is discard: connect and HELO go on, MAIL is discarded."""
        return self.run_scenario(Scenario(
            children=[Kid("scanner", down=True, fallback=Status.DISCARD), Kid("two")],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, DISCARD),
                   (MAIL, CONTINUE)],
            seen={"two": "connect helo mail abort mail abort close"},
        ))

    def test_every_child_down(self):
        """Every child down: honest negotiation; connect gets their fallback, then the manager's."""
        return self.run_scenario(Scenario(
            children=[Kid("one", down=True, fallback=Status.TEMPORARY_FAILURE),
                      Kid("two", down=True)],
            steps=[(CONNECT, TEMPFAIL), (HELO, ACCEPT)],
            negotiated=Negotiate(6, 0, 0, {}),
        ))

    def test_disabled_child_is_never_contacted(self):
        """A disabled child is not contacted and contributes nothing."""
        return self.run_scenario(Scenario(
            children=[Kid("off", enabled=False, replies={"connect": REJECT}), Kid("two")],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE)],
            seen={"off": "", "two": "connect helo close"},
        ))


NR_ALL = c.NO_REPLY_FLAGS


class NegotiationTests(ScenarioTestCase):
    """How the children's negotiation replies become the manager's."""

    def test_actions_ored_no_reply_anded_no_events_dropped(self):
        """Actions are ORed, no-reply steps ANDed, no-event steps never asked of the MTA."""
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=c.SMFIF_ADDHDRS,
                          protocol=c.SMFIP_NR_CONN | c.SMFIP_NR_HELO | c.SMFIP_NOHELO
                          | c.SMFIP_NOBODY),
                      Kid("two", actions=c.SMFIF_CHGBODY | c.SMFIF_QUARANTINE,
                          protocol=c.SMFIP_NR_CONN | c.SMFIP_NR_RCPT | c.SMFIP_NOHELO)],
            negotiated=Negotiate(6, c.SMFIF_ADDHDRS | c.SMFIF_CHGBODY | c.SMFIF_QUARANTINE,
                                 c.SMFIP_NR_CONN, {}),
            steps=[(CONNECT, None), (HELO, CONTINUE)] + _message(CONTINUE)[2:],
            seen={"one": "connect mail rcpt data header eoh eom close",
                  "two": "connect mail rcpt data header eoh body eom close"},
        ))

    def test_symbol_lists_unioned(self):
        """Symbol lists are unioned for stages every child lists; others keep the MTA's default."""
        return self.run_scenario(Scenario(
            children=[Kid("one", macros={0: [b"j"], 2: [b"{mail_addr}"]}),
                      Kid("two", macros={0: [b"{daemon_name}", b"j"]})],
            negotiated=Negotiate(6, c.SMFIF_SETSYMLIST, 0, {0: [b"j", b"{daemon_name}"]}),
            steps=[(CONNECT, CONTINUE)],
        ))

    def test_no_reply_child_alone(self):
        """A lone child with every no-reply step works for two messages; only EOM is answered."""
        steps = [(CONNECT, None), (HELO, None), (UNKNOWN, None)]
        for _ in range(2):
            steps += [(MAIL, None), (RCPT, None), (DATA, None), (SUBJECT, None), (EOH, None),
                      (BODY, None), (EOM, [AddHeader(b"X-One", b"1"), CONTINUE])]
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=c.SMFIF_ADDHDRS, protocol=NR_ALL, replies={
                "end_of_message": [AddHeader(b"X-One", b"1"), CONTINUE]})],
            offer=FULL_OFFER,
            negotiated=Negotiate(6, c.SMFIF_ADDHDRS, NR_ALL, {}),
            steps=steps,
            seen={"one": "connect helo unknown" + " mail rcpt data header eoh body eom" * 2
                  + " close"},
        ))

    def test_no_reply_child_with_sibling(self):
        """A no-reply child with a sibling that answers: every command answered; both edit."""
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=c.SMFIF_ADDHDRS, protocol=NR_ALL, replies={
                "end_of_message": [AddHeader(b"X-One", b"1"), CONTINUE]}),
                Kid("two", actions=c.SMFIF_ADDHDRS, replies={
                    "rcpt": _reject_bob,
                    "end_of_message": [AddHeader(b"X-Two", b"2"), CONTINUE]})],
            negotiated=Negotiate(6, c.SMFIF_ADDHDRS, 0, {}),
            steps=_message([AddHeader(b"X-One", b"1"), AddHeader(b"X-Two", b"2"), CONTINUE])[:4]
            + [(RCPT2, REJECT)]
            + _message([AddHeader(b"X-One", b"1"), AddHeader(b"X-Two", b"2"), CONTINUE])[4:],
            seen={"one": "connect helo mail rcpt rcpt data header eoh body eom close",
                  "two": "connect helo mail rcpt rcpt data header header eoh body eom close"},
        ))

    def test_leading_space_asked_by_any_child(self):
        """The manager asks the MTA for leading spaces when one child does."""
        return self.run_scenario(Scenario(
            children=[Kid("one", protocol=c.SMFIP_HDR_LEADSPC), Kid("two")],
            negotiated=Negotiate(6, 0, c.SMFIP_HDR_LEADSPC, {}),
            steps=[(CONNECT, CONTINUE)],
        ))


class NoChildTests(ScenarioTestCase):
    """With no child, the manager negotiates honestly and answers its fallback once per command."""

    def test_no_child_fallback_accept(self):
        """No child configured: no no-reply step negotiated; every command gets accept."""
        return self.run_scenario(Scenario(
            children=[],
            negotiated=Negotiate(6, 0, 0, {}),
            steps=[(command, ACCEPT) for command in MESSAGE],
        ))

    def test_no_child_fallback_tempfail(self):
        """No child and fallback temporary-failure: connect and later commands are tempfailed."""
        return self.run_scenario(Scenario(
            children=[],
            fallback=Status.TEMPORARY_FAILURE,
            steps=[(CONNECT, TEMPFAIL), (HELO, TEMPFAIL), (MAIL, TEMPFAIL)],
        ))


# ---------------------------------------------------------------- macros, leading space


class MacroTests(ScenarioTestCase):
    """The MTA's macros reach each child at their stage, filtered by its symbol list."""

    def test_macros_per_stage_and_symbol_list(self):
        """A child with symbol lists gets only those macros at those stages; the other gets all."""
        connect = {b"j": b"mx.example.org", b"{daemon_name}": b"smtpd"}
        helo = {b"{tls_version}": b"TLSv1.3"}
        mail = {b"{mail_addr}": b"sender@example.net", b"{i}": b"4Q2"}
        rcpt = {b"{rcpt_addr}": b"alice@example.org"}
        data = {b"{i}": b"4Q2"}
        eoh = {b"{i}": b"4Q2"}
        eom = {b"{i}": b"4Q2", b"{msg_id}": b"<m@x>"}
        return self.run_scenario(Scenario(
            children=[Kid("one", macros={0: [b"{j}"], 2: [b"{mail_addr}"], 5: [b"i"]}),
                      Kid("two")],
            steps=[Send(CONNECT, macros=connect), Send(HELO, macros=helo),
                   Send(MAIL, macros=mail), Send(RCPT, macros=rcpt), Send(DATA, macros=data),
                   Send(SUBJECT), Send(EOH, macros=eoh), Send(BODY), Send(EOM, macros=eom)],
            macros_seen={
                "one": {"connect": {b"j": b"mx.example.org"}, "helo": helo,
                        "mail": {b"{mail_addr}": b"sender@example.net"}, "rcpt": rcpt,
                        "data": data, "end_of_headers": eoh, "end_of_message": {b"{i}": b"4Q2"}},
                "two": {"connect": connect, "helo": helo, "mail": mail, "rcpt": rcpt,
                        "data": data, "end_of_headers": eoh, "end_of_message": eom},
            },
        ))

    def test_symbol_list_with_no_match_sends_none(self):
        """A child whose symbol list matches no macro the MTA sent gets no macros at that stage."""
        return self.run_scenario(Scenario(
            children=[Kid("one", macros={0: [b"{client_ptr}"]})],
            steps=[Send(CONNECT, macros={b"j": b"mx"})],
            macros_seen={"one": {"connect": {}}},
        ))


class LeadingSpaceTests(ScenarioTestCase):
    """Header values come with their leading space; a child that did not ask gets them without."""

    def test_leading_space_converted_for_the_child_that_did_not_ask(self):
        """Header values lose one leading space for child two; its edits get one added."""
        subject = Header(b"Subject", b" hello")
        return self.run_scenario(Scenario(
            children=[Kid("one", protocol=c.SMFIP_HDR_LEADSPC, actions=c.SMFIF_ADDHDRS,
                          replies={"end_of_message": [AddHeader(b"X-One", b" 1"), CONTINUE]}),
                      Kid("two", actions=c.SMFIF_ADDHDRS | c.SMFIF_CHGHDRS, replies={
                          "end_of_message": [ChangeHeader(1, b"Subject", b"[two] hello"),
                                             AddHeader(b"X-Two", b"2"),
                                             InsertHeader(1, b"X-Top", b"top"), CONTINUE]})],
            negotiated=Negotiate(6, c.SMFIF_ADDHDRS | c.SMFIF_CHGHDRS, c.SMFIP_HDR_LEADSPC, {}),
            steps=_message([ChangeHeader(1, b"Subject", b" [two] hello"),
                            InsertHeader(1, b"X-Top", b" top"), AddHeader(b"X-One", b" 1"),
                            AddHeader(b"X-Two", b" 2"), CONTINUE], headers=(subject,)),
            headers_seen={"one": [(b"Subject", b" hello")],
                          "two": [(b"Subject", b"hello"), (b"X-One", b"1")]},
        ))

    def test_no_conversion_without_the_mtas_offer(self):
        """The MTA does not offer leading spaces: values pass to the children as they are."""
        return self.run_scenario(Scenario(
            children=[Kid("one"), Kid("two")],
            offer=Negotiate(6, c.SMFI_CURR_ACTS, OFFER.protocol & ~c.SMFIP_HDR_LEADSPC, {}),
            negotiated=Negotiate(6, 0, 0, {}),
            steps=_message(CONTINUE, headers=(Header(b"Subject", b" hello"),)),
            headers_seen={"one": [(b"Subject", b" hello")], "two": [(b"Subject", b" hello")]},
        ))


class HeldVerdictTests(ScenarioTestCase):
    """An MTA offering no reply to headers (Postfix, Sendmail) is asked for it whatever the
    children said, and sends a message's headers without waiting; a verdict reached at a header
    or the end of headers reaches it with the next reply it reads. Postfix and Sendmail answer
    the SMTP client only after the end of DATA in both cases."""

    def held(self, children, steps, seen, **more):
        """Run the scenario with an offer of every step flag (FULL_OFFER)."""
        return self.run_scenario(Scenario(children=children, steps=steps, seen=seen,
                                          offer=FULL_OFFER, **more))

    def test_asked_whatever_the_children_said(self):
        """The MTA reads no reply to headers or their end, though the children answer them."""
        return self.held(
            [Kid("one"), Kid("two")],
            [(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, CONTINUE), (RCPT, CONTINUE),
             (DATA, CONTINUE), (FROM, None), (SUBJECT, None), (EOH, None), (BODY, CONTINUE),
             (EOM, CONTINUE)],
            {"one": ALL_SEEN.replace("header", "header header"),
             "two": ALL_SEEN.replace("header", "header header")},
            negotiated=Negotiate(6, 0, c.SMFIP_NR_HDR | c.SMFIP_NR_EOH, {}))

    def test_header_reject_goes_with_the_first_body_chunk(self):
        """The live child rejects the first header: it gets no more of the message, the
        second child none of it, and the MTA the reject in reply to the body."""
        return self.held(
            [Kid("one", replies={"header": ReplyCode(b"554 5.7.1 bad header")}), Kid("two")],
            [(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, CONTINUE), (RCPT, CONTINUE),
             (DATA, CONTINUE), (FROM, None), (SUBJECT, None), (EOH, None),
             (BODY, ReplyCode(b"554 5.7.1 bad header"))],
            {"one": "connect helo mail rcpt data header abort close",
             "two": "connect helo mail rcpt data abort close"})

    def test_reject_at_the_end_of_headers_without_a_body(self):
        """A reject at the end of headers of a message with no body goes with the end of message."""
        return self.held(
            [Kid("one", replies={"end_of_headers": REJECT})],
            [(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, CONTINUE), (RCPT, CONTINUE),
             (DATA, CONTINUE), (SUBJECT, None), (EOH, None), (EOM, REJECT)],
            {"one": "connect helo mail rcpt data header eoh abort close"})

    def test_accept_at_a_header(self):
        """The lone child accepts at a header: the MTA gets the accept with the body."""
        return self.held(
            [Kid("one", replies={"header": ACCEPT})],
            [(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, CONTINUE), (RCPT, CONTINUE),
             (DATA, CONTINUE), (FROM, None), (SUBJECT, None), (EOH, None), (BODY, ACCEPT)],
            {"one": "connect helo mail rcpt data header close"})

    def test_held_verdict_ends_with_an_abort(self):
        """The MTA aborts before reading the verdict: the next message starts afresh."""
        return self.held(
            [Kid("one", replies={"header": lambda command, macros: (
                TEMPFAIL if command.name == SUBJECT.name else CONTINUE)})],
            [(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, CONTINUE), (RCPT, CONTINUE),
             (DATA, CONTINUE), (SUBJECT, None), (ABORT, None),
             (MAIL, CONTINUE), (RCPT, CONTINUE), (DATA, CONTINUE), (FROM, None), (EOH, None),
             (BODY, CONTINUE), (EOM, CONTINUE)],
            {"one": "connect helo mail rcpt data header abort"
                    " mail rcpt data header eoh body eom close"})

    def test_every_reply_read_without_the_offer(self):
        """An MTA that does not offer it reads the reject at the header itself."""
        return self.run_scenario(Scenario(
            children=[Kid("one", replies={"header": REJECT})],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, CONTINUE), (RCPT, CONTINUE),
                   (DATA, CONTINUE), (SUBJECT, REJECT)],
            seen={"one": "connect helo mail rcpt data header abort close"},
            negotiated=Negotiate(6, 0, 0, {})))


# ---------------------------------------------------------------- bodies


class BodyTests(ScenarioTestCase):
    """The body is kept and replayed to later children in chunk_size pieces."""

    def test_body_replayed_in_chunk_size_pieces(self):
        """The live child gets the MTA's chunks; child two the same bytes in chunk_size pieces."""
        first, second = Body(b"0123456789ABCDEFGHIJ"), Body(b"klmno")
        return self.run_scenario(Scenario(
            children=[Kid("one"), Kid("two")],
            chunk_size=8,
            steps=_message(CONTINUE)[:-2] + [(first, CONTINUE), (second, CONTINUE),
                                             (EOM, CONTINUE)],
            body_seen={"one": first.chunk + second.chunk, "two": first.chunk + second.chunk},
            chunks_seen={"one": [20, 5], "two": [8, 8, 8, 1]},
        ))

    def test_body_larger_than_memory_bound(self):
        """A body past max_body_memory (kept in a temp file) is replayed identically."""
        chunks = [Body(bytes([65 + n]) * 20) for n in range(3)]
        return self.run_scenario(Scenario(
            children=[Kid("one"), Kid("two")],
            max_body_memory=16,
            chunk_size=25,
            steps=_message(CONTINUE)[:-2] + [(chunk, CONTINUE) for chunk in chunks]
            + [(EOM, CONTINUE)],
            body_seen={"two": b"A" * 20 + b"B" * 20 + b"C" * 20},
            chunks_seen={"one": [20, 20, 20], "two": [25, 25, 10]},
        ))

    def test_replaced_body_larger_than_memory_bound(self):
        """A replaced body past max_body_memory reaches the next child and the MTA identically."""
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=c.SMFIF_CHGBODY, replies={"end_of_message": [
                ReplaceBody(b"x" * 30), ReplaceBody(b"y" * 30), CONTINUE]}), Kid("two")],
            max_body_memory=16,
            steps=_message([ReplaceBody(b"x" * 30 + b"y" * 30), CONTINUE]),
            body_seen={"two": b"x" * 30 + b"y" * 30},
        ))

    def test_empty_body(self):
        """A message without body: the replayed child gets no body chunk, then end of message."""
        return self.run_scenario(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=[step for step in _message(CONTINUE) if step[0] is not BODY],
            seen={"one": "connect helo mail rcpt data header eoh eom close",
                  "two": "connect helo mail rcpt data header eoh eom close"},
        ))


class SkipReplyTests(ScenarioTestCase):
    """A child's SKIP in the body ends the body for that child only."""

    def test_live_child_skips(self):
        """The live child skips: CONTINUE, it gets no more body; child two gets it all."""
        chunks = [Body(b"first\r\n"), Body(b"second\r\n")]
        return self.run_scenario(Scenario(
            children=[Kid("one", protocol=c.SMFIP_SKIP, replies={"body": SKIP}), Kid("two")],
            steps=_message(CONTINUE)[:-2] + [(chunk, CONTINUE) for chunk in chunks]
            + [(EOM, CONTINUE)],
            seen={"one": "connect helo mail rcpt data header eoh body eom close",
                  "two": "connect helo mail rcpt data header eoh body eom close"},
            body_seen={"one": b"first\r\n", "two": b"first\r\nsecond\r\n"},
        ))

    def test_replayed_child_skips(self):
        """A replayed child skips at its first chunk: it gets end of message next."""
        return self.run_scenario(Scenario(
            children=[Kid("one"), Kid("two", protocol=c.SMFIP_SKIP, replies={"body": SKIP})],
            chunk_size=4,
            steps=_message(CONTINUE),
            chunks_seen={"one": [len(BODY.chunk)], "two": [4]},
            seen={"two": ALL_SEEN},
        ))

    def test_lone_child_skips(self):
        """A lone child's SKIP is not passed on (the manager handles SKIP): CONTINUE."""
        return self.run_scenario(Scenario(
            children=[Kid("one", protocol=c.SMFIP_SKIP, replies={"body": SKIP})],
            steps=_message(CONTINUE)[:-2] + [(BODY, CONTINUE), (BODY, CONTINUE), (EOM, CONTINUE)],
            seen={"one": ALL_SEEN},
        ))


# ---------------------------------------------------------------- DATA emulation


class DataEmulationTests(ScenarioTestCase):
    """An MTA speaking version 4 or later that skips DATA: the children get one anyway."""

    def test_mta_skips_data(self):
        """No DATA from a version 6 MTA: children get DATA before the first header."""
        return self.run_scenario(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=[step for step in _message(CONTINUE) if step[0] is not DATA],
            seen={"one": ALL_SEEN, "two": ALL_SEEN},
        ))

    def test_mta_skips_data_and_headers(self):
        """Straight from RCPT to end of message: children get DATA, then end of message."""
        return self.run_scenario(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, CONTINUE), (RCPT, CONTINUE),
                   (EOM, CONTINUE)],
            seen={"one": "connect helo mail rcpt data eom close",
                  "two": "connect helo mail rcpt data eom close"},
        ))

    def test_emulated_data_rejected(self):
        """A child rejects the emulated DATA: the MTA's first header gets the reject."""
        return self.run_scenario(Scenario(
            children=[Kid("one", replies={"data": REJECT}), Kid("two")],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, CONTINUE), (RCPT, CONTINUE),
                   (SUBJECT, REJECT)],
            seen={"one": "connect helo mail rcpt data close",
                  "two": "connect helo mail rcpt data abort close"},
        ))

    def test_version_2_mta_has_no_data(self):
        """A version 2 MTA knows no DATA: nobody gets one."""
        return self.run_scenario(Scenario(
            children=[Kid("one"), Kid("two")],
            offer=Negotiate(2, c.SMFI_V2_ACTS, c.SMFI_V2_PROT, {}),
            negotiated=Negotiate(2, 0, 0, {}),
            steps=[step for step in _message(CONTINUE) if step[0] is not DATA],
            seen={"one": "connect helo mail rcpt header eoh body eom close",
                  "two": "connect helo mail rcpt header eoh body eom close"},
        ))


# ---------------------------------------------------------------- several messages

SPAM = Mail(b"<spam@example.com>")


def _refuse_spam(verdict):
    def reply(command, macros):
        return verdict if macros.get("{mail_addr}") == b"spam@example.com" else CONTINUE
    return reply


def _second_message(stage, verdict):
    """Message one is refused by child one at stage; message two from another sender is clean.

    Child two never gets message one's headers: it would be replayed them only at the end.
    """
    spam_steps = [Send(SPAM, macros={b"{mail_addr}": b"spam@example.com"})]
    spam_steps += [Send(command) for command in PATH[stage][3:]]
    spam_steps[-1].expect = verdict
    return Scenario(
        children=[Kid("one", actions=c.SMFIF_ADDHDRS, replies={
            stage: _refuse_spam(verdict),
            **({} if stage == "end_of_message" else {"end_of_message": [
                AddHeader(b"X-One", b"1"), CONTINUE]})}),
            Kid("two", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": [
                AddHeader(b"X-Two", b"2"), CONTINUE]})],
        steps=[(CONNECT, CONTINUE), (HELO, CONTINUE)] + spam_steps
        + [Send(MAIL, macros={b"{mail_addr}": b"sender@example.net"})]
        + _message([*([AddHeader(b"X-One", b"1")] if stage != "end_of_message" else []),
                    AddHeader(b"X-Two", b"2"), CONTINUE])[3:],
        headers_seen={"two": [(b"Subject", b"hello"),
                              *([(b"X-One", b"1")] if stage != "end_of_message" else [])]},
    )


class AgainTests(ScenarioTestCase):
    """Every message on a connection starts clean."""

    for _stage in ("mail", "rcpt", "data", "header", "end_of_headers", "body", "end_of_message"):
        for _verdict in ("reject", "tempfail", "discard"):
            def test(self, stage=_stage, verdict=_verdict):
                return self.run_scenario(_second_message(stage, VERDICTS[verdict]))
            test.__name__ = f"test_after_{_verdict}_at_{_stage}"
            test.__doc__ = (f"After a message {_verdict}ed at {_stage.replace('_', ' ')}, "
                            f"the next one is judged on its own replies.")
            locals()[test.__name__] = test
    del test, _stage, _verdict

    def test_after_lone_child_accepts_at_header(self):
        """A lone child that accepted at a header (MTA got accept) is in the next message."""
        return self.run_scenario(Scenario(
            children=[Kid("one", replies={"header": _refuse_spam(ACCEPT)})],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE),
                   Send(SPAM, macros={b"{mail_addr}": b"spam@example.com"}),
                   (RCPT, CONTINUE), (DATA, CONTINUE), (SUBJECT, ACCEPT),
                   Send(MAIL, macros={b"{mail_addr}": b"sender@example.net"})]
            + _message(CONTINUE)[3:],
            seen={"one": "connect helo mail rcpt data header " + ALL_SEEN[len("connect helo "):]},
        ))

    def test_after_accept_at_mail(self):
        """A child that accepted one message takes part in the next one."""
        return self.run_scenario(Scenario(
            children=[Kid("one", replies={"mail": _refuse_spam(ACCEPT)})],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE),
                   Send(SPAM, ACCEPT, macros={b"{mail_addr}": b"spam@example.com"}),
                   Send(MAIL, macros={b"{mail_addr}": b"sender@example.net"})]
            + _message(CONTINUE)[3:],
            seen={"one": "connect helo mail " + ALL_SEEN[len("connect helo "):]},
        ))


# ---------------------------------------------------------------- abort, quit, unknown


class AbortQuitUnknownTests(ScenarioTestCase):
    """The MTA's ABORT, QUIT and unknown commands."""

    def test_abort_in_envelope_then_next_message(self):
        """ABORT after RCPT: every child in the message gets it; the next message goes through."""
        return self.run_scenario(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_message(CONTINUE)[:4] + [(ABORT, None)] + _message(CONTINUE)[2:],
            seen={"one": "connect helo mail rcpt abort " + ALL_SEEN[len("connect helo "):],
                  "two": "connect helo mail rcpt abort " + ALL_SEEN[len("connect helo "):]},
        ))

    def test_abort_in_headers(self):
        """ABORT during the headers: the live child and the waiting one both get ABORT."""
        return self.run_scenario(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_message(CONTINUE)[:6] + [(ABORT, None)],
            seen={"one": "connect helo mail rcpt data header abort close",
                  "two": "connect helo mail rcpt data abort close"},
            aborted=("one", "two"),
        ))

    def test_abort_when_a_child_left_the_message(self):
        """ABORT goes only to children still in the message."""
        return self.run_scenario(Scenario(
            children=[Kid("one", replies={"mail": ACCEPT}), Kid("two")],
            steps=_message(CONTINUE)[:4] + [(ABORT, None)],
            seen={"one": "connect helo mail close", "two": "connect helo mail rcpt abort close"},
            aborted=("two",),
        ))

    def test_quit_after_connect(self):
        """QUIT: every child's connection is closed."""
        return self.run_scenario(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=[(CONNECT, CONTINUE)],
            seen={"one": "connect close", "two": "connect close"},
            aborted=(),
        ))

    def test_unknown_forwarded_and_merged(self):
        """An unknown command goes to every child; a reject is the MTA's reply; nobody leaves."""
        return self.run_scenario(Scenario(
            children=[Kid("one", replies={"unknown": ReplyCode(b"500 5.5.1 what?")}),
                      Kid("two")],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE),
                   (UNKNOWN, ReplyCode(b"500 5.5.1 what?"))] + _message(CONTINUE)[2:],
            seen={"one": "connect helo unknown " + ALL_SEEN[len("connect helo "):],
                  "two": "connect helo unknown " + ALL_SEEN[len("connect helo "):]},
        ))

    def test_unknown_in_message(self):
        """An unknown command between recipients keeps the message going."""
        return self.run_scenario(Scenario(
            children=[Kid("one", replies={"unknown": REJECT}), Kid("two")],
            steps=_message(CONTINUE)[:4] + [(UNKNOWN, REJECT)] + _message(CONTINUE)[4:],
            seen={"one": "connect helo mail rcpt unknown data header eoh body eom close",
                  "two": "connect helo mail rcpt unknown data header eoh body eom close"},
            aborted=(),
        ))


# ---------------------------------------------------------------- timeouts, failures, progress


class TimeoutTests(ScenarioTestCase):
    """A child that does not answer in time contributes its fallback status and is dropped."""

    def test_reading_timeout_at_mail_fallback_accept(self):
        """A child silent at MAIL past its reading timeout is dropped; the other goes on."""
        return self.run_scenario(Scenario(
            children=[Kid("slow", replies={"mail": Hang()}, timeouts=SLOW), Kid("two")],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), Send(MAIL, CONTINUE, advance=10)]
            + _message(CONTINUE)[3:],
            seen={"slow": "connect helo mail close", "two": ALL_SEEN},
        ))

    def test_reading_timeout_at_mail_fallback_tempfail(self):
        """A silent child with fallback temporary-failure at MAIL: tempfail, the other aborted."""
        return self.run_scenario(Scenario(
            children=[Kid("slow", replies={"mail": Hang()}, fallback=Status.TEMPORARY_FAILURE,
                          timeouts=SLOW),
                      Kid("two")],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), Send(MAIL, TEMPFAIL, advance=10)],
            seen={"slow": "connect helo mail close", "two": "connect helo mail abort close"},
        ))

    def test_dropped_child_stays_out_of_later_messages(self):
        """A child dropped after a timeout takes no part in the next message of the connection."""
        return self.run_scenario(Scenario(
            children=[Kid("slow", replies={"rcpt": Hang()}, timeouts=SLOW), Kid("two")],
            steps=_message(CONTINUE)[:3] + [Send(RCPT, CONTINUE, advance=10)]
            + _message(CONTINUE)[4:] + _message(CONTINUE)[2:],
            seen={"slow": "connect helo mail rcpt close",
                  "two": "connect helo " + "mail rcpt data header eoh body eom " * 2 + "close"},
        ))

    def test_reading_timeout_of_live_child(self):
        """The live child silent at a header is dropped; child two still gets the whole message."""
        return self.run_scenario(Scenario(
            children=[Kid("slow", replies={"header": Hang()}, timeouts=SLOW),
                      Kid("two", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": [
                          AddHeader(b"X-Two", b"2"), CONTINUE]})],
            steps=_message(CONTINUE)[:5] + [Send(SUBJECT, CONTINUE, advance=10)]
            + _message([AddHeader(b"X-Two", b"2"), CONTINUE])[6:],
            seen={"slow": "connect helo mail rcpt data header close", "two": ALL_SEEN},
            headers_seen={"two": [(b"Subject", b"hello")]},
        ))

    def test_reading_timeout_of_lone_live_child(self):
        """A lone child silent at a header: its fallback accept is the MTA's reply at once."""
        return self.run_scenario(Scenario(
            children=[Kid("slow", replies={"header": Hang()}, timeouts=SLOW)],
            steps=_message(CONTINUE)[:5] + [Send(SUBJECT, ACCEPT, advance=10)],
            seen={"slow": "connect helo mail rcpt data header close"},
        ))

    def test_end_of_message_timeout_in_the_middle(self):
        """The middle child times out at end of message: the first's edits kept, the third runs."""
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": [
                AddHeader(b"X-One", b"1"), CONTINUE]}),
                Kid("slow", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": Hang()},
                    timeouts=SLOW),
                Kid("three", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": [
                    AddHeader(b"X-Three", b"3"), CONTINUE]})],
            steps=_message(CONTINUE)[:-1] + [Send(EOM, [
                AddHeader(b"X-One", b"1"), AddHeader(b"X-Three", b"3"), CONTINUE], advance=60)],
            seen={"one": ALL_SEEN, "slow": ALL_SEEN.replace("header", "header header"),
                  "three": ALL_SEEN.replace("header", "header header")},
            headers_seen={"slow": [(b"Subject", b"hello"), (b"X-One", b"1")],
                          "three": [(b"Subject", b"hello"), (b"X-One", b"1")]},
        ))

    def test_end_of_message_timeout_fallback_reject(self):
        """A child timing out at end of message with fallback reject: the message is rejected."""
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": [
                AddHeader(b"X-One", b"1"), CONTINUE]}),
                Kid("slow", replies={"end_of_message": Hang()}, fallback=Status.REJECT,
                    timeouts=SLOW)],
            steps=_message(CONTINUE)[:-1] + [Send(EOM, REJECT, advance=60)],
        ))

    def test_end_of_message_timeout_is_not_the_reading_timeout(self):
        """At end of message the child has its end-of-message timeout, not the reading one."""
        return self.run_scenario(Scenario(
            children=[Kid("one", replies={"end_of_message": Hang(ACCEPT, after=30)},
                          timeouts=SLOW)],
            steps=_message(CONTINUE)[:-1] + [Send(EOM, ACCEPT, advance=30)],
        ))


class FallbackCountsAsReplyTests(ScenarioTestCase):
    """A child's fallback_status has exactly the effect that reply would have had there."""

    def test_end_of_message_timeout_tempfail_ends_the_message(self):
        """A child timing out at end of message with fallback tempfail: the ones after it are
        aborted, as after its own temporary failure; the MTA gets TEMPFAIL."""
        return self.run_scenario(Scenario(
            children=[Kid("one"),
                      Kid("slow", replies={"end_of_message": Hang()},
                          fallback=Status.TEMPORARY_FAILURE, timeouts=SLOW),
                      Kid("three")],
            steps=_message(CONTINUE)[:-1] + [Send(EOM, TEMPFAIL, advance=60)],
            seen={"one": ALL_SEEN, "slow": ALL_SEEN,
                  "three": "connect helo mail rcpt data abort close"},
            aborted=("three",),
        ))

    def test_end_of_message_explicit_tempfail_for_comparison(self):
        """The same chain with an explicit temporary failure: the same replies and events."""
        return self.run_scenario(Scenario(
            children=[Kid("one"), Kid("slow", replies={"end_of_message": TEMPFAIL}),
                      Kid("three")],
            steps=_message(CONTINUE)[:-1] + [(EOM, TEMPFAIL)],
            seen={"one": ALL_SEEN, "slow": ALL_SEEN,
                  "three": "connect helo mail rcpt data abort close"},
            aborted=("three",),
        ))

    def test_live_child_timeout_tempfail_ends_the_message(self):
        """The live child silent at a header, fallback tempfail: TEMPFAIL for that header,
        the other child aborted without getting the message."""
        return self.run_scenario(Scenario(
            children=[Kid("slow", replies={"header": Hang()},
                          fallback=Status.TEMPORARY_FAILURE, timeouts=SLOW),
                      Kid("two")],
            steps=_message(CONTINUE)[:5] + [Send(SUBJECT, TEMPFAIL, advance=10)],
            seen={"slow": "connect helo mail rcpt data header close",
                  "two": "connect helo mail rcpt data abort close"},
        ))

    def test_replayed_child_gone_with_fallback_reject(self):
        """A child that drops the connection during its replay, fallback reject: REJECT at
        end of message, the child after it aborted, the first child's edits not sent."""
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": [
                AddHeader(b"X-One", b"1"), CONTINUE]}),
                Kid("gone", replies={"header": DISCONNECT}, fallback=Status.REJECT),
                Kid("three")],
            steps=_message(CONTINUE)[:-1] + [(EOM, REJECT)],
            seen={"one": ALL_SEEN, "gone": "connect helo mail rcpt data header close",
                  "three": "connect helo mail rcpt data abort close"},
        ))

    def test_evaluation_child_fallback_is_not_applied(self):
        """An evaluation-mode child's fallback is logged, not applied, as its verdict would be."""
        return self.run_scenario(Scenario(
            children=[Kid("slow", replies={"mail": Hang()}, fallback=Status.REJECT,
                          evaluation=True, timeouts=SLOW),
                      Kid("two")],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), Send(MAIL, CONTINUE, advance=10)]
            + _message(CONTINUE)[3:],
            seen={"slow": "connect helo mail close", "two": ALL_SEEN},
        ))


class DisconnectTests(ScenarioTestCase):
    """A child that drops its connection is handled like one that timed out."""

    def test_child_disconnects_at_rcpt(self):
        """A child gone at RCPT: its fallback accept counts, the other child carries the message."""
        return self.run_scenario(Scenario(
            children=[Kid("gone", replies={"rcpt": DISCONNECT}), Kid("two")],
            steps=_message(CONTINUE),
            seen={"gone": "connect helo mail rcpt close", "two": ALL_SEEN},
        ))

    def test_child_disconnects_at_rcpt_fallback_tempfail(self):
        """A child gone at RCPT with fallback temporary-failure: that recipient is tempfailed."""
        return self.run_scenario(Scenario(
            children=[Kid("gone", replies={"rcpt": DISCONNECT},
                          fallback=Status.TEMPORARY_FAILURE), Kid("two")],
            steps=_message(CONTINUE)[:3] + [(RCPT, TEMPFAIL), (RCPT2, CONTINUE)]
            + _message(CONTINUE)[4:],
            seen={"gone": "connect helo mail rcpt close",
                  "two": "connect helo mail rcpt rcpt data header eoh body eom close"},
        ))

    def test_replayed_child_disconnects_at_end_of_message(self):
        """The second child gone at its end of message: the first child's edits still apply."""
        return self.run_scenario(Scenario(
            children=[Kid("one", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": [
                AddHeader(b"X-One", b"1"), CONTINUE]}),
                Kid("gone", replies={"end_of_message": DISCONNECT})],
            steps=_message([AddHeader(b"X-One", b"1"), CONTINUE]),
            seen={"one": ALL_SEEN, "gone": ALL_SEEN.replace("header", "header header")},
        ))

    def test_live_child_disconnects_in_body(self):
        """The live child gone in the body: the MTA gets CONTINUE and child two gets the message."""
        return self.run_scenario(Scenario(
            children=[Kid("gone", replies={"body": DISCONNECT}), Kid("two")],
            steps=_message(CONTINUE),
            seen={"gone": "connect helo mail rcpt data header eoh body close", "two": ALL_SEEN},
        ))

    def test_every_child_disconnects(self):
        """Both children gone at HELO: later commands get the manager's fallback status."""
        return self.run_scenario(Scenario(
            children=[Kid("one", replies={"helo": DISCONNECT}),
                      Kid("two", replies={"helo": DISCONNECT})],
            fallback=Status.TEMPORARY_FAILURE,
            steps=[(CONNECT, CONTINUE), (HELO, ACCEPT), (MAIL, TEMPFAIL)],
        ))


class ProgressTests(ScenarioTestCase):
    """While children work on the end of message, the MTA gets progress at progress_interval."""

    def test_progress_while_child_is_slow(self):
        """A child taking 25 s at end of message: progress at 10 s and 20 s, then the reply."""
        return self.run_scenario(Scenario(
            children=[Kid("slow", actions=c.SMFIF_ADDHDRS, replies={"end_of_message": Hang(
                [AddHeader(b"X-Slow", b"1"), CONTINUE], after=25)})],
            progress_interval=10,
            steps=_message(CONTINUE)[:-1] + [
                Send(EOM, [AddHeader(b"X-Slow", b"1"), CONTINUE], progress=2, advance=25)],
        ))

    def test_progress_while_second_child_is_slow(self):
        """Progress keeps coming while a later child in the chain is slow."""
        return self.run_scenario(Scenario(
            children=[Kid("one"), Kid("slow", replies={"end_of_message": Hang(ACCEPT, after=35)})],
            progress_interval=10,
            steps=_message(CONTINUE)[:-1] + [Send(EOM, CONTINUE, progress=3, advance=35)],
        ))

    def test_no_progress_when_disabled(self):
        """progress_interval 0: no progress, however slow the child."""
        return self.run_scenario(Scenario(
            children=[Kid("slow", replies={"end_of_message": Hang(CONTINUE, after=25)})],
            steps=_message(CONTINUE)[:-1] + [Send(EOM, CONTINUE, progress=0, advance=25)],
        ))

    def test_no_progress_after_the_reply(self):
        """Progress stops with the end-of-message reply: the next message's commands get none."""
        return self.run_scenario(Scenario(
            children=[Kid("one")],
            progress_interval=10,
            steps=_message(CONTINUE)[:-1] + [Send(EOM, CONTINUE, progress=0)]
            + _message(CONTINUE)[2:-1] + [Send(EOM, CONTINUE, progress=0)],
        ))


class LifetimeTests(unittest.TestCase):
    """What a finished session leaves behind for the garbage collector."""

    timeout = 15

    @defer.inlineCallbacks
    def test_session_freed_without_a_collection(self):
        """Once an MTA connection is over, its session, children and connections go by reference counting.

        Each cyclic leftover is walked by collections, and a session's made
        them several times as frequent (53 objects a session were left to
        the collector before).
        """
        import gc
        import weakref

        child = ScriptedChild()
        spec = child.start(reactor)
        self.addCleanup(child.stop)
        configuration = Configuration(manager=ManagerConfig(),
                                      milters=[MilterConfig(name="kid", connection_spec=spec)])
        factory = ManagerFactory(configuration, reactor, task.Clock())
        kept = []
        make_session = factory.milter_factory

        def milter_factory(server):
            session = make_session(server)
            kept.append((weakref.ref(session), weakref.ref(server), weakref.ref(session.envelope),
                         weakref.ref(session.children[0])))
            return session

        factory.milter_factory = milter_factory
        connected = client._ClientFactory.connected

        closed = []  # the manager's ends of its child connections

        def keep_connection(self, protocol):
            if protocol.timeouts is not MTA_TIMEOUTS:  # the test's own MTA connection is not the manager's
                kept.append((weakref.ref(protocol), weakref.ref(protocol.transport),
                             weakref.ref(protocol.transport.connector)))
                closed.append(protocol.when_closed())
            return connected(self, protocol)

        self.patch(client._ClientFactory, "connected", keep_connection)
        tracker = ConnectionTracker()
        tracker.track(factory)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        if gc.isenabled():
            gc.disable()
            self.addCleanup(gc.enable)
        mta = yield client.connect(reactor, f"inet:{port.getHost().port}@[127.0.0.1]",
                                   MTA_TIMEOUTS, task.Clock())
        yield mta.negotiate(OFFER)
        for command in MESSAGE:
            yield mta.send(command)
        mta.close()
        yield tracker.wait()
        yield child.when_closed()
        # The manager's own end of the child connection may close a turn after the child's.
        yield defer.gatherResults(closed)
        # when_closed fires inside connectionLost; Twisted's connector hears of it after that.
        yield task.deferLater(reactor, 0, lambda: None)
        # The session's four, and its child connection's three.
        self.assertEqual(sorted(len(refs) for refs in kept), [3, 4])
        self.assertEqual([ref() for refs in kept for ref in refs], [None] * 7)
