"""Upstream's [statistics] log lines and our one-line message summary, from the event stream.

StatisticsObserver is an events.ISessionObserver. The service attaches it
only while the statistics log level is on, so nothing here runs (and
nothing is formatted) otherwise. It writes, at the "statistics" level
(syslog: LOG_NOTICE, "[statistics] "-prefixed, as upstream):

    [milter][header][add](TAG): <NAME>=<VALUE>: CHILD     a child added, inserted or changed
                                                           a header (also in evaluation mode)
    [reply][end-of-message][quarantine](TAG)               the MTA was told to quarantine
    [message][end](TAG) QUEUEID: client=..., ...           ours: one line per message
    [milter][end][STATE][STATUS][ELAPSED](TAG): CHILD      per child, at the session's end
    [session][end][STATE][STATUS][ELAPSED](TAG)            at the session's end
    [sessions][finished] TOTAL(+1) PROCESSING              after it

TAG is the session's number (the one in every other log line of the
session). STATE is upstream's nick of the last stage reached; STATUS is
"pass" for continue (and skip, or nothing said), "stop" for a child an
applicable condition stopped, "error" for a child whose fallback stood in,
else the status's name (accept, reject, temporary-failure, discard).
ELAPSED is in seconds as C's %g writes it: the session's whole length, and
for a child the time the manager waited for its replies.
"""

from twisted.logger import Logger
from zope.interface import implementer

from . import stages
from .events import ISessionObserver
from .merge import Status
from .protocol.messages import AddHeader, ChangeHeader, InsertHeader, Quarantine

_PASS = (None, Status.NOT_CHANGE, Status.CONTINUE, Status.SKIP)
# The verdicts that end a message without it being delivered (no quarantine then).
_REFUSED = (Status.TEMPORARY_FAILURE, Status.REJECT, Status.DISCARD)
_HEADER_EDITS = (AddHeader, InsertHeader, ChangeHeader)
_UNSAFE = {ord(char): f"%{ord(char):02X}" for char in " ,/%"}
_UNSAFE.update({code: f"%{code:02X}" for code in (*range(0x20), 0x7F)})


def status_word(status):
    """Upstream's statistics word for a status: "pass" for continue, skip or none."""
    if status in _PASS:
        return "pass"
    return status.label


def _token(text):
    """text as one token of the summary line: space, comma, slash, % and controls %-escaped."""
    return text.translate(_UNSAFE)


def _unfolded(value):
    """A header value on one line: a folded value's line breaks are dropped (RFC 5322 3.2.2)."""
    return value.replace(b"\r\n", b"").replace(b"\n", b"").decode("utf-8", "backslashreplace")


class _Child:
    """What one child did in one session: for its [milter][end] line and the summary."""

    __slots__ = ("stage", "verdict", "word", "elapsed", "message_status", "message_fallback",
                 "message_elapsed", "message_seen")

    def __init__(self):
        self.stage = stages.NEGOTIATE
        self.verdict = None  # its last reply's verdict
        self.word = None  # "stop" or "error" when that came after its last reply
        self.elapsed = 0.0
        self.new_message()

    def new_message(self):
        self.message_status = None  # the strongest verdict it gave in this message
        self.message_fallback = None  # (status, cause) when its fallback stood in
        self.message_elapsed = 0.0
        self.message_seen = False

    def end_word(self):
        """Its STATUS in the [milter][end] line."""
        return self.word or status_word(self.verdict)


class _Session:
    __slots__ = ("children", "stopped", "quarantine")

    def __init__(self, names):
        self.children = {name: _Child() for name in names}
        self.stopped = []  # (child, stage nick, condition) in this message
        self.quarantine = False


