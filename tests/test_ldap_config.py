"""The ldap.* settings through the loader: checks, whole-configuration problems, dump, start.

Each configuration is a file in a temporary directory that loads the
shipped conditions first (the LDAP Policy condition among them), loaded with
strict=False as tests.test_conditions does.
"""

import os
import textwrap
import threading

from twisted.internet import defer, task
from twisted.trial import unittest

from miltermanager import config
from miltermanager.config import ConfigurationError
from miltermanager.config.ldap import RETIRE_AFTER
from miltermanager.policy.lookup import PolicyLookup, Unavailable
from miltermanager.policy.rules import RecipientPolicy, State
from miltermanager.policy.source import LDAPSource
from miltermanager.testing import MemoryPolicySource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONDITIONS = os.path.join(ROOT, "etc", "applicable-conditions")
BASE = "ou=milter-policy,dc=example,dc=com"
PASSWORD = "s3cret-Pa55word"
# Line 1 of every file loads the shipped conditions; lines 2 and 3 set the directory.
DIRECTORY = f"""\
ldap.uris = ["ldap://127.0.0.1:389"]
ldap.base = "{BASE}"
"""
# Lines 4 to 6 when it follows DIRECTORY.
GOVERNED = """\
with define_milter("grey") as milter:
    milter.connection_spec = "inet:1@[127.0.0.1]"
    milter.applicable_conditions = ["LDAP Policy"]
"""
UNGOVERNED = """\
with define_milter("dkim") as milter:
    milter.connection_spec = "inet:2@[127.0.0.1]"
"""


class Loading:
    """load(text): the shipped conditions, then text, as milter-manager.conf in a temp dir."""

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "milter-manager.conf")

    def write(self, name, text):
        path = os.path.join(self.directory, name)
        with open(path, "w", encoding="utf-8", newline="") as file:
            file.write(text)
        return path

    def load(self, text):
        self.write("milter-manager.conf",
                   f'load("{CONDITIONS}/*.conf")\n' + textwrap.dedent(text))
        return config.load(self.path, strict=False)

    def errors(self, text):
        """The errors loading text gives, each as "FILE:LINE: reason"."""
        error = self.assertRaises(ConfigurationError, self.load, text)
        return [str(each) for each in error.errors]

    def assertRefused(self, text, line, reason):
        """Loading text fails with exactly one error: "FILE:LINE: reason"."""
        self.assertEqual(self.errors(text), [f"{self.path}:{line}: {reason}"])


class LoadingTestCase(Loading, unittest.SynchronousTestCase):
    pass


URIS = 'ldap.uris must be a list of LDAP URIs, e.g. ["ldap://127.0.0.1:389"]'
FILTER = "ldap.filter must be an LDAP filter such as (&(objectClass=milterManagerPolicy)(mail=%m))"
TIMEOUT = "ldap.timeout must be a number of seconds greater than 0, at most 60"
ON_ERROR = ('must be "temporary-failure", "default-policy" or "stale N" (N seconds an expired '
            'entry may still be served)')
ATTRIBUTE = "must be an LDAP attribute name (letters, digits, '-') or an OID"


