"""Recipient policies from a real slapd: the lookup, failover, outages, stalls, TLS, binds, caching.

Each test starts a private slapd (tests.peers.slapd) with milter-manager's and
amavisd-new's schemas and searches it through the production path:
LDAPConfig.start() makes an LDAPSource (ldap3 in its thread pool) behind a
PolicyLookup.
"""

import os
import time

from twisted.internet import defer, protocol, reactor, task
from twisted.logger import globalLogPublisher, formatEvent
from twisted.trial import unittest

from miltermanager.config.model import Configuration, MilterConfig
from miltermanager.policy.lookup import Unavailable
from miltermanager.policy.rules import State
from tests.peers.fixtures import free_port
from tests.peers.slapd import IREDMAIL_LDIF, IREDMAIL_SCHEMA, Slapd
from tests.test_policy_session import ALICE, UNAVAILABLE_REPLY, PolicyScenarioTestCase
from tests.test_session import CONNECT, HELO, MAIL, Kid, Scenario

BASE = "ou=milter-policy,dc=example,dc=com"
POLICY = """\
dn: ou=milter-policy,dc=example,dc=com
objectClass: organizationalUnit
ou: milter-policy

dn: cn=global,ou=milter-policy,dc=example,dc=com
objectClass: organizationalRole
objectClass: milterManagerPolicy
cn: global
mail: @.
milterManagerEvaluate: dmarc

dn: cn=a.example,ou=milter-policy,dc=example,dc=com
objectClass: organizationalRole
objectClass: milterManagerPolicy
cn: a.example
mail: @a.example
milterManagerBypass: grey

dn: cn=b.example,ou=milter-policy,dc=example,dc=com
objectClass: organizationalRole
objectClass: milterManagerPolicy
cn: b.example
mail: @b.example
milterManagerBypass: spam
milterManagerBypass: virus

dn: cn=vip@a.example,ou=milter-policy,dc=example,dc=com
objectClass: organizationalRole
objectClass: milterManagerPolicy
cn: vip@a.example
mail: vip@a.example
milterManagerApply: grey

dn: cn=.parent.example,ou=milter-policy,dc=example,dc=com
objectClass: organizationalRole
objectClass: milterManagerPolicy
cn: .parent.example
mail: @.parent.example
milterManagerBypass: dmarc

dn: cn=amavis.example,ou=milter-policy,dc=example,dc=com
objectClass: organizationalRole
objectClass: milterManagerPolicy
objectClass: amavisAccount
cn: amavis.example
mail: @amavis.example
amavisBypassVirusChecks: TRUE
amavisSpamLover: TRUE

dn: cn=careful@amavis.example,ou=milter-policy,dc=example,dc=com
objectClass: organizationalRole
objectClass: milterManagerPolicy
objectClass: amavisAccount
cn: careful@amavis.example
mail: careful@amavis.example
amavisBypassVirusChecks: FALSE
"""
MILTERS = ("grey", "spam", "virus", "dmarc")


def configuration(uris, **settings):
    """A Configuration whose four children list LDAP Policy, with ldap.* set."""
    result = Configuration(milters=[
        MilterConfig(name, f"inet:{port}@[127.0.0.1]", applicable_conditions=["LDAP Policy"])
        for port, name in enumerate(MILTERS, 20000)])
    ldap = result.ldap
    ldap.uris = list(uris)
    ldap.base = BASE
    ldap.spam_milters = ["spam"]
    ldap.virus_milters = ["virus"]
    for name, value in settings.items():
        setattr(ldap, name, value)
    return result


def states(policy):
    """{child: state value} for the four children (what the policy says of each)."""
    return {name: policy.state(name).value for name in MILTERS}


class Lines:
    """The formatted log lines from now on that contain one of the tags."""

    def __init__(self, test, *tags):
        self.lines = []
        self.tags = tags
        globalLogPublisher.addObserver(self._observe)
        test.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event):
        text = formatEvent(event)
        if any(tag in text for tag in self.tags):
            self.lines.append(text)


