"""Unit tests for miltermanager.client on a string transport and a fake clock."""

import socket

from twisted.internet import defer, error, task
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from miltermanager import client, sockets
from miltermanager.server import MilterServerFactory
from miltermanager.testing import Script, ScriptedMilter
from miltermanager.client import (
    MilterClientProtocol, MilterConnectError, MilterConnectionLost, MilterTimeoutError,
    Response, Timeouts,
)
from miltermanager.protocol import constants as c
from miltermanager.protocol import errors, negotiation
from miltermanager.protocol.framing import FrameDecoder
from miltermanager.protocol.messages import (
    ABORT, CONTINUE, DATA, END_OF_HEADERS, END_OF_MESSAGE, PROGRESS, QUIT, REJECT, SKIP,
    AddHeader, Body, ChangeHeader, Connect, Header, Helo, Macro, Mail, Negotiate, Quarantine,
    Rcpt, ReplaceBody, ReplyCode, Unknown,
)

try:
    from twisted.internet.testing import MemoryReactorClock, StringTransport
except ImportError:  # Twisted < 21.2
    from twisted.test.proto_helpers import MemoryReactorClock, StringTransport

CONNECT = Connect(b"client.example.net", c.FAMILY_INET, 52258, b"192.0.2.10")
HELO = Helo(b"client.example.net")
MAIL = Mail(b"<a@example.net>")
RCPT = Rcpt(b"<b@example.org>")


class ClientTestCase(unittest.TestCase):
    """A MilterClientProtocol connected to a StringTransport, timed by a task.Clock."""

    timeouts = Timeouts(connection=10.0, writing=3.0, reading=5.0, end_of_message=20.0)

    def setUp(self):
        self.clock = task.Clock()
        self.connect()

    def connect(self):
        """A new protocol on a new transport, the clock kept."""
        self.transport = StringTransport()
        self.protocol = MilterClientProtocol(self.clock, self.timeouts)
        self.protocol.makeConnection(self.transport)

    def written(self):
        """Return and clear what the protocol wrote."""
        data = self.transport.value()
        self.transport.clear()
        return data

    def reply(self, *messages):
        """Feed the protocol the packets of the given reply messages, all at once."""
        self.protocol.dataReceived(b"".join(message.encode() for message in messages))

    def negotiated(self, version=6, actions=c.SMFI_CURR_ACTS, protocol=0):
        """Negotiate with the child answering (version, actions, protocol); return Options."""
        d = self.protocol.negotiate()
        self.written()
        self.reply(Negotiate(version, actions, protocol))
        return self.successResultOf(d)

    def lose(self, message="gone"):
        """Simulate the transport closing under the protocol."""
        self.protocol.connectionLost(Failure(error.ConnectionDone(message)))

    def assertIdleTimerHarmless(self):
        """The reading timer a reply leaves armed runs out without a word: no drop, nothing left."""
        self.clock.advance(max(self.timeouts.reading, self.timeouts.end_of_message) + 1)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class NegotiationTests(ClientTestCase):
    """negotiate(): the offer, the checks on the reply, Options."""

    def test_default_offer(self):
        """The default offer is Postfix's and Sendmail's: v6, actions 0x1FF, steps 0x1FFFFF."""
        self.protocol.negotiate()
        self.assertEqual(self.written(), bytes.fromhex("0000000d4f00000006000001ff001fffff"))

    def test_negotiation_ok(self):
        """A fitting reply fires with Options and is kept as options and negotiate_reply."""
        d = self.protocol.negotiate()
        reply = Negotiate(6, c.SMFIF_ADDHDRS, c.SMFIP_NOHELO | c.SMFIP_NR_RCPT, {2: [b"{auth_authen}"]})
        self.reply(reply)
        options = self.successResultOf(d)
        self.assertEqual(options, negotiation.Options(6, c.SMFIF_ADDHDRS,
                                                      c.SMFIP_NOHELO | c.SMFIP_NR_RCPT,
                                                      {2: [b"{auth_authen}"]}))
        self.assertIs(self.protocol.options, options)
        self.assertEqual(self.protocol.negotiate_reply, reply)
        self.assertFalse(options.sends(c.HELO))
        self.assertFalse(options.replies(c.RCPT))

    def test_lower_version_accepted(self):
        """A child answering version 2 is fine; DATA and UNKNOWN are then not sent."""
        options = self.negotiated(version=2, actions=c.SMFI_V2_ACTS)
        self.assertEqual(options.version, 2)
        self.assertFalse(options.sends(c.DATA))
        self.assertFalse(options.sends(c.UNKNOWN))

    def test_custom_offer(self):
        """negotiate(offer) sends that offer and checks the reply against it."""
        d = self.protocol.negotiate(negotiation.offer(2))
        self.assertEqual(self.written(), Negotiate(2, 0x1FF, 0x7F).encode())
        self.reply(Negotiate(2, 0x3F, 0))
        self.assertEqual(self.successResultOf(d).version, 2)

    def test_version_too_high(self):
        """A reply version above the offer fails with NegotiationError and drops the connection."""
        d = self.protocol.negotiate(negotiation.offer(4))
        self.reply(Negotiate(6, 0, 0))
        self.failureResultOf(d, errors.NegotiationError)
        self.assertTrue(self.transport.disconnecting)

    def test_actions_not_offered(self):
        """Asking for actions the MTA side did not offer fails the negotiation."""
        d = self.protocol.negotiate(negotiation.offer(6, actions=c.SMFIF_ADDHDRS))
        self.reply(Negotiate(6, c.SMFIF_ADDHDRS | c.SMFIF_CHGBODY, 0))
        failure = self.failureResultOf(d, errors.NegotiationError)
        self.assertIn("actions 0x3", failure.getErrorMessage())
        self.assertTrue(self.transport.disconnecting)

    def test_other_reply_to_negotiate(self):
        """A reply other than O to the negotiation is a protocol error."""
        d = self.protocol.negotiate()
        self.reply(CONTINUE)
        self.failureResultOf(d, errors.ProtocolError)
        self.assertTrue(self.transport.disconnecting)

    def test_commands_queued_behind_negotiation_obey_it(self):
        """Commands sent before the reply to O follow the negotiated flags once it arrives."""
        self.protocol.negotiate()
        helo = self.protocol.send(HELO)
        mail = self.protocol.send(MAIL)
        self.written()
        self.reply(Negotiate(6, 0, c.SMFIP_NOHELO | c.SMFIP_NR_MAIL))
        self.assertIsNone(self.successResultOf(helo))
        self.assertIsNone(self.successResultOf(mail))
        self.assertEqual(self.written(), MAIL.encode())


