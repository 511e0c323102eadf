"""The session's event stream, pinned with a RecordingObserver on the manager's factory.

Every record a scenario produces is written out in full: which child
replied what at which stage, who stopped whom, which fallback stood in and
why, and how each message and the session ended.
"""

from twisted.internet import defer
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from miltermanager import stages
from miltermanager.config import ConditionConfig, Hook
from miltermanager.events import (
    Cause, ChildFellBack, ChildReplied, ChildStopped, ISessionObserver, MessageEnded, Observers,
    SessionEnded, SessionStarted,
)
from miltermanager.merge import Status
from miltermanager.protocol.messages import ABORT, CONTINUE, REJECT, TEMPFAIL, ReplyCode
from miltermanager.testing import RecordingObserver
from tests.test_session import (
    ALL_SEEN, CONNECT, HELO, MAIL, SLOW, Hang, Kid, Scenario, ScenarioTestCase, Send,
    _message,
)

A, C, T, R = Status.ACCEPT, Status.CONTINUE, Status.TEMPORARY_FAILURE, Status.REJECT


def _replies(observer):
    """(child, stage name, status, verdict) of every ChildReplied, in order."""
    return [(event.child, event.stage.name, event.status, event.verdict)
            for event in observer.of(ChildReplied)]


class EventStreamTests(ScenarioTestCase):
    """What the sessions tell an observer attached to the factory."""

    def setUp(self):
        self.observer = RecordingObserver()

    def test_recording_observer_provides_the_interface(self):
        """RecordingObserver and Observers are ISessionObservers."""
        verifyObject(ISessionObserver, RecordingObserver())
        verifyObject(ISessionObserver, Observers())

    @defer.inlineCallbacks
    def test_plain_message_through_two_children(self):
        """Every child's reply, in order, then the message's and the session's end."""
        yield self.run_scenario(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_message(CONTINUE),
            seen={"one": ALL_SEEN, "two": ALL_SEEN},
        ))
        events = self.observer.events
        self.assertEqual(events[0], SessionStarted(1, ("one", "two")))
        envelope = [(name, stage, C, C) for stage in ("connect", "helo", "mail", "rcpt", "data")
                    for name in ("one", "two")]
        # Envelope answers come in arrival order: compare them as sets per stage.
        replies = _replies(self.observer)
        self.assertEqual(sorted(replies[:10]), sorted(envelope))
        self.assertEqual(replies[10:], [
            ("one", "header", C, C), ("one", "end_of_headers", C, C), ("one", "body", C, C),
            ("one", "end_of_message", C, C),
            ("two", "header", C, C), ("two", "end_of_headers", C, C), ("two", "body", C, C),
            ("two", "end_of_message", C, C),
        ])
        [ended] = self.observer.of(MessageEnded)
        self.assertEqual((ended.session, ended.stage, ended.status, ended.decided_by,
                          ended.aborted, ended.elapsed),
                         (1, stages.END_OF_MESSAGE, C, None, False, 0.0))
        [session_end] = self.observer.of(SessionEnded)
        self.assertEqual((session_end.status, session_end.decided_by, session_end.messages),
                         (C, None, 1))
        self.assertIs(events[-1], session_end)

    @defer.inlineCallbacks
    def test_reject_at_end_of_message_names_the_child(self):
        """The message ends with the rejecting child as its decider; the next one is skipped."""
        yield self.run_scenario(Scenario(
            children=[Kid("one", replies={"end_of_message": ReplyCode(b"550 5.7.1 spam")}),
                      Kid("two")],
            steps=_message(ReplyCode(b"550 5.7.1 spam")),
        ))
        [ended] = self.observer.of(MessageEnded)
        self.assertEqual((ended.stage, ended.status, ended.decided_by, ended.aborted),
                         (stages.END_OF_MESSAGE, R, "one", False))
        eom = [event for event in self.observer.of(ChildReplied)
               if event.stage is stages.END_OF_MESSAGE]
        self.assertEqual([(event.child, event.reply, event.status) for event in eom],
                         [("one", ReplyCode(b"550 5.7.1 spam"), R)])

    @defer.inlineCallbacks
    def test_elapsed_is_the_childs_time(self):
        """A child answering MAIL after 3 s of the session's clock: elapsed 3.0."""
        yield self.run_scenario(Scenario(
            children=[Kid("slow", replies={"mail": Hang(CONTINUE, after=3)}, timeouts=SLOW)],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), Send(MAIL, CONTINUE, advance=3)],
        ))
        [mail] = [event for event in self.observer.of(ChildReplied)
                  if event.stage is stages.MAIL]
        self.assertEqual((mail.child, mail.elapsed), ("slow", 3.0))

    @defer.inlineCallbacks
    def test_evaluation_mode_shows_both_statuses(self):
        """An evaluation child's reject: verdict REJECT, counted as ACCEPT."""
        yield self.run_scenario(Scenario(
            children=[Kid("eval", replies={"rcpt": REJECT}, evaluation=True), Kid("two")],
            steps=_message(CONTINUE)[:4],
        ))
        self.assertIn(("eval", "rcpt", A, R), _replies(self.observer))

    @defer.inlineCallbacks
    def test_timeout_is_a_fallback_with_its_cause(self):
        """A reading timeout at MAIL: ChildFellBack with cause TIMEOUT and the reason."""
        yield self.run_scenario(Scenario(
            children=[Kid("slow", replies={"mail": Hang()}, fallback=T, timeouts=SLOW),
                      Kid("two")],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), Send(MAIL, TEMPFAIL, advance=10)],
        ))
        [fell] = self.observer.of(ChildFellBack)
        self.assertEqual((fell.session, fell.child, fell.stage, fell.status, fell.cause),
                         (1, "slow", stages.MAIL, T, Cause.TIMEOUT))
        self.assertIn("reading timeout (10.0 s)", fell.reason)
        [ended] = self.observer.of(MessageEnded)
        self.assertEqual((ended.stage, ended.status, ended.decided_by),
                         (stages.MAIL, T, "slow"))

    @defer.inlineCallbacks
    def test_unreachable_child_at_negotiation(self):
        """A child that cannot be reached: ChildFellBack at negotiate, cause UNREACHABLE."""
        yield self.run_scenario(Scenario(
            children=[Kid("down", down=True), Kid("two")],
            steps=[(CONNECT, CONTINUE)],
        ))
        [fell] = self.observer.of(ChildFellBack)
        self.assertEqual((fell.child, fell.stage, fell.status, fell.cause),
                         ("down", stages.NEGOTIATE, A, Cause.UNREACHABLE))
        self.assertIn("cannot connect to the milter at inet:", fell.reason)

    @defer.inlineCallbacks
    def test_protocol_error_is_a_fallback(self):
        """An invalid reply code: ChildFellBack with cause PROTOCOL."""
        yield self.run_scenario(Scenario(
            children=[Kid("bad", replies={"helo": ReplyCode(b"hello")}), Kid("two")],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE)],
        ))
        [fell] = self.observer.of(ChildFellBack)
        self.assertEqual((fell.child, fell.stage, fell.cause), ("bad", stages.HELO,
                                                               Cause.PROTOCOL))

    @defer.inlineCallbacks
    def test_stop_names_condition_and_stopper(self):
        """A stopper stopping a child at MAIL: ChildStopped with condition, stopper, origin."""
        def no_mail(context, sender):
            return True

        def configure(configuration):
            configuration.conditions = {"Nope": ConditionConfig("Nope", stoppers=[
                Hook("envelope_from", "no_mail", no_mail, "conf:7")])}
            configuration.milters[0].applicable_conditions = ["Nope"]

        self.configure = configure
        yield self.run_scenario(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_message(CONTINUE)[:3],
        ))
        self.assertEqual(self.observer.of(ChildStopped),
                         [ChildStopped(1, "one", stages.MAIL, "Nope", "no_mail", "conf:7")])

    @defer.inlineCallbacks
    def test_abort_ends_the_message_as_aborted(self):
        """An ABORT from the MTA, then the MTA leaving mid-transaction: both end aborted."""
        yield self.run_scenario(Scenario(
            children=[Kid("one")],
            steps=_message(CONTINUE)[:4] + [(ABORT, None)] + _message(CONTINUE)[2:3],
        ))
        ended = self.observer.of(MessageEnded)
        self.assertEqual([(event.stage, event.status, event.aborted) for event in ended],
                         [(stages.RCPT, None, True), (stages.MAIL, None, True)])
        [session_end] = self.observer.of(SessionEnded)
        self.assertEqual(session_end.messages, 2)


class NoObserverTests(unittest.TestCase):
    """Without an observer the factory has none to hand to its sessions."""

    def test_factory_without_observer(self):
        """A new factory's observer is None; adding and removing one restores None."""
        from twisted.internet.testing import MemoryReactorClock

        from miltermanager.config import Configuration
        from miltermanager.factory import ManagerFactory

        factory = ManagerFactory(Configuration(), MemoryReactorClock())
        self.assertIsNone(factory.observer)
        observer = RecordingObserver()
        factory.add_observer(observer)
        self.assertIsNotNone(factory.observer)
        factory.remove_observer(observer)
        self.assertIsNone(factory.observer)


class ObserversTests(unittest.TestCase):
    """Observers fans records out; one that raises does not silence the others."""

    def test_failing_observer_is_logged(self):
        """The first observer raises: it is logged, the second still gets the record."""
        class Broken(RecordingObserver):
            def message_ended(self, event):
                raise RuntimeError("broken observer")

        good = RecordingObserver()
        observers = Observers([Broken(), good])
        record = MessageEnded(1, stages.END_OF_MESSAGE, C, None, False, 0.0, None)
        observers.message_ended(record)
        self.assertEqual(good.events, [record])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
