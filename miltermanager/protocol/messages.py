"""One class per milter command and reply, each with its payload encoder and decoder.

Everything is bytes: addresses, header values and macro values pass through
exactly as the peer sent them, 8-bit included.
"""

import struct
from dataclasses import dataclass, field
from typing import ClassVar

from . import constants as c
from .errors import PayloadError, UnknownCodeError
from .framing import encode_frame

_UINT32 = struct.Struct("!I")
_UINT16 = struct.Struct("!H")
_NEGOTIATE = struct.Struct("!III")
_SYMLIST_SEPARATORS = (b",", b"\t", b"\r", b"\n")


def _strings(payload, count, what, optional=0):
    """Split NUL-terminated strings; expect count of them, up to optional more."""
    parts = payload.split(b"\0")
    if parts[-1]:
        raise PayloadError(f"{what}: string not terminated by NUL")
    del parts[-1]
    if not count <= len(parts) <= count + optional:
        expected = f"{count}" if not optional else f"{count} to {count + optional}"
        raise PayloadError(f"{what}: expected {expected} strings, got {len(parts)}")
    return parts


def _argv(payload, what):
    """Split an argv payload: at least one NUL-terminated string."""
    parts = payload.split(b"\0")
    if parts[-1]:
        raise PayloadError(f"{what}: string not terminated by NUL")
    del parts[-1]
    if not parts:
        raise PayloadError(f"{what}: no address")
    return parts


def _check_string(value, what):
    if b"\0" in value:
        raise ValueError(f"{what} may not contain NUL: {value!r}")
    return value


class Message:
    """A command or reply: its code, how to encode it, and a decoder."""

    __slots__ = ()
    code: ClassVar[bytes]
    final: ClassVar[bool] = False

    def payload(self):
        return b""

    def encode(self):
        """Return the whole packet, length prefix included."""
        return encode_frame(self.code, self.payload())

    @classmethod
    def decode(cls, payload):
        return cls()


class _Empty(Message):
    """A message without payload; one shared instance serves every packet."""

    __slots__ = ()
    instance: ClassVar["_Empty"]
    _encoded: ClassVar[bytes]

    def encode(self):
        return self._encoded  # the same five bytes every time: see _singleton

    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(self.code)

    def __repr__(self):
        return f"{type(self).__name__}()"

    @classmethod
    def decode(cls, payload):
        return cls.instance


class _EmptyReply(_Empty):
    """A reply without payload: data after the code is an error (Postfix agrees)."""

    __slots__ = ()

    @classmethod
    def decode(cls, payload):
        if payload:
            raise PayloadError(
                f"reply {cls.code!r} carries {len(payload)} unexpected data bytes")
        return cls.instance


def _singleton(cls):
    cls.instance = cls()
    cls._encoded = encode_frame(cls.code)
    return cls


@dataclass(slots=True)
class _Relayed(Message):
    """A command a proxy may pass on unchanged: it keeps the packet it was decoded from.

    encode() then returns that packet instead of building it again. Only
    decode_command sets it, so a command built or replaced in code (even
    dataclasses.replace of a decoded one) is encoded from its fields.
    """

    _packet: bytes = field(default=None, init=False, repr=False, compare=False)

    def encode(self):
        packet = self._packet
        if packet is None:
            return encode_frame(self.code, self.payload())
        return packet


# ---------------------------------------------------------------- commands


@dataclass(slots=True)
class Negotiate(Message):
    """Option negotiation, both ways; a milter's reply may carry symbol lists.

    macros maps a macro stage (0 connect .. 6 end of headers) to the macro
    names the milter wants at that stage.
    """

    code: ClassVar[bytes] = c.NEGOTIATE
    version: int = c.MAX_VERSION
    actions: int = c.SMFI_CURR_ACTS
    protocol: int = c.SMFI_CURR_PROT
    macros: dict = field(default_factory=dict)

    def payload(self):
        parts = [_NEGOTIATE.pack(self.version, self.actions, self.protocol)]
        for stage, names in self.macros.items():
            parts.append(_UINT32.pack(stage))
            parts.append(_check_string(b" ".join(names), "macro list") + b"\0")
        return b"".join(parts)

    @classmethod
    def decode(cls, payload):
        """Decode a milter's reply, symbol lists included."""
        negotiate = cls.decode_offer(payload)
        payload = bytes(payload)
        # Walk by offset: copying the rest for each record made a reply full of
        # tiny records quadratic in its length.
        position = _NEGOTIATE.size
        while position < len(payload):
            if len(payload) - position < 5:
                raise PayloadError("negotiate: truncated symbol list")
            (stage,) = _UINT32.unpack_from(payload, position)
            end = payload.find(b"\0", position + 4)
            if end < 0:
                raise PayloadError("negotiate: symbol list not terminated by NUL")
            names = payload[position + 4:end]
            for separator in _SYMLIST_SEPARATORS:
                names = names.replace(separator, b" ")
            negotiate.macros[stage] = names.split()
            position = end + 1
        return negotiate

    @classmethod
    def decode_offer(cls, payload):
        """Decode an MTA's offer: 12 bytes, anything after them is ignored."""
        if len(payload) < _NEGOTIATE.size:
            raise PayloadError(
                f"negotiate: {len(payload)} bytes, at least 12 are needed")
        version, actions, protocol = _NEGOTIATE.unpack_from(payload)
        return cls(version, actions, protocol, {})


