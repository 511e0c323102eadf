"""Tests for milter-test-server: options, mail files, the report, sessions and load runs."""

import io
import os
import subprocess
import sys

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from miltermanager import server
from miltermanager.protocol import constants as c
from miltermanager.protocol import messages as m
from miltermanager.protocol.framing import FrameDecoder
from miltermanager.tools import message as msg
from miltermanager.tools import test_server as ts

SPEC = ["-s", "inet:10025@127.0.0.1"]


def settings(*argv):
    """Settings for argv, with a placeholder connection spec unless argv has one."""
    argv = list(argv)
    if "-s" not in argv:
        argv = SPEC + argv
    return ts.parse_options(argv, stdout=io.StringIO())


def rendered(result, output_message=True, color=False):
    return msg.render_result(result, output_message, color)


# ------------------------------------------------------------------ options


class OptionTests(SynchronousTestCase):
    """Command-line parsing: upstream's options, defaults and aliases."""

    def test_defaults(self):
        """Without options the envelope, headers, body and timeouts are upstream's defaults."""
        s = settings()
        self.assertEqual(s.original.sender, "<sender@example.com>")
        self.assertEqual(s.original.recipients, ["<receiver@example.org>"])
        self.assertEqual(s.original.headers,
                         [("From", "<sender@example.com>"), ("To", "<receiver@example.org>")])
        self.assertEqual(s.original.body, b"La de da de da 1.\r\nLa de da de da 2.\r\n"
                                          b"La de da de da 3.\r\nLa de da de da 4.")
        self.assertEqual(s.version, 6)
        self.assertEqual((s.timeouts.connection, s.timeouts.reading, s.timeouts.writing,
                          s.timeouts.end_of_message), (300.0, 10.0, 10.0, 300.0))
        self.assertEqual(s.steps["connect"].command.command,
                         m.Connect(b"mx.example.net", b"4", 50443, b"192.168.123.123"))
        self.assertEqual(s.steps["helo"].command.command, m.Helo(b"delian"))
        self.assertEqual(s.offer, m.Negotiate(6, c.SMFI_CURR_ACTS, c.SMFI_CURR_PROT, {}))
        self.assertFalse(s.color)

    def test_connection_spec_required(self):
        """-s is required; argparse exits with a usage error without it."""
        self.patch(sys, "stderr", io.StringIO())
        self.assertRaises(SystemExit, ts.parse_options, [])

    def test_bad_connection_spec(self):
        """A spec connection_spec cannot parse is a UsageError naming it."""
        error = self.assertRaises(ts.UsageError, ts.parse_options, ["-s", "bogus"])
        self.assertIn("bogus", str(error))

    def test_h_is_header(self):
        """-h adds a header (as upstream), not help; value keeps no leading space."""
        s = settings("-h", "Subject: Hello", "-h", "X-A:b")
        self.assertEqual(s.original.headers[:2], [("Subject", "Hello"), ("X-A", "b")])
        self.assertEqual(s.steps["headers"][0].command.command, m.Header(b"Subject", b"Hello"))
        self.assertEqual(s.steps["headers_leading_space"][0].command.command,
                         m.Header(b"Subject", b" Hello"))

    def test_help_is_long_only(self):
        """--help prints the help; it mentions --header."""
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.assertRaises(SystemExit, ts.parse_options, ["--help"])
        self.assertIn("--header", stdout.getvalue())

    def test_header_needs_colon(self):
        """-h without a colon is refused."""
        self.patch(sys, "stderr", io.StringIO())
        self.assertRaises(SystemExit, settings, "-h", "Subject")

    def test_from_and_to_headers_follow_envelope(self):
        """From:/To: are added from the envelope only when absent."""
        s = settings("-f", "a@example.com", "-r", "b@example.com", "-r", "c@example.com",
                     "-h", "to:x@example.com")
        self.assertEqual(s.original.sender, "<a@example.com>")
        self.assertEqual(s.original.recipients, ["<b@example.com>", "<c@example.com>"])
        self.assertEqual(s.original.headers, [("to", "x@example.com"), ("From", "<a@example.com>")])

    def test_hidden_aliases(self):
        """--from and --recipient are upstream's hidden aliases; <> are kept."""
        s = settings("--from", "<a@example.com>", "--recipient", "b@example.com",
                     "--envelope-recipient", "<c@example.com>")
        self.assertEqual(s.original.sender, "<a@example.com>")
        self.assertEqual(s.original.recipients, ["<b@example.com>", "<c@example.com>"])

    def test_all_timeouts(self):
        """--all-timeouts sets the four timeouts."""
        s = settings("--reading-timeout", "3", "--all-timeouts", "2.5")
        self.assertEqual(s.timeouts, ts.client.Timeouts(2.5, 2.5, 2.5, 2.5))

    def test_each_timeout(self):
        """Each timeout option sets its own timeout (upstream's EOM option set the writing one)."""
        s = settings("--connection-timeout", "1", "--reading-timeout", "2",
                     "--writing-timeout", "3", "--end-of-message-timeout", "4")
        self.assertEqual(s.timeouts, ts.client.Timeouts(1.0, 3.0, 2.0, 4.0))

    def test_macros(self):
        """Stage macros have upstream's defaults; given ones add to or override them."""
        s = settings("--name", "mta", "--connect-macro", "j:mx.example.org",
                     "--connect-macro", "v:Postfix", "--data-macro", "i:QID",
                     "--authenticated-name", "alice", "--authenticated-type", "PLAIN",
                     "--authenticated-author", "bob")
        options = ts.negotiation.Options()
        self.assertEqual(s.steps["connect"].macro_packet(options).command,
                         m.Macro(b"C", {b"{daemon_name}": b"mta", b"{if_name}": b"localhost",
                                        b"{if_addr}": b"127.0.0.1", b"j": b"mx.example.org",
                                        b"v": b"Postfix"}))
        mail = s.steps["mail"].macro_packet(options).command.macros
        self.assertEqual((mail[b"{auth_authen}"], mail[b"{auth_type}"], mail[b"{auth_author}"]),
                         (b"alice", b"PLAIN", b"bob"))
        self.assertEqual(s.steps["data"].macro_packet(options).command,
                         m.Macro(b"T", {b"i": b"QID"}))
        self.assertEqual(s.steps["rcpts"][0].macro_packet(options).command.macros[b"{rcpt_addr}"],
                         b"<receiver@example.org>")
        self.assertIsNone(s.steps["end_of_headers"].macro_packet(options))
        self.assertEqual(s.steps["end_of_message"].macro_packet(options).command,
                         m.Macro(b"E", {b"i": b"message-id"}))

    def test_macros_filtered_by_symbol_list(self):
        """A symbol list the milter asked for limits that stage's macros, either name form."""
        s = settings()
        options = ts.negotiation.Options(macros={0: [b"{j}", b"if_name"]})
        self.assertEqual(s.steps["connect"].macro_packet(options).command,
                         m.Macro(b"C", {b"{if_name}": b"localhost", b"j": b"mail.example.com"}))
        self.assertIsNotNone(s.steps["helo"].macro_packet(options))

    def test_macro_needs_colon(self):
        """A macro without NAME:VALUE is refused."""
        self.patch(sys, "stderr", io.StringIO())
        self.assertRaises(SystemExit, settings, "--helo-macro", "novalue")

    def test_connect_address_forms(self):
        """--connect-address takes inet6: and unix: too."""
        self.assertEqual(settings("--connect-address", "inet6:25@[2001:db8::1]")
                         .steps["connect"].command.command,
                         m.Connect(b"mx.example.net", b"6", 25, b"2001:db8::1"))
        self.assertEqual(settings("--connect-host", "h", "--connect-address", "unix:/tmp/s")
                         .steps["connect"].command.command,
                         m.Connect(b"h", b"L", 0, b"/tmp/s"))

    def test_body_chunks(self):
        """-b chunks go out as given, each cut at 65535 bytes."""
        s = settings("-b", "one", "-b", "x" * 70000)
        self.assertEqual([len(step.command.command.chunk) for step in s.steps["body"]],
                         [3, 65535, 4465])

    def test_unknown_and_version(self):
        """--unknown adds an UNKNOWN step; --negotiate-version shapes the offer."""
        s = settings("--unknown", "XFOO bar", "--negotiate-version", "4")
        self.assertEqual(s.steps["unknown"].command.command, m.Unknown(b"XFOO bar"))
        self.assertEqual(s.offer, m.Negotiate(4, c.SMFI_CURR_ACTS, 0x37F, {}))

    def test_color_choice(self):
        """--color alone means yes; auto is off when stdout is no terminal."""
        self.assertTrue(settings("--color").color)
        self.assertFalse(settings("--color=no").color)
        self.assertFalse(settings("--color=auto").color)

    def test_load_options(self):
        """--n-sessions, --concurrency and --n-messages-per-session are kept."""
        s = settings("--n-sessions", "10", "--concurrency", "3", "--n-messages-per-session", "2")
        self.assertEqual((s.n_sessions, s.concurrency, s.n_messages), (10, 3, 2))


