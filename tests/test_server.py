"""Tests for miltermanager.server: real packets in, exact reply bytes out."""

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

try:
    from twisted.internet.testing import StringTransport
except ImportError:  # older Twisted
    from twisted.test.proto_helpers import StringTransport

from miltermanager import stages
from miltermanager.protocol import constants as c
from miltermanager.protocol import messages as m
from miltermanager.protocol import negotiation
from miltermanager.server import IMilter, Milter, MilterServerFactory, MilterServerProtocol

CONTINUE = m.CONTINUE.encode()
TEMPFAIL = m.TEMPFAIL.encode()
REJECT = m.REJECT.encode()

CONNECT = m.Connect(b"client.example.net", c.FAMILY_INET, 51234, b"192.0.2.10")
HELO = m.Helo(b"client.example.net")
MAIL = m.Mail(b"<a@example.net>", [b"SIZE=1234"])
RCPT = m.Rcpt(b"<b@example.org>")
HEADER = m.Header(b"Subject", b"Hello")
BODY = m.Body(b"line1\r\nline2\r\n")


class RecordingTransport(StringTransport):
    """A StringTransport that remembers each write call and TCP_NODELAY."""

    def __init__(self):
        super().__init__()
        self.writes = []
        self.no_delay = None

    def write(self, data):
        self.writes.append(data)
        super().write(data)

    def writeSequence(self, data):
        self.writes.append(list(data))
        StringTransport.write(self, b"".join(data))

    def setTcpNoDelay(self, enabled):
        self.no_delay = enabled


class RecordingMilter(Milter):
    """Records every call; answers from self.answers (a reply, a list, a Deferred,
    an exception to raise, or a callable taking (command, macros))."""

    def __init__(self, server):
        super().__init__(server)
        self.calls = []
        self.answers = {}

    def _call(self, name, command, macros):
        self.calls.append((name, command))
        answer = self.answers.get(name, m.CONTINUE)
        if callable(answer):
            answer = answer(command, macros)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def connect(self, command, macros):
        return self._call("connect", command, macros)

    def helo(self, command, macros):
        return self._call("helo", command, macros)

    def mail(self, command, macros):
        return self._call("mail", command, macros)

    def rcpt(self, command, macros):
        return self._call("rcpt", command, macros)

    def data(self, command, macros):
        return self._call("data", command, macros)

    def header(self, command, macros):
        return self._call("header", command, macros)

    def end_of_headers(self, command, macros):
        return self._call("end_of_headers", command, macros)

    def body(self, command, macros):
        return self._call("body", command, macros)

    def end_of_message(self, command, macros):
        return self._call("end_of_message", command, macros)

    def unknown(self, command, macros):
        return self._call("unknown", command, macros)

    def abort(self, macros):
        self.calls.append(("abort", None))

    def close(self):
        self.calls.append(("close", None))


class Harness:
    """One server protocol on a RecordingTransport, with the milters it made."""

    def __init__(self, milter_class=RecordingMilter, *, negotiation_timeout=None,
                 idle_timeout=None, **attributes):
        self.milters = []
        self.events = []

        def make_milter(server):
            milter = milter_class(server)
            for name, value in attributes.items():
                setattr(milter, name, value)
            self.milters.append(milter)
            return milter

        self.clock = Clock()
        self.factory = MilterServerFactory(make_milter, clock=self.clock)
        if negotiation_timeout is not None:
            self.factory.negotiation_timeout = negotiation_timeout
        if idle_timeout is not None:
            self.factory.idle_timeout = idle_timeout
        self.protocol = self.factory.buildProtocol(None)
        self.protocol.log = Logger(observer=self._observe)
        self.transport = RecordingTransport()
        self.protocol.makeConnection(self.transport)

    def _observe(self, event):
        self.events.append(event)
        globalLogPublisher(event)  # so that trial sees logged failures

    @property
    def milter(self):
        return self.milters[-1]

    def send(self, *commands):
        self.protocol.dataReceived(b"".join(command.encode() for command in commands))

    def take(self):
        """The bytes written since the last take."""
        data = self.transport.value()
        self.transport.clear()
        del self.transport.writes[:]
        return data

    def negotiate(self, version=6, **offer):
        self.send(negotiation.offer(version, **offer))
        return self.take()

    def names(self):
        return [name for name, command in self.milter.calls]

    def logged(self, level_name):
        return [event for event in self.events if event["log_level"].name == level_name]


def packets(*replies):
    return b"".join(reply.encode() for reply in replies)


