"""Unit tests for miltermanager.children: one child as one MTA session sees it."""

import gc

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from miltermanager.children import Child
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
    made.alive = made.in_message = True
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
        kid.in_message = False
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
        from twisted.logger import Logger

        from miltermanager import config
        from miltermanager.session import ManagerSession

        session = ManagerSession(None, config.default(), None)
        session.log = Logger(observer=events.append)
        return session

    def test_cancelled_is_not_an_error(self):
        """A command cancelled because the MTA went away is no child error."""
        from twisted.logger import LogLevel
        from twisted.python.failure import Failure

        events = []
        kid = child()
        status = self.session(events)._child_failed(kid, Failure(defer.CancelledError()), "rcpt")
        self.assertIs(status, kid.fallback_status)
        self.assertEqual([event["log_level"] for event in events], [LogLevel.debug])

    def test_real_failure_is_an_error(self):
        """A child that times out or breaks is logged as an error with the reason."""
        from twisted.logger import LogLevel, formatEvent
        from twisted.python.failure import Failure

        events = []
        kid = child()
        self.session(events)._child_failed(
            kid, Failure(MilterConnectionLost("RCPT", "reset")), "rcpt")
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertIn("[children][error][rcpt][accept] kid:", formatEvent(event))