# ------------------------------------------------------------------ mail files


MAIL = (b"From someone Mon Jan  1 00:00:00 2024\n"
        b"From: Alice <alice@example.com>\n"
        b"To: bob@example.org, Carol <carol@example.org>\n"
        b"Subject: Hello\n"
        b"\tworld\n"
        b"\n"
        b"Line 1\n"
        b"Line 2\n")


class MailFileTests(SynchronousTestCase):
    """-m: an RFC 822 file gives headers, body and envelope."""

    def write(self, data):
        path = self.mktemp()
        with open(path, "wb") as mail_file:
            mail_file.write(data)
        return path

    def test_parse(self):
        """mbox From line skipped; folds joined by LF; body CRLF; From:/To: addresses found."""
        mail = msg.parse_mail(MAIL)
        self.assertEqual(mail.headers, [("From", "Alice <alice@example.com>"),
                                        ("To", "bob@example.org, Carol <carol@example.org>"),
                                        ("Subject", "Hello\n\tworld")])
        self.assertEqual(mail.body, b"Line 1\r\nLine 2\r\n")
        self.assertEqual(mail.sender, "<alice@example.com>")
        self.assertEqual(mail.recipients, ["<bob@example.org>", "<carol@example.org>"])

    def test_crlf_file(self):
        """A CRLF file gives the same headers and body."""
        mail = msg.parse_mail(MAIL.replace(b"\n", b"\r\n"))
        self.assertEqual(mail.headers[2], ("Subject", "Hello\n\tworld"))
        self.assertEqual(mail.body, b"Line 1\r\nLine 2\r\n")

    def test_headers_only(self):
        """A file without an empty line has headers and an empty body."""
        mail = msg.parse_mail(b"Subject: x")
        self.assertEqual((mail.headers, mail.body), ([("Subject", "x")], b""))

    def test_invalid_header(self):
        """A line that is no header, fold or separator is an error naming the line."""
        error = self.assertRaises(msg.MailFileError, msg.parse_mail, b"Subject: x\n<bad>\n\nbody")
        self.assertEqual(str(error), "invalid header: <<bad>>")

    def test_eight_bit(self):
        """8-bit bytes in headers and body survive to the wire unchanged."""
        s = settings("-m", self.write(b"Subject: caf\xe9\n\nna\xefve\n"))
        self.assertEqual(s.steps["headers"][0].command.command, m.Header(b"Subject", b"caf\xe9"))
        self.assertEqual(s.original.body, b"na\xefve\r\n")

    def test_envelope_from_file(self):
        """The file's From:/To: feed the envelope; the file's headers are sent as they are."""
        s = settings("-m", self.write(MAIL))
        self.assertEqual(s.original.sender, "<alice@example.com>")
        self.assertEqual(s.original.recipients, ["<bob@example.org>", "<carol@example.org>"])
        self.assertEqual([name for name, _ in s.original.headers], ["From", "To", "Subject"])
        self.assertEqual([step.command.command.chunk for step in s.steps["body"]],
                         [b"Line 1\r\nLine 2\r\n"])

    def test_options_override_file(self):
        """-f and -r win over the file's From:/To:; -b wins over its body."""
        s = settings("-m", self.write(MAIL), "-f", "x@example.com", "-r", "y@example.com",
                     "-b", "chunk")
        self.assertEqual((s.original.sender, s.original.recipients),
                         ("<x@example.com>", ["<y@example.com>"]))
        self.assertEqual(s.original.body, b"chunk")

    def test_large_body_split(self):
        """A file body over 65535 bytes goes out in 65535-byte chunks."""
        s = settings("-m", self.write(b"Subject: big\n\n" + b"y" * 99 + b"\n" * 70000))
        self.assertEqual([len(step.command.command.chunk) for step in s.steps["body"]],
                         [65535, 65535, 140099 - 2 * 65535])

    def test_missing_file(self):
        """A missing mail file is a UsageError naming it."""
        error = self.assertRaises(ts.UsageError, settings, "-m", "/nonexistent/mail")
        self.assertIn("/nonexistent/mail", str(error))


