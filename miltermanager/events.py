"""The session's event stream: what statistics, traces, metrics and status pages are told.

A session reports through one ISessionObserver: every child's reply, every
stop by an applicable condition, every fallback with its cause, and the end
of each message and of the session. The records are built only when an
observer is attached, so a manager without one pays one attribute test per
report. Observers must be quick and must not raise: they run inside the
session's chain (an exception is logged and dropped by Observers). The
records are shared by every observer and must not be changed; they are not
frozen dataclasses because a frozen one's __init__ costs twice as much, once
per child reply.
"""

import enum
from dataclasses import dataclass

from twisted.logger import Logger
from zope.interface import Interface, implementer


class Cause(enum.Enum):
    """Why a child's fallback_status stood in for its reply."""

    UNREACHABLE = "unreachable"  # connecting or negotiating failed
    DOWN = "down"  # marked down after failures in a row: not even tried
    TIMEOUT = "timeout"  # a connection, reading, writing or end-of-message timeout
    DISCONNECTED = "disconnected"  # the connection ended while a reply was awaited
    PROTOCOL = "protocol"  # a bad packet, or a reply the MTAs would refuse
    ERROR = "error"  # anything else


@dataclass(slots=True)
class SessionStarted:
    """An MTA connection was accepted."""

    session: int  # the session's number in this process, as in log lines
    children: tuple  # names of the children it will contact, in configuration order


@dataclass(slots=True)
class ChildReplied:
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


@dataclass(slots=True)
class ChildStopped:
    """An applicable condition's stopper stopped a child before it got the command of stage."""

    session: int
    child: str
    stage: object
    condition: str  # the condition's name
    stopper: str  # the stopper function's name
    origin: str  # where it was defined, FILE:LINE


@dataclass(slots=True)
class ChildFellBack:
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


@dataclass(slots=True)
class MessageEnded:
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


@dataclass(slots=True)
class SessionEnded:
    """The MTA connection ended; status is the last verdict the MTA got (None: none yet)."""

    session: int
    stage: object  # the last stage reached
    status: object
    decided_by: str | None
    messages: int  # transactions started
    elapsed: float
    client_gone: str | None = None  # the connection checker that found the client gone


@dataclass(slots=True)
class ChildHealthChanged:
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


@implementer(ISessionObserver)
class Observers:
    """Several observers as one; one that raises is logged and the others are still told."""

    log = Logger()

    def __init__(self, observers=()):
        self.observers = list(observers)

    def _tell(self, method, event):
        for observer in self.observers:
            try:
                getattr(observer, method)(event)
            except Exception:
                self.log.failure("[observer][error] {observer!r} failed on {method}",
                                 observer=observer, method=method)

    def session_started(self, event):
        self._tell("session_started", event)

    def child_replied(self, event):
        self._tell("child_replied", event)

    def child_stopped(self, event):
        self._tell("child_stopped", event)

    def child_fell_back(self, event):
        self._tell("child_fell_back", event)

    def message_ended(self, event):
        self._tell("message_ended", event)

    def session_ended(self, event):
        self._tell("session_ended", event)

    def child_health_changed(self, event):
        self._tell("child_health_changed", event)
