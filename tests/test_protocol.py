"""Tests for the sans-IO milter codec: wire bytes, tolerance, strictness, framing, negotiation."""

import struct
import time

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from miltermanager.protocol import (
    COMMAND_TYPES, REPLY_TYPES, FrameDecoder, FrameError, NegotiationError, Options,
    PayloadError, ProtocolError, UnknownCodeError, accept, answer, constants as c,
    decode_command, decode_reply, encode_frame, offer,
)
from miltermanager.protocol.messages import (
    ABORT, ACCEPT, CONTINUE, DATA, DISCARD, END_OF_HEADERS, END_OF_MESSAGE, PROGRESS, QUIT,
    QUIT_NEW_CONNECTION, REJECT, SHUTDOWN, SKIP, TEMPFAIL, AddHeader, AddRecipient,
    AddRecipientPar, Body, ChangeFrom, ChangeHeader, Connect, DeleteRecipient, EndOfMessage,
    Header, Helo, InsertHeader, Macro, Mail, Negotiate, Quarantine, Rcpt, ReplaceBody,
    ReplyCode, Unknown,
)

_h = bytes.fromhex


def _decode_packet(packet, decode):
    """Frame one whole packet and decode it; the packet must hold exactly one frame."""
    decoder = FrameDecoder()
    frames = decoder.feed(packet)
    assert len(frames) == 1 and decoder.pending == 0, (packet, frames, decoder.pending)
    return decode(*frames[0])


# ------------------------------------------------------------------ golden vectors
# One row per vector: (packet, message). Hex rows are copied from protocol.md §11;
# byte-literal rows are derived from the payload layouts of §3-§4, length spelled out.

COMMAND_VECTORS = [
    # O: Postfix/Sendmail offer, v6, 0x1FF, 0x1FFFFF
    (_h("00 00 00 0d 4f 00 00 00 06 00 00 01 ff 00 1f ff ff"),
     Negotiate(6, 0x1FF, 0x1FFFFF, {})),
    # D for CONNECT: j=mx.example.org {daemon_name}=smtpd
    (_h("00 00 00 27 44 43 6a 00 6d 78 2e 65 78 61 6d 70 6c 65 2e 6f 72 67 00 7b 64 61 65 6d"
        " 6f 6e 5f 6e 61 6d 65 7d 00 73 6d 74 70 64 00"),
     Macro(b"C", {b"j": b"mx.example.org", b"{daemon_name}": b"smtpd"})),
    # D for UNKNOWN, empty (Postfix default)
    (_h("00 00 00 02 44 55"), Macro(b"U", {})),
    # C IPv4, Postfix style
    (_h("00 00 00 22 43 63 6c 69 65 6e 74 2e 65 78 61 6d 70 6c 65 2e 6e 65 74 00 34 c8 22 31"
        " 39 32 2e 30 2e 32 2e 31 30 00"),
     Connect(b"client.example.net", b"4", 51234, b"192.0.2.10")),
    # C family U: no port, no address
    (_h("00 00 00 0c 43 6c 6f 63 61 6c 68 6f 73 74 00 55"), Connect(b"localhost", b"U")),
    # H
    (_h("00 00 00 14 48 63 6c 69 65 6e 74 2e 65 78 61 6d 70 6c 65 2e 6e 65 74 00"),
     Helo(b"client.example.net")),
    # M with ESMTP args
    (_h("00 00 00 29 4d 3c 61 40 65 78 61 6d 70 6c 65 2e 6e 65 74 3e 00 53 49 5a 45 3d 31 32"
        " 33 34 00 42 4f 44 59 3d 38 42 49 54 4d 49 4d 45 00"),
     Mail(b"<a@example.net>", [b"SIZE=1234", b"BODY=8BITMIME"])),
    # L folded, no LEADSPC
    (_h("00 00 00 16 4c 53 75 62 6a 65 63 74 00 48 65 6c 6c 6f 0a 20 77 6f 72 6c 64 00"),
     Header(b"Subject", b"Hello\n world")),
    # N, E, A, Q
    (_h("00 00 00 01 4e"), END_OF_HEADERS),
    (_h("00 00 00 01 45"), END_OF_MESSAGE),
    (_h("00 00 00 01 41"), ABORT),
    (_h("00 00 00 01 51"), QUIT),
    # B
    (_h("00 00 00 0f 42 6c 69 6e 65 31 0d 0a 6c 69 6e 65 32 0d 0a"),
     Body(b"line1\r\nline2\r\n")),
    # Derived from §3.
    (b"\0\0\0\x01" b"K", QUIT_NEW_CONNECTION),
    (b"\0\0\0\x01" b"T", DATA),
    (b"\0\0\0\x07" b"U" b"XYZZY\0", Unknown(b"XYZZY")),
    (b"\0\0\0\x11" b"R" b"<b@example.org>\0", Rcpt(b"<b@example.org>")),
    (b"\0\0\0\x1e" b"R" b"<b@example.org>\0NOTIFY=NEVER\0",
     Rcpt(b"<b@example.org>", [b"NOTIFY=NEVER"])),
    (b"\0\0\0\x04" b"M" b"<>\0", Mail(b"<>")),
    (b"\0\0\0\x1e" b"C" b"localhost\0L\0\0/run/smtpd.sock\0",
     Connect(b"localhost", b"L", 0, b"/run/smtpd.sock")),
    (b"\0\0\0\x1e" b"C" b"[2001:db8::1]\0" b"6\x00\x19" b"2001:db8::1\0",
     Connect(b"[2001:db8::1]", b"6", 25, b"2001:db8::1")),
    (b"\0\0\0\x0b" b"B" b"a\0b\r\n\xff\0\r\n\0", Body(b"a\0b\r\n\xff\0\r\n\0")),
    (b"\0\0\0\x09" b"D" b"M" b"i\0" b"4Qx7\0", Macro(b"M", {b"i": b"4Qx7"})),
]

# Sendmail's IPv6 form: the decoder strips "IPv6:", the encoder sends what it is given.
SENDMAIL_IPV6_CONNECT = _h(
    "00 00 00 28 43 5b 49 50 76 36 3a 32 30 30 31 3a 64 62 38 3a 3a 31 5d 00 36 c8 22 49 50"
    " 76 36 3a 32 30 30 31 3a 64 62 38 3a 3a 31 00")