# ------------------------------------------------------------------ edits and the report


ORIGINAL = msg.Message("<a@example.com>", ["<b@example.com>", "<c@example.com>"],
                       [("Subject", "Hi"), ("From", "<a@example.com>"), ("To", "<b@example.com>"),
                        ("X-Two", "1"), ("X-Two", "2")],
                       b"Body 1\r\nBody 2\r\n")


class ModificationTests(SynchronousTestCase):
    """apply_modifications: the edits a milter sends at end of message."""

    def apply(self, *modifications, leading_space=False):
        return msg.apply_modifications(ORIGINAL, list(modifications), leading_space)

    def test_no_edit(self):
        """No modification leaves an equal copy and the body not replaced."""
        result, replaced = self.apply()
        self.assertEqual(result, ORIGINAL)
        self.assertIsNot(result.headers, ORIGINAL.headers)
        self.assertFalse(replaced)

    def test_add_and_insert_header(self):
        """AddHeader appends; InsertHeader puts at a 0-based index, past the end appends."""
        result, _ = self.apply(m.AddHeader(b"X-End", b"e"), m.InsertHeader(0, b"X-Top", b"t"),
                               m.InsertHeader(2, b"X-Mid", b"m"),
                               m.InsertHeader(99, b"X-Far", b"f"))
        self.assertEqual([name for name, _ in result.headers],
                         ["X-Top", "Subject", "X-Mid", "From", "To", "X-Two", "X-Two", "X-End",
                          "X-Far"])

    def test_change_header(self):
        """ChangeHeader counts same-name headers from 1 (0 as 1), any case."""
        result, _ = self.apply(m.ChangeHeader(2, b"x-two", b"second"),
                               m.ChangeHeader(0, b"Subject", b"[tag] Hi"))
        self.assertEqual(result.headers[0], ("Subject", "[tag] Hi"))
        self.assertEqual(result.headers[3:], [("X-Two", "1"), ("x-two", "second")])

    def test_delete_and_append_by_change(self):
        """An empty value deletes; an index past the last same-name header appends."""
        result, _ = self.apply(m.ChangeHeader(1, b"X-Two", b""), m.ChangeHeader(3, b"X-Two", b"3"),
                               m.ChangeHeader(1, b"X-None", b""))
        self.assertEqual(result.headers[3:], [("X-Two", "2"), ("X-Two", "3")])

    def test_leading_space(self):
        """With HDR_LEADSPC the milter's leading space is not part of the value."""
        result, _ = self.apply(m.AddHeader(b"X-A", b" v"), leading_space=True)
        self.assertEqual(result.headers[-1], ("X-A", "v"))
        result, _ = self.apply(m.AddHeader(b"X-A", b" v"))
        self.assertEqual(result.headers[-1], ("X-A", " v"))

    def test_envelope_edits(self):
        """ChangeFrom, AddRecipient(Par) and DeleteRecipient edit the envelope, <> added."""
        result, _ = self.apply(m.ChangeFrom(b"new@example.com", b"RET=HDRS"),
                               m.AddRecipient(b"d@example.com"),
                               m.AddRecipientPar(b"<e@example.com>", b"NOTIFY=NEVER"),
                               m.DeleteRecipient(b"B@example.com"))
        self.assertEqual(result.sender, "<new@example.com>")
        self.assertEqual(result.recipients, ["<c@example.com>", "<d@example.com>",
                                             "<e@example.com>"])

    def test_replace_body(self):
        """ReplaceBody packets together are the new body, even an empty one."""
        result, replaced = self.apply(m.ReplaceBody(b"New "), m.Quarantine(b"why"),
                                      m.ReplaceBody(b"body\r\n"))
        self.assertEqual((result.body, replaced), (b"New body\r\n", True))
        result, replaced = self.apply(m.ReplaceBody(b""))
        self.assertEqual((result.body, replaced), (b"", True))