class SendTests(ClientTestCase):
    """send(): replies, no-reply commands, order on the wire."""

    def setUp(self):
        super().setUp()
        self.negotiated()

    def test_reply_fires_response(self):
        """A final reply fires the command's Deferred with a Response."""
        d = self.protocol.send(CONNECT)
        self.assertEqual(self.written(), CONNECT.encode())
        self.assertNoResult(d)
        self.reply(CONTINUE)
        self.assertEqual(self.successResultOf(d), Response(CONTINUE, [], 0))

    def test_reply_code(self):
        """A ReplyCode reply arrives as the Response's reply."""
        d = self.protocol.send(RCPT)
        self.reply(ReplyCode(b"550 5.7.1 Go away"))
        self.assertEqual(self.successResultOf(d).reply, ReplyCode(b"550 5.7.1 Go away"))

    def test_commands_without_reply_fire_none(self):
        """Macro, Abort and Quit are written and fire None at once."""
        for command in (Macro(c.CONNECT, {b"j": b"mx"}), ABORT, QUIT):
            d = self.protocol.send(command)
            self.assertIsNone(self.successResultOf(d))
            self.assertEqual(self.written(), command.encode())

    def test_sequential_queueing(self):
        """A command sent while another waits goes out only after that one's reply."""
        first = self.protocol.send(HELO)
        second = self.protocol.send(MAIL)
        third = self.protocol.send(RCPT)
        self.assertEqual(self.written(), HELO.encode())
        self.reply(CONTINUE)
        self.assertEqual(self.successResultOf(first).reply, CONTINUE)
        self.assertEqual(self.written(), MAIL.encode())
        self.assertNoResult(second)
        self.assertNoResult(third)
        self.reply(REJECT)
        self.assertEqual(self.successResultOf(second).reply, REJECT)
        self.assertEqual(self.written(), RCPT.encode())
        self.reply(CONTINUE)
        self.assertEqual(self.successResultOf(third).reply, CONTINUE)

    def test_macro_then_command_order(self):
        """D packets queued behind a pending command go out before the command they precede."""
        helo = self.protocol.send(HELO)
        macro = Macro(c.MAIL, {b"{mail_addr}": b"a@example.net"})
        macro_d = self.protocol.send(macro)
        mail = self.protocol.send(MAIL)
        self.assertEqual(self.written(), HELO.encode())
        self.assertNoResult(macro_d)
        self.reply(CONTINUE)
        self.assertEqual(self.successResultOf(helo).reply, CONTINUE)
        self.assertEqual(self.written(), macro.encode() + MAIL.encode())
        self.assertIsNone(self.successResultOf(macro_d))
        self.assertNoResult(mail)
        self.reply(CONTINUE)
        self.assertEqual(self.successResultOf(mail).reply, CONTINUE)

    def test_send_from_callback_keeps_order(self):
        """A command sent from a reply's callback goes out after the commands already queued."""
        sent = []
        first = self.protocol.send(HELO)
        first.addCallback(lambda _: sent.append(self.protocol.send(RCPT)))
        second = self.protocol.send(MAIL)
        self.written()
        self.reply(CONTINUE)
        self.assertEqual(self.written(), MAIL.encode())
        self.reply(CONTINUE)
        self.successResultOf(second)
        self.assertEqual(self.written(), RCPT.encode())
        self.reply(CONTINUE)
        self.assertEqual(self.successResultOf(sent[0]).reply, CONTINUE)

    def test_two_replies_in_one_read(self):
        """Replies to two queued commands arriving in one read fire both in order."""
        helo = self.protocol.send(HELO)
        mail = self.protocol.send(MAIL)
        self.reply(CONTINUE, REJECT)
        self.assertEqual(self.successResultOf(helo).reply, CONTINUE)
        self.assertEqual(self.successResultOf(mail).reply, REJECT)

    def test_partial_packets(self):
        """A reply split over many reads fires only when complete."""
        d = self.protocol.send(RCPT)
        packet = ReplyCode(b"451 4.7.1 Later").encode()
        for i in range(len(packet) - 1):
            self.protocol.dataReceived(packet[i:i + 1])
            self.assertNoResult(d)
        self.protocol.dataReceived(packet[-1:])
        self.assertEqual(self.successResultOf(d).reply, ReplyCode(b"451 4.7.1 Later"))

    def test_skip_is_accepted(self):
        """SKIP is a final reply: normal for BODY, tolerated elsewhere."""
        body = self.protocol.send(Body(b"line\r\n"))
        self.reply(SKIP)
        self.assertEqual(self.successResultOf(body).reply, SKIP)
        helo = self.protocol.send(HELO)
        self.reply(SKIP)
        self.assertEqual(self.successResultOf(helo).reply, SKIP)

    def test_end_of_message_modifications_and_progress(self):
        """EOM collects modifications in order, counts progress, and fires on the final reply."""
        d = self.protocol.send(END_OF_MESSAGE)
        edits = [AddHeader(b"X-A", b"1"), Quarantine(b"suspicious"),
                 ChangeHeader(1, b"Subject", b"new"), ReplaceBody(b"body\r\n")]
        self.reply(PROGRESS, edits[0], PROGRESS, *edits[1:])
        self.assertNoResult(d)
        self.reply(CONTINUE)
        self.assertEqual(self.successResultOf(d), Response(CONTINUE, edits, 2))

    def test_quarantine_before_end_of_message(self):
        """Quarantine is allowed at any stage (Postfix takes it after any event)."""
        d = self.protocol.send(RCPT)
        self.reply(Quarantine(b"q"), CONTINUE)
        self.assertEqual(self.successResultOf(d), Response(CONTINUE, [Quarantine(b"q")], 0))

    def test_progress_before_end_of_message(self):
        """Progress in reply to any command but EOM fails it, naming it; the connection drops."""
        commands = [CONNECT, HELO, MAIL, RCPT, DATA, Header(b"Subject", b"Hi"), END_OF_HEADERS,
                    Body(b"x"), Unknown(b"XCMD")]
        for command in commands:
            self.lose()  # the previous connection, whose reading timer is still armed
            self.connect()
            self.negotiated()
            d = self.protocol.send(command)
            queued = self.protocol.send(END_OF_MESSAGE)
            self.reply(PROGRESS, CONTINUE)
            failure = self.failureResultOf(d, errors.ProtocolError)
            name = client.COMMAND_NAMES[command.code]
            self.assertEqual(failure.getErrorMessage(),
                             f"Progress() in reply to {name}: "
                             "progress is allowed only at END_OF_MESSAGE")
            self.failureResultOf(queued, MilterConnectionLost)
            self.assertTrue(self.transport.disconnecting, name)
            self.assertEqual(self.clock.getDelayedCalls(), [], name)

    def test_progress_in_reply_to_negotiate(self):
        """Progress in reply to the negotiation fails it too."""
        protocol = MilterClientProtocol(self.clock, self.timeouts)
        protocol.makeConnection(StringTransport())
        d = protocol.negotiate()
        protocol.dataReceived(PROGRESS.encode())
        failure = self.failureResultOf(d, errors.ProtocolError)
        self.assertIn("in reply to NEGOTIATE", failure.getErrorMessage())

    def test_modification_outside_end_of_message(self):
        """An edit in reply to a command other than EOM fails it and drops the connection."""
        d = self.protocol.send(RCPT)
        queued = self.protocol.send(Body(b"x"))
        self.reply(AddHeader(b"X-A", b"1"))
        failure = self.failureResultOf(d, errors.ProtocolError)
        self.assertIn("only at END_OF_MESSAGE", failure.getErrorMessage())
        failure = self.failureResultOf(queued, MilterConnectionLost)
        self.assertIn("before BODY was sent", failure.getErrorMessage())
        self.assertTrue(self.transport.disconnecting)

    def test_negotiate_reply_to_a_command(self):
        """An O packet in reply to another command is a protocol error."""
        d = self.protocol.send(HELO)
        self.reply(Negotiate(6, 0, 0))
        self.failureResultOf(d, errors.ProtocolError)

    def test_unexpected_reply(self):
        """A reply with nothing pending drops the connection; later sends fail at once."""
        self.reply(CONTINUE)
        self.assertTrue(self.transport.disconnecting)
        d = self.protocol.send(HELO)
        failure = self.failureResultOf(d, MilterConnectionLost)
        self.assertIn("unexpected reply", failure.getErrorMessage())
        self.assertEqual(self.written(), b"")

    def test_decode_error(self):
        """A malformed reply fails the pending command with the decode error."""
        d = self.protocol.send(HELO)
        self.protocol.dataReceived(b"\x00\x00\x00\x02c!")
        self.failureResultOf(d, errors.PayloadError)
        self.assertTrue(self.transport.disconnecting)

    def test_unknown_reply_code(self):
        """An unknown reply code fails the pending command with UnknownCodeError."""
        d = self.protocol.send(HELO)
        self.protocol.dataReceived(b"\x00\x00\x00\x01Z")
        self.failureResultOf(d, errors.UnknownCodeError)

    def test_oversized_packet(self):
        """A length over max_packet_size fails at once, before the bytes arrive."""
        protocol = MilterClientProtocol(self.clock, self.timeouts, max_packet_size=100)
        protocol.makeConnection(StringTransport())
        d = protocol.send(HELO)
        protocol.dataReceived(b"\x00\x00\x01\x00")
        self.assertNoResult(d)
        protocol.dataReceived(b"y")
        self.failureResultOf(d, errors.FrameError)

    def test_rest_of_read_ignored_after_error(self):
        """Bytes after a bad packet in the same read are not processed."""
        d = self.protocol.send(HELO)
        self.protocol.dataReceived(AddHeader(b"X", b"y").encode() + CONTINUE.encode())
        self.failureResultOf(d, errors.ProtocolError)


