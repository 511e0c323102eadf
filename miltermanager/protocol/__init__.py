"""The milter wire protocol without I/O: framing, messages, negotiation.

Both the MTA-facing server and the child-facing client use it; nothing here
touches a socket or a reactor.
"""

from . import constants
from .errors import (
    FrameError, NegotiationError, PayloadError, ProtocolError, UnknownCodeError,
)
from .framing import FrameDecoder, encode_frame
from .messages import *  # noqa: F401,F403 (the message classes are the API)
from .messages import COMMAND_TYPES, REPLY_TYPES, decode_command, decode_reply
from .negotiation import Options, accept, answer, offer, protocol_for_version
