"""The manager's side of one MTA connection: negotiate, fan out the envelope, chain the message.

ManagerSession is the IMilter the server library drives. It negotiates
with every child at once, hands envelope commands to the fan-out
(miltermanager.envelope) and the message to the chain
(miltermanager.message), asks stoppers through miltermanager.stoppers, and
reports everything on one event stream (miltermanager.events). Merging is
pure (miltermanager.merge). A child that cannot be reached, times out,
fails or breaks the protocol contributes its fallback_status, which counts
exactly as that reply would have, and takes no further part.
"""

import enum

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import stages
from .children import ALIVE, IN_MESSAGE, BogusReply, Child, cause_of
from .envelope import Envelope
from .events import (
    Cause, ChildFellBack, ChildReplied, ChildStopped, MessageEnded, SessionEnded, SessionStarted,
)
from .health import Admission
from .merge import Status, merge_negotiation, merge_verdicts, negotiation_covers, reply_for
from .message import MessageChain
from .policy.gate import PolicyGate
from .protocol import constants as c
from .protocol import messages
from .protocol.messages import CONTINUE, Negotiate
from .server import IMilter
from .stoppers import StopperRunner

# The message stages the MTA may read no reply to, and the flag that says so.
_MESSAGE_NO_REPLY = tuple((stage, c.NO_REPLY_FLAG[stage.code]) for stage in stages.MESSAGE
                          if stage.code in c.NO_REPLY_FLAG)
# "No reply" steps before the message: a verdict there has no later reply to wait for.
_ENVELOPE_NO_REPLY = c.NO_REPLY_FLAGS & ~sum(flag for _, flag in _MESSAGE_NO_REPLY)

# Verdicts that let the mail go on without any child deciding anything.
_GOING_ON = (Status.NOT_CHANGE, Status.SKIP, Status.CONTINUE)


class Transaction(enum.Enum):
    """Where the session is in the current mail transaction."""

    NONE = "none"  # no transaction: before MAIL, or the last one ended
    ENVELOPE = "envelope"  # MAIL went to the children; DATA did not yet
    DATA = "data"  # DATA went (or was emulated); the message did not start yet
    MESSAGE = "message"  # headers, body, end of message: a MessageChain holds it