class NegotiationTests(SynchronousTestCase):
    def test_version_6(self):
        """A v6 offer gets the milter's actions and flags (protocol.md §11 vector)."""
        h = Harness(actions=c.SMFIF_ADDHDRS | c.SMFIF_CHGHDRS,
                    protocol=c.SMFIP_NOHELO | c.SMFIP_NR_HDR | c.SMFIP_SKIP)
        self.assertEqual(
            h.negotiate(6),
            bytes.fromhex("0000000d4f0000000600000011" "00000482"))
        self.assertEqual(h.protocol.stage, stages.CONNECT)
        self.assertEqual(h.protocol.options.protocol, 0x482)
        self.assertEqual(h.protocol.faked_no_reply, 0)

    def test_symbol_lists(self):
        """Macro symbol lists travel in the O reply with SETSYMLIST (§11 vector)."""
        h = Harness(actions=c.SMFIF_ADDHDRS, macros={2: [b"{auth_authen}", b"i"]})
        self.assertEqual(h.negotiate(6), bytes.fromhex(
            "000000214f000000060000010100000000000000027b617574685f61757468656e7d206900"))

    def test_version_2(self):
        """A v2 offer gets version 2 and no flags beyond v2's."""
        h = Harness(protocol=c.SMFIP_NOHELO | c.SMFIP_NODATA | c.SMFIP_NOUNKNOWN)
        self.assertEqual(h.negotiate(2), packets(m.Negotiate(2, 0, c.SMFIP_NOHELO)))

    def test_version_3(self):
        """A v3 offer keeps NOUNKNOWN and drops NODATA, which v3 does not know."""
        h = Harness(protocol=c.SMFIP_NODATA | c.SMFIP_NOUNKNOWN)
        self.assertEqual(h.negotiate(3), packets(m.Negotiate(3, 0, c.SMFIP_NOUNKNOWN)))

    def test_version_4(self):
        """A v4 offer keeps NODATA and NOUNKNOWN."""
        h = Harness(protocol=c.SMFIP_NODATA | c.SMFIP_NOUNKNOWN)
        self.assertEqual(h.negotiate(4), packets(
            m.Negotiate(4, 0, c.SMFIP_NODATA | c.SMFIP_NOUNKNOWN)))

    def test_faked_no_reply(self):
        """NR flags the MTA did not offer are left out and answered with CONTINUE."""
        h = Harness(protocol=c.SMFIP_NR_CONN | c.SMFIP_NR_HELO | c.SMFIP_NR_HDR)
        self.assertEqual(h.negotiate(2), packets(m.Negotiate(2, 0, 0)))
        self.assertEqual(h.protocol.faked_no_reply,
                         c.SMFIP_NR_CONN | c.SMFIP_NR_HELO | c.SMFIP_NR_HDR)
        h.milter.answers["connect"] = None
        h.send(m.Macro(b"C", {}), CONNECT, HELO)
        self.assertEqual(h.take(), CONTINUE * 2)

    def test_faked_no_reply_passes_verdict(self):
        """Under a faked NR flag a real verdict is still sent, as libmilter does."""
        h = Harness(protocol=c.SMFIP_NR_CONN)
        h.negotiate(2)
        h.milter.answers["connect"] = m.REJECT
        h.send(CONNECT)
        self.assertEqual(h.take(), REJECT)

    def test_negotiate_deferred(self):
        """negotiate may answer with a Deferred; commands wait for it."""
        h = Harness()
        d = Deferred()
        h.milter.negotiate = lambda offer: d
        h.send(negotiation.offer(6), CONNECT)
        self.assertEqual(h.take(), b"")
        d.callback(m.Negotiate(6, 0, 0))
        self.assertEqual(h.take(), packets(m.Negotiate(6, 0, 0), m.CONTINUE))

    def test_negotiation_error(self):
        """Actions the MTA did not offer: logged, nothing sent, connection dropped."""
        h = Harness(actions=c.SMFIF_CHGFROM)
        self.assertEqual(h.negotiate(2, actions=c.SMFI_V2_ACTS), b"")
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(len(h.logged("error")), 1)
        h.protocol.connectionLost(None)
        self.assertEqual(h.names(), ["close"])

    def test_negotiate_raises(self):
        """A negotiate that raises is logged and drops the connection."""
        h = Harness()
        h.milter.negotiate = lambda offer: 1 / 0
        self.assertEqual(h.negotiate(6), b"")
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_negotiate_twice(self):
        """A second O is a protocol error."""
        h = Harness()
        h.negotiate(6)
        h.send(negotiation.offer(6))
        self.assertEqual(h.take(), b"")
        self.assertTrue(h.transport.disconnecting)

    def test_command_before_negotiation(self):
        """An event before O drops the connection without calling the milter."""
        h = Harness()
        h.send(CONNECT)
        self.assertEqual(h.take(), b"")
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(h.names(), ["close"])


