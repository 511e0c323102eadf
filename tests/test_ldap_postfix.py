"""End to end: Postfix -> `twistd -n milter-manager` (LDAP Policy) -> three libmilter children.

The policies come from a real slapd (tests.peers.slapd). Which children ran is read from the
delivered mail: each child adds `X-Libmilter: NAME saw QUEUEID` at end of message, and each
smtp-sink dump is one relayed transaction with one X-Rcpt-Args line per recipient.

Directory: @a.example bypasses "one", @b.example bypasses "two", vip@a.example applies "one"
(a user's milterManagerApply beats its domain's milterManagerBypass). "three" is named nowhere.
"""

import os
import re
import subprocess
import time
from email import message_from_bytes

from twisted.trial.unittest import SynchronousTestCase

from tests.peers.fixtures import (
    REPO, LibmilterMilter, MiltermanagerProcess, Postfix, sink_message,
)
from tests.peers.slapd import Slapd

BASE = "ou=milter-policy,dc=example,dc=com"
CHILDREN = ("one", "two", "three")

POLICY_LDIF = f"""\
dn: {BASE}
objectClass: organizationalUnit
ou: milter-policy

dn: cn=a.example,{BASE}
objectClass: organizationalRole
objectClass: milterManagerPolicy
cn: a.example
mail: @a.example
milterManagerBypass: one

dn: cn=b.example,{BASE}
objectClass: organizationalRole
objectClass: milterManagerPolicy
cn: b.example
mail: @b.example
milterManagerBypass: two

dn: cn=vip@a.example,{BASE}
objectClass: organizationalRole
objectClass: milterManagerPolicy
cn: vip@a.example
mail: vip@a.example
milterManagerApply: one
"""

MANAGER = """\
manager.connection_spec = "{{spec}}"
manager.fallback_status = "temporary-failure"
log.level = "all"
log.use_syslog = False
load({conditions!r})
ldap.uris = [{uri!r}]
ldap.base = {base!r}
ldap.split_recipients = {split!r}
"""

MILTER = """
with define_milter({name!r}) as milter:
    milter.connection_spec = {spec!r}
    milter.applicable_conditions = ["LDAP Policy"]
"""

MESSAGE = b"""\
From: alice@harness.test
To: undisclosed-recipients:;
Subject: policy
Date: Wed, 25 Nov 2026 10:00:00 +0000
Message-Id: <ldap-e2e@harness.test>

Hello through the LDAP policies.
"""

SENDER = "alice@harness.test"
_HEADER = re.compile(r"(\S+) saw (\S+)\Z")


def recipients_of(dump):
    """The envelope recipients of one smtp-sink dump, without <>."""
    return [line.split()[1].decode().strip("<>") for line in dump.splitlines()
            if line.startswith(b"X-Rcpt-Args:")]


def headers_of(dump):
    """The X-Libmilter headers of one smtp-sink dump as (child, queue id) pairs, in order."""
    values = message_from_bytes(sink_message(dump)).get_all("X-Libmilter") or []
    pairs = []
    for value in values:
        match = _HEADER.match(value.strip())
        pairs.append(match.groups() if match else (value, None))
    return pairs


class LDAPPolicyHarness:
    """A slapd with the policies, three children, the manager and a receiving Postfix."""

    split = False

    def setUp(self):
        self.slapd = Slapd(self.mktemp(), ldif=[POLICY_LDIF])
        self.addCleanup(self.slapd.stop)
        self.slapd.start()
        self.children = {}
        for name in CHILDREN:
            milter = LibmilterMilter(self.mktemp(), name)
            self.addCleanup(milter.stop)
            milter.start()
            self.children[name] = milter
        text = MANAGER.format(
            conditions=os.path.join(REPO, "etc", "applicable-conditions", "ldap-policy.conf"),
            uri=self.slapd.uri, base=BASE, split=self.split)
        for name, milter in self.children.items():
            text += MILTER.format(name=name, spec=milter.spec)
        self.manager = MiltermanagerProcess(self.mktemp(), text)
        self.addCleanup(self.manager.stop)
        self.manager.start()
        self.receiver = Postfix(self.mktemp(), milters=[self.manager.postfix_spec])
        self.addCleanup(self.receiver.stop)
        self.receiver.start()

    def logs(self):
        """The logs to read when an assertion fails."""
        return (f"\n--- manager log ---\n{self.manager.log()[-12000:]}"
                f"\n--- receiver's maillog ---\n{self.receiver.maillog()[-4000:]}")

    def rcpts_seen(self, name):
        """The recipients child name was given (envrcpt), in order, without <>."""
        return [event["recipient"].strip("<>") for event in self.children[name].events()
                if event["event"] == "envrcpt"]

    def assert_transaction(self, dump, recipients, children, queue_id=None):
        """dump has exactly recipients and the headers of exactly children, in that order."""
        context = dump.decode(errors="replace") + self.logs()
        self.assertEqual(recipients_of(dump), recipients, context)
        headers = headers_of(dump)
        self.assertEqual([name for name, _ in headers], list(children), context)
        ids = {seen for _, seen in headers}
        self.assertEqual(len(ids), 1, headers)
        if queue_id is not None:
            self.assertEqual(ids, {queue_id}, headers)