class ReportTests(SynchronousTestCase):
    """render_result: upstream's status line, elapsed time, quarantine and message diff."""

    def result(self, **fields):
        fields.setdefault("message", ORIGINAL.copy())
        return ts.SessionResult(ORIGINAL, elapsed=0.0123456, **fields)

    def test_pass(self):
        """A passing session prints two lines; %g elapsed time."""
        self.assertEqual(rendered(self.result(), output_message=False),
                         "status: pass\nelapsed-time: 0.0123456 seconds\n")

    def test_reply_code_and_quarantine(self):
        """A ReplyCode adds [CODE]<EXT>(MESSAGE); quarantine prints its reason in <>."""
        result = self.result(status="reject", reply_code=(550, "5.7.1", "Go away"),
                             quarantine_reason="spam")
        self.assertEqual(rendered(result, output_message=False),
                         "status: reject [550]<5.7.1>(Go away)\n"
                         "elapsed-time: 0.0123456 seconds\n"
                         "Quarantine reason: <spam>\n")

    def test_parse_reply_code(self):
        """Reply texts split into code, extended code and message; multi-line joined."""
        self.assertEqual(msg.parse_reply_code("451 4.7.1 Try later"), (451, "4.7.1", "Try later"))
        self.assertEqual(msg.parse_reply_code("550 Go away"), (550, None, "Go away"))
        self.assertEqual(msg.parse_reply_code("421"), (421, None, ""))
        self.assertEqual(msg.parse_reply_code("550-5.7.1 One\r\n550 5.7.1 Two"),
                         (550, "5.7.1", "One Two"))
        self.assertEqual(msg.status_line("temporary-failure", (421, None, "")),
                         "status: temporary-failure [421]<>()")

    def test_unchanged_message(self):
        """--output-message with no edits: every line marked unchanged, original body."""
        self.assertEqual(rendered(self.result()),
                         "status: pass\n"
                         "elapsed-time: 0.0123456 seconds\n"
                         "\n"
                         "Envelope:------------------------------\n"
                         "  MAIL FROM:<a@example.com>\n"
                         "  RCPT TO:<b@example.com>\n"
                         "  RCPT TO:<c@example.com>\n"
                         "Header:--------------------------------\n"
                         "  Subject: Hi\n"
                         "  From: <a@example.com>\n"
                         "  To: <b@example.com>\n"
                         "  X-Two: 1\n"
                         "  X-Two: 2\n"
                         "Body:----------------------------------\n"
                         "Body 1\n"
                         "Body 2\n"
                         "\n")

    def test_modified_message(self):
        """Edits show as - and +: a changed header as removed then added, in place."""
        message, replaced = msg.apply_modifications(ORIGINAL, [
            m.ChangeHeader(1, b"Subject", b"[tag] Hi"), m.AddHeader(b"X-New", b"a\n\tb"),
            m.ChangeHeader(1, b"X-Two", b""), m.ChangeFrom(b"<z@example.com>"),
            m.DeleteRecipient(b"<b@example.com>"), m.AddRecipient(b"<d@example.com>"),
            m.ReplaceBody(b"Replaced\r\n")])
        text = rendered(self.result(message=message, body_replaced=replaced))
        self.assertEqual(text.split("\n\n", 1)[1],
                         "Envelope:------------------------------\n"
                         "- MAIL FROM:<a@example.com>\n"
                         "+ MAIL FROM:<z@example.com>\n"
                         "- RCPT TO:<b@example.com>\n"
                         "  RCPT TO:<c@example.com>\n"
                         "+ RCPT TO:<d@example.com>\n"
                         "Header:--------------------------------\n"
                         "- Subject: Hi\n"
                         "+ Subject: [tag] Hi\n"
                         "  From: <a@example.com>\n"
                         "  To: <b@example.com>\n"
                         "- X-Two: 1\n"
                         "  X-Two: 2\n"
                         "+ X-New: a\n"
                         "+ \tb\n"
                         "Body:----------------------------------\n"
                         "Replaced\n"
                         "\n")

    def test_color(self):
        """With color, + lines are green and - lines red; unchanged lines plain."""
        message, _ = msg.apply_modifications(ORIGINAL, [m.ChangeHeader(1, b"Subject", b"X")])
        text = rendered(self.result(message=message), color=True)
        self.assertIn("\033[01;31m- Subject: Hi\033[00m\n\033[01;32m+ Subject: X\033[00m\n", text)
        self.assertIn("\n  From: <a@example.com>\n", text)

    def test_body_charset(self):
        """The body is shown converted from the Content-Type charset."""
        original = msg.Message("<a@x>", ["<b@x>"],
                               [("Content-Type", 'text/plain; charset="ISO-8859-1"')],
                               b"caf\xe9\r\n")
        result = ts.SessionResult(original, message=original.copy())
        self.assertTrue(rendered(result).endswith("Body:----------------------------------\n"
                                                  "café\n\n"))

    def test_empty_header_value(self):
        """A header with an empty value prints as "NAME:" (upstream's form)."""
        original = msg.Message("<a@x>", [], [("X-Empty", "")], b"")
        text = rendered(ts.SessionResult(original, message=original.copy()))
        self.assertIn("\n  X-Empty:\n", text)

    def test_load_report(self):
        """The load summary: counts, throughput, nearest-rank latency percentiles, statuses."""
        report = ts.LoadReport(sessions=2, messages=4, elapsed=2.0,
                               latencies=[0.004, 0.001, 0.003, 0.002])
        report.statuses.update({"pass": 3, "reject": 1})
        self.assertEqual(report.render(),
                         "sessions: 2\n"
                         "messages: 4\n"
                         "elapsed-time: 2 seconds\n"
                         "throughput: 2.0 messages/s\n"
                         "latency p50/p90/p99/max: 2.00/4.00/4.00/4.00 ms\n"
                         "status pass: 3\n"
                         "status reject: 1\n")