class SessionTests(SynchronousTestCase):
    def test_tcp_no_delay(self):
        """TCP_NODELAY is switched on when the transport has it."""
        self.assertTrue(Harness().transport.no_delay)

    def test_milter_interface(self):
        """Milter provides IMilter and gets the protocol as its server."""
        h = Harness(Milter)
        verifyObject(IMilter, h.milter)
        self.assertIs(h.milter.server, h.protocol)

    def test_default_milter_session(self):
        """The base Milter continues at every step."""
        h = Harness(Milter)
        h.negotiate(6)
        h.send(CONNECT, HELO, MAIL, RCPT, m.DATA, HEADER, m.END_OF_HEADERS, BODY,
               m.END_OF_MESSAGE)
        self.assertEqual(h.take(), CONTINUE * 9)

    def test_full_session(self):
        """Connect to quit: one CONTINUE per event, macros delivered, close once."""
        h = Harness()
        h.negotiate(6)
        seen = []
        h.milter.answers["connect"] = lambda cmd, macros: seen.append(
            (macros.get(b"j"), macros.get(b"daemon_name"))) or m.CONTINUE
        h.milter.answers["rcpt"] = lambda cmd, macros: seen.append(
            (macros.get(b"i"), macros.get(b"{rcpt_addr}"), macros.get(b"j"))) or m.CONTINUE
        h.send(
            m.Macro(b"C", {b"j": b"mx.example.org", b"{daemon_name}": b"smtpd"}), CONNECT,
            m.Macro(b"H", {}), HELO,
            m.Macro(b"M", {b"i": b"QID"}), MAIL,
            m.Macro(b"R", {b"{rcpt_addr}": b"b@example.org"}), RCPT,
            m.Macro(b"T", {b"i": b"QID"}), m.DATA,
            m.Macro(b"L", {}), HEADER,
            m.END_OF_HEADERS,
            m.Macro(b"B", {}), BODY,
            m.Macro(b"E", {b"i": b"QID"}), m.END_OF_MESSAGE,
            m.ABORT, m.QUIT)
        self.assertEqual(h.take(), CONTINUE * 9)
        self.assertEqual(h.names(), [
            "connect", "helo", "mail", "rcpt", "data", "header", "end_of_headers", "body",
            "end_of_message", "close"])
        self.assertEqual(h.milter.calls[0][1], CONNECT)
        self.assertEqual(seen, [(b"mx.example.org", b"smtpd"),
                                (b"QID", b"b@example.org", b"mx.example.org")])
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(h.protocol.stage, stages.CLOSED)
        h.protocol.connectionLost(None)
        self.assertEqual(h.names().count("close"), 1)

    def test_several_messages(self):
        """Several messages on one connection; A after E aborts nothing."""
        h = Harness()
        h.negotiate(6)
        h.send(CONNECT, HELO)
        for _ in range(3):
            h.send(MAIL, RCPT, RCPT, m.DATA, HEADER, m.END_OF_HEADERS, BODY,
                   m.END_OF_MESSAGE, m.ABORT)
        self.assertEqual(h.take(), CONTINUE * (2 + 3 * 8))
        self.assertEqual(h.names().count("end_of_message"), 3)
        self.assertNotIn("abort", h.names())
        self.assertEqual(h.protocol.stage, stages.HELO)

    def test_message_macros_cleared_by_next_mail(self):
        """A new MAIL forgets the previous message's later-stage macros."""
        h = Harness()
        h.negotiate(6)
        seen = []
        h.milter.answers["mail"] = lambda cmd, macros: seen.append(
            (macros.get(b"i"), macros.get(b"{rcpt_addr}"), macros.get(b"j"))) or m.CONTINUE
        h.send(m.Macro(b"C", {b"j": b"mx"}), CONNECT,
               m.Macro(b"M", {b"i": b"Q1"}), MAIL,
               m.Macro(b"R", {b"{rcpt_addr}": b"b"}), RCPT, m.END_OF_MESSAGE,
               m.Macro(b"M", {}), MAIL)
        self.assertEqual(seen, [(b"Q1", None, b"mx"), (None, None, b"mx")])

    def test_abort_in_every_stage(self):
        """A gets no reply anywhere; milter.abort runs only while a message is open."""
        steps = [CONNECT, HELO, MAIL, RCPT, m.DATA, HEADER, m.END_OF_HEADERS, BODY,
                 m.END_OF_MESSAGE]
        in_message = {"mail", "rcpt", "data", "header", "end_of_headers", "body"}
        for count in range(len(steps) + 1):
            h = Harness()
            h.negotiate(6)
            h.send(*steps[:count])
            h.take()
            last = h.names()[-1] if count else None
            h.send(m.ABORT)
            self.assertEqual(h.take(), b"")
            expected = 1 if last in in_message else 0
            self.assertEqual(h.names().count("abort"), expected, f"after {last}")
            self.assertNotIn(h.protocol.stage, (stages.MAIL, stages.BODY))
            self.assertFalse(h.transport.disconnecting)

    def test_abort_before_negotiation(self):
        """A before O is harmless."""
        h = Harness()
        h.send(m.ABORT)
        self.assertEqual(h.take(), b"")
        self.assertEqual(h.negotiate(6), packets(m.Negotiate(6, 0, 0)))

    def test_abort_idempotent(self):
        """Repeated A aborts the message once; the next message starts clean."""
        h = Harness()
        h.negotiate(6)
        h.send(CONNECT, m.Macro(b"M", {b"i": b"Q1"}), MAIL, m.ABORT, m.ABORT, m.ABORT)
        self.assertEqual(h.names().count("abort"), 1)
        self.assertEqual(h.protocol.macros.stage(b"M"), {})
        h.send(MAIL, RCPT)
        self.assertEqual(h.take(), CONTINUE * 4)

    def test_abort_sees_message_macros(self):
        """milter.abort can still read the aborted message's macros."""
        h = Harness()
        seen = []
        h.milter.abort = lambda macros: seen.append(macros.get(b"i"))
        h.negotiate(6)
        h.send(CONNECT, m.Macro(b"M", {b"i": b"Q1"}), MAIL, m.ABORT)
        self.assertEqual(seen, [b"Q1"])

    def test_new_mail_aborts_open_message(self):
        """MAIL while a message is open aborts it first and keeps the new MAIL macros."""
        h = Harness()
        h.negotiate(6)
        seen = []
        h.milter.answers["mail"] = lambda cmd, macros: seen.append(macros.get(b"i")) or m.CONTINUE
        h.send(CONNECT, m.Macro(b"M", {b"i": b"Q1"}), MAIL, RCPT,
               m.Macro(b"M", {b"i": b"Q2"}), MAIL)
        self.assertEqual(h.names(), ["connect", "mail", "rcpt", "abort", "mail"])
        self.assertEqual(seen, [b"Q1", b"Q2"])
        self.assertEqual(h.take(), CONTINUE * 4)

    def test_repeated_helo(self):
        """A second HELO inside a message aborts it (Postfix's following A is a no-op)."""
        h = Harness()
        h.negotiate(6)
        h.send(CONNECT, HELO, MAIL, HELO, m.ABORT, HELO)
        self.assertEqual(h.names(), ["connect", "helo", "mail", "abort", "helo", "helo"])
        self.assertEqual(h.take(), CONTINUE * 5)

    def test_unknown_any_time(self):
        """U is answered before HELO, inside and between messages; the stage stays."""
        h = Harness()
        h.negotiate(6)
        unknown = m.Unknown(b"FOO bar")
        h.send(m.Macro(b"U", {}), unknown, CONNECT, unknown, MAIL, unknown)
        self.assertEqual(h.protocol.stage, stages.MAIL)
        h.send(m.END_OF_MESSAGE, unknown)
        self.assertEqual(h.take(), CONTINUE * 7)
        self.assertEqual(h.names().count("unknown"), 4)

    def test_odd_macro_packets(self):
        """Empty D, orphan D and D for an unknown stage are taken without a reply."""
        h = Harness()
        h.negotiate(6)
        h.protocol.dataReceived(b"\x00\x00\x00\x01D")  # D without a stage byte
        h.send(m.Macro(b"U", {}), m.Macro(b"Z", {b"x": b"y"}), CONNECT,
               m.Macro(b"R", {b"{rcpt_addr}": b"x"}))
        self.assertEqual(h.take(), CONTINUE)
        self.assertEqual(h.protocol.macros.get(b"rcpt_addr"), b"x")

    def test_eof_without_quit(self):
        """EOF without Q closes the milter once."""
        h = Harness()
        h.negotiate(6)
        h.send(CONNECT, HELO)
        h.protocol.connectionLost(None)
        h.protocol.connectionLost(None)
        self.assertEqual(h.names(), ["connect", "helo", "close"])

    def test_eof_in_message(self):
        """EOF inside a message aborts it, then closes, as libmilter."""
        h = Harness()
        h.negotiate(6)
        h.send(CONNECT, MAIL, RCPT)
        h.protocol.connectionLost(None)
        self.assertEqual(h.names()[-2:], ["abort", "close"])

    def test_quit_new_connection(self):
        """K closes the milter, makes a new one, clears macros; C follows without O."""
        h = Harness()
        h.negotiate(6)
        h.send(m.Macro(b"C", {b"j": b"mx"}), CONNECT, HELO, MAIL, m.QUIT_NEW_CONNECTION)
        first = h.milters[0]
        self.assertEqual(first.calls[-2:], [("abort", None), ("close", None)])
        self.assertEqual(len(h.milters), 2)
        self.assertIsNone(h.protocol.macros.get(b"j"))
        self.assertEqual(h.protocol.stage, stages.CONNECT)
        h.send(CONNECT, HELO, m.QUIT)
        self.assertEqual(h.take(), CONTINUE * 5)
        self.assertEqual(h.names(), ["connect", "helo", "close"])
        self.assertEqual(first.calls.count(("close", None)), 1)


