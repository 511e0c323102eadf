"""The real-peer fixtures work on their own: Postfix talks straight to a libmilter milter."""

from twisted.trial.unittest import TestCase

from tests.peers.fixtures import LibmilterMilter, Postfix

MESSAGE = b"""\
From: alice@harness.test
To: bob@example.com
Subject: fixture check

Hello from the peer fixtures.
"""


class PostfixWithLibmilterTests(TestCase):
    """A private Postfix whose smtpd_milters is one LibmilterMilter, relaying to smtp-sink."""

    def setUp(self):
        self.milter = LibmilterMilter(self.mktemp(), "m1")
        self.milter.start()
        self.addCleanup(self.milter.stop)
        self.postfix = Postfix(self.mktemp(), milters=[self.milter.postfix_spec])
        self.postfix.start()
        self.addCleanup(self.postfix.stop)

    def test_delivered_with_milter_header(self):
        """A mail to two recipients reaches smtp-sink once, with the milter's X-Libmilter header."""
        result = self.postfix.send("alice@harness.test", ["bob@example.com", "carol@example.com"], MESSAGE)
        self.assertEqual(result.rcpts, {"bob@example.com": (250, "2.1.5 Ok"),
                                        "carol@example.com": (250, "2.1.5 Ok")})
        self.assertTrue(result.accepted, result)
        [delivered] = self.postfix.wait_delivered(1)
        self.assertIn(b"X-Rcpt-Args: <bob@example.com>", delivered)
        self.assertIn(b"X-Rcpt-Args: <carol@example.com>", delivered)
        self.assertIn(f"\nX-Libmilter: m1 saw {result.queue_id}\n".encode(), delivered)
        self.assertIn(b"\n\nHello from the peer fixtures.\n", delivered)

    def test_rejected_recipient(self):
        """The milter's 550 reaches the client verbatim; the other recipient is still delivered."""
        result = self.postfix.send("alice@harness.test", ["reject@example.com", "bob@example.com"], MESSAGE)
        self.assertEqual(result.rcpts["reject@example.com"], (550, "5.7.1 m1 rejected recipient"))
        self.assertEqual(result.rcpts["bob@example.com"], (250, "2.1.5 Ok"))
        self.assertTrue(result.accepted, result)
        [delivered] = self.postfix.wait_delivered(1)
        self.assertIn(b"X-Rcpt-Args: <bob@example.com>", delivered)
        self.assertNotIn(b"reject@example.com", delivered)

    def test_every_recipient_rejected(self):
        """When the milter rejects every recipient, send() reports the replies and skips DATA."""
        result = self.postfix.send("alice@harness.test", ["reject@example.com", "tempfail@example.com"], MESSAGE)
        self.assertEqual(result.rcpts, {"reject@example.com": (550, "5.7.1 m1 rejected recipient"),
                                        "tempfail@example.com": (451, "4.7.1 m1 tempfail recipient")})
        self.assertIsNone(result.data)
        self.assertFalse(result.accepted)

    def test_milter_log(self):
        """The milter logs each stage of the transaction with Postfix's j and i macros."""
        result = self.postfix.send("alice@harness.test", ["bob@example.com"], MESSAGE)
        self.postfix.wait_delivered(1)
        events = self.milter.events()
        by_name = {event["event"]: event for event in events}
        names = [event["event"] for event in events]
        for stage in ("negotiate", "connect", "helo", "envfrom", "envrcpt", "eom"):
            self.assertIn(stage, names)
        stages = [names.index(stage) for stage in ("connect", "helo", "envfrom", "envrcpt", "eom")]
        self.assertEqual(stages, sorted(stages))
        self.assertEqual(by_name["connect"]["macros"]["j"], "mta.harness.test")
        self.assertEqual(by_name["helo"]["hostname"], "client.harness.test")
        self.assertEqual(by_name["envfrom"]["sender"], "<alice@harness.test>")
        self.assertEqual(by_name["envrcpt"]["recipient"], "<bob@example.com>")
        self.assertEqual(by_name["envrcpt"]["macros"]["{rcpt_addr}"], "bob@example.com")
        self.assertEqual(by_name["eom"]["macros"]["i"], result.queue_id)
        self.assertEqual({event["conn"] for event in events}, {1})