class SlapdTestCase(unittest.TestCase):
    """A slapd per test with POLICY loaded; lookups(...) starts the production lookups."""

    timeout = 60
    ldif = (POLICY,)
    schemas = ()
    tls = False

    def setUp(self):
        self.slapd = Slapd(self.mktemp(), ldif=list(self.ldif), schemas=list(self.schemas),
                           tls=self.tls)
        self.addCleanup(self.slapd.stop)
        self.slapd.start()

    def lookups(self, uris=None, clock=None, **settings):
        """The started PolicyLookup of a configuration on uris (default: this slapd)."""
        config = configuration(uris if uris is not None else [self.slapd.uri], **settings)
        config.ldap.start(config, reactor)
        self.addCleanup(config.ldap.stop)
        lookups = config.ldap.lookups
        if clock is not None:
            lookups.clock = lookups.cache._clock = clock
        return lookups

    def lookup(self, lookups, address):
        return defer.maybeDeferred(lookups.lookup, address)


class DirectoryTests(SlapdTestCase):
    """What a recipient's entries say, as slapd returns them."""

    @defer.inlineCallbacks
    def test_domains_differ(self):
        """@a.example bypasses grey, @b.example spam and virus; both keep the global evaluate."""
        lookups = self.lookups()
        a = yield self.lookup(lookups, "<x@a.example>")
        b = yield self.lookup(lookups, "<y@b.example>")
        self.assertEqual(states(a), {"grey": "bypass", "spam": "apply", "virus": "apply",
                                     "dmarc": "evaluate"})
        self.assertEqual(states(b), {"grey": "apply", "spam": "bypass", "virus": "bypass",
                                     "dmarc": "evaluate"})
        self.assertEqual(a.entries, (f"cn=a.example,{BASE}", f"cn=global,{BASE}"))

    @defer.inlineCallbacks
    def test_user_overrides_domain(self):
        """vip@a.example applies grey, which its domain bypasses; +ext and case find it too."""
        lookups = self.lookups()
        for address in ("<vip@a.example>", "<VIP+lists@A.Example>"):
            policy = yield self.lookup(lookups, address)
            self.assertEqual(policy.state("grey"), State.RUN, address)
            self.assertEqual(policy.entries[0], f"cn=vip@a.example,{BASE}")

    @defer.inlineCallbacks
    def test_parent_domain(self):
        """@.parent.example covers deep.sub.parent.example and parent.example itself."""
        lookups = self.lookups()
        for address in ("<u@deep.sub.parent.example>", "<u@parent.example>"):
            policy = yield self.lookup(lookups, address)
            self.assertEqual(policy.state("dmarc"), State.BYPASS, address)
        other = yield self.lookup(lookups, "<u@otherparent.example>")
        self.assertEqual(other.state("dmarc"), State.EVALUATE)

    @defer.inlineCallbacks
    def test_amavis_attributes(self):
        """amavisBypassVirusChecks bypasses virus, amavisSpamLover makes spam evaluate; a user's
        FALSE hides its domain's TRUE."""
        lookups = self.lookups()
        domain = yield self.lookup(lookups, "<x@amavis.example>")
        careful = yield self.lookup(lookups, "<careful@amavis.example>")
        self.assertEqual(states(domain), {"grey": "apply", "spam": "evaluate", "virus": "bypass",
                                          "dmarc": "evaluate"})
        self.assertEqual(states(careful), {"grey": "apply", "spam": "evaluate", "virus": "apply",
                                           "dmarc": "evaluate"})

    @defer.inlineCallbacks
    def test_no_entry_is_the_defaults(self):
        """Without any entry (no @. either under another base), the configured defaults apply."""
        lookups = self.lookups(base="ou=milter-policy,dc=example,dc=com",
                               filter="(&(objectClass=milterManagerPolicy)(mail=%m)(!(mail=@.)))",
                               default_bypass=["spam"])
        policy = yield self.lookup(lookups, "<x@nowhere.example>")
        self.assertEqual(policy.entries, ())
        self.assertEqual(states(policy), {"grey": "apply", "spam": "bypass", "virus": "apply",
                                          "dmarc": "apply"})

    @defer.inlineCallbacks
    def test_injection_matches_nothing(self):
        """Filter metacharacters, NUL and a filter fragment in addresses find only what the
        domain's own keys find, and raise nothing."""
        lookups = self.lookups()
        for local in ("*", "(", ")", "\\", "a\0b", "*)(mail=*", "*)(|(mail=*"):
            policy = yield self.lookup(lookups, f"<{local}@nowhere.example>")
            self.assertEqual(policy.entries, (f"cn=global,{BASE}",), repr(local))
            policy = yield self.lookup(lookups, f"<x@{local}.example>")
            self.assertNotIsInstance(policy, Unavailable)
            self.assertEqual(policy.entries, (f"cn=global,{BASE}",), repr(local))
        wildcard = yield self.lookup(lookups, "<*@a.example>")
        self.assertNotIn(f"cn=vip@a.example,{BASE}", wildcard.entries)