class NoReplyTests(SynchronousTestCase):
    def test_no_reply_flags(self):
        """Commands with a negotiated NR flag get no reply, even if the milter gives one."""
        everything = c.NO_REPLY_FLAGS
        h = Harness(protocol=everything)
        self.assertEqual(h.negotiate(6), packets(m.Negotiate(6, 0, everything)))
        h.milter.answers["helo"] = m.REJECT
        h.send(CONNECT, HELO, MAIL, RCPT, m.DATA, HEADER, m.END_OF_HEADERS, BODY,
               m.Unknown(b"X"))
        self.assertEqual(h.take(), b"")
        self.assertEqual(len(h.names()), 9)
        self.assertEqual(len(h.logged("debug")), 1)
        h.send(m.END_OF_MESSAGE)
        self.assertEqual(h.take(), CONTINUE)

    def test_no_reply_exception(self):
        """A milter failing on an NR command is logged and still sends nothing."""
        h = Harness(protocol=c.SMFIP_NR_HDR)
        h.negotiate(6)
        h.milter.answers["header"] = ZeroDivisionError()
        h.send(CONNECT, MAIL, HEADER)
        self.assertEqual(h.take(), CONTINUE * 2)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class DeferredTests(SynchronousTestCase):
    def test_commands_wait(self):
        """Commands behind a pending answer wait and are handled in order."""
        h = Harness()
        h.negotiate(6)
        d = Deferred()
        h.milter.answers["mail"] = d
        h.send(CONNECT, m.Macro(b"M", {b"i": b"Q1"}), MAIL,
               m.Macro(b"R", {b"{rcpt_addr}": b"b"}), RCPT)
        h.send(RCPT, m.ABORT)
        self.assertEqual(h.take(), CONTINUE)
        self.assertEqual(h.names(), ["connect", "mail"])
        # Macros sent behind the pending command are not applied yet.
        self.assertIsNone(h.protocol.macros.get(b"{rcpt_addr}"))
        d.callback(m.REJECT)
        self.assertEqual(h.take(), REJECT + CONTINUE * 2)
        self.assertEqual(h.names(), ["connect", "mail", "rcpt", "rcpt", "abort"])

    def test_chain_of_deferreds(self):
        """Several pending answers in a row each hold the queue."""
        h = Harness()
        h.negotiate(6)
        first, second = Deferred(), Deferred()
        h.milter.answers["mail"] = first
        h.milter.answers["rcpt"] = second
        h.send(CONNECT, MAIL, RCPT, m.DATA)
        first.callback(m.CONTINUE)
        self.assertEqual(h.names(), ["connect", "mail", "rcpt"])
        second.callback(m.TEMPFAIL)
        self.assertEqual(h.take(), CONTINUE * 2 + TEMPFAIL + CONTINUE)

    def test_fired_deferred_is_synchronous(self):
        """An already fired Deferred is answered at once."""
        h = Harness()
        h.negotiate(6)
        h.milter.answers["connect"] = lambda cmd, macros: succeed(m.ACCEPT)
        h.send(CONNECT, HELO)
        self.assertEqual(h.take(), packets(m.ACCEPT, m.CONTINUE))

    def test_failed_deferred(self):
        """A failed Deferred is logged and answered with TEMPFAIL."""
        h = Harness()
        h.negotiate(6)
        d = Deferred()
        answers = [d]
        h.milter.answers["rcpt"] = lambda cmd, macros: answers.pop() if answers else m.CONTINUE
        h.send(CONNECT, MAIL, RCPT, RCPT)
        d.errback(Failure(ZeroDivisionError()))
        self.assertEqual(h.take(), CONTINUE * 2 + TEMPFAIL + CONTINUE)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_lost_while_waiting(self):
        """Connection loss cancels the pending answer quietly and closes once."""
        h = Harness()
        h.negotiate(6)
        cancelled = []
        h.milter.answers["rcpt"] = Deferred(cancelled.append)
        h.send(CONNECT, MAIL, RCPT, RCPT)
        h.take()
        h.protocol.connectionLost(None)
        self.assertEqual(len(cancelled), 1)
        self.assertEqual(h.take(), b"")
        self.assertEqual(h.names(), ["connect", "mail", "rcpt", "abort", "close"])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_other_failure_after_close(self):
        """A pending answer failing with another error on cancel is logged, not sent."""
        h = Harness()
        h.negotiate(6)
        h.milter.answers["connect"] = Deferred(
            lambda d: d.errback(Failure(ZeroDivisionError())))
        h.send(CONNECT)
        h.protocol.connectionLost(None)
        self.assertEqual(h.take(), b"")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_progress_only_at_end_of_message(self):
        """progress() writes 'p' only while an end of message waits for its answer."""
        h = Harness()
        h.negotiate(6)
        d = Deferred()
        h.milter.answers["end_of_message"] = d
        self.assertFalse(h.protocol.progress())
        h.send(CONNECT, MAIL, BODY)
        self.assertFalse(h.protocol.progress())
        h.take()
        h.send(m.END_OF_MESSAGE)
        self.assertTrue(h.protocol.progress())
        self.assertEqual(h.take(), m.PROGRESS.encode())
        d.callback(m.CONTINUE)
        self.assertFalse(h.protocol.progress())
        self.assertEqual(h.take(), CONTINUE)


