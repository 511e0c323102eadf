"""Tests for the web pages' Activity: minutes, the day's ring, latency buckets, recent messages."""

import random

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from miltermanager import stages
from miltermanager.events import (Cause, ChildFellBack, ChildReplied, ChildStopped,
                                  ISessionObserver, MessageEnded)
from miltermanager.merge import Status
from miltermanager.web import activity
from miltermanager.web.activity import Activity

START = 1_700_000_040.0  # a whole minute


def replied(child, elapsed, verdict=Status.CONTINUE, session=1):
    return ChildReplied(session, child, stages.END_OF_MESSAGE, None, verdict, verdict, elapsed)


def ended(session, status, queue_id=None, client="mx.example.net[192.0.2.1]",
          sender="<a@example.org>", decided_by=None, recipients=1):
    return MessageEnded(session, stages.END_OF_MESSAGE, status, decided_by, status is None, 0.25,
                        queue_id, None, client, sender, recipients)


def exact(samples, p):
    """The nearest-rank percentile, written out here."""
    ordered = sorted(samples)
    rank = max(1, -(-p * len(ordered) // 100))
    return ordered[rank - 1]


class ActivityTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(START)
        self.activity = Activity(self.clock)

    def test_interface(self):
        """Activity is an ISessionObserver."""
        verifyObject(ISessionObserver, self.activity)

    def test_minute_rollover(self):
        """Messages land in the minute they ended in; the series has one count per minute."""
        self.activity.message_ended(ended(1, Status.ACCEPT))
        self.clock.advance(59.5)
        self.activity.message_ended(ended(2, Status.REJECT))
        self.clock.advance(1)  # the next minute
        self.activity.message_ended(ended(3, Status.REJECT))
        self.activity.message_ended(ended(4, None))
        data = self.activity.snapshot("hour")
        self.assertEqual(data["minutes"], 60)
        self.assertEqual(data["step"], 60)
        self.assertEqual(data["start"], START + 60 - 59 * 60)
        self.assertEqual(data["series"]["accept"][-2:], [1, 0])
        self.assertEqual(data["series"]["reject"][-2:], [1, 1])
        self.assertEqual(data["series"]["aborted"][-2:], [0, 1])
        self.assertEqual(sum(data["series"]["reject"]), 2)
        self.assertEqual(data["messages"], {"total": 4, "verdicts": {
            "accept": 1, "reject": 2, "aborted": 1}})

    def test_hour_and_day(self):
        """A message two hours old is in the day's counts, not the hour's."""
        self.activity.message_ended(ended(1, Status.DISCARD))
        self.clock.advance(2 * 3600)
        self.activity.message_ended(ended(2, Status.ACCEPT))
        self.assertEqual(self.activity.snapshot("hour")["messages"]["verdicts"], {"accept": 1})
        day = self.activity.snapshot("day")
        self.assertEqual(day["messages"]["verdicts"], {"accept": 1, "discard": 1})
        self.assertEqual(len(day["series"]["discard"]), 1440)
        self.assertEqual(day["series"]["discard"][-121], 1)

    def test_ring_forgets_after_a_day(self):
        """A slot is reused when its minute comes round a day later: the old counts are gone."""
        self.activity.message_ended(ended(1, Status.REJECT))
        self.activity.child_replied(replied("a", 0.01))
        self.clock.advance(24 * 3600 - 60)
        self.assertEqual(self.activity.snapshot("day")["messages"]["total"], 1)
        self.clock.advance(60)  # the same slot, one day later
        day = self.activity.snapshot("day")
        self.assertEqual(day["messages"], {"total": 0, "verdicts": {}})
        self.assertEqual(day["children"], {})
        self.activity.message_ended(ended(2, Status.ACCEPT))
        self.assertEqual(self.activity.snapshot("day")["messages"]["verdicts"], {"accept": 1})
        self.assertEqual(sum(slot is not None for slot in self.activity.ring), 1)

    def test_stale_slot_not_read(self):
        """A minute that had no event shows 0 even if its slot holds the day before's counts."""
        self.activity.message_ended(ended(1, Status.REJECT))
        self.clock.advance(24 * 3600 + 60)  # the slot still holds yesterday's minute
        self.activity.message_ended(ended(2, Status.ACCEPT))
        self.assertEqual(self.activity.snapshot("day")["messages"]["verdicts"], {"accept": 1})

    def test_child_counts(self):
        """Replies by the child's verdict, fallbacks and stops, per child over the range."""
        self.activity.child_replied(replied("a", 0.002))
        self.activity.child_replied(replied("a", 0.004, Status.REJECT))
        self.clock.advance(120)
        self.activity.child_replied(replied("a", 0.003))
        self.activity.child_replied(ChildReplied(1, "b", stages.END_OF_MESSAGE, None,
                                                 Status.CONTINUE, Status.REJECT, 0.001))
        self.activity.child_fell_back(ChildFellBack(1, "b", stages.CONNECT, Status.ACCEPT,
                                                    Cause.TIMEOUT, "timeout"))
        self.activity.child_stopped(ChildStopped(1, "c", stages.MAIL, "Cond", "stop", "f:1"))
        children = self.activity.snapshot("hour")["children"]
        self.assertEqual(children["a"]["replies"], {"continue": 2, "reject": 1})
        self.assertEqual(children["a"]["samples"], 3)
        # evaluation mode: the child's own verdict is what the dashboard counts
        self.assertEqual(children["b"]["replies"], {"reject": 1})
        self.assertEqual((children["b"]["fallbacks"], children["b"]["stops"]), (1, 0))
        self.assertEqual((children["c"]["fallbacks"], children["c"]["stops"]), (0, 1))
        self.assertIsNone(children["c"]["p50_ms"])

    def test_percentiles_from_buckets(self):
        """p50/p99 merged over minutes are within the buckets' stated factor of the exact ones."""
        rng = random.Random(12)
        samples = [rng.lognormvariate(-5, 1.5) for _ in range(5000)]
        for index, sample in enumerate(samples):
            if index % 500 == 0:
                self.clock.advance(60)
            self.activity.child_replied(replied("a", sample))
        child = self.activity.snapshot("hour")["children"]["a"]
        self.assertEqual(child["samples"], 5000)
        factor = 10 ** (1 / 16)
        for p in (50, 99):
            truth = exact(samples, p) * 1000
            got = child[f"p{p}_ms"]
            self.assertTrue(truth / factor <= got <= truth * factor, (p, truth, got))

    def test_percentile_known_buckets(self):
        """With every sample in one bucket, both percentiles are that bucket's middle."""
        buckets = [0] * activity.BUCKETS
        index = activity.bucket_of(0.005)
        buckets[index] = 10
        middle = activity.bucket_value(index)
        self.assertTrue(activity.BOUNDS[index - 1] < 0.005 <= activity.BOUNDS[index])
        self.assertEqual(activity.percentile(buckets, 50), middle)
        self.assertEqual(activity.percentile(buckets, 99), middle)
        self.assertIsNone(activity.percentile([0] * activity.BUCKETS, 50))
        buckets[activity.bucket_of(1.2)] = 1  # 1 of 11: above p50, at p99
        self.assertEqual(activity.percentile(buckets, 50), middle)
        high = activity.percentile(buckets, 99)
        self.assertTrue(1.2 / 10 ** (1 / 16) <= high <= 1.2 * 10 ** (1 / 16), high)

    def test_bucket_edges(self):
        """Below 0.1 ms and above 300 s have their own buckets; the bounds rise by 10**(1/8)."""
        self.assertEqual(activity.bucket_of(0.00001), 0)
        self.assertEqual(activity.bucket_of(1000), activity.BUCKETS - 1)
        self.assertEqual(activity.bucket_value(0), 0.0001)
        self.assertEqual(activity.bucket_value(activity.BUCKETS - 1), 300.0)
        ratios = {round(b / a, 6) for a, b in zip(activity.BOUNDS, activity.BOUNDS[1:-1])}
        self.assertEqual(ratios, {round(10 ** (1 / 8), 6)})

    def test_recent_ring_bound(self):
        """Only the last `recent` messages are kept, newest first."""
        small = Activity(self.clock, recent=5)
        for number in range(1, 9):
            small.message_ended(ended(number, Status.ACCEPT, queue_id=f"Q{number}"))
        self.assertEqual([m["session"] for m in small.messages()], [8, 7, 6, 5, 4])
        self.assertEqual(Activity(self.clock).recent.maxlen, 1000)

    def test_message_fields(self):
        """A kept message has what the sessions page shows."""
        self.activity.message_ended(ended(7, Status.TEMPORARY_FAILURE, queue_id="4XyZ",
                                          decided_by="spam", recipients=3))
        [message] = self.activity.messages()
        self.assertEqual(message["session"], 7)
        self.assertEqual(message["queue_id"], "4XyZ")
        self.assertEqual(message["client"], "mx.example.net[192.0.2.1]")
        self.assertEqual(message["sender"], "<a@example.org>")
        self.assertEqual(message["recipients"], 3)
        self.assertEqual(message["verdict"], "temporary-failure")
        self.assertEqual(message["stage"], "end-of-message")
        self.assertEqual(message["decided_by"], "spam")
        self.assertRegex(message["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}$")

    def test_search(self):
        """The query matches queue id, client, sender, verdict or deciding child, any case."""
        self.activity.message_ended(ended(1, Status.ACCEPT, queue_id="AAA111",
                                          sender="<alice@example.org>"))
        self.activity.message_ended(ended(2, Status.REJECT, queue_id="BBB222",
                                          client="spammer.example[198.51.100.7]",
                                          decided_by="clamav"))
        self.activity.message_ended(ended(3, None, queue_id=None, sender=None, client=None))

        def sessions(query):
            return [m["session"] for m in self.activity.messages(query)]

        self.assertEqual(sessions(""), [3, 2, 1])
        self.assertEqual(sessions("aaa1"), [1])
        self.assertEqual(sessions("ALICE"), [1])
        self.assertEqual(sessions("198.51.100"), [2])
        self.assertEqual(sessions("reject"), [2])
        self.assertEqual(sessions("ClamAV"), [2])
        self.assertEqual(sessions("aborted"), [3])
        self.assertEqual(sessions("example"), [2, 1])
        self.assertEqual(sessions("nothing-like-it"), [])
        self.assertEqual(len(self.activity.messages("", limit=2)), 2)

    def test_bad_range(self):
        """A range other than hour or day is a ValueError naming the choices."""
        error = self.assertRaises(ValueError, self.activity.snapshot, "week")
        self.assertIn("hour or day", str(error))
