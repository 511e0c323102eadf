"""The LDAP Policy condition in sessions: who hears which recipient, evaluation, refusals, splits.

The scenarios run on tests.test_session's harness (an MTA, the manager and
scripted children on loopback) with the shipped condition file and a
directory in memory (miltermanager.testing.MemoryPolicySource).
"""

import os
import tempfile

from twisted.internet import defer

from miltermanager import config
from miltermanager.protocol.messages import (
    ACCEPT, CONTINUE, DATA, REJECT, Rcpt, ReplyCode,
)
from miltermanager.testing import MemoryPolicySource
from tests.test_session import (
    BODY, CONNECT, EOH, EOM, HELO, MAIL, SUBJECT, Kid, Scenario, ScenarioTestCase,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONDITION_FILE = os.path.join(ROOT, "etc", "applicable-conditions", "ldap-policy.conf")
BASE = "ou=milter-policy,dc=example,dc=com"
ALICE = Rcpt(b"<alice@example.org>")  # example.org bypasses grey
BOB = Rcpt(b"<bob@example.net>")  # example.net: no entry
CAROL = Rcpt(b"<carol@example.org>")
DAVE = Rcpt(b"<dave@eval.example>")  # eval.example: spam only evaluates
SPLIT_REPLY = ReplyCode(b"452 4.5.3 Too many recipients")
UNAVAILABLE_REPLY = ReplyCode(b"451 4.4.3 Recipient policy directory unavailable, try again later")


def shipped_condition():
    """The LDAP Policy ConditionConfig as the shipped file defines it."""
    directory = tempfile.mkdtemp()
    path = os.path.join(directory, "milter-manager.conf")
    with open(path, "w") as file:
        file.write(f"load({CONDITION_FILE!r})\n")
    return config.load(path, strict=False).conditions["LDAP Policy"]


def directory():
    """Entries: example.org bypasses grey, eval.example makes spam evaluate only."""
    source = MemoryPolicySource()
    source.add(f"cn=example.org,{BASE}", {
        "objectClass": ["organizationalRole", "milterManagerPolicy"], "cn": "example.org",
        "mail": "@example.org", "milterManagerBypass": ["grey"]})
    source.add(f"cn=eval.example,{BASE}", {
        "objectClass": ["organizationalRole", "milterManagerPolicy"], "cn": "eval.example",
        "mail": "@eval.example", "milterManagerEvaluate": ["spam"]})
    return source


class Paused:
    """An IPolicySource whose answers wait until release(): the children are asked meanwhile."""

    def __init__(self, source):
        self.source = source
        self.waiting = []

    def search(self, base, filter, attributes):
        d = defer.Deferred()
        self.waiting.append((d, self.source.search(base, filter, attributes)))
        return d

    def release(self):
        waiting, self.waiting = self.waiting, []
        for d, result in waiting:
            result.chainDeferred(d)

    def stop(self):
        pass


class PolicyScenarioTestCase(ScenarioTestCase):
    """run_policy: a Scenario whose children grey and spam list LDAP Policy, plain does not."""

    def run_policy(self, scenario, source=None, **ldap):
        """source: an IPolicySource (default: directory()); "ldap3" searches ldap.uris."""
        scenario.steps = [step if isinstance(step, tuple) else (step, CONTINUE)
                          for step in scenario.steps]
        if source is None:
            source = directory()
        elif source == "ldap3":
            source = None
        self.source = source

        def configure(configuration):
            configuration.conditions = {"LDAP Policy": shipped_condition()}
            for milter in configuration.milters:
                if milter.name != "plain":
                    milter.applicable_conditions = ["LDAP Policy"]
            settings = configuration.ldap
            settings.uris = ["ldap://127.0.0.1:1"]
            settings.base = BASE
            for name, value in ldap.items():
                setattr(settings, name, value)
            settings.start(configuration, self.clock_for_lookups, source=self.source)
            self.addCleanup(settings.stop)

        from twisted.internet import reactor
        self.clock_for_lookups = reactor
        self.configure = configure
        return self.run_scenario(scenario)


KIDS = [Kid("grey"), Kid("spam"), Kid("plain")]
MESSAGE = [DATA, SUBJECT, EOH, BODY, EOM]


class RecipientTests(PolicyScenarioTestCase):
    """At RCPT: a bypassed child misses the recipient; the others hear it."""

    def test_bypassed_domain(self):
        """alice@example.org bypasses grey: grey never hears her and is aborted at DATA."""
        return self.run_policy(Scenario(
            children=KIDS,
            steps=[CONNECT, HELO, MAIL, ALICE, *MESSAGE],
            seen={"grey": "connect helo mail abort close",
                  "spam": "connect helo mail rcpt data header eoh body eom close",
                  "plain": "connect helo mail rcpt data header eoh body eom close"},
        ))

    def test_runs_if_any_recipient_applies(self):
        """alice bypasses grey, bob has no entry: grey runs for the message with bob only."""
        return self.run_policy(Scenario(
            children=KIDS,
            steps=[CONNECT, HELO, MAIL, ALICE, BOB, *MESSAGE],
            seen={"grey": "connect helo mail rcpt data header eoh body eom close",
                  "spam": "connect helo mail rcpt rcpt data header eoh body eom close"},
        ))

    def test_lookup_runs_while_others_are_asked(self):
        """While the lookup is pending, plain has the RCPT already; grey waits for the policy."""
        paused = Paused(directory())
        seen_before = []

        def rcpt(command, macros):
            seen_before.append(bool(paused.waiting))
            paused.release()
            return CONTINUE

        return self.run_policy(Scenario(
            children=[Kid("grey"), Kid("plain", replies={"rcpt": rcpt})],
            steps=[CONNECT, HELO, MAIL, BOB],
            seen={"grey": "connect helo mail rcpt abort close"},
        ), source=paused).addCallback(lambda _: self.assertEqual(seen_before, [True]))


class EvaluationTests(PolicyScenarioTestCase):
    """milterManagerEvaluate: the child runs, its verdict and changes are only logged."""

    def test_evaluated_reject_not_applied(self):
        """spam rejects dave's message at end of message: eval.example only evaluates it."""
        logged = self.logged()
        return self.run_policy(Scenario(
            children=[Kid("spam", replies={"end_of_message": REJECT})],
            steps=[CONNECT, HELO, MAIL, DAVE, *MESSAGE[:-1], (EOM, ACCEPT)],
        )).addCallback(lambda _: self.assertTrue(
            [line for line in logged if "[children][evaluation]" in line and "spam" in line]))

    def test_evaluated_only_when_every_recipient_says(self):
        """dave evaluates spam, bob does not: spam's reject at end of message stands."""
        return self.run_policy(Scenario(
            children=[Kid("spam", replies={"end_of_message": REJECT})],
            steps=[CONNECT, HELO, MAIL, DAVE, BOB, *MESSAGE[:-1], (EOM, REJECT)],
        ))

    def test_evaluated_recipient_reject_not_applied(self):
        """spam rejects dave at RCPT: his policy evaluates spam, so only spam loses him."""
        return self.run_policy(Scenario(
            children=[Kid("spam", replies={"rcpt": REJECT}), Kid("plain")],
            steps=[CONNECT, HELO, MAIL, DAVE, *MESSAGE],
            seen={"spam": "connect helo mail rcpt abort close"},
        ))

    def test_evaluation_ends_with_the_transaction(self):
        """After dave's message, bob's next message gets spam's reject applied again."""
        return self.run_policy(Scenario(
            children=[Kid("spam", replies={"end_of_message": REJECT})],
            steps=[CONNECT, HELO, MAIL, DAVE, *MESSAGE[:-1], (EOM, ACCEPT),
                   MAIL, BOB, *MESSAGE[:-1], (EOM, REJECT)],
        ))


class RefusalTests(PolicyScenarioTestCase):
    """The manager's own answers: directory unavailable, and split_recipients."""

    def test_unavailable_is_temporary_failure(self):
        """With the directory down, the RCPT gets 451 4.4.3 and no governed child hears it."""
        source = directory()
        source.failing = "connection refused"
        logged = self.logged_at()
        d = self.run_policy(Scenario(
            children=KIDS,
            steps=[CONNECT, HELO, MAIL, (ALICE, UNAVAILABLE_REPLY), (BOB, UNAVAILABLE_REPLY)],
            seen={"grey": "connect helo mail abort close", "spam": "connect helo mail abort close",
                  "plain": "connect helo mail abort close"},
        ), source=source)

        def one_line(_):
            errors = [text for level, text in logged if "[ldap][error]" in text]
            self.assertEqual(len(errors), 1, errors)
            self.assertIn("connection refused", errors[0])
            self.assertIn("temporary failure", errors[0])
        return d.addCallback(one_line)

    def test_default_policy_on_error(self):
        """on_error default-policy: the defaults (bypass grey) serve while the directory is down."""
        source = directory()
        source.failing = "connection refused"
        return self.run_policy(Scenario(
            children=KIDS,
            steps=[CONNECT, HELO, MAIL, BOB, *MESSAGE],
            seen={"grey": "connect helo mail abort close"},
        ), source=source, on_error="default-policy", default_bypass=["grey"])

    def test_split_defers_differing_recipient(self):
        """split_recipients: bob's policy differs from alice's: 452 4.5.3; carol's is alice's."""
        return self.run_policy(Scenario(
            children=KIDS,
            steps=[CONNECT, HELO, MAIL, ALICE, (BOB, SPLIT_REPLY), CAROL, *MESSAGE],
            seen={"grey": "connect helo mail abort close",
                  "spam": "connect helo mail rcpt rcpt data header eoh body eom close",
                  "plain": "connect helo mail rcpt rcpt data header eoh body eom close"},
        ), split_recipients=True)

    def test_split_first_is_first_accepted(self):
        """A recipient a child rejects is not the first accepted: the next one sets the policy."""
        def reject_alice(command, macros):
            return REJECT if command.recipient == ALICE.recipient else CONTINUE

        return self.run_policy(Scenario(
            children=[Kid("grey"), Kid("spam", replies={"rcpt": reject_alice})],
            steps=[CONNECT, HELO, MAIL, (ALICE, REJECT), BOB, (CAROL, SPLIT_REPLY)],
        ), split_recipients=True)

    def test_split_starts_again_each_transaction(self):
        """The next MAIL has no first recipient yet: bob is accepted there."""
        return self.run_policy(Scenario(
            children=[Kid("grey"), Kid("spam")],
            steps=[CONNECT, HELO, MAIL, ALICE, (BOB, SPLIT_REPLY), *MESSAGE, MAIL, BOB],
        ), split_recipients=True)

    def test_split_compares_governed_children_only(self):
        """Policies differing only for a milter that is not configured count as the same."""
        return self.run_policy(Scenario(
            children=[Kid("spam")],
            steps=[CONNECT, HELO, MAIL, ALICE, BOB],
        ), split_recipients=True)
