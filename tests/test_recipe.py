"""End to end: etc/examples/s25r-dnsbl-greylist.conf with a loopback DNSBL and the greylist milter.

The shipped example runs under `twistd -n milter-manager` with its ports and name server
replaced by the test's: a tests.peers.dns process on 127.0.0.1 serving the zone dnsbl.test
(192.0.2.1 listed as 127.0.0.2) and `milter-manager-greylist --delay 1` as the child. Each
recipe case is driven by milter-test-server and by a private Postfix (XCLIENT sets the
client's name and address). No DNS query leaves loopback: the example's only name server is
replaced by the test server, Postfix runs with DNS lookups off, and strace, attached to the
manager and the greylist milter, shows every address they connect or send to is loopback.
"""

import ipaddress
import os
import re
import smtplib
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from miltermanager import config
from miltermanager.merge import Status
from tests.peers.fixtures import (
    HOST, REPO, DNSServerProcess, GreylistMilter, MiltermanagerProcess, Postfix, SendResult,
    _reply, _stop_process, sink_message,
)

EXAMPLE = os.path.join(REPO, "etc", "examples", "s25r-dnsbl-greylist.conf")
CONDITIONS = os.path.join(REPO, "etc", "applicable-conditions")
ZONE = """\
dnsbl.test SOA 60
1.2.0.192.dnsbl.test 300 A 127.0.0.2
1.2.0.192.dnsbl.test 300 TXT "listed for the recipe test"
"""
DELAY = 1

STATIC = ("mail.example.com", "192.0.2.1")            # a proper name: S25R stops the child
DYNAMIC = ("dhcp-192-0-2-2.example.net", "192.0.2.2")  # dynamic-looking, not listed
LISTED = ("dhcp-192-0-2-1.example.net", "192.0.2.1")   # dynamic-looking and listed
GREYLISTED = "451 4.7.1 Greylisted, please try again in"

MESSAGE = b"""\
From: alice@harness.test
To: bob@example.com
Subject: recipe
Date: Wed, 25 Nov 2026 10:00:00 +0000
Message-Id: <recipe@harness.test>

Greylist only suspicious clients.
"""


def recipe_config(name_server, greylist_spec):
    """The example's text with the test's ports, name server and DNSBL zone.

    Each replaced line must be in the example exactly once, so that a change to the example
    fails here rather than testing something else.
    """
    with open(EXAMPLE) as example:
        text = example.read()
    replacements = [
        (r'^manager\.connection_spec = "inet:10025@\[127\.0\.0\.1\]"$',
         'manager.connection_spec = "{spec}"'),
        (r'^    milter\.connection_spec = "inet:10030@\[127\.0\.0\.1\]"$',
         f'    milter.connection_spec = "{greylist_spec}"'),
        (r'^dnsbl\.name_servers = \["127\.0\.0\.1:53"\]$',
         f'dnsbl.name_servers = ["{name_server}"]'),
        (r'^# dnsbl\.add_service\("zen\.spamhaus\.org", .*$',
         'dnsbl.add_service("dnsbl.test", "127.0.0.2/32")'),
    ]
    for pattern, replacement in replacements:
        text, count = re.subn(pattern, lambda _: replacement, text, flags=re.M)
        if count != 1:
            raise AssertionError(f"{pattern!r} matched {count} lines of {EXAMPLE}")
    return text


class NetworkTrace:
    """strace attached to running processes, recording where their sockets connect and send.

    It proves that the processes reach loopback only: every address in a connect, sendto,
    sendmsg or sendmmsg they make is 127.0.0.0/8 or ::1.
    """

    _ADDRESS = re.compile(r'sin_port=htons\((\d+)\), sin_addr=inet_addr\("([^"]+)"\)'
                          r'|sin6_port=htons\((\d+)\).*?inet_pton\(AF_INET6, "([^"]+)"')

    def __init__(self, tmpdir, pids):
        self.dir = os.path.realpath(tmpdir)
        self.pids = list(pids)
        self.path = os.path.join(self.dir, "strace.out")
        self.process = None

    def start(self, timeout=10):
        """Attach to every thread of the processes; return once strace says so."""
        os.makedirs(self.dir, exist_ok=True)
        err_path = os.path.join(self.dir, "strace.err")
        pids = [arg for pid in self.pids for arg in ("-p", str(pid))]
        with open(err_path, "wb") as err:
            self.process = subprocess.Popen(
                ["strace", "-f", "-e", "trace=connect,sendto,sendmsg,sendmmsg", "-e", "signal=none",
                 "-o", self.path, *pids], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            with open(err_path) as err:
                text = err.read()
            if all(f"Process {pid} attached" in text for pid in self.pids):
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"strace did not attach:\n{text}")
            time.sleep(0.02)

    def stop(self):
        """Detach (strace flushes its output and exits on SIGTERM)."""
        _stop_process(self.process)

    def destinations(self):
        """Stop tracing; return the (address, port) of every connect and send, in order."""
        self.stop()
        with open(self.path) as trace:
            return [(match[2] or match[4], int(match[1] or match[3]))
                    for match in self._ADDRESS.finditer(trace.read())]


