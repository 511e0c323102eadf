"""The milter side of the protocol, facing the MTA: IMilter, a Twisted protocol and its factory."""

from collections import deque

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from . import sockets, stages
from .macros import STAGES as MACRO_STAGES, Macros
from .protocol import constants as c
from .protocol import messages, negotiation
from .protocol.constants import DEFAULT_MAX_PACKET_SIZE
from .protocol.errors import NegotiationError, ProtocolError
from .protocol.framing import FrameDecoder, encode_frame
from .twisted_internals import lose_connection


class IMilter(Interface):
    """One milter conversation with an MTA: one provider per MTA connection.

    Each event method gets the decoded command and the connection's Macros
    and returns a reply message (messages.CONTINUE, messages.REJECT,
    messages.ReplyCode(...), ...) or a Deferred that fires with one. The
    server sends exactly one final reply per command that needs one, and none
    for commands whose reply was negotiated away. While a Deferred is pending,
    later commands wait; an exception or a failed Deferred is logged and
    answered with the factory's error_reply.
    """

    def negotiate(offer):
        """The MTA's offer arrived (a messages.Negotiate).

        Return (or fire a Deferred with) a messages.Negotiate holding the
        actions, protocol flags and macro symbol lists the milter wants. The
        server trims it to the offer with negotiation.answer and sends that;
        NR_* flags the MTA did not offer are faked: the server sends CONTINUE
        for those commands itself.
        """

    def connect(command, macros):
        """The SMTP client connected (messages.Connect); return a final reply."""

    def helo(command, macros):
        """HELO/EHLO (messages.Helo), possibly repeated; return a final reply."""

    def mail(command, macros):
        """MAIL FROM (messages.Mail) opens a message; return a final reply."""

    def rcpt(command, macros):
        """RCPT TO (messages.Rcpt); return a final reply for this recipient."""

    def data(command, macros):
        """DATA (messages.DATA); return a final reply."""

    def header(command, macros):
        """One header (messages.Header); return a final reply."""

    def end_of_headers(command, macros):
        """The headers are complete (messages.END_OF_HEADERS); return a final reply."""

    def body(command, macros):
        """A body chunk (messages.Body); return a final reply (SKIP if negotiated)."""

    def end_of_message(command, macros):
        """The message is complete (messages.EndOfMessage, always without data).

        Return (or fire a Deferred with) a final reply, or a list of zero or
        more modifications (AddHeader, InsertHeader, ChangeHeader,
        AddRecipient, AddRecipientPar, DeleteRecipient, ChangeFrom,
        ReplaceBody, Quarantine, Progress) followed by exactly one final reply
        (Continue, Accept, Reject, Tempfail, Discard, ReplyCode, Shutdown).
        Modifications need their action flag negotiated.
        """

    def unknown(command, macros):
        """An SMTP command the MTA did not recognise (messages.Unknown); return a final reply."""

    def abort(macros):
        """The open message is abandoned; the connection stays.

        Called only while a message is open (between MAIL and the end of
        message), with the message's macros still present. Returns nothing;
        a Deferred is not waited for, only its failure is logged.
        """

    def close():
        """The MTA connection ended (QUIT, QUIT_NC or EOF); called exactly once.

        Returns nothing; a Deferred is not waited for, only its failure is logged.
        """


@implementer(IMilter)
class Milter:
    """An IMilter that continues at every step; subclasses override what they need.

    The class can be passed as the factory's milter_factory: it is called with
    the MilterServerProtocol, kept as self.server.
    """

    # What negotiate asks for: SMFIF_* actions, SMFIP_* protocol flags, and
    # macro symbol lists as {stage index: [names]} (see constants.MACRO_STAGE_COMMANDS).
    actions = 0
    protocol = 0
    macros = {}

    def __init__(self, server=None):
        self.server = server

    def negotiate(self, offer):
        return messages.Negotiate(offer.version, self.actions, self.protocol,
                                  dict(self.macros))

    def connect(self, command, macros):
        return messages.CONTINUE

    def helo(self, command, macros):
        return messages.CONTINUE

    def mail(self, command, macros):
        return messages.CONTINUE

    def rcpt(self, command, macros):
        return messages.CONTINUE

    def data(self, command, macros):
        return messages.CONTINUE

    def header(self, command, macros):
        return messages.CONTINUE

    def end_of_headers(self, command, macros):
        return messages.CONTINUE

    def body(self, command, macros):
        return messages.CONTINUE

    def end_of_message(self, command, macros):
        return messages.CONTINUE

    def unknown(self, command, macros):
        return messages.CONTINUE

    def abort(self, macros):
        pass

    def close(self):
        pass


