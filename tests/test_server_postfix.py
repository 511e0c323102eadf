"""Interop: a real Postfix talks to a milter built with miltermanager.server."""

from email import message_from_bytes

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from miltermanager.protocol import constants as c
from miltermanager.protocol import messages
from miltermanager.server import Milter, MilterServerFactory
from tests.peers.fixtures import Postfix

MESSAGE = b"""\
From: alice@harness.test
To: bob@example.com
Subject: %s

first line of the original body
second line
"""


class RecordingMilter(Milter):
    """Record each event with its macros; reject reject@..., rewrite the message at the end."""

    actions = c.SMFIF_ADDHDRS | c.SMFIF_CHGBODY
    events = None  # the test's list, shared by every connection

    def _record(self, event, macros, *args):
        self.events.append((event, args, dict(macros.stage(_STAGES[event]))))

    def negotiate(self, offer):
        self.events.append(("negotiate", (offer.version,), {}))
        return super().negotiate(offer)

    def connect(self, command, macros):
        self._record("connect", macros, command.hostname, command.family, command.address)
        return messages.CONTINUE

    def helo(self, command, macros):
        self._record("helo", macros, command.name)
        return messages.CONTINUE

    def mail(self, command, macros):
        self._record("mail", macros, command.sender)
        return messages.CONTINUE

    def rcpt(self, command, macros):
        self._record("rcpt", macros, command.recipient)
        if command.recipient.startswith(b"<reject@"):
            return messages.ReplyCode(b"550 5.7.1 server library rejected recipient")
        return messages.CONTINUE

    def data(self, command, macros):
        self._record("data", macros)
        return messages.CONTINUE

    def header(self, command, macros):
        self._record("header", macros, command.name, command.value)
        return messages.CONTINUE

    def end_of_headers(self, command, macros):
        self._record("end_of_headers", macros)
        return messages.CONTINUE

    def body(self, command, macros):
        self._record("body", macros, command.chunk)
        return messages.CONTINUE

    def end_of_message(self, command, macros):
        self._record("end_of_message", macros)
        return [
            messages.AddHeader(b"X-Server-Library", b"saw " + macros.get(b"i", b"?")),
            messages.ReplaceBody(b"replaced by the milter\r\n"),
            messages.CONTINUE,
        ]


_STAGES = {
    "connect": b"C", "helo": b"H", "mail": b"M", "rcpt": b"R", "data": b"T",
    "header": b"L", "end_of_headers": b"N", "body": b"B", "end_of_message": b"E",
}


class PostfixInteropMixin:
    """The same checks at each milter_protocol version Postfix is told to use."""

    milter_protocol = None

    def setUp(self):
        self.events = []
        milter_class = type("Milter", (RecordingMilter,), {"events": self.events})
        port = reactor.listenTCP(0, MilterServerFactory(milter_class), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.postfix = Postfix(
            self.mktemp(), milters=[f"inet:127.0.0.1:{port.getHost().port}"],
            milter_protocol=self.milter_protocol)
        self.postfix.start()
        self.addCleanup(self.postfix.stop)

    def send(self, recipients, subject=b"hello"):
        return deferToThread(
            self.postfix.send, "alice@harness.test", recipients, MESSAGE % subject)

    def events_named(self, name):
        return [event for event in self.events if event[0] == name]

    @inlineCallbacks
    def test_every_stage_with_postfix_macros(self):
        """The milter sees every stage Postfix's version has, each with Postfix's macros."""
        result = yield self.send(["bob@example.com"])
        self.assertTrue(result.accepted, result)
        order = [name for name, _, _ in self.events]
        expected = ["negotiate", "connect", "helo", "mail", "rcpt"]
        if self.milter_protocol >= 4:
            expected.append("data")
        self.assertEqual(order[:len(expected)], expected)
        self.assertEqual(order[-3:], ["end_of_headers", "body", "end_of_message"])
        self.assertEqual(self.events_named("negotiate")[0][1], (self.milter_protocol,))
        [(_, (hostname, family, address), connect_macros)] = self.events_named("connect")
        self.assertEqual((hostname, family, address), (b"localhost", b"4", b"127.0.0.1"))
        self.assertEqual(connect_macros[b"j"], b"mta.harness.test")
        self.assertEqual(connect_macros[b"{daemon_name}"], b"mta.harness.test")
        self.assertEqual(self.events_named("helo")[0][1], (b"client.harness.test",))
        [(_, (sender,), mail_macros)] = self.events_named("mail")
        self.assertEqual(sender, b"<alice@harness.test>")
        self.assertEqual(mail_macros[b"{mail_addr}"], b"alice@harness.test")
        [(_, (recipient,), rcpt_macros)] = self.events_named("rcpt")
        self.assertEqual(rcpt_macros[b"{rcpt_addr}"], b"bob@example.com")
        headers = [args for _, args, _ in self.events_named("header")]
        self.assertIn((b"Subject", b"hello"), headers)
        body = b"".join(args[0] for _, args, _ in self.events_named("body"))
        self.assertEqual(body, b"first line of the original body\r\nsecond line\r\n")
        queue_id = self.events_named("end_of_message")[0][2][b"i"]
        self.assertEqual(queue_id.decode(), result.queue_id)

    @inlineCallbacks
    def test_added_header_and_replaced_body_are_delivered(self):
        """A header added and a body replaced at end of message reach the delivered mail."""
        result = yield self.send(["bob@example.com"])
        self.assertTrue(result.accepted, result)
        [delivered] = yield deferToThread(self.postfix.wait_delivered, 1)
        message = message_from_bytes(delivered)
        self.assertEqual(message["X-Server-Library"], f"saw {result.queue_id}")
        # smtp-sink stores lines with LF only and one more LF after the final dot.
        self.assertEqual(message.get_payload().rstrip("\n"), "replaced by the milter")

    @inlineCallbacks
    def test_reject_reaches_the_smtp_client(self):
        """A recipient the milter rejects gets its 550 while the other one is delivered."""
        result = yield self.send(["reject@example.com", "bob@example.com"])
        self.assertEqual(result.rcpts["reject@example.com"],
                         (550, "5.7.1 server library rejected recipient"))
        self.assertEqual(result.rcpts["bob@example.com"][0], 250)
        self.assertTrue(result.accepted, result)
        [delivered] = yield deferToThread(self.postfix.wait_delivered, 1)
        recipients = [line.split()[1] for line in delivered.splitlines()
                      if line.startswith(b"X-Rcpt-Args:")]
        self.assertEqual(recipients, [b"<bob@example.com>"])


class Protocol6Tests(PostfixInteropMixin, TestCase):
    milter_protocol = 6


class Protocol2Tests(PostfixInteropMixin, TestCase):
    milter_protocol = 2
