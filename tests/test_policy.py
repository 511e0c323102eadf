"""Units of the LDAP Policy condition: keys, queries, rules, the cache, lookups, the gate, sources.

Everything but the LDAPSource tests runs on a task.Clock with sources in
memory: miltermanager.testing.MemoryPolicySource (ldap3's mock server
evaluates the filters) or Controlled, whose Deferreds the test fires.
"""

import socket
import threading
import time

from ldap3.operation.search import AND, MATCH_EQUAL, OR, ROOT, parse_filter
from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from miltermanager.config.ldap import LDAPConfig
from miltermanager.merge import Status
from miltermanager.policy.cache import PolicyCache
from miltermanager.policy.gate import Decision, PolicyGate
from miltermanager.policy.keys import parse
from miltermanager.policy.lookup import OnError, PolicyLookup, Unavailable
from miltermanager.policy.query import Query, QueryError, escape_value
from miltermanager.policy.rules import (
    Attributes,
    Defaults,
    Entry,
    RecipientPolicy,
    State,
    default_policy,
    resolve,
)
from miltermanager.policy.source import IPolicySource, LDAPSource, SourceError
from miltermanager.testing import MemoryPolicySource

BASE = "ou=milter-policy,dc=example,dc=com"
DEFAULT_FILTER = "(&(objectClass=milterManagerPolicy)(mail=%m))"
URI = "ldap://ldap1.example.com"
RUN, EVALUATE, BYPASS = State.RUN, State.EVALUATE, State.BYPASS


# ---------------------------------------------------------------- keys


class KeysTests(unittest.SynchronousTestCase):
    def test_lower_cased(self):
        """Local part and domain are lower-cased in the text and every key."""
        address = parse("Alice@Example.ORG")
        self.assertEqual(address.text, "alice@example.org")
        self.assertEqual(address.keys, ("alice@example.org", "@example.org", "@.example.org",
                                        "@.org", "@."))

    def test_idna(self):
        """A non-ASCII domain becomes its IDNA A-label form."""
        address = parse("user@Bücher.example")
        self.assertEqual(address.domain, "xn--bcher-kva.example")
        self.assertEqual(address.keys[0], "user@xn--bcher-kva.example")
        self.assertEqual(address.keys[1], "@xn--bcher-kva.example")

    def test_trailing_dot(self):
        """A fully qualified domain's trailing dot is stripped."""
        address = parse("user@example.org.")
        self.assertEqual(address.domain, "example.org")
        self.assertEqual(address.keys, ("user@example.org", "@example.org", "@.example.org",
                                        "@.org", "@."))

    def test_extension(self):
        """user+ext@d is looked up as user+ext@d, then user@d, then the domain keys."""
        address = parse("user+ext@example.org")
        self.assertEqual(address.local, "user+ext")
        self.assertEqual(address.mailbox, "user")
        self.assertEqual(address.keys, ("user+ext@example.org", "user@example.org",
                                        "@example.org", "@.example.org", "@.org", "@."))

    def test_extension_split_once(self):
        """Only the first delimiter splits: a+b+c has the mailbox a."""
        self.assertEqual(parse("a+b+c@example.org").keys[:2],
                         ("a+b+c@example.org", "a@example.org"))

    def test_no_delimiter(self):
        """Delimiter "" (or None): a + is part of the mailbox, no key without it."""
        for delimiter in ("", None):
            address = parse("user+ext@example.org", delimiter)
            self.assertEqual(address.mailbox, "user+ext")
            self.assertEqual(address.keys, ("user+ext@example.org", "@example.org",
                                            "@.example.org", "@.org", "@."))

    def test_several_delimiters(self):
        """Delimiter "+-" (Postfix's recipient_delimiter): either character starts the extension."""
        self.assertEqual(parse("user-ext@example.org", "+-").keys,
                         ("user-ext@example.org", "user@example.org", "@example.org",
                          "@.example.org", "@.org", "@."))
        self.assertEqual(parse("user+ext@example.org", "+-").mailbox, "user")
        self.assertEqual(parse("user+a-b@example.org", "+-").mailbox, "user")
        self.assertEqual(parse("user-a+b@example.org", "+-").mailbox, "user")

    def test_other_delimiter(self):
        """Delimiter "-": user-ext is split, user+ext is not."""
        self.assertEqual(parse("user-ext@example.org", "-").mailbox, "user")
        self.assertEqual(parse("user+ext@example.org", "-").mailbox, "user+ext")

    def test_leading_delimiter(self):
        """A local part starting with the delimiter (+a) is not split: no empty mailbox."""
        address = parse("+a@x.org")
        self.assertEqual(address.mailbox, "+a")
        self.assertEqual(address.keys, ("+a@x.org", "@x.org", "@.x.org", "@.org", "@."))

    def test_parent_chain(self):
        """Every parent domain gets an @.parent key, down to @. (every recipient)."""
        self.assertEqual(parse("user@a.b.example.com").keys, (
            "user@a.b.example.com", "@a.b.example.com", "@.a.b.example.com",
            "@.b.example.com", "@.example.com", "@.com", "@."))

    def test_null_address(self):
        """The null address <> has the keys <> and @., and no domain."""
        for text in ("<>", "< >", ""):
            address = parse(text)
            self.assertEqual(address.text, "<>")
            self.assertIsNone(address.domain)
            self.assertEqual(address.keys, ("<>", "@."))

    def test_no_domain(self):
        """An address without a domain: its local part (and mailbox), then @."""
        address = parse("Postmaster")
        self.assertIsNone(address.domain)
        self.assertEqual(address.text, "postmaster")
        self.assertEqual(address.keys, ("postmaster", "@."))
        self.assertEqual(parse("user+ext").keys, ("user+ext", "user", "@."))

    def test_angle_brackets_optional(self):
        """<user@d> and user@d are the same address."""
        self.assertEqual(parse("<User@Example.org>"), parse("user@example.org"))
        self.assertEqual(parse(" <user+x@example.org> ").keys[:2],
                         ("user+x@example.org", "user@example.org"))

    def test_ranks(self):
        """rank_of, domain_rank and mailbox_rank are positions among the keys; None if absent."""
        address = parse("user+ext@sub.example.com")
        self.assertEqual(address.rank_of("@.example.com"), 4)
        self.assertIsNone(address.rank_of("@other.example"))
        self.assertEqual(address.domain_rank, 2)
        self.assertEqual(address.mailbox_rank, 1)
        self.assertIsNone(parse("postmaster").domain_rank)