class IRedMailTests(SlapdTestCase):
    """An iRedMail-style directory through ldap.filter with %d."""

    ldif = (open(IREDMAIL_LDIF, encoding="utf-8").read(),)
    schemas = (IREDMAIL_SCHEMA,)
    FILTER = ("(&(objectClass=milterManagerPolicy)(!(accountStatus=disabled))"
              "(|(mail=%m)(shadowAddress=%m)(domainName=%d)(domainAliasName=%d)))")

    @defer.inlineCallbacks
    def test_layout(self):
        """Users by mail or shadowAddress rank above their domain, found by name or alias;
        a disabled user is skipped."""
        lookups = self.lookups(base="o=domains,dc=example,dc=com", filter=self.FILTER)
        bob = yield self.lookup(lookups, "<robert@example.net>")
        self.assertEqual(bob.state("greylist"), State.RUN)  # his Apply beats the domain's Bypass
        self.assertEqual(bob.state("spamass-milter"), State.BYPASS)  # the domain's, inherited
        self.assertEqual(bob.state("spam"), State.EVALUATE)  # amavisSpamLover
        self.assertEqual(bob.entries[0],
                         "mail=bob@example.net,ou=Users,domainName=example.net,o=domains,"
                         "dc=example,dc=com")
        domain = "domainName=example.net,o=domains,dc=example,dc=com"
        alias = yield self.lookup(lookups, "<someone@example.info>")
        self.assertEqual(alias.entries[0], domain)
        carol = yield self.lookup(lookups, "<carol@example.net>")
        self.assertEqual(carol.entries[0], domain)
        self.assertEqual(carol.state("greylist"), State.BYPASS)


def dead_uri():
    """An ldap:// URI on loopback where nothing listens (connecting is refused)."""
    return f"ldap://127.0.0.1:{free_port()}"


class FailoverTests(SlapdTestCase):
    """ldap.uris in order: a dead server is passed over, every server dead is on_error."""

    @defer.inlineCallbacks
    def test_dead_first_uri(self):
        """A refused first URI: the lookup is answered by the second, and nothing is logged
        as an outage."""
        errors = Lines(self, "[ldap][error]")
        lookups = self.lookups([dead_uri(), self.slapd.uri])
        policy = yield self.lookup(lookups, "<x@a.example>")
        self.assertEqual(policy.state("grey"), State.BYPASS)
        self.assertEqual(errors.lines, [])

    @defer.inlineCallbacks
    def test_all_dead(self):
        """Every URI refused: a temporary failure (the default on_error), one log line."""
        errors = Lines(self, "[ldap][error]")
        lookups = self.lookups([dead_uri(), dead_uri()])
        first = yield self.lookup(lookups, "<x@a.example>")
        second = yield self.lookup(lookups, "<y@b.example>")
        self.assertIsInstance(first, Unavailable)
        self.assertIsInstance(second, Unavailable)
        self.assertEqual(len(errors.lines), 1, errors.lines)
        self.assertIn("recipients get a temporary failure", errors.lines[0])


