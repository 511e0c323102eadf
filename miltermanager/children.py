"""One child milter as seen by one MTA session: its state, connection, options and replies."""

import enum

from twisted.internet import defer, error
from twisted.logger import Logger

from . import client, stages
from .events import Cause
from .merge import Status, status_of
from .protocol import constants as c
from .protocol import messages
from .protocol.errors import ProtocolError, ReplyCodeError
from .protocol.messages import Macro
from .protocol import replycode

# The edits that carry a header value.
_HEADER_EDITS = (messages.AddHeader, messages.InsertHeader, messages.ChangeHeader)

# Modification -> the action flag the child must have negotiated for it.
ACTION_FLAGS = {
    messages.AddHeader: c.SMFIF_ADDHDRS,
    messages.InsertHeader: c.SMFIF_ADDHDRS,
    messages.ChangeHeader: c.SMFIF_CHGHDRS,
    messages.AddRecipient: c.SMFIF_ADDRCPT,
    messages.AddRecipientPar: c.SMFIF_ADDRCPT_PAR,
    messages.DeleteRecipient: c.SMFIF_DELRCPT,
    messages.ChangeFrom: c.SMFIF_CHGFROM,
    messages.ReplaceBody: c.SMFIF_CHGBODY,
    messages.Quarantine: c.SMFIF_QUARANTINE,
}


class ChildState(enum.Enum):
    """Where a child is in the MTA connection; the session checks it before every command."""

    STARTING = "starting"  # connecting and negotiating
    CONNECTED = "connected"  # in the SMTP connection, outside any transaction
    IN_MESSAGE = "in-message"  # takes part in the current transaction (from MAIL on)
    SKIPPING_BODY = "skipping-body"  # in the message, but asked for no more body (SKIP)
    QUIT = "quit"  # done with the SMTP connection: its verdict, a stopper, or the end
    FAILED = "failed"  # its fallback stood in for it; it takes no further part


# The states of a child that takes part in the connection, and in the transaction. Tuples:
# a member is found by identity, where a set would call Enum.__hash__ (Python code).
ALIVE = (ChildState.CONNECTED, ChildState.IN_MESSAGE, ChildState.SKIPPING_BODY)
IN_MESSAGE = (ChildState.IN_MESSAGE, ChildState.SKIPPING_BODY)


class BogusReply(ProtocolError):
    """A child's reply that the MTAs refuse from a filter at that stage: never forwarded."""


def cause_of(failure):
    """The events.Cause of a child's failure (a twisted Failure)."""
    if failure.check(client.MilterTimeoutError, defer.TimeoutError, error.TimeoutError):
        return Cause.TIMEOUT
    if failure.check(client.MilterConnectError):
        return Cause.UNREACHABLE
    if failure.check(ProtocolError):
        return Cause.PROTOCOL
    if failure.check(error.ConnectionLost, error.ConnectionDone):
        return Cause.DISCONNECTED
    return Cause.ERROR


def _bare(name):
    """A macro name without braces: b"{i}" and b"i" are the same macro."""
    return name[1:-1] if name[:1] == b"{" and name[-1:] == b"}" else name


