"""Tests for protocol.replycode: which SMFIR_REPLYCODE texts both MTAs take; lone % doubled."""

from twisted.trial.unittest import SynchronousTestCase

from miltermanager.protocol import ProtocolError, replycode
from miltermanager.protocol.errors import PayloadError, ReplyCodeError
from miltermanager.protocol.messages import REJECT, TEMPFAIL

# (text, normalised text): texts libmilter's smfi_setreply/smfi_setmlreply build.
VALID = [
    (b"550 5.7.1 Go away", b"550 5.7.1 Go away"),
    (b"451 4.7.1 try later", b"451 4.7.1 try later"),
    (b"550 ", b"550 "),
    (b"550 Go away", b"550 Go away"),
    (b"421 4.7.0 closing", b"421 4.7.0 closing"),
    (b"554 5.7.1", b"554 5.7.1"),
    (b"550 5.123.456 wide enhanced code", b"550 5.123.456 wide enhanced code"),
    (b"450 4 fewer minutes", b"450 4 fewer minutes"),
    (b"550 \xc3\xa9t\xc3\xa9 8-bit text", b"550 \xc3\xa9t\xc3\xa9 8-bit text"),
    (b"550-5.7.1 a\r\n550 5.7.1 b", b"550-5.7.1 a\r\n550 5.7.1 b"),
    (b"451-first\r\n451-second\r\n451 third", b"451-first\r\n451-second\r\n451 third"),
    (b"\r\n".join([b"550-5.7.1 x"] * 31 + [b"550 5.7.1 x"]),
     b"\r\n".join([b"550-5.7.1 x"] * 31 + [b"550 5.7.1 x"])),
    # A lone '%' is doubled; '%%' stays (both MTAs show it as one '%').
    (b"550 5.7.1 100% spam", b"550 5.7.1 100%% spam"),
    (b"550 5.7.1 100%% spam", b"550 5.7.1 100%% spam"),
    (b"550 5.7.1 %", b"550 5.7.1 %%"),
    (b"550 5.7.1 %%%", b"550 5.7.1 %%%%"),
    (b"550 5.7.1 %s and %d", b"550 5.7.1 %%s and %%d"),
    (b"550-5.7.1 50%\r\n550 5.7.1 %%ok", b"550-5.7.1 50%%\r\n550 5.7.1 %%ok"),
]

# (text, the reason the error gives): each breaks one rule.
INVALID = [
    (b"", "it is empty"),
    (b"hello world", "it does not start with a 3-digit reply code"),
    (b" 550 x", "it does not start with a 3-digit reply code"),
    (b"250 ok", "reply code 250 is neither 4xx nor 5xx: a milter's reply code rejects or "
                "tempfails"),
    (b"354 go ahead", "reply code 354 is neither 4xx nor 5xx: a milter's reply code rejects "
                      "or tempfails"),
    (b"650 x", "reply code 650 is neither 4xx nor 5xx: a milter's reply code rejects or "
               "tempfails"),
    (b"550", "reply code 550 is not followed by a space or '-'"),
    (b"550\tx", "reply code 550 is not followed by a space or '-'"),
    (b"55 x", "reply code 55 does not have 3 digits"),
    (b"5500 x", "reply code 5500 does not have 3 digits"),
    (b"550 4.7.1 x", "enhanced status code 4.7.1 is not of reply code 550's class 5"),
    (b"451 5.7.1 x", "enhanced status code 5.7.1 is not of reply code 451's class 4"),
    (b"550 2.0.0 ok", "enhanced status code 2.0.0 is not of reply code 550's class 5"),
    (b"550 100% sure", "the text after reply code 550 starts with 1; Postfix takes a digit "
                       "there as an enhanced status class, which must be 5"),
    (b"550-a", "the last line has '-' after the reply code, not a space"),
    (b"550 a\r\n550 b", "line 1: a space after the reply code, but more lines follow "
                        "('-' continues a reply)"),
    (b"550-a\r\n451 b", "line 2: reply code 451 differs from line 1's 550"),
    (b"550-a\r\n550-b", "line 2: the last line has '-' after the reply code, not a space"),
    (b"550-a\r\nb", "line 2: it does not start with a 3-digit reply code"),
    (b"550-5.7.1 a\r\n550 4.7.1 b",
     "line 2: enhanced status code 4.7.1 is not of reply code 550's class 5"),
    (b"550 a\nb", "a bare LF; lines must be separated by CRLF"),
    (b"550-a\n550 b", "a bare LF; lines must be separated by CRLF"),
    (b"550 a\rb", "a bare CR; lines must be separated by CRLF"),
    (b"550-a\r\n550 b\rc", "line 2: a bare CR; lines must be separated by CRLF"),
    (b"550 a\r\n", "it ends with CRLF"),
    (b"550-a\r\n550 b\r\n", "it ends with CRLF"),
    (b"550 a\0b", "it contains a NUL byte"),
    (b"\r\n".join([b"550-x"] * 32 + [b"550 x"]),
     "it has 33 lines; libmilter sends at most 32"),
]


class NormalizeTests(SynchronousTestCase):
    """replycode.normalize: the text to send on, or what is wrong with it."""

    def test_valid(self):
        """Each valid text comes back as spelled out, '%' doubled where lone."""
        for text, expected in VALID:
            self.assertEqual(replycode.normalize(text), expected, text)

    def test_invalid(self):
        """Each invalid text raises ReplyCodeError whose message names the text and the rule."""
        for text, reason in INVALID:
            error = self.assertRaises(ReplyCodeError, replycode.normalize, text)
            self.assertEqual(error.reason, reason, text)
            self.assertEqual(error.text, text)
            if len(text) <= 80:
                self.assertEqual(str(error), f"invalid SMTP reply {text!r}: {reason}")

    def test_error_is_a_protocol_error(self):
        """ReplyCodeError is a PayloadError, hence a ProtocolError."""
        error = self.assertRaises(ReplyCodeError, replycode.normalize, b"hello world")
        self.assertIsInstance(error, PayloadError)
        self.assertIsInstance(error, ProtocolError)

    def test_message_is_one_short_line(self):
        """A long or multi-line text is shown shortened, escaped, on one line."""
        text = b"\r\n".join([b"550-" + b"x" * 100] * 40)
        error = self.assertRaises(ReplyCodeError, replycode.normalize, text)
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertNotIn("\r", message)
        self.assertEqual(
            message, f"invalid SMTP reply {text[:80] + b'...'!r}: "
                     "it has 40 lines; libmilter sends at most 32")

    def test_unchanged_text_is_returned_as_is(self):
        """A text without '%' is returned itself, not a copy."""
        text = b"550 5.7.1 Go away"
        self.assertIs(replycode.normalize(text), text)


class StatusTests(SynchronousTestCase):
    """replycode.status: the plain reply a reply code's class stands for."""

    def test_status(self):
        """4xx stands for TEMPFAIL, 5xx for REJECT, anything else for None."""
        table = [
            (b"451 4.7.1 later", TEMPFAIL),
            (b"421 4.7.0 closing", TEMPFAIL),
            (b"550 5.7.1 Go away", REJECT),
            (b"554-a\r\n554 b", REJECT),
            (b"550 4.7.1 broken but a reject", REJECT),
            (b"250 ok", None),
            (b"hello world", None),
            (b"", None),
        ]
        for text, expected in table:
            self.assertIs(replycode.status(text), expected, text)