class EndOfMessageTests(SynchronousTestCase):
    def harness(self, actions=c.SMFI_CURR_ACTS, protocol=0):
        h = Harness(actions=actions, protocol=protocol)
        h.negotiate(6)
        h.send(CONNECT, MAIL, RCPT, HEADER, BODY)
        h.take()
        return h

    def test_modifications_in_one_write(self):
        """Modifications and the final reply go out in one write, in order."""
        h = self.harness()
        replies = [m.AddHeader(b"X-Spam", b"yes"), m.ChangeHeader(1, b"X-Old", b""),
                   m.InsertHeader(0, b"X-First", b"v"), m.AddRecipient(b"<x@y>"),
                   m.AddRecipientPar(b"<z@y>", b"NOTIFY=NEVER"),
                   m.DeleteRecipient(b"<b@example.org>"), m.ChangeFrom(b"<new@y>"),
                   m.ReplaceBody(b"new body\r\n"), m.Quarantine(b"suspicious"),
                   m.PROGRESS, m.ACCEPT]
        h.milter.answers["end_of_message"] = replies
        h.send(m.END_OF_MESSAGE)
        self.assertEqual(h.transport.writes, [b"".join(reply.encode() for reply in replies)])
        self.assertEqual(h.protocol.stage, stages.HELO)

    def test_reply_code(self):
        """A ReplyCode is sent as is, even when its class looks odd."""
        h = self.harness()
        h.milter.answers["end_of_message"] = m.ReplyCode(b"250 2.0.0 odd")
        h.send(m.END_OF_MESSAGE)
        self.assertEqual(h.take(), m.ReplyCode(b"250 2.0.0 odd").encode())

    def test_unnegotiated_modification_dropped(self):
        """A modification whose action flag was not negotiated is dropped and logged."""
        h = self.harness(actions=c.SMFIF_ADDHDRS)
        h.milter.answers["end_of_message"] = [
            m.ChangeHeader(1, b"X-Old", b""), m.AddHeader(b"X-Spam", b"yes"),
            m.ReplaceBody(b"x"), m.CONTINUE]
        h.send(m.END_OF_MESSAGE)
        self.assertEqual(h.take(), packets(m.AddHeader(b"X-Spam", b"yes"), m.CONTINUE))
        self.assertEqual(len(h.logged("error")), 2)

    def test_modification_outside_end_of_message(self):
        """A modification in answer to another command is dropped and logged."""
        h = self.harness()
        h.milter.answers["end_of_headers"] = [m.AddHeader(b"X", b"y"), m.PROGRESS, m.REJECT]
        h.send(m.END_OF_HEADERS)
        self.assertEqual(h.take(), REJECT)
        self.assertEqual(len(h.logged("error")), 2)

    def test_reply_after_final_dropped(self):
        """Nothing follows the final reply."""
        h = self.harness()
        h.milter.answers["end_of_message"] = [m.CONTINUE, m.AddHeader(b"X", b"y"), m.REJECT]
        h.send(m.END_OF_MESSAGE)
        self.assertEqual(h.take(), CONTINUE)
        self.assertEqual(len(h.logged("error")), 2)

    def test_no_final_reply(self):
        """A list without a final reply gets the error reply after the modifications."""
        h = self.harness()
        h.milter.answers["end_of_message"] = [m.AddHeader(b"X", b"y")]
        h.send(m.END_OF_MESSAGE)
        self.assertEqual(h.take(), packets(m.AddHeader(b"X", b"y"), m.TEMPFAIL))

    def test_not_a_reply(self):
        """An answer that is not a reply at all is logged and answered with TEMPFAIL."""
        h = self.harness()
        h.milter.answers["header"] = None
        h.milter.answers["end_of_headers"] = "yes"
        h.send(HEADER, m.END_OF_HEADERS)
        self.assertEqual(h.take(), TEMPFAIL * 2)

    def test_unencodable_replies(self):
        """A reply with NUL in a string is logged: a modification is dropped, a final
        reply becomes the error reply."""
        h = self.harness()
        h.milter.answers["end_of_message"] = [
            m.AddHeader(b"X\0", b"y"), m.AddHeader(b"X", b"y"), m.ReplyCode(b"550 a\0b")]
        h.milter.answers["end_of_headers"] = m.ReplyCode(b"550 a\0b")
        h.send(m.END_OF_HEADERS, m.END_OF_MESSAGE)
        self.assertEqual(h.take(), packets(m.TEMPFAIL, m.AddHeader(b"X", b"y"), m.TEMPFAIL))
        self.assertEqual(len(h.logged("error")), 3)

    def test_log_lines_format(self):
        """Every logged line renders, with its [server] tags."""
        h = self.harness(actions=0)
        h.milter.answers["end_of_message"] = [m.AddHeader(b"X", b"y"), m.CONTINUE, m.REJECT]
        h.send(m.END_OF_MESSAGE)
        texts = [formatEvent(event) for event in h.events]
        self.assertEqual(len(texts), 2)
        for text in texts:
            self.assertTrue(text.startswith("[server][end_of_message][error] "), text)
            self.assertNotIn("MESSAGE LOST", text)
        self.assertIn("0x1 was not negotiated", texts[0])

    def test_replace_body_split(self):
        """A ReplaceBody over 65535 bytes is split into packets of at most 65535."""
        h = self.harness()
        body = bytes(range(256)) * 300
        h.milter.answers["end_of_message"] = [m.ReplaceBody(body), m.CONTINUE]
        h.send(m.END_OF_MESSAGE)
        self.assertEqual(h.take(), packets(
            m.ReplaceBody(body[:65535]), m.ReplaceBody(body[65535:]), m.CONTINUE))

    def test_empty_replace_body(self):
        """An empty ReplaceBody is sent as one empty packet (the body becomes empty)."""
        h = self.harness()
        h.milter.answers["end_of_message"] = [m.ReplaceBody(b""), m.CONTINUE]
        h.send(m.END_OF_MESSAGE)
        self.assertEqual(h.take(), packets(m.ReplaceBody(b""), m.CONTINUE))

    def test_end_of_message_with_data(self):
        """E with data delivers the data as a last body chunk, then end of message."""
        h = self.harness()
        h.send(m.EndOfMessage(b"tail\r\n"))
        self.assertEqual(h.take(), CONTINUE)
        self.assertEqual(h.milter.calls[-2:], [("body", m.Body(b"tail\r\n")),
                                               ("end_of_message", m.END_OF_MESSAGE)])
        self.assertEqual(h.protocol.stage, stages.HELO)

    def test_end_of_message_with_data_rejected(self):
        """When that last chunk is rejected, the reject answers E and eom is not called."""
        h = self.harness()
        h.milter.answers["body"] = m.REJECT
        h.send(m.EndOfMessage(b"tail\r\n"), MAIL)
        self.assertEqual(h.take(), REJECT + CONTINUE)
        self.assertNotIn("end_of_message", h.names())


