"""End to end: Postfix -> `twistd -n milter-manager` -> libmilter children and opendkim."""

import os
import subprocess
from email import message_from_bytes

from twisted.trial.unittest import SynchronousTestCase

from tests.peers.fixtures import (
    HOST, LibmilterMilter, MiltermanagerProcess, OpenDKIM, Postfix, free_port, sink_message,
    verify_dkim,
)

MESSAGE = b"""\
From: alice@harness.test
To: bob@example.com
Subject: %s
Date: Wed, 25 Nov 2026 10:00:00 +0000
Message-Id: <e2e@harness.test>

Hello from the end-to-end test.
"""

MILTER = """
with define_milter({name!r}) as milter:
    milter.connection_spec = {spec!r}
    milter.fallback_status = {fallback!r}
    milter.evaluation_mode = {evaluation!r}
"""


class ManagerHarness:
    """Children, the manager configured with them, and a Postfix in front."""

    def start_children(self, *children):
        """Start (name, flags) libmilter children; return them in order."""
        started = []
        for name, flags in children:
            milter = LibmilterMilter(self.mktemp(), name, *flags)
            milter.start()
            self.addCleanup(milter.stop)
            started.append(milter)
        return started

    def start_opendkim(self):
        signer = OpenDKIM(self.mktemp())
        signer.start()
        self.addCleanup(signer.stop)
        return signer

    def start_manager(self, milters, fallback_status="accept"):
        """milters: (name, spec, fallback, evaluation) in configuration order."""
        text = f'manager.connection_spec = "{{spec}}"\nmanager.fallback_status = "{fallback_status}"\n'
        for name, spec, fallback, evaluation in milters:
            text += MILTER.format(name=name, spec=spec, fallback=fallback, evaluation=evaluation)
        manager = MiltermanagerProcess(self.mktemp(), text)
        manager.start()
        self.addCleanup(manager.stop)
        return manager

    def start_postfix(self, manager):
        postfix = Postfix(self.mktemp(), milters=[manager.postfix_spec])
        postfix.start()
        self.addCleanup(postfix.stop)
        return postfix

    def send(self, postfix, recipients, subject=b"hello"):
        return postfix.send("alice@harness.test", recipients, MESSAGE % subject)


class TwoChildrenAndOpenDKIMTests(ManagerHarness, SynchronousTestCase):
    """Two libmilter children and a signing opendkim behind the manager."""

    def setUp(self):
        self.first, self.second = self.start_children(
            ("first", ["--change-subject"]), ("second", ["--no-rcpt-rules"]))
        self.signer = self.start_opendkim()
        self.manager = self.start_manager([
            ("first", self.first.spec, "accept", False),
            ("second", self.second.spec, "accept", False),
            ("opendkim", self.signer.spec, "temporary-failure", False),
        ])
        self.postfix = self.start_postfix(self.manager)

    def test_headers_of_both_children_in_configuration_order(self):
        """Each child's header reaches the mail, in configuration order, and later children
        saw the earlier ones' changes."""
        result = self.send(self.postfix, ["bob@example.com"])
        self.assertTrue(result.accepted, result)
        [delivered] = self.postfix.wait_delivered(1)
        message = message_from_bytes(sink_message(delivered))
        self.assertEqual(message.get_all("X-Libmilter"), [
            f"first saw {result.queue_id}", f"second saw {result.queue_id}"])
        self.assertEqual(message["Subject"], "[first] hello")
        subjects = [event["value"] for event in self.second.events()
                    if event["event"] == "header" and event["name"] == "Subject"]
        self.assertEqual(subjects, ["[first] hello"])

    def test_dkim_signature_verifies(self):
        """opendkim, third in the chain, signs the message as the children before it left
        it, and the signature verifies on the delivered mail."""
        result = self.send(self.postfix, ["bob@example.com"])
        self.assertTrue(result.accepted, result)
        [delivered] = self.postfix.wait_delivered(1)
        message = sink_message(delivered)
        self.assertIn(b"DKIM-Signature:", message)
        self.assertTrue(verify_dkim(message, self.signer.txt_records))

    def test_one_child_rejects_a_recipient(self):
        """The recipient the first child rejects gets its 550; the other one is delivered."""
        result = self.send(self.postfix, ["reject@example.com", "bob@example.com"])
        self.assertEqual(result.rcpts["reject@example.com"],
                         (550, "5.7.1 first rejected recipient"))
        self.assertEqual(result.rcpts["bob@example.com"][0], 250)
        self.assertTrue(result.accepted, result)
        [delivered] = self.postfix.wait_delivered(1)
        rcpts = [line.split()[1] for line in delivered.splitlines()
                 if line.startswith(b"X-Rcpt-Args:")]
        self.assertEqual(rcpts, [b"<bob@example.com>"])

    def test_same_flow_driven_by_milter_test_server(self):
        """milter-test-server against the manager shows both children's work and the signature."""
        output = subprocess.run(
            ["milter-test-server", "-s", self.manager.spec, "-f", "alice@harness.test",
             "--connect-address", f"inet:40000@[{HOST}]",
             "-r", "bob@example.com", "-r", "reject@example.com",
             "-h", "From:alice@harness.test", "-h", "Subject:hello", "--output-message"],
            capture_output=True, text=True, timeout=60, check=True).stdout
        self.assertTrue(output.startswith("status: pass"), output)
        self.assertIn("- RCPT TO:<reject@example.com>\n", output)
        self.assertIn("- Subject: hello\n+ Subject: [first] hello\n", output)
        self.assertIn("+ X-Libmilter: first saw", output)
        self.assertIn("+ X-Libmilter: second saw", output)
        self.assertIn("+ DKIM-Signature: v=1; a=rsa-sha256;", output)
        self.assertLess(output.index("first saw"), output.index("second saw"))