@implementer(IMilter)
class ManagerSession:
    """One MTA connection: negotiate with every child, fan out, chain, merge, report.

    factory provides configuration, reactor, session_clock (None: the
    reactor), observer (an ISessionObserver or None), health (a
    health.ChildHealth or None), processing_sessions() (MTA connections
    open now) and new_session_number().
    """

    log = Logger()
    smtp_client = None  # the Connect command, for the connection checkers
    gone_by = None  # the name of the connection checker that found the SMTP client gone
    # For the event stream, kept only while an observer listens: MAIL's address and the
    # number of RCPT commands in the current transaction.
    _sender = None
    _recipients = 0

    def __init__(self, server, factory):
        self.server = server
        configuration = factory.configuration
        manager = configuration.manager
        self.fallback_status = manager.fallback_status
        self.chunk_size = manager.chunk_size
        self.max_body_memory = manager.max_body_memory
        self.progress_interval = manager.progress_interval
        reactor = factory.reactor
        self.clock = clock = factory.session_clock or reactor
        self.observer = factory.observer
        self.health = factory.health
        self.launcher = factory.launcher  # starts children nothing listens for, or None
        self.number = factory.new_session_number()
        self._started = clock.seconds()
        self.children = [Child(milter, reactor, clock)
                         for milter in configuration.milters if milter.enabled]
        self.version = c.MAX_VERSION
        self.transaction = Transaction.NONE
        self.message = None  # the MessageChain while Transaction.MESSAGE
        self.stage = stages.NEGOTIATE  # the last stage reached
        # A fallback waiting for the next verdict (a child that failed to start).
        self._pending = Status.NOT_CHANGE
        self._pending_by = None
        # The message stages whose replies the MTA does not read (merge_negotiation asks for
        # no reply to headers and the end of headers, to the body if every child has it), and
        # a verdict reached at one of them, kept for the next command whose reply it reads.
        self._unanswered = frozenset()
        self._held = None
        # The children's last negotiation replies, and while the MTA was answered from them,
        # the Deferred of this session's children starting, which its first command waits for.
        self._memory = factory.negotiation_memory
        self._configuration = configuration
        self._starting = None
        self.envelope = Envelope(self)
        self.stoppers = None
        conditions = getattr(configuration, "conditions", None)
        if conditions:
            runner = StopperRunner(self.children, conditions, server.macros,
                                   factory.processing_sessions, clock)
            if runner.any:
                self.stoppers = runner
        self.gate = None  # a PolicyGate when some child lists the LDAP Policy condition
        ldap = getattr(configuration, "ldap", None)
        if ldap is not None and ldap.lookups is not None and self.stoppers is not None:
            self.gate = PolicyGate(ldap.lookups, [milter.name for milter in ldap.governed(
                configuration)], ldap.split_recipients)
            self.stoppers.facts.policy = self.gate
        # For the event stream: the last verdict the MTA got and who decided it.
        self._verdict = None
        self._decided_by = None
        self._messages = 0
        if self.observer is not None:
            self._message_started = self._started
            self.observer.session_started(SessionStarted(
                self.number, tuple(child.name for child in self.children)))

    # ------------------------------------------------------------ negotiation

    def negotiate(self, offer):
        self.version = min(c.MAX_VERSION, offer.version)
        if not self.children:
            return merge_negotiation(offer, [])
        child_offer = Negotiate(self.version, offer.actions, offer.protocol, {})
        names = tuple(child.name for child in self.children)
        recalled = self._memory.recall(self._configuration, offer, names)
        if recalled is not None and recalled[1].protocol & _ENVELOPE_NO_REPLY:
            # A fallback at those commands could not wait for a reply the MTA reads.
            recalled = None
        starts = [self._start(child, child_offer) for child in self.children]
        # _negotiated reads the replies from the children: one needs no gathering.
        started = starts[0] if len(starts) == 1 else defer.gatherResults(starts)
        if recalled is None:
            return started.addCallback(self._negotiated, offer, names)
        # Answered from what the children said last time (negotiation_memory); the first
        # command waits for them. Set before the callback, which may run at once.
        known, wanted = recalled
        self._starting = started
        started.addCallback(self._started_ahead, offer, names, known, wanted)
        self._settle(wanted)
        return wanted

    def _start(self, child, offer):
        """Start child unless it is down; fire with its negotiation reply or None."""
        health = self.health
        admission = (Admission.CONNECT if health is None or not health.records
                     else health.admit(child.config))
        if admission is Admission.SKIP:
            self._note_fallback(child, stages.NEGOTIATE, self._fell_back(
                child, stages.NEGOTIATE, Cause.DOWN,
                "marked down after failures in a row; not connecting", debug=True))
            return defer.succeed(None)
        d = child.start(offer)
        return d.addCallbacks(self._child_started, self._child_not_started,
                              callbackArgs=(child,), errbackArgs=(child, admission))

    def _child_started(self, reply, child):
        if self.health is not None and self.health.records:
            self.health.succeeded(child.config)
        return reply

    def _child_not_started(self, failure, child, admission):
        launcher = self.launcher
        if launcher is not None and launcher.can_launch(child.config, failure):
            # Nothing listens there: the launcher starts the child, then it is tried again.
            d = launcher.connect_after_launch(child.config, failure,
                                              lambda: self._start_again(child))
            return d.addCallbacks(self._child_started, self._child_failed,
                                  callbackArgs=(child,), errbackArgs=(child, admission))
        return self._child_failed(failure, child, admission)

    def _start_again(self, child):
        """Connect to child and negotiate once more, with the offer negotiate() made."""
        offer = self.server.offer
        return child.start(Negotiate(self.version, offer.actions, offer.protocol, {}))

    def _child_failed(self, failure, child, admission):
        if failure.check(defer.CancelledError):
            if admission is Admission.PROBE:
                self.health.abandoned(child.config)
            child.fail()
            self.log.debug("[children][cancelled][negotiate] {name}: the MTA went away",
                           name=child.name)
            return None
        if self.health is not None:
            self.health.failed(child.config, failure.getErrorMessage())
        self._note_fallback(child, stages.NEGOTIATE, self.fell_back(
            child, stages.NEGOTIATE, failure))
        return None

    def _note_fallback(self, child, stage, status):
        """A child's fallback before any command: it waits for the next verdict."""
        if status > self._pending:
            self._pending, self._pending_by = status, child.name

    def _negotiated(self, _started, offer, names):
        if self.envelope is None:
            return None  # closed meanwhile: nothing is answered
        every = all(child.alive for child in self.children)
        self.children = [child for child in self.children if child.alive]
        replies = tuple(child.connection.negotiate_reply for child in self.children)
        wanted = merge_negotiation(offer, replies)
        if every:
            self._memory.remember(self._configuration, offer, names, replies, wanted)
        else:
            self._memory.forget(self._configuration, offer)
        self._settle(wanted)
        self._convert_leading_space(wanted)
        return wanted

    def _started_ahead(self, _started, offer, names, known, wanted):
        """The children negotiated after the MTA was answered from known: hold them to it."""
        self._starting = None
        if self.envelope is None:
            return  # closed meanwhile: the MTA went away, not the children
        started = [(child, reply) for child, reply in zip(self.children, known) if child.alive]
        replies = tuple(child.connection.negotiate_reply for child, _ in started)
        if len(started) < len(known):
            self._memory.forget(self._configuration, offer)
        elif replies != known:  # the next connection is answered from the new replies
            self._memory.remember(self._configuration, offer, names, replies,
                                  merge_negotiation(offer, replies))
        for (child, reply), actual in zip(started, replies):
            if actual != reply:
                self._changed(child, reply, actual, wanted)
        self.children = [child for child in self.children if child.alive]
        self._convert_leading_space(wanted)

    def _changed(self, child, reply, actual, wanted):
        """child negotiated actual where it negotiated reply before, and the MTA got wanted."""
        if negotiation_covers(wanted, actual):
            self.log.info("[children][negotiate][changed] {name}: negotiated {actual} where "
                          "it negotiated {reply} before; the MTA's answer covers it",
                          name=child.name, actual=actual, reply=reply)
            return
        self._note_fallback(child, stages.NEGOTIATE, self._fell_back(
            child, stages.NEGOTIATE, Cause.CHANGED,
            f"negotiated {actual} where it negotiated {reply} before, which the MTA "
            "was answered from and which does not give it all it asks for: it sits "
            "out this connection"))

    def _settle(self, wanted):
        """What the MTA was answered decides which message stages it reads no reply to."""
        self._unanswered = frozenset(stage for stage, flag in _MESSAGE_NO_REPLY
                                     if wanted.protocol & flag)

    def _convert_leading_space(self, wanted):
        if wanted.protocol & c.SMFIP_HDR_LEADSPC:
            for child in self.children:
                child.convert_leading_space = not child.options.protocol & c.SMFIP_HDR_LEADSPC

    def _after_start(self, method, command, macros):
        """Run method(command, macros) once the children answered ahead of time have started."""
        return self._starting.addCallback(self._started_then, method, command, macros)

    def _started_then(self, _started, method, command, macros):
        if self.envelope is None:
            return None  # closed meanwhile: nothing is answered
        return method(command, macros)

    # ------------------------------------------------------------ envelope

    def connect(self, command, macros):
        if self._starting is not None:
            return self._after_start(self.connect, command, macros)
        self.stage = stages.CONNECT
        self.smtp_client = command
        if self.stoppers is not None:
            self.stoppers.note(stages.CONNECT, command)
        if self._pending >= Status.TEMPORARY_FAILURE and self._pending is not Status.DISCARD:
            # A child that could not be reached already decided the connection: the others
            # are not asked, as after its own temporary failure or reject at connect.
            for child in self.children:
                child.quit()
            return self.merged([], stages.CONNECT)
        return self.envelope.send(stages.CONNECT, command, macros, self._alive())

    def helo(self, command, macros):
        if self._starting is not None:
            return self._after_start(self.helo, command, macros)
        self.stage = stages.HELO
        if self.stoppers is not None:
            self.stoppers.note(stages.HELO, command)
        return self.envelope.send(stages.HELO, command, macros, self._alive())

    def mail(self, command, macros):
        if self._starting is not None:
            return self._after_start(self.mail, command, macros)
        if self.transaction is not Transaction.NONE:
            self.end_message(self.stage, None, None, aborted=True)
        self.stage = stages.MAIL
        self.transaction = Transaction.ENVELOPE
        self._messages += 1
        if self.observer is not None:
            self._message_started = self.clock.seconds()
            self._sender, self._recipients = command.sender, 0
        children = self._alive()
        for child in children:
            child.join_message()
            child.verdict = Status.NOT_CHANGE
            child.stopped_by = None
        if self.stoppers is not None:
            self.stoppers.note(stages.MAIL, command)
            self.stoppers.new_transaction(self.children)
            if self.gate is not None:
                self.gate.new_transaction()
        return self.envelope.send(stages.MAIL, command, macros, children)

    def rcpt(self, command, macros):
        self.stage = stages.RCPT
        if self.observer is not None:
            self._recipients += 1
        if self.stoppers is not None:
            self.stoppers.note(stages.RCPT, command)
            if self.gate is not None:
                return self._gated_rcpt(command, macros)
        return self.envelope.send(stages.RCPT, command, macros, self._in_message())

    def _gated_rcpt(self, command, macros):
        """RCPT through the policy gate: the lookup runs while the children are asked.

        A recipient the gate refuses before anyone was asked reaches no child.
        """
        decision = self.gate.rcpt(self.stoppers.facts.recipient)
        waiting = isinstance(decision, defer.Deferred)
        if not waiting and decision.refusal is not None:
            return self._refuse(decision)
        sent = self.envelope.send(stages.RCPT, command, macros, self._in_message())
        if waiting:
            both = defer.DeferredList([sent if isinstance(sent, defer.Deferred)
                                       else defer.succeed(sent), decision], consumeErrors=True)
            return both.addCallback(self._both_answered)
        if isinstance(sent, defer.Deferred):
            return sent.addCallback(self._gated_reply, decision)
        return self._gated_reply(sent, decision)

    def _both_answered(self, results):
        for answered, value in results:
            if not answered:
                return value  # cancelled: the MTA went away, as the server expects to hear
        (_, reply), (_, decision) = results
        return self._gated_reply(reply, decision)

    def _gated_reply(self, reply, decision):
        """The children's merged reply, unless the gate refuses a recipient they let through."""
        if reply is not messages.CONTINUE:
            return reply
        if decision.refusal is not None:
            return self._refuse(decision)
        self.gate.accepted(decision)
        return reply

    def _refuse(self, decision):
        """The manager's own answer to a recipient (a temporary failure): the reply."""
        status, text = decision.refusal
        self._verdict, self._decided_by = status, "ldap"
        return messages.ReplyCode(text)

    def data(self, command, macros):
        self.stage = stages.DATA
        self.transaction = Transaction.DATA
        return self.envelope.send(stages.DATA, command, macros, self._with_recipients())

    def unknown(self, command, macros):
        if self._starting is not None:
            return self._after_start(self.unknown, command, macros)
        return self.envelope.send(stages.UNKNOWN, command, macros, self._alive())

    def _alive(self):
        return [child for child in self.children if child.state in ALIVE]

    def _in_message(self):
        return [child for child in self.children if child.state in IN_MESSAGE]

    def _with_recipients(self):
        """Children in the message; those left without a recipient leave it now."""
        taking_part = []
        for child in self.children:
            if child.state in IN_MESSAGE:
                if child.recipients:
                    taking_part.append(child)
                else:
                    child.abort()
        return taking_part

    # ------------------------------------------------------------ verdicts

    def merged(self, answers, stage):
        """The MTA's reply to an envelope command from its children's (status, reply, name)."""
        if self._pending is not Status.NOT_CHANGE:
            status, reply, decided_by = self._merge_with_pending(answers, stage)
        elif len(answers) == 1:
            status, reply, decided_by = answers[0]  # a lone answer is the verdict
        else:
            status, reply, decided_by = merge_verdicts(answers)
        if status is Status.CONTINUE:  # the common case, on the shortest path
            self._verdict = status
            return messages.CONTINUE
        connection = stage in stages.CONNECTION
        if status is Status.DISCARD and connection:
            # The MTAs refuse a discard at connect or HELO: only a message can be discarded,
            # so a child's fallback that says so waits for the first MAIL.
            self._pending, self._pending_by = status, decided_by
            status, reply, decided_by = merge_verdicts(
                answer for answer in answers if answer[0] is not Status.DISCARD)
        self._verdict, self._decided_by = status, decided_by
        if status is not Status.CONTINUE and self._ends_message(stage, status):
            self.end_message(stage, status, decided_by)
        return reply_for(status, reply)

    def _merge_with_pending(self, answers, stage):
        """merge_verdicts of the answers and a fallback left from before, if any.

        A pending discard waits for MAIL at connect and HELO: only a message
        can be discarded.
        """
        pending, pending_by = self._pending, self._pending_by
        if pending is Status.DISCARD and stage in stages.CONNECTION:
            pending, pending_by = Status.NOT_CHANGE, None
        else:
            self._pending, self._pending_by = Status.NOT_CHANGE, None
        return merge_verdicts(answers, pending, None, pending_by)

    def _ends_message(self, stage, status):
        """Whether the MTA's getting status at stage ends the transaction.

        A discard does anywhere; so does any verdict but continue at MAIL,
        DATA or in the message; at RCPT an accept does (every child accepted
        the message), while a reject or temporary failure only refuses
        that recipient.
        """
        if self.transaction is Transaction.NONE:
            return False
        if status is Status.DISCARD or not stage.envelope:
            return True
        if stage is stages.MAIL or stage is stages.DATA:
            return status is not Status.NOT_CHANGE
        return stage is stages.RCPT and status is Status.ACCEPT

    def no_child_reply(self, stage):
        """No child can answer: the manager's fallback, or worse if a failed child said so."""
        status, decided_by = self.fallback_status, None
        if self._pending > status:
            status, decided_by = self._pending, self._pending_by
        self._pending, self._pending_by = Status.NOT_CHANGE, None
        if status is Status.DISCARD and stage in stages.CONNECTION:
            self._pending, self._pending_by = status, decided_by
            return messages.CONTINUE  # only a message can be discarded: it waits for MAIL
        self._verdict, self._decided_by = status, decided_by
        if self._ends_message(stage, status):
            self.end_message(stage, status, decided_by)
        return reply_for(status)

    def judge(self, child, stage, result, started=None):
        """(status, reply code) a child's answer (a Response, None or a Failure) counts for.

        A failure, or a reply the MTAs would refuse from a filter, is the
        child's fallback. The reply code is the child's own ReplyCode when
        it says what status says (it then goes on to the MTA). started: when
        the command was sent, if an observer is told of the reply.
        """
        if result is not None and result.__class__ is not Failure and result.reply is CONTINUE:
            child.verdict = Status.CONTINUE  # the common answer, on the shortest path
            if started is not None:
                self.observer.child_replied(ChildReplied(
                    self.number, child.name, stage, CONTINUE, Status.CONTINUE, Status.CONTINUE,
                    self.clock.seconds() - started,
                    tuple(result.modifications) if result.modifications else ()))
            return Status.CONTINUE, None
        if isinstance(result, Failure):
            return self.fell_back(child, stage, result), None
        try:
            status = child.status_of(result, stage)
        except BogusReply:
            return self.fell_back(child, stage, Failure()), None
        if started is not None:
            self.observer.child_replied(ChildReplied(
                self.number, child.name, stage, result and result.reply, status,
                child.verdict if result else Status.CONTINUE, self.clock.seconds() - started,
                tuple(result.modifications) if result is not None and result.modifications
                else ()))
        if (result is not None and result.reply.code == c.REPLY_CODE
                and status >= Status.TEMPORARY_FAILURE):
            return status, result.reply
        return status, None

    def note_stop(self, child, stage, stop):
        """A stopper stopped child before the command of stage: log it and tell the observer."""
        self.log.debug("[stopper][stop][{stage}] {name}: {condition}", stage=stage.nick,
                       name=child.name, condition=stop.condition)
        child.stopped_by = stop.condition
        if self.observer is not None:
            self.observer.child_stopped(ChildStopped(
                self.number, child.name, stage, stop.condition, stop.hook.name, stop.origin))

    def fell_back(self, child, stage, failure):
        """child failed at stage: one log line; its fallback (as it counts) is its status."""
        if failure.check(defer.CancelledError):
            # The MTA went away and the server cancelled what was pending: no fault of the child.
            self.log.debug("[children][cancelled][{stage}] {name}: the MTA went away",
                           stage=stage.nick, name=child.name)
            child.fail()
            return child.fallback_status
        return self._fell_back(child, stage, cause_of(failure), failure.getErrorMessage())

    def _fell_back(self, child, stage, cause, reason, debug=False):
        status = child.fallback()
        log = self.log.debug if debug else self.log.error
        log("[children][{tag}][{stage}][{fallback}] {name}: {reason}",
            tag="timeout" if cause is Cause.TIMEOUT else "error", stage=stage.nick,
            fallback=child.fallback_status.label, name=child.name, reason=reason)
        child.fail()
        if self.observer is not None:
            self.observer.child_fell_back(ChildFellBack(
                self.number, child.name, stage, status, cause, reason))
        return status

    # ------------------------------------------------------------ message

    def header(self, command, macros):
        return self._message_command(stages.HEADER, command, macros)

    def end_of_headers(self, command, macros):
        return self._message_command(stages.END_OF_HEADERS, command, macros)

    def body(self, command, macros):
        return self._message_command(stages.BODY, command, macros)

    def end_of_message(self, command, macros):
        return self._message_command(stages.END_OF_MESSAGE, command, macros)

    def _message_command(self, stage, command, macros):
        self.stage = stage
        if self._held is not None:
            # The message ended at a command the MTA read no reply to: what it still
            # sends of it goes nowhere, and the first reply it reads is the verdict.
            if stage in self._unanswered:
                return CONTINUE
            held, self._held = self._held, None
            return held
        started = self._start_message(macros) if self.message is None else None
        if started is not None:
            result = started.addCallback(self._after_emulated_data, stage, command, macros)
        else:
            result = self._to_message(stage, command, macros)
        if stage in self._unanswered:
            if isinstance(result, defer.Deferred):
                return result.addCallback(self._hold)
            return self._hold(result)
        return result

    def _hold(self, reply):
        """A reply to a command the MTA reads no reply to: a verdict waits for the next one.

        Any reply but continue at a header, the end of headers or a body chunk
        means the message is over (end_message ran). The MTA, not waiting, goes on
        sending the message; _message_command answers the first command it
        reads a reply to with the verdict (the end of message at the latest).
        Postfix and Sendmail give the SMTP client a verdict reached in the
        message after the end of DATA anyway: it gets the same answer at the
        same point.
        """
        if reply is None or reply is CONTINUE or reply == CONTINUE:
            return reply
        self._held = reply
        return CONTINUE

    def _to_message(self, stage, command, macros):
        if stage is stages.END_OF_MESSAGE:
            return self.message.end_of_message(macros)
        return self.message.live_command(stage, command, macros)

    def _start_message(self, macros):
        """Start the message phase; None, or a Deferred if DATA must be emulated first.

        An MTA that speaks version 4 or later but sent no DATA (the manager
        asks for every event) still gets its children a DATA, as upstream does.
        """
        if (self.transaction is Transaction.ENVELOPE and self.version >= 4
                and self._in_message()):
            d = defer.maybeDeferred(self.data, messages.DATA, macros)
            return d.addCallback(self._emulated_data)
        self._new_message()
        return None

    def _new_message(self):
        self.transaction = Transaction.MESSAGE
        self.message = MessageChain(self, self._with_recipients(), self.max_body_memory,
                                    self.chunk_size)

    def _emulated_data(self, reply):
        if reply is messages.CONTINUE:
            self._new_message()
        return reply

    def _after_emulated_data(self, reply, stage, command, macros):
        if reply is not messages.CONTINUE:
            return reply  # the emulated DATA ended the message
        self.stage = stage
        return self._to_message(stage, command, macros)

    def end_message(self, stage, status, decided_by, aborted=False):
        """The transaction is over at stage: children still in it get ABORT.

        status: the verdict the MTA got (None when it aborted or went away).
        """
        for child in self.children:
            if child.state in IN_MESSAGE:
                child.abort()
        self._finish_message(stage, status, decided_by, aborted)

    @staticmethod
    def _decider(status, decided_by):
        """Who decided a verdict for the event stream: nobody when the children just continued."""
        if status is None or status in _GOING_ON:
            return None
        return decided_by

    def _finish_message(self, stage, status, decided_by, aborted):
        if self.message is not None:
            self.message.close()
            self.message = None
        if self.transaction is Transaction.NONE:
            return
        self.transaction = Transaction.NONE
        if status is not None:
            self._verdict, self._decided_by = status, decided_by
        if self.observer is not None:
            queue_id = self.server.macros.get(b"i")
            self.observer.message_ended(MessageEnded(
                self.number, stage, status, self._decider(status, decided_by), aborted,
                self.clock.seconds() - self._message_started,
                None if queue_id is None else bytes(queue_id).decode("utf-8", "replace"),
                self.gone_by, self._client_text(), _text(self._sender), self._recipients))

    def _client_text(self):
        """The SMTP client as HOSTNAME[ADDRESS] (Postfix's way), None before connect."""
        client = self.smtp_client
        if client is None:
            return None
        return f"{_text(client.hostname)}[{_text(client.address)}]"

    # ------------------------------------------------------------ endings

    def client_gone(self, checker, client, status):
        """A connection checker found the SMTP client gone while the MTA waits for a reply.

        The MTA is answered status (manager.fallback_status_at_disconnect)
        at once instead of after the children's work, which nobody will read;
        children in the message get ABORT (a child whose answer was awaited,
        QUIT only) and every child QUIT. Later commands find no child:
        manager.fallback_status.
        """
        self.gone_by = checker
        if status is Status.DISCARD and self.stage in stages.CONNECTION:
            status = Status.TEMPORARY_FAILURE  # the MTAs refuse a discard at connect or HELO
        # Upstream's statistics line, exactly; then what happened, in words.
        self.log.info("[session][disconnected][{elapsed:g}]({number})",
                      elapsed=self.clock.seconds() - self._started, number=self.number,
                      milter_log_level="statistics")
        self.log.info("[session][client-gone]({number}) {checker} found the SMTP client "
                      "{client} gone at {stage}; answering {status}", number=self.number,
                      checker=checker, client=client, stage=self.stage.nick,
                      status=status.label)
        self.end_message(self.stage, status, None)
        reply = reply_for(status)
        self.server.answer_now(self._hold(reply) if self.stage in self._unanswered else reply)
        for child in self.children:
            child.quit()
        self._pending, self._pending_by = Status.NOT_CHANGE, None
        self._verdict, self._decided_by = status, None

    def abort(self, macros):
        self._held = None
        self.end_message(self.stage, None, None, aborted=True)
        if self.stoppers is not None:
            self.stoppers.new_transaction(self.children)
            if self.gate is not None:
                self.gate.new_transaction()

    def close(self):
        self._finish_message(self.stage, None, None, aborted=True)
        for child in self.children:
            child.quit()
        if self.stoppers is not None:
            self.stoppers.cancel()
        if self.observer is not None:
            self.observer.session_ended(SessionEnded(
                self.number, self.stage, self._verdict,
                self._decider(self._verdict, self._decided_by), self._messages,
                self.clock.seconds() - self._started, self.gone_by))
        # The envelope points back at the session; nothing is sent after close. Without
        # this cycle the session goes by reference counting (replies still on their way
        # hold the envelope, and through it the session, as long as they need them).
        self.envelope = None


def _text(value):
    """bytes from the wire as text for the event stream (None stays None)."""
    if value is None:
        return None
    return bytes(value).decode("utf-8", "backslashreplace")
