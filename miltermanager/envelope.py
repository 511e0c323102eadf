"""The envelope fan-out: connect, HELO, MAIL, RCPT, DATA and unknown to every child at once.

Each child that takes part gets the command at the same time (after its
stoppers, if it has any, let it); the MTA gets the merged verdict once all
have answered (miltermanager.merge.merge_verdicts). What an answer means
for the child itself depends on the stage: at connect or HELO anything but
continue ends its part in the SMTP connection; at MAIL and DATA anything
but continue ends its part in the transaction; at RCPT a continue counts
the recipient for it, an accept takes it out of the transaction, a reject
or temporary failure only loses it that recipient. A fallback counts
exactly as that reply would.
"""

from twisted.internet import defer
from twisted.python.failure import Failure

from . import stages
from .merge import Status


class Envelope:
    """Sends one session's envelope commands to its children and merges their answers."""

    def __init__(self, session):
        self.session = session

    def send(self, stage, command, macros, targets):
        """Send command (of stage) to every target; the merged reply, or a Deferred of it."""
        session = self.session
        if not targets:
            return session.no_child_reply(stage)
        runner = session.stoppers
        started = session.clock.seconds() if session.observer is not None else None
        stage_macros = macros.message(stage.code)
        # A child without stoppers is sent the command at once (the common case); a lone
        # one is answered with one callback.
        if len(targets) == 1:
            child = targets[0]
            if runner is None or child.stoppers is None:
                d = child.send(command, stage_macros)
                return d.addBoth(self._alone_answered, child, stage, started)
            answer = self._ask_then_send(child, stage, command, stage_macros, runner, started)
            if isinstance(answer, defer.Deferred):
                return answer.addCallback(self._one_merged, stage)
            return session.merged([answer], stage)
        if runner is None:
            gather = _Gather(session, stage, len(targets))
            for index, child in enumerate(targets):
                gather.add(child.send(command, stage_macros).addBoth(
                    self._gathered, child, stage, started, gather, index))
            return gather.deferred
        answers = []
        for child in targets:
            if child.stoppers is None:
                d = child.send(command, stage_macros)
                answers.append(d.addBoth(self._answered, child, stage, started))
                continue
            answer = self._ask_then_send(child, stage, command, stage_macros, runner, started)
            answers.append(answer if isinstance(answer, defer.Deferred)
                           else defer.succeed(answer))
        return defer.gatherResults(answers).addCallback(session.merged, stage)

    def _one_merged(self, answer, stage):
        return self.session.merged([answer], stage)

    def _gathered(self, result, child, stage, started, gather, index):
        try:
            gather.answered(index, self._answered(result, child, stage, started))
        except Exception:
            gather.failed(Failure())

    def _alone_answered(self, result, child, stage, started):
        return self.session.merged([self._answered(result, child, stage, started)], stage)

    def _ask_then_send(self, child, stage, command, stage_macros, runner, started):
        """A child with stoppers: ask them, then send; (status, reply, name) or a Deferred of it."""
        stop = runner.decide(child, stage, command)
        if stop is not False:
            if isinstance(stop, defer.Deferred):
                return stop.addCallback(self._decided, child, stage, command, stage_macros,
                                        started)
            return self._stopped(child, stage, stop)
        d = child.send(command, stage_macros)
        return d.addBoth(self._answered, child, stage, started)

    def _decided(self, stop, child, stage, command, stage_macros, started):
        if stop:
            return self._stopped(child, stage, stop)
        if (stop is None or not child.alive
                or (stage not in stages.CONNECTION
                    and stage is not stages.UNKNOWN and not child.in_message)):
            return Status.NOT_CHANGE, None, child.name  # the MTA or the child went away
        d = child.send(command, stage_macros)
        return d.addBoth(self._answered, child, stage, started)

    def _stopped(self, child, stage, stop):
        """A stopper stopped child: its (status, reply, name) for the merge."""
        self.session.note_stop(child, stage, stop)
        if stage in stages.CONNECTION:
            child.quit()
        elif stage is stages.MAIL:
            child.leave_message()
        elif stage is stages.RCPT:
            return Status.NOT_CHANGE, None, child.name  # only this recipient is withheld
        else:
            child.abort()
        return Status.ACCEPT, None, child.name

    def _answered(self, result, child, stage, started):
        """A child's (status, reply code, name) at stage; apply what it means for the child."""
        status, reply = self.session.judge(child, stage, result, started)
        if stage is stages.RCPT:
            if status is Status.CONTINUE:
                child.recipients += 1
                if child.accepted is not None:
                    child.accepted.append(self.session.stoppers.facts.recipient)
            elif status is Status.ACCEPT and child.verdict is Status.ACCEPT:
                # A real accept; an evaluation child's reject only loses it the recipient.
                child.leave_message()
        elif stage in stages.CONNECTION:
            if status is not Status.CONTINUE:
                child.quit()  # done with this SMTP connection, whatever it said
        elif stage is not stages.UNKNOWN and status is not Status.CONTINUE:
            child.leave_message()
        return status, reply, child.name


class _Gather:
    """Several children's answers to one command; deferred fires with the merged reply.

    What defer.gatherResults did here, with one plain callback per child
    instead of a DeferredList: the answers (status, reply, name) are kept in
    target order, and the session merges them once the last is in.
    Cancelling deferred cancels the children's Deferreds still pending; as
    with gatherResults, their fallbacks may then complete it at once.
    """

    __slots__ = ("session", "stage", "answers", "left", "deferred", "_pending")

    def __init__(self, session, stage, count):
        self.session = session
        self.stage = stage
        self.answers = [None] * count
        self.left = count
        self.deferred = defer.Deferred(self._cancel)
        self._pending = []

    def add(self, d):
        """d fires (through answered) with one child's answer."""
        if not d.called:
            self._pending.append(d)

    def answered(self, index, answer):
        self.answers[index] = answer
        self.left -= 1
        if self.left == 0 and not self.deferred.called:
            self._pending = None
            try:
                reply = self.session.merged(self.answers, self.stage)
            except Exception:
                self.deferred.errback(Failure())
            else:
                self.deferred.callback(reply)

    def failed(self, failure):
        if not self.deferred.called:
            self._pending = None
            self.deferred.errback(failure)

    def _cancel(self, d):
        for pending in self._pending or ():
            pending.cancel()