# ---------------------------------------------------------------- query


def filter_tree(text):
    """text parsed as ldap3 parses a search filter (values left as written)."""
    return parse_filter(text, None, False, False, None, False)


class QueryTests(unittest.SynchronousTestCase):
    def test_default_filter(self):
        """(mail=%m) becomes an OR over the address's keys, most specific first."""
        base, text = Query(DEFAULT_FILTER, BASE).for_address(parse("user+ext@sub.example.com"))
        self.assertEqual(base, BASE)
        self.assertEqual(text, "(&(objectClass=milterManagerPolicy)"
                               "(|(mail=user+ext@sub.example.com)(mail=user@sub.example.com)"
                               "(mail=@sub.example.com)(mail=@.sub.example.com)"
                               "(mail=@.example.com)(mail=@.com)(mail=@.)))")

    def test_domain_mailbox_percent(self):
        """%d is the domain, %u the mailbox (no extension), %% a %, as items or inside values."""
        query = Query("(&(objectClass=x)(domainName=%d)(uid=%u)(cn=backup.%d)"
                      "(description=100%%))", BASE)
        _, text = query.for_address(parse("User+Ext@Example.ORG"))
        self.assertEqual(text, "(&(objectClass=x)(domainName=example.org)(uid=user)"
                               "(cn=backup.example.org)(description=100%))")

    def test_escape_value(self):
        """*, (, ), \\, NUL and non-ASCII (as UTF-8 bytes) become \\XX; the rest stays."""
        self.assertEqual(escape_value("a*b"), "a\\2ab")
        self.assertEqual(escape_value("(x)"), "\\28x\\29")
        self.assertEqual(escape_value("a\\b"), "a\\5cb")
        self.assertEqual(escape_value("a\0b"), "a\\00b")
        self.assertEqual(escape_value("é"), "\\c3\\a9")
        self.assertEqual(escape_value("用"), "\\e7\\94\\a8")
        self.assertEqual(escape_value("tab\there"), "tab\\09here")
        self.assertEqual(escape_value("user+ext@example.org %="),
                         "user+ext@example.org %=")

    def test_escape_surrogates(self):
        """A byte that was not UTF-8 (surrogate-escaped) is written as that byte, \\XX."""
        self.assertEqual(escape_value("a\udcffb"), "a\\ffb")
        self.assertEqual(escape_value(b"\xe9t\xe9".decode("utf-8", "surrogateescape")),
                         "\\e9t\\e9")

    def test_escaped_in_filter(self):
        """An address's specials are escaped in each key of the filter."""
        _, text = Query(DEFAULT_FILTER, BASE).for_address(parse("a*b(c)\\d@example.org"))
        self.assertEqual(text, "(&(objectClass=milterManagerPolicy)"
                               "(|(mail=a\\2ab\\28c\\29\\5cd@example.org)(mail=@example.org)"
                               "(mail=@.example.org)(mail=@.org)(mail=@.)))")

    def test_non_ascii_local_part(self):
        """A non-ASCII local part is searched as its UTF-8 bytes."""
        _, text = Query(DEFAULT_FILTER, BASE).for_address(parse("Jürgen@example.org"))
        self.assertIn("(mail=j\\c3\\bcrgen@example.org)", text)

    def test_injection_keeps_structure(self):
        """*)(uid=* in an address is a value: the filter stays AND(objectClass, OR(equalities))."""
        query = Query(DEFAULT_FILTER, BASE)
        for recipient in ("*)(uid=*@example.org", "x)(|(objectClass=*)@example.org",
                          "a@example.org)(uid=*", "*@*"):
            address = parse(recipient)
            _, text = query.for_address(address)
            root = filter_tree(text)
            self.assertEqual(root.tag, ROOT)
            top, = root.elements
            self.assertEqual(top.tag, AND, recipient)
            kind, alternatives = top.elements
            self.assertEqual((kind.tag, kind.assertion["attr"], kind.assertion["value"]),
                             (MATCH_EQUAL, "objectClass", b"milterManagerPolicy"))
            self.assertEqual(alternatives.tag, OR, recipient)
            self.assertEqual([item.tag for item in alternatives.elements],
                             [MATCH_EQUAL] * len(address.keys), recipient)
            self.assertEqual({item.assertion["attr"] for item in alternatives.elements},
                             {"mail"}, recipient)
        _, text = query.for_address(parse("*)(uid=*@example.org"))
        first = filter_tree(text).elements[0].elements[1].elements[0]
        self.assertEqual(first.assertion["value"], b"\\2a\\29\\28uid=\\2a@example.org")

    def test_placeholders_in_address_not_expanded(self):
        """%d, %u and %% inside an address are searched as written, not filled in again."""
        _, text = Query(DEFAULT_FILTER, BASE).for_address(
            parse("user%domain.com@relay.example"))
        self.assertEqual(text, "(&(objectClass=milterManagerPolicy)"
                               "(|(mail=user%domain.com@relay.example)(mail=@relay.example)"
                               "(mail=@.relay.example)(mail=@.example)(mail=@.)))")
        _, text = Query("(&(objectClass=x)(uid=%u))", BASE).for_address(
            parse("a%u%%b@example.org"))
        self.assertEqual(text, "(&(objectClass=x)(uid=a%u%%b))")

    def test_domain_in_base(self):
        """%d in the base is the domain as an RDN value; , and + in it are escaped."""
        query = Query(DEFAULT_FILTER, "cn=%d,ou=domains,dc=example,dc=com")
        base, _ = query.for_address(parse("user@Example.ORG"))
        self.assertEqual(base, "cn=example.org,ou=domains,dc=example,dc=com")
        base, _ = query.for_address(parse("user@a,b+c.example"))
        self.assertEqual(base, "cn=a\\,b\\+c.example,ou=domains,dc=example,dc=com")
        base, _ = Query(DEFAULT_FILTER, "ou=100%%,dc=example").for_address(parse("u@x.org"))
        self.assertEqual(base, "ou=100%,dc=example")

    def test_bad_templates(self):
        """Unbalanced filters, unknown placeholders, %m inside a value, bad bases: QueryError."""
        for filter_template, base in (
                ("(&(mail=%m)", BASE),
                ("(mail=%x)", BASE),
                ("(mail=x%m)", BASE),
                ("(&(objectClass=x)(description=%m*))", BASE),
                ("mail=%m", BASE),
                (DEFAULT_FILTER, "cn=%u,dc=example"),
                (DEFAULT_FILTER, "cn=%d,,"),
                (DEFAULT_FILTER, "not a dn")):
            self.assertRaises(QueryError, Query, filter_template, base)

    def test_bad_template_messages(self):
        """The QueryError says what is wrong with the template."""
        error = self.assertRaises(QueryError, Query, "(mail=x%m)", BASE)
        self.assertEqual(str(error), "%m must be a whole equality value, as in (mail=%m)")
        error = self.assertRaises(QueryError, Query, "(mail=%x)", BASE)
        self.assertEqual(str(error), "has no placeholder %x: the placeholders are %m (the "
                                     "lookup keys), %d (the domain), %u (the mailbox) and %%")

    def test_rank(self):
        """An entry ranks by its most specific %m value, its %d value (domain), its %u value."""
        query = Query("(&(objectClass=milterManagerPolicy)"
                      "(|(mail=%m)(domainName=%d)(uid=%u)))", BASE)
        self.assertEqual(query.ranking_attributes, ["mail", "domainname", "uid"])
        address = parse("user+ext@sub.example.com")
        for attributes, rank in (
                ({"mail": ["user+ext@sub.example.com"]}, 0),
                ({"mail": ["@.example.com"]}, 4),
                ({"mail": ["@.", "user@sub.example.com"]}, 1),
                ({"mail": ["@."]}, 6),
                ({"domainname": ["sub.example.com"]}, 2),
                ({"uid": ["user"]}, 1),
                ({"domainname": ["sub.example.com"], "mail": ["@.com"]}, 2),
                ({"mail": ["other@example.com"]}, None),
                ({"domainname": ["example.com"]}, None),
                ({"uid": ["user+ext"]}, None),
                ({"cn": ["user+ext@sub.example.com"]}, None),
                ({}, None)):
            self.assertEqual(query.rank(attributes, address), rank, attributes)

    def test_rank_case_insensitive(self):
        """Values rank whatever their case and surrounding spaces."""
        query = Query("(&(objectClass=x)(|(mail=%m)(domainName=%d)(uid=%u)))", BASE)
        address = parse("user+ext@sub.example.com")
        self.assertEqual(query.rank({"mail": [" USER+EXT@Sub.Example.COM "]}, address), 0)
        self.assertEqual(query.rank({"domainname": ["SUB.EXAMPLE.COM"]}, address), 2)
        self.assertEqual(query.rank({"uid": ["User"]}, address), 1)