class SkipReplyTests(SynchronousTestCase):
    def test_skip_negotiated(self):
        """SKIP answers BODY when SMFIP_SKIP was negotiated."""
        h = Harness(protocol=c.SMFIP_SKIP)
        h.negotiate(6)
        h.milter.answers["body"] = m.SKIP
        h.send(CONNECT, MAIL, BODY)
        self.assertEqual(h.take(), CONTINUE * 2 + m.SKIP.encode())

    def test_skip_not_negotiated(self):
        """Without SMFIP_SKIP a SKIP becomes CONTINUE."""
        h = Harness()
        h.negotiate(6)
        h.milter.answers["body"] = m.SKIP
        h.send(CONNECT, MAIL, BODY)
        self.assertEqual(h.take(), CONTINUE * 3)

    def test_skip_outside_body(self):
        """SKIP to anything but BODY becomes CONTINUE, even when negotiated."""
        h = Harness(protocol=c.SMFIP_SKIP)
        h.negotiate(6)
        h.milter.answers["header"] = m.SKIP
        h.milter.answers["end_of_message"] = [m.SKIP]
        h.send(CONNECT, MAIL, HEADER, m.END_OF_MESSAGE)
        self.assertEqual(h.take(), CONTINUE * 4)


class ErrorTests(SynchronousTestCase):
    def test_exception_tempfails(self):
        """An exception in the milter is logged and answered with TEMPFAIL."""
        h = Harness()
        h.negotiate(6)
        h.milter.answers["mail"] = ZeroDivisionError()
        h.send(CONNECT, MAIL, RCPT)
        self.assertEqual(h.take(), CONTINUE + TEMPFAIL + CONTINUE)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_custom_error_reply(self):
        """The factory's error_reply replaces TEMPFAIL."""
        h = Harness()
        h.factory.error_reply = m.ReplyCode(b"451 4.3.0 try later")
        h.negotiate(6)
        h.milter.answers["connect"] = ZeroDivisionError()
        h.send(CONNECT)
        self.assertEqual(h.take(), m.ReplyCode(b"451 4.3.0 try later").encode())
        self.flushLoggedErrors(ZeroDivisionError)

    def test_exception_in_end_of_message(self):
        """An exception at end of message is answered once and ends the message."""
        h = Harness()
        h.negotiate(6)
        h.milter.answers["end_of_message"] = ZeroDivisionError()
        h.send(CONNECT, MAIL, m.END_OF_MESSAGE, m.ABORT)
        self.assertEqual(h.take(), CONTINUE * 2 + TEMPFAIL)
        self.assertNotIn("abort", h.names())
        self.flushLoggedErrors(ZeroDivisionError)

    def test_abort_and_close_failures_logged(self):
        """A failing abort or close is logged; the session goes on."""
        h = Harness()
        h.milter.abort = lambda macros: fail(ZeroDivisionError())
        h.milter.close = lambda: 1 / 0
        h.negotiate(6)
        h.send(CONNECT, MAIL, m.ABORT, MAIL, m.QUIT)
        self.assertEqual(h.take(), CONTINUE * 3)
        # Two aborts (A, and Q inside the second message) and the close.
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 3)

    def test_milter_factory_fails(self):
        """A milter factory that raises drops the connection."""
        factory = MilterServerFactory(lambda server: 1 / 0, clock=Clock())
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        protocol.dataReceived(negotiation.offer(6).encode())
        protocol.connectionLost(None)
        self.assertEqual(transport.value(), b"")


class DecodingTests(SynchronousTestCase):
    def assertDropped(self, data):
        h = Harness()
        h.negotiate(6)
        h.send(CONNECT, MAIL)
        h.take()
        h.protocol.dataReceived(data + RCPT.encode())
        self.assertEqual(h.take(), b"")
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(h.names(), ["connect", "mail", "abort", "close"])
        h.protocol.connectionLost(None)
        self.assertEqual(h.names().count("close"), 1)
        self.assertEqual(len(h.logged("error")), 1)

    def test_zero_length(self):
        """A zero length packet drops the connection."""
        self.assertDropped(b"\x00\x00\x00\x00R")

    def test_too_long(self):
        """A packet over the maximum size drops the connection."""
        self.assertDropped(b"\x00\x20\x00\x00R")

    def test_unknown_code(self):
        """An unknown command code drops the connection."""
        self.assertDropped(b"\x00\x00\x00\x01X")

    def test_bad_payload(self):
        """A malformed payload drops the connection."""
        self.assertDropped(b"\x00\x00\x00\x03Hab")

    def test_partial_packets(self):
        """Packets split at every byte give the same replies."""
        data = b"".join(command.encode() for command in (
            negotiation.offer(6), m.Macro(b"C", {b"j": b"mx"}), CONNECT, HELO, MAIL, RCPT,
            BODY, m.END_OF_MESSAGE, m.QUIT))
        h = Harness()
        for index in range(len(data)):
            h.protocol.dataReceived(data[index:index + 1])
        self.assertEqual(h.take(), packets(m.Negotiate(6, 0, 0)) + CONTINUE * 6)
        self.assertEqual(h.names(), ["connect", "helo", "mail", "rcpt", "body",
                                     "end_of_message", "close"])

    def test_data_after_quit_ignored(self):
        """Anything after Q is ignored."""
        h = Harness()
        h.negotiate(6)
        h.send(CONNECT, m.QUIT, HELO)
        self.assertEqual(h.take(), CONTINUE)
        self.assertEqual(h.names(), ["connect", "close"])


