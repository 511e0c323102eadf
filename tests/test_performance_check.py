"""Tests for milter-performance-check: options, mails, the report, SMTP sessions, Postfix runs."""

import csv
import os
import re
import subprocess
import sys

import twisted
from twisted.cred import checkers, credentials, portal
from twisted.internet import defer, reactor, ssl
from twisted.mail import imap4, smtp
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from miltermanager.tools import performance_check as pc
from tests.peers.fixtures import REPO, LibmilterMilter, Postfix

SERVER_PEM = os.path.join(os.path.dirname(twisted.__file__), "test", "server.pem")


def run_tool(*argv, timeout=60):
    """Run this checkout's milter-performance-check; the CompletedProcess (text)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [REPO, *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "miltermanager.tools.performance_check",
                           *argv], capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def report_fields(text):
    """{label: number} of the final report's "Label: number" lines (after the table)."""
    text = text[text.index("Total:"):]
    return {label.strip(): float(value) for label, value in
            re.findall(r"^\s*([A-Za-z0-9 ]+):\s+(\d+(?:\.\d+)?)", text, re.M)}


def assert_consistent(case, fields):
    """Counts add up, percentiles are ordered and within min and max."""
    statuses = ("Temporary failure", "Reject", "Error", "Success")
    case.assertEqual(fields["N mails"], sum(fields[name] for name in statuses))
    case.assertLessEqual(fields["Min"], fields["p50"])
    case.assertLessEqual(fields["p50"], fields["p90"])
    case.assertLessEqual(fields["p90"], fields["p99"])
    case.assertLessEqual(fields["p99"], fields["Max"])
    case.assertLessEqual(fields["Min"], fields["Average"])
    case.assertLessEqual(fields["Average"], fields["Max"])
    case.assertGreater(fields["Elapsed time"], 0)
    # Elapsed time is printed to 0.01 s.
    n_mails, elapsed = fields["N mails"], fields["Elapsed time"]
    case.assertTrue(n_mails / (elapsed + 0.006) <= fields["Throughput"]
                    <= n_mails / max(elapsed - 0.006, 1e-3), fields)


# ------------------------------------------------------------------ options


class OptionTests(SynchronousTestCase):
    """Command-line parsing: upstream's options and defaults, errors as one line."""

    def test_defaults(self):
        """Without options: upstream's code defaults (one connection, 100 mails, port 25)."""
        settings = pc.parse_options([])
        self.assertEqual((settings.server, settings.port, settings.helo),
                         ("localhost", 25, "localhost.localdomain"))
        self.assertEqual((settings.senders, settings.recipients),
                         (["from@example.com"], ["to@example.com"]))
        self.assertEqual((settings.n_mails, settings.concurrency, settings.n_workers),
                         (100, 1, 1))
        self.assertEqual((settings.reading_timeout, settings.starttls), (60.0, "auto"))
        self.assertIsNone(settings.report_interval)

    def test_periods(self):
        """Periods take upstream's units; --flood without a value floods until interrupted."""
        self.assertEqual([pc.parse_period(text) for text in ("5", "5s", "2m", "1.5h", "3sec")],
                         [5.0, 5.0, 120.0, 5400.0, 3.0])
        self.assertEqual(pc.parse_options(["--flood"]).flood, "endless")
        self.assertEqual(pc.parse_options(["--flood=2m"]).flood, 120.0)
        self.assertEqual(pc.parse_options(["--report-periodically"]).report_interval, 1.0)
        self.assertEqual(pc.parse_options(["--report-interval", "0.5"]).report_interval, 0.5)

    def test_bad_options(self):
        """Bad values and conflicting options raise UsageError naming the option."""
        for argv, text in [
                (["--n-mails", "0"], "--n-mails"),
                (["--smtp-port", "70000"], "--smtp-port"),
                (["--period", "5", "--interval", "1"], "not allowed with"),
                (["--flood", "--interval", "1"], "not allowed with"),
                (["--interval", "soon"], "invalid period"),
                (["--auth-mechanism", "digest-md5"], "invalid choice"),
                (["/nonexistent/mails"], "no such file"),
                (["--auth-password", "x"], "--auth-user")]:
            with self.assertRaises(pc.UsageError) as raised:
                pc.parse_options(argv)
            self.assertIn(text, str(raised.exception), argv)

    def test_auth_map(self):
        """--auth-map reads SERVER:PORT USER:PASSWORD lines; a bad line names file and line."""
        path = self.mktemp()
        with open(path, "w") as out:
            out.write("# comment\nmx.example.com:25 alice:pass:word\n127.0.0.1:smtp bob:x\n")
        self.assertEqual(pc.parse_options(["--auth-map", path]).auth_map,
                         {("mx.example.com", 25): ("alice", "pass:word"),
                          ("127.0.0.1", 25): ("bob", "x")})
        with open(path, "a") as out:
            out.write("garbage\n")
        with self.assertRaises(pc.UsageError) as raised:
            pc.parse_options(["--auth-map", path])
        self.assertIn(f"{path}:4", str(raised.exception))

    def test_command_line_errors(self):
        """The command exits 1 with one line on stderr for a bad option or no server."""
        bad = run_tool("--n-concurrent-connections", "x")
        self.assertEqual((bad.returncode, bad.stdout), (1, ""))
        self.assertEqual(bad.stderr, "milter-performance-check: argument "
                                     "--n-concurrent-connections: not a whole number: 'x'\n")
        down = run_tool("--smtp-server", "127.0.0.1", "--smtp-port", "1", "--n-mails", "50",
                        "--n-concurrent-connections", "5")
        self.assertEqual((down.returncode, down.stdout), (1, ""))
        self.assertRegex(down.stderr, r"\Amilter-performance-check: cannot connect to "
                                      r"127\.0\.0\.1:1: .*refused[^\n]*\n\Z")