class OutageTests(SlapdTestCase):
    """slapd stopped while the manager runs, then started again: no reload needed."""

    @defer.inlineCallbacks
    def test_stop_and_restart(self):
        """Stopped: on_error, one error line for several lookups; restarted: answers again
        on the same lookups, with one recovery line."""
        lines = Lines(self, "[ldap][error]", "[ldap][recovered]")
        lookups = self.lookups(cache_ttl=0, negative_cache_ttl=0)
        before = yield self.lookup(lookups, "<x@a.example>")
        self.assertEqual(before.state("grey"), State.BYPASS)
        self.slapd.stop()
        for address in ("<x@a.example>", "<y@b.example>", "<z@a.example>"):
            during = yield self.lookup(lookups, address)
            self.assertIsInstance(during, Unavailable)
        self.assertEqual(len(lines.lines), 1, lines.lines)
        self.slapd.start()
        after = yield self.lookup(lookups, "<x@a.example>")
        self.assertEqual(after.state("grey"), State.BYPASS)
        self.assertEqual(len(lines.lines), 2, lines.lines)
        self.assertIn("[ldap][recovered]", lines.lines[1])
        self.assertIn("3 lookups failed", lines.lines[1])

    @defer.inlineCallbacks
    def test_stale_while_down(self):
        """on_error "stale 600": an expired policy is served while slapd is down, marked stale."""
        clock = task.Clock()
        lookups = self.lookups(clock=clock, on_error="stale 600", cache_ttl=10,
                               negative_cache_ttl=5)
        yield self.lookup(lookups, "<x@a.example>")
        self.slapd.stop()
        clock.advance(20)
        stale = yield self.lookup(lookups, "<x@a.example>")
        self.assertTrue(stale.stale)
        self.assertEqual(stale.state("grey"), State.BYPASS)
        clock.advance(600)
        gone = yield self.lookup(lookups, "<x@a.example>")
        self.assertIsInstance(gone, Unavailable)


class CacheTests(SlapdTestCase):
    """The TTL cache on a fake clock, in front of the real directory."""

    @defer.inlineCallbacks
    def test_hit_and_expiry(self):
        """Within cache_ttl the answer comes at once without a search; after it, a search
        again; an address without entries expires after negative_cache_ttl."""
        clock = task.Clock()
        lookups = self.lookups(clock=clock, cache_ttl=300, negative_cache_ttl=60,
                               filter="(&(objectClass=milterManagerPolicy)(mail=%m)(!(mail=@.)))")
        searches = []
        search = lookups.source.search
        lookups.source.search = lambda *args: searches.append(args[1]) or search(*args)
        yield self.lookup(lookups, "<x@a.example>")
        yield self.lookup(lookups, "<x@none.example>")
        self.assertEqual(len(searches), 2)
        hit = lookups.lookup("<x@a.example>")
        self.assertEqual(hit.state("grey"), State.BYPASS)  # a value, not a Deferred
        clock.advance(61)
        lookups.lookup("<x@a.example>")
        yield self.lookup(lookups, "<x@none.example>")
        self.assertEqual(len(searches), 3)
        clock.advance(240)
        yield self.lookup(lookups, "<x@a.example>")
        self.assertEqual(len(searches), 4)


class Silent(protocol.Protocol):
    """Accepts and reads, never answers: a directory server that stalls."""


class StallTests(unittest.TestCase):
    """A server that accepts and never answers: the lookup ends at ldap.timeout."""

    timeout = 30

    def setUp(self):
        factory = protocol.Factory.forProtocol(Silent)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    @defer.inlineCallbacks
    def test_timeout(self):
        """ldap.timeout 1: Unavailable after about a second, logged as no answer; the reactor
        stays free meanwhile."""
        errors = Lines(self, "[ldap][error]")
        config = configuration([f"ldap://127.0.0.1:{self.port.getHost().port}"], timeout=1.0)
        config.ldap.start(config, reactor)
        self.addCleanup(config.ldap.stop)
        ticks = []
        ticking = task.LoopingCall(ticks.append, None)
        ticking.start(0.1)
        started = time.monotonic()
        result = yield defer.maybeDeferred(config.ldap.lookups.lookup, "<x@a.example>")
        elapsed = time.monotonic() - started
        ticking.stop()
        self.assertIsInstance(result, Unavailable)
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertLess(elapsed, 3.0)
        self.assertGreaterEqual(len(ticks), 8)  # the reactor ran all along
        self.assertIn("no answer in 1 s", errors.lines[0])


class TLSTests(SlapdTestCase):
    """ldaps:// and StartTLS with the CA checked; a server the CA does not vouch for fails."""

    tls = True

    @defer.inlineCallbacks
    def test_ldaps(self):
        """ldaps:// with ldap.tls_ca_file finds the policy."""
        lookups = self.lookups([self.slapd.ldaps_uri], tls_ca_file=self.slapd.ca_file)
        policy = yield self.lookup(lookups, "<x@a.example>")
        self.assertEqual(policy.state("grey"), State.BYPASS)

    @defer.inlineCallbacks
    def test_start_tls(self):
        """ldap:// with start_tls and the CA finds the policy."""
        lookups = self.lookups([self.slapd.uri], tls_ca_file=self.slapd.ca_file, start_tls=True)
        policy = yield self.lookup(lookups, "<x@a.example>")
        self.assertEqual(policy.state("grey"), State.BYPASS)

    @defer.inlineCallbacks
    def test_untrusted(self):
        """Without our CA (the system's CAs only), the certificate is refused: on_error."""
        errors = Lines(self, "[ldap][error]")
        lookups = self.lookups([self.slapd.ldaps_uri])
        policy = yield self.lookup(lookups, "<x@a.example>")
        self.assertIsInstance(policy, Unavailable)
        self.assertEqual(len(errors.lines), 1)