# ------------------------------------------------------------------ in-process milter


class FakeMilter(Protocol):
    """A wire-level milter: records every command, answers as its script says."""

    def connectionMade(self):
        self.decoder = FrameDecoder()
        self.script = self.factory.script
        self.script.connections.append(self)
        self.commands = []
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        for code, payload in self.decoder.feed(data):
            command = m.decode_command(code, payload)
            self.commands.append(command)
            replies = self.script.answer(self, command)
            if replies:
                self.transport.write(b"".join(reply.encode() for reply in replies))
            if code == c.QUIT:
                self.transport.loseConnection()

    def connectionLost(self, reason=None):
        self.closed.callback(None)


class Script:
    """How FakeMilter answers: negotiated flags and replies per command code."""

    def __init__(self, protocol=0, actions=c.SMFI_CURR_ACTS, replies=None, macros=None):
        self.protocol = protocol
        self.actions = actions
        self.macros = macros or {}
        self.replies = replies or {}
        self.connections = []
        self.hook = None

    def answer(self, connection, command):
        code = command.code
        if self.hook is not None:
            self.hook(connection, command)
        if code == c.NEGOTIATE:
            return [m.Negotiate(6, self.actions, self.protocol, self.macros)]
        if code in c.COMMANDS_WITHOUT_REPLY or self.protocol & c.NO_REPLY_FLAG.get(code, 0):
            return None
        reply = self.replies.get(code, [m.CONTINUE])
        return reply(command) if callable(reply) else reply

    def codes(self, index=0):
        return b"".join(command.code for command in self.connections[index].commands)


