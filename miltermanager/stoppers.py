"""Asking a child's stoppers (from its applicable conditions) before it gets a command.

A stopper is a function an applicable condition registers
(miltermanager.conditions.context documents what each kind is called
with). The session has one StopperRunner when any child has stoppers; a
child without them never gets here. What a stop means depends on the stage:
at connect or HELO the child counts as accepting and quits for the SMTP
connection without getting the command; at MAIL it accepts and sits out
the transaction; at RCPT it only misses that recipient (no verdict; with
no recipient left it is aborted at DATA); at DATA (envelope and data
stoppers), header, end of header, body or end of message it accepts, is
aborted, and the message goes on with the other children. The envelope
fan-out (miltermanager.envelope) and the message chain
(miltermanager.message) apply it.
"""

from inspect import iscoroutine

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import stages
from .conditions.context import (
    ChildContext, ChildStatus, ChildStatuses, SessionFacts, SocketAddress, text,
)


def stoppers_of(milter, conditions):
    """{stopper kind: tuple of (condition name, Hook)} for a child, or None when it has none.

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
                stoppers.setdefault(hook.kind, []).append((name, hook))
    return {kind: tuple(hooks) for kind, hooks in stoppers.items()} or None


class Stop:
    """A stopper said stop: which condition, which stopper (a config Hook)."""

    __slots__ = ("condition", "hook")

    def __init__(self, condition, hook):
        self.condition = condition
        self.hook = hook

    @property
    def origin(self):
        return origin(self.hook)

    def __repr__(self):
        return f"<Stop {self.condition}: {self.hook.name}>"


def origin(hook):
    """Where a stopper was defined, FILE:LINE, for the log."""
    if hook.origin:
        return hook.origin
    code = getattr(hook.function, "__code__", None)
    if code is None:
        return repr(hook.function)
    return f"{code.co_filename}:{code.co_firstlineno}"


_TIMED_OUT = object()


def _timed_out(result, seconds):
    """addTimeout's onTimeoutCancel: tell our own timeout from a stopper's TimeoutError."""
    return _TIMED_OUT


def _first_stop(results):
    """Several stoppers' answers as one: a Stop wins; a cancelled one (None) ends it."""
    answers = [answer for _, answer in results]
    for answer in answers:
        if answer:
            return answer
    return None if None in answers else False


