"""The MTA side of the milter protocol: one Twisted connection driving one child milter."""

from collections import deque
from dataclasses import dataclass, field

from twisted.internet import defer, error
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientFactory, Protocol
from zope.interface import implementer

from . import connection_spec, sockets
from .protocol import constants as c
from .protocol import negotiation
from .protocol.errors import ProtocolError
from .protocol.framing import FrameDecoder, encode_frame
from .protocol.messages import (
    QUIT, Continue, Negotiate, Progress, Quarantine, decode_reply,
)
from .twisted_internals import lose_connection

COMMAND_NAMES = {
    getattr(c, name): name
    for name in ("ABORT", "BODY", "CONNECT", "MACRO", "END_OF_MESSAGE", "HELO",
                 "QUIT_NEW_CONNECTION", "HEADER", "MAIL", "END_OF_HEADERS", "NEGOTIATE",
                 "QUIT", "RCPT", "DATA", "UNKNOWN")
}
# Before negotiation every command is sent and answered, as in the base protocol.
_UNNEGOTIATED = negotiation.Options(protocol=0)
_COMMAND_CODES = tuple(COMMAND_NAMES)
# The length and the code byte before a packet's data.
_HEADER_SIZE = 5


@dataclass
class Timeouts:
    """Seconds to wait on a child; upstream's defaults (its server's, less 3 s leeway)."""

    connection: float = 297.0
    writing: float = 7.0
    reading: float = 7.0
    end_of_message: float = 297.0


@dataclass(slots=True)
class Response:
    """A child's answer to one command.

    reply is the final reply; modifications are the non-final replies before
    it other than Progress (Quarantine included), in arrival order; progress
    counts the Progress packets.
    """

    reply: object
    modifications: list = field(default_factory=list)
    progress: int = 0


class MilterTimeoutError(defer.TimeoutError):
    """A child did not answer (reading, end-of-message) or read (writing) in time."""

    def __init__(self, kind, seconds, command):
        if kind == "writing":
            message = f"writing timeout ({seconds} s): the milter stopped reading"
            if command:
                message += f" while {command} was pending"
        else:
            message = f"{kind} timeout ({seconds} s) waiting for the reply to {command}"
        super().__init__(message)
        self.kind = kind
        self.seconds = seconds
        self.command = command


class MilterConnectionLost(error.ConnectionLost):
    """The connection to a child ended while a command waited for its reply or its turn."""

    def __init__(self, command, reason, sent=True):
        if sent:
            message = f"connection to the milter lost while waiting for the reply to {command}"
        else:
            message = f"connection to the milter lost before {command} was sent"
        if reason:
            message = f"{message}: {reason}"
        super().__init__(message)
        self.command = command
        self.sent = sent

    def __str__(self):
        return self.args[0]


class MilterConnectError(error.ConnectError):
    """Connecting to a child failed; the message names its connection spec.

    os_error: the errno when the system refused (ECONNREFUSED, ENOENT: nothing
    listens there, which starting the child may cure), else None.
    """

    def __init__(self, spec, reason, os_error=None):
        super().__init__(string=f"cannot connect to the milter at {spec}: {reason}")
        self.spec = spec
        self.reason = reason
        self.os_error = os_error

    def __str__(self):
        return self.args[0]


def _name(command):
    return COMMAND_NAMES.get(command.code, repr(command.code))


_STEPS = {}


def _steps(options):
    """(commands not sent, commands not answered) under options, as frozensets of codes."""
    key = (options.version, options.protocol)
    steps = _STEPS.get(key)
    if steps is None:
        steps = _STEPS[key] = (
            frozenset(code for code in _COMMAND_CODES if not options.sends(code)),
            frozenset(code for code in _COMMAND_CODES if not options.replies(code)))
    return steps


def _fired(d):
    """Fire d (or a new Deferred) with None: the command gets no reply."""
    if d is None:
        return defer.succeed(None)
    d.callback(None)
    return d