class ManualPageTests(SynchronousTestCase):
    """milter-performance-check(1), made as debian/rules makes it, has every option."""

    def test_every_option(self):
        """Every option of build_parser() is on the page, and man finds nothing to warn about."""
        from tests import test_manpages

        with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as file:
            setup = file.read()
        line = '"milter-performance-check = miltermanager.tools.performance_check:main",'
        if line not in setup:  # until setup.py installs the command
            setup = setup.replace('"console_scripts": [', '"console_scripts": [\n' + line, 1)
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        with open(os.path.join(work, "setup.py"), "w", encoding="utf-8") as file:
            file.write(setup)
        status, output = test_manpages.make_pages("--setup", os.path.join(work, "setup.py"),
                                                  os.path.join(work, "man"))
        self.assertEqual(status, 0, output)
        page = os.path.join(work, "man", "milter-performance-check.1")
        shown = test_manpages.render(page)
        self.assertEqual(shown.returncode, 0, shown.stderr)
        options = test_manpages.option_names(pc.build_parser())
        self.assertIn("--report-interval", options)
        self.assertNotIn("--worker", options)
        self.assertEqual([option for option in options
                          if not test_manpages.mentions(shown.stdout, option)], [])
        checked = test_manpages.render(page, warnings=True)
        self.assertEqual((checked.returncode, checked.stderr), (0, ""))


# ------------------------------------------------------------------ mails and report


class MailTests(SynchronousTestCase):
    """The mails sent: envelope from the file or the options, data as SMTP wants it."""

    def test_envelope_from_file(self):
        """The first Received names the EHLO host, From the sender, To and Cc the recipients."""
        source = (b"Received: from relay.example.net (relay [192.0.2.1])\n\tby mx; now\n"
                  b"Received: from other.example\n"
                  b"From: Alice <alice@example.com>\nTo: bob@example.org,\n Carol <carol@x.test>"
                  b"\nCc: dave@x.test (Dave)\nSubject: s\n\nTo: not@header.test\n")
        self.assertEqual(pc.parse_mail_source(source),
                         ("relay.example.net", "alice@example.com",
                          ["bob@example.org", "carol@x.test", "dave@x.test"]))
        self.assertEqual(pc.parse_mail_source(b"Subject: none\n\nbody\n"), (None, None, None))

    def test_data(self):
        """Line ends become CRLF, leading dots are doubled, the "." line ends the data."""
        self.assertEqual(pc.dot_stuff(pc.to_crlf(b".a\n.\nb\r\nc")),
                         b"..a\r\n..\r\nb\r\nc\r\n.\r\n")

    def test_generated_mail(self):
        """The generated mail takes --from in turn, --n-additional-lines, a fresh Message-Id."""
        settings = pc.parse_options(["--from", "a@x.test", "--from", "b@x.test",
                                     "--recipient", "r@y.test", "--n-additional-lines", "3",
                                     "--n-mails", "3"])
        source = pc.MailSource(settings)
        self.assertEqual(source.order(), [None, None, None])
        mails = [source.mail(None) for _ in range(3)]
        self.assertEqual([mail.sender for mail in mails], ["a@x.test", "b@x.test", "a@x.test"])
        self.assertEqual(mails[0].recipients, ["r@y.test"])
        self.assertEqual(mails[0].data.count(pc.ADDITIONAL_LINE), 3)
        self.assertTrue(mails[0].data.endswith(b"\r\n.\r\n"))
        ids = {re.search(rb"Message-Id: (.*)\r", mail.data).group(1) for mail in mails}
        self.assertEqual(len(ids), 3)

    def test_files_and_forced_envelope(self):
        """Several files are each sent once; --force-from/--force-recipient override them."""
        directory = self.mktemp()
        os.makedirs(os.path.join(directory, "sub"))
        for name in ("b.eml", "a.eml", "sub/c.eml"):
            with open(os.path.join(directory, name), "wb") as out:
                out.write(b"From: f@x.test\nTo: t@x.test\n\nbody\n")
        settings = pc.parse_options([directory, "--n-mails", "9", "--force-from", "ff@x.test",
                                     "--force-recipient", "fr@x.test"])
        source = pc.MailSource(settings)
        self.assertEqual([os.path.relpath(path, directory) for path in source.order()],
                         ["a.eml", "b.eml", "sub/c.eml"])
        mail = source.mail(source.paths[0])
        self.assertEqual((mail.sender, mail.recipients), ("ff@x.test", ["fr@x.test"]))