# ---------------------------------------------------------------- rules


def entry(dn, rank, **attributes):
    """An Entry whose attributes are given by their schema names (lower-cased, as sources do)."""
    return Entry(dn, rank, {name.lower(): list(values) for name, values in attributes.items()})


USER = "cn=user@example.org"
DOMAIN = "cn=example.org"
EVERYONE = "cn=everyone"
AMAVIS = Defaults(spam_milters=("spam", "spam2"), virus_milters=("clamav",))


# (what, entries, defaults, expected states)
RULE_CASES = [
    ("user Bypass replaces domain Bypass",
     [entry(USER, 0, milterManagerBypass=["spam"]),
      entry(DOMAIN, 2, milterManagerBypass=["grey"], milterManagerApply=["dkim"])],
     Defaults(), {"spam": BYPASS, "dkim": RUN}),
    ("user Apply beats domain Bypass for the same child",
     [entry(USER, 0, milterManagerApply=["grey"]),
      entry(DOMAIN, 2, milterManagerBypass=["grey"])],
     Defaults(), {"grey": RUN}),
    ("user Bypass beats domain Evaluate",
     [entry(DOMAIN, 2, milterManagerEvaluate=["grey"]),
      entry(USER, 0, milterManagerBypass=["grey"])],
     Defaults(), {"grey": BYPASS}),
    ("same rank: evaluate beats apply and bypass",
     [entry(DOMAIN, 2, milterManagerApply=["x"], milterManagerBypass=["x"],
            milterManagerEvaluate=["x"])],
     Defaults(), {"x": EVALUATE}),
    ("same rank: apply beats bypass",
     [entry(DOMAIN, 2, milterManagerBypass=["x"], milterManagerApply=["x"])],
     Defaults(), {"x": RUN}),
    ("same rank, two entries: evaluate beats bypass",
     [entry("cn=a", 2, milterManagerBypass=["x"]),
      entry("cn=b", 2, milterManagerEvaluate=["x"])],
     Defaults(), {"x": EVALUATE}),
    ("defaults alone",
     [], Defaults(apply=("dkim",), bypass=("grey",), evaluate=("spam",)),
     {"dkim": RUN, "grey": BYPASS, "spam": EVALUATE}),
    ("even @. beats the defaults",
     [entry(EVERYONE, 6, milterManagerApply=["grey"])],
     Defaults(bypass=("grey",), evaluate=("spam",)),
     {"grey": RUN, "spam": EVALUATE}),
    ("amavisBypassSpamChecks TRUE bypasses spam_milters",
     [entry(DOMAIN, 2, amavisBypassSpamChecks=["TRUE"])],
     AMAVIS, {"spam": BYPASS, "spam2": BYPASS}),
    ("amavisBypassVirusChecks TRUE bypasses virus_milters",
     [entry(DOMAIN, 2, amavisBypassVirusChecks=["TRUE"])],
     AMAVIS, {"clamav": BYPASS}),
    ("amavisSpamLover TRUE makes spam_milters evaluate",
     [entry(DOMAIN, 2, amavisSpamLover=["TRUE"])],
     AMAVIS, {"spam": EVALUATE, "spam2": EVALUATE}),
    ("FALSE at the user hides TRUE at the domain",
     [entry(USER, 0, amavisBypassSpamChecks=["FALSE"]),
      entry(DOMAIN, 2, amavisBypassSpamChecks=["TRUE"], amavisBypassVirusChecks=["TRUE"])],
     AMAVIS, {"clamav": BYPASS}),
    ("FALSE alone says nothing",
     [entry(DOMAIN, 2, amavisBypassSpamChecks=["FALSE"], amavisSpamLover=["FALSE"])],
     AMAVIS, {}),
    ("amavis attributes count at their entry's rank",
     [entry(USER, 0, milterManagerApply=["spam"]),
      entry(DOMAIN, 2, amavisBypassSpamChecks=["TRUE"])],
     AMAVIS, {"spam": RUN, "spam2": BYPASS}),
    ("a user's amavisBypassSpamChecks beats a domain's Apply",
     [entry(USER, 0, amavisBypassSpamChecks=["TRUE"]),
      entry(DOMAIN, 2, milterManagerApply=["spam"])],
     AMAVIS, {"spam": BYPASS, "spam2": BYPASS}),
    ("empty names are ignored",
     [entry(DOMAIN, 2, milterManagerBypass=["", "  ", "grey"])],
     Defaults(), {"grey": BYPASS}),
    ("an attribute without values is absent",
     [entry(USER, 0, milterManagerBypass=[]),
      entry(DOMAIN, 2, milterManagerBypass=["grey"])],
     Defaults(), {"grey": BYPASS}),
    ("nothing named: everything runs",
     [entry(DOMAIN, 2, description=["no policy"])], Defaults(), {}),
]