class NoReplyTests(ClientTestCase):
    """Commands the child negotiated no reply to, or negotiated away."""

    def test_no_reply_flag(self):
        """A command whose NR flag was negotiated is written and fires None."""
        self.negotiated(protocol=c.SMFIP_NR_CONN | c.SMFIP_NR_HELO)
        d = self.protocol.send(CONNECT)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.written(), CONNECT.encode())
        d = self.protocol.send(HELO)
        self.assertIsNone(self.successResultOf(d))
        d = self.protocol.send(MAIL)
        self.assertNoResult(d)

    def test_no_reply_command_queued(self):
        """An NR command queued behind a pending one fires None when it is written."""
        self.negotiated(protocol=c.SMFIP_NR_RCPT)
        mail = self.protocol.send(MAIL)
        rcpt = self.protocol.send(RCPT)
        self.written()
        self.assertNoResult(rcpt)
        self.reply(CONTINUE)
        self.successResultOf(mail)
        self.assertIsNone(self.successResultOf(rcpt))
        self.assertEqual(self.written(), RCPT.encode())

    def test_negotiated_away(self):
        """A command the child asked not to get (NO* flag) is not written and fires None."""
        self.negotiated(protocol=c.SMFIP_NOHELO | c.SMFIP_NOBODY)
        self.assertIsNone(self.successResultOf(self.protocol.send(HELO)))
        self.assertIsNone(self.successResultOf(self.protocol.send(Body(b"x"))))
        self.assertEqual(self.written(), b"")

    def test_too_new_for_version(self):
        """DATA is not sent to a child that negotiated version 2."""
        self.negotiated(version=2, actions=0)
        self.assertIsNone(self.successResultOf(self.protocol.send(DATA)))
        self.assertEqual(self.written(), b"")

    def test_macros_for_a_negotiated_away_command_are_sent(self):
        """D is always written (the MTAs send it even for skipped steps); the caller decides."""
        self.negotiated(protocol=c.SMFIP_NOHELO)
        macro = Macro(c.HELO, {b"{tls_version}": b"TLSv1.3"})
        self.assertIsNone(self.successResultOf(self.protocol.send(macro)))
        self.assertEqual(self.written(), macro.encode())


    def test_macro_with_command_in_one_write(self):
        """A macro passed with its command goes out right before it, in the same write."""
        self.negotiated()
        macro = Macro(c.MAIL, {b"{mail_addr}": b"a@example.net"})
        writes = []
        self.transport.write = writes.append
        self.protocol._send = sockets.writer(self.transport)
        d = self.protocol.send(MAIL, macro)
        self.assertEqual(writes, [macro.encode() + MAIL.encode()])
        self.reply(CONTINUE)
        self.assertEqual(self.successResultOf(d).reply, CONTINUE)

    def test_macro_with_negotiated_away_command(self):
        """The macro of a command the child negotiated away is still written; the command is not."""
        self.negotiated(protocol=c.SMFIP_NOHELO)
        macro = Macro(c.HELO, {b"{tls_version}": b"TLSv1.3"})
        self.assertIsNone(self.successResultOf(self.protocol.send(HELO, macro)))
        self.assertEqual(self.written(), macro.encode())

    def test_queued_macro_with_command(self):
        """A queued command keeps its macro and both go out when its turn comes."""
        self.negotiated()
        macro = Macro(c.RCPT, {b"{rcpt_addr}": b"b@example.org"})
        self.protocol.send(MAIL)
        rcpt = self.protocol.send(RCPT, macro)
        self.assertEqual(self.written(), MAIL.encode())
        self.reply(CONTINUE)
        self.assertEqual(self.written(), macro.encode() + RCPT.encode())
        self.reply(REJECT)
        self.assertEqual(self.successResultOf(rcpt).reply, REJECT)