REPLY_VECTORS = [
    # O reply v6, actions ADDHDRS|CHGHDRS, protocol NOHELO|NR_HDR|SKIP
    (_h("00 00 00 0d 4f 00 00 00 06 00 00 00 11 00 00 04 82"),
     Negotiate(6, 0x11, 0x482, {})),
    # O reply with a symbol list for stage 2 (MAIL)
    (_h("00 00 00 21 4f 00 00 00 06 00 00 01 01 00 00 00 00 00 00 00 02 7b 61 75 74 68 5f 61"
        " 75 74 68 65 6e 7d 20 69 00"),
     Negotiate(6, 0x101, 0, {2: [b"{auth_authen}", b"i"]})),
    # c
    (_h("00 00 00 01 63"), CONTINUE),
    # y single line
    (_h("00 00 00 13 79 35 35 30 20 35 2e 37 2e 31 20 47 6f 20 61 77 61 79 00"),
     ReplyCode(b"550 5.7.1 Go away")),
    # y multi-line
    (_h("00 00 00 28 79 35 35 30 2d 35 2e 37 2e 31 20 6c 69 6e 65 20 6f 6e 65 0d 0a 35 35 30"
        " 20 35 2e 37 2e 31 20 6c 69 6e 65 20 74 77 6f 00"),
     ReplyCode(b"550-5.7.1 line one\r\n550 5.7.1 line two")),
    # h
    (_h("00 00 00 0c 68 58 2d 53 70 61 6d 00 79 65 73 00"), AddHeader(b"X-Spam", b"yes")),
    # m: delete X-Old #1
    (_h("00 00 00 0c 6d 00 00 00 01 58 2d 4f 6c 64 00 00"), ChangeHeader(1, b"X-Old", b"")),
    # i at 0
    (_h("00 00 00 0f 69 00 00 00 00 58 2d 46 69 72 73 74 00 76 00"),
     InsertHeader(0, b"X-First", b"v")),
    # e without args (libmilter form)
    (_h("00 00 00 13 65 3c 6e 65 77 40 65 78 61 6d 70 6c 65 2e 6f 72 67 3e 00"),
     ChangeFrom(b"<new@example.org>")),
    # 2 with args
    (_h("00 00 00 1e 32 3c 78 40 65 78 61 6d 70 6c 65 2e 6f 72 67 3e 00 4e 4f 54 49 46 59 3d"
        " 4e 45 56 45 52 00"),
     AddRecipientPar(b"<x@example.org>", b"NOTIFY=NEVER")),
    # q
    (_h("00 00 00 0c 71 73 75 73 70 69 63 69 6f 75 73 00"), Quarantine(b"suspicious")),
    # p
    (_h("00 00 00 01 70"), PROGRESS),
    # Derived from §4.
    (b"\0\0\0\x11" b"2" b"<x@example.org>\0", AddRecipientPar(b"<x@example.org>")),
    (b"\0\0\0\x2a" b"e" b"<new@example.org>\0SIZE=100 BODY=8BITMIME\0",
     ChangeFrom(b"<new@example.org>", b"SIZE=100 BODY=8BITMIME")),
    (b"\0\0\0\x11" b"-" b"<x@example.org>\0", DeleteRecipient(b"<x@example.org>")),
    (b"\0\0\0\x11" b"+" b"<x@example.org>\0", AddRecipient(b"<x@example.org>")),
    (b"\0\0\0\x0a" b"b" b"new\r\n\0\xff\r\n", ReplaceBody(b"new\r\n\0\xff\r\n")),
    (b"\0\0\0\x01" b"r", REJECT),
    (b"\0\0\0\x01" b"t", TEMPFAIL),
    (b"\0\0\0\x01" b"a", ACCEPT),
    (b"\0\0\0\x01" b"d", DISCARD),
    (b"\0\0\0\x01" b"s", SKIP),
    (b"\0\0\0\x01" b"4", SHUTDOWN),
    (b"\0\0\0\x2f" b"y" b"451-4.7.1 one\r\n451-4.7.1 two\r\n451 4.7.1 three\0",
     ReplyCode(b"451-4.7.1 one\r\n451-4.7.1 two\r\n451 4.7.1 three")),
    (b"\0\0\0\x37" b"O" b"\0\0\0\x06" b"\0\0\x01\x00" b"\0\x10\0\0"
     b"\0\0\0\x00" b"j {daemon_name}\0"
     b"\0\0\0\x02" b"{auth_type}\0"
     b"\0\0\0\x05" b"i\0",
     Negotiate(6, c.SMFIF_SETSYMLIST, c.SMFIP_HDR_LEADSPC,
               {0: [b"j", b"{daemon_name}"], 2: [b"{auth_type}"], 5: [b"i"]})),
    (b"\0\0\0\x12" b"O" b"\0\0\0\x06" b"\0\0\0\0" b"\0\0\0\0" b"\0\0\0\x03" b"\0",
     Negotiate(6, 0, 0, {3: []})),
]