class ValueTests(LoadingTestCase):
    """A bad value is refused at its line, saying what is expected."""

    def test_uris(self):
        """uris: a list of ldap:// or ldaps:// URIs with a host, no DN, no port 0."""
        for value, reason in (
                ('"ldap://127.0.0.1"', f"{URIS}; got 'ldap://127.0.0.1'"),
                ('["http://127.0.0.1"]', ("ldap.uris has a URI that is neither ldap:// nor "
                                         "ldaps://: 'http://127.0.0.1'; got ['http://127.0.0.1']")),
                ('["ldapi:///var/run/slapd/ldapi"]',
                 ("ldap.uris has a URI that is neither ldap:// nor ldaps://: "
                 "'ldapi:///var/run/slapd/ldapi'; got ['ldapi:///var/run/slapd/ldapi']")),
                ('["ldap://127.0.0.1/dc=example,dc=com"]',
                 ("ldap.uris has a URI with a DN, attributes or a filter in it: "
                 "'ldap://127.0.0.1/dc=example,dc=com' (use ldap.base and ldap.filter); "
                 "got ['ldap://127.0.0.1/dc=example,dc=com']")),
                ('["ldap://127.0.0.1/??sub?(mail=x)"]',
                 ("ldap.uris has a URI with a DN, attributes or a filter in it: "
                 "'ldap://127.0.0.1/??sub?(mail=x)' (use ldap.base and ldap.filter); "
                 "got ['ldap://127.0.0.1/??sub?(mail=x)']")),
                ('["ldap:///"]', ("ldap.uris has a URI without a host: 'ldap:///'; "
                                 "got ['ldap:///']")),
                ('["ldap://127.0.0.1:0"]', ("ldap.uris has a URI with port 0: "
                                           "'ldap://127.0.0.1:0'; got ['ldap://127.0.0.1:0']")),
                ('["ldap://127.0.0.1:99999"]', ("ldap.uris has a URI with a bad port: "
                                               "'ldap://127.0.0.1:99999'; "
                                               "got ['ldap://127.0.0.1:99999']")),
                ('[389]', "ldap.uris has a URI that is not a string: 389; got [389]")):
            self.assertRefused(f"\nldap.uris = {value}\n", 3, reason)

    def test_uris_accepted(self):
        """ldap://, ldaps://, a port, an IPv6 literal and a trailing / are accepted."""
        uris = ["ldap://ldap1.example.com", "LDAPS://ldap2.example.com:636/",
                "ldap://[::1]:389"]
        self.assertEqual(self.load(f"ldap.uris = {uris!r}\nldap.base = {BASE!r}\n").ldap.uris,
                         uris)

    def test_scope(self):
        """scope: sub, one or base."""
        self.assertRefused('ldap.scope = "subtree"\n', 2,
                           'ldap.scope must be "sub", "one" or "base"; got \'subtree\'')
        self.assertEqual(self.load('ldap.scope = "one"\n').ldap.scope, "one")

    def test_filter(self):
        """filter: valid once filled in, known placeholders, %m only as a whole value."""
        for value, reason in (
                ('""', f"{FILTER}; got ''"),
                ("None", f"{FILTER}; got None"),
                ('"(&(mail=%m)"',
                 ("ldap.filter is not a valid LDAP filter once filled in (invalid filter): "
                 "(&(|(mail=user+ext@sub.example.com)(mail=user@sub.example.com)"
                 "(mail=@sub.example.com)(mail=@.sub.example.com)(mail=@.example.com)"
                 "(mail=@.com)(mail=@.)); got '(&(mail=%m)'")),
                ('"(mail=%x)"', ("ldap.filter has no placeholder %x: the placeholders are %m "
                                "(the lookup keys), %d (the domain), %u (the mailbox) and %%; "
                                "got '(mail=%x)'")),
                ('"(mail=x%m)"', ("ldap.filter %m must be a whole equality value, as in "
                                 "(mail=%m); got '(mail=x%m)'"))):
            self.assertRefused(f"ldap.filter = {value}\n", 2, reason)

    def test_timeout(self):
        """timeout: seconds above 0, at most 60."""
        for value in ("0", "-1", "60.5", "True", '"5"', 'float("nan")'):
            self.assertRefused(f"ldap.timeout = {value}\n", 2, f"{TIMEOUT}; got {eval(value)!r}")
        self.assertEqual(self.load("ldap.timeout = 60\n").ldap.timeout, 60.0)
        self.assertEqual(self.load("ldap.timeout = 0.25\n").ldap.timeout, 0.25)

    def test_ttls(self):
        """cache_ttl and negative_cache_ttl: seconds, 0 or more."""
        for name in ("cache_ttl", "negative_cache_ttl"):
            for value in ("-1", "-0.5", 'float("inf")', "None"):
                self.assertRefused(
                    f"ldap.{name} = {value}\n", 2,
                    f"ldap.{name} must be a number of seconds, 0 or more (0: not cached); "
                    f"got {eval(value)!r}")
        self.assertEqual(self.load("ldap.cache_ttl = 0\nldap.negative_cache_ttl = 0\n")
                         .ldap.cache_ttl, 0.0)

    def test_on_error(self):
        """on_error: temporary-failure, default-policy or stale N."""
        for value in ('"retry"', '"stale"', '"stale 0"', '"stale -3"', "None"):
            self.assertRefused(f"ldap.on_error = {value}\n", 2,
                               f"ldap.on_error {ON_ERROR}; got {eval(value)!r}")
        self.assertEqual(self.load('ldap.on_error = " stale  30 "\n').ldap.on_error, "stale 30")

    def test_attributes(self):
        """The six attribute names: an LDAP attribute name or an OID."""
        for name in ("apply_attribute", "bypass_attribute", "evaluate_attribute",
                     "bypass_spam_attribute", "bypass_virus_attribute", "spam_lover_attribute"):
            for value in ('"milter Apply"', '""', '"(mail)"', '"1abc"', "None"):
                self.assertRefused(f"ldap.{name} = {value}\n", 2,
                                   f"ldap.{name} {ATTRIBUTE}; got {eval(value)!r}")
        loaded = self.load('ldap.apply_attribute = "x-Policy-Run2"\n'
                           'ldap.bypass_attribute = "1.3.6.1.4.1.99999.1"\n').ldap
        self.assertEqual((loaded.apply_attribute, loaded.bypass_attribute),
                         ("x-Policy-Run2", "1.3.6.1.4.1.99999.1"))

    def test_threads(self):
        """threads: an integer from 1 to 64."""
        for value in ("0", "65", "2.0", "True"):
            self.assertRefused(f"ldap.threads = {value}\n", 2,
                               f"ldap.threads must be an integer from 1 to 64; got {eval(value)!r}")

    def test_delimiter(self):
        """recipient_delimiter: characters without @ or spaces, or ""."""
        for value in ('"@"', '" "', "None"):
            self.assertRefused(
                f"ldap.recipient_delimiter = {value}\n", 2,
                'ldap.recipient_delimiter must be the characters that start an address '
                f'extension ("+"), or "" for none; got {eval(value)!r}')
        self.assertEqual(self.load('ldap.recipient_delimiter = ""\n').ldap.recipient_delimiter,
                         "")

    def test_booleans(self):
        """start_tls and split_recipients: True or False."""
        for name in ("start_tls", "split_recipients"):
            self.assertRefused(f"ldap.{name} = 1\n", 2, f"ldap.{name} must be True or False; "
                                                         f"got 1")

    def test_milter_lists(self):
        """spam_milters, virus_milters and the default_* lists: lists of names."""
        for name in ("spam_milters", "virus_milters", "default_apply", "default_bypass",
                     "default_evaluate"):
            self.assertRefused(f'ldap.{name} = "spam"\n', 2,
                               f"ldap.{name} must be a list of names (non-empty strings); "
                               f"got 'spam'")

    def test_unreadable_files(self):
        """bind_password_file and tls_ca_file must be readable: the error names the path."""
        missing = os.path.join(self.directory, "missing")
        for name in ("bind_password_file", "tls_ca_file"):
            self.assertRefused(f"ldap.{name} = {missing!r}\n", 2,
                               f"ldap.{name}: cannot be read: {missing}: No such file or directory")
            self.assertRefused(f"ldap.{name} = {self.directory!r}\n", 2,
                               f"ldap.{name}: cannot be read: {self.directory}: Is a directory")

    def test_unknown_setting(self):
        """A misspelt ldap setting is refused at its line."""
        errors = self.errors("ldap.timout = 3\n")
        self.assertEqual(len(errors), 1)
        self.assertTrue(errors[0].startswith(f"{self.path}:2: "), errors[0])
        self.assertIn("timeout", errors[0])


