"""Test doubles for people testing milters and the manager: a scripted child, a recording observer.

A ScriptedMilter listens on loopback, records every event with its macros
and answers from a script, so a test can state "child 1 rejects at RCPT,
child 2 adds a header at end of message" as data. ConnectionTracker lets a
test wait until every connection of a server factory is gone, so trial finds
a clean reactor. RecordingObserver keeps what the manager's sessions report
on their event stream (miltermanager.events). MemoryPolicySource is an
LDAP directory in memory for the LDAP Policy condition.
"""

from dataclasses import dataclass, field

from twisted.internet import defer
from zope.interface import implementer

from . import stages
from .events import ISessionObserver
from .policy.source import IPolicySource, SourceError, plain_attributes
from .protocol import messages
from .protocol import constants as c
from .server import Milter, MilterServerFactory, MilterServerProtocol


class ConnectionTracker:
    """Follows the connections of server factories; wait() fires once none is open."""

    def __init__(self):
        self.open = set()
        self._waiters = []

    def track(self, factory):
        """Make factory's protocols report to this tracker; return factory."""
        tracker = self

        class Tracked(factory.protocol):
            def connectionMade(self):
                tracker.open.add(self)
                super().connectionMade()

            def connectionLost(self, reason=None):
                try:
                    super().connectionLost(reason)
                finally:
                    tracker._lost(self)

        factory.protocol = Tracked
        return factory

    def wait(self):
        """A Deferred that fires with None once no tracked connection is open."""
        if not self.open:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def _lost(self, protocol):
        self.open.discard(protocol)
        if not self.open:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)


class Disconnect:
    """A scripted reply: the milter drops the connection instead of answering."""

    def __repr__(self):
        return "DISCONNECT"


DISCONNECT = Disconnect()


class Raw:
    """A scripted reply that writes packets as they are, for a milter that breaks the protocol.

    data: the bytes to write (encoded packets, e.g. messages.PROGRESS.encode()).
    then: the reply that follows as usual, or None for none at all.
    """

    def __init__(self, data, then=None):
        self.data = data
        self.then = then

    def __repr__(self):
        return f"Raw({self.data!r}, then={self.then!r})"


@dataclass
class Event:
    """One event a scripted milter saw: its name, the command and that stage's macros."""

    name: str
    command: object
    macros: dict
    connection: int


@dataclass
class Script:
    """How a scripted milter negotiates and answers.

    replies maps an event name ("connect", "helo", "mail", "rcpt", "data",
    "header", "end_of_headers", "body", "end_of_message", "unknown") to a
    reply, a list of replies (end of message: edits then the final one), or
    a callable (command, macros) -> either, or a Deferred of either.
    DISCONNECT (also from a callable) closes the connection instead; a Raw
    writes bytes of its own (a milter breaking the protocol).
    Events not named answer CONTINUE.
    """

    actions: int = 0
    protocol: int = 0
    macros: dict = field(default_factory=dict)
    version: int | None = None
    replies: dict = field(default_factory=dict)


class ScriptedMilter(Milter):
    """An IMilter answering from a Script and recording into a shared list.

    "abort" is recorded for an ABORT command only, not for the abort the
    server library implies when a new MAIL or the end of the connection cuts
    a message short; "close" when the connection ends.
    """

    def __init__(self, server, script, events, connection):
        super().__init__(server)
        self.script = script
        self.events = events
        self.connection = connection
        self.abort_received = False

    def negotiate(self, offer):
        script = self.script
        self.events.append(Event("negotiate", offer, {}, self.connection))
        version = offer.version if script.version is None else script.version
        return messages.Negotiate(version, script.actions, script.protocol,
                                  dict(script.macros))

    def _event(self, name, command, macros):
        self.events.append(Event(name, command, dict(macros.stage(stages.BY_NAME[name].code)),
                                 self.connection))
        reply = self.script.replies.get(name, messages.CONTINUE)
        if callable(reply):
            reply = reply(command, macros)
        if reply is DISCONNECT:
            self.server.transport.loseConnection()
            return defer.Deferred()  # cancelled when the connection is gone
        if isinstance(reply, Raw):
            self.server.transport.write(reply.data)
            return defer.Deferred() if reply.then is None else reply.then
        return reply

    def connect(self, command, macros):
        return self._event("connect", command, macros)

    def helo(self, command, macros):
        return self._event("helo", command, macros)

    def mail(self, command, macros):
        return self._event("mail", command, macros)

    def rcpt(self, command, macros):
        return self._event("rcpt", command, macros)

    def data(self, command, macros):
        return self._event("data", command, macros)

    def header(self, command, macros):
        return self._event("header", command, macros)

    def end_of_headers(self, command, macros):
        return self._event("end_of_headers", command, macros)

    def body(self, command, macros):
        return self._event("body", command, macros)

    def end_of_message(self, command, macros):
        return self._event("end_of_message", command, macros)

    def unknown(self, command, macros):
        return self._event("unknown", command, macros)

    def abort(self, macros):
        # Only an ABORT the MTA sent; the server library also calls abort() when a
        # new MAIL or the end of the connection cuts a message short.
        if self.abort_received:
            self.abort_received = False
            self.events.append(Event("abort", None, {}, self.connection))

    def close(self):
        self.events.append(Event("close", None, {}, self.connection))