@dataclass(slots=True)
class Macro(_Relayed):
    """Macros for the command whose code is stage; sent just before it."""

    code: ClassVar[bytes] = c.MACRO
    stage: bytes
    macros: dict = field(default_factory=dict)

    def payload(self):
        parts = [self.stage]
        for name, value in self.macros.items():
            parts.append(_check_string(name, "macro name") + b"\0")
            parts.append(_check_string(value, "macro value") + b"\0")
        return b"".join(parts)

    @classmethod
    def decode(cls, payload):
        # An empty D (no stage at all) is odd but harmless: keep it as no macros.
        stage = payload[:1]
        if len(payload) <= 1:
            return cls(stage, {})
        parts = _argv(payload[1:], f"macros for {stage!r}")
        if len(parts) % 2:
            raise PayloadError(f"macros for {stage!r}: name {parts[-1]!r} has no value")
        return cls(stage, dict(zip(parts[::2], parts[1::2])))


@dataclass(slots=True)
class Connect(_Relayed):
    """An SMTP client connected: its host name, address family, port and address."""

    code: ClassVar[bytes] = c.CONNECT
    hostname: bytes
    family: bytes = c.FAMILY_UNKNOWN
    port: int = 0
    address: bytes = b""

    def payload(self):
        head = _check_string(self.hostname, "hostname") + b"\0" + self.family
        if self.family == c.FAMILY_UNKNOWN:
            return head
        return head + _UINT16.pack(self.port) + _check_string(self.address, "address") + b"\0"

    @classmethod
    def decode(cls, payload):
        end = payload.find(b"\0")
        if end < 0:
            raise PayloadError("connect: host name not terminated by NUL")
        hostname = payload[:end]
        family = payload[end + 1:end + 2]
        if family not in c.FAMILIES:
            raise PayloadError(f"connect: bad address family {family!r}")
        if family == c.FAMILY_UNKNOWN:
            return cls(hostname, family)
        rest = payload[end + 2:]
        if len(rest) < 3:
            raise PayloadError("connect: port and address missing")
        (port,) = _UINT16.unpack_from(rest)
        (address,) = _strings(rest[2:], 1, "connect address")
        if family == c.FAMILY_INET6 and address[:5].lower() == b"ipv6:":
            address = address[5:]  # Sendmail's form; libmilter strips it too.
        return cls(hostname, family, port, address)


@dataclass(slots=True)
class Helo(_Relayed):
    code: ClassVar[bytes] = c.HELO
    name: bytes

    def payload(self):
        return _check_string(self.name, "helo name") + b"\0"

    @classmethod
    def decode(cls, payload):
        return cls(_strings(payload, 1, "helo")[0])


@dataclass(slots=True)
class Mail(_Relayed):
    """MAIL FROM: the address as the client typed it (with <>) and ESMTP arguments."""

    code: ClassVar[bytes] = c.MAIL
    sender: bytes
    args: list = field(default_factory=list)

    def payload(self):
        return b"".join(_check_string(part, "mail argument") + b"\0"
                        for part in (self.sender, *self.args))

    @classmethod
    def decode(cls, payload):
        sender, *args = _argv(payload, "mail")
        return cls(sender, args)


@dataclass(slots=True)
class Rcpt(_Relayed):
    """RCPT TO: the address as the client typed it (with <>) and ESMTP arguments."""

    code: ClassVar[bytes] = c.RCPT
    recipient: bytes
    args: list = field(default_factory=list)

    def payload(self):
        return b"".join(_check_string(part, "rcpt argument") + b"\0"
                        for part in (self.recipient, *self.args))

    @classmethod
    def decode(cls, payload):
        recipient, *args = _argv(payload, "rcpt")
        return cls(recipient, args)


@_singleton
class Data(_Empty):
    __slots__ = ()
    code = c.DATA


@dataclass(slots=True)
class Header(_Relayed):
    """One header: name without colon, value as sent (folds are bare LF)."""

    code: ClassVar[bytes] = c.HEADER
    name: bytes
    value: bytes

    def payload(self):
        return (_check_string(self.name, "header name") + b"\0"
                + _check_string(self.value, "header value") + b"\0")

    @classmethod
    def decode(cls, payload):
        name, value = _strings(payload, 2, "header")
        return cls(name, value)


