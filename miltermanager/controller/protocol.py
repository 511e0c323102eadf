"""Upstream's control protocol, as bytes: framing, commands and replies; no I/O here.

A packet is a 4-byte big-endian length, then that many bytes: a command or
reply name, a NUL, and the content (milter-manager's
milter-manager-control-command-decoder.c and milter-manager-reply-encoder.c).
Commands: set-configuration (content: the configuration text),
get-configuration, reload and get-status (no content); ours adds get-trace
(content: a queue id or session number). Replies: success, failure\\0TEXT,
error\\0TEXT, configuration\\0TEXT, status\\0TEXT, and ours trace\\0JSON.

Between the supervisor and each of its workers (manager.n_workers), the
same framing carries INTERNAL commands, which the admin's socket refuses:
get-worker-status (status\\0JSON with the raw latency samples) and
get-metrics (metrics\\0JSON: the worker's Metrics counts).
"""

import struct

# A set-configuration carries a configuration file; nothing else comes near this.
MAX_PACKET = 1024 * 1024 + 64

COMMANDS = ("set-configuration", "get-configuration", "reload", "get-status", "get-trace")
# What a worker answers on its channel from the supervisor (controller.channel).
INTERNAL = ("get-worker-status", "get-trace", "reload", "get-metrics")
# The commands whose content must be empty (upstream checks the same).
EMPTY = frozenset(("get-configuration", "reload", "get-status", "get-worker-status",
                   "get-metrics"))


class PacketError(Exception):
    """A packet that breaks the framing or names no known command; str() says how.

    fatal: the stream cannot be read on from here (a bad length), so the
    connection is closed after the error reply.
    """

    def __init__(self, text, fatal=False):
        super().__init__(text)
        self.fatal = fatal


def encode(name, content=b""):
    """The packet for name (a str) and content (bytes or str)."""
    if isinstance(content, str):
        content = content.encode("utf-8")
    payload = name.encode("ascii") + b"\0" + content
    return struct.pack("!I", len(payload)) + payload


def split(payload):
    """(name, content) of one packet's payload; PacketError if it has no NUL-ended name."""
    name, nul, content = bytes(payload).partition(b"\0")
    if not nul or not name:
        raise PacketError("control command isn't terminated by NUL")
    try:
        return name.decode("ascii"), content
    except UnicodeDecodeError:
        raise PacketError(f"unexpected command was received: <{name!r}>") from None


def check_command(name, content, commands=COMMANDS):
    """Raise PacketError unless name is one of commands, with the content it may carry."""
    if name not in commands:
        raise PacketError(f"unexpected command was received: <{name}>")
    if name in EMPTY and content:
        raise PacketError(f"{name} command carries {len(content)} unexpected bytes")


class Decoder:
    """Feed bytes; get the payloads of whole packets. A bad length raises PacketError (fatal)."""

    def __init__(self, max_packet=MAX_PACKET):
        self.max_packet = max_packet
        self._buffer = bytearray()

    def feed(self, data):
        """The payloads completed by data, in order."""
        self._buffer += data
        payloads = []
        while len(self._buffer) >= 4:
            (length,) = struct.unpack_from("!I", self._buffer)
            if length == 0 or length > self.max_packet:
                self._buffer.clear()
                raise PacketError(
                    f"packet length {length} is out of range (1 to {self.max_packet})", True)
            if len(self._buffer) < 4 + length:
                break
            payloads.append(bytes(self._buffer[4:4 + length]))
            del self._buffer[:4 + length]
        return payloads