class RulesTests(unittest.SynchronousTestCase):
    def test_cases(self):
        """Each attribute from the most specific entry; per child the most specific state."""
        for what, entries, defaults, states in RULE_CASES:
            policy = resolve(entries, Attributes(), defaults)
            self.assertEqual(policy.states, states, what)

    def test_order_of_entries_given(self):
        """resolve ranks entries itself: the policy's entries are most specific first."""
        policy = resolve([entry(EVERYONE, 6, milterManagerBypass=["a"]),
                          entry(USER, 0, milterManagerApply=["a"]),
                          entry(DOMAIN, 2)], Attributes(), Defaults())
        self.assertEqual(policy.entries, (USER, DOMAIN, EVERYONE))
        self.assertEqual(policy.states, {"a": RUN})

    def test_attribute_names_configurable(self):
        """Attributes(...) names the attributes read; the default names are then ignored."""
        attributes = Attributes(apply="policyRun", bypass="policySkip", evaluate="policyWatch",
                                bypass_spam="noSpamCheck", bypass_virus="noVirusCheck",
                                spam_lover="likesSpam")
        policy = resolve([entry(DOMAIN, 2, policySkip=["grey"], policyWatch=["dmarc"],
                                policyRun=["dkim"], milterManagerBypass=["dkim"],
                                noVirusCheck=["TRUE"], likesSpam=["TRUE"],
                                amavisBypassSpamChecks=["TRUE"])],
                         attributes, AMAVIS)
        self.assertEqual(policy.states, {"grey": BYPASS, "dmarc": EVALUATE, "dkim": RUN,
                                         "clamav": BYPASS, "spam": EVALUATE, "spam2": EVALUATE})

    def test_default_policy(self):
        """default_policy: the defaults' states, no entries, fallback as asked."""
        defaults = Defaults(bypass=("grey",))
        self.assertEqual(default_policy(Attributes(), defaults),
                         RecipientPolicy({"grey": BYPASS}, ()))
        self.assertEqual(default_policy(Attributes(), defaults, fallback=True),
                         RecipientPolicy({"grey": BYPASS}, (), fallback=True))

    def test_recipient_policy(self):
        """state() of an unnamed child is RUN; key() lists the states of the names given."""
        policy = RecipientPolicy({"grey": BYPASS, "spam": EVALUATE})
        self.assertIs(policy.state("grey"), BYPASS)
        self.assertIs(policy.state("nowhere"), RUN)
        self.assertEqual(policy.key(("spam", "grey", "dkim")), (EVALUATE, BYPASS, RUN))
        self.assertEqual(policy.key(()), ())

    def test_describe(self):
        """describe() groups names by state: apply, evaluate, bypass; none: run everything."""
        policy = RecipientPolicy({"a": RUN, "c": BYPASS, "b": RUN, "d": EVALUATE})
        self.assertEqual(policy.describe(), "apply a, b; evaluate d; bypass c")
        self.assertEqual(RecipientPolicy({}).describe(), "run everything")


# ---------------------------------------------------------------- cache


FOUND = RecipientPolicy({"grey": BYPASS}, (DOMAIN,))
NOTHING = RecipientPolicy({}, ())


class CacheTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()

    def test_ttl(self):
        """A found policy is served until ttl seconds have passed, then not."""
        cache = PolicyCache(self.clock, 300, 60)
        cache.put("a@example.org", FOUND)
        self.clock.advance(299.5)
        self.assertIs(cache.get("a@example.org"), FOUND)
        self.clock.advance(0.5)
        self.assertIsNone(cache.get("a@example.org"))
        self.assertEqual(len(cache), 0)

    def test_negative_ttl(self):
        """A policy without entries is kept negative_ttl seconds only."""
        cache = PolicyCache(self.clock, 300, 60)
        cache.put("a@example.org", NOTHING)
        self.clock.advance(59)
        self.assertIs(cache.get("a@example.org"), NOTHING)
        self.clock.advance(1)
        self.assertIsNone(cache.get("a@example.org"))

    def test_unknown(self):
        """An address never put is neither cached nor stale."""
        cache = PolicyCache(self.clock, 300, 60, stale_for=30)
        self.assertIsNone(cache.get("a@example.org"))
        self.assertIsNone(cache.stale("a@example.org"))

    def test_stale(self):
        """stale() serves an expired policy up to stale_for seconds after expiry; get() does not."""
        cache = PolicyCache(self.clock, 300, 60, stale_for=30)
        cache.put("a@example.org", FOUND)
        self.assertIs(cache.stale("a@example.org"), FOUND)
        self.clock.advance(310)
        self.assertIsNone(cache.get("a@example.org"))
        self.assertIs(cache.stale("a@example.org"), FOUND)
        self.clock.advance(19.5)
        self.assertIs(cache.stale("a@example.org"), FOUND)
        self.clock.advance(0.5)
        self.assertIsNone(cache.stale("a@example.org"))
        self.assertIsNone(cache.get("a@example.org"))
        self.assertEqual(len(cache), 0)

    def test_no_stale_without_stale_for(self):
        """Without stale_for, an expired policy is gone."""
        cache = PolicyCache(self.clock, 300, 60)
        cache.put("a@example.org", FOUND)
        self.clock.advance(300)
        self.assertIsNone(cache.stale("a@example.org"))

    def test_ttl_zero(self):
        """ttl 0 stores nothing."""
        cache = PolicyCache(self.clock, 0, 0)
        cache.put("a@example.org", FOUND)
        cache.put("b@example.org", NOTHING)
        self.assertEqual(len(cache), 0)
        self.assertIsNone(cache.get("a@example.org"))

    def test_ttl_zero_with_stale(self):
        """ttl 0 with stale_for: never served fresh, but kept for stale()."""
        cache = PolicyCache(self.clock, 0, 0, stale_for=30)
        cache.put("a@example.org", FOUND)
        self.assertEqual(len(cache), 1)
        self.assertIsNone(cache.get("a@example.org"))
        self.clock.advance(29)
        self.assertIs(cache.stale("a@example.org"), FOUND)
        self.clock.advance(1)
        self.assertIsNone(cache.stale("a@example.org"))

    def test_lru(self):
        """Beyond max_size the least recently used address goes first; get() counts as a use."""
        cache = PolicyCache(self.clock, 300, 60, max_size=2)
        cache.put("a", FOUND)
        cache.put("b", FOUND)
        self.assertIs(cache.get("a"), FOUND)
        cache.put("c", FOUND)
        self.assertEqual(len(cache), 2)
        self.assertIs(cache.get("a"), FOUND)
        self.assertIsNone(cache.get("b"))
        self.assertIs(cache.get("c"), FOUND)

    def test_put_again_refreshes(self):
        """Putting an address again restarts its ttl and makes it the most recent."""
        cache = PolicyCache(self.clock, 300, 60, max_size=2)
        cache.put("a", NOTHING)
        cache.put("b", FOUND)
        self.clock.advance(50)
        cache.put("a", FOUND)
        cache.put("c", FOUND)
        self.assertIsNone(cache.get("b"))
        self.clock.advance(200)
        self.assertIs(cache.get("a"), FOUND)

    def test_clear(self):
        """clear() forgets everything, stale policies too."""
        cache = PolicyCache(self.clock, 300, 60, stale_for=30)
        cache.put("a", FOUND)
        cache.put("b", NOTHING)
        cache.clear()
        self.assertEqual(len(cache), 0)
        self.assertIsNone(cache.get("a"))
        self.assertIsNone(cache.stale("a"))