# The stages during which a message is open (an ABORT or a new MAIL ends it).
MESSAGE_STAGES = frozenset({stages.MAIL, stages.RCPT, stages.DATA, *stages.MESSAGE})

# Event command -> (IMilter method, stage it moves to; None keeps the stage).
_EVENTS = {stage.code: (stage.name, None if stage is stages.UNKNOWN else stage)
           for stage in stages.EVENTS}
# A new C, H or M while a message is open implicitly aborts it, as libmilter
# does; C, H, M and R make the macros of the stages after them stale.
_RESTARTS = frozenset({c.CONNECT, c.HELO, c.MAIL})
_STALE_MACROS_FROM = {c.CONNECT: b"H", c.HELO: b"U", c.MAIL: b"R", c.RCPT: b"T"}
_KNOWN_MACRO_STAGES = frozenset(MACRO_STAGES)

# Modification reply code -> the action flag that allows it.
_ACTION_FLAGS = {
    c.ADD_HEADER: c.SMFIF_ADDHDRS,
    c.INSERT_HEADER: c.SMFIF_ADDHDRS,
    c.CHANGE_HEADER: c.SMFIF_CHGHDRS,
    c.ADD_RECIPIENT: c.SMFIF_ADDRCPT,
    c.ADD_RECIPIENT_PAR: c.SMFIF_ADDRCPT_PAR,
    c.DELETE_RECIPIENT: c.SMFIF_DELRCPT,
    c.CHANGE_FROM: c.SMFIF_CHGFROM,
    c.REPLACE_BODY: c.SMFIF_CHGBODY,
    c.QUARANTINE: c.SMFIF_QUARANTINE,
}

# How a command is answered after negotiation.
_ANSWER = "answer"  # the milter's final reply goes to the MTA
_SILENT = "silent"  # NR_* negotiated: the MTA reads no reply
_FAKED = "faked"  # the milter wanted NR_* but the MTA does not know it: CONTINUE for it

_PROGRESS_PACKET = messages.PROGRESS.encode()
_CONTINUE = messages.CONTINUE
_CONTINUE_PACKET = _CONTINUE.encode()
# Event commands whose CONTINUE needs no more than writing it, when answered.
_PLAIN_EVENTS = frozenset(_EVENTS) - {c.END_OF_MESSAGE}
_MODES = {}


def _modes(protocol, faked):
    """({command: how it is answered}, the commands whose CONTINUE is written as it is).

    Worked out once per negotiated (protocol, faked) and shared by connections.
    """
    key = (protocol, faked)
    modes = _MODES.get(key)
    if modes is None:
        answer = {code: _SILENT if protocol & flag else _FAKED if faked & flag else _ANSWER
                  for code, flag in c.NO_REPLY_FLAG.items()}
        modes = _MODES[key] = (answer, frozenset(
            code for code in _PLAIN_EVENTS if answer.get(code, _ANSWER) is not _SILENT))
    return modes


def _command_name(code):
    event = _EVENTS.get(code)
    return event[0] if event else repr(code)