class GoldenBytesTests(SynchronousTestCase):
    """Every command and reply against known wire bytes, both ways."""

    def test_commands_decode(self):
        """Each command vector frames to one packet and decodes to the expected message."""
        for packet, message in COMMAND_VECTORS:
            self.assertEqual(_decode_packet(packet, decode_command), message, packet.hex(" "))

    def test_commands_encode(self):
        """Each command message encodes to exactly its vector's bytes."""
        for packet, message in COMMAND_VECTORS:
            self.assertEqual(message.encode(), packet, repr(message))

    def test_replies_decode(self):
        """Each reply vector frames to one packet and decodes to the expected message."""
        for packet, message in REPLY_VECTORS:
            self.assertEqual(_decode_packet(packet, decode_reply), message, packet.hex(" "))

    def test_replies_encode(self):
        """Each reply message encodes to exactly its vector's bytes."""
        for packet, message in REPLY_VECTORS:
            self.assertEqual(message.encode(), packet, repr(message))

    def test_every_code_has_a_vector(self):
        """The tables cover every command code (A..U) and every reply code (+ .. y, O)."""
        self.assertEqual({p[4:5] for p, _ in COMMAND_VECTORS}, set(COMMAND_TYPES))
        self.assertEqual({p[4:5] for p, _ in REPLY_VECTORS}, set(REPLY_TYPES))
        self.assertEqual(set(COMMAND_TYPES), {bytes([b]) for b in b"ABCDEHKLMNOQRTU"})
        self.assertEqual(set(REPLY_TYPES), {bytes([b]) for b in b"+-24abcdehimpqrsty" + b"O"})

    def test_sendmail_ipv6_connect(self):
        """Sendmail's 'IPv6:' connect decodes without the prefix and re-encodes as given."""
        self.assertEqual(
            _decode_packet(SENDMAIL_IPV6_CONNECT, decode_command),
            Connect(b"[IPv6:2001:db8::1]", b"6", 51234, b"2001:db8::1"))
        self.assertEqual(
            Connect(b"[IPv6:2001:db8::1]", b"6", 51234, b"IPv6:2001:db8::1").encode(),
            SENDMAIL_IPV6_CONNECT)

    def test_final_flags(self):
        """Final replies are c a r t d y s 4; p q and the modifications are not."""
        final = {code for code, cls in REPLY_TYPES.items() if cls.final}
        self.assertEqual(final, {b"c", b"a", b"r", b"t", b"d", b"y", b"s", b"4"})


# ------------------------------------------------------------------ tolerances


class ToleranceTests(SynchronousTestCase):
    """What the decoder accepts from real MTAs although it is odd."""

    def test_empty_macro(self):
        """A 'D' with a stage byte and no pairs is an empty macro set for that stage."""
        self.assertEqual(_decode_packet(_h("00 00 00 02 44 55"), decode_command),
                         Macro(b"U", {}))

    def test_macro_without_stage(self):
        """A 'D' without even a stage byte decodes to an empty stage and no macros."""
        self.assertEqual(decode_command(b"D", b""), Macro(b"", {}))

    def test_long_offer(self):
        """An MTA offer longer than 12 bytes decodes; the extra bytes are ignored."""
        payload = struct.pack("!III", 6, 0x1FF, 0x1FFFFF) + b"\0\0\0\x02extra"
        self.assertEqual(decode_command(b"O", payload), Negotiate(6, 0x1FF, 0x1FFFFF, {}))

    def test_ipv6_prefix_any_case(self):
        """The 'IPv6:' address prefix is stripped whatever its case."""
        for prefix in (b"IPv6:", b"ipv6:", b"IPV6:", b"iPv6:"):
            payload = b"host\0" b"6\x00\x19" + prefix + b"::1\0"
            self.assertEqual(decode_command(b"C", payload), Connect(b"host", b"6", 25, b"::1"))

    def test_ipv6_prefix_only_on_inet6(self):
        """Only a family '6' address loses an 'IPv6:' prefix; a socket path keeps it."""
        payload = b"host\0" b"L\x00\x00" b"IPv6:x\0"
        self.assertEqual(decode_command(b"C", payload).address, b"IPv6:x")

    def test_plain_ipv6(self):
        """Postfix's plain IPv6 address is left as is."""
        payload = b"host\0" b"6\x00\x19" b"2001:db8::1\0"
        self.assertEqual(decode_command(b"C", payload).address, b"2001:db8::1")

    def test_family_unknown(self):
        """A family 'U' connect ends after the family byte: port 0, empty address."""
        message = decode_command(b"C", b"localhost\0U")
        self.assertEqual((message.family, message.port, message.address), (b"U", 0, b""))
        self.assertEqual(Connect(b"localhost").encode(), b"\0\0\0\x0cClocalhost\0U")

    def test_end_of_message_with_data(self):
        """An 'E' with data keeps it as the last body chunk."""
        self.assertEqual(decode_command(b"E", b"tail\r\n"), EndOfMessage(b"tail\r\n"))
        self.assertEqual(EndOfMessage(b"tail\r\n").encode(), b"\0\0\0\x07Etail\r\n")

    def test_eight_bit_passes_through(self):
        """8-bit bytes in header values, macro values and addresses decode unchanged."""
        latin = b"Gr\xfc\xdfe aus K\xf6ln"
        utf8 = "Grüße".encode()
        cases = [
            (b"L", b"Subject\0" + latin + b"\0", Header(b"Subject", latin)),
            (b"L", b"Subject\0" + utf8 + b"\0", Header(b"Subject", utf8)),
            (b"D", b"C{x}\0" + latin + b"\0", Macro(b"C", {b"{x}": latin})),
            (b"M", b"<j\xc3\xb6rg@b\xfccher.example>\0SMTPUTF8\0",
             Mail(b"<j\xc3\xb6rg@b\xfccher.example>", [b"SMTPUTF8"])),
            (b"R", b"<\xff\xfe@example.org>\0", Rcpt(b"<\xff\xfe@example.org>")),
            (b"H", b"h\xe9lo\0", Helo(b"h\xe9lo")),
            (b"U", b"X\x80\x81\0", Unknown(b"X\x80\x81")),
        ]
        for code, payload, message in cases:
            self.assertEqual(decode_command(code, payload), message)
            self.assertEqual(message.encode(), encode_frame(code, payload))
        for message in (AddHeader(b"X-Name", latin), ChangeFrom(b"<\xe9@x>", b"\xff"),
                        ReplyCode(b"550 5.7.1 " + latin), Quarantine(utf8)):
            self.assertEqual(_decode_packet(message.encode(), decode_reply), message)

    def test_commands_without_payload_ignore_data(self):
        """Stray data on N, A, Q, K, T is ignored (the MTA side is lenient)."""
        for code, message in ((b"N", END_OF_HEADERS), (b"A", ABORT), (b"Q", QUIT),
                              (b"K", QUIT_NEW_CONNECTION), (b"T", DATA)):
            self.assertEqual(decode_command(code, b"junk"), message)

    def test_symbol_list_separators(self):
        """Symbol lists split on spaces, commas and whitespace, as Sendmail does."""
        payload = struct.pack("!IIII", 6, 0x100, 0, 1) + b"a, b\tc\r\nd  e\0"
        self.assertEqual(decode_reply(b"O", payload).macros,
                         {1: [b"a", b"b", b"c", b"d", b"e"]})


