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