class LongBodyTests(ClientTestCase):
    """A BODY chunk longer than the child negotiated goes out in pieces it can read."""

    def frames(self):
        """What the protocol wrote since the last call, as (code, payload) frames."""
        decoder = FrameDecoder()
        frames = decoder.feed(self.written())
        self.assertEqual(decoder.pending, 0)
        return frames

    def test_pieces_follow_continue(self):
        """200,000 bytes to a child without MDS: 65535+65535+65535+3395, each after a CONTINUE."""
        self.negotiated(protocol=0)
        chunk = (bytes(range(256)) * 782)[:200_000]
        self.assertEqual(len(chunk), 200_000)
        d = self.protocol.send(Body(chunk))
        sizes = []
        received = []
        for _ in range(4):
            self.assertNoResult(d)
            [(code, payload)] = self.frames()
            self.assertEqual(code, c.BODY)
            sizes.append(len(payload))
            received.append(payload)
            self.reply(CONTINUE)
        self.assertEqual(sizes, [65535, 65535, 65535, 3395])
        self.assertEqual(b"".join(received), chunk)
        self.assertEqual(self.successResultOf(d), Response(CONTINUE, [], 0))
        self.assertEqual(self.written(), b"")
        self.assertIdleTimerHarmless()

    def test_pre_encoded_body(self):
        """A ready packet (code and encode(), as milter-test-server sends) is split too."""

        class Encoded:
            code = c.BODY

            def encode(self):
                return Body(b"e" * 70000).encode()

        self.negotiated(protocol=0)
        d = self.protocol.send(Encoded())
        self.assertEqual(self.written(), Body(b"e" * 65535).encode())
        self.reply(CONTINUE)
        self.assertEqual(self.written(), Body(b"e" * 4465).encode())
        self.reply(CONTINUE)
        self.assertEqual(self.successResultOf(d).reply, CONTINUE)

    def test_within_the_limit_is_one_packet(self):
        """A chunk of exactly 65535 bytes goes out as it is, in one packet."""
        self.negotiated(protocol=0)
        body = Body(b"x" * 65535)
        d = self.protocol.send(body)
        self.assertEqual(self.written(), body.encode())
        self.reply(CONTINUE)
        self.assertEqual(self.successResultOf(d).reply, CONTINUE)

    def test_macro_goes_once_before_the_first_piece(self):
        """The macro given with a long BODY precedes the first piece only, in the same write."""
        self.negotiated(protocol=0)
        macro = Macro(c.BODY, {b"i": b"4BC5D2125D2"})
        d = self.protocol.send(Body(b"y" * 70000), macro)
        self.assertEqual(self.written(), macro.encode() + Body(b"y" * 65535).encode())
        self.reply(CONTINUE)
        self.assertEqual(self.written(), Body(b"y" * 4465).encode())
        self.reply(CONTINUE)
        self.successResultOf(d)

    def test_other_reply_ends_the_body(self):
        """The first reply that is not CONTINUE fires the Deferred; the rest is not sent."""
        for final in (REJECT, SKIP, ReplyCode(b"550 5.7.1 too big")):
            self.connect()
            self.negotiated(protocol=0)
            d = self.protocol.send(Body(b"z" * 200_000))
            following = self.protocol.send(END_OF_MESSAGE)
            self.assertEqual(len(self.frames()[0][1]), 65535)
            self.reply(CONTINUE)
            self.assertEqual(len(self.frames()[0][1]), 65535)
            self.reply(final)
            self.assertEqual(self.successResultOf(d), Response(final, [], 0))
            self.assertEqual(self.written(), END_OF_MESSAGE.encode())
            self.reply(CONTINUE)
            self.assertEqual(self.successResultOf(following).reply, CONTINUE)

    def test_one_unit_in_the_queue(self):
        """Commands queued before and after a long BODY go out before and after all its pieces."""
        self.negotiated(protocol=0)
        eoh = self.protocol.send(END_OF_HEADERS)
        body = self.protocol.send(Body(b"b" * 131071))
        eom = self.protocol.send(END_OF_MESSAGE)
        self.assertEqual(self.written(), END_OF_HEADERS.encode())
        self.reply(CONTINUE)
        self.successResultOf(eoh)
        self.assertEqual([len(payload) for _, payload in self.frames()], [65535])
        self.reply(CONTINUE)
        self.assertEqual([len(payload) for _, payload in self.frames()], [65535])
        self.reply(CONTINUE)
        self.assertEqual([len(payload) for _, payload in self.frames()], [1])
        self.assertNoResult(body)
        self.reply(CONTINUE)
        self.successResultOf(body)
        self.assertEqual(self.written(), END_OF_MESSAGE.encode())
        self.assertNoResult(eom)

    def test_replies_in_one_read(self):
        """CONTINUEs for several pieces arriving together each release the next piece."""
        self.negotiated(protocol=0)
        d = self.protocol.send(Body(b"r" * 140000))
        self.written()
        self.reply(CONTINUE, CONTINUE, CONTINUE)
        self.assertEqual(self.successResultOf(d).reply, CONTINUE)
        self.assertEqual([len(payload) for _, payload in self.frames()], [65535, 8930])

    def test_quarantine_between_pieces(self):
        """A quarantine in reply to one piece is kept for the whole body's Response."""
        self.negotiated(protocol=0)
        d = self.protocol.send(Body(b"q" * 70000))
        self.reply(Quarantine(b"held"), CONTINUE, CONTINUE)
        self.assertEqual(self.successResultOf(d), Response(CONTINUE, [Quarantine(b"held")], 0))

    def test_no_reply_body_goes_out_at_once(self):
        """With NR_BODY all pieces go out at once, after the macro, and the Deferred fires None."""
        self.negotiated(protocol=c.SMFIP_NR_BODY)
        macro = Macro(c.BODY, {b"i": b"4BC5D2125D2"})
        chunk = b"n" * 200_000
        d = self.protocol.send(Body(chunk), macro)
        self.assertIsNone(self.successResultOf(d))
        frames = self.frames()
        self.assertEqual(frames[0], (c.MACRO, macro.payload()))
        self.assertEqual([(code, len(payload)) for code, payload in frames[1:]],
                         [(c.BODY, 65535)] * 3 + [(c.BODY, 3395)])
        self.assertEqual(b"".join(payload for _, payload in frames[1:]), chunk)
        self.assertIdleTimerHarmless()

    def test_negotiated_away(self):
        """A long BODY to a child that negotiated NOBODY is not written at all."""
        self.negotiated(protocol=c.SMFIP_NOBODY)
        self.assertIsNone(self.successResultOf(self.protocol.send(Body(b"x" * 100_000))))
        self.assertEqual(self.written(), b"")

    def test_mds_256k(self):
        """A child that negotiated MDS_256K gets pieces of 262143 bytes."""
        d = self.protocol.negotiate(
            Negotiate(6, c.SMFI_CURR_ACTS, c.SMFI_CURR_PROT | c.SMFIP_MDS_256K))
        self.reply(Negotiate(6, 0, c.SMFIP_MDS_256K))
        self.assertEqual(self.successResultOf(d).max_data_size, 262143)
        self.written()
        body = self.protocol.send(Body(b"m" * 300_000))
        self.assertEqual([len(payload) for _, payload in self.frames()], [262143])
        self.reply(CONTINUE)
        self.assertEqual([len(payload) for _, payload in self.frames()], [37857])
        self.reply(CONTINUE)
        self.successResultOf(body)

    def test_mds_not_offered(self):
        """An MDS bit the offer lacked does not raise the limit."""
        self.negotiated(protocol=c.SMFIP_MDS_1M)
        self.protocol.send(Body(b"m" * 70000))
        self.assertEqual([len(payload) for _, payload in self.frames()], [65535])

    def test_each_piece_gets_the_reading_timeout(self):
        """The reading timeout starts again with each piece."""
        self.negotiated(protocol=0)
        d = self.protocol.send(Body(b"t" * 200_000))
        for _ in range(3):
            self.clock.advance(4.9)
            self.reply(CONTINUE)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, MilterTimeoutError)
        self.assertEqual(failure.value.command, "BODY")

    def test_connection_lost_between_pieces(self):
        """Losing the connection between pieces fails the body; nothing more is written."""
        self.negotiated(protocol=0)
        d = self.protocol.send(Body(b"l" * 200_000))
        self.written()
        self.lose()
        self.failureResultOf(d, MilterConnectionLost)
        self.reply(CONTINUE)
        self.assertEqual(self.written(), b"")

    def test_later_body_is_whole(self):
        """After a long BODY, the next BODY starts afresh from its own first byte."""
        self.negotiated(protocol=0)
        self.protocol.send(Body(b"a" * 70000))
        self.reply(CONTINUE, REJECT)
        self.written()
        d = self.protocol.send(Body(b"second"))
        self.assertEqual(self.written(), Body(b"second").encode())
        self.reply(CONTINUE)
        self.assertEqual(self.successResultOf(d).reply, CONTINUE)