# ------------------------------------------------------------------ strictness


UNTERMINATED = [
    # (decode, code, payload): a string runs to the end of the packet without NUL.
    (decode_command, b"C", b"localhost"),
    (decode_command, b"C", b"host\0" b"4\x00\x19" b"192.0.2.1"),
    (decode_command, b"D", b"Cj\0mx.example.org"),
    (decode_command, b"H", b"client.example.net"),
    (decode_command, b"L", b"Subject"),
    (decode_command, b"L", b"Subject\0Hello"),
    (decode_command, b"M", b"<a@example.net>"),
    (decode_command, b"M", b"<a@example.net>\0SIZE=1"),
    (decode_command, b"R", b"<b@example.org>"),
    (decode_command, b"R", b"<b@example.org>\0NOTIFY=NEVER"),
    (decode_command, b"U", b"XYZZY"),
    (decode_reply, b"y", b"550 5.7.1 Go away"),
    (decode_reply, b"q", b"suspicious"),
    (decode_reply, b"h", b"X-Spam\0yes"),
    (decode_reply, b"i", b"\0\0\0\0X-First\0v"),
    (decode_reply, b"m", b"\0\0\0\x01X-Old"),
    (decode_reply, b"+", b"<x@example.org>"),
    (decode_reply, b"-", b"<x@example.org>"),
    (decode_reply, b"2", b"<x@example.org>\0NOTIFY=NEVER"),
    (decode_reply, b"e", b"<new@example.org>"),
    (decode_reply, b"O", struct.pack("!IIII", 6, 0x100, 0, 2) + b"{auth_authen}"),
]


class StrictnessTests(SynchronousTestCase):
    """Malformed input raises the codec's own typed errors, naming the problem."""

    def test_length_zero(self):
        """A length field of 0 is a FrameError (libmilter would silently misframe)."""
        error = self.assertRaises(FrameError, FrameDecoder().feed, b"\0\0\0\0c")
        self.assertIn("length 0", str(error))

    def test_length_over_maximum_at_header(self):
        """A length over max_size fails as soon as the 5-byte header is in, before any payload."""
        decoder = FrameDecoder(max_size=100)
        self.assertEqual(decoder.feed(b"\0\0\0"), [])
        error = self.assertRaises(FrameError, decoder.feed, b"\x65" b"B")
        self.assertIn("101", str(error))
        self.assertIn("maximum 100", str(error))

    def test_length_at_maximum(self):
        """A packet whose length equals max_size is accepted."""
        decoder = FrameDecoder(max_size=10)
        self.assertEqual(decoder.feed(b"\0\0\0\x0aB123456789"), [(b"B", b"123456789")])

    def test_unterminated_strings(self):
        """Every string-carrying message rejects a string without its NUL."""
        for decode, code, payload in UNTERMINATED:
            error = self.assertRaises(PayloadError, decode, code, payload)
            self.assertIn("not terminated", str(error), (code, payload))

    def test_unknown_command_code(self):
        """A command byte the MTA direction does not know is an UnknownCodeError."""
        for code in (b"X", b"c", b"l", b"\0", b"\xff"):
            error = self.assertRaises(UnknownCodeError, decode_command, code, b"")
            self.assertEqual(error.code, code)
            self.assertIn(repr(code), str(error))
            self.assertIn("command", str(error))

    def test_unknown_reply_code(self):
        """A reply byte the milter direction does not know (also 'f', 'l') is UnknownCodeError."""
        for code in (b"C", b"f", b"l", b"X", b"\0"):
            error = self.assertRaises(UnknownCodeError, decode_reply, code, b"")
            self.assertEqual(error.code, code)
            self.assertIn(repr(code), str(error))
            self.assertIn("reply", str(error))

    def test_bad_family(self):
        """A connect family other than U L 4 6 (or none at all) is a PayloadError."""
        for payload in (b"host\0X\x00\x19addr\0", b"host\0", b"host\0u"):
            error = self.assertRaises(PayloadError, decode_command, b"C", payload)
            self.assertIn("family", str(error))

    def test_connect_missing_port(self):
        """An inet connect without port and address is a PayloadError."""
        error = self.assertRaises(PayloadError, decode_command, b"C", b"host\0" b"4\x00")
        self.assertIn("port", str(error))

    def test_short_negotiate(self):
        """A negotiate packet under 12 bytes is a PayloadError in both directions."""
        for decode in (decode_command, decode_reply):
            error = self.assertRaises(PayloadError, decode, b"O", b"\0" * 11)
            self.assertIn("12", str(error))

    def test_truncated_symbol_list(self):
        """Symbol-list bytes too short for a stage number are a PayloadError."""
        payload = struct.pack("!III", 6, 0x100, 0) + b"\0\0\0"
        error = self.assertRaises(PayloadError, decode_reply, b"O", payload)
        self.assertIn("symbol list", str(error))

    def test_data_after_no_data_reply(self):
        """c a r t d s 4 p with data are PayloadErrors (Postfix treats it as a comm error)."""
        for code in (b"c", b"a", b"r", b"t", b"d", b"s", b"4", b"p"):
            error = self.assertRaises(PayloadError, decode_reply, code, b"x")
            self.assertIn("1 unexpected data bytes", str(error))

    def test_macro_name_without_value(self):
        """A macro name with no value after it is a PayloadError naming the macro."""
        error = self.assertRaises(PayloadError, decode_command, b"D", b"Cj\0mx\0{x}\0")
        self.assertIn("{x}", str(error))
        self.assertIn("no value", str(error))

    def test_wrong_string_count(self):
        """Too few or too many strings for the layout are PayloadErrors."""
        cases = [
            (decode_command, b"L", b"Subject\0"),
            (decode_command, b"L", b"a\0b\0c\0"),
            (decode_command, b"H", b"a\0b\0"),
            (decode_command, b"M", b""),
            (decode_command, b"R", b""),
            (decode_reply, b"e", b"a\0b\0c\0"),
            (decode_reply, b"h", b""),
            (decode_reply, b"y", b"550\0more\0"),
        ]
        for decode, code, payload in cases:
            self.assertRaises(PayloadError, decode, code, payload)

    def test_indexed_header_without_index(self):
        """An 'i' or 'm' reply shorter than its 4-byte index is a PayloadError."""
        for code in (b"i", b"m"):
            error = self.assertRaises(PayloadError, decode_reply, code, b"\0\0\0")
            self.assertIn("index", str(error))

    def test_encoder_refuses_nul_in_strings(self):
        """Encoding a string field that contains NUL raises ValueError instead of misframing."""
        for message in (Helo(b"a\0b"), Header(b"X", b"a\0b"), Mail(b"<a>", [b"X=\0"]),
                        Macro(b"C", {b"j": b"a\0b"}), Connect(b"h\0", b"4", 1, b"a"),
                        ReplyCode(b"550\0"), ChangeFrom(b"<a>", b"\0"),
                        Negotiate(6, 0x100, 0, {1: [b"a\0b"]})):
            self.assertRaises(ValueError, message.encode)

    def test_errors_are_protocol_errors(self):
        """All the codec's error types derive from ProtocolError."""
        for error in (FrameError, UnknownCodeError, PayloadError, NegotiationError):
            self.assertTrue(issubclass(error, ProtocolError))


