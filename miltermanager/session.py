"""The manager's side of one MTA connection: children in parallel, then in a chain.

Envelope commands (connect, helo, mail, rcpt, data, unknown) go to every
child that still takes part, at once; the MTA gets the merged verdict when
all have answered. The message (headers, body, end of message) goes live to
the first child only; at end of message each later child is replayed the
message as the children before it left it. The MTA then gets one merged set
of modifications and the final verdict.

Stoppers (miltermanager.conditions.context) are asked per child, before
the command of their stage is sent to it; a child whose applicable
conditions have none costs one attribute test per command. A stopped child
counts as upstream's: at connect or HELO it accepts and quits for the SMTP
connection without getting the command; at MAIL it accepts and sits out
the transaction; at RCPT it only misses that recipient (no verdict; with no
recipient left it is aborted at DATA); at DATA (envelope and data
stoppers), header, end of header, body or end of message it accepts, is
aborted, and the message goes on with the other children (those after it
get the message replayed at its end).
"""

from inspect import iscoroutine

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .body import BodyBuffer
from .children import Child
from .conditions.context import ChildContext, ChildStatus, ChildStatuses, SocketAddress, text
from .headers import HeaderList
from .merge import Status, merge_negotiation, reply_for, status_of
from .protocol import constants as c
from .protocol import messages
from .protocol.messages import Negotiate
from .server import IMilter, MilterServerFactory

# How a child's verdict at an envelope stage changes what it takes part in.
_CONNECTION, _MAIL, _RCPT, _DATA, _UNKNOWN = "connection", "mail", "rcpt", "data", "unknown"
_FINAL = (Status.TEMPORARY_FAILURE, Status.REJECT, Status.DISCARD)

# The stopper kind of each message-phase command.
_MESSAGE_STOPPERS = {
    c.HEADER: "header", c.END_OF_HEADERS: "end_of_header", c.BODY: "body",
}
# At DATA: the envelope stoppers (arguments made per child), then the data stoppers.
_DATA_STOPPERS = (("envelope", None), ("data", ()))

# MTA connections this process serves now (ManagerSessions not yet closed).
_processing_sessions = 0


def processing_sessions():
    """How many MTA connections this process is serving now (n_processing_sessions)."""
    return _processing_sessions


def stoppers_of(milter, conditions):
    """{stopper kind: tuple of Hooks} for a child from its applicable conditions, or None.

    Names that are not conditions were refused when the configuration was loaded.
    """
    names = getattr(milter, "applicable_conditions", None)
    if not names:
        return None
    stoppers = {}
    for name in names:
        condition = conditions.get(name)
        if condition is None:
            continue
        for hook in condition.stoppers:
            if hook.function is not None:
                stoppers.setdefault(hook.kind, []).append(hook)
    return {kind: tuple(hooks) for kind, hooks in stoppers.items()} or None


_TIMED_OUT = object()


def _timed_out(result, seconds):
    """addTimeout's onTimeoutCancel: tell our own timeout from a stopper's TimeoutError."""
    return _TIMED_OUT


def _any(results):
    """Several stoppers' answers as one: any true stops; a cancelled one (None) ends it."""
    answers = [stop for _, stop in results]
    if any(answers):
        return True
    return None if None in answers else False