# ---------------------------------------------------------------- lookup


class Controlled:
    """An IPolicySource whose searches wait: the test answers them (answer, fail)."""

    def __init__(self):
        self.searches = []  # (base, filter, attributes, Deferred)
        self.stopped = False

    def search(self, base, filter, attributes):
        d = defer.Deferred()
        self.searches.append((base, filter, list(attributes), d))
        return d

    def answer(self, index, found):
        self.searches[index][3].callback(found)

    def fail(self, index, text):
        self.searches[index][3].errback(SourceError(text))

    def stop(self):
        self.stopped = True


def directory():
    """example.org bypasses grey; alice@example.org applies it; @. evaluates dmarc."""
    source = MemoryPolicySource()
    policy = ["organizationalRole", "milterManagerPolicy"]
    source.add(f"cn=everyone,{BASE}", {"objectClass": policy, "cn": "everyone", "mail": "@.",
                                       "milterManagerEvaluate": ["dmarc"]})
    source.add(f"cn=example.org,{BASE}", {"objectClass": policy, "cn": "example.org",
                                          "mail": "@example.org",
                                          "milterManagerBypass": ["grey"]})
    source.add(f"cn=alice@example.org,{BASE}", {"objectClass": policy, "cn": "alice@example.org",
                                                "mail": "alice@example.org",
                                                "milterManagerApply": ["grey"]})
    return source


KNOWN = ("grey", "spam", "dmarc")


def make_lookup(source, clock, on_error="temporary-failure", defaults=None, ttl=300.0,
                negative_ttl=60.0, timeout=5.0, known=KNOWN):
    """A PolicyLookup wired as LDAPConfig.start wires it (the cache keeps stale_for)."""
    defaults = defaults if defaults is not None else Defaults()
    on_error = OnError.parse(on_error)
    cache = PolicyCache(clock, ttl, negative_ttl, on_error.stale_for)
    return PolicyLookup(source, Query(DEFAULT_FILTER, BASE), Attributes(), defaults, cache,
                        clock, timeout, on_error, "+", known, [URI])


class LogCapture:
    """The text of every event logged while it is installed."""

    def __init__(self, test):
        self.lines = []
        globalLogPublisher.addObserver(self)
        test.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event):
        self.lines.append(formatEvent(event))

    def tagged(self, tag):
        return [line for line in self.lines if line.startswith(tag)]


def found(dn, **attributes):
    """One (dn, attributes) as a source returns it."""
    return (dn, {name.lower(): list(values) for name, values in attributes.items()})


class LookupTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()

    def test_found(self):
        """alice@example.org: her Apply beats her domain's Bypass; @. adds dmarc evaluate."""
        lookup = make_lookup(directory(), self.clock)
        policy = lookup.lookup("<Alice@Example.org>")
        self.assertEqual(policy.states, {"grey": RUN, "dmarc": EVALUATE})
        self.assertEqual(policy.entries, (f"cn=alice@example.org,{BASE}",
                                          f"cn=example.org,{BASE}", f"cn=everyone,{BASE}"))
        self.assertEqual(lookup.lookup("bob@example.org").states,
                         {"grey": BYPASS, "dmarc": EVALUATE})

    def test_search_asked(self):
        """The search is the Query's base and filter; it asks for the policy and rank attributes."""
        source = Controlled()
        make_lookup(source, self.clock).lookup("bob@example.org")
        (base, text, attributes, _), = source.searches
        self.assertEqual(base, BASE)
        self.assertEqual(text, "(&(objectClass=milterManagerPolicy)(|(mail=bob@example.org)"
                               "(mail=@example.org)(mail=@.example.org)(mail=@.org)(mail=@.)))")
        self.assertEqual(attributes, ["milterManagerApply", "milterManagerBypass",
                                      "milterManagerEvaluate", "amavisBypassSpamChecks",
                                      "amavisBypassVirusChecks", "amavisSpamLover", "mail"])

    def test_unranked_entry_least_specific(self):
        """An entry the filter found by no known key counts as the least specific (@.)."""
        source = Controlled()
        d = make_lookup(source, self.clock).lookup("bob@example.org")
        source.answer(0, [found("cn=odd", milterManagerBypass=["grey"]),
                          found("cn=domain", mail=["@example.org"], milterManagerApply=["grey"])])
        policy = self.successResultOf(d)
        self.assertEqual(policy.entries, ("cn=domain", "cn=odd"))
        self.assertEqual(policy.states, {"grey": RUN})

    def test_cache_hit(self):
        """A cached address is answered at once, no search; after cache_ttl it is searched again."""
        source = directory()
        lookup = make_lookup(source, self.clock)
        first = lookup.lookup("bob@example.org")
        self.assertEqual(len(source.searches), 1)
        self.clock.advance(299)
        self.assertIs(lookup.lookup("<BOB@example.org>"), first)
        self.assertEqual(len(source.searches), 1)
        self.clock.advance(1)
        self.assertEqual(lookup.lookup("bob@example.org"), first)
        self.assertEqual(len(source.searches), 2)

    def test_negative_cache(self):
        """An address no entry speaks for is kept negative_cache_ttl seconds."""
        source = MemoryPolicySource()
        lookup = make_lookup(source, self.clock, defaults=Defaults(bypass=("grey",)))
        self.assertEqual(lookup.lookup("bob@example.net"), RecipientPolicy({"grey": BYPASS}, ()))
        self.clock.advance(59)
        lookup.lookup("bob@example.net")
        self.assertEqual(len(source.searches), 1)
        self.clock.advance(1)
        lookup.lookup("bob@example.net")
        self.assertEqual(len(source.searches), 2)

    def test_one_search_in_flight(self):
        """Two lookups of one address while its search runs share that one search."""
        source = Controlled()
        lookup = make_lookup(source, self.clock)
        first = lookup.lookup("bob@example.org")
        second = lookup.lookup("Bob@Example.org")
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertEqual(len(source.searches), 1)
        source.answer(0, [found("cn=d", mail=["@example.org"], milterManagerBypass=["grey"])])
        expected = RecipientPolicy({"grey": BYPASS}, ("cn=d",))
        self.assertEqual(self.successResultOf(first), expected)
        self.assertEqual(self.successResultOf(second), expected)
        self.assertEqual(lookup.lookup("bob@example.org"), expected)
        self.assertEqual(len(source.searches), 1)

    def test_other_addresses_search_apart(self):
        """Lookups of different addresses each have their own search."""
        source = Controlled()
        lookup = make_lookup(source, self.clock)
        lookup.lookup("a@example.org")
        lookup.lookup("b@example.org")
        self.assertEqual(len(source.searches), 2)

    def test_timeout(self):
        """No answer within the timeout: on_error decides (temporary failure: Unavailable)."""
        source = Controlled()
        lookup = make_lookup(source, self.clock, timeout=5.0)
        d = lookup.lookup("bob@example.org")
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        result = self.successResultOf(d)
        self.assertIsInstance(result, Unavailable)
        self.assertEqual(result.reason, "no answer in 5 s")

    def test_timeout_shared(self):
        """Everyone waiting for a search that times out gets the on_error answer."""
        source = Controlled()
        lookup = make_lookup(source, self.clock, on_error="default-policy",
                             defaults=Defaults(bypass=("grey",)))
        first, second = lookup.lookup("bob@example.org"), lookup.lookup("bob@example.org")
        self.clock.advance(5)
        expected = RecipientPolicy({"grey": BYPASS}, (), fallback=True)
        self.assertEqual(self.successResultOf(first), expected)
        self.assertEqual(self.successResultOf(second), expected)

    def test_late_answer_ignored(self):
        """An answer arriving after the timeout changes nothing (and is not an error)."""
        source = Controlled()
        lookup = make_lookup(source, self.clock)
        d = lookup.lookup("bob@example.org")
        self.clock.advance(5)
        self.assertIsInstance(self.successResultOf(d), Unavailable)
        source.answer(0, [])
        self.assertIsInstance(lookup.lookup("bob@example.org"), defer.Deferred)
        self.assertEqual(len(source.searches), 2)

    def test_temporary_failure(self):
        """on_error temporary-failure: a failing directory gives Unavailable with its reason."""
        source = directory()
        source.failing = "connection refused"
        result = make_lookup(source, self.clock).lookup("bob@example.org")
        self.assertIsInstance(result, Unavailable)
        self.assertEqual(result.reason, "connection refused")

    def test_failure_not_cached(self):
        """A failed lookup is not cached: the next one asks again."""
        source = directory()
        source.failing = "connection refused"
        lookup = make_lookup(source, self.clock)
        lookup.lookup("bob@example.org")
        source.failing = None
        self.assertEqual(lookup.lookup("bob@example.org").states,
                         {"grey": BYPASS, "dmarc": EVALUATE})
        self.assertEqual(len(source.searches), 2)

    def test_default_policy(self):
        """on_error default-policy: the defaults, marked fallback."""
        source = directory()
        source.failing = "connection refused"
        lookup = make_lookup(source, self.clock, on_error="default-policy",
                             defaults=Defaults(bypass=("grey",), evaluate=("spam",)))
        self.assertEqual(lookup.lookup("alice@example.org"),
                         RecipientPolicy({"grey": BYPASS, "spam": EVALUATE}, (), fallback=True))

    def test_stale(self):
        """on_error "stale 30": the expired policy, marked stale, for 30 s; then Unavailable."""
        source = directory()
        lookup = make_lookup(source, self.clock, on_error="stale 30")
        fresh = lookup.lookup("alice@example.org")
        source.failing = "connection refused"
        self.clock.advance(300)
        stale = lookup.lookup("alice@example.org")
        self.assertEqual(stale, RecipientPolicy(fresh.states, fresh.entries, stale=True))
        self.clock.advance(29.5)
        self.assertTrue(lookup.lookup("alice@example.org").stale)
        self.clock.advance(0.5)
        self.assertIsInstance(lookup.lookup("alice@example.org"), Unavailable)
        self.assertIsInstance(lookup.lookup("bob@example.org"), Unavailable)

    def test_one_error_line_per_outage(self):
        """One [ldap][error] line per outage, whatever its lookups and causes; one on recovery."""
        logged = LogCapture(self)
        source = Controlled()
        lookup = make_lookup(source, self.clock)
        first = lookup.lookup("a@example.org")
        source.fail(0, "connection refused")
        self.assertIsInstance(self.successResultOf(first), Unavailable)
        lookup.lookup("b@example.org")
        source.fail(1, "connection refused")
        timed_out = lookup.lookup("c@example.org")
        self.clock.advance(5)
        self.assertIsInstance(self.successResultOf(timed_out), Unavailable)
        self.assertEqual(logged.tagged("[ldap][error]"), [
            ("[ldap][error] cannot ask ldap://ldap1.example.com: connection refused; on_error "
            "temporary-failure: recipients get a temporary failure until it answers again")])
        self.assertEqual(logged.tagged("[ldap][recovered]"), [])
        self.clock.advance(37)
        lookup.lookup("d@example.org")
        source.answer(3, [])
        lookup.lookup("e@example.org")
        source.answer(4, [])
        self.assertEqual(logged.tagged("[ldap][recovered]"), [
            ("[ldap][recovered] ldap://ldap1.example.com answers again after 42.0 s; "
            "3 lookups failed meanwhile")])
        self.assertEqual(len(logged.tagged("[ldap][error]")), 1)

    def test_next_outage_logged_again(self):
        """After a recovery, the next outage is logged again, with its own cause and mode."""
        logged = LogCapture(self)
        source = directory()
        lookup = make_lookup(source, self.clock, on_error="stale 30")
        source.failing = "first cause"
        lookup.lookup("a@example.org")
        source.failing = None
        lookup.lookup("b@example.org")
        source.failing = "second cause"
        lookup.lookup("c@example.org")
        lookup.lookup("d@example.org")
        self.assertEqual(logged.tagged("[ldap][error]"), [
            ("[ldap][error] cannot ask ldap://ldap1.example.com: first cause; on_error stale 30: "
            "recipients get their cached policy up to 30 s after it expired, else a temporary "
            "failure until it answers again"),
            ("[ldap][error] cannot ask ldap://ldap1.example.com: second cause; on_error stale 30: "
            "recipients get their cached policy up to 30 s after it expired, else a temporary "
            "failure until it answers again")])
        self.assertEqual(len(logged.tagged("[ldap][recovered]")), 1)

    def test_unknown_milter(self):
        """A name that is no milter here is warned about once per name, however often found."""
        logged = LogCapture(self)
        source = Controlled()
        lookup = make_lookup(source, self.clock)
        for index, address in enumerate(("a@example.org", "b@example.org", "c@example.org")):
            lookup.lookup(address)
            source.answer(index, [found("cn=d", mail=["@example.org"],
                                        milterManagerBypass=["grey", "nosuch", "other"])])
        self.assertEqual(sorted(logged.tagged("[ldap][unknown-milter]")), [
            "[ldap][unknown-milter] cn=d name 'nosuch', which is no milter here; ignored",
            "[ldap][unknown-milter] cn=d name 'other', which is no milter here; ignored"])

    def test_no_domain(self):
        """An address without a domain (or <>) gets the default policy without a search."""
        source = directory()
        lookup = make_lookup(source, self.clock, defaults=Defaults(bypass=("grey",)))
        for recipient in ("postmaster", "<postmaster>", "<>"):
            self.assertEqual(lookup.lookup(recipient), RecipientPolicy({"grey": BYPASS}, ()))
        self.assertEqual(source.searches, [])

    def test_stop(self):
        """stop() stops the source."""
        source = Controlled()
        make_lookup(source, self.clock).stop()
        self.assertTrue(source.stopped)


