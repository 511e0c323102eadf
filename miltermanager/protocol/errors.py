"""Errors raised by the milter codec; each names what was wrong with the input."""


class ProtocolError(Exception):
    """The peer sent something the milter protocol does not allow."""


class FrameError(ProtocolError):
    """A packet's length field is impossible (zero or over the maximum)."""


class UnknownCodeError(ProtocolError):
    """A packet carries a command or reply byte this direction does not know."""

    def __init__(self, code, direction):
        super().__init__(f"unknown {direction} code {code!r}")
        self.code = code


class PayloadError(ProtocolError):
    """A packet's payload does not have the layout its code requires."""


class NegotiationError(ProtocolError):
    """Option negotiation failed: the versions or flags do not fit."""


class ReplyCodeError(PayloadError):
    """A milter's SMFIR_REPLYCODE text is not an SMTP reply both MTAs take.

    The message names the text (shortened) and what is wrong with it, on one
    line; text and reason are kept for callers.
    """

    def __init__(self, text, reason):
        shown = text if len(text) <= 80 else text[:80] + b"..."
        super().__init__(f"invalid SMTP reply {shown!r}: {reason}")
        self.text = text
        self.reason = reason