class PerRecipientPolicyTests(LDAPPolicyHarness, SynchronousTestCase):
    """One transaction a message: the children run as the recipients' policies say."""

    def deliver(self, recipients):
        result = self.receiver.send(SENDER, recipients, MESSAGE)
        self.assertTrue(result.accepted, f"{result}{self.logs()}")
        [dump] = self.receiver.wait_delivered(1)
        return result, dump

    def test_domain_bypass_a(self):
        """x@a.example: its domain bypasses one; two and three run."""
        result, dump = self.deliver(["x@a.example"])
        self.assert_transaction(dump, ["x@a.example"], ["two", "three"], result.queue_id)
        self.assertEqual(self.rcpts_seen("one"), [], self.logs())

    def test_domain_bypass_b(self):
        """y@b.example: its domain bypasses two; one and three run."""
        result, dump = self.deliver(["y@b.example"])
        self.assert_transaction(dump, ["y@b.example"], ["one", "three"], result.queue_id)
        self.assertEqual(self.rcpts_seen("two"), [], self.logs())

    def test_user_override(self):
        """vip@a.example: the user's milterManagerApply: one beats the domain's bypass, for
        that user only: another user of a.example still bypasses one."""
        result, dump = self.deliver(["vip@a.example"])
        self.assert_transaction(dump, ["vip@a.example"], ["one", "two", "three"], result.queue_id)
        self.assertEqual(self.rcpts_seen("one"), ["vip@a.example"], self.logs())
        other = self.receiver.send(SENDER, ["other@a.example"], MESSAGE)
        self.assertTrue(other.accepted, f"{other}{self.logs()}")
        _, dump = self.receiver.wait_delivered(2)
        self.assert_transaction(dump, ["other@a.example"], ["two", "three"], other.queue_id)
        self.assertEqual(self.rcpts_seen("one"), ["vip@a.example"], self.logs())

    def test_mixed_recipients_without_split(self):
        """x@a.example and y@b.example together: one transaction, every child runs (each of one
        and two for the recipient that applies it), and each child sees only its recipients."""
        result, dump = self.deliver(["x@a.example", "y@b.example"])
        self.assertEqual(result.rcpts, {"x@a.example": (250, "2.1.5 Ok"),
                                        "y@b.example": (250, "2.1.5 Ok")}, self.logs())
        self.assert_transaction(dump, ["x@a.example", "y@b.example"], ["one", "two", "three"],
                                result.queue_id)
        self.assertEqual(self.rcpts_seen("one"), ["y@b.example"], self.logs())
        self.assertEqual(self.rcpts_seen("two"), ["x@a.example"], self.logs())
        self.assertEqual(self.rcpts_seen("three"), ["x@a.example", "y@b.example"], self.logs())


class SplitRecipientsTests(LDAPPolicyHarness, SynchronousTestCase):
    """ldap.split_recipients: Postfix's own SMTP client splits a message by policy."""

    split = True

    def setUp(self):
        super().setUp()
        # myhostname differs from the receiver's, or the sender's smtp client would see its
        # own name in the receiver's greeting and refuse to deliver ("loops back to myself").
        self.sender = Postfix(self.mktemp(), extra_main_cf={
            "relayhost": f"[127.0.0.1]:{self.receiver.smtp_port}", "smtpd_milters": "",
            "myhostname": "sender.harness.test"})
        self.addCleanup(self.sender.stop)
        self.sender.start()

    def logs(self):
        return (super().logs()
                + f"\n--- sender's maillog ---\n{self.sender.maillog()[-4000:]}")

    def test_recipient_with_another_policy_is_deferred_to_a_second_transaction(self):
        """x, y and z: x and z (a.example) go first; y (b.example) gets 452 4.5.3 and arrives
        alone in a second transaction, each transaction filtered by its own policy."""
        recipients = ["x@a.example", "y@b.example", "z@a.example"]
        result = self.sender.send(SENDER, recipients, MESSAGE)
        self.assertTrue(result.accepted, f"{result}{self.logs()}")
        started = time.monotonic()
        [first] = self.receiver.wait_delivered(1)
        self.assert_transaction(first, ["x@a.example", "z@a.example"], ["two", "three"])
        log = self.sender.wait_maillog("452 4.5.3")
        deferred = [line for line in log.splitlines()
                    if "to=<y@b.example>" in line and "status=deferred" in line]
        self.assertEqual(len(deferred), 1, self.logs())
        self.assertIn("452 4.5.3 Too many recipients", deferred[0])
        self.assertIn("in reply to RCPT TO command", deferred[0])
        flushed = subprocess.run(["postqueue", "-c", self.sender.conf_dir, "-f"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, timeout=30, check=False)
        self.assertEqual(flushed.returncode, 0, flushed.stdout)
        dumps = self.receiver.wait_delivered(2)
        print(f"second transaction {time.monotonic() - started:.1f} s after the first was sent "
              f"(with postqueue -f)")
        self.assertEqual(len(dumps), 2, self.logs())
        self.assertEqual(dumps[0], first)
        self.assert_transaction(dumps[1], ["y@b.example"], ["one", "three"])
        first_id, second_id = headers_of(dumps[0])[0][1], headers_of(dumps[1])[0][1]
        self.assertNotEqual(first_id, second_id)
        # Once the sender removes the message, every recipient's final status is logged.
        self.sender.wait_maillog(f"{result.queue_id}: removed")
        delivered = [line for line in self.sender.maillog().splitlines() if "status=sent" in line]
        self.assertEqual(sorted(re.search(r"to=<([^>]+)>", line).group(1) for line in delivered),
                         sorted(recipients), self.logs())
        self.assertIn("[ldap][split] y@b.example", self.manager.log())
