"""The built-in applicable conditions: their logic, their configuration, and through the manager.

The logic lives in miltermanager.conditions (s25r, network, stress, trust,
accounts, dnsbl) and is tested as units; the shipped files in
etc/applicable-conditions/ are loaded with config.load, their stoppers
called with a fake context, and run in the manager on tests.test_session's
harness (an MTA, the manager and scripted children on loopback).
"""

import os
import re
import subprocess
import textwrap

from twisted.internet import defer
from twisted.trial import unittest

from miltermanager import config
from miltermanager.conditions import accounts
from miltermanager.conditions.context import SocketAddress
from miltermanager.conditions.network import RemoteNetwork
from miltermanager.conditions.s25r import S25R
from miltermanager.conditions.stress import Stress, detect_threshold, smtp_maxproc
from miltermanager.conditions.trust import Trust, parse_domains, sender_domain
from miltermanager.config import ConfigurationError
from miltermanager.config.helpers import name_server
from miltermanager.protocol import constants as c
from miltermanager.protocol.messages import Connect, Mail, Rcpt
from tests import test_session
from tests.peers.dns import SOA, A, TestDNSServer
from tests.test_session import (
    BODY, DATA, EOH, EOM, HELO, MAIL, RCPT, SUBJECT, Kid, Scenario, ScenarioTestCase,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONDITIONS = os.path.join(ROOT, "etc", "applicable-conditions")
ALL_SEEN = "connect helo mail rcpt data header eoh body eom close"


def inet(address, port=25):
    return SocketAddress("inet", address, port)


def inet6(address, port=25):
    return SocketAddress("inet6", address, port)


UNIX = SocketAddress("unix", path="/run/smtpd.sock")
UNKNOWN = SocketAddress("unknown")


class FakeContext(dict):
    """A ChildContext stand-in: macros in the dict (names without braces), and the properties."""

    def __init__(self, macros=None, name="child", n_processing_sessions=0):
        super().__init__(macros or {})
        self.name = name
        self.n_processing_sessions = n_processing_sessions
        self.mail_transaction_shelf = {}

    def __getitem__(self, name):
        return self.get(name.strip("{}"))

    def __setitem__(self, name, value):
        super().__setitem__(name.strip("{}"), value)

    @property
    def postfix(self):
        return "postfix" in (self.get("v") or "").lower()

    @property
    def authenticated(self):
        return self.get("auth_type") is not None or self.get("auth_authen") is not None


class LoadingTestCase(unittest.TestCase):
    """load(text): the shipped conditions, then text, as a configuration file in a temp dir."""

    def write(self, name, text):
        if not hasattr(self, "directory"):
            self.directory = os.path.abspath(self.mktemp())
            os.makedirs(self.directory)
        path = os.path.join(self.directory, name)
        with open(path, "w", encoding="utf-8") as file:
            file.write(textwrap.dedent(text))
        return path

    def load(self, text="", shipped=True):
        head = f'load("{CONDITIONS}/*.conf")\n' if shipped else ""
        return config.load(self.write("milter-manager.conf", head + textwrap.dedent(text)),
                           strict=False)

    def error(self, text):
        """The ConfigurationError loading text raises."""
        return self.assertRaises(ConfigurationError, self.load, text)

    def stopper(self, configuration, condition, kind):
        """The function of the one stopper of a kind of a condition."""
        hook, = configuration.conditions[condition].stoppers_of(kind)
        return hook.function


# ---------------------------------------------------------------- S25R


class S25RTests(unittest.SynchronousTestCase):
    def test_dynamic_names(self):
        """Upstream's examples of end-user hosts look dynamic."""
        s25r = S25R()
        for host in ("p1234-ipad01tokyo.example.jp", "dhcp-192-0-2-1.example.net",
                     "ppp123.example.net", "adsl-12.example.com", "host12345.example.net",
                     "12.34.example.co.jp.example", "[192.0.2.1]", "unknown"):
            self.assertTrue(s25r.dynamic(host, inet("192.0.2.1")), host)
            self.assertFalse(s25r.stop(host, inet("192.0.2.1")), host)

    def test_static_names(self):
        """Mail servers' names do not look dynamic: the condition stops."""
        s25r = S25R()
        for host in ("mail.example.com", "mx1.example.net", "smtp.example.co.jp"):
            self.assertFalse(s25r.dynamic(host, inet("192.0.2.1")), host)
            self.assertTrue(s25r.stop(host, inet("192.0.2.1")), host)

    def test_default_whitelist(self):
        """A dynamic-looking name under a whitelisted domain (.google.com) is not dynamic."""
        s25r = S25R()
        self.assertTrue(s25r.dynamic("mail-yw1-f123.example.com", inet("192.0.2.1")))
        self.assertFalse(s25r.dynamic("mail-yw1-f123.google.com", inet("192.0.2.1")))
        self.assertFalse(s25r.dynamic("o1.ptr1234.sendgrid.net", inet("192.0.2.1")))

    def test_custom_lists(self):
        """Whitelist entries (string, regex, function) win over blacklist entries."""
        s25r = S25R()
        s25r.add_blacklist(re.compile(r"\Abot\.", re.IGNORECASE))
        self.assertTrue(s25r.dynamic("BOT.example.com", inet("192.0.2.1")))
        s25r.add_whitelist("bot.example.com")
        self.assertFalse(s25r.dynamic("bot.example.com", inet("192.0.2.1")))
        s25r.add_whitelist(lambda host: host.endswith(".example.jp"))
        self.assertFalse(s25r.dynamic("p1234-ipad01tokyo.example.jp", inet("192.0.2.1")))
        s25r.add_blacklist(lambda host: host == "mail.example.org")
        self.assertTrue(s25r.dynamic("mail.example.org", inet("192.0.2.1")))

    def test_bad_entry(self):
        """An entry that is neither a string, a regex nor a function is refused."""
        self.assertRaises(TypeError, S25R().add_whitelist, 42)
        self.assertRaises(TypeError, S25R().add_blacklist, "")

    def test_only_ipv4(self):
        """By default IPv6 and UNIX clients never look dynamic; with the option off they may."""
        s25r = S25R()
        self.assertFalse(s25r.dynamic("[2001:db8::1]", inet6("2001:db8::1")))
        self.assertFalse(s25r.dynamic("unknown", UNIX))
        s25r.check_only_ipv4 = False
        self.assertTrue(s25r.dynamic("[2001:db8::1]", inet6("2001:db8::1")))


# ---------------------------------------------------------------- Remote Network


class RemoteNetworkTests(unittest.SynchronousTestCase):
    def test_default(self):
        """Loopback, private, link-local and UNIX are local; public addresses are remote."""
        network = RemoteNetwork()
        for address in (inet("127.0.0.1"), inet("10.1.2.3"), inet("172.16.0.1"),
                        inet("192.168.1.2"), inet6("::1"), inet6("fe80::1"), UNIX):
            self.assertTrue(network.stop(address), address)
        for address in (inet("192.0.2.1"), inet6("2001:db8::1"), inet("8.8.8.8")):
            self.assertFalse(network.stop(address), address)

    def test_unknown(self):
        """An unknown address, or none, stops: it is not known to be remote."""
        self.assertTrue(RemoteNetwork().stop(UNKNOWN))
        self.assertTrue(RemoteNetwork().stop(None))
        self.assertTrue(RemoteNetwork().stop(SocketAddress("inet", "not-an-ip", 25)))

    def test_custom_local(self):
        """Addresses and CIDRs added as local stop, IPv4 and IPv6."""
        network = RemoteNetwork()
        network.add_local_address("192.0.2.0/24")
        network.add_local_address("2001:db8::/32")
        network.add_local_address("198.51.100.7")
        self.assertTrue(network.stop(inet("192.0.2.200")))
        self.assertTrue(network.stop(inet6("2001:db8:1::5")))
        self.assertTrue(network.stop(inet("198.51.100.7")))
        self.assertFalse(network.stop(inet("198.51.100.8")))
        self.assertTrue(network.stop(inet6("::ffff:192.0.2.9")), "IPv4-mapped")

    def test_custom_remote_wins(self):
        """An address added as remote is remote even inside a local network."""
        network = RemoteNetwork()
        network.add_local_address("192.0.2.0/24")
        network.add_remote_address("192.0.2.66")
        network.add_remote_address("192.168.10.0/24")
        network.add_remote_address("fe80::1")
        self.assertFalse(network.stop(inet("192.0.2.66")))
        self.assertTrue(network.stop(inet("192.0.2.65")))
        self.assertFalse(network.stop(inet("192.168.10.4")))
        self.assertTrue(network.stop(inet("192.168.11.4")))
        self.assertFalse(network.stop(inet6("fe80::1")))

    def test_bad_address(self):
        """Something that is not an address or CIDR is refused with what was expected."""
        error = self.assertRaises(ValueError, RemoteNetwork().add_local_address, "example.com")
        self.assertIn("IPv4 or IPv6 address or CIDR", str(error))
        self.assertRaises(ValueError, RemoteNetwork().add_remote_address, 42)


# ---------------------------------------------------------------- Trust


class TrustTests(LoadingTestCase):
    def test_sender_domain(self):
        """The envelope-from's domain, lower-cased, without brackets; none for <>."""
        self.assertEqual(sender_domain("<a@Example.COM>"), "example.com")
        self.assertEqual(sender_domain("a@b.example"), "b.example")
        self.assertIsNone(sender_domain("<>"))
        self.assertIsNone(sender_domain(None))

    def test_defaults(self):
        """Upstream's default domains are trusted, others not."""
        trust = Trust()
        self.assertTrue(trust.trusted("<someone@GMAIL.com>"))
        self.assertTrue(trust.trusted("<x@docomo.ne.jp>"))
        self.assertFalse(trust.trusted("<x@example.com>"))
        self.assertFalse(trust.trusted("<x@sub.gmail.com>"), "a string matches one domain")

    def test_clear_and_add(self):
        """clear forgets the defaults; a string, regex or function may be added."""
        trust = Trust()
        trust.clear()
        self.assertFalse(trust.trusted("<x@gmail.com>"))
        trust.add_envelope_from_domain("Example.com")
        trust.add_envelope_from_domain(re.compile(r"\.example\.net\Z"))
        trust.add_envelope_from_domain(lambda domain: domain.endswith(".test"))
        for sender in ("<x@example.com>", "<x@mx.example.net>", "<x@a.test>"):
            self.assertTrue(trust.trusted(sender), sender)
        self.assertFalse(trust.trusted("<x@example.org>"))

    def test_domains_file(self):
        """A domains file: one a line, /RE/ case-insensitive, # comments and blank lines."""
        path = self.write("trusted.list", """\
            # partners
            example.com
            /\\.example\\.net$/   # every host there

            Example.ORG
            """)
        trust = Trust()
        trust.clear()
        trust.load_envelope_from_domains(path)
        self.assertEqual(len(trust.domains), 3)
        for sender in ("<x@example.com>", "<x@MX.Example.NET>", "<x@example.org>"):
            self.assertTrue(trust.trusted(sender), sender)
        self.assertFalse(trust.trusted("<x@example.net.evil>"))

    def test_bad_regex_line(self):
        """A bad regular expression in a domains file names the file and line."""
        error = self.assertRaises(ValueError, parse_domains, "a.example\n/(/\n", "list")
        self.assertTrue(str(error).startswith("list:2: bad regular expression /(/"))


# ---------------------------------------------------------------- Stress


MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
smtp      inet  n       -       y       -       {maxproc}       smtpd
  -o smtpd_milters=inet:127.0.0.1:10025
pickup    unix  n       -       y       60      1       pickup
"""


class StressTests(LoadingTestCase):
    def test_threshold(self):
        """Stressed when the threshold is reached; a threshold of 0 is never stressed."""
        stress = Stress(10)
        self.assertFalse(stress.stressed(9))
        self.assertTrue(stress.stressed(10))
        self.assertTrue(stress.stressed(11))
        self.assertFalse(Stress(0).stressed(10000))

    def test_detected_once(self):
        """An unset threshold is detected on first use, then kept."""
        calls = []

        def detect():
            calls.append(1)
            return 3

        stress = Stress()
        self.assertTrue(stress.stressed(3, detect))
        self.assertFalse(stress.stressed(2, detect))
        self.assertEqual((calls, stress.threshold_n_connections), ([1], 3))

    def test_smtp_maxproc(self):
        """The smtp inet service's maxproc column, skipping comments and continuations."""
        self.assertEqual(smtp_maxproc(MASTER_CF.format(maxproc="20")), "20")
        self.assertEqual(smtp_maxproc(MASTER_CF.format(maxproc="-")), "-")
        self.assertIsNone(smtp_maxproc("pickup unix n - y 60 1 pickup\n"))

    def test_detect_from_master_cf(self):
        """0.75 × the smtp maxproc of master.cf."""
        path = self.write("master.cf", MASTER_CF.format(maxproc="20"))
        self.assertEqual(detect_threshold(path, run=self.no_postconf), 15)

    def test_detect_default_process_limit(self):
        """maxproc "-" takes postconf's default_process_limit (else Postfix's 100)."""
        path = self.write("master.cf", MASTER_CF.format(maxproc="-"))
        self.assertEqual(detect_threshold(path, run=self.postconf({
            "default_process_limit": "40"})), 30)
        self.assertEqual(detect_threshold(path, run=self.no_postconf), 75)

    def test_detect_config_directory(self):
        """Without a path, master.cf is read from postconf's config_directory."""
        self.write("master.cf", MASTER_CF.format(maxproc="8"))
        self.assertEqual(detect_threshold(run=self.postconf({
            "config_directory": self.directory})), 6)

    def test_detect_without_postfix(self):
        """No master.cf, or no smtp service in it: 0, never stressed."""
        missing = os.path.join(os.path.abspath(self.mktemp()), "master.cf")
        self.assertEqual(detect_threshold(missing, run=self.no_postconf), 0)
        self.assertEqual(detect_threshold(run=self.no_postconf,
                                          config_directory=os.path.dirname(missing)), 0)
        path = self.write("master.cf", "pickup unix n - y 60 1 pickup\n")
        self.assertEqual(detect_threshold(path, run=self.no_postconf), 0)

    @staticmethod
    def no_postconf(*args, **kwargs):
        raise FileNotFoundError("postconf")

    @staticmethod
    def postconf(values):
        def run(argv, **kwargs):
            value = values.get(argv[-1])
            return subprocess.CompletedProcess(argv, 0 if value else 1, (value or "") + "\n", "")
        return run


# ---------------------------------------------------------------- Restrict Accounts


class AccountsTests(unittest.SynchronousTestCase):
    def test_list_matcher(self):
        """Accounts match exactly (case-insensitively, brackets or not) or by regex."""
        restricted = accounts.list_matcher([
            accounts.check_account("Alice@Example.com"),
            re.compile(r"@sales\.example\.com\Z")])
        self.assertTrue(restricted(None, "<alice@example.COM>"))
        self.assertTrue(restricted(None, "bob@sales.example.com"))
        self.assertFalse(restricted(None, "<bob@example.com>"))

    def test_stoppers(self):
        """An unrestricted recipient is withheld and stops the child at DATA; others pass."""
        recipient, data = accounts.stoppers("R", accounts.list_matcher(["a@example.com"]))
        context = FakeContext()
        self.assertFalse(recipient(context, "<a@example.com>"))
        self.assertFalse(data(context))
        self.assertTrue(recipient(context, "<b@example.com>"))
        self.assertTrue(data(context))
        other = FakeContext(name="other")
        other.mail_transaction_shelf = context.mail_transaction_shelf
        self.assertFalse(data(other), "the note is per child")


# ---------------------------------------------------------------- the shipped files


class ShippedConditionsTests(LoadingTestCase):
    def test_conditions_defined(self):
        """The shipped files define upstream's ten built-in conditions and LDAP Policy."""
        configuration = self.load()
        self.assertEqual(sorted(configuration.conditions), sorted([
            "S25R", "Remote Network", "Authenticated", "Unauthenticated",
            "Sendmail Compatible", "Stress Notify", "No Stress", "Trust", "DNSBL Listed",
            "Not DNSBL Listed", "LDAP Policy"]))
        for condition in configuration.conditions.values():
            self.assertTrue(condition.description, condition.name)

    def test_s25r_stopper(self):
        """S25R stops for mail.example.com and not for p1234-ipad01tokyo.example.jp."""
        configuration = self.load('s25r.add_whitelist(".example.org")\n')
        stop = self.stopper(configuration, "S25R", "connect")
        self.assertTrue(stop(FakeContext(), "mail.example.com", inet("192.0.2.1")))
        self.assertFalse(stop(FakeContext(), "p1234-ipad01tokyo.example.jp", inet("192.0.2.1")))
        self.assertTrue(stop(FakeContext(), "p1234-ipad01tokyo.example.org", inet("192.0.2.1")))

    def test_remote_network_stopper(self):
        """Remote Network stops 127.0.0.1 and a custom local network, not 192.0.2.1."""
        configuration = self.load('remote_network.add_local_address("198.51.100.0/24")\n')
        stop = self.stopper(configuration, "Remote Network", "connect")
        self.assertTrue(stop(FakeContext(), "localhost", inet("127.0.0.1")))
        self.assertTrue(stop(FakeContext(), "[198.51.100.3]", inet("198.51.100.3")))
        self.assertFalse(stop(FakeContext(), "mx.example.net", inet("192.0.2.1")))

    def test_authentication(self):
        """Authenticated stops the unauthenticated at MAIL; Unauthenticated the others."""
        configuration = self.load()
        authenticated = self.stopper(configuration, "Authenticated", "envelope_from")
        unauthenticated = self.stopper(configuration, "Unauthenticated", "envelope_from")
        for macros in ({"auth_type": "PLAIN"}, {"auth_authen": "alice"}):
            self.assertFalse(authenticated(FakeContext(macros), "<a@example.com>"))
            self.assertTrue(unauthenticated(FakeContext(macros), "<a@example.com>"))
        self.assertTrue(authenticated(FakeContext(), "<a@example.com>"))
        self.assertFalse(unauthenticated(FakeContext(), "<a@example.com>"))

    def test_sendmail_compatible(self):
        """Behind Postfix: i = dummy-id at MAIL and if_addr from daemon_addr; never stops."""
        configuration = self.load()
        connect = self.stopper(configuration, "Sendmail Compatible", "connect")
        mail = self.stopper(configuration, "Sendmail Compatible", "envelope_from")
        context = FakeContext({"v": "Postfix 3.7.11", "daemon_addr": "192.0.2.25"})
        self.assertFalse(connect(context, "mx.example.net", inet("192.0.2.1")))
        self.assertFalse(mail(context, "<a@example.com>"))
        self.assertEqual((context["if_addr"], context["i"]), ("192.0.2.25", "dummy-id"))
        kept = FakeContext({"v": "Postfix", "i": "4ABC", "if_addr": "192.0.2.9",
                            "daemon_addr": "192.0.2.25"})
        connect(kept, "mx", inet("192.0.2.1"))
        mail(kept, "<a@example.com>")
        self.assertEqual((kept["if_addr"], kept["i"]), ("192.0.2.9", "4ABC"))
        sendmail = FakeContext({"v": "8.17.1"})
        connect(sendmail, "mx", inet("192.0.2.1"))
        mail(sendmail, "<a@example.com>")
        self.assertEqual(dict(sendmail), {"v": "8.17.1"})

    def test_stress(self):
        """Stress Notify sets {stress}=yes when stressed; No Stress stops then."""
        configuration = self.load("stress.threshold_n_connections = 2\n")
        notify = self.stopper(configuration, "Stress Notify", "connect")
        no_stress = self.stopper(configuration, "No Stress", "connect")
        calm, busy = FakeContext(n_processing_sessions=1), FakeContext(n_processing_sessions=2)
        self.assertFalse(notify(calm, "h", inet("192.0.2.1")))
        self.assertFalse(notify(busy, "h", inet("192.0.2.1")))
        self.assertEqual((calm["stress"], busy["stress"]), (None, "yes"))
        self.assertFalse(no_stress(calm, "h", inet("192.0.2.1")))
        self.assertTrue(no_stress(busy, "h", inet("192.0.2.1")))

    def test_trust(self):
        """Trust sets {trusted_domain}=yes for a trusted sender domain; never stops."""
        path = self.write("trusted.list", "/^example\\./\n")
        configuration = self.load(f"""\
            trust.clear()
            trust.add_envelope_from_domain("example.com")
            trust.load_envelope_from_domains({path!r})
            """)
        stop = self.stopper(configuration, "Trust", "envelope_from")
        trusted, other = FakeContext(), FakeContext()
        self.assertFalse(stop(trusted, "<a@Example.NET>"))
        self.assertFalse(stop(other, "<a@gmail.com>"))
        self.assertEqual((trusted["trusted_domain"], other["trusted_domain"]), ("yes", None))

    def test_restrict_accounts(self):
        """restrict_accounts_by_list defines a condition and adds it to the milters named."""
        configuration = self.load("""\
            define_milter("a").connection_spec = "inet:1@[127.0.0.1]"
            define_milter("b").connection_spec = "inet:2@[127.0.0.1]"
            restrict_accounts_by_list("alice@example.com", re.compile("^sales@"),
                                      condition_name="Few", milters=["b"])
            @restrict_accounts_generic(condition_name="Ours")
            def ours(context, recipient):
                return recipient.endswith("@example.com>")
            """, shipped=False)
        self.assertEqual([milter.applicable_conditions for milter in configuration.milters],
                         [["Ours"], ["Few", "Ours"]])
        few = self.stopper(configuration, "Few", "envelope_recipient")
        self.assertFalse(few(FakeContext(), "<sales@example.net>"))
        self.assertTrue(few(FakeContext(), "<bob@example.com>"))
        ours = self.stopper(configuration, "Ours", "envelope_recipient")
        self.assertFalse(ours(FakeContext(), "<bob@example.com>"))
        self.assertTrue(ours(FakeContext(), "<bob@example.net>"))

    def test_relative_domains_file(self):
        """A relative domains file is found next to the file naming it; dump writes its path."""
        self.write("trusted.list", "example.net\n")
        configuration = self.load('trust.load_envelope_from_domains("trusted.list")\n')
        self.assertIn("example.net", configuration.trust.domains)
        call, = configuration.trust.calls
        self.assertEqual(call.arguments, repr(os.path.join(self.directory, "trusted.list")))

    def test_restrict_accounts_default_name(self):
        """Without condition_name the condition is named after its accounts, as upstream."""
        configuration = self.load("""\
            define_milter("a").connection_spec = "inet:1@[127.0.0.1]"
            restrict_accounts_by_list("a@example.com", re.compile("@b\\.example$"))
            """, shipped=False)
        name = "Restrict Accounts by List: a@example.com, /@b\\.example$/"
        self.assertEqual(list(configuration.conditions), [name])
        self.assertEqual(configuration.milters[0].applicable_conditions, [name])

    def test_fresh_per_load(self):
        """Each load has its own helpers: a reload starts from the defaults again."""
        first = self.load('s25r.add_whitelist(".example.org")\ntrust.clear()\n')
        second = self.load()
        self.assertIn(".example.org", first.s25r.whitelist)
        self.assertNotIn(".example.org", second.s25r.whitelist)
        self.assertIn("gmail.com", second.trust.domains)
        self.assertIsNot(first.dnsbl, second.dnsbl)

    def test_round_trip(self):
        """--show-config's dump of the shipped files and every helper loads back the same."""
        path = self.write("trusted.list", "example.net\n")
        configuration = self.load(f"""\
            s25r.add_whitelist(".example.org")
            s25r.add_blacklist(re.compile(r"\\Abot", re.I))
            s25r.only_check_ipv4 = False
            remote_network.add_local_address("192.0.2.0/24")
            remote_network.add_remote_address("2001:db8::1")
            stress.threshold_n_connections = 12
            trust.clear()
            trust.add_envelope_from_domain("example.com")
            trust.load_envelope_from_domains({path!r})
            dnsbl.name_server = "127.0.0.1:5353"
            dnsbl.timeout = 2
            dnsbl.add_service("bl.test", "127.0.0.2/32")
            with define_milter("a") as milter:
                milter.connection_spec = "inet:1@[127.0.0.1]"
                milter.applicable_conditions = ["S25R", "DNSBL Listed"]
            restrict_accounts_by_list("alice@example.com", condition_name="Few")
            @restrict_accounts_generic(condition_name="Ours")
            def ours(context, recipient):
                return recipient.endswith("@example.com>")
            """)
        dumped = config.dump(configuration)
        self.assertIn('s25r.check_only_ipv4 = False  # ', dumped)
        self.assertIn("dnsbl.add_service('bl.test', '127.0.0.2/32')  # ", dumped)
        reloaded = config.load(self.write("dumped.conf", dumped), strict=False)
        self.assertEqual(reloaded, configuration)
        self.assertEqual(reloaded.dnsbl.services, configuration.dnsbl.services)
        self.assertEqual(reloaded.trust.domains, ["example.com", "example.net"])
        ours = self.stopper(reloaded, "Ours", "envelope_recipient")
        self.assertTrue(ours(FakeContext(), "<bob@example.net>"))


    def test_lambda_not_shown(self):
        """A helper given a lambda is dumped as a comment; the dump still loads."""
        configuration = self.load("""\
            define_milter("a").connection_spec = "inet:1@[127.0.0.1]"
            s25r.add_whitelist(lambda host: host == "a.example")
            restrict_accounts_generic(lambda context, recipient: True, condition_name="L")
            """, shipped=False)
        dumped = config.dump(configuration)
        self.assertIn("# s25r.add_whitelist(...) (", dumped)
        self.assertIn('define_applicable_condition("L")  # ', dumped)
        reloaded = config.load(self.write("dumped.conf", dumped), strict=False)
        self.assertEqual(reloaded.milters[0].applicable_conditions, ["L"])

    def test_shipped_configuration_round_trip(self):
        """etc/milter-manager.conf, conditions included, dumps to a file that loads back the same."""
        configuration = config.load(os.path.join(ROOT, "etc", "milter-manager.conf"),
                                    strict=False)
        dumped = self.write("dumped.conf", config.dump(configuration))
        self.assertEqual(config.load(dumped, strict=False), configuration)

    def test_dnsbl_resolver(self):
        """One resolver per configuration, made on first use; no IP, no lookup."""
        configuration = self.load('dnsbl.name_servers = ["127.0.0.1:5353", "[::1]:53"]\n')
        self.assertIsNone(configuration.dnsbl._resolver)
        resolver = configuration.dnsbl.resolver()
        self.assertIs(configuration.dnsbl.resolver(), resolver)
        self.assertEqual(resolver.name_servers, [("127.0.0.1", 5353), ("::1", 53)])
        for address in (UNIX, UNKNOWN):
            self.assertIs(self.successResultOf(configuration.dnsbl.listed(address)), False)
            self.assertIs(self.successResultOf(configuration.dnsbl.not_listed(address)), True)


class HelperErrorTests(LoadingTestCase):
    def assertErrors(self, text, *messages):
        """Loading text fails with these errors, each after FILE:LINE of text's lines."""
        error = self.error(text)
        path = os.path.join(self.directory, "milter-manager.conf")
        # The first line of the file loads the shipped conditions.
        self.assertEqual([str(each) for each in error.errors],
                         [f"{path}:{line + 1}: {message}" for line, message in messages])

    def test_setting_errors(self):
        """A helper's setting is checked like any other, with FILE:LINE; all are reported."""
        self.assertErrors("""\
            s25r.check_only_ipv4 = 1
            s25r.only_check_ipv4 = "yes"
            stress.threshold_n_connections = -1
            dnsbl.timeout = 0
            """,
            (1, "s25r.check_only_ipv4 must be True or False; got 1"),
            (2, "s25r.check_only_ipv4 must be True or False; got 'yes'"),
            (3, "stress.threshold_n_connections must be an integer, 0 or more (0: never "
                "stressed), or None (detect from Postfix); got -1"),
            (4, "dnsbl.timeout must be a number of seconds greater than 0; got 0"))

    def test_name_servers(self):
        """Name servers are IP addresses with an optional port; a host name is refused."""
        self.assertEqual(name_server("127.0.0.1:5353"), ("127.0.0.1", 5353))
        self.assertEqual(name_server("192.0.2.53"), ("192.0.2.53", 53))
        self.assertEqual(name_server("[::1]:5353"), ("::1", 5353))
        self.assertEqual(name_server("2001:db8::53"), ("2001:db8::53", 53))
        self.assertErrors("""\
            dnsbl.name_servers = ["dns.example.net:53"]
            dnsbl.name_server = "127.0.0.1:99999"
            dnsbl.name_servers = "127.0.0.1"
            """,
            (1, "dnsbl.name_servers: must name each name server by its IP address, as it is "
                "asked without the system's resolver; got 'dns.example.net:53' (use "
                "\"192.0.2.53:53\", not a host name)"),
            (2, "dnsbl.name_servers: has no port from 1 to 65535 in '127.0.0.1:99999'"),
            (3, "dnsbl.name_servers must be a non-empty list of \"ADDRESS:PORT\" strings "
                "(e.g. [\"127.0.0.1:53\"]); got '127.0.0.1'"))

    def test_verb_errors(self):
        """A verb's bad argument is reported at its line and loading goes on."""
        missing = os.path.join(os.path.abspath(self.mktemp()), "none.list")
        self.assertErrors(f"""\
            remote_network.add_local_address("example.com")
            s25r.add_whitelist(42)
            trust.load_envelope_from_domains({missing!r})
            dnsbl.add_service("")
            restrict_accounts_by_list(42)
            restrict_accounts_by_list("a@example.com", milters=["nope"])
            s25r.no_such_thing = 1
            """,
            (1, "remote_network.add_local_address: must be an IPv4 or IPv6 address or CIDR "
                "(\"192.168.0.0/16\", \"2001:db8::/32\"); got 'example.com'"),
            (2, "s25r.add_whitelist: must be a non-empty string, a compiled regular "
                "expression (re.compile(...)) or a function of the host name"),
            (3, f"trust.load_envelope_from_domains: cannot read {missing}: "
                "No such file or directory"),
            (4, "dnsbl.add_service: a DNSBL service needs a domain"),
            (5, "restrict_accounts_by_list: an account is an address (a non-empty string) or "
                "a compiled regular expression"),
            (6, "restrict_accounts_by_list: no milter 'nope' is defined (define it before)"),
            (7, "s25r has no setting 'no_such_thing'; known: add_blacklist, add_whitelist, "
                "check_only_ipv4, only_check_ipv4"))

    def test_bad_domains_file(self):
        """A bad regular expression in a domains file names its own FILE:LINE."""
        path = self.write("trusted.list", "ok.example\n/(/\n")
        error = self.error(f"trust.load_envelope_from_domains({path!r})\n")
        self.assertIn(f"trust.load_envelope_from_domains: {path}:2: bad regular expression",
                      str(error))

    def test_documented(self):
        """docs/conditions.md names every condition, helper setting and verb (ldap.*: docs/ldap.md)."""
        texts = {}
        for name in ("conditions", "ldap"):
            with open(os.path.join(ROOT, "docs", f"{name}.md"), encoding="utf-8") as file:
                texts[name] = file.read()
        text = texts["conditions"]
        configuration = self.load()
        for name in configuration.conditions:
            self.assertIn(f"`{name}`", text)
        for helper in configuration.helpers():
            where = texts["ldap"] if helper.SECTION == "ldap" else text
            for name in (*config.settings_of(helper), *helper.VERBS):
                self.assertIn(f"`{helper.SECTION}.{name}", where)
        for name in ("restrict_accounts_by_list", "restrict_accounts_generic",
                     "s25r.only_check_ipv4", "dnsbl.name_server"):
            self.assertIn(f"`{name}", text)


# ---------------------------------------------------------------- through the manager


def _connect(host, address):
    return Connect(host.encode(), c.FAMILY_INET, 52258, address.encode())


def _message(connect):
    return [connect, HELO, MAIL, RCPT, DATA, SUBJECT, EOH, BODY, EOM]


class ManagerTests(ScenarioTestCase, LoadingTestCase):
    """Child "one" applies a shipped condition, "two" none; the MTA always gets CONTINUE."""

    def run_with(self, configuration, condition, connect):
        """Run a message from the client of connect; return what "one" saw."""
        loaded = configuration

        def configure(configuration):
            configuration.conditions = loaded.conditions
            for milter in configuration.milters:
                milter.applicable_conditions = [condition] if milter.name == "one" else []

        self.configure = configure
        return self.run_scenario(Scenario(
            children=[Kid("one"), Kid("two")], steps=[
                (command, test_session.CONTINUE) for command in _message(connect)],
            seen={"two": ALL_SEEN}))

    def seen(self, events):
        return test_session._words(events["one"])

    @defer.inlineCallbacks
    def test_s25r(self):
        """S25R: the child is stopped for mail.example.com and runs for a dynamic name."""
        configuration = self.load()
        events = yield self.run_with(configuration, "S25R",
                                     _connect("mail.example.com", "192.0.2.1"))
        self.assertEqual(self.seen(events), "close")
        events = yield self.run_with(configuration, "S25R",
                                     _connect("p1234-ipad01tokyo.example.jp", "192.0.2.1"))
        self.assertEqual(self.seen(events), ALL_SEEN)

    @defer.inlineCallbacks
    def test_remote_network(self):
        """Remote Network: the child is stopped for 127.0.0.1 and runs for 192.0.2.1."""
        configuration = self.load()
        events = yield self.run_with(configuration, "Remote Network",
                                     _connect("localhost", "127.0.0.1"))
        self.assertEqual(self.seen(events), "close")
        events = yield self.run_with(configuration, "Remote Network",
                                     _connect("mx.example.net", "192.0.2.1"))
        self.assertEqual(self.seen(events), ALL_SEEN)

    @defer.inlineCallbacks
    def test_dnsbl_listed(self):
        """DNSBL Listed asks only the configured test server; the child runs for the listed."""
        server = TestDNSServer({
            "bl.test": [SOA(minimum=30)],
            "1.2.0.192.bl.test": [A("127.0.0.2")],
        })
        port = server.start()
        self.addCleanup(server.stop)
        configuration = self.load(f"""\
            dnsbl.clear_services()
            dnsbl.add_service("bl.test", "127.0.0.2")
            dnsbl.name_servers = ["127.0.0.1:{port}"]
            dnsbl.timeout = 3
            """)
        events = yield self.run_with(configuration, "DNSBL Listed",
                                     _connect("[192.0.2.1]", "192.0.2.1"))
        self.assertEqual(self.seen(events), ALL_SEEN)
        events = yield self.run_with(configuration, "DNSBL Listed",
                                     _connect("[192.0.2.2]", "192.0.2.2"))
        self.assertEqual(self.seen(events), "close")
        events = yield self.run_with(configuration, "Not DNSBL Listed",
                                     _connect("[192.0.2.1]", "192.0.2.1"))
        self.assertEqual(self.seen(events), "close", "cached: no second query")
        self.assertEqual([question[0] for question in server.queries],
                         ["1.2.0.192.bl.test", "2.2.0.192.bl.test"])

    @defer.inlineCallbacks
    def test_trust_macro(self):
        """Trust: a child behind it gets {trusted_domain}=yes with MAIL from a trusted domain."""
        configuration = self.load()
        loaded = configuration

        def configure(configuration):
            configuration.conditions = loaded.conditions
            for milter in configuration.milters:
                milter.applicable_conditions = ["Trust"]

        self.configure = configure
        gmail = Mail(b"<someone@gmail.com>")
        events = yield self.run_scenario(Scenario(
            children=[Kid("one")],
            steps=[(command, test_session.CONTINUE)
                   for command in (_connect("mx", "192.0.2.1"), HELO, gmail, Rcpt(b"<a@b>"))]))
        mail, = [event for event in events["one"] if event.name == "mail"]
        self.assertEqual(mail.macros.get(b"{trusted_domain}"), b"yes")

    def run_conditioned(self, steps, condition, configuration, seen=None):
        """Run steps with child "one" under condition and "two" under none."""
        loaded = configuration

        def configure(configuration):
            configuration.conditions = loaded.conditions
            for milter in configuration.milters:
                milter.applicable_conditions = [condition] if milter.name == "one" else []

        self.configure = configure
        return self.run_scenario(Scenario(children=[Kid("one"), Kid("two")], steps=steps,
                                          seen=seen or {}))

    @defer.inlineCallbacks
    def test_authenticated(self):
        """Authenticated: the child sits out an unauthenticated transaction, not an authenticated one."""
        configuration = self.load()
        CONTINUE = test_session.CONTINUE
        events = yield self.run_conditioned([
            (_connect("mx", "192.0.2.1"), CONTINUE), (HELO, CONTINUE),
            (MAIL, CONTINUE), (RCPT, CONTINUE), (test_session.ABORT, None),
            test_session.Send(MAIL, CONTINUE, macros={b"{auth_type}": b"PLAIN"}),
            (RCPT, CONTINUE)], "Authenticated", configuration)
        self.assertEqual([event.name for event in events["one"]
                          if event.name in ("mail", "rcpt")], ["mail", "rcpt"])
        mail, = [event for event in events["one"] if event.name == "mail"]
        self.assertEqual(mail.macros.get(b"{auth_type}"), b"PLAIN")

    @defer.inlineCallbacks
    def test_restrict_accounts(self):
        """Restrict Accounts: the child gets only restricted recipients, and no message with others."""
        configuration = self.load("""\
            restrict_accounts_by_list("alice@example.org", condition_name="Alice")
            """, shipped=False)
        CONTINUE = test_session.CONTINUE
        only_alice = [(command, CONTINUE) for command in _message(_connect("mx", "192.0.2.1"))]
        events = yield self.run_conditioned(only_alice, "Alice", configuration,
                                            seen={"one": ALL_SEEN, "two": ALL_SEEN})
        both = [(command, CONTINUE) for command in [
            _connect("mx", "192.0.2.1"), HELO, MAIL, RCPT, Rcpt(b"<bob@example.org>"), DATA,
            SUBJECT, EOH, BODY, EOM]]
        events = yield self.run_conditioned(both, "Alice", configuration)
        seen = test_session._words(events["one"])
        self.assertEqual(seen.split()[:3], ["connect", "helo", "mail"])
        self.assertEqual([event.command.recipient for event in events["one"]
                          if event.name == "rcpt"], [b"<alice@example.org>"])
        self.assertNotIn("header", seen)
        self.assertNotIn("eom", seen)