class _ScriptedServerProtocol(MilterServerProtocol):
    """Tells the scripted milter which abort() calls answer an ABORT command."""

    def _handle(self, message):
        if message.code == c.ABORT and self.milter is not None:
            self.milter.abort_received = True
        super()._handle(message)


class ScriptedChild:
    """A ScriptedMilter listening on 127.0.0.1; stop it with stop()."""

    def __init__(self, script=None):
        self.script = script or Script()
        self.events = []
        self.port = None
        self._listening = None
        self._connections = 0
        self.tracker = ConnectionTracker()

    def start(self, reactor):
        """Listen on a free loopback port; return the milter connection spec."""
        def milter(server):
            self._connections += 1
            return ScriptedMilter(server, self.script, self.events, self._connections)

        factory = MilterServerFactory(milter)
        factory.protocol = _ScriptedServerProtocol
        self.tracker.track(factory)
        factory.noisy = False
        self._listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port = self._listening.getHost().port
        return self.spec

    @property
    def spec(self):
        return f"inet:{self.port}@[127.0.0.1]"

    def stop(self):
        return defer.maybeDeferred(self._listening.stopListening)

    def when_closed(self):
        """A Deferred that fires once every connection made to this child is gone."""
        return self.tracker.wait()

    def names(self):
        """The names of the events seen, in order."""
        return [event.name for event in self.events]


@implementer(ISessionObserver)
class RecordingObserver:
    """An ISessionObserver that keeps every record it is told, in order, in events."""

    def __init__(self):
        self.events = []

    def session_started(self, event):
        self.events.append(event)

    def child_replied(self, event):
        self.events.append(event)

    def child_stopped(self, event):
        self.events.append(event)

    def child_fell_back(self, event):
        self.events.append(event)

    def message_ended(self, event):
        self.events.append(event)

    def session_ended(self, event):
        self.events.append(event)

    def child_health_changed(self, event):
        self.events.append(event)

    def of(self, kind):
        """The records of one type (events.ChildReplied, ...), in order."""
        return [event for event in self.events if isinstance(event, kind)]


@implementer(IPolicySource)
class MemoryPolicySource:
    """An IPolicySource whose entries live in memory; ldap3's mock server evaluates the filters.

    add(dn, attributes) adds an entry ({name: value or [values]}). searches
    records each (base, filter) asked. While failing is set (a text), every
    search fails with SourceError(failing), as an unreachable directory.
    """

    def __init__(self, scope="sub"):
        from ldap3 import MOCK_SYNC, NONE, Connection, Server

        self._connection = Connection(Server("memory", get_info=NONE), client_strategy=MOCK_SYNC,
                                      check_names=False, auto_escape=False,
                                      raise_exceptions=True)
        self._connection.bind()
        self._scope = {"sub": "SUBTREE", "one": "LEVEL", "base": "BASE"}[scope]
        self.searches = []
        self.failing = None

    def add(self, dn, attributes):
        self._connection.strategy.add_entry(dn, attributes)

    def search(self, base, filter, attributes):
        from ldap3.core.exceptions import LDAPNoSuchObjectResult

        self.searches.append((base, filter))
        if self.failing is not None:
            return defer.fail(SourceError(self.failing))
        try:
            self._connection.search(base, filter, search_scope=self._scope,
                                    attributes=list(attributes))
        except LDAPNoSuchObjectResult:
            return defer.succeed([])
        return defer.succeed([(entry["dn"], plain_attributes(entry["raw_attributes"]))
                              for entry in self._connection.response])

    def stop(self):
        self._connection.unbind()