class BindTests(SlapdTestCase):
    """A bind DN with its password read from ldap.bind_password_file."""

    def password_file(self, text):
        path = self.mktemp()
        with open(path, "w") as file:
            file.write(text + "\n")
        os.chmod(path, 0o600)
        return path

    @defer.inlineCallbacks
    def test_bind(self):
        """The reader DN with the right password finds the policy."""
        lookups = self.lookups(bind_dn=self.slapd.reader_dn,
                               bind_password_file=self.password_file(self.slapd.reader_password))
        policy = yield self.lookup(lookups, "<x@a.example>")
        self.assertEqual(policy.state("grey"), State.BYPASS)

    @defer.inlineCallbacks
    def test_wrong_password(self):
        """A wrong password: on_error, and the log names the failure without the password."""
        errors = Lines(self, "[ldap][error]")
        lookups = self.lookups(bind_dn=self.slapd.reader_dn,
                               bind_password_file=self.password_file("Wr0ng-s3cret"))
        policy = yield self.lookup(lookups, "<x@a.example>")
        self.assertIsInstance(policy, Unavailable)
        self.assertEqual(len(errors.lines), 1)
        self.assertIn("invalidCredentials", errors.lines[0])
        self.assertNotIn("Wr0ng-s3cret", errors.lines[0])


class StalledMTATests(PolicyScenarioTestCase):
    """A stalling directory never stalls the MTA: the RCPT is answered at ldap.timeout."""

    def setUp(self):
        factory = protocol.Factory.forProtocol(Silent)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    @defer.inlineCallbacks
    def test_rcpt_answered(self):
        """With the directory silent, the RCPT gets 451 4.4.3 after about ldap.timeout; the
        child not listing the condition heard it, the governed one did not."""
        started = time.monotonic()
        yield self.run_policy(Scenario(
            children=[Kid("grey"), Kid("plain")],
            steps=[CONNECT, HELO, MAIL, (ALICE, UNAVAILABLE_REPLY)],
            seen={"grey": "connect helo mail abort close",
                  "plain": "connect helo mail rcpt abort close"},
        ), source="ldap3", uris=[f"ldap://127.0.0.1:{self.port.getHost().port}"], timeout=1.0)
        self.assertLess(time.monotonic() - started, 4.0)


class ReloadTests(SlapdTestCase):
    """A reload starts with an empty cache and keeps the connections of unchanged settings."""

    @defer.inlineCallbacks
    def test_reload_flushes_cache(self):
        """A directory change shows after a reload, not before (the old cache is not shared);
        the new configuration searches through the same source."""
        old = configuration([self.slapd.uri])
        old.ldap.start(old, reactor)
        self.addCleanup(old.ldap.stop)
        before = yield defer.maybeDeferred(old.ldap.lookups.lookup, "<x@a.example>")
        self.assertEqual(before.state("grey"), State.BYPASS)
        self.slapd.modify("dn: cn=a.example,ou=milter-policy,dc=example,dc=com\n"
                          "changetype: modify\nreplace: milterManagerBypass\n"
                          "milterManagerBypass: spam\n")
        cached = old.ldap.lookups.lookup("<x@a.example>")
        self.assertEqual(cached.state("grey"), State.BYPASS)
        new = configuration([self.slapd.uri])
        new.ldap.start(new, reactor, previous=old.ldap)
        self.addCleanup(new.ldap.stop)
        self.assertIs(new.ldap.lookups.source, old.ldap.lookups.source)
        after = yield defer.maybeDeferred(new.ldap.lookups.lookup, "<x@a.example>")
        self.assertEqual(after.state("grey"), State.RUN)
        self.assertEqual(after.state("spam"), State.BYPASS)