class SessionTests(TestCase):
    """run_session and run_load against an in-process milter on loopback."""

    def listen(self, script):
        """Serve FakeMilter with script on a free loopback port; return its connection spec."""
        factory = Factory.forProtocol(FakeMilter)
        factory.script = script
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(self.closed, script)
        return f"inet:{port.getHost().port}@127.0.0.1"

    def closed(self, script):
        """Fire once every connection the milter accepted has ended."""
        return defer.gatherResults([connection.closed for connection in script.connections])

    @defer.inlineCallbacks
    def run_session(self, script, *argv, clock=None):
        """Run one session; fire with its result once the milter saw the connection end."""
        s = settings("-s", self.listen(script), *argv)
        result = yield defer.ensureDeferred(ts.run_session(reactor, s, clock=clock))
        yield self.closed(script)
        return result

    @defer.inlineCallbacks
    def test_full_walk(self):
        """Every stage in order, each after its macros; QUIT at the end; edits applied."""
        script = Script(replies={c.END_OF_MESSAGE: [
            m.AddHeader(b"X-Fake", b"yes"), m.PROGRESS, m.Quarantine(b"held"),
            m.ReplaceBody(b"new\r\n"), m.CONTINUE]})
        result = yield self.run_session(script, "-h", "Subject:Hi", "-r", "a@x", "-r", "b@x",
                                        "--unknown", "XCMD")
        self.assertEqual(script.codes(), b"ODCDHDMDRDRUTLLLNBDEQ")
        self.assertEqual((result.status, result.error, result.quarantine_reason),
                         ("pass", None, "held"))
        self.assertEqual(result.message.headers[-1], ("X-Fake", "yes"))
        self.assertEqual((result.message.body, result.body_replaced), (b"new\r\n", True))
        commands = script.connections[0].commands
        self.assertEqual(commands[0], m.Negotiate(6, c.SMFI_CURR_ACTS, c.SMFI_CURR_PROT, {}))
        self.assertEqual(commands[6], m.Mail(b"<sender@example.com>"))
        self.assertEqual(commands[11], m.Unknown(b"XCMD"))

    @defer.inlineCallbacks
    def test_no_steps_and_no_reply(self):
        """NO_* steps are not sent (their macros still are); NR_* steps get no wait."""
        script = Script(protocol=c.SMFIP_NOHELO | c.SMFIP_NOHDRS | c.SMFIP_NOBODY
                        | c.SMFIP_NR_CONN | c.SMFIP_NR_MAIL | c.SMFIP_NR_EOH)
        result = yield self.run_session(script)
        self.assertEqual(script.codes(), b"ODCDDMDRTNDEQ")
        self.assertEqual(result.status, "pass")

    @defer.inlineCallbacks
    def test_leading_space(self):
        """With HDR_LEADSPC the header values carry the space after the colon."""
        script = Script(protocol=c.SMFIP_HDR_LEADSPC,
                        replies={c.END_OF_MESSAGE: [m.AddHeader(b"X-A", b" v"), m.CONTINUE]})
        result = yield self.run_session(script, "-h", "Subject: Hi")
        self.assertIn(m.Header(b"Subject", b" Hi"), script.connections[0].commands)
        self.assertEqual(result.message.headers[-1], ("X-A", "v"))

    @defer.inlineCallbacks
    def test_refused_recipient_is_dropped(self):
        """A rejected or tempfailed RCPT is removed and the session goes on."""
        def rcpt(command):
            if command.recipient == b"<bad@x>":
                return [m.ReplyCode(b"550 5.1.1 No such user")]
            if command.recipient == b"<later@x>":
                return [m.TEMPFAIL]
            return [m.CONTINUE]
        script = Script(replies={c.RCPT: rcpt})
        result = yield self.run_session(script, "-r", "bad@x", "-r", "ok@x", "-r", "later@x")
        self.assertEqual(result.status, "pass")
        self.assertEqual(result.reply_code, (550, "5.1.1", "No such user"))
        self.assertEqual(result.message.recipients, ["<ok@x>"])
        self.assertTrue(script.codes().endswith(b"NBDEQ"))
        self.assertTrue(rendered(result).startswith("status: pass [550]<5.1.1>(No such user)\n"))

    @defer.inlineCallbacks
    def test_all_recipients_refused(self):
        """When no recipient remains the session ends with the last refusal's status."""
        script = Script(replies={c.RCPT: [m.TEMPFAIL]})
        result = yield self.run_session(script, "-r", "a@x", "-r", "b@x")
        self.assertEqual((result.status, result.stage), ("temporary-failure", "envelope-recipient"))
        self.assertEqual(script.codes(), b"ODCDHDMDRDRAQ")

    @defer.inlineCallbacks
    def test_reject_ends_session(self):
        """A reject at MAIL ends the session: ABORT, then QUIT."""
        script = Script(replies={c.MAIL: [m.REJECT]})
        result = yield self.run_session(script)
        self.assertEqual((result.status, result.stage), ("reject", "envelope-from"))
        self.assertEqual(script.codes(), b"ODCDHDMAQ")

    @defer.inlineCallbacks
    def test_accept_and_discard(self):
        """Accept at HELO ends with "accept"; discard at DATA with "discard"."""
        result = yield self.run_session(Script(replies={c.HELO: [m.ACCEPT]}))
        self.assertEqual(result.status, "accept")
        result = yield self.run_session(Script(replies={c.DATA: [m.DISCARD]}))
        self.assertEqual(result.status, "discard")

    @defer.inlineCallbacks
    def test_end_of_message_verdicts(self):
        """The final reply to END_OF_MESSAGE is the status; a ReplyCode shows its text."""
        script = Script(replies={c.END_OF_MESSAGE: [m.ReplyCode(b"451 4.7.1 Later")]})
        result = yield self.run_session(script)
        self.assertEqual((result.status, result.reply_code),
                         ("temporary-failure", (451, "4.7.1", "Later")))
        result = yield self.run_session(Script(replies={c.END_OF_MESSAGE: [m.SHUTDOWN]}))
        self.assertEqual(result.status, "shutdown")

    @defer.inlineCallbacks
    def test_skip_in_body(self):
        """SKIP during the body sends no more chunks and goes on with END_OF_MESSAGE."""
        script = Script(protocol=c.SMFIP_SKIP, replies={c.BODY: [m.SKIP]})
        result = yield self.run_session(script, "-b", "1", "-b", "2", "-b", "3")
        self.assertEqual(result.status, "pass")
        self.assertTrue(script.codes().endswith(b"NBDEQ"))

    @defer.inlineCallbacks
    def test_reading_timeout(self):
        """A milter that does not answer in time gives an error, not a status."""
        clock = task.Clock()
        script = Script(replies={c.HELO: []})

        def hook(connection, command):
            if command.code == c.HELO:
                reactor.callLater(0, clock.advance, 10)
        script.hook = hook
        result = yield self.run_session(script, clock=clock)
        self.assertIn("reading timeout", result.error)
        self.assertIn("HELO", result.error)

    @defer.inlineCallbacks
    def test_connection_refused(self):
        """Nothing listening: only the error message, on stderr, and exit status 1."""
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        stdout, stderr = io.StringIO(), io.StringIO()
        code = yield defer.ensureDeferred(ts.run(
            reactor, settings("-s", f"inet:{number}@127.0.0.1"), stdout, stderr))
        self.assertEqual((code, stdout.getvalue()), (1, ""))
        self.assertIn(f"inet:{number}@127.0.0.1", stderr.getvalue())

    @defer.inlineCallbacks
    def test_run_prints_report(self):
        """run() prints upstream's report and logs packets with --verbose."""
        script = Script()
        stdout, stderr = io.StringIO(), io.StringIO()
        code = yield defer.ensureDeferred(ts.run(
            reactor, settings("-s", self.listen(script), "-v", "--output-message"),
            stdout, stderr))
        self.assertEqual(code, 0)
        self.assertRegex(stdout.getvalue(), r"\Astatus: pass\nelapsed-time: [0-9.e-]+ seconds\n\n"
                                            r"Envelope:-+\n  MAIL FROM:<sender@example.com>\n")
        self.assertIn("[send] Helo(name=b'delian')", stderr.getvalue())

    @defer.inlineCallbacks
    def test_threads(self):
        """-t N runs N sessions at once and prints one report each (upstream's option)."""
        script = Script()
        stdout = io.StringIO()
        code = yield defer.ensureDeferred(ts.run(
            reactor, settings("-s", self.listen(script), "-t", "3"), stdout, io.StringIO()))
        yield self.closed(script)
        self.assertEqual(code, 0)
        self.assertEqual(stdout.getvalue().count("status: pass\nelapsed-time: "), 3)
        self.assertEqual(len(script.connections), 3)

    @defer.inlineCallbacks
    def test_load(self):
        """--n-sessions: separate connections, ABORT between messages, a summary."""
        def rcpt(command):
            return [m.REJECT] if command.recipient == b"<no@x>" else [m.CONTINUE]
        script = Script(replies={c.RCPT: rcpt})
        s = settings("-s", self.listen(script), "-r", "no@x", "--n-sessions", "6",
                     "--concurrency", "3", "--n-messages-per-session", "2")
        report = yield defer.ensureDeferred(ts.run_load(reactor, s))
        yield self.closed(script)
        self.assertEqual((report.sessions, report.messages, dict(report.statuses)),
                         (6, 12, {"reject": 12}))
        self.assertEqual(len(script.connections), 6)
        self.assertEqual(script.codes(), b"ODCDHDMDRADMDRQ")
        self.assertEqual(len(report.latencies), 12)
        stdout = io.StringIO()
        s.n_sessions = 4
        s.n_messages = 1
        code = yield defer.ensureDeferred(ts.run(reactor, s, stdout, io.StringIO()))
        self.assertEqual(code, 0)
        self.assertIn("\nmessages: 4\n", stdout.getvalue())
        self.assertIn("\nstatus reject: 4\n", stdout.getvalue())