@implementer(IPushProducer)
class MilterClientProtocol(Protocol):
    """Send milter commands to a child one at a time; each reply fires a Deferred.

    The transport's push producer interface tells us when the child stops
    reading; that starts the writing timeout.
    """

    def __init__(self, clock, timeouts=None, max_packet_size=c.DEFAULT_MAX_PACKET_SIZE):
        self.clock = clock
        self.timeouts = timeouts or Timeouts()
        self.options = None  # see the property: sets _unsent and _unanswered
        self.negotiate_reply = None
        self._decoder = FrameDecoder(max_packet_size)
        # The command on the wire whose final reply we wait for, and its state.
        self._command = None
        self._deferred = None
        self._timer = None
        self._modifications = None
        self._progress = 0
        # A BODY longer than the child can read goes out in pieces of at most
        # _max_body bytes, the next one after each CONTINUE: what is left.
        # _max_body_packet is the same limit on a whole packet, for send().
        self._max_body = c.LIBMILTER_MAX_DATA_SIZE
        self._max_body_packet = self._max_body + _HEADER_SIZE
        self._body_rest = None
        # Commands sent while another waits: (command, macro, Deferred), in order.
        self._queue = deque()
        # One for the connection, not one per command: send() is on the path of each one.
        self._canceller = _Canceller(self)
        self._writing_timer = None
        self._lost = False
        self._close_waiters = None
        # Why the connection is unusable (a string), or None while it works.
        self._ended = "not connected yet"
        self._socket = None  # the TCP socket, for quick ACKs
        self._send = None  # writes a packet: see sockets.writer

    @property
    def options(self):
        """The negotiation.Options the child accepted; None before negotiation."""
        return self._options

    @options.setter
    def options(self, options):
        # Which commands are not sent and which get no reply, worked out once
        # here rather than asked of the Options for every command.
        self._options = options
        self._unsent, self._unanswered = _steps(options or _UNNEGOTIATED)

    # ------------------------------------------------------------ Protocol

    def connectionMade(self):
        self._ended = None
        transport = self.transport
        tcp = sockets.tcp_socket(transport)
        if sockets.TCP_QUICKACK is not None:
            self._socket = tcp
        self._send = sockets.writer(transport)
        transport.registerProducer(self, True)
        if self.factory is not None:
            self.factory.connected(self)

    def dataReceived(self, data):
        if self._ended is not None:
            return  # closed or aborted: what the child still says is moot
        try:
            for code, payload in self._decoder.feed(data):
                self._received(decode_reply(code, payload))
                if self._ended is not None:
                    return
        except ProtocolError as problem:
            self._abort(problem)
            return
        if self._command is not None and self._command.code == c.END_OF_MESSAGE:
            self._quick_ack()

    def connectionLost(self, reason=None):
        self.connected = False
        self._lost = True
        # Its Deferreds may outlive the connection (on Twisted 22.4 inlineCallbacks keeps
        # the last one it waited on in a reference cycle): they must not keep it alive.
        self._canceller.connection = None
        self._cancel_writing_timer()
        if self._ended is None:
            self._ended = reason.getErrorMessage() if reason is not None else "closed"
        self._fail_all(None)
        waiters, self._close_waiters = self._close_waiters, None
        for d in waiters or ():
            d.callback(None)

    # ------------------------------------------------------------ API

    def negotiate(self, offer=None):
        """Send an option negotiation; fire with the negotiation.Options the child accepted."""
        return self.send(offer or negotiation.offer())

    def send(self, command, macro=None):
        """Send a command; fire with its Response, or None if the child gets or answers none.

        macro, a Macro for the command's stage, goes out just before it in
        the same write; it is sent even when the child negotiated the
        command away, as MTAs do, since libmilter looks macros up later.
        None comes at once for commands that are never answered (Macro,
        Abort, Quit, QuitNewConnection), for those the child negotiated no
        reply to, and for those it negotiated away (nothing but the macro
        is written then). Commands go out in order; while one waits for its
        reply the others queue.

        A BODY chunk longer than the child negotiated to read goes out as
        several BODY packets, the next after each CONTINUE; the Deferred
        fires with the first other reply, or the last piece's (all pieces
        at once, and None, if the child negotiated no reply to BODY).

        Cancelling the Deferred of a queued command takes it out of the
        queue; cancelling the one on the wire closes the connection, since
        whether the child acted on it is unknown, and its reply would
        otherwise answer nothing.
        """
        if self._ended is not None:
            return defer.fail(MilterConnectionLost(_name(command), self._ended, sent=False))
        if self._command is not None or self._queue:
            d = defer.Deferred(self._canceller)
            self._queue.append((command, macro, d))
            return d
        return self._write(command, macro, None)

    def close(self):
        """Send Quit and close; commands still waiting fail with MilterConnectionLost."""
        if self._ended is None:
            self._ended = "closed by us"
            self._quit()

    def _quit(self):
        self._send(QUIT.encode())
        lose_connection(self.transport)

    def when_closed(self):
        """Return a Deferred that fires with None once the connection is gone."""
        if self._lost:
            return defer.succeed(None)
        if self._close_waiters is None:
            self._close_waiters = []
        d = defer.Deferred()
        self._close_waiters.append(d)
        return d

    # ------------------------------------------------------------ IPushProducer

    def pauseProducing(self):
        # Also after close(): a child that stops reading must not keep the
        # half-closed connection (and its buffer) forever.
        if self._writing_timer is None and not self._lost:
            self._writing_timer = self.clock.callLater(
                self.timeouts.writing, self._writing_timed_out)

    def resumeProducing(self):
        self._cancel_writing_timer()

    def stopProducing(self):
        self._cancel_writing_timer()

    # ------------------------------------------------------------ internals

    def _write(self, command, macro, d):
        code = command.code
        if code in self._unsent:
            if macro is not None:
                self._send(macro.encode())
            return _fired(d)
        # Work on the packet: callers may pass anything with code and encode()
        # (milter-test-server sends packets encoded once). Body.code is c.BODY
        # itself, and identity is the cheapest test on this path.
        packet = command.encode()
        if code is c.BODY and len(packet) > self._max_body_packet:
            if code in self._unanswered:
                return self._write_pieces(packet, macro, d)
            # The first piece goes out now; _received sends the rest.
            end = _HEADER_SIZE + self._max_body
            self._body_rest = memoryview(packet)[end:]
            packet = encode_frame(c.BODY, packet[_HEADER_SIZE:end])
        if macro is None:
            self._send(packet)
        else:
            self._send(macro.encode() + packet)
        if code in self._unanswered:
            return _fired(d)
        if code == c.END_OF_MESSAGE:
            self._quick_ack()
            seconds = self.timeouts.end_of_message
        else:
            seconds = self.timeouts.reading
        if d is None:
            d = defer.Deferred(self._canceller)
        self._command = command
        self._deferred = d
        self._modifications = None
        self._progress = 0
        # One reading timer per connection, pushed back for each command rather than made
        # anew: a reset to a later time is two assignments, a callLater an object and a heap push.
        timer = self._timer
        if timer is None:
            self._timer = self.clock.callLater(seconds, self._reading_timed_out)
        else:
            timer.reset(seconds)
        return d

    def _write_pieces(self, packet, macro, d):
        """Write a BODY the child does not answer in pieces it can read, all at once."""
        size = self._max_body
        chunk = memoryview(packet)[_HEADER_SIZE:]
        packets = [encode_frame(c.BODY, chunk[start:start + size])
                   for start in range(0, len(chunk), size)]
        if macro is not None:
            packets.insert(0, macro.encode())
        self._send(b"".join(packets))
        return _fired(d)

    def _write_next_piece(self):
        """The child took a piece of a long BODY: write the next one."""
        rest = self._body_rest
        size = self._max_body
        self._body_rest = rest[size:] if len(rest) > size else None
        self._send(encode_frame(c.BODY, rest[:size]))
        self._timer.reset(self.timeouts.reading)

    def _quick_ack(self):
        """ACK the child's next packets at once: see sockets.quick_ack."""
        if self._socket is not None and not sockets.quick_ack(self._socket):
            self._socket = None

    def _timeout_for(self, code):
        if code == c.END_OF_MESSAGE:
            return self.timeouts.end_of_message
        return self.timeouts.reading

    def _received(self, reply):
        command = self._command
        if command is None:
            raise ProtocolError(f"unexpected reply {reply!r}: no command is waiting for one")
        if command.code == c.NEGOTIATE:
            if type(reply) is not Negotiate:
                raise ProtocolError(f"{reply!r} in reply to NEGOTIATE")
            self.options = negotiation.accept(command, reply)
            self.negotiate_reply = reply
            self._max_body = self.options.max_data_size
            self._max_body_packet = self._max_body + _HEADER_SIZE
            self._finish(self.options)
        elif reply.final:
            if self._body_rest is not None:
                if type(reply) is Continue:
                    self._write_next_piece()
                    return
                self._body_rest = None  # the child wants no more of this body
            modifications = self._modifications
            self._finish(Response(reply, [] if modifications is None else modifications,
                                  self._progress))
        elif type(reply) is Progress:
            # libmilter sends progress only at end of message and Sendmail
            # takes it nowhere else; elsewhere it would hold off the reading
            # timeout for ever while nothing reaches the MTA.
            if command.code != c.END_OF_MESSAGE:
                raise ProtocolError(
                    f"{reply!r} in reply to {_name(command)}: "
                    "progress is allowed only at END_OF_MESSAGE")
            self._progress += 1
            self._timer.reset(self.timeouts.end_of_message)
        elif type(reply) is Negotiate:
            raise ProtocolError(f"negotiate reply to {_name(command)}")
        elif command.code == c.END_OF_MESSAGE or type(reply) is Quarantine:
            # Postfix takes a quarantine after any event; edits only at end of message.
            if self._modifications is None:
                self._modifications = [reply]
            else:
                self._modifications.append(reply)
        else:
            raise ProtocolError(
                f"{reply!r} in reply to {_name(command)}: "
                "modifications are allowed only at END_OF_MESSAGE")

    def _finish(self, result):
        d = self._deferred
        # The reading timer stays armed: the next command pushes it back, and if it
        # fires first it finds nothing waiting (_reading_timed_out).
        self._command = self._deferred = self._modifications = None
        # The caller's callback may send more: send() queues it behind the
        # commands already queued because the queue is not empty yet.
        d.callback(result)
        queue = self._queue
        while queue and self._command is None and self._ended is None:
            command, macro, d = queue.popleft()
            self._write(command, macro, d)

    def _fail_all(self, problem):
        """Fail the waiting command with problem (None: connection lost), then every queued one."""
        self._stop_reading_timer()
        d = self._deferred
        if d is not None:
            command = self._command
            self._command = self._deferred = self._modifications = None
            self._body_rest = None
            d.errback(problem or MilterConnectionLost(_name(command), self._ended))
        queue = self._queue
        while queue:
            command, _, d = queue.popleft()
            d.errback(MilterConnectionLost(_name(command), self._ended, sent=False))

    def _cancelled(self, d):
        """The caller gave up on d: see send()."""
        if d is not self._deferred:
            queue = self._queue
            for index, (_, _, queued) in enumerate(queue):
                if queued is d:
                    del queue[index]
                    break
            return  # Deferred.cancel fires d with CancelledError
        command = self._command
        self._stop_reading_timer()
        self._command = self._deferred = self._modifications = None
        self._body_rest = None
        if self._ended is not None:
            return  # closing already
        self._ended = f"closed by us: the wait for the reply to {_name(command)} was cancelled"
        d.errback(defer.CancelledError())
        self._fail_all(None)
        self._quit()

    def _abort(self, problem):
        """Give up on this connection: fail everything with problem and drop it."""
        if self._ended is None:
            self._ended = str(problem)
        self._cancel_writing_timer()
        self._fail_all(problem)
        self.transport.abortConnection()

    def _reading_timed_out(self):
        self._timer = None
        if self._command is None:
            return  # it ran out while nothing was waiting: the connection is idle
        code = self._command.code
        kind = "end-of-message" if code == c.END_OF_MESSAGE else "reading"
        self._abort(MilterTimeoutError(kind, self._timeout_for(code), _name(self._command)))

    def _writing_timed_out(self):
        self._writing_timer = None
        command = self._command and _name(self._command)
        self._abort(MilterTimeoutError("writing", self.timeouts.writing, command))

    def _stop_reading_timer(self):
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _cancel_writing_timer(self):
        if self._writing_timer is not None:
            self._writing_timer.cancel()
            self._writing_timer = None