# ------------------------------------------------------------------ framing


STREAM = b"".join(packet for packet, _ in COMMAND_VECTORS[:12])
STREAM_FRAMES = [(packet[4:5], packet[5:]) for packet, _ in COMMAND_VECTORS[:12]]


class FrameDecoderTests(SynchronousTestCase):
    """The incremental splitter from bytes to (code, payload) frames."""

    def test_many_frames_in_one_feed(self):
        """One feed holding many packets returns all their frames in order."""
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(STREAM), STREAM_FRAMES)
        self.assertEqual(decoder.pending, 0)

    def test_every_split_point(self):
        """Splitting the stream in two at any byte gives the same frames."""
        for split in range(len(STREAM) + 1):
            decoder = FrameDecoder()
            frames = decoder.feed(STREAM[:split]) + decoder.feed(STREAM[split:])
            self.assertEqual(frames, STREAM_FRAMES, split)
            self.assertEqual(decoder.pending, 0)

    def test_byte_by_byte(self):
        """Feeding one byte at a time gives the same frames, each as soon as it is complete."""
        decoder = FrameDecoder()
        frames = []
        for index in range(len(STREAM)):
            frames += decoder.feed(STREAM[index:index + 1])
        self.assertEqual(frames, STREAM_FRAMES)
        self.assertEqual(decoder.pending, 0)

    @settings(deadline=None, max_examples=60)
    @given(st.lists(st.integers(0, len(STREAM)), max_size=12))
    def test_random_splits(self, cuts):
        """Any set of cut points gives the same frames."""
        cuts = sorted(cuts)
        decoder = FrameDecoder()
        frames = []
        for start, end in zip([0] + cuts, cuts + [len(STREAM)]):
            frames += decoder.feed(STREAM[start:end])
        self.assertEqual(frames, STREAM_FRAMES)

    def test_pending(self):
        """pending counts the received bytes of the unfinished packet only."""
        decoder = FrameDecoder()
        self.assertEqual(decoder.pending, 0)
        self.assertEqual(decoder.feed(b""), [])
        self.assertEqual(decoder.feed(b"\0\0"), [])
        self.assertEqual(decoder.pending, 2)
        self.assertEqual(decoder.feed(b"\0\x03Hx"), [])
        self.assertEqual(decoder.pending, 6)
        self.assertEqual(decoder.feed(b"\0" b"\0\0\0\x01N" b"\0\0\0"),
                         [(b"H", b"x\0"), (b"N", b"")])
        self.assertEqual(decoder.pending, 3)
        self.assertEqual(decoder.feed(b"\x01c"), [(b"c", b"")])
        self.assertEqual(decoder.pending, 0)

    def test_memory_follows_received_bytes(self):
        """A header claiming 1 MiB followed by 10 bytes keeps only those 15 bytes buffered."""
        decoder = FrameDecoder(max_size=2 * 1024 * 1024)
        self.assertEqual(decoder.feed(struct.pack("!I", 1024 * 1024) + b"B" + b"x" * 10), [])
        self.assertEqual(decoder.pending, 15)
        self.assertEqual(decoder.feed(b"y" * 5), [])
        self.assertEqual(decoder.pending, 20)

    def test_accepts_bytearray_and_memoryview(self):
        """feed takes any bytes-like object and returns bytes frames."""
        decoder = FrameDecoder()
        frames = decoder.feed(bytearray(STREAM[:7])) + decoder.feed(memoryview(STREAM[7:]))
        self.assertEqual(frames, STREAM_FRAMES)
        for code, payload in frames:
            self.assertIs(type(code), bytes)
            self.assertIs(type(payload), bytes)


# ------------------------------------------------------------------ round trips

_string = st.binary(max_size=40).map(lambda b: b.replace(b"\0", b""))
_raw = st.binary(max_size=300)
_uint32 = st.integers(0, 2**32 - 1)
_symbol = st.binary(min_size=1, max_size=20).filter(
    lambda b: not any(ch in b for ch in b"\0 ,\t\r\n\x0b\x0c"))


def _connects():
    inet = st.builds(
        Connect, _string, st.sampled_from([b"4", b"6", b"L"]), st.integers(0, 65535),
        _string.filter(lambda a: a[:5].lower() != b"ipv6:"))
    return st.one_of(st.builds(Connect, _string), inet)


_COMMANDS = st.one_of(
    st.sampled_from([ABORT, DATA, END_OF_HEADERS, END_OF_MESSAGE, QUIT, QUIT_NEW_CONNECTION]),
    st.builds(Negotiate, _uint32, _uint32, _uint32, st.just({})),
    st.builds(Macro, st.binary(min_size=1, max_size=1), st.dictionaries(_string, _string)),
    _connects(),
    st.builds(Helo, _string),
    st.builds(Mail, _string, st.lists(_string, max_size=4)),
    st.builds(Rcpt, _string, st.lists(_string, max_size=4)),
    st.builds(Header, _string, _string),
    st.builds(Body, _raw),
    st.builds(EndOfMessage, _raw),
    st.builds(Unknown, _string),
)