class StatisticsTests(SynchronousTestCase):
    """The final report: upstream's blocks with percentiles and a Success line."""

    def test_report(self):
        """Counts, per-mail times and percentiles of known results."""
        statistics = pc.Statistics(100.0)
        for number in range(1, 101):
            status = ("reject" if number % 10 == 0 else
                      "temporary-failure" if number % 25 == 1 else "success")
            statistics.update(pc.Result(
                "mail/%d" % number if number <= 12 else None, status,
                None if status == "success" else f"5xx {number}", 0.0, number / 1000, 10))
        statistics.finish(110.0)
        text = statistics.format(cpu_time=1.5)
        fields = report_fields(text)
        self.assertEqual(fields["N mails"], 100)
        self.assertEqual((fields["Reject"], fields["Temporary failure"], fields["Success"]),
                         (10, 4, 86))
        self.assertEqual((fields["p50"], fields["p90"], fields["p99"], fields["Max"]),
                         (0.05, 0.09, 0.099, 0.1))
        self.assertEqual((fields["Throughput"], fields["CPU time"]), (10.0, 1.5))
        self.assertTrue(text.startswith(" 0.01 (sec): mail/12\n 0.01 (sec): mail/11\n"), text)
        self.assertIn("\nRejected mails:\nmail/10\n\nTemporary failed mails:\nmail/1\n", text)
        self.assertIn("\n            Reject:  10 ( 10.00%)\n", text)
        responses = statistics.format_responses()
        self.assertTrue(responses.startswith("Temporary failures:\n  1 5xx 1\n  2 5xx 26\n"))
        self.assertIn("Rejects:\n   1 5xx 10\n", responses)

    def test_empty(self):
        """No mail at all: zeros, no division by zero."""
        statistics = pc.Statistics(5.0)
        statistics.finish(5.0)
        fields = report_fields(statistics.format())
        self.assertEqual((fields["N mails"], fields["Success"], fields["p99"]), (0, 0, 0))


# ------------------------------------------------------------------ SMTP sessions


@implementer(smtp.IMessage)
class _Message:
    def __init__(self, store):
        self.store = store
        self.lines = []

    def lineReceived(self, line):
        self.lines.append(line)

    def eomReceived(self):
        self.store.append(b"\n".join(self.lines))
        return defer.succeed(b"stored")

    def connectionLost(self):
        self.lines = []


@implementer(smtp.IMessageDelivery)
class _Delivery:
    def __init__(self, store, user):
        self.store = store
        self.user = user

    def receivedHeader(self, helo, origin, recipients):
        return b"Received: from " + helo[0] + b" by twisted.mail for " + self.user

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        if user.dest.local == b"reject":
            raise smtp.SMTPBadRcpt(user)
        return lambda: _Message(self.store)


@implementer(portal.IRealm)
class _Realm:
    def __init__(self, store):
        self.store = store

    def requestAvatar(self, avatar_id, mind, *interfaces):
        if avatar_id is checkers.ANONYMOUS:
            raise smtp.SMTPBadSender("", 530, "Authentication required")
        return smtp.IMessageDelivery, _Delivery(self.store, avatar_id), lambda: None


