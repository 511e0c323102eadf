"""The recent activity the dashboard and the sessions page show (an event-stream observer).

Activity keeps, with bounded memory, per clock minute for the last 24
hours (a ring of MINUTES slots, each reused when its minute comes round
again): the messages by the MTA's final verdict and, per child, its
replies by verdict, its fallbacks and stops, and a latency histogram of
fixed log-spaced buckets. Ranges of minutes are merged bucket by bucket,
so p50/p99 over an hour or a day cost no more than over one minute (see
percentile() for how exact they are). It also keeps the last RECENT
messages for the sessions page.

It runs on every child reply: the per-event work is a clock read, a
minute check, two dict lookups and a bisect. Statuses are counted as the
enum members the events carry and turned into labels only when asked.
"""

import bisect
import collections
import math

from zope.interface import implementer

from ..events import ISessionObserver
from ..status import iso_time

MINUTES = 24 * 60  # the ring: one slot per minute of the last day
RECENT = 1000  # messages kept for the sessions page
RANGES = {"hour": 60, "day": MINUTES}

# Latency buckets: 8 per decade from 0.1 ms to 300 s (ratio 10 ** (1/8), about 1.334).
# BOUNDS[i] is the upper bound (seconds) of bucket i; bucket len(BOUNDS) holds what is
# above 300 s, bucket 0 what is below 0.1 ms.
_PER_DECADE = 8
_LOWEST, _HIGHEST = 1e-4, 300.0
BOUNDS = tuple(
    [_LOWEST * 10 ** (i / _PER_DECADE)
     for i in range(int(math.ceil(_PER_DECADE * math.log10(_HIGHEST / _LOWEST))))]
    + [_HIGHEST])
BUCKETS = len(BOUNDS) + 1


def bucket_of(seconds):
    """The latency bucket of seconds: the first whose upper bound is at least seconds."""
    return bisect.bisect_left(BOUNDS, seconds)


def bucket_value(index):
    """The value a bucket stands for (seconds): the geometric middle of its bounds.

    The lowest bucket stands for 0.1 ms (everything below it), the one
    above 300 s for 300 s.
    """
    if index == 0:
        return BOUNDS[0]
    if index >= len(BOUNDS):
        return BOUNDS[-1]
    return math.sqrt(BOUNDS[index - 1] * BOUNDS[index])


