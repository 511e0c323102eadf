"""Test doubles for people testing milters and the manager: a scripted child milter.

A ScriptedMilter listens on loopback, records every event with its macros
and answers from a script, so a test can state "child 1 rejects at RCPT,
child 2 adds a header at end of message" as data.
"""

from dataclasses import dataclass, field

from twisted.internet import defer

from .protocol import messages
from .server import Milter, MilterServerFactory


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
    Events not named answer CONTINUE.
    """

    actions: int = 0
    protocol: int = 0
    macros: dict = field(default_factory=dict)
    version: int | None = None
    replies: dict = field(default_factory=dict)


_STAGES = {
    "connect": b"C", "helo": b"H", "mail": b"M", "rcpt": b"R", "data": b"T",
    "header": b"L", "end_of_headers": b"N", "body": b"B", "end_of_message": b"E",
    "unknown": b"U",
}


class ScriptedMilter(Milter):
    """An IMilter answering from a Script and recording into a shared list."""

    def __init__(self, server, script, events, connection):
        super().__init__(server)
        self.script = script
        self.events = events
        self.connection = connection

    def negotiate(self, offer):
        script = self.script
        self.events.append(Event("negotiate", offer, {}, self.connection))
        version = offer.version if script.version is None else script.version
        return messages.Negotiate(version, script.actions, script.protocol,
                                  dict(script.macros))

    def _event(self, name, command, macros):
        self.events.append(Event(name, command, dict(macros.stage(_STAGES[name])),
                                 self.connection))
        reply = self.script.replies.get(name, messages.CONTINUE)
        if callable(reply):
            return reply(command, macros)
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
        self.events.append(Event("abort", None, {}, self.connection))

    def close(self):
        self.events.append(Event("close", None, {}, self.connection))


class ScriptedChild:
    """A ScriptedMilter listening on 127.0.0.1; stop it with stop()."""

    def __init__(self, script=None):
        self.script = script or Script()
        self.events = []
        self.port = None
        self._listening = None
        self._connections = 0

    def start(self, reactor):
        """Listen on a free loopback port; return the milter connection spec."""
        def milter(server):
            self._connections += 1
            return ScriptedMilter(server, self.script, self.events, self._connections)

        factory = MilterServerFactory(milter)
        factory.noisy = False
        self._listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port = self._listening.getHost().port
        return self.spec

    @property
    def spec(self):
        return f"inet:{self.port}@[127.0.0.1]"

    def stop(self):
        return defer.maybeDeferred(self._listening.stopListening)

    def names(self):
        """The names of the events seen, in order."""
        return [event.name for event in self.events]
