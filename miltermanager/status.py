"""What the manager has done since it started, kept from the event stream for get-status.

StatusObserver counts sessions, messages by the MTA's verdict and, per
child, the messages it took part in, its replies by stage and status, the
stops by condition, the fallbacks by cause and its reply latency. Memory is
bounded: counters are keyed by names from the configuration and a fixed
set of stages, statuses and causes, and latency keeps the last
LATENCY_SAMPLES replies per child. snapshot() turns it into plain data
(JSON-ready) with the children's health and the configuration;
merge_snapshots() adds up the snapshots of several workers (manager.n_workers).
"""

import collections
import time

from zope.interface import implementer

from . import merge, stages
from .events import ISessionObserver

# Replies per child whose elapsed time the percentiles are computed from.
LATENCY_SAMPLES = 1024
PERCENTILES = (50, 90, 99)
_BEFORE_MESSAGES = (stages.NEGOTIATE, stages.CONNECT, stages.HELO, stages.CLOSED)


def status_label(status):
    """A verdict as upstream's statistics write it: pass for continue/not-change, None: none."""
    if status is None:
        return None
    if status in (merge.Status.CONTINUE, merge.Status.NOT_CHANGE):
        return "pass"
    return status.label


def iso_time(seconds):
    """seconds since the epoch as local ISO 8601 with the offset, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


def percentiles(samples):
    """{"p50": ms, "p90": ms, "p99": ms, "max": ms} of samples (seconds), nearest rank; {} if none."""
    if not samples:
        return {}
    ordered = sorted(samples)
    result = {}
    for p in PERCENTILES:
        rank = max(1, -(-p * len(ordered) // 100))  # ceil(p/100 * n)
        result[f"p{p}"] = round(ordered[rank - 1] * 1000, 3)
    result["max"] = round(ordered[-1] * 1000, 3)
    return result


class ChildCounters:
    """One child's counters."""

    __slots__ = ("messages", "replies", "stops", "fallbacks", "latency")

    def __init__(self):
        self.messages = 0
        self.replies = {}  # stage nick -> {status label: n}
        self.stops = {}  # condition -> n
        self.fallbacks = {}  # cause -> n
        self.latency = collections.deque(maxlen=LATENCY_SAMPLES)

    def as_data(self, samples=False):
        data = {"messages": self.messages, "replies": self.replies, "stops": self.stops,
                "fallbacks": self.fallbacks, "latency_ms": percentiles(self.latency),
                "latency_samples": len(self.latency)}
        if samples:  # for merge_snapshots: percentiles over several workers need the samples
            data["latency_raw"] = [round(value, 6) for value in self.latency]
        return data


def _count(table, key):
    table[key] = table.get(key, 0) + 1