def _origin(hook):
    """Where a stopper was defined, FILE:LINE, for the log."""
    if hook.origin:
        return hook.origin
    code = getattr(hook.function, "__code__", None)
    if code is None:
        return repr(hook.function)
    return f"{code.co_filename}:{code.co_firstlineno}"


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
        global _processing_sessions
        _processing_sessions += 1
        self._counted = True
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
        conditions = getattr(configuration, "conditions", None)
        if conditions:
            self._setup_stoppers(conditions)

    _stopping = False  # some child has stoppers

    def _setup_stoppers(self, conditions):
        for child in self.children:
            child.stoppers = stoppers_of(child.config, conditions)
            if child.stoppers is not None:
                self._stopping = True
                child.context = ChildContext(child, self)
                child.accepted = []
                child.stopper_timeout = child.config.timeouts.reading
        if not self._stopping:
            return
        for child in self.children:
            child.status_view = ChildStatus(child)
        # Every configured child, also those that will fail to start (they show as quitted).
        self.child_statuses = ChildStatuses({child.name: child for child in self.children})
        self.socket_address = self.client_host = self.helo_name = self.envelope_from = None
        self._shelf = None
        self._recipient = None
        self._asking = set()  # stoppers' Deferreds not fired yet

    # ------------------------------------------------------------ for ChildContext

    @property
    def macros(self):
        """The MTA's macros as they stand (a miltermanager.macros.Macros)."""
        return self.server.macros

    @property
    def mail_transaction_shelf(self):
        """The dict the stoppers share in this transaction."""
        if self._shelf is None:
            self._shelf = {}
        return self._shelf

    processing_sessions = staticmethod(processing_sessions)

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
        if self._stopping:
            self.client_host = host = text(command.hostname)
            self.socket_address = address = SocketAddress.from_connect(command)
            return self._envelope_stopping(command, macros.stage(c.CONNECT), self._alive(),
                                           _CONNECTION, (("connect", (host, address)),))
        return self._envelope(command, macros.stage(c.CONNECT), self._alive(), _CONNECTION)

    def helo(self, command, macros):
        if self._stopping:
            self.helo_name = fqdn = text(command.name)
            return self._envelope_stopping(command, macros.stage(c.HELO), self._alive(),
                                           _CONNECTION, (("helo", (fqdn,)),))
        return self._envelope(command, macros.stage(c.HELO), self._alive(), _CONNECTION)

    def mail(self, command, macros):
        self._end_message()
        children = self._alive()
        for child in children:
            child.in_message = True
            child.recipients = 0
        if self._stopping:
            self._new_transaction()
            self.envelope_from = sender = text(command.sender)
            return self._envelope_stopping(command, macros.stage(c.MAIL), children, _MAIL,
                                           (("envelope_from", (sender,)),))
        return self._envelope(command, macros.stage(c.MAIL), children, _MAIL)

    def rcpt(self, command, macros):
        if self._stopping:
            self._recipient = recipient = text(command.recipient)
            return self._envelope_stopping(command, macros.stage(c.RCPT), self._in_message(),
                                           _RCPT, (("envelope_recipient", (recipient,)),))
        return self._envelope(command, macros.stage(c.RCPT), self._in_message(), _RCPT)

    def data(self, command, macros):
        self._data_sent = True
        if self._stopping:
            return self._envelope_stopping(command, macros.stage(c.DATA),
                                           self._with_recipients(), _DATA, _DATA_STOPPERS)
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
        if failure.check(defer.CancelledError):
            # The MTA went away and the server cancelled what was pending: no fault of the child.
            self.log.debug("[children][cancelled][{stage}] {name}", stage=stage, name=child.name)
            child.expire()
            return child.fallback_status
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

    # ------------------------------------------------------------ stoppers

    def _new_transaction(self):
        """MAIL: a new shelf, and every child's verdict and stop of the last one forgotten."""
        self._shelf = None
        for child in self.children:
            if child.alive:
                child.verdict = Status.NOT_CHANGE
                child.stopped = False
            if child.stoppers is not None:
                child.accepted = []
                child.forget_macros()

    def _envelope_stopping(self, command, stage_macros, targets, kind, stops):
        """_envelope for a session where some child has stoppers.

        stops: (stopper kind, arguments) pairs asked in turn; None arguments
        are the envelope stopper's, made per child.
        """
        if not targets:
            return self._no_child_reply()
        if len(targets) == 1:
            child = targets[0]
            stoppers = child.stoppers
            stop = False if stoppers is None else self._decide(child, stoppers, stops)
            if stop is False:
                d = self._send_envelope(child, command, stage_macros, kind)
            elif stop is True:
                return self._merged([self._stop_envelope(child, kind)], kind)
            else:
                d = stop.addCallback(self._envelope_decided, child, command, stage_macros, kind)
            return d.addCallback(self._one_merged, kind)
        answers = []
        for child in targets:
            stoppers = child.stoppers
            stop = False if stoppers is None else self._decide(child, stoppers, stops)
            if stop is False:
                answers.append(self._send_envelope(child, command, stage_macros, kind))
            elif stop is True:
                answers.append(defer.succeed(self._stop_envelope(child, kind)))
            else:
                answers.append(stop.addCallback(
                    self._envelope_decided, child, command, stage_macros, kind))
        return defer.gatherResults(answers).addCallback(self._merged, kind)

    def _one_merged(self, answer, kind):
        return self._merged([answer], kind)

    def _send_envelope(self, child, command, stage_macros, kind):
        d = child.send(command, stage_macros).addBoth(self._answered, child, kind)
        if kind is _RCPT and child.accepted is not None:
            d.addCallback(self._note_recipient, child, self._recipient)
        return d

    def _note_recipient(self, answer, child, recipient):
        if answer[0] is Status.CONTINUE:
            child.accepted.append(recipient)
        return answer

    def _envelope_decided(self, stop, child, command, stage_macros, kind):
        if stop:
            return self._stop_envelope(child, kind)
        if (stop is None or not child.alive
                or (kind is not _CONNECTION and not child.in_message)):
            return Status.NOT_CHANGE, None  # the MTA or the child went away meanwhile
        return self._send_envelope(child, command, stage_macros, kind)

    def _stop_envelope(self, child, kind):
        """A stopper stopped child at an envelope stage; its (status, reply) for the merge."""
        self.log.debug("[stopper][stop][{stage}] {name}", stage=kind, name=child.name)
        child.stopped = True
        if kind is _CONNECTION:
            child.quit()
        elif kind is _MAIL:
            child.in_message = False
        elif kind is _RCPT:
            return Status.NOT_CHANGE, None  # only this recipient is withheld
        else:
            child.abort()
        return Status.ACCEPT, None

    def _stop_in_message(self, child, message):
        """A stopper stopped child in the message phase: it accepts and is aborted."""
        self.log.debug("[stopper][stop][message] {name}", name=child.name)
        child.stopped = True
        child.abort()
        message.statuses.append(Status.ACCEPT)

    def _decide(self, child, stoppers, stops):
        """Whether to stop child: True, False, or a Deferred firing with one of them.

        The Deferred fires None if it was cancelled: the MTA went away.
        """
        for index, (kind, arguments) in enumerate(stops):
            hooks = stoppers.get(kind)
            if not hooks:
                continue
            if arguments is None:
                arguments = (self.envelope_from, list(child.accepted))
            stop = self._ask(child, kind, hooks, arguments)
            if stop is True:
                return True
            if stop is not False:
                rest = stops[index + 1:]
                return stop.addCallback(
                    lambda stop: self._decide(child, stoppers, rest) if stop is False else stop)
        return False

    def _ask(self, child, kind, hooks, arguments):
        """Call the stoppers of one kind; the child stops if any says so.

        A true result decides at once (later stoppers are not called). Deferreds
        (and coroutines) run side by side, each bounded by the child's reading
        timeout. A stopper that raises, fails or times out is logged with where
        it was defined and counts as "don't stop".
        """
        context = child.context
        context._transaction = kind != "connect" and kind != "helo"
        pending = None
        for hook in hooks:
            try:
                result = hook.function(context, *arguments)
                if iscoroutine(result):
                    result = defer.ensureDeferred(result)
            except Exception:
                self._stopper_failed(Failure(), child, hook, kind)
                continue
            if isinstance(result, defer.Deferred):
                if pending is None:
                    pending = []
                pending.append(self._bounded(result, child, hook, kind))
            elif result:
                for d in pending or ():
                    d.cancel()
                return True
        if pending is None:
            return False
        if len(pending) == 1:
            return pending[0]
        return defer.DeferredList(pending).addCallback(_any)

    def _bounded(self, d, child, hook, kind):
        """d fires True or False within the child's timeout (None if cancelled); never fails."""
        seconds = child.stopper_timeout
        d.addTimeout(seconds, self.clock, onTimeoutCancel=_timed_out)
        d.addCallbacks(self._stopper_answered, self._stopper_failed,
                       callbackArgs=(child, hook, kind, seconds), errbackArgs=(child, hook, kind))
        self._asking.add(d)
        return d.addBoth(self._asked, d)

    def _asked(self, stop, d):
        self._asking.discard(d)
        return stop

    def _stopper_answered(self, stop, child, hook, kind, seconds):
        if stop is _TIMED_OUT:
            self.log.error(
                "[stopper][timeout][{kind}] {name}: {origin}: {stopper} gave no answer "
                "in {seconds} s; not stopping", kind=kind, name=child.name,
                origin=_origin(hook), stopper=hook.name, seconds=seconds)
            return False
        return bool(stop)

    def _stopper_failed(self, failure, child, hook, kind):
        """Log a stopper's failure; it counts as "don't stop" (None: it was cancelled)."""
        if failure.check(defer.CancelledError):
            return None  # decided without it, or the MTA went away
        self.log.failure(
            "[stopper][error][{kind}] {name}: {origin}: {stopper} failed; not stopping",
            failure, kind=kind, name=child.name, origin=_origin(hook), stopper=hook.name)
        return False

    def _message_arguments(self, child, command, stage):
        """A message-phase stopper's arguments, as the child would get the command."""
        if stage == c.HEADER:
            value = command.value
            if child.convert_leading_space and value[:1] == b" ":
                value = value[1:]
            return text(command.name), text(value)
        if stage == c.BODY:
            return (bytes(command.chunk),)
        return ()

    def _ask_in_message(self, child, command, stage, hooks):
        return self._ask(child, _MESSAGE_STOPPERS.get(stage, "end_of_message"), hooks,
                         self._message_arguments(child, command, stage))

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
        if child.stoppers is not None:
            hooks = child.stoppers.get(_MESSAGE_STOPPERS[stage])
            if hooks:
                stop = self._ask_in_message(child, command, stage, hooks)
                if stop is not False:
                    if stop is True:
                        return self._live_stopped(child)
                    return stop.addCallback(self._live_decided, command, macros, stage, child)
        d = child.send(command, macros.stage(stage))
        return d.addBoth(self._live_answered, child, stage)

    def _live_decided(self, stop, command, macros, stage, child):
        message = self._message
        if stop is None or message is None or message.live is not child:
            return messages.CONTINUE  # the MTA went away meanwhile
        if stop:
            return self._live_stopped(child)
        d = child.send(command, macros.stage(stage))
        return d.addBoth(self._live_answered, child, stage)

    def _live_stopped(self, child):
        """The child getting the message live was stopped: the rest get it replayed."""
        message = self._message
        self._stop_in_message(child, message)
        self._leave_message(child)
        return self._live_left(message)

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
            stoppers = child.stoppers
            if child is message.live and stoppers is not None and "end_of_message" in stoppers:
                stop = self._ask(child, "end_of_message", stoppers["end_of_message"], ())
                if stop is not False and stop is not True:
                    stop = yield stop
                    if stop is None or message is not self._message:
                        return messages.CONTINUE
                if stop:
                    self._stop_in_message(child, message)
                    continue
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
        stoppers = child.stoppers
        if stoppers is None:
            header_hooks = end_of_header_hooks = body_hooks = end_of_message_hooks = None
        else:
            header_hooks = stoppers.get("header")
            end_of_header_hooks = stoppers.get("end_of_header")
            body_hooks = stoppers.get("body")
            end_of_message_hooks = stoppers.get("end_of_message")
        header_macros = macros.stage(c.HEADER)
        for name, value in message.headers:
            command = messages.Header(name, value)
            if header_hooks:
                stop = self._ask_in_message(child, command, c.HEADER, header_hooks)
                if stop is not False:
                    stop = yield stop
                    if stop or stop is None or message is not self._message:
                        return self._replay_stopped(child, message, stop), False
            response = yield child.send(command, header_macros)
            if response is not None and response.reply is not messages.CONTINUE:
                return self._early(child, message, response), False
        if message.end_of_headers:
            if end_of_header_hooks:
                stop = self._ask(child, "end_of_header", end_of_header_hooks, ())
                if stop is not False:
                    stop = yield stop
                    if stop or stop is None or message is not self._message:
                        return self._replay_stopped(child, message, stop), False
            response = yield child.send(messages.END_OF_HEADERS,
                                        macros.stage(c.END_OF_HEADERS))
            if response is not None and response.reply is not messages.CONTINUE:
                return self._early(child, message, response), False
        body_macros = macros.stage(c.BODY)
        for chunk in message.current_body.chunks(self.chunk_size):
            if body_hooks:
                stop = self._ask(child, "body", body_hooks, (bytes(chunk),))
                if stop is not False:
                    stop = yield stop
                    if stop or stop is None or message is not self._message:
                        return self._replay_stopped(child, message, stop), False
            response = yield child.send(messages.Body(chunk), body_macros)
            if response is None or response.reply is messages.CONTINUE:
                continue
            if response.reply is messages.SKIP:
                break
            return self._early(child, message, response), False
        if end_of_message_hooks:
            stop = self._ask(child, "end_of_message", end_of_message_hooks, ())
            if stop is not False:
                stop = yield stop
                if stop or stop is None or message is not self._message:
                    return self._replay_stopped(child, message, stop), False
        response = yield child.send(messages.END_OF_MESSAGE, macros.stage(c.END_OF_MESSAGE))
        return response, True

    def _replay_stopped(self, child, message, stop):
        """A stopper stopped child during its replay (or the MTA went away while it asked)."""
        if stop is None:
            raise defer.CancelledError()  # the MTA went away: close() cleans up
        if stop and message is self._message:
            self._stop_in_message(child, message)
        return None

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
        if self._stopping:
            self._shelf = None
            for child in self.children:
                child.forget_macros()

    def close(self):
        global _processing_sessions
        if self._counted:
            self._counted = False
            _processing_sessions -= 1
        self._stop_progress()
        self._end_message()
        for child in self.children:
            child.quit()
        if self._stopping:
            for d in list(self._asking):
                d.cancel()


def manager_factory(configuration, reactor, clock=None):
    """A MilterServerFactory whose every MTA connection is a ManagerSession."""
    return MilterServerFactory(
        lambda server: ManagerSession(server, configuration, reactor, clock))