class RecipeHarness:
    """The DNS server, the greylist milter and the manager running the example."""

    def start_recipe(self):
        self.dns = DNSServerProcess(self.mktemp(), ZONE)
        self.dns.start()
        self.addCleanup(self.dns.stop)
        self.greylist = GreylistMilter(self.mktemp(), DELAY)
        self.greylist.start()
        self.addCleanup(self.greylist.stop)
        self.manager = MiltermanagerProcess(
            self.mktemp(), recipe_config(self.dns.name_server, self.greylist.spec))
        # The example loads applicable-conditions/*.conf from its own directory first.
        os.makedirs(self.manager.dir)
        os.symlink(CONDITIONS, os.path.join(self.manager.dir, "applicable-conditions"))
        self.manager.start()
        self.addCleanup(self.manager.stop)
        self.trace = NetworkTrace(self.mktemp(), [self.manager.process.pid,
                                                  self.greylist.process.pid])
        self.trace.start()
        self.addCleanup(self.trace.stop)

    def greylist_decisions(self, address):
        """The greylist milter's decision lines for the /24 of address."""
        network = address.rpartition(".")[0] + ".0/24"
        return [line for line in self.greylist.log().splitlines()
                if "[greylist][" in line and network in line]

    def assert_dns_queries(self, expected):
        """The test DNS server received exactly these questions, one datagram each from the
        manager, and the manager and the greylist milter connected and sent to loopback only."""
        self.assertEqual(self.dns.queries(), expected)
        destinations = self.trace.destinations()
        self.assertEqual([(address, port) for address, port in destinations
                          if not ipaddress.ip_address(address).is_loopback], [])
        self.assertNotIn(53, [port for _, port in destinations])
        sent_to_dns = [destination for destination in destinations
                       if destination == (HOST, self.dns.port)]
        self.assertEqual(len(sent_to_dns), len(expected), destinations)


class ExampleTests(SynchronousTestCase):
    """The example as shipped, loaded with the conditions from the configuration directory."""

    def test_loads_as_documented(self):
        """The child runs under S25R and DNSBL Listed, fails open, and no blocklist is asked yet."""
        configuration = config.load(EXAMPLE, load_paths=[os.path.join(REPO, "etc")], strict=False)
        self.assertEqual(configuration.manager.connection_spec, "inet:10025@[127.0.0.1]")
        [greylist] = configuration.milters
        self.assertEqual((greylist.name, greylist.connection_spec, greylist.applicable_conditions,
                          greylist.fallback_status),
                         ("greylist", "inet:10030@[127.0.0.1]", ["S25R", "DNSBL Listed"],
                          Status.ACCEPT))
        self.assertEqual(configuration.dnsbl.name_servers, ["127.0.0.1:53"])
        self.assertEqual(configuration.dnsbl.services, [])