class LibraryMilter(server.Milter):
    """A milter written with miltermanager.server: refuses <no@x>, edits at end of message."""

    actions = c.SMFIF_ADDHDRS | c.SMFIF_CHGHDRS | c.SMFIF_ADDRCPT | c.SMFIF_DELRCPT

    def rcpt(self, command, macros):
        if command.recipient == b"<no@x>":
            return m.ReplyCode(b"550 5.1.1 Unknown user")
        return m.CONTINUE

    def end_of_message(self, command, macros):
        return [m.AddHeader(b"X-Library", b"saw " + macros.get(b"i", b"?")),
                m.ChangeHeader(1, b"Subject", b"[lib] Hi"),
                m.DeleteRecipient(b"<yes@x>"), m.AddRecipient(b"<new@x>"), m.CONTINUE]


class ServerLibraryTests(TestCase):
    """milter-test-server against a milter built on miltermanager.server."""

    @defer.inlineCallbacks
    def test_session(self):
        """The report shows the library milter's refusal, header edits and envelope edits."""
        port = reactor.listenTCP(0, server.MilterServerFactory(LibraryMilter),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        s = settings("-s", f"inet:{port.getHost().port}@127.0.0.1", "-h", "Subject: Hi",
                     "-r", "no@x", "-r", "yes@x", "-r", "other@x")
        result = yield defer.ensureDeferred(ts.run_session(reactor, s))
        self.assertEqual(rendered(result).split("\n", 2)[0::2], [
            "status: pass [550]<5.1.1>(Unknown user)",
            "\n"
            "Envelope:------------------------------\n"
            "  MAIL FROM:<sender@example.com>\n"
            "- RCPT TO:<no@x>\n"
            "- RCPT TO:<yes@x>\n"
            "  RCPT TO:<other@x>\n"
            "+ RCPT TO:<new@x>\n"
            "Header:--------------------------------\n"
            "- Subject: Hi\n"
            "+ Subject: [lib] Hi\n"
            "  From: <sender@example.com>\n"
            "  To: <no@x>\n"
            "+ X-Library: saw message-id\n"
            "Body:----------------------------------\n"
            "La de da de da 1.\nLa de da de da 2.\nLa de da de da 3.\nLa de da de da 4.\n"])


# ------------------------------------------------------------------ the real thing




class InteropTests(SynchronousTestCase):
    """The installed milter-test-server against a real libmilter milter (python3-milter)."""

    def setUp(self):
        from tests.peers.fixtures import LibmilterMilter
        self.milter = LibmilterMilter(self.mktemp(), "lm", "--change-subject",
                                      "--replace-body", "Replaced by lm.\r\n")
        self.milter.start()
        self.addCleanup(self.milter.stop)

    def run_tool(self, *argv):
        process = subprocess.run(["milter-test-server", "-s", self.milter.spec, *argv],
                                 capture_output=True, text=True, timeout=120,
                                 env={**os.environ, "TERM": "xterm"})
        self.assertEqual(process.returncode, 0, process.stderr)
        return process.stdout

    def test_output_message(self):
        """Status, header edits, replaced body and dropped recipients, as upstream shows them."""
        out = self.run_tool("-h", "Subject:Hello", "-r", "ok@example.com",
                            "-r", "reject@example.com", "-r", "tempfail@example.com",
                            "--output-message")
        head, message = out.split("\n\n", 1)
        lines = head.split("\n")
        self.assertEqual(lines[0], "status: pass [451]<4.7.1>(lm tempfail recipient)")
        self.assertRegex(lines[1], r"^elapsed-time: [0-9.e-]+ seconds$")
        self.assertEqual(message,
                         "Envelope:------------------------------\n"
                         "  MAIL FROM:<sender@example.com>\n"
                         "  RCPT TO:<ok@example.com>\n"
                         "- RCPT TO:<reject@example.com>\n"
                         "- RCPT TO:<tempfail@example.com>\n"
                         "Header:--------------------------------\n"
                         "- Subject: Hello\n"
                         "+ Subject: [lm] Hello\n"
                         "  From: <sender@example.com>\n"
                         "  To: <ok@example.com>\n"
                         "+ X-Libmilter: lm saw message-id\n"
                         "Body:----------------------------------\n"
                         "Replaced by lm.\n"
                         "\n")
        events = [event["event"] for event in self.milter.events()]
        self.assertEqual(events.count("envrcpt"), 3)
        self.assertIn("eom", events)

    def test_rejected_only_recipient(self):
        """The only recipient rejected: status reject with the milter's reply code."""
        out = self.run_tool("-r", "reject@example.com")
        self.assertTrue(out.startswith("status: reject [550]<5.7.1>(lm rejected recipient)\n"))

    def test_load(self):
        """--n-sessions 50 --concurrency 5 prints the summary with 50 passed messages."""
        out = self.run_tool("--n-sessions", "50", "--concurrency", "5")
        self.assertIn("sessions: 50\nmessages: 50\n", out)
        self.assertRegex(out, r"\nthroughput: [0-9.]+ messages/s\n")
        self.assertRegex(out, r"\nlatency p50/p90/p99/max: ([0-9.]+/){3}[0-9.]+ ms\n")
        self.assertIn("\nstatus pass: 50\n", out)