class HeaderVerdictTests(ManagerHarness, SynchronousTestCase):
    """Postfix sends the headers without waiting (the manager asks it for no reply to them);
    a child's reject at a header still reaches the SMTP client at the end of DATA."""

    def test_reject_at_a_header(self):
        """The first child rejects the Subject header: the SMTP client gets its 554 after the
        message, nothing is delivered, the child sees no header after it and the second
        child nothing of the message."""
        judge, after = self.start_children(("judge", ["--reject-header", "Subject"]),
                                           ("after", []))
        manager = self.start_manager([("judge", judge.spec, "accept", False),
                                      ("after", after.spec, "accept", False)])
        postfix = self.start_postfix(manager)
        result = self.send(postfix, ["bob@example.com"])
        self.assertEqual(result.data, (554, "5.7.1 judge rejected header Subject"), result)
        self.assertFalse(result.accepted)
        headers = [event["name"] for event in judge.events() if event["event"] == "header"]
        self.assertEqual(headers[-1], "Subject")
        self.assertNotIn("eoh", [event["event"] for event in judge.events()])
        self.assertEqual([event["event"] for event in after.events()
                          if event["event"] in ("header", "eoh", "body", "eom")], [])
        # The same mail without the reject goes through: the headers were not the problem.
        [plain] = self.start_children(("plain", []))
        other = self.start_postfix(self.start_manager([("plain", plain.spec, "accept", False)]))
        self.assertTrue(self.send(other, ["bob@example.com"]).accepted)


class RestartedChildTests(ManagerHarness, SynchronousTestCase):
    """The manager answers Postfix's option negotiation from the children's last replies."""

    def test_restarted_with_other_settings(self):
        """A child restarted to negotiate otherwise (no reply to connect and HELO, which the
        manager makes up for) takes part in the next SMTP connection, answered ahead."""
        [child] = self.start_children(("child", []))
        manager = self.start_manager([("child", child.spec, "temporary-failure", False)])
        postfix = self.start_postfix(manager)
        self.assertTrue(self.send(postfix, ["bob@example.com"]).accepted)
        child.stop()
        restarted = LibmilterMilter(self.mktemp(), "child", "--noreply-connect-helo")
        restarted.port, restarted.spec = child.port, child.spec
        restarted.start()
        self.addCleanup(restarted.stop)

        self.assertTrue(self.send(postfix, ["bob@example.com"]).accepted)
        self.assertIn("[children][negotiate][changed] child: negotiated", manager.log())
        self.assertTrue(self.send(postfix, ["bob@example.com"]).accepted)
        delivered = postfix.wait_delivered(3)
        self.assertEqual([b"X-Libmilter: child saw" in mail for mail in delivered], [True] * 3)
        self.assertEqual([event["event"] for event in restarted.events()].count("connect"), 2)


class DownChildTests(ManagerHarness, SynchronousTestCase):
    """A child nobody listens for contributes its fallback status; the others keep working."""

    def setUp(self):
        [self.up] = self.start_children(("up", []))
        self.down_spec = f"inet:{free_port()}@[{HOST}]"

    def test_fallback_accept_lets_mail_through(self):
        """A down child with fallback accept: the mail is delivered, filtered by the healthy one."""
        manager = self.start_manager([("down", self.down_spec, "accept", False),
                                      ("up", self.up.spec, "accept", False)])
        postfix = self.start_postfix(manager)
        result = self.send(postfix, ["bob@example.com"])
        self.assertTrue(result.accepted, result)
        [delivered] = postfix.wait_delivered(1)
        self.assertIn(b"X-Libmilter: up saw", delivered)

    def test_fallback_temporary_failure_tempfails(self):
        """A down child with fallback temporary-failure: 451 at SMTP although a sibling is up."""
        manager = self.start_manager([("down", self.down_spec, "temporary-failure", False),
                                      ("up", self.up.spec, "accept", False)])
        postfix = self.start_postfix(manager)
        result = self.send(postfix, ["bob@example.com"])
        self.assertEqual(result.mail[0], 451, result)
        self.assertFalse(result.accepted)


class EvaluationModeTests(ManagerHarness, SynchronousTestCase):
    """An evaluation-mode child's verdict is logged, not applied."""

    def test_evaluation_child_reject_does_not_reject(self):
        """A reject at end of message from an evaluation-mode child lets the mail through,
        and the child after it still adds its header."""
        judge, after = self.start_children(
            ("judge", ["--reject-subject", "spam"]), ("after", []))
        manager = self.start_manager([("judge", judge.spec, "accept", True),
                                      ("after", after.spec, "accept", False)])
        postfix = self.start_postfix(manager)
        result = self.send(postfix, ["bob@example.com"], subject=b"spam offer")
        self.assertTrue(result.accepted, result)
        [delivered] = postfix.wait_delivered(1)
        message = message_from_bytes(sink_message(delivered))
        self.assertEqual(message.get_all("X-Libmilter"), [f"after saw {result.queue_id}"])
        self.assertIn("eom", [event["event"] for event in judge.events()])


class ShippedExampleTests(SynchronousTestCase):
    """etc/examples/postfix-two-children.conf, as the README documents it."""

    def test_example_loads(self):
        """The shipped two-children example is a valid configuration."""
        from miltermanager import config
        path = os.path.join(os.path.dirname(__file__), "..", "etc", "examples",
                            "postfix-two-children.conf")
        configuration = config.load(path)
        from miltermanager.merge import Status
        self.assertEqual([milter.name for milter in configuration.milters],
                         ["libmilter-milter", "opendkim"])
        self.assertIs(configuration.milter("opendkim").fallback_status,
                      Status.TEMPORARY_FAILURE)