def percentile(buckets, p):
    """The p-th percentile (seconds, nearest rank) of the samples counted in buckets; None if none.

    The answer is the middle of the bucket holding the sample of that
    rank: within a factor of 10 ** (1/16) (about 1.155, i.e. -13 % to
    +15.5 %) of the exact nearest-rank value for samples from 0.1 ms to
    300 s; samples outside that range count as 0.1 ms or 300 s.
    """
    total = sum(buckets)
    if not total:
        return None
    rank = max(1, -(-p * total // 100))  # ceil(p/100 * n)
    seen = 0
    for index, count in enumerate(buckets):
        seen += count
        if seen >= rank:
            return bucket_value(index)
    return bucket_value(BUCKETS - 1)  # not reached


def verdict_label(status):
    """A Status as its label ("reject", "temporary-failure"); None (no verdict) as "aborted"."""
    return "aborted" if status is None else status.label


class ChildMinute:
    """One child's counts in one minute."""

    __slots__ = ("replies", "fallbacks", "stops", "latency")

    def __init__(self):
        self.replies = {}  # Status -> n
        self.fallbacks = 0
        self.stops = 0
        self.latency = [0] * BUCKETS


class Minute:
    """What happened in one clock minute (minute = seconds since the epoch // 60)."""

    __slots__ = ("minute", "messages", "children")

    def __init__(self, minute):
        self.minute = minute
        self.messages = {}  # Status or None -> n
        self.children = {}  # name -> ChildMinute

    def child(self, name):
        counts = self.children.get(name)
        if counts is None:
            counts = self.children[name] = ChildMinute()
        return counts


@implementer(ISessionObserver)
class Activity:
    """Per-minute counts of the last day and the last `recent` messages; clock has seconds()."""

    def __init__(self, clock, recent=RECENT):
        self.clock = clock
        self.ring = [None] * MINUTES
        self.recent = collections.deque(maxlen=recent)  # (clock time, MessageEnded)
        self._seconds = clock.seconds
        self._minute = Minute(None)  # the Minute now being counted (none yet)

    def _now(self):
        # The Minute being counted: one clock read and a comparison, save once a minute.
        minute = int(self._seconds() // 60)
        current = self._minute
        if current.minute == minute:
            return current
        slot = minute % MINUTES
        current = self.ring[slot]
        if current is None or current.minute != minute:
            current = self.ring[slot] = Minute(minute)
        self._minute = current
        return current

    # ------------------------------------------------------------ observer

    def session_started(self, event):
        pass

    def child_replied(self, event):
        minute = self._now()
        counts = minute.children.get(event.child)
        if counts is None:
            counts = minute.child(event.child)
        replies = counts.replies
        replies[event.verdict] = replies.get(event.verdict, 0) + 1
        counts.latency[bisect.bisect_left(BOUNDS, event.elapsed)] += 1

    def child_stopped(self, event):
        self._now().child(event.child).stops += 1

    def child_fell_back(self, event):
        self._now().child(event.child).fallbacks += 1

    def message_ended(self, event):
        messages = self._now().messages
        messages[event.status] = messages.get(event.status, 0) + 1
        self.recent.append((self.clock.seconds(), event))

    def session_ended(self, event):
        pass

    def child_health_changed(self, event):
        pass

    # ------------------------------------------------------------ queries

    def minutes(self, count):
        """The last count minutes up to now, oldest first, as (minute, Minute or None)."""
        now = int(self.clock.seconds() // 60)
        result = []
        for minute in range(now - count + 1, now + 1):
            found = self.ring[minute % MINUTES]
            result.append((minute, found if found is not None and found.minute == minute
                           else None))
        return result

    def snapshot(self, range="hour"):
        """The counts over the last hour or day as plain data (JSON-ready).

        {"range", "minutes", "start" (epoch seconds of the first minute),
        "step": 60, "series": {verdict: [messages per minute, oldest
        first]}, "messages": {"total", "verdicts": {verdict: n}},
        "children": {name: {"replies": {verdict: n}, "fallbacks", "stops",
        "samples", "p50_ms", "p99_ms"}}}. ValueError for another range.
        """
        if range not in RANGES:
            raise ValueError(f"range is {' or '.join(RANGES)}, not {range!r}")
        count = RANGES[range]
        minutes = self.minutes(count)
        series = {}
        verdicts = {}
        children = {}
        for position, (_, found) in enumerate(minutes):
            if found is None:
                continue
            for status, n in found.messages.items():
                label = verdict_label(status)
                if label not in series:
                    series[label] = [0] * count
                series[label][position] += n
                verdicts[label] = verdicts.get(label, 0) + n
            for name, counts in found.children.items():
                merged = children.get(name)
                if merged is None:
                    merged = children[name] = ChildMinute()
                for status, n in counts.replies.items():
                    merged.replies[status] = merged.replies.get(status, 0) + n
                merged.fallbacks += counts.fallbacks
                merged.stops += counts.stops
                merged.latency = [a + b for a, b in zip(merged.latency, counts.latency)]
        return {
            "range": range,
            "minutes": count,
            "start": minutes[0][0] * 60,
            "step": 60,
            "series": series,
            "messages": {"total": sum(verdicts.values()), "verdicts": verdicts},
            "children": {name: _child_data(counts) for name, counts in children.items()},
        }

    def messages(self, query="", limit=None):
        """The recent messages, newest first, as plain data; those query matches if given.

        query matches (case-insensitive substring) the queue id, the
        client, the sender, the verdict or the deciding child.
        """
        needle = query.strip().lower()
        found = []
        for when, event in reversed(self.recent):
            if needle and not any(
                    needle in value.lower() for value in (
                        event.queue_id, event.client, event.sender,
                        verdict_label(event.status), event.decided_by) if value):
                continue
            found.append(message_data(when, event))
            if limit is not None and len(found) >= limit:
                break
        return found


def message_data(when, event):
    """A MessageEnded (told at clock time when) as the sessions page shows it."""
    return {
        "time": iso_time(when),
        "session": event.session,
        "queue_id": event.queue_id,
        "client": event.client,
        "sender": event.sender,
        "recipients": event.recipients,
        "verdict": verdict_label(event.status),
        "stage": getattr(event.stage, "nick", None),
        "decided_by": event.decided_by,
        "elapsed": round(event.elapsed, 3),
    }


def _child_data(counts):
    samples = sum(counts.latency)
    p50, p99 = percentile(counts.latency, 50), percentile(counts.latency, 99)
    return {
        "replies": {verdict_label(status): n for status, n in counts.replies.items()},
        "fallbacks": counts.fallbacks,
        "stops": counts.stops,
        "samples": samples,
        "p50_ms": None if p50 is None else round(p50 * 1000, 3),
        "p99_ms": None if p99 is None else round(p99 * 1000, 3),
    }
