"""The message chain: headers, body and end of message through the children in turn.

The first child of the chain gets the message live, command by command, as
the MTA sends it; the manager keeps the headers and the body. At end of
message each later child is replayed the whole message as the children
before it left it (their edits applied, miltermanager.merge.apply), then
the MTA gets one merged set of edits and the verdict
(miltermanager.merge.final_replies). A child that accepts before the end
leaves the chain; a temporary failure, reject or discard ends the message
for everyone at once. A child's fallback counts exactly as that reply would.
"""

from dataclasses import replace

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import stages
from .body import BodyBuffer
from .children import ChildState
from .headers import HeaderList
from .merge import Changes, Status, apply, final_replies, reply_for
from .protocol import messages


# What the child that had the message live still gets at its end.
_END_OF_MESSAGE_ONLY = ((stages.END_OF_MESSAGE, messages.END_OF_MESSAGE),)


class _Stopped:
    """The outcome of a replay that a stopper ended."""

    __slots__ = ("stage", "stop")

    def __init__(self, stage, stop):
        self.stage = stage
        self.stop = stop


class MessageChain:
    """One message on its way through the children that take part in it.

    chain: the children still in the message, in configuration order; live:
    the one that gets it as it comes (None once it left). changes: the
    original headers and every edit so far (a merge.Changes). verdicts:
    (status, child name) of the children done with the message.
    """

    log = Logger()

    def __init__(self, session, chain, max_memory, chunk_size):
        self.session = session
        self.chain = chain
        self.live = chain[0] if chain else None
        self.changes = Changes(HeaderList())
        self.body = BodyBuffer(max_memory)
        self.max_memory = max_memory
        self.chunk_size = chunk_size
        self.end_of_headers = False
        self.verdicts = []
        self.open = True  # False once the message ended, however it did
        self._progress = None

    def close(self):
        """Free the body (memory or temporary file) and stop the progress replies."""
        self.open = False
        self._stop_progress()
        self.body.close()
        if self.changes.body is not None:
            self.changes.body.close()

    # ------------------------------------------------------------ live

    def live_command(self, stage, command, macros):
        """Keep a header or body chunk (or the end of headers) and send it to the live child."""
        if stage is stages.HEADER:
            self.changes.headers.append(command.name, command.value)
        elif stage is stages.BODY:
            self.body.append(command.chunk)
        else:
            self.end_of_headers = True
        child = self.live
        if child is None:
            if not self.chain and not self.verdicts:
                return self.session.no_child_reply(stage)  # nobody takes part
            return messages.CONTINUE
        if stage is stages.BODY and child.state is ChildState.SKIPPING_BODY:
            return messages.CONTINUE
        runner = self.session.stoppers
        if runner is not None and child.stoppers is not None:
            stop = runner.decide(child, stage, command)
            if stop is not False:
                if isinstance(stop, defer.Deferred):
                    return stop.addCallback(self._live_decided, stage, command, macros, child)
                return self._live_stopped(child, stage, stop)
        return self._send_live(child, stage, command, macros)

    def _send_live(self, child, stage, command, macros):
        session = self.session
        started = session.clock.seconds() if session.observer is not None else None
        d = child.send(command, macros.message(stage.code))
        return d.addBoth(self._live_answered, child, stage, started)

    def _live_decided(self, stop, stage, command, macros, child):
        if stop is None or not self.open or self.live is not child:
            return messages.CONTINUE  # the MTA went away meanwhile
        if stop:
            return self._live_stopped(child, stage, stop)
        return self._send_live(child, stage, command, macros)

    def _live_stopped(self, child, stage, stop):
        """The live child was stopped: the rest get the message replayed."""
        self._stopped(child, stage, stop)
        return self._live_left(stage)

    def _live_answered(self, result, child, stage, started):
        if not self.open:
            return messages.CONTINUE  # the MTA aborted meanwhile
        status, reply = self.session.judge(child, stage, result, started)
        if status is Status.CONTINUE:
            return messages.CONTINUE
        if status is Status.SKIP:
            child.skip_body()
            return messages.CONTINUE
        if status >= Status.TEMPORARY_FAILURE:
            self.session.end_message(stage, status, child.name)
            return reply_for(status, reply)
        self.verdicts.append((status, child.name))  # accept: it leaves the message
        self._leave(child)
        return self._live_left(stage)

    def _live_left(self, stage):
        """The live child left: with no child left in the message, the MTA gets the verdict now.

        Otherwise the MTA would stream the rest of the message for nobody.
        """
        if self.chain:
            return messages.CONTINUE
        status, decided_by = max(self.verdicts, key=_status)
        self.session.end_message(stage, status, decided_by)
        return reply_for(status)

    def _leave(self, child):
        """child is done with the message; the rest get it replayed at its end."""
        self.chain.remove(child)
        child.leave_message()
        if self.live is child:
            self.live = None

    def _stopped(self, child, stage, stop):
        """A stopper stopped child in the message: it counts as accepting and is aborted."""
        self.session.note_stop(child, stage, stop)
        child.abort()
        self.verdicts.append((Status.ACCEPT, child.name))
        if child in self.chain:
            self._leave(child)

    # ------------------------------------------------------------ end of message

    def end_of_message(self, macros):
        """Run the chain to its end; the MTA's answer, or a Deferred of it."""
        if not self.chain and not self.verdicts:
            return self.session.no_child_reply(stages.END_OF_MESSAGE)  # nobody takes part
        interval = self.session.progress_interval
        if interval:
            self._progress = self.session.clock.callLater(interval, self._progress_due, interval)
        d = self._run(macros)
        d.addErrback(self._failed)
        return d.addBoth(self._done)

    def _run(self, macros):
        """Each child in turn gets the message as the ones before left it; a Deferred of the MTA's answer."""
        chain = self.chain
        live = self.live
        if (len(chain) == 1 and chain[0] is live
                and (self.session.stoppers is None or live.stoppers is None)):
            return self._end_live(live, macros)
        return self._replay(macros)

    def _end_live(self, child, macros):
        """The chain is the live child alone, and no stopper asks: it only needs the end of message.

        What _replay and _send_each do for it, without inlineCallbacks, on
        the path of most messages: two generators and their Deferreds less
        per message (and on Twisted 22.4, their reference cycles).
        Cancelling the Deferred cancels the child's, as theirs did.
        """
        started = self.session.clock.seconds() if self.session.observer is not None else None
        try:
            d = child.send(messages.END_OF_MESSAGE, macros.message(stages.END_OF_MESSAGE.code))
        except Exception:
            d = defer.fail()
        return d.addBoth(self._live_ended, child, started)

    def _live_ended(self, response, child, started):
        if isinstance(response, Failure) and response.check(defer.CancelledError):
            return response  # the MTA went away: the session's close() cleans up
        if not self.open:
            raise defer.CancelledError()
        status, reply = self.session.judge(child, stages.END_OF_MESSAGE, response, started)
        if isinstance(response, Failure):
            reply = response = None
        ended = self._child_ended(child, status, reply, response)
        return ended if ended is not None else self._verdict()

    @defer.inlineCallbacks
    def _replay(self, macros):
        """The chain in general: the live child ends, each later one is replayed the message."""
        for child in list(self.chain):
            if child is self.live:
                commands = _END_OF_MESSAGE_ONLY
            else:
                commands = self._replayed()
            outcome = yield self._send_each(child, commands, macros)
            if isinstance(outcome, _Stopped):
                self._stopped(child, outcome.stage, outcome.stop)
                continue
            _, status, reply, response = outcome
            ended = self._child_ended(child, status, reply, response)
            if ended is not None:
                return ended
        return self._verdict()

    def _child_ended(self, child, status, reply, response):
        """child is done with the message: the MTA's answer if that ends it, else None."""
        if status >= Status.TEMPORARY_FAILURE:
            self.session.end_message(stages.END_OF_MESSAGE, status, child.name)
            return reply_for(status, reply)
        self.verdicts.append((status, child.name))
        child.leave_message()  # (the chain is over: no need to take it out of it)
        if response is not None and response.modifications:
            self._apply(child, response.modifications)
        return None

    def _verdict(self):
        """Every child is done and none ended the message: the merged verdict and edits."""
        status, decided_by = max(self.verdicts, key=_status)
        replies = final_replies(status, self.changes)  # before ending frees the body
        self.session.end_message(stages.END_OF_MESSAGE, status, decided_by)
        return replies

    def _replayed(self):
        """(stage, command) of the message as it stands now, in order."""
        for name, value in self.changes.headers:
            yield stages.HEADER, messages.Header(name, value)
        if self.end_of_headers:
            yield stages.END_OF_HEADERS, messages.END_OF_HEADERS
        body = self.changes.body if self.changes.body is not None else self.body
        for chunk in body.chunks(self.chunk_size):
            yield stages.BODY, messages.Body(chunk)
        yield stages.END_OF_MESSAGE, messages.END_OF_MESSAGE

    @defer.inlineCallbacks
    def _send_each(self, child, commands, macros):
        """Send child each (stage, command), asking its stoppers first, until it decides.

        Fires with _Stopped, or (stage, status, reply code, Response) for
        what ended its part: its answer to end of message, a verdict other
        than continue (or skip) before it, or its fallback (Response None)
        when it failed. Fails with CancelledError if the MTA went away.
        """
        runner = self.session.stoppers
        asks = runner is not None and child.stoppers is not None
        observed = self.session.observer is not None
        for stage, command in commands:
            if stage is stages.BODY and child.state is ChildState.SKIPPING_BODY:
                continue
            if asks:
                stop = runner.decide(child, stage, command)
                if isinstance(stop, defer.Deferred):
                    stop = yield stop
                    if stop is None:
                        raise defer.CancelledError()  # the MTA went away
                if not self.open:
                    raise defer.CancelledError()
                if stop:
                    return _Stopped(stage, stop)
            started = self.session.clock.seconds() if observed else None
            try:
                response = yield child.send(command, macros.message(stage.code))
            except defer.CancelledError:
                raise  # the MTA went away: the session's close() cleans up
            except Exception:
                response = Failure()
            if not self.open:
                raise defer.CancelledError()
            status, reply = self.session.judge(child, stage, response, started)
            if isinstance(response, Failure):
                return stage, status, None, None
            if stage is stages.END_OF_MESSAGE:
                return stage, status, reply, response
            if status is Status.SKIP:
                child.skip_body()
            elif status is not Status.CONTINUE:
                return stage, status, reply, None
        raise AssertionError("the commands end with END_OF_MESSAGE")

    def _apply(self, child, modifications):
        """Apply a child's edits to the message the next child will see."""
        before = self.changes.body
        self.changes = apply(self.changes, child.allowed_edits(modifications, "end-of-message"))
        body = self.changes.body
        if body is not before:
            if before is not None:
                before.close()
            if body.size > self.max_memory:
                # Past the bound, a replaced body waits for the next children on disk.
                spooled = BodyBuffer(self.max_memory)
                for chunk in body.chunks(self.chunk_size):
                    spooled.append(chunk)
                self.changes = replace(self.changes, body=spooled)

    def _failed(self, failure):
        if failure.check(defer.CancelledError):
            return failure
        self.log.failure("[session][error] end of message failed", failure)
        return self.session.no_child_reply(stages.END_OF_MESSAGE)

    def _done(self, result):
        self._stop_progress()
        return result

    def _progress_due(self, interval):
        """The end of message still runs: tell the MTA, and again after interval unless that failed.

        One timer set again each time, not a LoopingCall: most ends of message
        are over long before the first, and a LoopingCall costs a Deferred
        and a dozen calls to start and stop for each of them.
        """
        self._progress = None
        try:
            self.session.server.progress()
        except Exception:
            self.log.failure("[session][error] progress to the MTA failed")
            return
        self._progress = self.session.clock.callLater(interval, self._progress_due, interval)

    def _stop_progress(self):
        if self._progress is not None:
            self._progress.cancel()
            self._progress = None


def _status(verdict):
    return verdict[0]