@_singleton
class EndOfHeaders(_Empty):
    __slots__ = ()
    code = c.END_OF_HEADERS


@dataclass(slots=True)
class Body(_Relayed):
    """A body chunk: raw bytes, CRLF line ends, at most 65535 bytes on the wire."""

    code: ClassVar[bytes] = c.BODY
    chunk: bytes

    def payload(self):
        return self.chunk

    @classmethod
    def decode(cls, payload):
        return cls(payload)


@dataclass(slots=True)
class EndOfMessage(_Relayed):
    """End of the body. MTAs send it empty; libmilter takes data as a last chunk."""

    code: ClassVar[bytes] = c.END_OF_MESSAGE
    chunk: bytes = b""

    def payload(self):
        return self.chunk

    @classmethod
    def decode(cls, payload):
        return cls(payload) if payload else END_OF_MESSAGE


@_singleton
class Abort(_Empty):
    __slots__ = ()
    code = c.ABORT


@_singleton
class Quit(_Empty):
    __slots__ = ()
    code = c.QUIT


@_singleton
class QuitNewConnection(_Empty):
    """Quit this SMTP session; another one follows on the same milter connection."""

    __slots__ = ()
    code = c.QUIT_NEW_CONNECTION


@dataclass(slots=True)
class Unknown(_Relayed):
    """An SMTP command line the MTA did not recognise."""

    code: ClassVar[bytes] = c.UNKNOWN
    line: bytes

    def payload(self):
        return _check_string(self.line, "unknown command") + b"\0"

    @classmethod
    def decode(cls, payload):
        return cls(_strings(payload, 1, "unknown")[0])


# ---------------------------------------------------------------- replies


@_singleton
class Continue(_EmptyReply):
    __slots__ = ()
    code = c.CONTINUE
    final = True


@_singleton
class Accept(_EmptyReply):
    __slots__ = ()
    code = c.ACCEPT
    final = True


@_singleton
class Reject(_EmptyReply):
    __slots__ = ()
    code = c.REJECT
    final = True


@_singleton
class Tempfail(_EmptyReply):
    __slots__ = ()
    code = c.TEMPFAIL
    final = True


@_singleton
class Discard(_EmptyReply):
    __slots__ = ()
    code = c.DISCARD
    final = True


@_singleton
class Skip(_EmptyReply):
    """Send no more body chunks; go on with end of message."""

    __slots__ = ()
    code = c.SKIP
    final = True


@_singleton
class Shutdown(_EmptyReply):
    """Postfix only: close the SMTP session with 421."""

    __slots__ = ()
    code = c.SHUTDOWN
    final = True


@_singleton
class Progress(_EmptyReply):
    """Still working: restarts the MTA's timeout."""

    __slots__ = ()
    code = c.PROGRESS


@dataclass(slots=True)
class ReplyCode(Message):
    """Reject or tempfail with an SMTP reply: 'ddd x.y.z text', lines joined by CRLF."""

    code: ClassVar[bytes] = c.REPLY_CODE
    final: ClassVar[bool] = True
    text: bytes

    def payload(self):
        return _check_string(self.text, "reply text") + b"\0"

    @classmethod
    def decode(cls, payload):
        return cls(_strings(payload, 1, "reply code")[0])

    @property
    def is_temporary(self):
        return self.text[:1] == b"4"


@dataclass(slots=True)
class Quarantine(Message):
    code: ClassVar[bytes] = c.QUARANTINE
    reason: bytes

    def payload(self):
        return _check_string(self.reason, "quarantine reason") + b"\0"

    @classmethod
    def decode(cls, payload):
        return cls(_strings(payload, 1, "quarantine")[0])


@dataclass(slots=True)
class AddHeader(Message):
    """Append a header after the last one."""

    code: ClassVar[bytes] = c.ADD_HEADER
    name: bytes
    value: bytes

    def payload(self):
        return (_check_string(self.name, "header name") + b"\0"
                + _check_string(self.value, "header value") + b"\0")

    @classmethod
    def decode(cls, payload):
        name, value = _strings(payload, 2, "add header")
        return cls(name, value)


@dataclass(slots=True)
class _IndexedHeader(Message):
    index: int
    name: bytes
    value: bytes

    def payload(self):
        return (_UINT32.pack(self.index)
                + _check_string(self.name, "header name") + b"\0"
                + _check_string(self.value, "header value") + b"\0")

    @classmethod
    def decode(cls, payload):
        if len(payload) < 4:
            raise PayloadError(f"{cls.__name__}: no header index")
        (index,) = _UINT32.unpack_from(payload)
        name, value = _strings(payload[4:], 2, cls.__name__)
        return cls(index, name, value)