class ProblemTests(LoadingTestCase):
    """What only the whole configuration shows: errors at the line that set it, and a warning."""

    def test_valid(self):
        """uris, base and a milter listing the condition load without error or warning."""
        configuration = self.load(DIRECTORY + GOVERNED + UNGOVERNED)
        self.assertEqual(configuration.warnings, [])
        self.assertEqual([milter.name for milter in configuration.ldap.governed(configuration)],
                         ["grey"])

    def test_condition_without_uris(self):
        """A milter listing LDAP Policy without ldap.uris: an error at applicable_conditions."""
        self.assertRefused(UNGOVERNED + GOVERNED, 6,
                           'milter "grey": lists LDAP Policy, but ldap.uris is empty: set the '
                           'LDAP servers policies are read from')

    def test_disabled_milter_without_uris(self):
        """A disabled milter listing the condition needs no uris."""
        self.load(GOVERNED + "    milter.enabled = False\n")

    def test_uris_without_base(self):
        """uris without base: an error at the uris line."""
        self.assertRefused('ldap.uris = ["ldap://127.0.0.1"]\n' + GOVERNED, 2,
                           "ldap.base is required with ldap.uris (the DN searched under)")

    def test_base_with_bad_placeholder(self):
        """A base with a placeholder other than %d: an error at the base line."""
        self.assertRefused(DIRECTORY + 'ldap.base = "cn=%u,dc=example,dc=com"\n' + GOVERNED, 4,
                           "ldap.base has no placeholder %u: only %d (the domain) and %%")

    def test_bind_dn_without_password(self):
        """bind_dn without bind_password_file, or the reverse: an error at the one set."""
        password = self.write("password", PASSWORD + "\n")
        reason = ("ldap.bind_dn and ldap.bind_password_file go together (None and None: an "
                  "anonymous bind)")
        self.assertRefused(DIRECTORY + 'ldap.bind_dn = "cn=manager,dc=example,dc=com"\n'
                           + GOVERNED, 4, reason)
        self.assertRefused(DIRECTORY + f"ldap.bind_password_file = {password!r}\n" + GOVERNED,
                           4, reason)

    def test_start_tls_with_ldaps(self):
        """start_tls with an ldaps:// URI: an error at the start_tls line."""
        self.assertRefused(
            f'ldap.uris = ["ldap://a.example", "ldaps://b.example"]\nldap.base = "{BASE}"\n'
            "ldap.start_tls = True\n" + GOVERNED, 4,
            "ldap.start_tls is for ldap:// URIs; ldaps://b.example uses TLS from the start")

    def test_ca_file_without_tls(self):
        """tls_ca_file without ldaps:// or start_tls: an error at the tls_ca_file line."""
        ca = self.write("ca.pem", "-----BEGIN CERTIFICATE-----\n")
        self.assertRefused(DIRECTORY + f"ldap.tls_ca_file = {ca!r}\n" + GOVERNED, 4,
                           "ldap.tls_ca_file has no effect without TLS: use ldaps:// URIs or "
                           "ldap.start_tls = True")
        self.load(DIRECTORY + f"ldap.tls_ca_file = {ca!r}\nldap.start_tls = True\n" + GOVERNED)

    def test_negative_ttl_longer(self):
        """negative_cache_ttl longer than cache_ttl: an error at the negative_cache_ttl line."""
        self.assertRefused(DIRECTORY + "ldap.cache_ttl = 10\nldap.negative_cache_ttl = 20\n"
                           + GOVERNED, 5,
                           "ldap.negative_cache_ttl (20 s) must not be longer than "
                           "ldap.cache_ttl (10 s)")

    def test_cache_ttl_below_default_negative_ttl(self):
        """cache_ttl below the default negative_cache_ttl (60): an error at the cache_ttl line."""
        self.assertRefused(DIRECTORY + "ldap.cache_ttl = 10\n" + GOVERNED, 4,
                           "ldap.negative_cache_ttl (60 s) must not be longer than "
                           "ldap.cache_ttl (10 s)")

    def test_undefined_milters(self):
        """A milter list (spam_milters, default_*...) naming an undefined milter: an error there."""
        for name in ("spam_milters", "virus_milters", "default_apply", "default_bypass",
                     "default_evaluate"):
            self.assertRefused(DIRECTORY + f'ldap.{name} = ["grey", "spamass"]\n'
                               + GOVERNED + UNGOVERNED, 4,
                               f"ldap.{name} names 'spamass', which is no milter defined here "
                               f"(defined: dkim, grey)")

    def test_timeout_not_below_reading_timeout(self):
        """ldap.timeout not below a governed child's reading_timeout: an error at ldap.timeout."""
        self.assertRefused(DIRECTORY + "ldap.timeout = 7\n" + GOVERNED, 4,
                           'ldap.timeout (7 s) must be shorter than the reading_timeout (7 s) '
                           'of milter "grey", which waits for the policy')
        self.load(DIRECTORY + "ldap.timeout = 6.5\n" + GOVERNED)
        # A child that does not wait for the policy does not count.
        self.load(DIRECTORY + "ldap.timeout = 7\n" + GOVERNED + "    milter.reading_timeout = 8\n"
                  + UNGOVERNED + "    milter.reading_timeout = 1\n")

    def test_reading_timeout_below_default_timeout(self):
        """reading_timeout not above the default ldap.timeout (5 s): an error at that line."""
        self.assertRefused(DIRECTORY + GOVERNED + "    milter.reading_timeout = 5\n", 7,
                           'ldap.timeout (5 s) must be shorter than the reading_timeout (5 s) '
                           'of milter "grey", which waits for the policy')

    def test_every_problem_reported(self):
        """Several problems are reported together, each at its line."""
        errors = self.errors(
            'ldap.uris = ["ldaps://127.0.0.1"]\nldap.start_tls = True\n'
            'ldap.bind_dn = "cn=manager"\nldap.spam_milters = ["nowhere"]\n' + GOVERNED)
        self.assertEqual(errors, [
            f"{self.path}:2: ldap.base is required with ldap.uris (the DN searched under)",
            (f"{self.path}:4: ldap.bind_dn and ldap.bind_password_file go together (None and "
            f"None: an anonymous bind)"),
            (f"{self.path}:3: ldap.start_tls is for ldap:// URIs; ldaps://127.0.0.1 uses TLS "
            f"from the start"),
            (f"{self.path}:5: ldap.spam_milters names 'nowhere', which is no milter defined here "
            f"(defined: grey)")])

    def test_uris_without_governed_milter(self):
        """uris set while no enabled milter lists the condition: a warning at the uris line."""
        warning = (f"{self.path}:2: ldap.uris is set, but no enabled milter lists the LDAP "
                   f"Policy condition: LDAP is never asked")
        self.assertEqual(self.load(DIRECTORY + UNGOVERNED).warnings, [warning])
        self.assertEqual(self.load(DIRECTORY + GOVERNED + "    milter.enabled = False\n")
                         .warnings, [warning])
        self.assertEqual(self.load(UNGOVERNED).warnings, [])