class TimeoutTests(SynchronousTestCase):
    """negotiation_timeout and idle_timeout, on the factory's clock."""

    def assertClosed(self, h, level, text):
        """The connection was closed with one log line at level that contains text."""
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(h.names().count("close"), 1)
        [event] = h.logged(level)
        self.assertIn(text, formatEvent(event))
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_off_by_default(self):
        """The library sets no timer: connections wait for the MTA as long as it likes."""
        factory = MilterServerFactory(Milter, clock=Clock())
        self.assertIsNone(factory.negotiation_timeout)
        self.assertIsNone(factory.idle_timeout)
        h = Harness()
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.clock.advance(10 ** 6)
        h.negotiate(6)
        h.send(CONNECT)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.clock.advance(10 ** 6)
        self.assertFalse(h.transport.disconnecting)

    def test_zero_is_off(self):
        """0 turns each timeout off, as None does."""
        h = Harness(negotiation_timeout=0, idle_timeout=0)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.negotiate(6)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_negotiation_timeout_closes(self):
        """An MTA that does not negotiate in time is logged and disconnected; close() runs."""
        h = Harness(negotiation_timeout=5)
        h.clock.advance(4.9)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(0.1)
        self.assertClosed(h, "warn", "[server][timeout][negotiate] the MTA (192.168.1.1:54321) "
                                     "did not negotiate within 5 s; closing the connection")
        self.assertEqual(h.names(), ["close"])
        self.assertEqual(h.take(), b"")

    def test_partial_negotiation_times_out(self):
        """Most of an option negotiation is not one: a slowloris is still closed."""
        h = Harness(negotiation_timeout=5)
        offer = negotiation.offer(6).encode()
        for index in range(len(offer) - 1):
            h.clock.advance(0.2)
            h.protocol.dataReceived(offer[index:index + 1])
        h.clock.advance(5 - 0.2 * (len(offer) - 1))
        self.assertClosed(h, "warn", "did not negotiate within 5 s")

    def test_negotiation_in_time(self):
        """Option negotiation before the deadline cancels it."""
        h = Harness(negotiation_timeout=5)
        h.clock.advance(4.9)
        self.assertEqual(h.negotiate(6), packets(m.Negotiate(6, 0, 0)))
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.clock.advance(3600)
        self.assertFalse(h.transport.disconnecting)
        self.assertEqual(h.logged("warn"), [])

    def test_slow_milter_negotiation(self):
        """The milter's own time to negotiate counts against neither timeout."""
        h = Harness(negotiation_timeout=5, idle_timeout=10)
        d = Deferred()
        h.milter.negotiate = lambda offer: d
        h.clock.advance(1)
        h.send(negotiation.offer(6))
        h.clock.pump([1] * 65)  # the idle check finds the milter busy at 11, 21, ... 61 s
        self.assertFalse(h.transport.disconnecting)
        d.callback(m.Negotiate(6, 0, 0))
        self.assertEqual(h.take(), packets(m.Negotiate(6, 0, 0)))
        h.clock.advance(9.9)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(0.1)
        self.assertClosed(h, "info", "[server][timeout][idle]")

    def test_idle_timeout_closes(self):
        """A negotiated connection without a command for idle_timeout is logged and closed."""
        h = Harness(idle_timeout=10)
        h.negotiate(6)
        h.clock.advance(3)
        h.send(CONNECT, HELO)
        h.clock.advance(9.9)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(0.1)
        self.assertClosed(h, "info", "[server][timeout][idle] no command from the MTA "
                                     "(192.168.1.1:54321) for 10 s; closing the connection")
        self.assertEqual(h.names(), ["connect", "helo", "close"])

    def test_idle_in_message(self):
        """An MTA gone quiet in the middle of a message: the message is aborted, then closed."""
        h = Harness(idle_timeout=10)
        h.negotiate(6)
        h.send(CONNECT, HELO, MAIL, RCPT)
        h.clock.advance(10)
        self.assertClosed(h, "info", "[server][timeout][idle]")
        self.assertEqual(h.names()[-2:], ["abort", "close"])

    def test_command_resets_idleness(self):
        """Each command restarts the idle time, without a new timer per command."""
        h = Harness(idle_timeout=10)
        h.negotiate(6)
        [timer] = h.clock.getDelayedCalls()
        h.send(CONNECT)
        for _ in range(4):
            h.clock.advance(2)
            h.send(HELO)
        self.assertEqual(h.clock.getDelayedCalls(), [timer])
        h.clock.advance(2)  # the check at 10 s finds 2 s of quiet and waits 8 more
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(7.9)
        h.send(HELO)  # 9.9 s after the last one
        for _ in range(20):
            h.clock.advance(9)
            h.send(HELO)
        self.assertFalse(h.transport.disconnecting)
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)
        h.clock.advance(9.9)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(0.1)
        self.assertClosed(h, "info", "[server][timeout][idle]")

    def test_partial_frame_is_not_activity(self):
        """Bytes of an incomplete command do not keep the connection."""
        h = Harness(idle_timeout=10)
        h.negotiate(6)
        helo = HELO.encode()
        for index in range(9):  # a byte a second
            h.clock.advance(1)
            h.protocol.dataReceived(helo[index:index + 1])
        h.clock.advance(1)
        self.assertClosed(h, "info", "[server][timeout][idle]")
        self.assertEqual(h.names(), ["close"])

    def test_pending_answer_keeps_connection(self):
        """A command the milter works on keeps the connection; quiet counts from its answer."""
        h = Harness(idle_timeout=10)
        h.negotiate(6)
        d = Deferred()
        h.milter.answers["end_of_message"] = d
        h.send(CONNECT, HELO, MAIL, RCPT, m.END_OF_MESSAGE)
        h.clock.advance(1)
        h.send(m.Macro(b"C", {b"j": b"mx"}))  # queued behind the pending answer
        h.clock.pump([1] * 600)  # the idle check finds the milter busy every 10 s
        self.assertFalse(h.transport.disconnecting)
        self.assertNotIn("close", h.names())
        h.take()
        d.callback(m.ACCEPT)
        self.assertEqual(h.take(), packets(m.ACCEPT))
        h.clock.advance(9.9)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(0.1)
        self.assertClosed(h, "info", "[server][timeout][idle]")

    def test_failed_answer_then_idle(self):
        """A failed pending answer also starts the quiet time."""
        h = Harness(idle_timeout=10)
        h.negotiate(6)
        d = Deferred()
        h.milter.answers["helo"] = d
        h.send(CONNECT, HELO)
        h.clock.pump([1] * 35)
        d.errback(Failure(ZeroDivisionError()))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        h.clock.advance(9.9)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(0.1)
        self.assertTrue(h.transport.disconnecting)

    def test_timers_gone_after_connection_lost(self):
        """Connection loss, QUIT or a protocol error leaves no timer behind."""
        h = Harness(negotiation_timeout=5, idle_timeout=10)
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)
        h.protocol.connectionLost(None)
        self.assertEqual(h.clock.getDelayedCalls(), [])

        h = Harness(negotiation_timeout=5, idle_timeout=10)
        h.negotiate(6)
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)
        h.protocol.connectionLost(None)
        self.assertEqual(h.clock.getDelayedCalls(), [])

        h = Harness(negotiation_timeout=5, idle_timeout=10)
        h.negotiate(6)
        h.send(CONNECT, m.QUIT)
        self.assertEqual(h.clock.getDelayedCalls(), [])

        h = Harness(negotiation_timeout=5, idle_timeout=10)
        h.protocol.dataReceived(b"\x00\x00\x00\x00R")
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.protocol.connectionLost(None)
        self.assertEqual(h.names(), ["close"])

    def test_new_connection_keeps_idle_timer(self):
        """After QUIT_NC the next conversation is watched by the same timer."""
        h = Harness(idle_timeout=10)
        h.negotiate(6)
        h.send(CONNECT, m.QUIT_NEW_CONNECTION)
        h.clock.advance(10)
        self.assertClosed(h, "info", "[server][timeout][idle]")
        self.assertEqual([milter.calls[-1] for milter in h.milters],
                         [("close", None), ("close", None)])

    def test_unix_socket_peer(self):
        """An MTA on a UNIX socket is named by the kind of socket."""
        from twisted.internet.address import UNIXAddress

        h = Harness(negotiation_timeout=5)
        h.transport.peerAddr = UNIXAddress(None)
        h.clock.advance(5)
        self.assertClosed(h, "warn", "the MTA (UNIX socket) did not negotiate")


