"""Unit tests for miltermanager.children: one child as one MTA session sees it."""

import gc

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from miltermanager.children import BogusReply, Child, ChildState
from miltermanager.client import MilterConnectionLost
from miltermanager.config import MilterConfig
from miltermanager.protocol import constants as c
from miltermanager.protocol import messages, negotiation


class FakeConnection:
    """Records what the child sends; every send fails as a lost connection would."""

    negotiate_reply = None

    def __init__(self):
        self.sent = []

    def close(self):
        self.sent.append(("close", None))

    def send(self, command, macro=None):
        self.sent.append((command, macro))
        return defer.fail(MilterConnectionLost("ABORT", "closed by us", sent=False))


def child(**settings):
    made = Child(MilterConfig(name="kid", connection_spec="inet:1@[127.0.0.1]", **settings),
                 None, None)
    made.connection = FakeConnection()
    made.options = negotiation.Options(6, c.SMFI_CURR_ACTS, 0, {})
    made.state = ChildState.IN_MESSAGE
    return made


class AbortTests(SynchronousTestCase):
    def test_abort_on_a_closing_connection_is_quiet(self):
        """An ABORT that can no longer be sent leaves no unhandled error behind."""
        kid = child()
        kid.abort()
        gc.collect()
        self.assertEqual(kid.connection.sent, [(messages.ABORT, None)])
        self.assertFalse(kid.in_message)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_abort_outside_a_message_sends_nothing(self):
        """A child not in the message gets no ABORT (libmilter would ignore it)."""
        kid = child()
        kid.state = ChildState.CONNECTED
        kid.abort()
        self.assertEqual(kid.connection.sent, [])


class MacroFilterTests(SynchronousTestCase):
    def test_only_requested_macros(self):
        """A child with a symbol list gets only those macros, with or without braces."""
        kid = child()
        kid._negotiated(negotiation.Options(6, 0, 0, {0: [b"j", b"{daemon_name}"]}))
        macro = kid._macro_for(c.CONNECT, {b"j": b"mx", b"{daemon_name}": b"smtpd",
                                           b"_": b"client"})
        self.assertEqual(macro, messages.Macro(c.CONNECT, {b"j": b"mx",
                                                           b"{daemon_name}": b"smtpd"}))

    def test_nothing_requested_present(self):
        """When none of the requested macros is there, no Macro packet is sent."""
        kid = child()
        kid._negotiated(negotiation.Options(6, 0, 0, {0: [b"{if_addr}"]}))
        self.assertIsNone(kid._macro_for(c.CONNECT, {b"j": b"mx"}))

    def test_no_list_means_everything(self):
        """Without a symbol list for the stage, every macro goes to the child."""
        kid = child()
        macros = {b"i": b"ABC123"}
        self.assertEqual(kid._macro_for(c.MAIL, macros), messages.Macro(c.MAIL, macros))


class EditTests(SynchronousTestCase):
    def test_unnegotiated_edit_dropped(self):
        """An edit whose action flag the child did not negotiate is dropped."""
        kid = child()
        kid.options = negotiation.Options(6, c.SMFIF_ADDHDRS, 0, {})
        edits = [messages.AddHeader(b"X-A", b"1"), messages.ReplaceBody(b"x")]
        self.assertEqual(kid.allowed_edits(edits, "end-of-message"), edits[:1])

    def test_evaluation_mode_drops_every_edit(self):
        """An evaluation-mode child's edits are logged, never applied."""
        kid = child(evaluation_mode=True)
        self.assertEqual(kid.allowed_edits([messages.AddHeader(b"X-A", b"1")], "eom"), [])

    def test_leading_space_added_to_converted_child_edits(self):
        """A child without leading spaces gets one added to its header edits."""
        kid = child()
        kid.convert_leading_space = True
        [edit] = kid.allowed_edits([messages.ChangeHeader(1, b"Subject", b"x")], "eom")
        self.assertEqual(edit, messages.ChangeHeader(1, b"Subject", b" x"))


class FailureLogTests(SynchronousTestCase):
    """How the session logs a child's failure."""

    def session(self, events):
        from twisted.internet.testing import MemoryReactorClock
        from twisted.logger import Logger

        from miltermanager import config
        from miltermanager.factory import ManagerFactory
        from miltermanager.server import MilterServerProtocol
        from miltermanager.session import ManagerSession

        session = ManagerSession(MilterServerProtocol(),
                                 ManagerFactory(config.default(), MemoryReactorClock()))
        session.log = Logger(observer=events.append)
        return session

    def test_cancelled_is_not_an_error(self):
        """A command cancelled because the MTA went away is no child error."""
        from twisted.logger import LogLevel
        from twisted.python.failure import Failure

        from miltermanager import stages

        events = []
        kid = child()
        status = self.session(events).fell_back(kid, stages.RCPT,
                                                Failure(defer.CancelledError()))
        self.assertIs(status, kid.fallback_status)
        self.assertEqual([event["log_level"] for event in events], [LogLevel.debug])

    def test_real_failure_is_an_error(self):
        """A child that times out or breaks is logged as an error with the reason, and fails."""
        from twisted.logger import LogLevel, formatEvent
        from twisted.python.failure import Failure

        from miltermanager import stages

        events = []
        kid = child()
        self.session(events).fell_back(
            kid, stages.RCPT, Failure(MilterConnectionLost("RCPT", "reset")))
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertIn("[children][error][envelope-recipient][accept] kid:", formatEvent(event))
        self.assertIs(kid.state, ChildState.FAILED)


class BogusReplyTests(SynchronousTestCase):
    """Replies the MTAs refuse from a filter are the child's protocol error, never forwarded."""

    def test_table(self):
        """Each reply at each stage: its status, or BogusReply."""
        from miltermanager import stages
        from miltermanager.client import Response
        from miltermanager.merge import Status

        table = [
            (stages.CONNECT, messages.SHUTDOWN, BogusReply),
            (stages.END_OF_MESSAGE, messages.SHUTDOWN, BogusReply),
            (stages.CONNECT, messages.DISCARD, BogusReply),
            (stages.HELO, messages.DISCARD, BogusReply),
            (stages.MAIL, messages.DISCARD, Status.DISCARD),
            (stages.END_OF_MESSAGE, messages.DISCARD, Status.DISCARD),
            (stages.RCPT, messages.ReplyCode(b"hello world"), BogusReply),
            (stages.RCPT, messages.ReplyCode(b"550 4.7.1 wrong class"), BogusReply),
            (stages.RCPT, messages.ReplyCode(b"550 5.7.1 no"), Status.REJECT),
            (stages.CONNECT, messages.ReplyCode(b"421 4.7.0 busy"), Status.TEMPORARY_FAILURE),
            (stages.CONNECT, messages.REJECT, Status.REJECT),
        ]
        got = []
        for stage, reply, _ in table:
            try:
                result = child().status_of(Response(reply), stage)
            except BogusReply:
                result = BogusReply
            got.append((stage, reply, result))
        self.assertEqual(got, table)

    def test_lone_percent_doubled_in_place(self):
        """A valid reply code with a lone % goes on with it doubled."""
        from miltermanager import stages
        from miltermanager.client import Response

        response = Response(messages.ReplyCode(b"550 5.7.1 100% spam"))
        child().status_of(response, stages.RCPT)
        self.assertEqual(response.reply, messages.ReplyCode(b"550 5.7.1 100%% spam"))