class SecretTests(LoadingTestCase):
    """The bind password is read at load and never shown; its file's path is."""

    def setUp(self):
        super().setUp()
        self.password_file = self.write("password", PASSWORD + "\n")
        self.settings = (DIRECTORY + 'ldap.bind_dn = "cn=manager,dc=example,dc=com"\n'
                         f"ldap.bind_password_file = {self.password_file!r}\n")

    def test_password_read(self):
        """The password is the file's text without its line end (LF or CRLF)."""
        self.assertEqual(self.load(self.settings + GOVERNED).ldap.password, PASSWORD)
        self.write("password", PASSWORD + "\r\n")
        self.assertEqual(self.load(self.settings + GOVERNED).ldap.password, PASSWORD)

    def test_password_first_line(self):
        """The password is the file's first line (docs/ldap.md): later lines are not part of it."""
        self.write("password", PASSWORD + "\nsecond line\n")
        self.assertEqual(self.load(self.settings + GOVERNED).ldap.password, PASSWORD)

    def test_not_dumped(self):
        """dump shows bind_password_file's path, never the password."""
        configuration = self.load(self.settings + GOVERNED)
        dumped = config.dump(configuration)
        self.assertNotIn(PASSWORD, dumped)
        self.assertIn(f'ldap.bind_password_file = "{self.password_file}"  # {self.path}:5',
                      dumped.splitlines())
        self.assertNotIn(PASSWORD, repr(configuration.ldap))

    def test_not_in_errors(self):
        """Errors about a configuration with a password never show it."""
        errors = self.errors(self.settings + "ldap.threads = 0\nldap.start_tls = True\n"
                             'ldap.tls_ca_file = "/nonexistent/ca.pem"\n'
                             'ldap.base = "cn=%u"\nldap.timeout = 9\n' + GOVERNED)
        self.assertEqual(len(errors), 4, errors)
        for error in errors:
            self.assertNotIn(PASSWORD, error)
        errors = self.errors(DIRECTORY + f"ldap.bind_password_file = {self.password_file!r}\n"
                             + GOVERNED)
        self.assertNotIn(PASSWORD, errors[0])