class ServerLibraryTests(unittest.TestCase):
    """The client against the project's own server library, through iosim."""

    def setUp(self):
        self.clock = task.Clock()
        self.events = []

    def pair(self, script, offer=None):
        """A client negotiated (offer) with a ScriptedMilter; return (client, pump)."""
        factory = MilterServerFactory(
            lambda server: ScriptedMilter(server, script, self.events, 1), clock=self.clock)
        server = factory.buildProtocol(None)
        protocol = MilterClientProtocol(self.clock, Timeouts())
        pump = iosim.connect(server, iosim.makeFakeServer(server),
                             protocol, iosim.makeFakeClient(protocol), greet=False)
        d = protocol.negotiate(offer)
        pump.flush()
        self.successResultOf(d)
        return protocol, pump

    def body_chunks(self):
        return [event.command.chunk for event in self.events if event.name == "body"]

    def test_long_body_in_pieces(self):
        """A child without MDS gets a 200,000-byte chunk as 65535+65535+65535+3395 bytes."""
        protocol, pump = self.pair(Script())
        chunk = (bytes(range(256)) * 782)[:200_000]
        macro = Macro(c.BODY, {b"i": b"4BC5D2125D2"})
        d = protocol.send(Body(chunk), macro)
        pump.flush()
        self.assertEqual(self.successResultOf(d), Response(CONTINUE, [], 0))
        chunks = self.body_chunks()
        self.assertEqual([len(piece) for piece in chunks], [65535, 65535, 65535, 3395])
        self.assertEqual(b"".join(chunks), chunk)
        self.assertEqual([event.macros for event in self.events if event.name == "body"],
                         [{b"i": b"4BC5D2125D2"}] * 4)

    def test_skip_stops_the_pieces(self):
        """A child answering SKIP to the first piece gets no more of that body."""
        protocol, pump = self.pair(Script(protocol=c.SMFIP_SKIP, replies={"body": SKIP}))
        d = protocol.send(Body(b"s" * 200_000))
        pump.flush()
        self.assertEqual(self.successResultOf(d).reply, SKIP)
        self.assertEqual([len(piece) for piece in self.body_chunks()], [65535])

    def test_no_reply_body(self):
        """With NR_BODY every piece goes out at once and the child sees them all, in order."""
        protocol, pump = self.pair(Script(protocol=c.SMFIP_NR_BODY))
        chunk = bytes(range(256)) * 400
        self.assertIsNone(self.successResultOf(protocol.send(Body(chunk))))
        pump.flush()
        self.assertEqual([len(piece) for piece in self.body_chunks()], [65535, 36865])
        self.assertEqual(b"".join(self.body_chunks()), chunk)
        d = protocol.send(END_OF_MESSAGE)
        pump.flush()
        self.assertEqual(self.successResultOf(d).reply, CONTINUE)

    def test_mds_asked_but_not_offered(self):
        """A child asking for MDS_1M without the offer gets 65535-byte pieces."""
        protocol, pump = self.pair(Script(protocol=c.SMFIP_MDS_1M))
        self.assertEqual(protocol.negotiate_reply.protocol, 0)
        self.assertEqual(protocol.options.max_data_size, 65535)
        d = protocol.send(Body(b"m" * 70000))
        pump.flush()
        self.successResultOf(d)
        self.assertEqual([len(piece) for piece in self.body_chunks()], [65535, 4465])

    def test_mds_1m_child(self):
        """A child asking for MDS_1M when offered it takes the 200,000 bytes in one packet."""
        offer = Negotiate(6, c.SMFI_CURR_ACTS, c.SMFI_CURR_PROT | c.SMFIP_MDS_1M)
        protocol, pump = self.pair(Script(protocol=c.SMFIP_MDS_1M), offer)
        self.assertEqual(protocol.options.max_data_size, 1048575)
        d = protocol.send(Body(b"m" * 200_000))
        pump.flush()
        self.successResultOf(d)
        self.assertEqual([len(piece) for piece in self.body_chunks()], [200_000])

    def test_mds_offered_but_not_asked(self):
        """A child that did not ask for MDS does not get it, even when offered."""
        offer = Negotiate(6, c.SMFI_CURR_ACTS, c.SMFI_CURR_PROT | c.SMFIP_MDS_1M)
        protocol, pump = self.pair(Script(), offer)
        self.assertEqual(protocol.negotiate_reply.protocol, 0)
        d = protocol.send(Body(b"m" * 70000))
        pump.flush()
        self.successResultOf(d)
        self.assertEqual([len(piece) for piece in self.body_chunks()], [65535, 4465])