class StopperRunner:
    """Asks the stoppers of one session's children, with the facts they read.

    decide() answers False (go on), a Stop, or a Deferred firing with one
    of them, or with None when it was cancelled because the MTA went away.
    Stoppers returning Deferreds (or coroutines) run side by side, each
    bounded by the child's reading timeout; one that raises, fails or times
    out is logged with where it was defined and counts as "don't stop".
    """

    log = Logger()

    def __init__(self, children, conditions, macros, processing_sessions, clock):
        self.clock = clock
        self.facts = SessionFacts(macros, ChildStatuses({child.name: child for child in children}),
                                  processing_sessions)
        self.any = False  # some child has stoppers
        for child in children:
            # Every configured child shows in children, also those that will fail to start.
            child.status_view = ChildStatus(child)
            child.stoppers = stoppers_of(child.config, conditions)
            if child.stoppers is not None:
                self.any = True
                child.context = ChildContext(child, self.facts)
                child.accepted = []
                child.stopper_timeout = child.config.timeouts.reading
        self._asking = set()  # stoppers' Deferreds not fired yet

    # ------------------------------------------------------------ facts

    def note(self, stage, command):
        """Keep what the client said in command (of stage) for the stoppers to read."""
        facts = self.facts
        if stage is stages.RCPT:
            facts.recipient = text(command.recipient)
        elif stage is stages.MAIL:
            facts.new_transaction()
            facts.envelope_from = text(command.sender)
        elif stage is stages.CONNECT:
            facts.host = text(command.hostname)
            facts.socket_address = SocketAddress.from_connect(command)
        elif stage is stages.HELO:
            facts.helo = text(command.name)

    def new_transaction(self, children):
        """MAIL or an abort: a new shelf; each child's transaction macros and evaluation mode
        are as configured again."""
        self.facts.new_transaction()
        for child in children:
            if child.stoppers is not None:
                child.accepted = []
                child.forget_macros()
                child.evaluation = child.config.evaluation_mode  # a stopper may have set it

    # ------------------------------------------------------------ asking

    def decide(self, child, stage, command):
        """Whether child stops before it gets command: False, a Stop, or a Deferred of either.

        The stoppers of each kind the stage has are asked in turn (at DATA:
        the envelope stoppers, then the data stoppers).
        """
        return self._decide(child, stage.stoppers, command)

    def _decide(self, child, kinds, command):
        stoppers = child.stoppers
        for index, kind in enumerate(kinds):
            hooks = stoppers.get(kind)
            if not hooks:
                continue
            stop = self._ask(child, kind, hooks, self._arguments(child, kind, command))
            if stop is False:
                continue
            if not isinstance(stop, defer.Deferred):
                return stop
            rest = kinds[index + 1:]
            if not rest:
                return stop
            return stop.addCallback(self._decided_kind, child, rest, command)
        return False

    def _decided_kind(self, stop, child, rest, command):
        return self._decide(child, rest, command) if stop is False else stop

    def _arguments(self, child, kind, command):
        """A stopper's arguments, as the child would get the command."""
        facts = self.facts
        if kind == "header":
            value = command.value
            if child.convert_leading_space and value[:1] == b" ":
                value = value[1:]
            return text(command.name), text(value)
        if kind == "body":
            return (bytes(command.chunk),)
        if kind == "envelope_recipient":
            return (facts.recipient,)
        if kind == "envelope_from":
            return (facts.envelope_from,)
        if kind == "envelope":
            return facts.envelope_from, list(child.accepted)
        if kind == "connect":
            return facts.host, facts.socket_address
        if kind == "helo":
            return (facts.helo,)
        return ()

    def _ask(self, child, kind, hooks, arguments):
        """Call the stoppers of one kind; a Stop, False, or a Deferred of either.

        A true result decides at once (later stoppers are not called).
        """
        context = child.context
        context._transaction = kind != "connect" and kind != "helo"
        pending = None
        for condition, hook in hooks:
            try:
                result = hook.function(context, *arguments)
                if iscoroutine(result):
                    result = defer.ensureDeferred(result)
            except Exception:
                self._failed(Failure(), child, hook, kind)
                continue
            if isinstance(result, defer.Deferred):
                if pending is None:
                    pending = []
                pending.append(self._bounded(result, child, condition, hook, kind))
            elif result:
                for d in pending or ():
                    d.cancel()
                return Stop(condition, hook)
        if pending is None:
            return False
        if len(pending) == 1:
            return pending[0]
        return defer.DeferredList(pending).addCallback(_first_stop)

    def _bounded(self, d, child, condition, hook, kind):
        """d fires a Stop or False within the child's timeout (None if cancelled); never fails."""
        seconds = child.stopper_timeout
        d.addTimeout(seconds, self.clock, onTimeoutCancel=_timed_out)
        d.addCallbacks(self._answered, self._failed,
                       callbackArgs=(child, condition, hook, kind, seconds),
                       errbackArgs=(child, hook, kind))
        self._asking.add(d)
        return d.addBoth(self._asked, d)

    def _asked(self, stop, d):
        self._asking.discard(d)
        return stop

    def _answered(self, stop, child, condition, hook, kind, seconds):
        if stop is _TIMED_OUT:
            self.log.error(
                "[stopper][timeout][{kind}] {name}: {origin}: {stopper} gave no answer "
                "in {seconds} s; not stopping", kind=kind, name=child.name,
                origin=origin(hook), stopper=hook.name, seconds=seconds)
            return False
        return Stop(condition, hook) if stop else False

    def _failed(self, failure, child, hook, kind):
        """Log a stopper's failure; it counts as "don't stop" (None: it was cancelled)."""
        if failure.check(defer.CancelledError):
            return None  # decided without it, or the MTA went away
        self.log.failure(
            "[stopper][error][{kind}] {name}: {origin}: {stopper} failed; not stopping",
            failure, kind=kind, name=child.name, origin=origin(hook), stopper=hook.name)
        return False

    def cancel(self):
        """The MTA went away: stop waiting for every stopper still at work."""
        for d in list(self._asking):
            d.cancel()