class DumpTests(LoadingTestCase):
    def test_round_trip(self):
        """A configuration setting every ldap.* item dumps and loads back to an equal LDAPConfig."""
        password = self.write("password", PASSWORD + "\n")
        ca = self.write("ca.pem", "-----BEGIN CERTIFICATE-----\n")
        configuration = self.load(textwrap.dedent(f"""\
            ldap.uris = ["ldaps://ldap1.example.com", "ldaps://ldap2.example.com:636"]
            ldap.base = "o=domains,dc=example,dc=com"
            ldap.scope = "one"
            ldap.filter = "(&(objectClass=milterManagerPolicy)(|(mail=%m)(domainName=%d)(uid=%u)))"
            ldap.bind_dn = "cn=manager,dc=example,dc=com"
            ldap.bind_password_file = {password!r}
            ldap.tls_ca_file = {ca!r}
            ldap.timeout = 2.5
            ldap.cache_ttl = 120
            ldap.negative_cache_ttl = 0
            ldap.on_error = "stale 600"
            ldap.split_recipients = True
            ldap.spam_milters = ["spam"]
            ldap.virus_milters = ["clamav"]
            ldap.default_apply = ["grey"]
            ldap.default_bypass = ["clamav"]
            ldap.default_evaluate = ["spam"]
            ldap.apply_attribute = "policyRun"
            ldap.bypass_attribute = "policySkip"
            ldap.evaluate_attribute = "policyWatch"
            ldap.bypass_spam_attribute = "noSpamChecks"
            ldap.bypass_virus_attribute = "noVirusChecks"
            ldap.spam_lover_attribute = "likesSpam"
            ldap.recipient_delimiter = "+-"
            ldap.threads = 2
            """) + "".join(
                f'with define_milter("{name}") as milter:\n'
                f'    milter.connection_spec = "inet:{port}@[127.0.0.1]"\n'
                f'    milter.applicable_conditions = ["LDAP Policy"]\n'
                for port, name in enumerate(("grey", "spam", "clamav"), 1)))
        dumped = self.write("dumped.conf", config.dump(configuration))
        reloaded = config.load(dumped, strict=False)
        self.assertEqual(reloaded.ldap, configuration.ldap)
        self.assertEqual(reloaded.ldap.password, PASSWORD)
        self.assertEqual(reloaded.ldap.ca_data, "-----BEGIN CERTIFICATE-----\n")
        self.assertEqual(reloaded, configuration)

    def test_defaults_dumped(self):
        """Every ldap.* setting is dumped, defaults marked as such."""
        lines = config.dump(self.load("")).splitlines()
        for line in ('ldap.uris = []  # default', 'ldap.base = None  # default',
                     'ldap.scope = "sub"  # default',
                     'ldap.filter = "(&(objectClass=milterManagerPolicy)(mail=%m))"  # default',
                     'ldap.bind_password_file = None  # default',
                     'ldap.timeout = 5.0  # default', 'ldap.cache_ttl = 300.0  # default',
                     'ldap.negative_cache_ttl = 60.0  # default',
                     'ldap.on_error = "temporary-failure"  # default',
                     'ldap.recipient_delimiter = "+"  # default', 'ldap.threads = 4  # default'):
            self.assertIn(line, lines)


