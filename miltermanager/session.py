"""The manager's side of one MTA connection: children in parallel, then in a chain.

Envelope commands (connect, helo, mail, rcpt, data, unknown) go to every
child that still takes part, at once; the MTA gets the merged verdict when
all have answered. The message (headers, body, end of message) goes live to
the first child only; at end of message each later child is replayed the
message as the children before it left it. The MTA then gets one merged set
of modifications and the final verdict.
"""

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .body import BodyBuffer
from .children import Child
from .headers import HeaderList
from .merge import Status, merge_negotiation, reply_for, status_of
from .protocol import constants as c
from .protocol import messages
from .protocol.messages import Negotiate
from .server import IMilter, MilterServerFactory

# How a child's verdict at an envelope stage changes what it takes part in.
_CONNECTION, _MAIL, _RCPT, _DATA, _UNKNOWN = "connection", "mail", "rcpt", "data", "unknown"
_FINAL = (Status.TEMPORARY_FAILURE, Status.REJECT, Status.DISCARD)


def _reply_code(response, status):
    """The child's own reply (a code text, a shutdown) if it says what status says."""
    reply = response.reply
    if reply.code in (c.REPLY_CODE, c.SHUTDOWN) and status >= Status.TEMPORARY_FAILURE:
        return reply
    return None


class _Message:
    """What the manager keeps of the message in progress."""

    def __init__(self, chain, max_memory):
        self.chain = chain  # children taking part, in configuration order
        self.live = chain[0] if chain else None  # gets headers and body as they come
        self.headers = HeaderList()
        self.body = BodyBuffer(max_memory)
        self.replaced_body = None  # a BodyBuffer once a child replaced the body
        self.end_of_headers = False
        self.statuses = []  # verdicts of children done with the message
        self.change_from = None
        self.quarantine = None
        self.recipient_edits = []

    @property
    def current_body(self):
        return self.replaced_body if self.replaced_body is not None else self.body

    def close(self):
        self.body.close()
        if self.replaced_body is not None:
            self.replaced_body.close()


