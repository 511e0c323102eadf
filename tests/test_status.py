"""Tests for the status observer and the trace kept for the controller: counts and bounds."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from miltermanager import stages
from miltermanager.controller.trace import TraceObserver
from miltermanager.events import (
    Cause, ChildFellBack, ChildReplied, MessageEnded, SessionEnded, SessionStarted,
)
from miltermanager.merge import Status
from miltermanager.status import LATENCY_SAMPLES, StatusObserver, percentiles


def session(observer, number, queue_id, elapsed=0.001):
    """One session with one message: child "a" replies continue at MAIL in elapsed seconds."""
    observer.session_started(SessionStarted(number, ("a",)))
    observer.child_replied(ChildReplied(number, "a", stages.MAIL, None, Status.CONTINUE,
                                        Status.CONTINUE, elapsed))
    observer.message_ended(MessageEnded(number, stages.END_OF_MESSAGE, Status.CONTINUE, None,
                                        False, 0.1, queue_id))
    observer.session_ended(SessionEnded(number, stages.CLOSED, Status.CONTINUE, None, 1, 0.2))


class PercentileTests(SynchronousTestCase):
    def test_nearest_rank(self):
        """p50/p90/p99 are nearest-rank over the samples, in milliseconds."""
        samples = [n / 1000 for n in range(1, 101)]  # 1 .. 100 ms
        self.assertEqual(percentiles(samples), {"p50": 50.0, "p90": 90.0, "p99": 99.0,
                                                "max": 100.0})

    def test_none(self):
        """No sample: no percentile."""
        self.assertEqual(percentiles([]), {})


class StatusObserverTests(SynchronousTestCase):
    def test_latency_bounded(self):
        """Latency keeps the last LATENCY_SAMPLES replies of a child, not all of them."""
        observer = StatusObserver(Clock())
        for number in range(1, LATENCY_SAMPLES + 11):
            session(observer, number, None)
        counters = observer.children["a"]
        self.assertEqual((len(counters.latency), counters.messages),
                         (1024, 1034))

    def test_fallback_counts_by_cause(self):
        """A fallback counts under its cause and the child took part in the message."""
        observer = StatusObserver(Clock())
        observer.session_started(SessionStarted(1, ("a",)))
        observer.child_fell_back(ChildFellBack(1, "a", stages.RCPT, Status.ACCEPT,
                                               Cause.TIMEOUT, "reading timeout"))
        observer.message_ended(MessageEnded(1, stages.RCPT, Status.REJECT, "a", False, 0.1,
                                            None))
        self.assertEqual((observer.children["a"].fallbacks, observer.children["a"].messages,
                          observer.verdicts), ({"timeout": 1}, 1, {"reject": 1}))


class TraceObserverTests(SynchronousTestCase):
    def test_last_n_sessions(self):
        """Only the last `limit` finished sessions are kept; older queue ids are not found."""
        trace = TraceObserver(Clock(), 3)
        for number in range(1, 6):
            session(trace, number, f"Q{number}")
        self.assertEqual([kept.number for kept in trace.finished], [3, 4, 5])
        self.assertIsNone(trace.find("Q2"))
        self.assertEqual(trace.find("Q4")["messages"][0]["decisions"], [{
            "stage": "envelope-from", "child": "a", "decision": "replied",
            "status": "continue", "verdict": "continue", "reply": None, "elapsed_ms": 1.0}])
        self.assertEqual(trace.find("5")["session"], 5)

    def test_zero_keeps_none(self):
        """trace_sessions = 0: nothing finished is kept."""
        trace = TraceObserver(Clock(), 0)
        session(trace, 1, "Q1")
        self.assertEqual((len(trace.finished), trace.in_flight), (0, {}))