class MilterServerProtocol(Protocol):
    """Speak the milter protocol to one MTA connection on behalf of an IMilter.

    Commands are handled strictly in order. While the milter has not
    answered one (its Deferred is pending) the following commands wait in a
    queue; otherwise each is handled as soon as it is decoded, without any
    Deferred.

    The factory's negotiation_timeout and idle_timeout close a connection
    whose MTA never negotiates or goes quiet, so that such connections (a
    slowloris, a forgotten peer) cannot pile up. Both share one DelayedCall
    per connection, which rechecks when it fires instead of being reset for
    every command.
    """

    log = Logger()

    def __init__(self):
        self.milter = None
        self.macros = Macros()
        self.stage = stages.NEGOTIATE
        self.offer = None  # the MTA's Negotiate
        self.options = None  # negotiation.Options as sent to the MTA
        self.faked_no_reply = 0  # NR_* flags answered with CONTINUE on the milter's behalf
        self._reply_modes = {}
        self._continued = frozenset()  # commands whose CONTINUE goes out as it is: see _answer
        self._decoder = None
        self._queue = deque()
        self._waiting = None  # the milter's pending Deferred
        self._waiting_code = None  # the command it answers
        self._handling = False
        self._milter_closed = False
        self._write = None  # writes a packet: see sockets.writer
        self._timer = None  # the negotiation deadline, then the idle check
        self._idle_timeout = None  # seconds, once negotiated with idle_timeout on
        self._seconds = None  # the clock's seconds() while idleness is watched
        self._active_at = 0.0  # when a command last arrived or the milter last answered

    # ------------------------------------------------------------ Twisted

    def connectionMade(self):
        sockets.tcp_socket(self.transport)
        self._write = sockets.writer(self.transport)
        self._decoder = FrameDecoder(self.factory.max_packet_size)
        try:
            self.milter = self.factory.milter_factory(self)
        except Exception:
            self.log.failure("[server][error] cannot create the milter")
            self._milter_closed = True
            self.stage = stages.CLOSED
            self.transport.loseConnection()
            return
        seconds = self.factory.negotiation_timeout
        if seconds:
            self._timer = self.factory.clock.callLater(seconds, self._not_negotiated, seconds)

    def dataReceived(self, data):
        if self.stage is stages.CLOSED:
            return
        try:
            frames = self._decoder.feed_packets(data)
        except ProtocolError as error:
            self._protocol_error(error)
            return
        # Only complete commands count: a trickle of bytes must not keep a
        # connection. One clock read per call, whatever the number of frames.
        if frames and self._seconds is not None:
            self._active_at = self._seconds()
        queue = self._queue
        self._handling = True
        try:
            for code, payload, packet in frames:
                if self.stage is stages.CLOSED:
                    return
                try:
                    message = messages.decode_command(code, payload, packet)
                except ProtocolError as error:
                    self._protocol_error(error)
                    return
                if self._waiting is None and not queue:
                    self._handle(message)
                else:
                    queue.append(message)
        finally:
            self._handling = False

    def connectionLost(self, reason=None):
        self._finish()
        # A milter usually keeps its protocol (the manager's session does): dropping our
        # end of that cycle lets both go when the last reference does, not in a
        # garbage collection later, which would also have to walk everything they hold.
        self.milter = None

    # ------------------------------------------------------------ public

    def progress(self):
        """Tell the MTA the milter is still at work on the end of message.

        Sends SMFIR_PROGRESS and returns True only while an end of message
        waits for its final reply (Sendmail accepts it nowhere else);
        otherwise does nothing and returns False.
        """
        if self.stage is not stages.END_OF_MESSAGE:
            return False
        self._write(_PROGRESS_PACKET)
        return True

    @property
    def waiting(self):
        """Whether the MTA waits for the milter's answer to a command now."""
        return self._waiting is not None and self.stage is not stages.CLOSED

    def answer_now(self, reply):
        """Answer the command the milter is still working on with reply, at once.

        The milter's own answer is not waited for: its Deferred is cancelled,
        so that the work behind it stops, and what it fires with is dropped
        as after close (the stage reads CLOSED meanwhile: no check for this
        on the way of every answer). Should it still be pending after
        cancel() it is paused for good. Commands that queued behind it are
        handled next. Returns False when nothing was waiting.
        """
        waiting = self._waiting
        if not self.waiting:
            return False
        stage, self.stage = self.stage, stages.CLOSED
        try:
            waiting.cancel()
        finally:
            self.stage = stage
        if self._waiting is waiting:
            waiting.pause()
        self._waiting = None
        if self._seconds is not None:
            self._active_at = self._seconds()
        self._answer(self._waiting_code, reply)
        self._resume()
        return True

    # ------------------------------------------------------------ commands

    def _handle(self, message):
        try:
            self._handlers[message.code](self, message)
        except ProtocolError as error:
            self._protocol_error(error)

    def _negotiate(self, offer):
        if self.stage is not stages.NEGOTIATE:
            raise ProtocolError(f"option negotiation again at stage {self.stage.name}")
        # The MTA has done its part: the milter's own time to answer (the
        # manager asks its children meanwhile) is not held against it.
        self._watch_idleness()
        self.offer = offer
        try:
            result = self.milter.negotiate(offer)
        except Exception:
            self.log.failure("[server][negotiate][error] the milter failed to negotiate")
            self._abandon()
            return
        if isinstance(result, Deferred):
            self._wait(result, c.NEGOTIATE)
        else:
            self._answer(c.NEGOTIATE, result)

    def _event(self, command):
        code = command.code
        if self.stage is stages.NEGOTIATE:
            raise ProtocolError(f"{_command_name(code)} before option negotiation")
        name, stage = _EVENTS[code]
        stale = _STALE_MACROS_FROM.get(code)
        if stale is not None:
            if code in _RESTARTS and self.stage in MESSAGE_STAGES:
                self.log.debug("[server][abort] {command} ends the open message",
                               command=name)
                self._abort_message()
            self.macros.clear_from(stale)
        if stage is not None:
            self.stage = stage
        try:
            if code == c.END_OF_MESSAGE and command.chunk:
                result = self._last_chunk_then_end(command.chunk)
            else:
                result = getattr(self.milter, name)(command, self.macros)
        except Exception:
            self.log.failure("[server][{command}][error] the milter failed", command=name)
            result = self.factory.error_reply
        if isinstance(result, Deferred):
            self._wait(result, code)
        else:
            self._answer(code, result)

    def _last_chunk_then_end(self, chunk):
        """Handle an end of message with data as libmilter does: a body chunk first."""
        milter, macros = self.milter, self.macros

        def body_answered(reply):
            if reply is None or (isinstance(reply, messages.Message)
                                 and reply.code in (c.CONTINUE, c.SKIP)):
                return milter.end_of_message(messages.END_OF_MESSAGE, macros)
            return reply  # the body's verdict ends the message

        return maybeDeferred(milter.body, messages.Body(chunk), macros).addCallback(
            body_answered)

    def _macro(self, macro):
        if macro.stage in _KNOWN_MACRO_STAGES:
            self.macros.set_message(macro)
        else:
            self.log.debug("[server][macro] macros for unknown stage {stage!r} ignored",
                           stage=macro.stage)

    def _abort(self, abort):
        if self.stage in MESSAGE_STAGES:
            self._abort_message()
        self.macros.clear_from(c.MAIL)

    def _quit(self, quit):
        self._finish()
        lose_connection(self.transport)

    def _quit_new_connection(self, quit):
        if self.stage is stages.NEGOTIATE:
            raise ProtocolError("quit (new connection follows) before option negotiation")
        self._close_milter(self.stage in MESSAGE_STAGES)
        self.macros.clear()
        self.stage = stages.CONNECT
        try:
            self.milter = self.factory.milter_factory(self)
        except Exception:
            self.log.failure("[server][error] cannot create the milter")
            self._abandon()
            return
        self._milter_closed = False

    _handlers = {
        c.NEGOTIATE: _negotiate,
        c.MACRO: _macro,
        c.ABORT: _abort,
        c.QUIT: _quit,
        c.QUIT_NEW_CONNECTION: _quit_new_connection,
        **dict.fromkeys(_EVENTS, _event),
    }

    # ------------------------------------------------------------ answers

    def _wait(self, deferred, code):
        self._waiting = deferred
        self._waiting_code = code
        deferred.addCallbacks(self._answered_later, self._failed_later,
                              callbackArgs=(code,), errbackArgs=(code,))

    def _answered_later(self, result, code):
        self._waiting = None
        if self.stage is stages.CLOSED:
            return
        if self._seconds is not None:
            self._active_at = self._seconds()  # idleness counts from the answer
        try:
            self._answer(code, result)
            self._resume()
        except Exception:
            # Not an errback of its own: one callback fewer to run for every command.
            self._bug(Failure())

    def _failed_later(self, failure, code):
        try:
            self._milter_failed(failure, code)
        except Exception:
            self._bug(Failure())

    def _milter_failed(self, failure, code):
        self._waiting = None
        if self.stage is stages.CLOSED:
            if not failure.check(CancelledError):
                self.log.failure("[server][{command}][error] the milter failed after close",
                                 failure, command=_command_name(code))
            return
        if self._seconds is not None:
            self._active_at = self._seconds()
        if code == c.NEGOTIATE:
            self.log.failure("[server][negotiate][error] the milter failed to negotiate",
                             failure)
            self._abandon()
            return
        self.log.failure("[server][{command}][error] the milter failed", failure,
                         command=_command_name(code))
        self._answer(code, self.factory.error_reply)
        self._resume()

    def _bug(self, failure):
        self.log.failure("[server][error] internal error", failure)
        self._abandon()

    def _resume(self):
        """Handle queued commands until one waits again; a no-op inside a handler."""
        if self._handling:
            return  # the answer came synchronously: the caller's loop goes on
        queue = self._queue
        self._handling = True
        try:
            while queue and self._waiting is None and self.stage is not stages.CLOSED:
                self._handle(queue.popleft())
        finally:
            self._handling = False

    def _answer(self, code, result):
        """Send what the milter answered to command code, as the protocol allows."""
        if result is _CONTINUE and code in self._continued:
            self._write(_CONTINUE_PACKET)  # the hot path: nothing to check
            return
        mode = self._reply_modes.get(code, _ANSWER)
        if mode is _SILENT:
            if result is not None and result != messages.CONTINUE:
                self.log.debug(
                    "[server][{command}] reply {reply!r} dropped: no reply was negotiated",
                    command=_command_name(code), reply=result)
            return
        if code == c.END_OF_MESSAGE:
            self.stage = stages.HELO  # the message ends with this reply
        elif code == c.NEGOTIATE:
            self._finish_negotiation(result)
            return
        # The hot path: one final reply.
        if isinstance(result, messages.Message) and result.final:
            if result.code == c.SKIP and not self._may_skip(code):
                result = messages.CONTINUE
            try:
                packet = result.encode()
            except ValueError as error:
                packet = self._unencodable(code, result, error).encode()
            self._write(packet)
            return
        if not isinstance(result, (list, tuple)):
            result = (result,)
        packets = self._packets(code, result, mode)
        if len(packets) == 1:
            self._write(packets[0])
        elif code == c.END_OF_MESSAGE and self.factory.packet_buffer_size:
            self._write_buffered(packets, self.factory.packet_buffer_size)
        else:
            self._write(b"".join(packets))

    def _write_buffered(self, packets, limit):
        """Write packets in writes of limit bytes or more (the last one may be less).

        A replaced body of many megabytes then goes out as it is joined,
        never as one more copy of the whole.
        """
        buffered, size = [], 0
        for packet in packets:
            buffered.append(packet)
            size += len(packet)
            if size >= limit:
                self._write(b"".join(buffered))
                buffered, size = [], 0
        if buffered:
            self._write(b"".join(buffered))

    def _may_skip(self, code):
        return code == c.BODY and self.options.protocol & c.SMFIP_SKIP

    def _packets(self, code, replies, mode):
        """Encode a list of replies: modifications as allowed, then one final reply."""
        command = _command_name(code)
        at_end = code == c.END_OF_MESSAGE
        packets = []
        final = None
        for reply in replies:
            if reply is None:
                continue
            if final is not None:
                self.log.error(
                    "[server][{command}][error] reply {reply!r} after the final "
                    "{final!r} dropped", command=command, reply=reply, final=final)
                continue
            if not isinstance(reply, messages.Message):
                self.log.error("[server][{command}][error] {reply!r} is not a milter reply",
                               command=command, reply=reply)
                continue
            if reply.final:
                if reply.code == c.SKIP and not self._may_skip(code):
                    reply = messages.CONTINUE
                try:
                    packets.append(reply.encode())
                except ValueError as error:
                    reply = self._unencodable(code, reply, error)
                    packets.append(reply.encode())
                final = reply
                continue
            flag = _ACTION_FLAGS.get(reply.code)
            if flag is None and reply.code != c.PROGRESS:
                self.log.error("[server][{command}][error] {reply!r} is not a milter reply",
                               command=command, reply=reply)
            elif not at_end:
                self.log.error(
                    "[server][{command}][error] {reply!r} dropped: only allowed at "
                    "end of message", command=command, reply=reply)
            elif flag is not None and not self.options.actions & flag:
                self.log.error(
                    "[server][{command}][error] {reply!r} dropped: its action flag "
                    "0x{flag:x} was not negotiated", command=command, reply=reply, flag=flag)
            elif reply.code == c.REPLACE_BODY and len(reply.chunk) > c.MAX_CHUNK_SIZE:
                chunk = reply.chunk
                for start in range(0, len(chunk), c.MAX_CHUNK_SIZE):
                    packets.append(encode_frame(
                        c.REPLACE_BODY, chunk[start:start + c.MAX_CHUNK_SIZE]))
            else:
                try:
                    packets.append(reply.encode())
                except ValueError as error:
                    self.log.error("[server][{command}][error] {reply!r} dropped: {error}",
                                   command=command, reply=reply, error=error)
        if final is None:
            if mode is _FAKED:
                final = messages.CONTINUE
            else:
                final = self.factory.error_reply
                self.log.error("[server][{command}][error] no final reply from the milter; "
                               "answering {final!r}", command=command, final=final)
            packets.append(final.encode())
        return packets

    def _unencodable(self, code, reply, error):
        """The reply to send instead of a final reply that cannot be encoded."""
        fallback = self.factory.error_reply
        self.log.error("[server][{command}][error] {reply!r} cannot be sent ({error}); "
                       "answering {fallback!r}", command=_command_name(code), reply=reply,
                       error=error, fallback=fallback)
        return fallback

    def _finish_negotiation(self, wanted):
        if not isinstance(wanted, messages.Negotiate):
            self.log.error("[server][negotiate][error] the milter answered {wanted!r}, "
                           "not a Negotiate", wanted=wanted)
            self._abandon()
            return
        try:
            reply, faked = negotiation.answer(
                self.offer, wanted.actions, wanted.protocol, wanted.macros)
        except NegotiationError as error:
            self.log.error("[server][negotiate][error] {error}", error=error)
            self._abandon()
            return
        self.options = negotiation.Options(
            reply.version, reply.actions, reply.protocol, reply.macros)
        self.faked_no_reply = faked
        self._reply_modes, self._continued = _modes(reply.protocol, faked)
        self.stage = stages.CONNECT
        self._write(reply.encode())

    # ------------------------------------------------------------ timeouts

    def _not_negotiated(self, seconds):
        self._timer = None
        self.log.warn("[server][timeout][negotiate] the MTA ({peer}) did not negotiate "
                      "within {seconds:g} s; closing the connection",
                      peer=self._peer(), seconds=seconds)
        self._abandon()

    def _watch_idleness(self):
        """Stop the negotiation deadline and start the idle check, if idle_timeout is on."""
        self._cancel_timer()
        seconds = self.factory.idle_timeout
        if not seconds:
            return
        clock = self.factory.clock
        self._idle_timeout = seconds
        self._seconds = clock.seconds
        self._active_at = clock.seconds()
        self._timer = clock.callLater(seconds, self._check_idleness)

    def _check_idleness(self):
        """Close the connection if it has really been idle; otherwise check again later.

        Commands do not touch the timer (it is the hot path): they only note
        when they arrived, and this works out how long is left.
        """
        self._timer = None
        seconds = self._idle_timeout
        clock = self.factory.clock
        if self._waiting is not None or self._queue:
            # The milter is still at work: idleness starts when it answers.
            self._timer = clock.callLater(seconds, self._check_idleness)
            return
        left = self._active_at + seconds - clock.seconds()
        if left > 0:
            self._timer = clock.callLater(left, self._check_idleness)
            return
        self.log.info("[server][timeout][idle] no command from the MTA ({peer}) for "
                      "{seconds:g} s; closing the connection",
                      peer=self._peer(), seconds=seconds)
        self._abandon()

    def _cancel_timer(self):
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _peer(self):
        """The MTA's address for a log line: HOST:PORT, or the kind of socket."""
        address = self.transport.getPeer()
        host, port = getattr(address, "host", None), getattr(address, "port", None)
        if host is None or port is None:
            return f"{type(address).__name__.removesuffix('Address')} socket"
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # ------------------------------------------------------------ endings

    def _abort_message(self):
        self.stage = stages.HELO
        self._call_quietly(self.milter.abort, "abort", self.macros)

    def _close_milter(self, in_message):
        """Abort the open message if any, then close the milter, once."""
        if self._milter_closed:
            return
        self._milter_closed = True
        if in_message:
            self._call_quietly(self.milter.abort, "abort", self.macros)
        self._call_quietly(self.milter.close, "close")

    def _call_quietly(self, method, name, *args):
        """Call a milter method whose result nobody waits for; log its failure."""
        try:
            result = method(*args)
        except Exception:
            self.log.failure("[server][{command}][error] the milter failed", command=name)
            return
        if isinstance(result, Deferred):
            result.addErrback(lambda failure: self.log.failure(
                "[server][{command}][error] the milter failed", failure, command=name))

    def _finish(self):
        """Stop for good: forget queued commands, cancel the pending answer, close."""
        self._cancel_timer()
        if self.stage is stages.CLOSED:
            return
        in_message = self.stage in MESSAGE_STAGES
        self.stage = stages.CLOSED
        self._queue.clear()
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.cancel()  # its errback sees CLOSED and stays quiet
        self._close_milter(in_message)

    def _abandon(self):
        self._finish()
        lose_connection(self.transport)

    def _protocol_error(self, error):
        self.log.error("[server][protocol][error] {error}; dropping the MTA connection",
                       error=error)
        self._abandon()


class MilterServerFactory(Factory):
    """Make a MilterServerProtocol per MTA connection, each with its own milter.

    milter_factory(protocol) returns the IMilter for that connection.
    error_reply answers a command the milter failed on.

    negotiation_timeout: seconds from connecting until the MTA's option
    negotiation has arrived. idle_timeout: seconds after negotiation that a
    connection may go without a complete command while the milter has
    nothing pending. A connection over either is closed. None or 0 turns
    each off (the default). Each is read when a connection reaches that
    point, so a subclass may compute them; the timers run on clock.
    packet_buffer_size: an end-of-message answer of several packets is
    written in writes of at least that many bytes; 0 writes it in one.
    """

    protocol = MilterServerProtocol
    error_reply = messages.TEMPFAIL
    negotiation_timeout = None
    idle_timeout = None
    packet_buffer_size = 0

    def __init__(self, milter_factory, max_packet_size=DEFAULT_MAX_PACKET_SIZE, clock=None):
        self.milter_factory = milter_factory
        self.max_packet_size = max_packet_size
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