class SilentConnectionsTests(TestCase):
    """negotiation_timeout on real loopback sockets, with the timers on a Clock."""

    def test_silent_connections_closed(self):
        """Many MTA connections that never negotiate are all closed at the deadline."""
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint

        count = 60
        clock = Clock()
        servers, lost = [], []
        all_made, all_lost = Deferred(), Deferred()

        class Server(MilterServerProtocol):
            def connectionMade(self):
                super().connectionMade()
                servers.append(self)
                if len(servers) == count + 1:
                    all_made.callback(None)

            def connectionLost(self, reason=None):
                super().connectionLost(reason)
                lost.append(self)
                if len(lost) == count:
                    all_lost.callback(None)

        factory = MilterServerFactory(Milter, clock=clock)
        factory.protocol = Server
        factory.negotiation_timeout = 5
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        class Client(Protocol):
            def __init__(self):
                self.received = b""
                self.answered = Deferred()
                self.lost = Deferred()

            def connectionMade(self):
                if self.factory.first_bytes:
                    self.transport.write(self.factory.first_bytes)

            def dataReceived(self, data):
                self.received += data
                if not self.answered.called:
                    self.answered.callback(None)

            def connectionLost(self, reason=None):
                self.lost.callback(None)

        def client_factory(first_bytes):
            client_factory = ClientFactory.forProtocol(Client)
            client_factory.first_bytes = first_bytes
            return client_factory

        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        offer = negotiation.offer(6).encode()
        # Half send nothing, half most of an option negotiation; one negotiates.
        wanted = [offer[:-1] if index % 2 else b"" for index in range(count)] + [offer]
        connecting = [endpoint.connect(client_factory(first)) for first in wanted]
        clients = []

        def close_clients():
            open_clients = [client for client in clients if not client.lost.called]
            for client in open_clients:
                client.transport.abortConnection()
            return DeferredList([client.lost for client in open_clients])
        self.addCleanup(close_clients)

        def connected(results):
            clients.extend(result for _, result in results)
            return DeferredList([all_made, clients[count].answered], fireOnOneErrback=True)

        def check_open(_):
            self.assertEqual(len(clock.getDelayedCalls()), count)
            clock.advance(4.9)
            self.assertFalse(any(client.lost.called for client in clients))
            clock.advance(0.1)
            self.assertEqual(clock.getDelayedCalls(), [])
            return DeferredList([client.lost for client in clients[:count]])

        def check_closed(_):
            negotiated = clients[count]
            self.assertFalse(negotiated.lost.called)
            self.assertEqual(negotiated.received, packets(m.Negotiate(6, 0, 0)))
            self.assertEqual(clients[0].received, b"")
            return all_lost

        def check_servers(_):
            self.assertEqual([server.stage for server in lost], [stages.CLOSED] * count)
            [negotiated] = [server for server in servers if server not in lost]
            self.assertIs(negotiated.stage, stages.CONNECT)

        d = DeferredList(connecting, fireOnOneErrback=True)
        d.addCallback(connected)
        d.addCallback(check_open)
        d.addCallback(check_closed)
        d.addCallback(check_servers)
        return d