class _AuthFactory(smtp.SMTPFactory):
    """twisted.mail's ESMTP server: AUTH PLAIN, LOGIN and CRAM-MD5, STARTTLS with a test key."""

    protocol = smtp.ESMTP

    def __init__(self, portal_, tls):
        super().__init__(portal_)
        self.tls = tls

    def buildProtocol(self, addr):
        proto = super().buildProtocol(addr)
        proto.challengers = {b"PLAIN": imap4.PLAINCredentials, b"LOGIN": smtp.LOGINCredentials,
                             b"CRAM-MD5": credentials.CramMD5Credentials}
        proto.ctx = self.tls
        return proto


class SessionTests(TestCase):
    """Sessions against twisted.mail's ESMTP server: AUTH mechanisms, STARTTLS, refusals."""

    def setUp(self):
        self.store = []
        checker = checkers.InMemoryUsernamePasswordDatabaseDontUse(alice=b"s3cret")
        with open(SERVER_PEM, "rb") as pem:
            tls = ssl.PrivateCertificate.loadPEM(pem.read()).options()
        realm = _Realm(self.store)
        factory = _AuthFactory(portal.Portal(realm, [checker, checkers.AllowAnonymousAccess()]),
                               tls)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def send(self, *argv, to="bob@example.org"):
        settings = pc.parse_options(["--smtp-server", "127.0.0.1", "--smtp-port",
                                     str(self.port.getHost().port), "--recipient", to,
                                     "--reading-timeout", "10", *argv])
        mail = pc.MailSource(settings).mail(None)
        return defer.ensureDeferred(pc.send_mail(reactor, settings, mail))

    @defer.inlineCallbacks
    def test_mechanisms(self):
        """Each mechanism logs in; auto picks CRAM-MD5 first; the mail arrives whole."""
        for mechanism in ("plain", "login", "cram_md5", "auto"):
            result = yield self.send("--auth-user", "alice", "--auth-password", "s3cret",
                                     "--auth-mechanism", mechanism, "--starttls", "disable")
            self.assertEqual((result.status, result.message), ("success", None), mechanism)
        self.assertEqual(len(self.store), 4)
        self.assertIn(b"This is a test mail.", self.store[0])
        self.assertTrue(self.store[0].startswith(b"Received: from localhost.localdomain"))

    @defer.inlineCallbacks
    def test_refusals(self):
        """A wrong password is an error; no login is a 5XX reject; so is a refused recipient."""
        result = yield self.send("--auth-user", "alice", "--auth-password", "wrong",
                                 "--starttls", "disable")
        self.assertEqual(result.status, "error")
        self.assertIn("authentication failed: 535", result.message)
        result = yield self.send("--starttls", "disable")
        self.assertEqual(result.status, "reject")
        self.assertIn("530", result.message)
        result = yield self.send("--auth-user", "alice", "--auth-password", "s3cret",
                                 "--starttls", "disable", to="reject@example.org")
        self.assertEqual((result.status, result.message[:3]), ("reject", "550"))
        self.assertEqual(self.store, [])

    @defer.inlineCallbacks
    def test_starttls(self):
        """auto and always take STARTTLS when offered; the mail goes over TLS."""
        for how in ("auto", "always"):
            result = yield self.send("--auth-user", "alice", "--auth-password", "s3cret",
                                     "--starttls", how)
            self.assertEqual(result.status, "success", result.message)
        self.assertEqual(len(self.store), 2)

    @defer.inlineCallbacks
    def test_auth_map(self):
        """--auth-map gives the user for this server and port."""
        path = self.mktemp()
        with open(path, "w") as out:
            out.write(f"127.0.0.1:{self.port.getHost().port} alice:s3cret\n")
        result = yield self.send("--auth-map", path, "--starttls", "disable")
        self.assertEqual(result.status, "success", result.message)


# ------------------------------------------------------------------ against Postfix