# ---------------------------------------------------------------- start and stop


def directory():
    """A directory in memory: example.org bypasses grey."""
    source = RecordingSource()
    source.add(f"cn=example.org,{BASE}", {
        "objectClass": ["organizationalRole", "milterManagerPolicy"], "cn": "example.org",
        "mail": "@example.org", "milterManagerBypass": ["grey"]})
    return source


class RecordingSource(MemoryPolicySource):
    """A MemoryPolicySource that says when (and in which thread) it was stopped."""

    def __init__(self):
        super().__init__()
        self.stopped_in = None
        self.when_stopped = defer.Deferred()

    def stop(self):
        from twisted.internet import reactor

        super().stop()
        self.stopped_in = threading.current_thread()
        if self.stopped_in is threading.main_thread():
            self.when_stopped.callback(self.stopped_in)
        else:
            reactor.callFromThread(self.when_stopped.callback, self.stopped_in)


class ClockReactor(task.Clock):
    """A task.Clock that also keeps system event triggers, as an LDAPSource needs."""

    def __init__(self):
        super().__init__()
        self.triggers = {}

    def addSystemEventTrigger(self, phase, event, function, *arguments, **keywords):
        key = object()
        self.triggers[key] = (phase, event, function)
        return key

    def removeSystemEventTrigger(self, key):
        del self.triggers[key]


