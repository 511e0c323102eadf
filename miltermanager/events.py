"""The session's event stream: what statistics, traces, metrics and status pages are told.

A session reports through one ISessionObserver: every child's reply, every
stop by an applicable condition, every fallback with its cause, and the end
of each message and of the session. The records are built only when an
observer is attached, so a manager without one pays one attribute test per
report. Observers must be quick and must not raise: they run inside the
session's chain (an exception is logged and dropped by Observers). The
records are named tuples, shared by every observer: building one costs
less than a dataclass, and it cannot be changed by one observer under the
others.
"""

import enum
from typing import NamedTuple

from twisted.logger import Logger
from zope.interface import Interface, implementer


class Cause(enum.Enum):
    """Why a child's fallback_status stood in for its reply."""

    UNREACHABLE = "unreachable"  # connecting or negotiating failed
    DOWN = "down"  # marked down after failures in a row: not even tried
    TIMEOUT = "timeout"  # a connection, reading, writing or end-of-message timeout
    DISCONNECTED = "disconnected"  # the connection ended while a reply was awaited
    PROTOCOL = "protocol"  # a bad packet, or a reply the MTAs would refuse
    CHANGED = "changed"  # negotiated otherwise than before, when the MTA was answered from before
    ERROR = "error"  # anything else


class SessionStarted(NamedTuple):
    """An MTA connection was accepted."""

    session: int  # the session's number in this process, as in log lines
    children: tuple  # names of the children it will contact, in configuration order


class ChildReplied(NamedTuple):
    """A child answered a command (a no-reply step counts as CONTINUE, reply None).

    status is what the reply counts for in the merge, verdict what the child
    said (they differ in evaluation mode). elapsed: seconds since the
    command was sent to this child.
    """

    session: int
    child: str
    stage: object  # a miltermanager.stages.Stage
    reply: object  # the final reply (a protocol message), or None
    status: object  # a miltermanager.merge.Status
    verdict: object
    elapsed: float
    # What came with the reply to end of message (header edits, quarantine, ...), as the
    # child sent them: also in evaluation mode, where none of them applies.
    modifications: tuple = ()


class ChildStopped(NamedTuple):
    """An applicable condition's stopper stopped a child before it got the command of stage."""

    session: int
    child: str
    stage: object
    condition: str  # the condition's name
    stopper: str  # the stopper function's name
    origin: str  # where it was defined, FILE:LINE


class ChildFellBack(NamedTuple):
    """A child's fallback_status stood in for its reply at stage.

    status is what it counts for in the merge (evaluation mode applied);
    reason is the error in words, as the log line gives it.
    """

    session: int
    child: str
    stage: object
    status: object
    cause: Cause
    reason: str


class MessageEnded(NamedTuple):
    """A transaction ended: answered at its end or before, or abandoned by the MTA.

    status is the verdict the MTA got (None when the MTA aborted it or went
    away: see aborted); decided_by names the child whose reply or fallback
    made that verdict, None when every child continued or the manager's own
    fallback answered. stage is where it ended; elapsed counts from MAIL.
    """

    session: int
    stage: object
    status: object
    decided_by: str | None
    aborted: bool
    elapsed: float
    queue_id: str | None  # the MTA's {i} macro, when it sent one
    # The connection checker that found the SMTP client gone (status is then
    # manager.fallback_status_at_disconnect); None when none did.
    client_gone: str | None = None
    client: str | None = None  # the SMTP client as HOSTNAME[ADDRESS], once connect came
    sender: str | None = None  # MAIL's address as the MTA sent it, None before MAIL
    recipients: int = 0  # RCPT commands in the transaction


class SessionEnded(NamedTuple):
    """The MTA connection ended; status is the last verdict the MTA got (None: none yet)."""

    session: int
    stage: object  # the last stage reached
    status: object
    decided_by: str | None
    messages: int  # transactions started
    elapsed: float
    client_gone: str | None = None  # the connection checker that found the client gone


class ChildHealthChanged(NamedTuple):
    """A child was marked down after failures in a row, or came back up (process-wide)."""

    child: str
    up: bool
    failures: int  # failures in a row when it went down; 0 when it came up
    reason: str  # the last failure, or how long it was down
    retry_in: float | None  # seconds until the next probe while down


class ISessionObserver(Interface):
    """Told of everything the sessions do; each method gets one record and returns nothing."""

    def session_started(event):
        """A SessionStarted."""

    def child_replied(event):
        """A ChildReplied."""

    def child_stopped(event):
        """A ChildStopped."""

    def child_fell_back(event):
        """A ChildFellBack."""

    def message_ended(event):
        """A MessageEnded."""

    def session_ended(event):
        """A SessionEnded."""

    def child_health_changed(event):
        """A ChildHealthChanged."""


_METHODS = ("session_started", "child_replied", "child_stopped", "child_fell_back",
            "message_ended", "session_ended", "child_health_changed")


@implementer(ISessionObserver)
class Observers:
    """Several observers as one; one that raises is logged and the others are still told.

    Each method runs a tuple of the observers' bound methods, rebuilt when
    the observers change: a child's reply is told to every observer without
    a lookup per observer.
    """

    log = Logger()

    def __init__(self, observers=()):
        self.observers = []
        for observer in observers:
            self.add(observer)

    def add(self, observer):
        self.observers.append(observer)
        self._bind()

    def remove(self, observer):
        """Stop telling observer; ValueError if it was not told."""
        self.observers.remove(observer)
        self._bind()

    def _bind(self):
        for method in _METHODS:
            setattr(self, "_" + method,
                    tuple(getattr(observer, method) for observer in self.observers))

    def _failed(self, method):
        self.log.failure("[observer][error] {observer!r} failed on {method}",
                         observer=method.__self__, method=method.__name__)

    def session_started(self, event):
        for method in self._session_started:
            try:
                method(event)
            except Exception:
                self._failed(method)

    def child_replied(self, event):
        for method in self._child_replied:
            try:
                method(event)
            except Exception:
                self._failed(method)

    def child_stopped(self, event):
        for method in self._child_stopped:
            try:
                method(event)
            except Exception:
                self._failed(method)

    def child_fell_back(self, event):
        for method in self._child_fell_back:
            try:
                method(event)
            except Exception:
                self._failed(method)

    def message_ended(self, event):
        for method in self._message_ended:
            try:
                method(event)
            except Exception:
                self._failed(method)

    def session_ended(self, event):
        for method in self._session_ended:
            try:
                method(event)
            except Exception:
                self._failed(method)

    def child_health_changed(self, event):
        for method in self._child_health_changed:
            try:
                method(event)
            except Exception:
                self._failed(method)