@implementer(IMilter)
class ManagerSession:
    """One MTA connection: negotiate with every child, fan out, chain, merge."""

    log = Logger()

    def __init__(self, server, configuration, reactor, clock=None):
        self.server = server
        manager = configuration.manager
        self.fallback_status = manager.fallback_status
        self.chunk_size = manager.chunk_size
        self.max_body_memory = manager.max_body_memory
        self.progress_interval = manager.progress_interval
        self.clock = clock or reactor
        self.children = [Child(milter, reactor, self.clock)
                         for milter in configuration.milters if milter.enabled]
        self.version = c.MAX_VERSION
        # Verdicts of children that failed between commands, for the next reply.
        self._pending = Status.NOT_CHANGE
        self._message = None
        self._data_sent = False
        self._progress = None

    # ------------------------------------------------------------ negotiation

    def negotiate(self, offer):
        self.version = min(c.MAX_VERSION, offer.version)
        if not self.children:
            return merge_negotiation(offer, [])
        child_offer = Negotiate(self.version, offer.actions, offer.protocol, {})
        d = defer.gatherResults([child.start(child_offer) for child in self.children])
        return d.addCallback(self._negotiated, offer)

    def _negotiated(self, replies, offer):
        for child, reply in zip(self.children, replies):
            if reply is None:
                self._pending = max(self._pending, child.fallback_status)
        self.children = [child for child in self.children if child.alive]
        wanted = merge_negotiation(offer, [child.connection.negotiate_reply
                                           for child in self.children])
        if wanted.protocol & c.SMFIP_HDR_LEADSPC:
            for child in self.children:
                child.convert_leading_space = not child.options.protocol & c.SMFIP_HDR_LEADSPC
        return wanted

    # ------------------------------------------------------------ envelope

    def connect(self, command, macros):
        return self._envelope(command, macros.stage(c.CONNECT), self._alive(), _CONNECTION)

    def helo(self, command, macros):
        return self._envelope(command, macros.stage(c.HELO), self._alive(), _CONNECTION)

    def mail(self, command, macros):
        self._end_message()
        children = self._alive()
        for child in children:
            child.in_message = True
            child.recipients = 0
        return self._envelope(command, macros.stage(c.MAIL), children, _MAIL)

    def rcpt(self, command, macros):
        return self._envelope(command, macros.stage(c.RCPT), self._in_message(), _RCPT)

    def data(self, command, macros):
        self._data_sent = True
        return self._envelope(command, macros.stage(c.DATA), self._with_recipients(), _DATA)

    def unknown(self, command, macros):
        return self._envelope(command, macros.stage(c.UNKNOWN), self._alive(), _UNKNOWN)

    def _alive(self):
        return [child for child in self.children if child.alive]

    def _in_message(self):
        return [child for child in self.children if child.in_message]

    def _with_recipients(self):
        """Children in the message; those left without a recipient leave it now."""
        taking_part = []
        for child in self._in_message():
            if child.recipients:
                taking_part.append(child)
            else:
                child.abort()
        return taking_part

    def _envelope(self, command, stage_macros, targets, kind):
        """Send command to every target at once; reply with the merged verdict."""
        if not targets:
            return self._no_child_reply()
        if len(targets) == 1:
            child = targets[0]
            d = child.send(command, stage_macros)
            return d.addBoth(self._one_answered, child, kind)
        answers = [child.send(command, stage_macros).addBoth(self._answered, child, kind)
                   for child in targets]
        return defer.gatherResults(answers).addCallback(self._merged, kind)

    def _one_answered(self, result, child, kind):
        return self._merged([self._answered(result, child, kind)], kind)

    def _answered(self, result, child, kind):
        """A child's (status, reply code) for this stage; apply what it means for the child."""
        if isinstance(result, Failure):
            status = self._child_failed(child, result, kind)
            return status, None
        status = child.status_of(result)
        if kind is _RCPT:
            if status is Status.CONTINUE:
                child.recipients += 1
            elif status is Status.ACCEPT and status_of(result.reply) is Status.ACCEPT:
                # A real accept; an evaluation child's reject only loses it the recipient.
                child.in_message = False
        elif kind is _CONNECTION:
            if status is not Status.CONTINUE:
                child.quit()  # done with this SMTP connection, whatever it said
        elif kind is not _UNKNOWN and status is not Status.CONTINUE:
            child.in_message = False
        return status, result and _reply_code(result, status)

    def _merged(self, answers, kind):
        status = self._pending
        self._pending = Status.NOT_CHANGE
        reply = None
        for child_status, child_reply in answers:
            if child_status > status:
                status = child_status
            if child_reply is not None:
                reply = child_reply
        if status in _FINAL and (kind is _MAIL or kind is _DATA or status is Status.DISCARD):
            self._abort_message()
        return reply_for(status, reply)

    def _child_failed(self, child, failure, stage):
        """Log a child's failure; it contributes its fallback status and is dropped."""
        self.log.error("[children][error][{stage}][{fallback}] {name}: {error}",
                       stage=stage, fallback=child.fallback_status.label,
                       name=child.name, error=failure.getErrorMessage())
        child.expire()
        return child.fallback_status

    def _no_child_reply(self):
        """No child can answer: the manager's fallback, or worse if a failed child said so."""
        status = max(self._pending, self.fallback_status)
        self._pending = Status.NOT_CHANGE
        return reply_for(status)

    # ------------------------------------------------------------ message

    def header(self, command, macros):
        return self._message_command(command, macros, c.HEADER)

    def end_of_headers(self, command, macros):
        return self._message_command(command, macros, c.END_OF_HEADERS)

    def body(self, command, macros):
        return self._message_command(command, macros, c.BODY)

    def _message_command(self, command, macros, stage):
        if self._message is None:
            started = self._start_message(macros)
            if started is not None:
                return started.addCallback(self._after_emulated_data, command, macros, stage)
        return self._live(command, macros, stage)

    def _after_emulated_data(self, reply, command, macros, stage):
        if reply is not messages.CONTINUE:
            return reply  # the emulated DATA ended the message
        if stage == c.END_OF_MESSAGE:
            return self._end_of_message(macros)
        return self._live(command, macros, stage)

    def _start_message(self, macros):
        """Set up the message phase; None, or a Deferred if DATA must be emulated first.

        An MTA that speaks version 4 or later but sent no DATA (the manager
        asks for every event) still gets its children a DATA, as upstream does.
        """
        if not self._data_sent and self.version >= 4 and self._in_message():
            self._data_sent = True
            d = defer.maybeDeferred(self.data, messages.DATA, macros)
            return d.addCallback(self._emulated_data)
        self._message = _Message(self._with_recipients(), self.max_body_memory)
        return None

    def _emulated_data(self, reply):
        if reply is messages.CONTINUE:
            self._message = _Message(self._with_recipients(), self.max_body_memory)
        return reply

    def _live(self, command, macros, stage):
        """Keep a header or body chunk and send it to the child that gets the message live."""
        message = self._message
        if stage == c.HEADER:
            message.headers.append(command.name, command.value)
        elif stage == c.BODY:
            message.body.append(command.chunk)
        else:
            message.end_of_headers = True
        child = message.live
        if child is None:
            if not message.chain and not message.statuses:
                return self._no_child_reply()  # nobody takes part in this message
            return messages.CONTINUE
        if stage == c.BODY and child.skip_body:
            return messages.CONTINUE
        d = child.send(command, macros.stage(stage))
        return d.addBoth(self._live_answered, child, stage)

    def _live_answered(self, result, child, stage):
        message = self._message
        if message is None:
            return messages.CONTINUE  # the MTA aborted meanwhile
        if isinstance(result, Failure):
            message.statuses.append(self._child_failed(child, result, "message"))
            self._leave_message(child)
            return self._live_left(message)
        status = child.status_of(result)
        if status is Status.CONTINUE:
            return messages.CONTINUE
        if status is Status.SKIP:
            child.skip_body = True
            return messages.CONTINUE
        if status is Status.ACCEPT:
            message.statuses.append(status)
            self._leave_message(child)
            return self._live_left(message)
        reply = reply_for(status, _reply_code(result, status))
        self._abort_message()
        return reply

    def _live_left(self, message):
        """The live child left the message: with no child left in it, the MTA gets the verdict now.

        Otherwise the MTA would stream the rest of the message for nobody.
        """
        if message.chain:
            return messages.CONTINUE
        status = max(message.statuses)
        if status >= Status.TEMPORARY_FAILURE:
            self._abort_message()
        else:
            self._end_message()
        return reply_for(status)

    def _leave_message(self, child):
        """child is done with the message; the rest get it replayed at its end."""
        message = self._message
        message.chain.remove(child)
        child.in_message = False
        if message.live is child:
            message.live = None

    def end_of_message(self, command, macros):
        if self._message is None:
            started = self._start_message(macros)
            if started is not None:
                return started.addCallback(
                    self._after_emulated_data, command, macros, c.END_OF_MESSAGE)
        return self._end_of_message(macros)

    def _end_of_message(self, macros):
        message = self._message
        if not message.chain and not message.statuses:
            self._end_message()
            return self._no_child_reply()
        if self.progress_interval:
            self._progress = task.LoopingCall(self.server.progress)
            self._progress.clock = self.clock
            self._progress.start(self.progress_interval, now=False)
        d = self._run_chain(message, macros)
        d.addErrback(self._chain_failed)
        return d.addBoth(self._message_done)

    @defer.inlineCallbacks
    def _run_chain(self, message, macros):
        """Each child in turn gets the message as the ones before left it."""
        for child in list(message.chain):
            if message is not self._message:
                return messages.CONTINUE  # the MTA aborted meanwhile
            try:
                if child is message.live:
                    response = yield child.send(messages.END_OF_MESSAGE,
                                                macros.stage(c.END_OF_MESSAGE))
                    at_end = True
                else:
                    response, at_end = yield self._replay(child, message, macros)
            except defer.CancelledError:
                raise  # the MTA went away: close() cleans up
            except Exception:
                message.statuses.append(
                    self._child_failed(child, Failure(), "end-of-message"))
                continue
            if response is None:  # it accepted before the end
                child.in_message = False
                continue
            if at_end:
                child.in_message = False
            # else its verdict before the end ends the message: it is aborted with the rest,
            # as the child that gets the message live is
            status = child.status_of(response)
            if status >= Status.TEMPORARY_FAILURE:
                self._abort_message()
                return reply_for(status, _reply_code(response, status))
            message.statuses.append(status)
            self._apply(child, message, response.modifications)
        return self._final_replies(message)

    @defer.inlineCallbacks
    def _replay(self, child, message, macros):
        """Send child the whole message; fire with (its end-of-message Response, True).

        Fires (None, False) if it accepted before the end (it then takes no
        further part); a reject or temporary failure before the end fires
        (that Response, False) at once.
        """
        header_macros = macros.stage(c.HEADER)
        for name, value in message.headers:
            response = yield child.send(messages.Header(name, value), header_macros)
            if response is not None and response.reply is not messages.CONTINUE:
                return self._early(child, message, response), False
        if message.end_of_headers:
            response = yield child.send(messages.END_OF_HEADERS,
                                        macros.stage(c.END_OF_HEADERS))
            if response is not None and response.reply is not messages.CONTINUE:
                return self._early(child, message, response), False
        body_macros = macros.stage(c.BODY)
        for chunk in message.current_body.chunks(self.chunk_size):
            response = yield child.send(messages.Body(chunk), body_macros)
            if response is None or response.reply is messages.CONTINUE:
                continue
            if response.reply is messages.SKIP:
                break
            return self._early(child, message, response), False
        response = yield child.send(messages.END_OF_MESSAGE, macros.stage(c.END_OF_MESSAGE))
        return response, True

    def _early(self, child, message, response):
        """A verdict before the end of message: accept leaves, anything else ends it."""
        status = child.status_of(response)
        if status is Status.ACCEPT:
            message.statuses.append(status)
            return None
        return response

    def _apply(self, child, message, modifications):
        """Apply a child's edits to the message the next child will see."""
        replaced = None
        for edit in child.allowed_edits(modifications, "end-of-message"):
            kind = type(edit)
            if kind is messages.ReplaceBody:
                if replaced is None:
                    replaced = BodyBuffer(self.max_body_memory)
                replaced.append(edit.chunk)
            elif kind is messages.ChangeFrom:
                message.change_from = edit
            elif kind is messages.Quarantine:
                message.quarantine = edit
            elif kind in (messages.AddRecipient, messages.AddRecipientPar,
                          messages.DeleteRecipient):
                message.recipient_edits.append(edit)
            else:
                message.headers.apply(edit)
        if replaced is not None:
            if message.replaced_body is not None:
                message.replaced_body.close()
            message.replaced_body = replaced

    def _final_replies(self, message):
        """The MTA's answer to end of message: one merged set of edits, then the verdict."""
        status = max(message.statuses, default=Status.CONTINUE)
        if status is Status.SKIP:
            status = Status.CONTINUE
        final = reply_for(status)
        if status >= Status.TEMPORARY_FAILURE:
            return final
        replies = []
        if message.replaced_body is not None:
            replies.extend(messages.ReplaceBody(chunk)
                           for chunk in message.replaced_body.chunks(c.MAX_CHUNK_SIZE))
        replies.extend(message.headers.diff())
        if message.change_from is not None:
            replies.append(message.change_from)
        replies.extend(message.recipient_edits)
        if message.quarantine is not None:
            replies.append(message.quarantine)
        replies.append(final)
        return replies

    def _chain_failed(self, failure):
        if failure.check(defer.CancelledError):
            return failure
        self.log.failure("[session][error] end of message failed", failure)
        self._abort_message()
        return self._no_child_reply()

    def _message_done(self, result):
        self._stop_progress()
        self._end_message()
        return result

    def _stop_progress(self):
        if self._progress is not None:
            if self._progress.running:
                self._progress.stop()
            self._progress = None

    # ------------------------------------------------------------ endings

    def _abort_message(self):
        """The message is over before its end: every child still in it gets ABORT."""
        for child in self.children:
            child.abort()
        self._end_message()

    def _end_message(self):
        if self._message is not None:
            self._message.close()
            self._message = None
        self._data_sent = False

    def abort(self, macros):
        self._stop_progress()
        self._abort_message()

    def close(self):
        self._stop_progress()
        self._end_message()
        for child in self.children:
            child.quit()


def manager_factory(configuration, reactor, clock=None):
    """A MilterServerFactory whose every MTA connection is a ManagerSession."""
    return MilterServerFactory(
        lambda server: ManagerSession(server, configuration, reactor, clock))
