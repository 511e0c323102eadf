"""The milter wire protocol without I/O: framing, messages, negotiation, reply codes.

Both the MTA-facing server and the child-facing client use it; nothing here
touches a socket or a reactor. The message classes live in `messages`.
"""

from . import constants, messages, negotiation, replycode
from .errors import (
    FrameError, NegotiationError, PayloadError, ProtocolError, ReplyCodeError,
    UnknownCodeError,
)
from .framing import FrameDecoder, encode_frame
from .messages import COMMAND_TYPES, REPLY_TYPES, decode_command, decode_reply
from .negotiation import Options, accept, answer, offer, protocol_for_version

__all__ = [
    "constants", "messages", "negotiation", "replycode",
    "FrameError", "NegotiationError", "PayloadError", "ProtocolError", "ReplyCodeError",
    "UnknownCodeError",
    "FrameDecoder", "encode_frame",
    "COMMAND_TYPES", "REPLY_TYPES", "decode_command", "decode_reply",
    "Options", "accept", "answer", "offer", "protocol_for_version",
]