class _Canceller:
    """The canceller of a connection's command Deferreds, which lets go of it once it is lost.

    A bound method would keep the connection, its transport and Twisted's
    connector alive for as long as any of its Deferreds lives. After the
    connection is lost every Deferred it made has fired, and cancelling a
    fired Deferred calls no canceller.
    """

    __slots__ = ("connection",)

    def __init__(self, connection):
        self.connection = connection

    def __call__(self, d):
        if self.connection is not None:
            self.connection._cancelled(d)


class _ClientFactory(ClientFactory):
    """Builds a connection's MilterClientProtocol; deferred fires with it once connected.

    The reactor dials it directly (ConnectionSpec.connect), without an
    endpoint's wrappers. For specs only an endpoint dials, connect() sets
    deferred to None: the endpoint fires its own.
    """

    noisy = False  # one connection per child per MTA session: no "Starting factory" lines

    def __init__(self, clock, timeouts, spec):
        self.clock = clock
        self.timeouts = timeouts
        self.spec = spec
        self.connector = None
        self.deferred = defer.Deferred(self._cancel)

    def buildProtocol(self, addr):
        protocol = MilterClientProtocol(self.clock, self.timeouts)
        protocol.factory = self
        return protocol

    def connected(self, protocol):
        """protocol's connectionMade: the connection is ready for commands."""
        d, self.deferred = self.deferred, None
        if d is not None:
            d.callback(protocol)

    def clientConnectionFailed(self, connector, reason):
        self.connector = None
        d, self.deferred = self.deferred, None
        if d is not None:
            d.errback(MilterConnectError(self.spec, reason.getErrorMessage(),
                                         getattr(reason.value, "osError", None)))

    def clientConnectionLost(self, connector, reason):
        # The connector points at its transport and at this factory, and both
        # point back; nothing uses them from here on: unlinked, all go by
        # reference counting instead of in a garbage collection.
        connector.transport = self.connector = None

    def _cancel(self, d):
        self.deferred = None
        try:
            self.connector.stopConnecting()  # its clientConnectionFailed finds no Deferred
        except error.NotConnectingError:
            pass
        d.errback(defer.CancelledError(f"connecting to the milter at {self.spec} was cancelled"))


def connect(reactor, spec, timeouts=None, clock=None):
    """Connect to the milter at spec; fire with a connected, not yet negotiated MilterClientProtocol.

    A bad spec or a failed connection fires MilterConnectError naming the
    spec. Cancelling the Deferred fires CancelledError: giving up is not the
    child's fault.
    """
    timeouts = timeouts or Timeouts()
    try:
        parsed = connection_spec.parse(spec)
    except ValueError as problem:
        return defer.fail(MilterConnectError(spec, problem))
    factory = _ClientFactory(clock or reactor, timeouts, spec)
    factory.connector = parsed.connect(reactor, factory, timeouts.connection)
    if factory.connector is not None:
        return factory.deferred
    factory.deferred = None  # an endpoint dials it and fires its own

    def failed(failure):
        # Twisted's endpoints report a cancelled attempt as ConnectingCancelledError.
        if failure.check(defer.CancelledError, error.ConnectingCancelledError):
            raise defer.CancelledError(f"connecting to the milter at {spec} was cancelled")
        raise MilterConnectError(spec, failure.getErrorMessage(),
                                 getattr(failure.value, "osError", None))

    d = parsed.client_endpoint(reactor, timeouts.connection).connect(factory)
    return d.addErrback(failed)