@implementer(ISessionObserver)
class StatisticsObserver:
    """Writes the statistics lines and the message summary of every session it is told of.

    evaluation(name) says whether the child of that name runs in
    evaluation mode (its quarantine is not applied); processing counts
    the sessions in flight as this observer saw them start and end.
    write(*lines) writes lines (in one write where it can); by default each
    is logged at the statistics level through twisted.logger.
    """

    log = Logger()

    def __init__(self, evaluation=lambda name: False, write=None):
        self.evaluation = evaluation
        self.sessions = {}
        self.finished = 0
        if write is not None:
            self._write = write  # the service's LogRouter.statistics: the same lines, cheaper

    def _write(self, *lines):
        for line in lines:
            self.log.info("{line}", line=line, milter_log_level="statistics")

    def _child(self, event):
        session = self.sessions.get(event.session)
        if session is None:
            return None, None
        child = session.children.get(event.child)
        if child is None:
            child = session.children[event.child] = _Child()
        return session, child

    # ------------------------------------------------------------ the stream

    def session_started(self, event):
        self.sessions[event.session] = _Session(event.children)

    def child_replied(self, event):
        # _child inlined, and the word left for the end: this runs for every reply.
        session = self.sessions.get(event.session)
        if session is None:
            return
        child = session.children.get(event.child)
        if child is None:
            child = session.children[event.child] = _Child()
        child.stage = event.stage
        verdict = child.verdict = event.verdict
        child.word = None
        elapsed = event.elapsed
        child.elapsed += elapsed
        child.message_elapsed += elapsed
        child.message_seen = True
        if child.message_status is None or verdict > child.message_status:
            child.message_status = verdict
        if event.modifications:
            self._modified(event, session)

    def _modified(self, event, session):
        for modification in event.modifications:
            if isinstance(modification, _HEADER_EDITS):
                if modification.value:  # (a change to nothing deletes the header)
                    self._write(f"[milter][header][add]({event.session}): "
                                f"<{_unfolded(modification.name)}>="
                                f"<{_unfolded(modification.value)}>: {event.child}")
            elif isinstance(modification, Quarantine) and not self.evaluation(event.child):
                session.quarantine = True

    def child_stopped(self, event):
        session, child = self._child(event)
        if child is None:
            return
        child.stage = event.stage
        child.word = "stop"
        session.stopped.append((event.child, event.stage.nick, event.condition))

    def child_fell_back(self, event):
        session, child = self._child(event)
        if child is None:
            return
        child.stage = event.stage
        child.word = "error"
        child.message_seen = True
        child.message_fallback = (event.status, event.cause)

    def message_ended(self, event):
        session = self.sessions.get(event.session)
        if session is None:
            return
        summary = self.summary(event, session)
        if (session.quarantine and event.stage is stages.END_OF_MESSAGE
                and event.status is not None and event.status not in _REFUSED):
            self._write(f"[reply][end-of-message][quarantine]({event.session})", summary)
        else:
            self._write(summary)
        session.quarantine = False
        session.stopped = []
        for child in session.children.values():
            child.new_message()

    def session_ended(self, event):
        session = self.sessions.pop(event.session, None)
        tag = event.session
        lines = [] if session is None else [
            f"[milter][end][{child.stage.nick}][{child.end_word()}][{child.elapsed:g}]({tag}): "
            f"{name}" for name, child in session.children.items()]
        self.finished += 1
        self._write(*lines,
                    f"[session][end][{event.stage.nick}][{status_word(event.status)}]"
                    f"[{event.elapsed:g}]({tag})",
                    f"[sessions][finished] {self.finished}(+1) {len(self.sessions)}")

    def child_health_changed(self, event):
        pass

    # ------------------------------------------------------------ the summary

    @staticmethod
    def summary(event, session):
        """Our one line for a message (see docs/operating.md)."""
        milters = []
        for name, child in session.children.items():
            if not child.message_seen:
                continue
            if child.message_fallback is not None:
                status, cause = child.message_fallback
                word = f"{status.label}({cause.value})"
            else:
                word = status_word(child.message_status)
            milters.append(f"{_token(name)}/{word}/{child.message_elapsed * 1000:.1f}")
        stopped = [f"{_token(name)}/{nick}/{_token(condition)}"
                   for name, nick, condition in session.stopped]
        verdict = "abort" if event.status is None else status_word(event.status)
        return (f"[message][end]({event.session}) {event.queue_id or 'NOQUEUE'}: "
                f"client={_token(event.client or '-')}, from={_token(event.sender or '-')}, "
                f"nrcpt={event.recipients}, verdict={verdict}, stage={event.stage.nick}, "
                f"by={_token(event.decided_by or '-')}, elapsed={event.elapsed * 1000:.1f}, "
                f"milters={' '.join(milters) or '-'}, stopped={' '.join(stopped) or '-'}")
