"""Milter detection on this machine: Debian's opendkim, opendmarc, spamass-milter and clamav-milter.

scripts/install-test-deps installs the four packages and writes the sockets of
tests/peers/installed_milters.py into their own files (none is a package default). Detection
must find exactly those sockets; then Postfix -> `twistd -n milter-manager` on its embedded
default (detection only, no configuration file) -> the four daemons started by hand on those
sockets must carry a mail through every one of them.
"""

import json
import os
import re
import secrets
import smtplib
import subprocess
import sys
from email import message_from_bytes
from email.utils import formatdate

from twisted.trial.unittest import SynchronousTestCase

from miltermanager import detect
from tests.peers import installed_milters
from tests.peers.debian_milters import EICAR, ClamAV, OpenDMARC, SpamassMilter, Spamd
from tests.peers.fixtures import (
    HOST, REPO, TWISTD, DNSServerProcess, MiltermanagerProcess, OpenDKIM, Postfix, SendResult,
    _repo_env, _reply, sink_message, verify_dkim,
)

MILTERS = installed_milters.MILTERS
# Upstream's defaults/debian.conf (reference/upstream.md §3.1): spamass-milter runs only for
# remote, unauthenticated clients while the server is not stressed; the others for everyone.
UPSTREAM_CONDITIONS = {"opendkim": [], "clamav-milter": [],
                       "spamass-milter": ["Remote Network", "Unauthenticated", "No Stress"]}

# The SMTP client as Postfix tells the milters (XCLIENT): outside every local network, and
# inside the SPF record of harness.test; opendkim signs for it (InternalHosts).
REMOTE = "192.0.2.25"
SPOOFER = "198.51.100.7"
ZONE = """\
harness.test SOA 60
harness.test TXT "v=spf1 ip4:192.0.2.0/24 -all"
_dmarc.harness.test TXT "v=DMARC1; p=reject; pct=100"
other.test SOA 60
"""
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

MESSAGE = b"""\
From: %(from)s
To: bob@example.com
Subject: detected children
Date: %(date)s
Message-Id: <%(id)s@harness.test>

%(body)s
"""


def message(body=b"Hello through every detected milter.", sender=b"alice@harness.test"):
    return MESSAGE % {b"from": sender, b"id": secrets.token_hex(6).encode(), b"body": body,
                      b"date": formatdate().encode()}  # now: SpamAssassin scores odd dates


class EmbeddedDefaultManager(MiltermanagerProcess):
    """`twistd -n milter-manager` with no configuration file: the embedded default, whose
    detection looks under "/". Only the connection spec is given, and /etc/milter-manager (the
    default configuration directory, which a package test may fill) is an empty directory."""

    def __init__(self, tmpdir):
        super().__init__(tmpdir, "", args=["--connection-spec", "{spec}"])
        self.empty_dir = os.path.join(self.dir, "etc-milter-manager")

    @property
    def command(self):
        os.makedirs(self.empty_dir, exist_ok=True)
        prelude = ("import miltermanager.tap; "
                   f"miltermanager.tap.Options.default_config_directory = {self.empty_dir!r}; ")
        return [sys.executable, "-c", prelude + TWISTD, "-n", "--pidfile=", "milter-manager",
                *self.args]