class Child:
    """A child milter for one MTA connection.

    state: a ChildState. recipients: recipients it accepted in the current
    message. verdict: its last real verdict in this transaction (before
    evaluation mode). stopped_by: the name of the condition that stopped
    it in this transaction (or for the whole connection, at connect or
    HELO), None if none did.

    For applicable conditions (see miltermanager.stoppers): stoppers is
    stopper kind -> its (condition, Hook) pairs, None when it has none (and
    then nothing below is kept); accepted: the recipients it accepted this
    transaction (str). Macros a stopper set go out with every command.
    """

    log = Logger()

    # Set on the instance only when conditions need them: a child without
    # stoppers pays nothing for them.
    stoppers = None
    context = None
    accepted = None
    status_view = None
    stopper_timeout = None
    # Macros stoppers set: for the connection, for the transaction, and both merged.
    _connection_macros = None
    _transaction_macros = None
    _set_macros = None

    def __init__(self, config, reactor, clock):
        self.config = config
        self.name = config.name
        self.evaluation = config.evaluation_mode
        self.fallback_status = config.fallback_status
        self._reactor = reactor
        self._clock = clock
        self.state = ChildState.STARTING
        self.connection = None
        self.options = None
        self.recipients = 0
        self.verdict = Status.NOT_CHANGE
        self.stopped_by = None
        # Set when the MTA gives header values with their leading space and this child
        # wants them without: strip one going out, add one to its edits coming back.
        self.convert_leading_space = False
        self._macro_filters = {}

    def __repr__(self):
        return f"<Child {self.name} {self.state.value}>"

    @property
    def alive(self):
        """Connected and negotiated, not yet quit or failed."""
        return self.state in ALIVE

    @property
    def in_message(self):
        """Takes part in the current transaction."""
        return self.state in IN_MESSAGE

    # ------------------------------------------------------------ connection

    def start(self, offer):
        """Connect and negotiate; fire with the child's Negotiate reply.

        A failure fails the Deferred (CancelledError when the MTA went away
        meanwhile): the caller decides what it means and calls fail().
        """
        d = client.connect(self._reactor, self.config.connection_spec,
                           self.config.timeouts, self._clock)
        return d.addCallback(self._negotiate, offer).addCallback(self._negotiated)

    def _negotiate(self, connection, offer):
        self.connection = connection
        if self.state is not ChildState.STARTING:
            connection.close()  # the MTA went away while we connected
            raise defer.CancelledError()
        return connection.negotiate(offer)

    def _negotiated(self, options):
        self.options = options
        self.state = ChildState.CONNECTED
        for index, names in options.macros.items():
            stage = stages.BY_SYMBOL_LIST.get(index)
            if stage is not None:
                self._macro_filters[stage.code] = frozenset(_bare(name) for name in names)
        return self.connection.negotiate_reply

    def fail(self):
        """Stop using this child for the rest of the MTA connection: its fallback stands in."""
        self.state = ChildState.FAILED
        if self.connection is not None:
            self.connection.close()

    def fallback(self):
        """The Status the child's fallback_status counts for (evaluation mode applied)."""
        status = self.fallback_status
        if self.evaluation and status >= Status.TEMPORARY_FAILURE:
            self.log.info("[children][evaluation][fallback][{status}] {name}: not applied",
                          status=status.label, name=self.name)
            return Status.ACCEPT
        return status

    # ------------------------------------------------------------ transactions

    def join_message(self):
        """MAIL: take part in the new transaction."""
        if self.state is ChildState.CONNECTED:
            self.state = ChildState.IN_MESSAGE
            self.recipients = 0

    def leave_message(self):
        """Done with this transaction (accepted, stopped, or its verdict ended it for it)."""
        if self.state in IN_MESSAGE:
            self.state = ChildState.CONNECTED

    def skip_body(self):
        """It answered SKIP to a body chunk: no more body for it in this message."""
        if self.state is ChildState.IN_MESSAGE:
            self.state = ChildState.SKIPPING_BODY

    def abort(self):
        """Abandon the current message at this child."""
        if self.state in IN_MESSAGE:
            # Nothing waits for it; if the connection ends before it goes out, so be it.
            self.connection.send(messages.ABORT).addErrback(_ignore)
            self.state = ChildState.CONNECTED

    def quit(self):
        """Say goodbye: the MTA connection ends or this child is done with it."""
        if self.state is not ChildState.FAILED:
            self.state = ChildState.QUIT
        if self.connection is not None:
            self.connection.close()

    # ------------------------------------------------------------ commands

    def send(self, command, macro=None):
        """Send command with its stage's macros (the MTA's Macro, or None); fire with a Response or None.

        The MTA's Macro goes on as it came unless this child asked for some
        macros only or a stopper set some of its own.
        """
        if self._set_macros is not None:
            macros = macro.macros if macro is not None else None
            macros = {**macros, **self._set_macros} if macros else self._set_macros
            macro = self._macro_for(command.code, macros)
        elif macro is not None and command.code in self._macro_filters:
            macro = self._macro_for(command.code, macro.macros)
        if self.convert_leading_space and command.code == c.HEADER:
            value = command.value
            if value[:1] == b" ":
                command = messages.Header(command.name, value[1:])
        return self.connection.send(command, macro)

    def _macro_for(self, stage, macros):
        """The Macro packet for stage, holding only the macros this child asked for."""
        wanted = self._macro_filters.get(stage)
        if wanted is not None:
            macros = {name: value for name, value in macros.items()
                      if _bare(name) in wanted}
            if not macros:
                return None
        return Macro(stage, macros)

    def own_macro(self, name):
        """The value a stopper set for macro name (as macro_name gives it), or None."""
        own = self._set_macros
        return None if own is None else own.get(name)

    def set_macro(self, name, value, transaction):
        """Send macro name with every later command; value None forgets it.

        transaction: forget it at the end of the transaction (forget_macros).
        """
        if value is None:
            for macros in (self._connection_macros, self._transaction_macros):
                if macros:
                    macros.pop(name, None)
        elif transaction:
            if self._transaction_macros is None:
                self._transaction_macros = {}
            self._transaction_macros[name] = value
        else:
            if self._connection_macros is None:
                self._connection_macros = {}
            self._connection_macros[name] = value
        self._merge_macros()

    def forget_macros(self):
        """The transaction is over: forget the macros set for it."""
        if self._transaction_macros:
            self._transaction_macros = None
            self._merge_macros()

    def _merge_macros(self):
        merged = {**(self._connection_macros or {}), **(self._transaction_macros or {})}
        self._set_macros = merged or None

    # ------------------------------------------------------------ replies

    def status_of(self, response, stage):
        """The Status a Response to the command of stage counts for (evaluation mode applied).

        A reply the MTAs refuse from a filter raises BogusReply (the caller
        treats it as this child's protocol error): SHUTDOWN anywhere, DISCARD
        at connect or HELO, a reply code that is not a valid SMTP reply. A
        valid reply code is normalised in place (a lone % doubled).
        """
        if response is None:
            return Status.CONTINUE
        reply = response.reply
        code = reply.code
        if code == c.REPLY_CODE:
            try:
                text = replycode.normalize(reply.text)
            except ReplyCodeError as problem:
                raise BogusReply(str(problem)) from None
            if text != reply.text:
                response.reply = reply = messages.ReplyCode(text)
        elif code == c.SHUTDOWN:
            raise BogusReply("shutdown (4) is not a reply the MTAs take from a filter")
        elif code == c.DISCARD and stage in stages.CONNECTION:
            raise BogusReply(f"discard at {stage.nick}: only a message can be discarded")
        status = status_of(reply)
        self.verdict = status
        if self.evaluation and status >= Status.TEMPORARY_FAILURE:
            self.log.info("[children][evaluation][{status}] {name}: not applied",
                          status=status.label, name=self.name)
            return Status.ACCEPT
        return status

    def allowed_edits(self, modifications, stage):
        """The modifications this child may make: negotiated, and not in evaluation mode."""
        allowed = []
        for edit in modifications:
            if self.evaluation:
                self.log.info("[children][evaluation][{stage}] {name}: {edit!r} not applied",
                              stage=stage, name=self.name, edit=edit)
                continue
            flag = ACTION_FLAGS.get(type(edit))
            if flag is None or not self.options.actions & flag:
                self.log.error("[children][error][{stage}] {name}: {edit!r} dropped: "
                               "its action was not negotiated",
                               stage=stage, name=self.name, edit=edit)
                continue
            if self.convert_leading_space and isinstance(edit, _HEADER_EDITS) and edit.value:
                edit = _with_leading_space(edit)
            allowed.append(edit)
        return allowed


def _ignore(failure):
    return None


def _with_leading_space(edit):
    if isinstance(edit, messages.AddHeader):
        return messages.AddHeader(edit.name, b" " + edit.value)
    return type(edit)(edit.index, edit.name, b" " + edit.value)