class StartTests(LoadingTestCase):
    def setUp(self):
        super().setUp()
        self.clock = task.Clock()

    def started(self, text, source=None, previous=None, reactor=None):
        configuration = self.load(text)
        configuration.ldap.start(configuration, reactor or self.clock, previous=previous,
                                 source=source)
        self.addCleanup(configuration.ldap.stop)
        return configuration.ldap

    def test_lookups(self):
        """start() with a source: lookups searching it, with the settings' timeout and cache."""
        source = directory()
        ldap = self.started(DIRECTORY + "ldap.timeout = 2\nldap.cache_ttl = 30\n"
                            "ldap.negative_cache_ttl = 10\n"
                            'ldap.default_evaluate = ["dkim"]\n' + GOVERNED + UNGOVERNED,
                            source=source)
        self.assertIsInstance(ldap.lookups, PolicyLookup)
        self.assertIs(ldap.lookups.source, source)
        self.assertEqual(ldap.lookups.timeout, 2.0)
        self.assertEqual(ldap.lookups.known, frozenset({"grey", "dkim"}))
        self.assertEqual(ldap.lookups.lookup("bob@example.org"),
                         RecipientPolicy({"grey": State.BYPASS, "dkim": State.EVALUATE},
                                         (f"cn=example.org,{BASE}",)))
        self.assertEqual(ldap.lookups.lookup("bob@example.net"),
                         RecipientPolicy({"dkim": State.EVALUATE}, ()))
        self.assertEqual(source.searches[0][0], BASE)
        self.clock.advance(30)
        ldap.lookups.lookup("bob@example.org")
        self.assertEqual(len(source.searches), 3)

    def test_stale_setting(self):
        """on_error "stale N" keeps expired policies N seconds for outages."""
        source = directory()
        ldap = self.started(DIRECTORY + 'ldap.on_error = "stale 30"\n' + GOVERNED, source=source)
        fresh = ldap.lookups.lookup("bob@example.org")
        source.failing = "connection refused"
        self.clock.advance(329)
        self.assertEqual(ldap.lookups.lookup("bob@example.org"),
                         RecipientPolicy(fresh.states, fresh.entries, stale=True))
        self.clock.advance(1)
        self.assertIsInstance(ldap.lookups.lookup("bob@example.org"), Unavailable)

    def test_delimiter_setting(self):
        """recipient_delimiter is the lookups' delimiter."""
        source = directory()
        ldap = self.started(DIRECTORY + 'ldap.recipient_delimiter = ""\n' + GOVERNED,
                            source=source)
        ldap.lookups.lookup("user+ext@example.org")
        self.assertNotIn("(mail=user@example.org)", source.searches[0][1])

    def test_not_used(self):
        """No milter lists the condition (or no uris): start() makes no lookups."""
        self.assertIsNone(self.started(DIRECTORY + UNGOVERNED, source=directory()).lookups)
        self.assertIsNone(self.started(UNGOVERNED, source=directory()).lookups)

    def test_start_once(self):
        """A second start() keeps the first lookups."""
        ldap = self.started(DIRECTORY + GOVERNED, source=directory())
        lookups = ldap.lookups
        ldap.start(self.load(DIRECTORY + GOVERNED), self.clock, source=directory())
        self.assertIs(ldap.lookups, lookups)

    def test_stop(self):
        """stop() stops the source, once."""
        source = directory()
        ldap = self.started(DIRECTORY + GOVERNED, source=source)
        ldap.stop()
        self.assertIs(source.stopped_in, threading.main_thread())
        ldap.stop()

    def test_reload_same_directory(self):
        """A reload with equal directory settings reuses the running source, retiring nothing."""
        source = directory()
        old = self.started(DIRECTORY + GOVERNED, source=source)
        new = self.started(DIRECTORY + "ldap.cache_ttl = 10\nldap.negative_cache_ttl = 5\n"
                           'ldap.on_error = "default-policy"\n' + GOVERNED, previous=old)
        self.assertIs(new.lookups.source, source)
        self.assertIsNot(new.lookups, old.lookups)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(RETIRE_AFTER * 2)
        self.assertIsNone(source.stopped_in)
        old.stop()
        self.assertIsNone(source.stopped_in)
        new.stop()
        self.assertIsNotNone(source.stopped_in)

    def test_reload_empty_cache(self):
        """A reload's lookups start with an empty cache, on the same source."""
        source = directory()
        old = self.started(DIRECTORY + GOVERNED, source=source)
        old.lookups.lookup("bob@example.org")
        new = self.started(DIRECTORY + GOVERNED, previous=old)
        new.lookups.lookup("bob@example.org")
        self.assertEqual(len(source.searches), 2)