class OnErrorTests(unittest.SynchronousTestCase):
    def test_accepted(self):
        """The three modes, stale with seconds > 0; spaces around words do not matter."""
        for text, mode, seconds, shown in (
                ("temporary-failure", "temporary-failure", 0.0, "temporary-failure"),
                ("default-policy", "default-policy", 0.0, "default-policy"),
                ("stale 30", "stale", 30.0, "stale 30"),
                ("  stale   0.5 ", "stale", 0.5, "stale 0.5"),
                ("stale 1e3", "stale", 1000.0, "stale 1000")):
            on_error = OnError.parse(text)
            self.assertEqual((on_error.mode, on_error.stale_for), (mode, seconds), text)
            self.assertEqual(str(on_error), shown)

    def test_refused(self):
        """Anything else is a ValueError saying what is expected."""
        for text in ("", "retry", "Temporary-Failure", "stale", "stale 0", "stale -5",
                     "stale x", "stale inf", "stale nan", "stale 30 s", "default-policy 5",
                     None, 30, ["stale", "30"]):
            error = self.assertRaises(ValueError, OnError.parse, text)
            self.assertEqual(str(error), 'must be "temporary-failure", "default-policy" or '
                                         '"stale N" (N seconds an expired entry may still be '
                                         'served)')


# ---------------------------------------------------------------- gate


class Answers:
    """A lookup answering from a dict: recipient -> policy, Unavailable or Deferred."""

    def __init__(self, answers):
        self.answers = answers
        self.asked = []

    def lookup(self, recipient):
        self.asked.append(recipient)
        return self.answers[recipient]


A_POLICY = RecipientPolicy({"grey": BYPASS, "spam": RUN}, ("cn=a",))
SAME_GOVERNED = RecipientPolicy({"grey": BYPASS, "dkim": BYPASS}, ("cn=b",))
OTHER_POLICY = RecipientPolicy({"grey": RUN}, ("cn=c",))
UNAVAILABLE = (Status.TEMPORARY_FAILURE,
               b"451 4.4.3 Recipient policy directory unavailable, try again later")
SPLIT = (Status.TEMPORARY_FAILURE, b"452 4.5.3 Too many recipients")