class TimeoutTests(ClientTestCase):
    """Reading, end-of-message and writing timeouts on the fake clock."""

    def setUp(self):
        super().setUp()
        self.negotiated()

    def test_reading_timeout(self):
        """No reply within the reading timeout fails with a message naming the command."""
        d = self.protocol.send(RCPT)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, MilterTimeoutError)
        self.assertIsInstance(failure.value, defer.TimeoutError)
        self.assertEqual(failure.getErrorMessage(),
                         "reading timeout (5.0 s) waiting for the reply to RCPT")
        self.assertEqual((failure.value.kind, failure.value.command), ("reading", "RCPT"))
        self.assertTrue(self.transport.disconnecting)

    def test_negotiation_timeout(self):
        """The reading timeout also covers the reply to O."""
        protocol = MilterClientProtocol(self.clock, self.timeouts)
        protocol.makeConnection(StringTransport())
        d = protocol.negotiate()
        self.clock.advance(5)
        self.assertIn("reply to NEGOTIATE", self.failureResultOf(d, MilterTimeoutError).getErrorMessage())

    def test_reply_leaves_timer_harmless(self):
        """After the reply the timer stays armed for the next command, but firing does nothing."""
        d = self.protocol.send(RCPT)
        self.reply(CONTINUE)
        self.successResultOf(d)
        self.assertIdleTimerHarmless()

    def test_timer_pushed_back_for_the_next_command(self):
        """The next command gets its whole timeout from when it is sent, on the same timer."""
        d = self.protocol.send(RCPT)
        self.clock.advance(4)
        self.reply(CONTINUE)
        self.successResultOf(d)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(3)  # 7 s after the first command, 3 s into the idle time
        d = self.protocol.send(RCPT)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(self.timeouts.reading - 0.5)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.failureResultOf(d, MilterTimeoutError)
        self.assertTrue(self.transport.disconnecting)

    def test_progress_does_not_hold_reading_timeout(self):
        """A child sending progress before EOM is dropped at once, not kept waiting for ever."""
        d = self.protocol.send(RCPT)
        self.clock.advance(4)
        self.reply(PROGRESS)
        self.failureResultOf(d, errors.ProtocolError)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout_fails_queued_commands(self):
        """Commands queued behind a timed-out one fail with MilterConnectionLost naming them."""
        d = self.protocol.send(RCPT)
        queued = self.protocol.send(Macro(c.DATA, {}))
        self.clock.advance(5)
        self.failureResultOf(d, MilterTimeoutError)
        failure = self.failureResultOf(queued, MilterConnectionLost)
        self.assertIn("before MACRO was sent", failure.getErrorMessage())
        self.assertIn("reading timeout", failure.getErrorMessage())

    def test_end_of_message_timeout(self):
        """END_OF_MESSAGE gets the end-of-message timeout, not the reading one."""
        d = self.protocol.send(END_OF_MESSAGE)
        self.clock.advance(19)
        self.reply(AddHeader(b"X", b"y"))
        self.assertNoResult(d)
        self.clock.advance(1)
        failure = self.failureResultOf(d, MilterTimeoutError)
        self.assertEqual(failure.getErrorMessage(),
                         "end-of-message timeout (20.0 s) waiting for the reply to END_OF_MESSAGE")

    def test_progress_restarts_end_of_message_timeout(self):
        """Progress at EOM restarts the end-of-message timeout, each time."""
        d = self.protocol.send(END_OF_MESSAGE)
        for _ in range(3):
            self.clock.advance(19)
            self.reply(PROGRESS)
        self.clock.advance(19.9)
        self.assertNoResult(d)
        self.reply(CONTINUE)
        self.assertEqual(self.successResultOf(d).progress, 3)

    def test_registered_as_streaming_producer(self):
        """The protocol is the transport's streaming push producer."""
        self.assertIs(self.transport.producer, self.protocol)
        self.assertTrue(self.transport.streaming)
        self.assertTrue(verifyObject(IPushProducer, self.protocol))

    def test_writing_timeout(self):
        """Paused longer than the writing timeout: fail and drop the connection."""
        d = self.protocol.send(Body(b"x" * 65535))
        self.protocol.pauseProducing()
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, MilterTimeoutError)
        self.assertEqual(failure.getErrorMessage(),
                         "writing timeout (3.0 s): the milter stopped reading while BODY was pending")
        self.assertEqual(failure.value.kind, "writing")
        self.assertTrue(self.transport.disconnecting)

    def test_resume_cancels_writing_timeout(self):
        """resumeProducing within the writing timeout cancels it."""
        d = self.protocol.send(Body(b"x"))
        self.protocol.pauseProducing()
        self.clock.advance(2)
        self.protocol.resumeProducing()
        self.clock.advance(2)
        self.assertNoResult(d)
        self.reply(CONTINUE)
        self.successResultOf(d)
        self.assertFalse(self.transport.disconnecting)

    def test_writing_timeout_while_idle(self):
        """A writing timeout with no reply pending still drops the connection."""
        self.protocol.send(ABORT)
        self.protocol.pauseProducing()
        self.clock.advance(3)
        self.assertTrue(self.transport.disconnecting)
        failure = self.failureResultOf(self.protocol.send(HELO), MilterConnectionLost)
        self.assertIn("writing timeout (3.0 s): the milter stopped reading", failure.getErrorMessage())

    def test_connection_lost_cancels_timers(self):
        """Losing the connection leaves no delayed call behind."""
        d = self.protocol.send(RCPT)
        self.protocol.pauseProducing()
        self.lose()
        self.failureResultOf(d, MilterConnectionLost)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ConnectionLostTests(ClientTestCase):
    """connectionLost and close()."""

    def setUp(self):
        super().setUp()
        self.negotiated()

    def test_connection_lost_fails_pending_and_queued(self):
        """The waiting and the queued commands each fail with MilterConnectionLost naming them."""
        rcpt = self.protocol.send(RCPT)
        eom = self.protocol.send(END_OF_MESSAGE)
        self.lose("peer went away")
        failure = self.failureResultOf(rcpt, MilterConnectionLost)
        self.assertIsInstance(failure.value, error.ConnectionLost)
        self.assertEqual(failure.value.command, "RCPT")
        self.assertIn("waiting for the reply to RCPT", failure.getErrorMessage())
        self.assertIn("peer went away", failure.getErrorMessage())
        failure = self.failureResultOf(eom, MilterConnectionLost)
        self.assertEqual(failure.value.command, "END_OF_MESSAGE")
        self.assertFalse(failure.value.sent)
        self.assertIn("before END_OF_MESSAGE was sent", failure.getErrorMessage())

    def test_send_after_connection_lost(self):
        """send() after the connection is gone fails at once and writes nothing."""
        self.lose()
        self.failureResultOf(self.protocol.send(HELO), MilterConnectionLost)
        self.failureResultOf(self.protocol.send(ABORT), MilterConnectionLost)
        self.assertEqual(self.written(), b"")

    def test_close_sends_quit(self):
        """close() writes Quit and loses the connection."""
        self.protocol.close()
        self.assertEqual(self.written(), QUIT.encode())
        self.assertTrue(self.transport.disconnecting)

    def test_close_twice(self):
        """A second close() writes nothing more."""
        self.protocol.close()
        self.written()
        self.protocol.close()
        self.assertEqual(self.written(), b"")

    def test_close_with_pending_command(self):
        """close() while a reply is pending: Quit goes out now, the command fails on loss."""
        d = self.protocol.send(RCPT)
        self.written()
        self.protocol.close()
        self.assertEqual(self.written(), QUIT.encode())
        self.lose()
        failure = self.failureResultOf(d, MilterConnectionLost)
        self.assertIn("closed by us", failure.getErrorMessage())

    def test_close_after_connection_lost(self):
        """close() on a lost connection does nothing."""
        self.lose()
        self.protocol.close()
        self.assertEqual(self.written(), b"")

    def test_errback_may_send(self):
        """An errback that sends again gets a failed Deferred, not an exception."""
        results = []
        d = self.protocol.send(RCPT)
        d.addErrback(lambda _: self.protocol.send(ABORT).addErrback(results.append))
        self.lose()
        self.assertEqual(len(results), 1)
        results[0].trap(MilterConnectionLost)


