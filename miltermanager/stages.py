"""The stages of a milter conversation in one table: command, event name, log nick, stoppers.

Every part of the manager names a stage through this table, so the command
code b"M", the IMilter method "mail", upstream's log nick "envelope-from",
the stopper kind "envelope_from" and the symbol-list index 2 are one Stage.
"""

from .protocol import constants as c


class Stage:
    """One stage: the milter event of one command (and the two ends of a conversation).

    code: the command byte (None for CLOSED). name: the IMilter method and the event's name in
    scripts and tests. nick: upstream's state nick, used in log tags and
    statistics. stoppers: the stopper kinds asked, in order, before a child
    gets the command. envelope: sent to every child at once (the rest form
    the message, chained through the children). symbol_list: the index of
    the stage in a negotiation symbol list (SMFIM_*), or None.
    """

    __slots__ = ("code", "name", "nick", "stoppers", "envelope", "symbol_list")

    def __init__(self, code, name, nick, stoppers, envelope):
        self.code = code
        self.name = name
        self.nick = nick
        self.stoppers = stoppers
        self.envelope = envelope
        self.symbol_list = c.MACRO_STAGE_INDEXES.get(code)

    def __repr__(self):
        return f"<Stage {self.name}>"


NEGOTIATE = Stage(c.NEGOTIATE, "negotiate", "negotiate", (), False)
# The conversation is over (QUIT, or the connection ended).
CLOSED = Stage(None, "closed", "quit", (), False)
CONNECT = Stage(c.CONNECT, "connect", "connect", ("connect",), True)
HELO = Stage(c.HELO, "helo", "helo", ("helo",), True)
MAIL = Stage(c.MAIL, "mail", "envelope-from", ("envelope_from",), True)
RCPT = Stage(c.RCPT, "rcpt", "envelope-recipient", ("envelope_recipient",), True)
# At DATA the envelope stoppers (sender and every recipient) come before the data stoppers.
DATA = Stage(c.DATA, "data", "data", ("envelope", "data"), True)
UNKNOWN = Stage(c.UNKNOWN, "unknown", "unknown", (), True)
HEADER = Stage(c.HEADER, "header", "header", ("header",), False)
END_OF_HEADERS = Stage(c.END_OF_HEADERS, "end_of_headers", "end-of-header",
                       ("end_of_header",), False)
BODY = Stage(c.BODY, "body", "body", ("body",), False)
END_OF_MESSAGE = Stage(c.END_OF_MESSAGE, "end_of_message", "end-of-message",
                       ("end_of_message",), False)

# The events an IMilter gets after negotiation, in protocol order.
EVENTS = (CONNECT, HELO, MAIL, RCPT, DATA, UNKNOWN, HEADER, END_OF_HEADERS, BODY,
          END_OF_MESSAGE)
BY_NAME = {event.name: event for event in (NEGOTIATE, *EVENTS, CLOSED)}
BY_SYMBOL_LIST = {event.symbol_list: event for event in EVENTS
                  if event.symbol_list is not None}
# The stages of the SMTP connection itself, before any transaction: a verdict there is
# for the whole connection, and only a message can be discarded, not these.
CONNECTION = (CONNECT, HELO)
# Message-phase events, in the order the message replays them.
MESSAGE = (HEADER, END_OF_HEADERS, BODY, END_OF_MESSAGE)