@implementer(ISessionObserver)
class StatusObserver:
    """Counters over the event stream since start; clock gives the time (reactor or task.Clock)."""

    def __init__(self, clock):
        self.clock = clock
        self.started = clock.seconds()
        self.sessions = 0
        self.sessions_finished = 0
        self.messages = 0
        self.verdicts = {}  # status label (or "aborted") -> n
        self.children = {}  # name -> ChildCounters
        self.health_changes = {}  # name -> (up, clock time) of the last change
        self._taking_part = {}  # session -> names of the children in its current message

    def _child(self, name):
        counters = self.children.get(name)
        if counters is None:
            counters = self.children[name] = ChildCounters()
        return counters

    def _took_part(self, event):
        if event.stage in _BEFORE_MESSAGES:
            return  # the connection's own stages: no message yet
        self._taking_part.setdefault(event.session, set()).add(event.child)

    def session_started(self, event):
        self.sessions += 1

    def child_replied(self, event):
        counters = self._child(event.child)
        replies = counters.replies.get(event.stage.nick)
        if replies is None:
            replies = counters.replies[event.stage.nick] = {}
        _count(replies, event.status.label)
        counters.latency.append(event.elapsed)
        self._took_part(event)

    def child_stopped(self, event):
        _count(self._child(event.child).stops, event.condition)

    def child_fell_back(self, event):
        _count(self._child(event.child).fallbacks, event.cause.value)
        self._took_part(event)

    def message_ended(self, event):
        self.messages += 1
        _count(self.verdicts, "aborted" if event.status is None else status_label(event.status))
        for name in self._taking_part.pop(event.session, ()):
            self._child(name).messages += 1

    def session_ended(self, event):
        self.sessions_finished += 1
        self._taking_part.pop(event.session, None)

    def child_health_changed(self, event):
        self.health_changes[event.child] = (event.up, self.clock.seconds())

    def snapshot(self, configuration, health, in_flight, generation=1, loaded_at=None,
                 samples=False):
        """The status as plain data: see docs/operating.md for every field.

        health: the factory's ChildHealth; in_flight: MTA connections open
        now; generation: how many configurations this process has run
        (1 + successful reloads); loaded_at: clock time the current one
        was adopted; samples: add each child's raw latency samples (seconds)
        as "latency_raw", for merge_snapshots.
        """
        now = self.clock.seconds()
        down = {}
        for (name, _spec), record in health.records.items():
            down[name] = record
        children = []
        names = [milter.name for milter in configuration.milters]
        names += sorted(name for name in self.children if name not in names)
        for name in names:
            milter = configuration.milter(name)
            record = down.get(name)
            if milter is not None and not milter.enabled:
                state, since = "disabled", None
            elif record is not None and record.down_since is not None:
                state, since = "down", record.down_since
            else:
                state = "up"
                change = self.health_changes.get(name)
                since = change[1] if change and change[0] else self.started
            entry = {
                "name": name, "state": state,
                "since": None if since is None else iso_time(since),
                "failures_in_row": record.failures if record is not None else 0,
                "connection_spec": milter.connection_spec if milter is not None else None,
                "configured": milter is not None,
            }
            entry.update((self.children.get(name) or ChildCounters()).as_data(samples))
            children.append(entry)
        return {
            "pid": _pid(),
            "started": iso_time(self.started),
            "uptime": round(now - self.started, 3),
            "configuration": {
                "generation": generation,
                "loaded": iso_time(self.started if loaded_at is None else loaded_at),
                "files": list(configuration.files),
            },
            "sessions": {"started": self.sessions, "finished": self.sessions_finished,
                         "in_flight": in_flight},
            "messages": {"total": self.messages, "verdicts": dict(self.verdicts)},
            "children": children,
        }


def merge_snapshots(snapshots):
    """The sessions, messages and children of several workers' snapshots, added up.

    snapshots were taken with samples=True, in the workers' order. Counts
    are summed; a child's latency percentiles are computed over all the
    workers' samples; a child is "down" when any worker has it down
    ("down_in" says in how many, "since" is the earliest), "disabled" when
    every worker has it disabled, else "up" ("since": the latest). Returns
    {"sessions", "messages", "children"} as snapshot() shapes them.
    """
    sessions = {"started": 0, "finished": 0, "in_flight": 0}
    messages = {"total": 0, "verdicts": {}}
    merged = {}  # name -> the entries of every worker, in order of first appearance
    for snapshot in snapshots:
        for key in sessions:
            sessions[key] += snapshot["sessions"][key]
        messages["total"] += snapshot["messages"]["total"]
        _add(messages["verdicts"], snapshot["messages"]["verdicts"])
        for child in snapshot["children"]:
            merged.setdefault(child["name"], []).append(child)
    return {"sessions": sessions, "messages": messages,
            "children": [_merge_child(entries) for entries in merged.values()]}


def _add(into, counts):
    for key, value in counts.items():
        into[key] = into.get(key, 0) + value


def _merge_child(entries):
    first = entries[0]
    down = [entry for entry in entries if entry["state"] == "down"]
    if down:
        state, since = "down", min(entry["since"] for entry in down)
    elif all(entry["state"] == "disabled" for entry in entries):
        state, since = "disabled", None
    else:
        state = "up"
        since = max(entry["since"] for entry in entries if entry["state"] == "up")
    replies, stops, fallbacks, raw = {}, {}, {}, []
    for entry in entries:
        for stage, statuses in entry["replies"].items():
            _add(replies.setdefault(stage, {}), statuses)
        _add(stops, entry["stops"])
        _add(fallbacks, entry["fallbacks"])
        raw.extend(entry.get("latency_raw", ()))
    return {
        "name": first["name"], "state": state, "since": since, "down_in": len(down),
        "failures_in_row": max(entry["failures_in_row"] for entry in entries),
        "connection_spec": first["connection_spec"], "configured": first["configured"],
        "messages": sum(entry["messages"] for entry in entries), "replies": replies,
        "stops": stops, "fallbacks": fallbacks, "latency_ms": percentiles(raw),
        "latency_samples": len(raw),
    }


def _pid():
    import os

    return os.getpid()