class RetireTests(Loading, unittest.TestCase):
    """A reload that no longer uses the running source stops it RETIRE_AFTER seconds later."""

    timeout = 20

    def setUp(self):
        super().setUp()
        self.clock = ClockReactor()

    def started(self, text, **keywords):
        configuration = self.load(text)
        configuration.ldap.start(configuration, self.clock, **keywords)
        self.addCleanup(configuration.ldap.stop)
        return configuration.ldap

    def assertRetired(self, source):
        """source stops RETIRE_AFTER seconds later, not before, off the reactor thread."""
        self.assertEqual([call.getTime() for call in self.clock.getDelayedCalls()],
                         [RETIRE_AFTER])
        self.clock.advance(RETIRE_AFTER - 1)
        self.assertIsNone(source.stopped_in)
        self.clock.advance(1)
        return source.when_stopped.addCallback(
            lambda thread: self.assertIsNot(thread, threading.main_thread()))

    def test_directory_changed(self):
        """Other directory settings: a new LDAPSource serves; the old source is retired."""
        source = directory()
        old = self.started(DIRECTORY + GOVERNED, source=source)
        new = self.started('ldap.uris = ["ldap://127.0.0.2:389"]\n'
                           f'ldap.base = "{BASE}"\n' + GOVERNED, previous=old)
        self.assertIsInstance(new.lookups.source, LDAPSource)
        return self.assertRetired(source)

    def test_threads_changed(self):
        """ldap.threads is a directory setting: changing it replaces the source too."""
        source = directory()
        old = self.started(DIRECTORY + GOVERNED, source=source)
        new = self.started(DIRECTORY + "ldap.threads = 8\n" + GOVERNED, previous=old)
        self.assertIsInstance(new.lookups.source, LDAPSource)
        return self.assertRetired(source)

    def test_password_changed(self):
        """A new password in the same file replaces the source."""
        password = self.write("password", "first\n")
        text = (DIRECTORY + 'ldap.bind_dn = "cn=manager"\n'
                f"ldap.bind_password_file = {password!r}\n" + GOVERNED)
        source = directory()
        old = self.started(text, source=source)
        self.write("password", "second\n")
        new = self.started(text, previous=old)
        self.assertIsInstance(new.lookups.source, LDAPSource)
        return self.assertRetired(source)

    def test_no_longer_used(self):
        """A reload without uris, or without a milter listing the condition, retires the source."""
        source = directory()
        old = self.started(DIRECTORY + GOVERNED, source=source)
        new = self.started(UNGOVERNED, previous=old)
        self.assertIsNone(new.lookups)
        return self.assertRetired(source)

    def test_no_governed_milter(self):
        """uris kept but no milter listing the condition: the source is retired."""
        source = directory()
        old = self.started(DIRECTORY + GOVERNED, source=source)
        new = self.started(DIRECTORY + UNGOVERNED, previous=old)
        self.assertIsNone(new.lookups)
        return self.assertRetired(source)

    def test_source_given(self):
        """A source given to start() replaces the previous one, which is retired."""
        first, second = directory(), directory()
        old = self.started(DIRECTORY + GOVERNED, source=first)
        new = self.started(DIRECTORY + GOVERNED, previous=old, source=second)
        self.assertIs(new.lookups.source, second)
        return self.assertRetired(first)