class CancelTests(ClientTestCase):
    """Cancelling a send() or negotiate() Deferred."""

    def setUp(self):
        super().setUp()
        self.negotiated()

    def test_cancel_queued_command(self):
        """A cancelled queued command (and its macro) is never written; the others go on."""
        helo = self.protocol.send(HELO)
        macro = Macro(c.MAIL, {b"{mail_addr}": b"a@example.net"})
        mail = self.protocol.send(MAIL, macro)
        rcpt = self.protocol.send(RCPT)
        self.written()
        mail.cancel()
        self.failureResultOf(mail, defer.CancelledError)
        self.reply(CONTINUE)
        self.assertEqual(self.successResultOf(helo).reply, CONTINUE)
        self.assertEqual(self.written(), RCPT.encode())
        self.reply(REJECT)
        self.assertEqual(self.successResultOf(rcpt).reply, REJECT)
        self.assertFalse(self.transport.disconnecting)

    def test_cancel_command_on_the_wire(self):
        """Cancelling the command awaiting its reply fails it, quits and closes the connection."""
        rcpt = self.protocol.send(RCPT)
        queued = self.protocol.send(Macro(c.DATA, {}))
        self.written()
        rcpt.cancel()
        self.failureResultOf(rcpt, defer.CancelledError)
        failure = self.failureResultOf(queued, MilterConnectionLost)
        self.assertEqual(failure.getErrorMessage(),
                         "connection to the milter lost before MACRO was sent: "
                         "closed by us: the wait for the reply to RCPT was cancelled")
        self.assertEqual(self.written(), QUIT.encode())
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_late_reply_answers_nothing(self):
        """The reply to a cancelled command is not taken for the next command's."""
        rcpt = self.protocol.send(RCPT)
        rcpt.cancel()
        self.failureResultOf(rcpt, defer.CancelledError)
        helo = self.protocol.send(HELO)
        self.reply(REJECT)
        failure = self.failureResultOf(helo, MilterConnectionLost)
        self.assertFalse(failure.value.sent)
        self.assertIn("RCPT was cancelled", failure.getErrorMessage())

    def test_cancel_negotiation(self):
        """Cancelling negotiate() closes the connection; no options are taken."""
        self.connect()
        d = self.protocol.negotiate()
        self.written()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.written(), QUIT.encode())
        self.reply(Negotiate(6, 0, 0))
        self.assertIsNone(self.protocol.options)

    def test_cancel_long_body(self):
        """Cancelling a long BODY between pieces stops the pieces and closes the connection."""
        self.connect()
        self.negotiated(protocol=0)
        d = self.protocol.send(Body(b"c" * 200_000))
        self.written()
        self.reply(CONTINUE)
        self.written()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.written(), QUIT.encode())
        self.reply(CONTINUE)
        self.assertEqual(self.written(), b"")

    def test_cancel_after_close(self):
        """Cancelling a command still pending after close() writes nothing more."""
        rcpt = self.protocol.send(RCPT)
        self.protocol.close()
        self.written()
        rcpt.cancel()
        self.failureResultOf(rcpt, defer.CancelledError)
        self.assertEqual(self.written(), b"")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.lose()

    def test_cancel_fired_command(self):
        """Cancelling a Deferred that already fired changes nothing."""
        helo = self.protocol.send(HELO)
        self.reply(CONTINUE)
        helo.cancel()
        self.assertEqual(self.successResultOf(helo).reply, CONTINUE)
        self.assertFalse(self.transport.disconnecting)

    def test_errback_of_cancelled_command_may_send(self):
        """The cancelled command's errback runs first; a send() from it fails at once."""
        order = []
        rcpt = self.protocol.send(RCPT)
        queued = self.protocol.send(HELO)
        queued.addErrback(lambda failure: order.append("queued"))

        def cancelled(failure):
            failure.trap(defer.CancelledError)
            order.append("cancelled")
            self.protocol.send(ABORT).addErrback(lambda f: order.append(f.type))

        rcpt.addErrback(cancelled)
        rcpt.cancel()
        self.assertEqual(order, ["cancelled", MilterConnectionLost, "queued"])


class TcpNoDelayTests(unittest.TestCase):
    """TCP_NODELAY on TCP transports only."""

    def test_tcp_nodelay_set(self):
        """A TCP transport gets TCP_NODELAY."""
        transport = StringTransport()
        calls = []
        transport.setTcpNoDelay = calls.append
        MilterClientProtocol(task.Clock()).makeConnection(transport)
        self.assertEqual(calls, [True])

    def test_unix_transport_untouched(self):
        """A UNIX transport (which claims ITCPTransport too) is not asked for TCP_NODELAY."""
        from twisted.internet.address import UNIXAddress
        transport = StringTransport(hostAddress=UNIXAddress("/tmp/sock"))
        calls = []
        transport.setTcpNoDelay = calls.append
        MilterClientProtocol(task.Clock()).makeConnection(transport)
        self.assertEqual(calls, [])