_REPLIES = st.one_of(
    st.sampled_from([CONTINUE, ACCEPT, REJECT, TEMPFAIL, DISCARD, SKIP, SHUTDOWN, PROGRESS]),
    st.builds(Negotiate, _uint32, _uint32, _uint32,
              st.dictionaries(_uint32, st.lists(_symbol, max_size=4), max_size=7)),
    st.builds(ReplyCode, _string),
    st.builds(Quarantine, _string),
    st.builds(AddHeader, _string, _string),
    st.builds(InsertHeader, _uint32, _string, _string),
    st.builds(ChangeHeader, _uint32, _string, _string),
    st.builds(AddRecipient, _string),
    st.builds(DeleteRecipient, _string),
    st.builds(AddRecipientPar, _string, st.none() | _string),
    st.builds(ChangeFrom, _string, st.none() | _string),
    st.builds(ReplaceBody, _raw),
)


class RoundTripTests(SynchronousTestCase):
    """encode -> FrameDecoder -> decode gives back an equal message."""

    @settings(deadline=None, max_examples=300)
    @given(_COMMANDS)
    def test_commands(self, message):
        """Every command type survives encode and decode unchanged."""
        self.assertEqual(_decode_packet(message.encode(), decode_command), message)

    @settings(deadline=None, max_examples=300)
    @given(_REPLIES)
    def test_replies(self, message):
        """Every reply type survives encode and decode unchanged."""
        self.assertEqual(_decode_packet(message.encode(), decode_reply), message)

    @settings(deadline=None, max_examples=50)
    @given(st.lists(_COMMANDS, max_size=8), st.integers(1, 50))
    def test_command_stream(self, messages, chunk):
        """A stream of commands fed in fixed-size chunks decodes to the same messages."""
        stream = b"".join(message.encode() for message in messages)
        decoder = FrameDecoder()
        frames = []
        for start in range(0, len(stream), chunk):
            frames += decoder.feed(stream[start:start + chunk])
        self.assertEqual([decode_command(*frame) for frame in frames], messages)
        self.assertEqual(decoder.pending, 0)


# ------------------------------------------------------------------ robustness

_VALID_PACKETS = st.one_of(_COMMANDS, _REPLIES).map(lambda message: message.encode())
_MAX_SIZES = st.sampled_from([1, 8, 64, c.DEFAULT_MAX_PACKET_SIZE])