class DetectionTests(SynchronousTestCase):
    """detect.detect() and milter-manager-detect on this machine's real files."""

    def setUp(self):
        self.report = detect.detect(platform="debian", root="/")
        self.found = {found.name: found for found in self.report.found}

    def test_four_found_on_the_configured_sockets(self):
        """Each package is found, enabled, on exactly the socket CI wrote into its file."""
        for milter in MILTERS:
            self.assertIn(milter.name, self.found, self.report)
            found = self.found[milter.name]
            self.assertEqual((found.connection_spec, found.enabled), (milter.spec, True), found)

    def test_sources_name_the_package_files(self):
        """The source of each is the file that holds its socket."""
        for milter in MILTERS:
            self.assertIn(milter.file, self.found[milter.name].source)

    def test_none_of_the_four_skipped(self):
        """No warning about any of the four: their real files are read without complaint."""
        names = {milter.name for milter in MILTERS}
        self.assertEqual([skipped for skipped in self.report.skipped if skipped.name in names], [])

    def test_upstream_default_conditions(self):
        """The applicable conditions are upstream's defaults for Debian."""
        for name, conditions in UPSTREAM_CONDITIONS.items():
            self.assertEqual(self.found[name].applicable_conditions, conditions)

    def test_stopped_milters_shown_unreachable(self):
        """With none of the four daemons running, each is found but shown unreachable, and why."""
        detect.check_reachable(self.report)
        for milter in MILTERS:
            found = self.found[milter.name]
            self.assertEqual(found.reachable, False, found)
            self.assertTrue(found.reach_error, found)

    def test_json_command_agrees(self):
        """milter-manager-detect --json reports the four exactly as the library does."""
        output = subprocess.run([sys.executable, "-m", "miltermanager.detect.main", "--json"],
                                cwd=REPO, capture_output=True, text=True, timeout=60)
        self.assertEqual((output.returncode, output.stderr), (0, ""))
        printed = {entry["name"]: entry for entry in json.loads(output.stdout)["found"]}
        expected = {entry["name"]: entry for entry in
                    detect.check_reachable(self.report).as_dict()["found"]}
        for milter in MILTERS:
            self.assertEqual(printed[milter.name], expected[milter.name])
            self.assertEqual(printed[milter.name]["connection_spec"], milter.spec)


    def test_embedded_default_defines_them(self):
        """`twistd -n milter-manager --show-config` with no configuration file defines the four
        on their sockets, each marked as detected from its file."""
        manager = EmbeddedDefaultManager(self.mktemp())
        manager.args = ["--show-config"]
        output = subprocess.run(manager.command, cwd=REPO, env=_repo_env(), capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(output.returncode, 0, output.stderr)
        blocks = {block.split('"', 1)[0]: block
                  for block in output.stdout.split('with define_milter("')[1:]}
        for milter in MILTERS:
            block = blocks[milter.name]
            spec_line = f'milter.connection_spec = "{milter.spec}"  # detected from {milter.file}\n'
            self.assertIn(spec_line, block)
            self.assertIn("milter.enabled = True", block)


class MailThroughDetectedChildrenTests(SynchronousTestCase):
    """Postfix -> the manager's embedded default -> the four daemons on the detected sockets."""

    def setUp(self):
        dns_address = f"127.53.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 1}"
        self.dns = self.start(DNSServerProcess(self.mktemp(), ZONE, address=dns_address, port=53))
        # The manager starts before the milters, as it may at boot: detection reads their files
        # and needs none of them running.
        self.manager = self.start(EmbeddedDefaultManager(self.mktemp()))
        self.signer = self.start(OpenDKIM(self.mktemp(), port=installed_milters.OPENDKIM.port,
                                          internal_hosts=f"{HOST}, {REMOTE}"))
        self.dmarc = self.start(OpenDMARC(self.mktemp(), installed_milters.OPENDMARC.written,
                                          dns_address))
        # Every daemon that might resolve a name asks the test server only (its own resolv.conf).
        spamd = self.start(Spamd(self.mktemp(), dns_address))
        self.spamass = self.start(SpamassMilter(
            self.mktemp(), installed_milters.SPAMASS_MILTER.path, spamd, dns_address))
        self.clamav = self.start(ClamAV(self.mktemp(), installed_milters.CLAMAV_MILTER.written,
                                        dns_address))
        self.postfix = self.start(Postfix(self.mktemp(), milters=[self.manager.postfix_spec],
                                          extra_main_cf={
            "smtpd_authorized_xclient_hosts": HOST,
            # Postfix relays for the made-up remote clients too.
            "mynetworks": f"127.0.0.0/8, {REMOTE}, {SPOOFER}"}))

    def start(self, peer):
        peer.start()
        self.addCleanup(peer.stop)
        return peer

    def send(self, body_message, client=REMOTE, sender="alice@harness.test"):
        """Send one message to bob@example.com as if from client; return the SendResult."""
        smtp = smtplib.SMTP(HOST, self.postfix.smtp_port, local_hostname="client.harness.test",
                            timeout=60)
        try:
            smtp.ehlo()
            if client != HOST:
                # Postfix answers XCLIENT with a new greeting and tells the milters this client.
                code, text = smtp.docmd("XCLIENT", f"ADDR={client} NAME=mail.client.test")
                self.assertEqual(code, 220, text)
                smtp.ehlo()
            result = SendResult(mail=_reply(*smtp.mail(sender)))
            result.rcpts["bob@example.com"] = _reply(*smtp.rcpt("bob@example.com"))
            try:
                result.data = _reply(*smtp.data(re.sub(rb"\r?\n", b"\r\n", body_message)))
            except smtplib.SMTPDataError as refused:
                result.data = _reply(refused.smtp_code, refused.smtp_error)
            return result
        finally:
            smtp.quit()

    def delivered(self):
        [dump] = self.postfix.wait_delivered(1)
        return sink_message(dump), message_from_bytes(sink_message(dump))

    def test_remote_mail_passes_all_four(self):
        """A mail from a remote client carries the mark of each of the four children."""
        result = self.send(message())
        self.assertTrue(result.accepted, (result, self.manager.log()))
        children = re.search(r"child milters: (.*)", self.manager.log()).group(1).split(", ")
        self.assertEqual(sorted(children), sorted(milter.name for milter in MILTERS))
        raw, delivered = self.delivered()
        self.assertTrue(verify_dkim(raw, self.signer.txt_records), raw)
        self.assertIn("dmarc=pass", " ".join(delivered.get_all("Authentication-Results", [])))
        self.assertTrue(delivered["X-Spam-Status"].startswith("No, score="), raw)
        self.assertEqual(delivered["X-Virus-Status"], "Clean")
        self.assertIn("clamav-milter", delivered["X-Virus-Scanned"])
        # Only opendmarc asked anything: the DMARC policy and the SPF record of harness.test.
        self.assertEqual(set(self.dns.queries()),
                         {("_dmarc.harness.test", "TXT"), ("harness.test", "TXT")})

    def test_running_milters_shown_reachable(self):
        """With the daemons up, detection shows each of the four reachable on its socket."""
        report = detect.check_reachable(detect.detect(platform="debian", root="/"))
        reachable = {found.name: (found.reachable, found.reach_error) for found in report.found}
        for milter in MILTERS:
            self.assertEqual(reachable[milter.name], (True, None))

    def test_local_client_skips_remote_only_children(self):
        """From 127.0.0.1 the children detected with "Remote Network" (spamass-milter, as
        upstream) do not run; opendkim and clamav-milter, detected without it, do."""
        result = self.send(message(), client=HOST)
        self.assertTrue(result.accepted, result)
        raw, delivered = self.delivered()
        self.assertIsNone(delivered["X-Spam-Status"], raw)
        self.assertTrue(verify_dkim(raw, self.signer.txt_records), raw)
        self.assertEqual(delivered["X-Virus-Status"], "Clean")
        [dmarc] = [found for found in detect.detect(platform="debian", root="/").found
                   if found.name == "opendmarc"]
        results = " ".join(delivered.get_all("Authentication-Results", []))
        self.assertEqual("dmarc=" in results, "Remote Network" not in dmarc.applicable_conditions)

    def test_each_childs_reject_reaches_the_client(self):
        """EICAR is refused by clamav-milter, GTUBE by spamass-milter, a forged From by
        opendmarc, each with its own reply."""
        eicar = self.send(message(EICAR))
        self.assertEqual(eicar.data, (550, "5.7.1 Command rejected"))
        self.assertIn("Eicar-Test-Signature", self.clamav.milter_log())
        gtube = self.send(message(GTUBE))
        self.assertEqual(gtube.data, (550, "5.7.1 Blocked by SpamAssassin"))
        forged = self.send(message(sender=b"ceo@harness.test"), client=SPOOFER,
                           sender="mallory@other.test")
        self.assertEqual(forged.data, (550, "5.7.1 rejected by DMARC policy for harness.test"))
        self.assertIn(("_dmarc.harness.test", "TXT"), self.dns.queries())