class PostfixTests(TestCase):
    """Whole runs against a private Postfix (DNS off, 127.0.0.1), with and without a milter."""

    def start_postfix(self, milters=(), **extra):
        postfix = Postfix(self.mktemp(), milters=milters, extra_main_cf=extra)
        postfix.start()
        self.addCleanup(postfix.stop)
        return postfix

    def test_without_milter(self):
        """20 mails on 4 connections all arrive; progress, periodic table and CSV data too."""
        postfix = self.start_postfix()
        data = os.path.abspath(self.mktemp())
        run = run_tool("--smtp-server", "127.0.0.1", "--smtp-port", str(postfix.smtp_port),
                       "--n-mails", "20", "--n-concurrent-connections", "4",
                       "--interval", "0.04", "--recipient", "bob@example.org",
                       "--progress", "--report-interval", "0.25",
                       "--report-statistics-data", data)
        self.assertEqual(run.returncode, 0, run.stderr)
        fields = report_fields(run.stdout)
        assert_consistent(self, fields)
        self.assertEqual((fields["N mails"], fields["Success"]), (20, 20))
        self.assertEqual(len(postfix.wait_delivered(20)), 20)

        table = run.stdout[:run.stdout.index("\nTotal:")].strip().splitlines()
        self.assertEqual(table[0].split(), ["Time", "Sent", "mails/s", "Max(s)", "Min(s)",
                                            "Avg(s)", "4XX", "5XX", "Error", "p99(s)"])
        self.assertGreaterEqual(len(table), 3)
        self.assertEqual(sum(int(row.split()[1]) for row in table[1:]), 20)
        progress = run.stderr.splitlines()
        self.assertGreaterEqual(len(progress), 2)
        self.assertEqual(progress[-1].split(",")[0], "milter-performance-check: 20/20 mails")
        with open(data, newline="") as rows:
            rows = list(csv.reader(rows))
        self.assertEqual(rows[0], ["wall clock time", "response time", "message size"])
        self.assertEqual(len(rows), 21)
        self.assertTrue(all(float(row[1]) <= fields["Max"] + 1e-4 for row in rows[1:]))

        workers = run_tool("--smtp-server", "127.0.0.1", "--smtp-port", str(postfix.smtp_port),
                           "--n-mails", "4", "--n-workers", "2", "--no-progress")
        self.assertEqual(workers.returncode, 0, workers.stderr)
        fields = report_fields(workers.stdout)
        assert_consistent(self, fields)
        self.assertEqual((fields["N mails"], fields["Success"]), (8, 8))
        self.assertEqual(len(postfix.wait_delivered(28)), 28)

    def test_with_rejecting_milter(self):
        """A milter that rejects and tempfails some mail: the report's counts match Postfix's."""
        milter = LibmilterMilter(self.mktemp(), "m1", "--reject-subject", "spam")
        milter.start()
        self.addCleanup(milter.stop)
        postfix = self.start_postfix([milter.postfix_spec],
                                     smtpd_authorized_xclient_hosts="127.0.0.1")
        mails = os.path.abspath(self.mktemp())
        os.makedirs(mails)
        for name, to, subject in [("ok1", "bob@example.org", "hello"),
                                  ("ok2", "carol@example.org", "hi"),
                                  ("rcpt-reject", "reject@example.org", "hi"),
                                  ("rcpt-tempfail", "tempfail@example.org", "hi"),
                                  ("spam", "bob@example.org", "cheap spam")]:
            with open(os.path.join(mails, name + ".eml"), "wb") as out:
                out.write(f"From: Alice <alice@example.com>\nTo: {to}\nSubject: {subject}\n\n"
                          f"body of {name}\n.dot line\n".encode())
        run = run_tool("--smtp-server", "127.0.0.1", "--smtp-port", str(postfix.smtp_port),
                       "--n-concurrent-connections", "3", "--connect-host", "client.x.test",
                       "--connect-address", "127.0.0.9", "--report-failure-responses", mails)
        self.assertEqual(run.returncode, 0, run.stderr)
        fields = report_fields(run.stdout)
        assert_consistent(self, fields)
        self.assertEqual((fields["N mails"], fields["Success"], fields["Reject"],
                          fields["Temporary failure"], fields["Error"]), (5, 2, 2, 1, 0))
        rejected = run.stdout.split("Rejected mails:\n")[1].split("\n\n")[0].splitlines()
        self.assertEqual(sorted(os.path.basename(path) for path in rejected),
                         ["rcpt-reject.eml", "spam.eml"])
        self.assertIn("Temporary failed mails:\n" + os.path.join(mails, "rcpt-tempfail.eml"),
                      run.stdout)
        self.assertIn("554 5.7.1 m1 rejected subject", run.stdout)
        self.assertIn("451 4.7.1 m1 tempfail recipient", run.stdout)

        delivered = postfix.wait_delivered(2)
        self.assertEqual(sorted(re.search(rb"body of (\w+)", dump).group(1)
                                for dump in delivered), [b"ok1", b"ok2"])
        events = milter.events()
        # Postfix restarts the milter session after XCLIENT: the second connect is the client's.
        connects = [(event["hostname"], event["hostaddr"][0]) for event in events
                    if event["event"] == "connect"]
        self.assertEqual(connects.count(("client.x.test", "127.0.0.9")), 5, connects)
        bodies = [event["chunk"] for event in events if event["event"] == "body"]
        self.assertTrue(bodies and all("\r\n.dot line\r\n" in chunk for chunk in bodies), bodies)