class RobustnessTests(SynchronousTestCase):
    """Hostile bytes raise only ProtocolError subclasses, and quickly."""

    def _survive(self, data, max_size):
        """Feed data and decode every frame both ways; only ProtocolError may escape."""
        started = time.perf_counter()
        try:
            frames = FrameDecoder(max_size).feed(data)
        except ProtocolError:
            frames = []
        for code, payload in frames:
            for decode in (decode_command, decode_reply):
                try:
                    decode(code, payload)
                except ProtocolError:
                    pass
        self.assertLess(time.perf_counter() - started, 1.0)

    @settings(deadline=None, max_examples=300)
    @given(st.binary(max_size=200), _MAX_SIZES)
    def test_random_bytes(self, data, max_size):
        """Random bytes never raise anything but ProtocolError."""
        self._survive(data, max_size)

    @settings(deadline=None, max_examples=200)
    @given(st.sampled_from(sorted(COMMAND_TYPES) + sorted(REPLY_TYPES) + [b"X"]),
           st.binary(max_size=60))
    def test_random_payload_behind_valid_code(self, code, payload):
        """A well-framed packet with a known code and random payload fails only cleanly."""
        self._survive(encode_frame(code, payload), c.DEFAULT_MAX_PACKET_SIZE)

    @settings(deadline=None, max_examples=200)
    @given(_VALID_PACKETS, st.data())
    def test_truncated_packets(self, packet, data):
        """Valid packets cut short, as a stream or with the length fixed up, fail only cleanly."""
        cut = data.draw(st.integers(0, max(0, len(packet) - 1)))
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(packet[:cut]), [])
        self.assertEqual(decoder.pending, cut)
        if cut >= 5:
            self._survive(encode_frame(packet[4:5], packet[5:cut]), c.DEFAULT_MAX_PACKET_SIZE)

    @settings(deadline=None, max_examples=300)
    @given(_VALID_PACKETS, st.data(), _MAX_SIZES)
    def test_bit_flipped_packets(self, packet, data, max_size):
        """Valid packets with a flipped bit anywhere fail only cleanly."""
        bits = data.draw(st.lists(st.integers(0, len(packet) * 8 - 1), min_size=1, max_size=3))
        flipped = bytearray(packet)
        for bit in bits:
            flipped[bit // 8] ^= 1 << (bit % 8)
        self._survive(bytes(flipped), max_size)

    def test_many_symbol_lists_decode_in_linear_time(self):
        """A 750 KB negotiate reply of 150,000 tiny symbol lists decodes well within a second."""
        payload = struct.pack("!III", 6, 0x100, 0) + b"\0\0\0\x01\0" * 150_000
        started = time.perf_counter()
        self.assertEqual(decode_reply(b"O", payload).macros, {1: []})
        self.assertLess(time.perf_counter() - started, 1.0)


# ------------------------------------------------------------------ negotiation


class AnswerTests(SynchronousTestCase):
    """negotiation.answer: the milter's reply to an MTA offer."""

    def test_reply_version(self):
        """The reply version is min(6, offered) for offers of 2, 3, 4, 6 and newer."""
        for offered, expected in ((2, 2), (3, 3), (4, 4), (6, 6), (7, 6), (255, 6)):
            reply, _ = answer(Negotiate(offered, 0x1FF, 0x1FFFFF), 0, 0)
            self.assertEqual(reply.version, expected, offered)

    def test_offer_below_2(self):
        """Offers of version 0 and 1 are refused with NegotiationError."""
        for version in (0, 1):
            error = self.assertRaises(NegotiationError, answer, Negotiate(version, 0x1FF, 0x7F),
                                      0, 0)
            self.assertIn(str(version), str(error))
            self.assertRaises(NegotiationError, offer, version)

    def test_offer_per_version(self):
        """offer() gives Postfix's step flags for each version, and all actions."""
        for version, protocol in ((2, 0x7F), (3, 0x17F), (4, 0x37F), (6, 0x1FFFFF)):
            self.assertEqual(offer(version), Negotiate(version, 0x1FF, protocol, {}))
        self.assertEqual(offer().encode(), COMMAND_VECTORS[0][0])

    def test_zero_actions_mean_v1(self):
        """Offered actions 0 stand for SMFI_V1_ACTS: those four are allowed, others not."""
        mta = Negotiate(6, 0, 0x1FFFFF)
        reply, _ = answer(mta, c.SMFI_V1_ACTS, 0)
        self.assertEqual(reply.actions, c.SMFI_V1_ACTS)
        self.assertRaises(NegotiationError, answer, mta, c.SMFIF_QUARANTINE, 0)

    def test_zero_protocol_means_v1(self):
        """Offered protocol 0 stands for SMFI_V1_PROT: NOCONNECT..NOHDRS may be asked for."""
        reply, _ = answer(Negotiate(2, 0x1FF, 0), 0, c.SMFI_V1_PROT)
        self.assertEqual(reply.protocol, c.SMFI_V1_PROT)
        self.assertRaises(NegotiationError, answer, Negotiate(2, 0x1FF, 0), 0, c.SMFIP_NOEOH)

    def test_unoffered_actions(self):
        """Asking for an action the MTA did not offer is a NegotiationError naming both."""
        error = self.assertRaises(
            NegotiationError, answer, Negotiate(6, c.SMFIF_ADDHDRS, 0x1FFFFF),
            c.SMFIF_ADDHDRS | c.SMFIF_CHGBODY, 0)
        self.assertIn("0x3", str(error))
        self.assertIn("0x1", str(error))

    def test_unoffered_protocol_flags(self):
        """Asking for a non-NR step flag the MTA did not offer is a NegotiationError."""
        self.assertRaises(NegotiationError, answer, offer(2), 0, c.SMFIP_SKIP)
        self.assertRaises(NegotiationError, answer, offer(4), 0, c.SMFIP_HDR_LEADSPC)

    def test_unoffered_no_reply_flags_are_faked(self):
        """NR flags the MTA did not offer leave the reply and come back as 'to fake'."""
        wanted = c.SMFIP_NOHELO | c.SMFIP_NR_CONN | c.SMFIP_NR_HDR | c.SMFIP_NR_BODY
        reply, faked = answer(offer(2), 0, wanted)
        self.assertEqual(reply.protocol, c.SMFIP_NOHELO)
        self.assertEqual(faked, c.SMFIP_NR_CONN | c.SMFIP_NR_HDR | c.SMFIP_NR_BODY)

    def test_offered_no_reply_flags_are_kept(self):
        """NR flags the MTA offered stay in the reply and nothing is faked."""
        wanted = c.SMFIP_NR_CONN | c.SMFIP_NR_HDR | c.SMFIP_SKIP
        reply, faked = answer(offer(6), c.SMFIF_ADDHDRS, wanted)
        self.assertEqual((reply.protocol, faked), (wanted, 0))
        self.assertEqual(reply.actions, c.SMFIF_ADDHDRS)

    def test_nodata_nounknown_dropped(self):
        """NODATA and NOUNKNOWN vanish silently when the MTA's version lacks them."""
        wanted = c.SMFIP_NODATA | c.SMFIP_NOUNKNOWN | c.SMFIP_NOMAIL
        for version, kept in ((2, c.SMFIP_NOMAIL),
                              (3, c.SMFIP_NOMAIL | c.SMFIP_NOUNKNOWN),
                              (4, wanted), (6, wanted)):
            reply, faked = answer(offer(version), 0, wanted)
            self.assertEqual((reply.protocol, faked), (kept, 0), version)

    def test_mds_echoed_only_when_asked_and_offered(self):
        """An MDS bit is echoed only if the milter asked for it and the MTA offered it."""
        k256, m1 = c.SMFIP_MDS_256K, c.SMFIP_MDS_1M
        table = [  # (offered, asked, echoed)
            (0, 0, 0),
            (0, k256, 0),
            (0, m1, 0),
            (0, k256 | m1, 0),
            (k256, 0, 0),
            (m1, 0, 0),
            (k256 | m1, 0, 0),
            (k256, k256, k256),
            (m1, m1, m1),
            (k256, m1, 0),
            (m1, k256, 0),
            (k256, k256 | m1, k256),
            (m1, k256 | m1, m1),
            (k256 | m1, m1, m1),
            (k256 | m1, k256 | m1, k256 | m1),
        ]
        for offered, asked, echoed in table:
            reply, faked = answer(Negotiate(6, 0x1FF, 0x1FFFFF | offered), 0,
                                  c.SMFIP_NOHELO | asked)
            self.assertEqual((reply.protocol, faked), (c.SMFIP_NOHELO | echoed, 0),
                             (offered, asked))

    def test_symbol_lists_when_offered(self):
        """Symbol lists go into the reply, with SETSYMLIST, when the MTA offers SETSYMLIST."""
        reply, _ = answer(offer(6), c.SMFIF_ADDHDRS, 0, {2: [b"{auth_authen}", b"i"]})
        self.assertEqual(reply.macros, {2: [b"{auth_authen}", b"i"]})
        self.assertEqual(reply.actions, c.SMFIF_ADDHDRS | c.SMFIF_SETSYMLIST)
        self.assertEqual(reply.encode(), REPLY_VECTORS[1][0])

    def test_symbol_lists_dropped_when_not_offered(self):
        """Without SETSYMLIST in the offer the reply carries no symbol lists."""
        mta = Negotiate(6, 0xFF, 0x1FFFFF)
        reply, _ = answer(mta, c.SMFIF_ADDHDRS, 0, {2: [b"i"]})
        self.assertEqual((reply.macros, reply.actions), ({}, c.SMFIF_ADDHDRS))
        self.assertEqual(len(reply.encode()), 17)


class AcceptTests(SynchronousTestCase):
    """negotiation.accept: the MTA side checking a milter's reply."""

    def test_higher_version_refused(self):
        """A reply version above the offered one is a NegotiationError."""
        self.assertRaises(NegotiationError, accept, offer(4), Negotiate(6, 0, 0))
        self.assertRaises(NegotiationError, accept, offer(6), Negotiate(7, 0, 0))

    def test_version_below_2_refused(self):
        """A reply version of 1 is a NegotiationError."""
        self.assertRaises(NegotiationError, accept, offer(6), Negotiate(1, 0, 0))

    def test_lower_version_allowed(self):
        """A lower reply version is fine; U and T are then not sent."""
        for version in (2, 3, 4):
            options = accept(offer(6), Negotiate(version, c.SMFIF_ADDHDRS, c.SMFIP_NOHELO))
            self.assertEqual((options.version, options.actions), (version, c.SMFIF_ADDHDRS))
            self.assertFalse(options.sends(c.HELO))
            self.assertEqual(options.sends(c.UNKNOWN), version >= 3)
            self.assertEqual(options.sends(c.DATA), version >= 4)

    def test_unoffered_actions_refused(self):
        """Reply actions outside the offer are a NegotiationError."""
        mta = Negotiate(6, c.SMFIF_ADDHDRS, 0x1FFFFF)
        self.assertRaises(NegotiationError, accept, mta,
                          Negotiate(6, c.SMFIF_ADDHDRS | c.SMFIF_CHGBODY, 0))

    def test_keeps_offered_flags_and_symbol_lists(self):
        """Accepted options carry the reply's flags and symbol lists."""
        reply = Negotiate(6, 0x101, c.SMFIP_NR_HDR | c.SMFIP_SKIP, {2: [b"i"]})
        options = accept(offer(6), reply)
        self.assertEqual(options, Options(6, 0x101, c.SMFIP_NR_HDR | c.SMFIP_SKIP, {2: [b"i"]}))
        self.assertEqual(options.macro_names(c.MAIL), [b"i"])
        self.assertIsNone(options.macro_names(c.HELO))

    def test_nr_hdr_from_older_milter(self):
        """NR_HDR (NOHREPL, since 8.13) in a v2-v4 reply is honoured, as Postfix does."""
        for version in (2, 3, 4):
            options = accept(offer(6), Negotiate(version, 0, c.SMFIP_NR_HDR))
            self.assertFalse(options.replies(c.HEADER), version)

    def test_unoffered_flags_ignored(self):
        """Step bits the MTA did not offer are dropped from the accepted options."""
        options = accept(offer(2), Negotiate(2, 0, c.SMFIP_NOHELO | c.SMFIP_NR_CONN))
        self.assertEqual(options.protocol, c.SMFIP_NOHELO)

    def test_mds_only_when_offered(self):
        """An MDS bit counts only if the MTA offered it."""
        self.assertEqual(accept(offer(6), Negotiate(6, 0, c.SMFIP_MDS_1M)).max_data_size, 65535)
        mta = Negotiate(6, 0x1FF, 0x1FFFFF | c.SMFIP_MDS_1M)
        self.assertEqual(accept(mta, Negotiate(6, 0, c.SMFIP_MDS_1M)).max_data_size, 1048575)

    def test_answer_then_accept(self):
        """What answer() replies, accept() takes without complaint, for every version."""
        for version in (2, 3, 4, 6):
            mta = offer(version)
            reply, _ = answer(mta, c.SMFIF_ADDHDRS, c.SMFIP_NOHELO | c.SMFIP_NR_CONN)
            options = accept(mta, reply)
            self.assertEqual(options.version, version)
            self.assertFalse(options.sends(c.HELO))


class OptionsTests(SynchronousTestCase):
    """Options: which commands are sent and which are answered."""

    def test_sends_by_no_flags(self):
        """Each NO flag stops exactly its command; D A E O Q K are always sent."""
        for code, flag in c.NO_FLAG.items():
            options = Options(6, 0x1FF, flag)
            for other in COMMAND_TYPES:
                self.assertEqual(options.sends(other), other != code, (code, other))

    def test_sends_by_version(self):
        """No 'T' below version 4 and no 'U' below version 3."""
        for version, unknown, data in ((2, False, False), (3, True, False),
                                       (4, True, True), (6, True, True)):
            options = Options(version, 0x1FF, 0)
            self.assertEqual(options.sends(c.UNKNOWN), unknown, version)
            self.assertEqual(options.sends(c.DATA), data, version)
            self.assertTrue(options.sends(c.HELO))

    def test_replies_by_nr_flags(self):
        """Each NR flag silences exactly its command's reply."""
        for code, flag in c.NO_REPLY_FLAG.items():
            options = Options(6, 0x1FF, flag)
            for other in COMMAND_TYPES:
                expected = other != code and other not in c.COMMANDS_WITHOUT_REPLY
                self.assertEqual(options.replies(other), expected, (code, other))

    def test_never_replies(self):
        """D A Q K never get a reply; E and O always do, whatever the flags."""
        options = Options(6, 0x1FF, 0)
        for code in (c.MACRO, c.ABORT, c.QUIT, c.QUIT_NEW_CONNECTION):
            self.assertFalse(options.replies(code))
        everything = Options(6, 0x1FF, 0xFFFFFFFF)
        for code in (c.END_OF_MESSAGE, c.NEGOTIATE):
            self.assertTrue(options.replies(code))
            self.assertTrue(everything.replies(code))

    def test_max_data_size(self):
        """max_data_size is 65535, 262143 with MDS_256K, 1048575 with MDS_1M."""
        self.assertEqual(Options().max_data_size, 65535)
        self.assertEqual(Options(protocol=c.SMFIP_MDS_256K).max_data_size, 262143)
        self.assertEqual(Options(protocol=c.SMFIP_MDS_1M).max_data_size, 1048575)
        both = Options(protocol=c.SMFIP_MDS_256K | c.SMFIP_MDS_1M)
        self.assertEqual(both.max_data_size, 1048575)

    def test_allows(self):
        """allows() reports whether an action flag was negotiated."""
        options = Options(6, c.SMFIF_ADDHDRS | c.SMFIF_QUARANTINE, 0)
        self.assertTrue(options.allows(c.SMFIF_QUARANTINE))
        self.assertFalse(options.allows(c.SMFIF_CHGBODY))
