"""Why did this child (not) run: the decisions of the last N sessions, per child and stage.

TraceObserver keeps, for each session in flight and for the last `limit`
finished ones (controller.trace_sessions), what happened to each child at
each stage: replied (status, SMTP reply, elapsed), stopped (condition,
stopper, FILE:LINE) or fell back (status, cause, reason), grouped into the
connection's own stages and each message (its queue id, the MTA's
verdict, the deciding child). Memory is bounded: at most `limit` finished
sessions, MAX_ENTRIES decisions and MAX_MESSAGES messages per session;
what is dropped beyond that is counted.
"""

import collections

from zope.interface import implementer

from .. import stages
from ..events import ISessionObserver
from ..protocol import constants as c
from ..status import iso_time, status_label

MAX_ENTRIES = 2000  # decisions kept per session (a header is one per child)
MAX_MESSAGES = 100  # messages kept per session, the last ones
_CONNECTION = (stages.NEGOTIATE, stages.CONNECT, stages.HELO)

# Entry kinds, kept as tuples until asked for (one tuple per decision).
REPLIED, STOPPED, FELL_BACK = "replied", "stopped", "fell-back"


class _Session:
    __slots__ = ("number", "started", "children", "connection", "pending", "messages",
                 "dropped", "ended", "elapsed", "entries")

    def __init__(self, number, started, children):
        self.number = number
        self.started = started
        self.children = children
        self.connection = []  # decisions at connect and helo
        self.pending = []  # decisions of the message in progress
        self.messages = collections.deque(maxlen=MAX_MESSAGES)
        self.dropped = 0
        self.entries = 0
        self.ended = False
        self.elapsed = None

    def add(self, stage, entry):
        if self.entries >= MAX_ENTRIES:
            self.dropped += 1
            return
        self.entries += 1
        (self.connection if stage in _CONNECTION else self.pending).append(entry)


def _reply_text(reply):
    if reply is not None and reply.code == c.REPLY_CODE:
        return bytes(reply.text).decode("utf-8", "replace")
    return None


def _entry_data(entry):
    kind, stage, child = entry[:3]
    data = {"stage": stage.nick, "child": child, "decision": kind}
    if kind == REPLIED:
        _, _, _, status, verdict, reply, elapsed = entry
        data.update(status=status.label, verdict=verdict.label,
                    reply=_reply_text(reply), elapsed_ms=round(elapsed * 1000, 3))
    elif kind == STOPPED:
        _, _, _, condition, stopper, origin = entry
        data.update(condition=condition, stopper=stopper, origin=origin)
    else:
        _, _, _, status, cause, reason = entry
        data.update(status=status.label, cause=cause, reason=reason)
    return data


@implementer(ISessionObserver)
class TraceObserver:
    """The decisions of sessions in flight and of the last `limit` finished ones."""

    def __init__(self, clock, limit):
        self.clock = clock
        self.limit = limit
        self.in_flight = {}
        self.finished = collections.deque(maxlen=limit)

    def session_started(self, event):
        self.in_flight[event.session] = _Session(event.session, self.clock.seconds(),
                                                 event.children)

    def _add(self, event, entry):
        session = self.in_flight.get(event.session)
        if session is not None:
            session.add(event.stage, entry)

    def child_replied(self, event):
        self._add(event, (REPLIED, event.stage, event.child, event.status, event.verdict,
                          event.reply, event.elapsed))

    def child_stopped(self, event):
        self._add(event, (STOPPED, event.stage, event.child, event.condition, event.stopper,
                          event.origin))

    def child_fell_back(self, event):
        self._add(event, (FELL_BACK, event.stage, event.child, event.status,
                          event.cause.value, event.reason))

    def message_ended(self, event):
        session = self.in_flight.get(event.session)
        if session is None:
            return
        session.messages.append((event, session.pending))
        session.pending = []

    def session_ended(self, event):
        session = self.in_flight.pop(event.session, None)
        if session is None:
            return
        session.ended = True
        session.elapsed = event.elapsed
        if self.limit:
            self.finished.append(session)

    def child_health_changed(self, event):
        pass

    # ------------------------------------------------------------ queries

    def _sessions_newest_first(self):
        yield from reversed(list(self.in_flight.values()))
        yield from reversed(self.finished)

    def find(self, query):
        """The trace (plain data) of session number query, or of the message with queue id query.

        A queue id picks that message only; a session number picks every
        message of the session. None when neither is kept.
        """
        query = query.strip()
        if query.isdigit():
            for session in self._sessions_newest_first():
                if session.number == int(query):
                    return self._data(session, None)
        for session in self._sessions_newest_first():
            for message in session.messages:
                if message[0].queue_id == query:
                    return self._data(session, message)
        return None

    def _data(self, session, only):
        messages = [only] if only is not None else list(session.messages)
        data = {
            "session": session.number,
            "started": iso_time(session.started),
            "children": list(session.children),
            "ended": session.ended,
            "elapsed": None if session.elapsed is None else round(session.elapsed, 3),
            "connection": [_entry_data(entry) for entry in session.connection],
            "messages": [{
                "queue_id": ended.queue_id,
                "verdict": "aborted" if ended.status is None else status_label(ended.status),
                "decided_by": ended.decided_by,
                "stage": ended.stage.nick,
                "elapsed": round(ended.elapsed, 3),
                "decisions": [_entry_data(entry) for entry in entries],
            } for ended, entries in messages],
            "dropped": session.dropped,
        }
        if only is None and not session.ended and session.pending:
            data["in_progress"] = [_entry_data(entry) for entry in session.pending]
        return data