class ConnectTests(unittest.TestCase):
    """client.connect() on a memory reactor."""

    def setUp(self):
        self.reactor = MemoryReactorClock()

    def test_connect_uses_spec_and_connection_timeout(self):
        """connect() dials the spec's endpoint with the connection timeout."""
        client.connect(self.reactor, "inet:8891@[127.0.0.1]", Timeouts(connection=12.0))
        host, port, factory, timeout, _ = self.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 8891, 12.0))

    def test_connect_fires_with_protocol(self):
        """A connection fires with a MilterClientProtocol timed by the given clock."""
        clock = task.Clock()
        timeouts = Timeouts(reading=1.0)
        d = client.connect(self.reactor, "unix:/run/m.sock", timeouts, clock=clock)
        factory = self.reactor.unixClients[0][1]
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        # The endpoint's wrapping factory fires d once the protocol is connected.
        result = self.successResultOf(d)
        self.assertIsInstance(result, MilterClientProtocol)
        self.assertIs(result.clock, clock)
        self.assertIs(result.timeouts, timeouts)

    def test_connection_failure_names_spec(self):
        """A refused connection fails with MilterConnectError naming the spec."""
        d = client.connect(self.reactor, "inet:8891@[127.0.0.1]")
        connector = self.reactor.connectors[0]
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(connector, Failure(error.ConnectionRefusedError()))
        failure = self.failureResultOf(d, MilterConnectError)
        self.assertIsInstance(failure.value, error.ConnectError)
        self.assertIn("cannot connect to the milter at inet:8891@[127.0.0.1]",
                      failure.getErrorMessage())
        self.assertIn("refused", failure.getErrorMessage())

    def test_bad_spec(self):
        """A bad spec fails the Deferred with MilterConnectError carrying the parse error."""
        d = client.connect(self.reactor, "inet:nope")
        failure = self.failureResultOf(d, MilterConnectError)
        self.assertIn("inet:nope", failure.getErrorMessage())
        self.assertIn("is not a number", failure.getErrorMessage())

    def test_cancel_while_connecting(self):
        """Cancelling a TCP or UNIX connection attempt fails with CancelledError and stops it."""
        for spec in ("inet:8891@[127.0.0.1]", "inet6:8891@[::1]", "unix:/run/m.sock"):
            d = client.connect(self.reactor, spec)
            connector = self.reactor.connectors[-1]
            d.cancel()
            failure = self.failureResultOf(d, defer.CancelledError)
            self.assertNotIsInstance(failure.value, MilterConnectError)
            self.assertEqual(failure.getErrorMessage(),
                             f"connecting to the milter at {spec} was cancelled")
            self.assertTrue(connector.stoppedConnecting, spec)

    def test_cancel_while_negotiating(self):
        """Cancelling a chain waiting on the negotiation ends it with CancelledError and quits."""
        d = client.connect(self.reactor, "inet:8891@[127.0.0.1]", clock=task.Clock())
        d.addCallback(lambda protocol: protocol.negotiate())
        transport = StringTransport()
        self.reactor.tcpClients[0][2].buildProtocol(None).makeConnection(transport)
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertTrue(transport.value().endswith(QUIT.encode()))
        self.assertTrue(transport.disconnecting)


class WhenClosedTests(ClientTestCase):
    """when_closed(): waiting for the end of the connection."""

    def test_fires_on_connection_lost(self):
        """when_closed() fires once the connection is lost, after pending commands failed."""
        pending = self.protocol.send(HELO)
        order = []
        pending.addErrback(lambda _: order.append("pending"))
        closed = self.protocol.when_closed().addCallback(lambda _: order.append("closed"))
        self.protocol.close()
        self.assertNoResult(closed)
        self.lose()
        self.assertEqual(order, ["pending", "closed"])

    def test_after_connection_lost(self):
        """when_closed() after the loss fires at once."""
        self.lose()
        self.assertIsNone(self.successResultOf(self.protocol.when_closed()))


class AfterCloseTests(ClientTestCase):
    """What still happens between close() and the end of the connection."""

    def setUp(self):
        super().setUp()
        self.negotiated()

    def test_replies_after_close_ignored(self):
        """A reply arriving after close() is ignored; the command fails when the socket closes."""
        d = self.protocol.send(RCPT)
        self.protocol.close()
        self.reply(CONTINUE)
        self.assertNoResult(d)
        self.lose()
        self.failureResultOf(d, MilterConnectionLost)

    def test_reading_timeout_after_close_aborts(self):
        """A command still pending after close() times out and aborts the connection."""
        d = self.protocol.send(RCPT)
        self.protocol.close()
        self.clock.advance(5)
        self.failureResultOf(d, MilterTimeoutError)
        self.assertTrue(self.transport.disconnected)

    def test_writing_timeout_after_close_aborts(self):
        """A child that stops reading after close() gets the connection aborted."""
        self.protocol.close()
        self.protocol.pauseProducing()
        self.clock.advance(3)
        self.assertTrue(self.transport.disconnected)


class _RecordingSocket:
    """Stands in for the TCP socket under the transport: records setsockopt calls."""

    def __init__(self):
        self.options = []

    def setsockopt(self, level, option, value):
        self.options.append((level, option, value))


class _TCPStringTransport(StringTransport):
    """A StringTransport that looks like TCP and has a recording socket."""

    def __init__(self):
        super().__init__()
        self.socket = _RecordingSocket()
        self.no_delay = False

    def setTcpNoDelay(self, enabled):
        self.no_delay = enabled


class TCPOptionsTests(unittest.TestCase):
    """Socket options on TCP connections to children."""

    def setUp(self):
        self.transport = _TCPStringTransport()
        self.protocol = MilterClientProtocol(task.Clock(), Timeouts())
        self.protocol.makeConnection(self.transport)
        d = self.protocol.negotiate()
        self.protocol.dataReceived(Negotiate(6, c.SMFI_CURR_ACTS, 0).encode())
        self.successResultOf(d)

    def quick_acks(self):
        return [option for option in self.transport.socket.options
                if option == (socket.IPPROTO_TCP, sockets.TCP_QUICKACK, 1)]

    def test_no_delay(self):
        """TCP_NODELAY is set on a TCP connection."""
        self.assertTrue(self.transport.no_delay)

    def test_quick_ack_while_end_of_message_reply_is_incomplete(self):
        """TCP_QUICKACK is set on sending END_OF_MESSAGE and after each partial reply to it."""
        self.assertIsNotNone(sockets.TCP_QUICKACK, "Debian's Python has TCP_QUICKACK")
        self.protocol.send(RCPT)
        self.protocol.dataReceived(CONTINUE.encode())
        self.assertEqual(self.quick_acks(), [])
        d = self.protocol.send(END_OF_MESSAGE)
        self.assertEqual(len(self.quick_acks()), 1)
        self.protocol.dataReceived(AddHeader(b"X-A", b"1").encode())
        self.assertEqual(len(self.quick_acks()), 2)
        self.protocol.dataReceived(CONTINUE.encode())
        self.assertEqual(len(self.quick_acks()), 2)
        self.assertEqual(self.successResultOf(d).reply, CONTINUE)
