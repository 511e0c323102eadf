"""The real-peer fixtures work on their own: Postfix talks straight to each milter and to the manager."""

import smtplib
import time

from twisted.trial.unittest import TestCase

from tests.peers.fixtures import (LibmilterMilter, MiltermanagerProcess, OpenDKIM, Postfix, sink_message,
                                  verify_dkim)

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


SIGNED_MESSAGE = b"""\
From: alice@harness.test
To: bob@example.com
Subject: sign me
Date: Wed, 25 Nov 2026 10:00:00 +0000
Message-ID: <fixture-dkim@harness.test>

A body to sign.
.A line that SMTP dot-stuffs.

Last line.
"""


class OpenDKIMTests(TestCase):
    """Postfix with an OpenDKIM signer (and verifier) as its milters; verify_dkim checks offline."""

    def start_opendkim(self, mode, **kwargs):
        opendkim = OpenDKIM(self.mktemp(), mode, **kwargs)
        opendkim.start()
        self.addCleanup(opendkim.stop)
        return opendkim

    def start_postfix(self, *milters):
        postfix = Postfix(self.mktemp(), milters=[milter.postfix_spec for milter in milters])
        postfix.start()
        self.addCleanup(postfix.stop)
        return postfix

    def test_signed(self):
        """Mail from 127.0.0.1 through the signer carries a DKIM-Signature that verifies,
        and fails once its body is changed."""
        signer = self.start_opendkim("s")
        self.assertEqual(signer.spec, f"inet:{signer.port}@127.0.0.1")
        self.assertTrue(signer.public_key_txt.startswith("v=DKIM1; h=sha256; k=rsa; p=MIG"))
        postfix = self.start_postfix(signer)
        result = postfix.send("alice@harness.test", ["bob@example.com"], SIGNED_MESSAGE)
        self.assertTrue(result.accepted, result)
        [delivered] = postfix.wait_delivered(1)
        self.assertIn(b"\nDKIM-Signature: v=1; a=rsa-sha256; c=relaxed/simple; d=harness.test; s=test;",
                      delivered)
        keys = signer.txt_records
        self.assertTrue(verify_dkim(delivered, keys))
        self.assertFalse(verify_dkim(delivered.replace(b"A body to sign.", b"A body to sing."), keys))
        self.assertFalse(verify_dkim(delivered.replace(b"Subject: sign me", b"Subject: sign mE"), keys))
        self.assertFalse(verify_dkim(delivered, {}))

    def test_signed_then_verified(self):
        """A verifier sharing the signer's key, after it in smtpd_milters, reports dkim=pass."""
        signer = self.start_opendkim("s")
        verifier = self.start_opendkim("v", key_from=signer)
        self.assertEqual(verifier.public_key_txt, signer.public_key_txt)
        postfix = self.start_postfix(signer, verifier)
        result = postfix.send("alice@harness.test", ["bob@example.com"], SIGNED_MESSAGE)
        self.assertTrue(result.accepted, result)
        [delivered] = postfix.wait_delivered(1)
        self.assertRegex(delivered,
                         rb"\nAuthentication-Results: mta\.harness\.test;\n\tdkim=pass \(1024-bit key\)")
        self.assertTrue(verify_dkim(delivered, signer.txt_records))

    def test_quick_stop(self):
        """stop() takes well under libmilter's 5 s poll: a connection wakes the listener up."""
        signer = self.start_opendkim("s")
        started = time.monotonic()
        signer.stop()
        self.assertLess(time.monotonic() - started, 2)
        self.assertIsNotNone(signer.process.returncode)


class SinkMessageTests(TestCase):
    """sink_message turns an smtp-sink dump back into the relayed message."""

    def test_envelope_dropped(self):
        """Envelope lines and smtp-sink's folded Received header go; LF becomes CRLF;
        the extra LF of the final "." goes."""
        dump = (b"X-Client-Addr: 127.0.0.1\nX-Client-Proto: ESMTP\nX-Helo-Args: mta.harness.test\n"
                b"X-Mail-Args: <a@b>\nX-Rcpt-Args: <c@d>\nX-Rcpt-Args: <e@f>\n"
                b"Received: from mta.harness.test ([127.0.0.1])\n\tby smtp-sink; Wed\n"
                b"Subject: x\n\nbody\n\n")
        self.assertEqual(sink_message(dump), b"Subject: x\r\n\r\nbody\r\n")

    def test_plain_message(self):
        """A message that is no dump only gets CRLF line ends."""
        self.assertEqual(sink_message(b"Subject: x\r\n\nbody\n\n"), b"Subject: x\r\n\r\nbody\r\n\r\n")


class MiltermanagerProcessTests(TestCase):
    """`twistd -n milter-manager` from this checkout, between Postfix and nothing else."""

    def test_postfix_through_manager(self):
        """With no child milter the manager answers its fallback, accept: the mail is delivered."""
        manager = MiltermanagerProcess(self.mktemp(), "", args=["--connection-spec", "{spec}"])
        self.assertEqual(manager.spec, f"inet:{manager.port}@[127.0.0.1]")
        self.assertEqual(manager.args, ["--connection-spec", manager.spec])
        manager.start()
        self.addCleanup(manager.stop)
        postfix = Postfix(self.mktemp(), milters=[manager.postfix_spec])
        postfix.start()
        self.addCleanup(postfix.stop)
        result = postfix.send("alice@harness.test", ["bob@example.com"], MESSAGE)
        self.assertTrue(result.accepted, result)
        [delivered] = postfix.wait_delivered(1)
        self.assertIn(b"\n\nHello from the peer fixtures.\n", delivered)
        manager.stop()
        self.assertIn("Server Shut Down.", manager.log())

    def test_config_file(self):
        """By default the manager reads DIR/milter-manager.conf; its fallback status reject reaches
        Postfix, which then refuses every client."""
        config = ('manager.connection_spec = "{spec}"  # braces of Python stay: {"a": 1}\n'
                  'manager.fallback_status = "reject"\n')
        manager = MiltermanagerProcess(self.mktemp(), config)
        self.assertEqual(manager.args, ["--config", manager.config_path])
        self.assertEqual(manager.config_text, config.replace("{spec}", manager.spec))
        self.assertIn('{"a": 1}', manager.config_text)
        manager.start()
        self.addCleanup(manager.stop)
        postfix = Postfix(self.mktemp(), milters=[manager.postfix_spec])
        postfix.start()
        self.addCleanup(postfix.stop)
        refused = self.assertRaises(smtplib.SMTPConnectError, postfix.send, "alice@harness.test",
                                    ["bob@example.com"], MESSAGE)
        self.assertEqual(refused.smtp_code, 554)
        postfix.wait_maillog("milter-reject: CONNECT from localhost[127.0.0.1]")

    def test_start_fails_fast(self):
        """A manager that exits at once makes start() raise with its log, without waiting."""
        manager = MiltermanagerProcess(self.mktemp(), "", args=["--connection-spec", "nonsense:{port}"])
        started = time.monotonic()
        error = self.assertRaises(RuntimeError, manager.start)
        self.assertLess(time.monotonic() - started, 10)
        self.assertIn("nonsense", str(error))
        self.assertIn("milter-manager did not start", str(error))