class GateTests(unittest.SynchronousTestCase):
    def gate(self, split=True, **answers):
        return PolicyGate(Answers(answers), ("grey", "spam"), split)

    def test_decision(self):
        """A policy answered at once is a Decision without a refusal, also current()."""
        gate = self.gate(a=A_POLICY)
        decision = gate.rcpt("a")
        self.assertIsInstance(decision, Decision)
        self.assertEqual((decision.recipient, decision.policy, decision.refusal),
                         ("a", A_POLICY, None))
        self.assertIs(gate.current(), decision)
        self.assertIs(gate.state("a", "grey"), BYPASS)

    def test_unavailable(self):
        """Unavailable: the manager refuses with 451 4.4.3; the recipient's states are RUN."""
        gate = self.gate(a=Unavailable("down"))
        decision = gate.rcpt("a")
        self.assertIsNone(decision.policy)
        self.assertEqual(decision.refusal, UNAVAILABLE)
        self.assertIs(gate.state("a", "grey"), RUN)

    def test_split(self):
        """split: governed states differing from the first accepted recipient's get 452 4.5.3."""
        gate = self.gate(a=A_POLICY, b=OTHER_POLICY, c=SAME_GOVERNED)
        gate.accepted(gate.rcpt("a"))
        differing = gate.rcpt("b")
        self.assertEqual(differing.refusal, SPLIT)
        self.assertEqual(differing.policy, OTHER_POLICY)
        self.assertIsNone(gate.rcpt("c").refusal)

    def test_split_governed_only(self):
        """Policies differing only for children that do not list the condition are the same."""
        gate = self.gate(a=A_POLICY, b=SAME_GOVERNED)
        gate.accepted(gate.rcpt("a"))
        self.assertIsNone(gate.rcpt("b").refusal)

    def test_no_split(self):
        """Without split, differing policies are all let through."""
        gate = self.gate(split=False, a=A_POLICY, b=OTHER_POLICY)
        gate.accepted(gate.rcpt("a"))
        self.assertIsNone(gate.rcpt("b").refusal)

    def test_split_first_accepted(self):
        """The first recipient the MTA accepted sets the policy: one not accepted does not."""
        gate = self.gate(a=A_POLICY, b=OTHER_POLICY, c=A_POLICY)
        gate.rcpt("a")  # a child rejected it: never accepted
        gate.accepted(gate.rcpt("b"))
        self.assertEqual(gate.rcpt("c").refusal, SPLIT)

    def test_split_refused_not_first(self):
        """A refused recipient (unavailable, or split) does not become the first accepted."""
        gate = self.gate(down=Unavailable("down"), a=A_POLICY, b=OTHER_POLICY)
        gate.accepted(gate.rcpt("down"))
        gate.accepted(gate.rcpt("a"))
        refused = gate.rcpt("b")
        gate.accepted(refused)
        self.assertEqual(refused.refusal, SPLIT)
        self.assertEqual(gate.rcpt("b").refusal, SPLIT)
        self.assertIsNone(gate.rcpt("a").refusal)

    def test_pending(self):
        """While the lookup runs, rcpt() and current() are Deferreds firing with the Decision."""
        answer = defer.Deferred()
        gate = self.gate(a=answer)
        d = gate.rcpt("a")
        waiting = gate.current()
        self.assertNoResult(d)
        self.assertNoResult(waiting)
        self.assertIs(gate.state("a", "grey"), RUN)
        answer.callback(A_POLICY)
        decision = self.successResultOf(d)
        self.assertIs(self.successResultOf(waiting), decision)
        self.assertIs(gate.current(), decision)
        self.assertIs(gate.state("a", "grey"), BYPASS)

    def test_pending_unavailable(self):
        """current() waiting for a lookup that ends Unavailable fires with the refusal."""
        answer = defer.Deferred()
        gate = self.gate(a=answer)
        gate.rcpt("a")
        waiting = gate.current()
        answer.callback(Unavailable("no answer in 5 s"))
        self.assertEqual(self.successResultOf(waiting).refusal, UNAVAILABLE)

    def test_current_before_rcpt(self):
        """current() before any RCPT is None."""
        self.assertIsNone(self.gate().current())

    def test_new_transaction(self):
        """new_transaction forgets the decisions and the first accepted recipient."""
        gate = self.gate(a=A_POLICY, b=OTHER_POLICY)
        gate.accepted(gate.rcpt("a"))
        gate.new_transaction()
        self.assertIsNone(gate.current())
        self.assertEqual(gate.decisions, {})
        self.assertIs(gate.state("a", "grey"), RUN)
        gate.accepted(gate.rcpt("b"))
        self.assertEqual(gate.rcpt("a").refusal, SPLIT)

    def test_state_unknown_recipient(self):
        """state() of a recipient never decided is RUN."""
        gate = self.gate(a=A_POLICY)
        gate.rcpt("a")
        self.assertIs(gate.state("z", "grey"), RUN)
        self.assertIs(gate.state("a", "dkim"), RUN)

    def test_split_logged(self):
        """A split recipient is logged with both policies."""
        logged = LogCapture(self)
        gate = self.gate(a=A_POLICY, b=OTHER_POLICY)
        gate.accepted(gate.rcpt("a"))
        gate.rcpt("b")
        self.assertEqual(logged.tagged("[ldap][split]"), [
            ("[ldap][split] b: deferred to another transaction: apply grey differs from a's "
            "apply spam; bypass grey")])


# ---------------------------------------------------------------- sources


class SourceInterfaceTests(unittest.SynchronousTestCase):
    def test_ldap_source(self):
        """LDAPSource provides IPolicySource."""
        settings = LDAPConfig()
        settings.uris = ["ldap://127.0.0.1:389"]
        verifyObject(IPolicySource, LDAPSource(settings, task.Clock()))

    def test_memory_source(self):
        """MemoryPolicySource provides IPolicySource."""
        verifyObject(IPolicySource, MemoryPolicySource())

    def test_memory_source_failing(self):
        """MemoryPolicySource.failing: searches fail with SourceError, and are still recorded."""
        source = directory()
        source.failing = "down"
        failure = self.failureResultOf(source.search(BASE, "(mail=@.)", ["mail"]), SourceError)
        self.assertEqual(failure.getErrorMessage(), "down")
        self.assertEqual(source.searches, [(BASE, "(mail=@.)")])

    def test_memory_source_missing_base(self):
        """A base that does not exist is no entry, not an error."""
        found = self.successResultOf(directory().search("ou=nowhere,dc=example,dc=com",
                                                        "(mail=@.)", ["mail"]))
        self.assertEqual(found, [])


def closed_port():
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LDAPSourceTests(unittest.TestCase):
    timeout = 20

    def test_nothing_listening(self):
        """Nothing listening: SourceError within the timeout; stop() ends the pool's threads."""
        from twisted.internet import reactor

        settings = LDAPConfig()
        settings.uris = [f"ldap://127.0.0.1:{closed_port()}"]
        settings.timeout = 2.0
        source = LDAPSource(settings, reactor)
        source.start()
        self.addCleanup(source.stop)
        before = set(threading.enumerate())
        started = time.monotonic()
        d = source.search(BASE, "(mail=@.)", ["mail"])
        d = self.assertFailure(d, SourceError)

        def failed(_):
            self.assertLess(time.monotonic() - started, 2.0)
            workers = [thread for thread in threading.enumerate()
                       if thread not in before and "milter-manager-ldap" in thread.name]
            self.assertTrue(workers)
            source.stop()
            for thread in workers:
                self.assertFalse(thread.is_alive(), thread.name)
        return d.addCallback(failed)

    def test_stop_twice(self):
        """stop() twice, or without a search ever made, is harmless."""
        from twisted.internet import reactor

        settings = LDAPConfig()
        settings.uris = [f"ldap://127.0.0.1:{closed_port()}"]
        source = LDAPSource(settings, reactor)
        source.start()
        source.stop()
        source.stop()
