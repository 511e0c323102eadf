"""One child milter as seen by one MTA session: its connection, options and message state."""

from twisted.logger import Logger

from . import client
from .merge import Status, status_of
from .protocol import constants as c
from .protocol import messages
from .protocol.messages import Macro

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


def _bare(name):
    """A macro name without braces: b"{i}" and b"i" are the same macro."""
    return name[1:-1] if name[:1] == b"{" and name[-1:] == b"}" else name


class Child:
    """A child milter for one MTA connection.

    alive: connected and negotiated, not yet quit or failed.
    in_message: takes part in the current message.
    recipients: recipients it accepted in the current message.

    For applicable conditions (see miltermanager.conditions.context):
    stoppers: stopper kind -> its Hooks, from the conditions the child
    applies; None when it has none, and then nothing below is kept.
    verdict: its last real verdict (before evaluation mode); stopped: a
    stopper stopped it; accepted: the recipients it accepted this
    transaction (str). Macros a stopper set go out with every command.
    """

    log = Logger()

    # Set on the instance only when conditions need them: a child without
    # stoppers pays nothing for them.
    stoppers = None
    context = None
    verdict = Status.NOT_CHANGE
    stopped = False
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
        self.connection = None
        self.options = None
        self.alive = False
        self.in_message = False
        self.recipients = 0
        self.skip_body = False
        # Set when the MTA gives header values with their leading space and this child
        # wants them without: strip one going out, add one to its edits coming back.
        self.convert_leading_space = False
        self._macro_filters = {}

    def __repr__(self):
        return f"<Child {self.name}>"

    # ------------------------------------------------------------ connection

    def start(self, offer):
        """Connect and negotiate; fire with the child's Negotiate reply.

        A failure is logged and fires None: the child is then not alive.
        """
        d = client.connect(self._reactor, self.config.connection_spec,
                           self.config.timeouts, self._clock)
        d.addCallback(self._negotiate, offer)
        d.addCallbacks(self._negotiated, self._failed_to_start)
        return d

    def _negotiate(self, connection, offer):
        self.connection = connection
        return connection.negotiate(offer)

    def _negotiated(self, options):
        self.options = options
        self.alive = True
        for stage, names in options.macros.items():
            command = c.MACRO_STAGE_COMMANDS.get(stage)
            if command is not None:
                self._macro_filters[command] = frozenset(_bare(name) for name in names)
        return self.connection.negotiate_reply

    def _failed_to_start(self, failure):
        self.log.error(
            "[children][error][negotiate][{fallback}] {name}: {error}",
            name=self.name, fallback=self.fallback_status.label,
            error=failure.getErrorMessage())
        self.expire()
        return None

    def expire(self):
        """Stop using this child for the rest of the MTA connection."""
        self.alive = False
        self.in_message = False
        if self.connection is not None:
            self.connection.close()

    # ------------------------------------------------------------ commands

    def send(self, command, macros=None):
        """Send command with its stage's macros; fire with a Response or None."""
        macro = None
        if self._set_macros is not None:
            macros = {**macros, **self._set_macros} if macros else self._set_macros
        if macros:
            macro = self._macro_for(command.code, macros)
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

    def abort(self):
        """Abandon the current message at this child."""
        if self.in_message and self.alive:
            # Nothing waits for it; if the connection ends before it goes out, so be it.
            self.connection.send(messages.ABORT).addErrback(_ignore)
        self.in_message = False

    def quit(self):
        """Say goodbye: the MTA connection ends or this child is done with it."""
        self.alive = False
        self.in_message = False
        if self.connection is not None:
            self.connection.close()

    # ------------------------------------------------------------ replies

    def status_of(self, response):
        """The Status a Response counts for in the merge (evaluation mode applied)."""
        if response is None:
            return Status.CONTINUE
        status = status_of(response.reply)
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