@dataclass(slots=True)
class InsertHeader(_IndexedHeader):
    """Insert a header at a 0-based position among all headers."""

    code: ClassVar[bytes] = c.INSERT_HEADER


@dataclass(slots=True)
class ChangeHeader(_IndexedHeader):
    """Change the index-th (1-based) header of that name; an empty value deletes it."""

    code: ClassVar[bytes] = c.CHANGE_HEADER


@dataclass(slots=True)
class AddRecipient(Message):
    code: ClassVar[bytes] = c.ADD_RECIPIENT
    recipient: bytes

    def payload(self):
        return _check_string(self.recipient, "recipient") + b"\0"

    @classmethod
    def decode(cls, payload):
        return cls(_strings(payload, 1, "add recipient")[0])


@dataclass(slots=True)
class DeleteRecipient(Message):
    code: ClassVar[bytes] = c.DELETE_RECIPIENT
    recipient: bytes

    def payload(self):
        return _check_string(self.recipient, "recipient") + b"\0"

    @classmethod
    def decode(cls, payload):
        return cls(_strings(payload, 1, "delete recipient")[0])


@dataclass(slots=True)
class _AddressWithArgs(Message):
    """An address with optional ESMTP arguments (one space-separated string)."""

    address: bytes
    args: bytes | None = None

    def payload(self):
        payload = _check_string(self.address, "address") + b"\0"
        if self.args is not None:
            payload += _check_string(self.args, "arguments") + b"\0"
        return payload

    @classmethod
    def decode(cls, payload):
        parts = _strings(payload, 1, cls.__name__, optional=1)
        return cls(*parts)


@dataclass(slots=True)
class AddRecipientPar(_AddressWithArgs):
    code: ClassVar[bytes] = c.ADD_RECIPIENT_PAR


@dataclass(slots=True)
class ChangeFrom(_AddressWithArgs):
    code: ClassVar[bytes] = c.CHANGE_FROM


@dataclass(slots=True)
class ReplaceBody(Message):
    """A chunk of the new body; a run of these replaces the whole body."""

    code: ClassVar[bytes] = c.REPLACE_BODY
    chunk: bytes

    def payload(self):
        return self.chunk

    @classmethod
    def decode(cls, payload):
        return cls(payload)


END_OF_MESSAGE = EndOfMessage()
END_OF_MESSAGE._packet = encode_frame(c.END_OF_MESSAGE)
DATA = Data.instance
END_OF_HEADERS = EndOfHeaders.instance
ABORT = Abort.instance
QUIT = Quit.instance
QUIT_NEW_CONNECTION = QuitNewConnection.instance
CONTINUE = Continue.instance
ACCEPT = Accept.instance
REJECT = Reject.instance
TEMPFAIL = Tempfail.instance
DISCARD = Discard.instance
SKIP = Skip.instance
SHUTDOWN = Shutdown.instance
PROGRESS = Progress.instance

COMMAND_TYPES = {
    cls.code: cls
    for cls in (Abort, Body, Connect, Macro, EndOfMessage, Helo, QuitNewConnection,
                Header, Mail, EndOfHeaders, Negotiate, Quit, Rcpt, Data, Unknown)
}
REPLY_TYPES = {
    cls.code: cls
    for cls in (AddRecipient, DeleteRecipient, AddRecipientPar, Shutdown, Accept,
                ReplaceBody, Continue, Discard, ChangeFrom, AddHeader, InsertHeader,
                ChangeHeader, Progress, Quarantine, Reject, Skip, Tempfail, ReplyCode,
                Negotiate)
}
_COMMAND_DECODERS = {code: cls.decode for code, cls in COMMAND_TYPES.items()}
_COMMAND_DECODERS[c.NEGOTIATE] = Negotiate.decode_offer
_REPLY_DECODERS = {code: cls.decode for code, cls in REPLY_TYPES.items()}
_RELAYED = frozenset(code for code, cls in COMMAND_TYPES.items() if issubclass(cls, _Relayed))


def decode_command(code, payload, packet=None):
    """Decode one MTA -> milter packet.

    packet: the whole packet (framing.FrameDecoder.feed_packets gives it);
    a command that can be relayed keeps it, and encode() returns it.
    """
    try:
        decoder = _COMMAND_DECODERS[code]
    except KeyError:
        raise UnknownCodeError(code, "command") from None
    command = decoder(payload)
    if packet is not None and code in _RELAYED:
        command._packet = packet
    return command


def decode_reply(code, payload):
    """Decode one milter -> MTA packet."""
    try:
        decoder = _REPLY_DECODERS[code]
    except KeyError:
        raise UnknownCodeError(code, "reply") from None
    return decoder(payload)