def milter_test_server(spec, name, address):
    """Run milter-test-server (this interpreter's) for one message from name/address; its output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-m", "miltermanager.tools.test_server", "-s", spec,
         "--connect-host", name, "--connect-address", f"inet:40000@[{address}]",
         "-f", "alice@harness.test", "-r", "bob@example.com", "--output-message"],
        capture_output=True, text=True, timeout=60, check=True, env=env).stdout


class MilterTestServerTests(RecipeHarness, SynchronousTestCase):
    """The recipe driven by milter-test-server against the manager."""

    def setUp(self):
        self.start_recipe()

    def run_client(self, client):
        return milter_test_server(self.manager.spec, *client)

    def test_static_name_not_greylisted(self):
        """A client with a proper name passes without greylisting and costs no DNS query."""
        output = self.run_client(STATIC)
        self.assertTrue(output.startswith("status: accept\n"), output)
        self.assertNotIn("X-Greylist", output)
        # S25R is asked first and stops the child: DNSBL Listed is never asked.
        self.assert_dns_queries([])
        self.assertEqual(self.greylist_decisions(STATIC[1]), [])

    def test_dynamic_unlisted_not_greylisted(self):
        """A dynamic-looking client no DNSBL lists passes without greylisting."""
        output = self.run_client(DYNAMIC)
        self.assertTrue(output.startswith("status: accept\n"), output)
        self.assertNotIn("X-Greylist", output)
        self.assert_dns_queries([("2.2.0.192.dnsbl.test", "A")])
        self.assertEqual(self.greylist_decisions(DYNAMIC[1]), [])

    def test_dynamic_listed_greylisted_then_passes(self):
        """A dynamic-looking listed client gets 451, then passes with X-Greylist after the delay."""
        first = self.run_client(LISTED)
        self.assertTrue(first.startswith(
            "status: temporary-failure [451]<4.7.1>(Greylisted, please try again in 1 seconds)\n"),
            first)
        time.sleep(DELAY + 0.2)
        retry = self.run_client(LISTED)
        self.assertTrue(retry.startswith("status: pass\n"), retry)
        self.assertRegex(retry,
                         r"\n\+ X-Greylist: delayed 1 seconds by milter-manager-greylist at ")
        # The retry's lookup is answered from the manager's cache (TTL 300).
        self.assert_dns_queries([("1.2.0.192.dnsbl.test", "A")])
        decisions = self.greylist_decisions(LISTED[1])
        self.assertEqual(len(decisions), 2, decisions)
        self.assertIn("[greylist][greylisted]", decisions[0])
        self.assertIn("[greylist][pass]", decisions[1])


def send_as(postfix, name, address, message=MESSAGE, recipient="bob@example.com"):
    """One SMTP transaction whose client name and address XCLIENT sets; a SendResult."""
    message = re.sub(rb"\r?\n", b"\r\n", message)
    client = smtplib.SMTP(HOST, postfix.smtp_port, local_hostname="client.harness.test",
                          timeout=60)
    try:
        client.ehlo()
        # Postfix answers XCLIENT with a new greeting: the session starts over as that client.
        code, text = client.docmd("XCLIENT", f"NAME={name} ADDR={address}")
        if code != 220:
            raise AssertionError(f"XCLIENT refused: {code} {text!r}")
        ehlo = _reply(*client.ehlo())
        result = SendResult(ehlo=ehlo, mail=_reply(*client.mail("alice@harness.test")))
        if result.mail[0] != 250:
            return result
        result.rcpts[recipient] = _reply(*client.rcpt(recipient))
        if result.rcpts[recipient][0] == 250:
            try:
                result.data = _reply(*client.data(message))
            except smtplib.SMTPDataError as refused:
                result.data = _reply(refused.smtp_code, refused.smtp_error)
        return result
    finally:
        try:
            client.quit()
        except smtplib.SMTPException:
            client.close()


class PostfixTests(RecipeHarness, SynchronousTestCase):
    """The recipe behind a real Postfix, the client set with XCLIENT."""

    def setUp(self):
        self.start_recipe()
        self.postfix = Postfix(self.mktemp(), milters=[self.manager.postfix_spec],
                               extra_main_cf={"smtpd_authorized_xclient_hosts": "127.0.0.0/8",
                                              # bob@example.com is ours: an MX's inbound mail.
                                              "relay_domains": "example.com"})
        self.postfix.start()
        self.addCleanup(self.postfix.stop)

    def assert_delivered_without_greylisting(self, client):
        result = send_as(self.postfix, *client)
        self.assertEqual(result.rcpts["bob@example.com"][0], 250, result)
        self.assertTrue(result.accepted, result)
        [delivered] = self.postfix.wait_delivered(1)
        self.assertNotIn(b"X-Greylist:", sink_message(delivered))
        # Postfix's Received: names the client XCLIENT gave.
        self.assertIn(f"({client[0]} [{client[1]}])".encode(), delivered)
        self.assertEqual(self.greylist_decisions(client[1]), [])

    def test_static_name_delivered(self):
        """Through Postfix, a client with a proper name is delivered at once, without X-Greylist."""
        self.assert_delivered_without_greylisting(STATIC)
        self.assert_dns_queries([])

    def test_dynamic_unlisted_delivered(self):
        """Through Postfix, a dynamic-looking unlisted client is delivered at once."""
        self.assert_delivered_without_greylisting(DYNAMIC)
        self.assert_dns_queries([("2.2.0.192.dnsbl.test", "A")])

    def test_dynamic_listed_deferred_then_delivered(self):
        """Through Postfix, a dynamic-looking listed client gets 451 at RCPT, 250 after the delay."""
        first = send_as(self.postfix, *LISTED)
        code, text = first.rcpts["bob@example.com"]
        self.assertEqual(f"{code} {text}", f"{GREYLISTED} 1 seconds")
        self.assertIsNone(first.data)
        time.sleep(DELAY + 0.2)
        retry = send_as(self.postfix, *LISTED)
        self.assertEqual(retry.rcpts["bob@example.com"][0], 250, retry)
        self.assertTrue(retry.accepted, retry)
        [delivered] = self.postfix.wait_delivered(1)
        message = sink_message(delivered)
        self.assertIn(f"({LISTED[0]} [{LISTED[1]}])".encode(), message)
        self.assertRegex(message, rb"\r\nX-Greylist: delayed 1 seconds by milter-manager-greylist"
                                  rb" at mta\.harness\.test; ")
        self.assert_dns_queries([("1.2.0.192.dnsbl.test", "A")])
