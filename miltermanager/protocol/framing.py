"""Packet framing: a 4-byte big-endian length, a code byte, then the payload."""

import struct

from .constants import DEFAULT_MAX_PACKET_SIZE
from .errors import FrameError

_LENGTH = struct.Struct("!I")
_pack_length = _LENGTH.pack
_unpack_length = _LENGTH.unpack_from


def encode_frame(code, payload=b""):
    """Return one packet: length (code + payload), code, payload."""
    return _pack_length(len(payload) + 1) + code + payload


class FrameDecoder:
    """Split a byte stream into (code, payload) frames.

    Memory grows only with bytes actually received: a peer that claims a
    huge length gets FrameError at once if it is over max_size, and otherwise
    costs nothing until its bytes arrive.
    """

    def __init__(self, max_size=DEFAULT_MAX_PACKET_SIZE):
        self.max_size = max_size
        self._buffer = bytearray()

    def feed(self, data):
        """Add received bytes; return the list of complete (code, payload) frames."""
        if not self._buffer and data.__class__ is bytes and len(data) >= 5:
            # The common case: one whole packet in one read, taken without copying it.
            (length,) = _unpack_length(data)
            if len(data) == length + 4 and 0 < length <= self.max_size:
                return [(data[4:5], data[5:])]
        return self._split(data, False)

    def feed_packets(self, data):
        """As feed, but (code, payload, packet): packet is the frame's bytes, length included.

        A proxy relays a packet it does not change as it came (see
        messages.decode_command); when one read brings exactly one packet,
        that packet is the received bytes themselves.
        """
        if not self._buffer and data.__class__ is bytes and len(data) >= 5:
            (length,) = _unpack_length(data)
            if len(data) == length + 4 and 0 < length <= self.max_size:
                return [(data[4:5], data[5:], data)]
        return self._split(data, True)

    def _split(self, data, packets):
        buffer = self._buffer
        if buffer:
            buffer += data
            data = buffer
        frames = []
        size = len(data)
        position = 0
        while size - position >= 5:
            (length,) = _unpack_length(data, position)
            if length == 0:
                raise FrameError("packet length 0: there must be at least a code byte")
            if length > self.max_size:
                raise FrameError(
                    f"packet length {length} is over the maximum {self.max_size}"
                )
            end = position + 4 + length
            if end > size:
                break
            code, payload = bytes(data[position + 4:position + 5]), bytes(data[position + 5:end])
            frames.append((code, payload, bytes(data[position:end])) if packets
                          else (code, payload))
            position = end
        if position < size:
            if data is buffer:
                del buffer[:position]
            else:
                buffer += memoryview(data)[position:]
        elif buffer:
            buffer.clear()
        return frames

    @property
    def pending(self):
        """How many received bytes wait for the rest of their packet."""
        return len(self._buffer)
