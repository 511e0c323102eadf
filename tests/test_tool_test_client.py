"""Tests for milter-test-client: its output format, its options, and a real MTA driving it."""

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.trial import unittest

from miltermanager.protocol import FrameDecoder, constants as c, decode_reply, messages
from miltermanager.protocol import negotiation
from miltermanager.tools import test_client
from tests.peers.fixtures import Postfix, free_port

POSTFIX_ACTIONS = (
    "add-headers|change-body|add-envelope-recipient|delete-envelope-recipient|change-headers"
    "|quarantine|change-envelope-from|add-envelope-recipient-with-parameters|set-symbol-list")
POSTFIX_V6_STEPS = (
    "no-connect|no-helo|no-envelope-from|no-envelope-recipient|no-body|no-headers"
    "|no-end-of-header|no-reply-header|no-unknown|no-data|skip|envelope-recipient-rejected"
    "|no-reply-connect|no-reply-helo|no-reply-envelope-from|no-reply-envelope-recipient"
    "|no-reply-data|no-reply-unknown|no-reply-end-of-header|no-reply-body"
    "|header-value-with-leading-space")


def parse(*argv):
    """Parse a milter-test-client command line into Options."""
    options = test_client.Options()
    options.parseOptions(list(argv))
    return options


class FlagNamesTests(unittest.TestCase):
    """Action and step flags are named as upstream's GFlags nicknames."""

    def test_postfix_v6_actions(self):
        """All nine SMFIF_ flags of Postfix's offer get upstream's names in bit order."""
        self.assertEqual(test_client.action_names(c.SMFI_CURR_ACTS), POSTFIX_ACTIONS)

    def test_postfix_v6_steps(self):
        """All 21 SMFIP_ flags of a version 6 offer get upstream's names in bit order."""
        self.assertEqual(test_client.step_names(c.SMFI_CURR_PROT), POSTFIX_V6_STEPS)

    def test_no_flags(self):
        """No flag set names nothing."""
        self.assertEqual(test_client.step_names(0), "")

    def test_unknown_bits(self):
        """Bits upstream has no name for are shown in hex after the names, as upstream does."""
        self.assertEqual(test_client.step_names(c.SMFIP_SKIP | c.SMFIP_MDS_1M),
                         "skip (unknown flags: MilterStepFlags:0x20000000)")
        self.assertEqual(test_client.action_names(0x1000),
                         "(unknown flags: MilterActionFlags:0x1000)")


class FormatTests(unittest.TestCase):
    """Each command prints the line upstream's milter-test-client prints."""

    def test_negotiate(self):
        """Negotiate shows the MTA's offer: version, actions and steps."""
        self.assertEqual(
            test_client.format_event(negotiation.offer(2)),
            b"negotiate: version=<2>, action=<" + POSTFIX_ACTIONS.encode()
            + b">, step=<no-connect|no-helo|no-envelope-from|no-envelope-recipient"
            b"|no-body|no-headers|no-end-of-header>")

    def test_connect_inet(self):
        """An IPv4 client is shown as inet:PORT@[ADDRESS]."""
        command = messages.Connect(b"client.example.net", c.FAMILY_INET, 50443, b"192.0.2.10")
        self.assertEqual(test_client.format_event(command),
                         b"connect: host=<client.example.net>, address=<inet:50443@[192.0.2.10]>")

    def test_connect_inet6(self):
        """An IPv6 client is shown as inet6:PORT@[ADDRESS]."""
        command = messages.Connect(b"[2001:db8::1]", c.FAMILY_INET6, 25, b"2001:db8::1")
        self.assertEqual(test_client.format_event(command),
                         b"connect: host=<[2001:db8::1]>, address=<inet6:25@[2001:db8::1]>")

    def test_connect_unix_and_unknown(self):
        """A UNIX client shows its path; an unknown family shows 'unknown'."""
        self.assertEqual(
            test_client.format_event(messages.Connect(b"localhost", c.FAMILY_UNIX, 0, b"/s")),
            b"connect: host=<localhost>, address=<unix:/s>")
        self.assertEqual(test_client.format_event(messages.Connect(b"localhost")),
                         b"connect: host=<localhost>, address=<unknown>")

    def test_envelope(self):
        """HELO, MAIL and RCPT show their argument inside <>, brackets as the MTA sent them."""
        self.assertEqual(test_client.format_event(messages.Helo(b"delian")), b"helo: <delian>")
        self.assertEqual(test_client.format_event(messages.Mail(b"<a@example.com>", [b"SIZE=9"])),
                         b"envelope-from: <<a@example.com>>")
        self.assertEqual(test_client.format_event(messages.Rcpt(b"<b@example.org>")),
                         b"envelope-recipient: <<b@example.org>>")

    def test_message(self):
        """Data, header, end-of-header and body print as upstream: body bytes verbatim."""
        self.assertEqual(test_client.format_event(messages.DATA), b"data")
        self.assertEqual(test_client.format_event(messages.Header(b"Subject", b"Hi\n there")),
                         b"header: <Subject: Hi\n there>")
        self.assertEqual(test_client.format_event(messages.END_OF_HEADERS), b"end-of-header")
        self.assertEqual(test_client.format_event(messages.Body(b"La de da\r\n")),
                         b"body: <La de da\r\n>")

    def test_end_of_message(self):
        """End of message shows its chunk only when it carries one."""
        self.assertEqual(test_client.format_event(messages.END_OF_MESSAGE), b"end-of-message")
        self.assertEqual(test_client.format_event(messages.EndOfMessage(b"tail")),
                         b"end-of-message: <tail>")

    def test_abort_and_unknown(self):
        """Abort is a bare word; unknown shows the SMTP line."""
        self.assertEqual(test_client.format_event(messages.ABORT), b"abort")
        self.assertEqual(test_client.format_event(messages.Unknown(b"XFOO bar")),
                         b"unknown: <XFOO bar>")

    def test_macros(self):
        """Macros print as '  name=value' under 'macros:', braces stripped as upstream does."""
        self.assertEqual(
            test_client.format_macros({b"j": b"mx.example.org", b"{daemon_name}": b"smtpd"}),
            [b"macros:", b"  j=mx.example.org", b"  daemon_name=smtpd"])

    def test_no_macros(self):
        """A stage without macros prints no block."""
        self.assertEqual(test_client.format_macros({}), [])
        self.assertEqual(test_client.format_macros(None), [])


class OptionsTests(unittest.TestCase):
    """The command line: upstream's options and the scripted replies."""

    def test_defaults(self):
        """Without options it listens where upstream's client does and answers continue."""
        options = parse()
        self.assertEqual(options["connection-spec"], "inet:10025@[127.0.0.1]")
        self.assertEqual(options["actions"], {})
        self.assertEqual(options["modifications"], [])
        self.assertFalse(options["quiet"])

    def test_connection_spec(self):
        """-s takes a milter spec; a bad one is a usage error."""
        self.assertEqual(parse("-s", "unix:/tmp/x.sock")["connection-spec"], "unix:/tmp/x.sock")
        self.assertRaises(usage.UsageError, parse, "-s", "inet:notaport")

    def test_quiet(self):
        """--quiet and upstream's --no-report-request both silence the events."""
        self.assertTrue(parse("--quiet")["quiet"])
        self.assertTrue(parse("--no-report-request")["quiet"])

    def test_log_level(self):
        """--log-level takes upstream's names; -v means all; an unknown name is an error."""
        self.assertEqual(parse()["log-levels"], ["warn"])
        self.assertEqual(parse("--log-level", "error|info")["log-levels"], ["error", "info"])
        self.assertEqual(parse("-v")["log-levels"], ["debug"])
        self.assertEqual(parse("--log-level", "none")["log-levels"], [])
        self.assertRaises(usage.UsageError, parse, "--log-level", "chatty")

    def test_action_stage(self):
        """--action takes STATUS@STAGE; the stage defaults to end-of-message."""
        options = parse("--action", "reject@envelope-from", "--action", "discard")
        self.assertEqual(options["actions"], {c.MAIL: "reject", c.END_OF_MESSAGE: "discard"})

    def test_action_errors(self):
        """Unknown statuses and stages, and two statuses for one stage, are usage errors."""
        self.assertRaises(usage.UsageError, parse, "--action", "maybe")
        self.assertRaises(usage.UsageError, parse, "--action", "reject@nowhere")
        self.assertRaises(usage.UsageError, parse, "--action", "reject@helo",
                          "--action", "accept@helo")

    def test_reply_code(self):
        """--reply-code must be 5xx for reject, 4xx for temporary-failure, and have a user."""
        parse("--action", "reject@helo", "--reply-code", "550 5.7.1 Go away")
        parse("--action", "temporary-failure", "--reply-code", "451 4.7.1 Later")
        self.assertRaises(usage.UsageError, parse, "--action", "reject",
                          "--reply-code", "451 4.7.1 Later")
        self.assertRaises(usage.UsageError, parse, "--reply-code", "550 5.7.1 Go away")
        self.assertRaises(usage.UsageError, parse, "--action", "reject", "--reply-code", "hello")

    def test_recipient_action(self):
        """--envelope-recipient-action ADDR:STATUS keeps the address without <> and case."""
        options = parse("--envelope-recipient-action", "<Bad@Example.org>:reject")
        self.assertEqual(options["recipient-actions"], [(b"bad@example.org", "reject")])
        self.assertRaises(usage.UsageError, parse, "--envelope-recipient-action", "a@b")

    def test_modifications_in_order(self):
        """Modification options become reply messages in command-line order."""
        options = parse(
            "--add-header", "X-Test:yes", "--insert-header", "0:X-First:1",
            "--change-header", "Subject:1:new", "--delete-header", "X-Old:2",
            "--change-from", "<new@example.com>", "--add-recipient", "<c@example.org>",
            "--delete-recipient", "<b@example.org>", "--quarantine", "held",
            "--replace-body", "new\nbody\n")
        self.assertEqual(options["modifications"], [
            messages.AddHeader(b"X-Test", b"yes"),
            messages.InsertHeader(0, b"X-First", b"1"),
            messages.ChangeHeader(1, b"Subject", b"new"),
            messages.ChangeHeader(2, b"X-Old", b""),
            messages.ChangeFrom(b"<new@example.com>"),
            messages.AddRecipient(b"<c@example.org>"),
            messages.DeleteRecipient(b"<b@example.org>"),
            messages.Quarantine(b"held"),
            messages.ReplaceBody(b"new\r\nbody\r\n"),
        ])

    def test_replace_body_chunks(self):
        """A body over 65535 bytes is sent as several contiguous replace-body packets."""
        options = parse("--replace-body", "x" * 70000)
        self.assertEqual([len(m.chunk) for m in options["modifications"]], [65535, 4465])

    def test_modification_errors(self):
        """Malformed modification arguments are usage errors."""
        for argv in (["--add-header", "NoColon"], ["--insert-header", "x:A:b"],
                     ["--change-header", "A:b"], ["--delete-header", "A"],
                     ["--replace-body", "a", "--replace-body", "b"]):
            self.assertRaises(usage.UsageError, parse, *argv)

    def test_wait(self):
        """--wait SECONDS[@STAGE] records a delay per stage."""
        options = parse("--wait", "1.5", "--wait", "0.2@helo")
        self.assertEqual(options["waits"], {c.END_OF_MESSAGE: 1.5, c.HELO: 0.2})
        self.assertRaises(usage.UsageError, parse, "--wait", "soon")

    def test_negotiation_options(self):
        """--no-reply, --no-event, --negotiate-flags and --macros parse to stages and flags."""
        options = parse("--no-reply", "connect,helo", "--no-event", "body",
                        "--negotiate-flags", "skip|header-value-with-leading-space",
                        "--macros", "envelope-from:{auth_authen},i", "--macros", "connect:j")
        self.assertEqual(options["no-reply-stages"], [c.CONNECT, c.HELO])
        self.assertEqual(options["no-event-stages"], [c.BODY])
        self.assertEqual(options["step-flags"], c.SMFIP_SKIP | c.SMFIP_HDR_LEADSPC)
        self.assertEqual(options["macros"], {2: [b"{auth_authen}", b"i"], 0: [b"j"]})

    def test_negotiation_errors(self):
        """EOM cannot go unanswered or unsent; replies cannot be scripted for NR stages."""
        self.assertRaises(usage.UsageError, parse, "--no-reply", "end-of-message")
        self.assertRaises(usage.UsageError, parse, "--no-event", "end-of-message")
        self.assertRaises(usage.UsageError, parse, "--negotiate-flags", "fly")
        self.assertRaises(usage.UsageError, parse, "--macros", "header:i")
        self.assertRaises(usage.UsageError, parse, "--no-reply", "helo", "--action", "reject@helo")

    def test_version(self):
        """--version prints the package version and exits 0."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        error = self.assertRaises(SystemExit, parse, "--version")
        self.assertEqual(error.code, 0)
        self.assertEqual(out.getvalue().strip(), test_client.__version__)

    def test_main_usage_error(self):
        """main() reports a usage error on stderr and returns 2 without listening."""
        stderr = io.StringIO()
        status = test_client.main(["--action", "maybe"], stdout=io.BytesIO(), stderr=stderr)
        self.assertEqual(status, 2)
        self.assertIn("unknown status 'maybe'", stderr.getvalue())


class NegotiateTests(unittest.TestCase):
    """What the milter asks for out of the MTA's offer."""

    def test_provides_imilter(self):
        """TestClientMilter is an IMilter."""
        from zope.interface.verify import verifyObject

        from miltermanager.server import IMilter
        self.assertTrue(verifyObject(IMilter, test_client.TestClientMilter(parse(), print)))

    def negotiate(self, *argv, offer=None):
        milter = test_client.TestClientMilter(parse(*argv), lambda lines: None)
        return milter.negotiate(offer or negotiation.offer())

    def test_strips_like_upstream(self):
        """It keeps every action but drops RCPT_REJ, HDR_LEADSPC and every NO_* step."""
        wanted = self.negotiate()
        self.assertEqual(wanted.actions, c.SMFI_CURR_ACTS)
        self.assertEqual(wanted.protocol, c.SMFIP_SKIP)
        self.assertEqual(wanted.macros, {})

    def test_no_reply_and_no_event(self):
        """--no-reply asks for NR_* flags, --no-event for NO* flags the MTA offered."""
        wanted = self.negotiate("--no-reply", "connect,header", "--no-event", "helo,data")
        self.assertEqual(wanted.protocol, c.SMFIP_SKIP | c.SMFIP_NR_CONN | c.SMFIP_NR_HDR
                         | c.SMFIP_NOHELO | c.SMFIP_NODATA)

    def test_no_event_unoffered(self):
        """A NO* step a version 2 MTA does not know is not asked for."""
        wanted = self.negotiate("--no-event", "data", offer=negotiation.offer(2))
        self.assertEqual(wanted.protocol, 0)

    def test_negotiate_flags_and_macros(self):
        """--negotiate-flags adds raw steps; --macros becomes the symbol lists."""
        wanted = self.negotiate("--negotiate-flags", "header-value-with-leading-space",
                                "--macros", "envelope-recipient:{rcpt_addr}")
        self.assertEqual(wanted.protocol, c.SMFIP_SKIP | c.SMFIP_HDR_LEADSPC)
        self.assertEqual(wanted.macros, {3: [b"{rcpt_addr}"]})

    def test_answerable(self):
        """The codec's answer() accepts what it asks for, at versions 2 and 6."""
        for version in (2, 6):
            offer = negotiation.offer(version)
            wanted = self.negotiate("--no-reply", "helo", "--macros", "connect:j", offer=offer)
            reply, faked = negotiation.answer(offer, wanted.actions, wanted.protocol,
                                              wanted.macros)
            self.assertEqual(faked, 0 if version == 6 else c.SMFIP_NR_HELO)


OFFER_V6 = negotiation.offer(6)
CONNECT = messages.Connect(b"client.example.net", c.FAMILY_INET, 50443, b"192.0.2.10")
CONNECT_MACROS = messages.Macro(c.CONNECT, {b"j": b"mx.example.org", b"{daemon_name}": b"smtpd"})
ENVELOPE = [
    CONNECT_MACROS, CONNECT,
    messages.Macro(c.HELO, {}), messages.Helo(b"client.example.net"),
    messages.Macro(c.MAIL, {b"{mail_addr}": b"a@example.com"}),
    messages.Mail(b"<a@example.com>", [b"SIZE=100"]),
    messages.Macro(c.RCPT, {b"{rcpt_addr}": b"b@example.org"}), messages.Rcpt(b"<b@example.org>"),
]


class Driver:
    """An MTA driving one TestClientMilter through the real server protocol, in memory."""

    def __init__(self, *argv):
        from twisted.internet.address import IPv4Address

        from miltermanager.server import MilterServerFactory

        self.lines = []
        self.clock = Clock()
        factory = MilterServerFactory(
            test_client.milter_factory(parse(*argv), self.lines.extend, self.clock),
            clock=self.clock)
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.decoder = FrameDecoder()

    def send(self, *commands):
        """Send commands in one write; return the replies written so far."""
        self.protocol.dataReceived(b"".join(command.encode() for command in commands))
        return self.replies()

    def replies(self):
        data = self.transport.value()
        self.transport.clear()
        return [decode_reply(code, payload) for code, payload in self.decoder.feed(data)]

    def take_lines(self):
        lines, self.lines[:] = list(self.lines), []
        return lines

    def start(self, offer=OFFER_V6):
        """Negotiate and walk the envelope; return the negotiate reply."""
        (reply,) = self.send(offer)
        self.send(*ENVELOPE)
        self.take_lines()
        return reply


class SessionTests(unittest.TestCase):
    """The milter behind the real server: printed lines and replies, option by option."""

    def test_whole_session(self):
        """Every event prints upstream's line plus its macros; every command gets continue."""
        driver = Driver()
        self.assertEqual(driver.send(OFFER_V6),
                         [messages.Negotiate(6, c.SMFI_CURR_ACTS, c.SMFIP_SKIP, {})])
        replies = driver.send(
            *ENVELOPE, messages.Unknown(b"XFOO"), messages.DATA,
            messages.Macro(c.HEADER, {b"i": b"4AB"}), messages.Header(b"From", b"a@example.com"),
            messages.Macro(c.HEADER, {}), messages.Header(b"Subject", b"Hi"),
            messages.Macro(c.END_OF_HEADERS, {b"i": b"4AB"}), messages.END_OF_HEADERS,
            messages.Body(b"La de da.\r\n"),
            messages.Macro(c.END_OF_MESSAGE, {b"i": b"4AB"}), messages.END_OF_MESSAGE,
            messages.ABORT, messages.QUIT)
        self.assertEqual(replies, [messages.CONTINUE] * 11)
        driver.protocol.connectionLost(None)
        self.assertEqual(driver.take_lines(), [
            b"negotiate: version=<6>, action=<" + POSTFIX_ACTIONS.encode()
            + b">, step=<" + POSTFIX_V6_STEPS.encode() + b">",
            b"connect: host=<client.example.net>, address=<inet:50443@[192.0.2.10]>",
            b"macros:", b"  j=mx.example.org", b"  daemon_name=smtpd",
            b"helo: <client.example.net>",
            b"envelope-from: <<a@example.com>>", b"macros:", b"  mail_addr=a@example.com",
            b"envelope-recipient: <<b@example.org>>", b"macros:", b"  rcpt_addr=b@example.org",
            b"unknown: <XFOO>",
            b"data",
            b"header: <From: a@example.com>", b"macros:", b"  i=4AB",
            b"header: <Subject: Hi>",
            b"end-of-header", b"macros:", b"  i=4AB",
            b"body: <La de da.\r\n>",
            b"end-of-message", b"macros:", b"  i=4AB",
            b"finished",
        ])

    def test_abort(self):
        """Aborting an open message prints 'abort', also when the connection drops in one."""
        driver = Driver()
        driver.start()
        self.assertEqual(driver.send(messages.DATA, messages.ABORT,
                                     messages.Mail(b"<c@example.com>")), [messages.CONTINUE] * 2)
        driver.protocol.connectionLost(None)
        self.assertEqual(driver.take_lines(),
                         [b"data", b"abort", b"envelope-from: <<c@example.com>>", b"abort",
                          b"finished"])

    def test_quiet(self):
        """--quiet prints nothing and answers the same."""
        driver = Driver("--quiet")
        driver.start()
        self.assertEqual(driver.send(messages.DATA), [messages.CONTINUE])
        self.assertEqual(driver.lines, [])

    def test_action_at_stage(self):
        """--action STATUS@STAGE answers STATUS at that stage only."""
        driver = Driver("--action", "reject@envelope-from")
        driver.send(OFFER_V6)
        self.assertEqual(driver.send(*ENVELOPE[:4]), [messages.CONTINUE] * 2)
        self.assertEqual(driver.send(*ENVELOPE[4:6]), [messages.REJECT])

    def test_every_status(self):
        """Each status name sends its reply (skip only where the protocol allows it: body)."""
        for status, reply in test_client.STATUSES.items():
            driver = Driver("--action", f"{status}@body")
            driver.start()
            driver.send(messages.DATA, messages.END_OF_HEADERS)
            self.assertEqual(driver.send(messages.Body(b"x")), [reply], status)

    def test_reply_code(self):
        """With --reply-code a reject becomes that SMTP reply."""
        driver = Driver("--action", "reject@data", "--reply-code", "554 5.7.1 No thanks")
        driver.start()
        self.assertEqual(driver.send(messages.DATA),
                         [messages.ReplyCode(b"554 5.7.1 No thanks")])

    def test_recipient_action(self):
        """--envelope-recipient-action answers per recipient; others get continue."""
        driver = Driver("--envelope-recipient-action", "bad@example.org:temporary-failure",
                        "--envelope-recipient-action", "<worse@example.org>:reject")
        driver.start()
        self.assertEqual(
            driver.send(messages.Rcpt(b"<Bad@Example.org>"), messages.Rcpt(b"<ok@example.org>"),
                        messages.Rcpt(b"<worse@example.org>")),
            [messages.TEMPFAIL, messages.CONTINUE, messages.REJECT])

    def test_modifications(self):
        """At end of message: progress, then the modifications in order, then the final reply."""
        driver = Driver("--progress", "--add-header", "X-Test:yes",
                        "--insert-header", "0:X-First:1", "--change-from", "<n@example.com>",
                        "--replace-body", "new\n", "--quarantine", "held",
                        "--action", "accept")
        driver.start()
        self.assertEqual(driver.send(messages.END_OF_MESSAGE), [
            messages.PROGRESS,
            messages.AddHeader(b"X-Test", b"yes"),
            messages.InsertHeader(0, b"X-First", b"1"),
            messages.ChangeFrom(b"<n@example.com>"),
            messages.ReplaceBody(b"new\r\n"),
            messages.Quarantine(b"held"),
            messages.ACCEPT,
        ])

    def test_wait(self):
        """--wait delays the reply on the clock, not by sleeping."""
        driver = Driver("--wait", "2@helo")
        driver.send(OFFER_V6, CONNECT)
        self.assertEqual(driver.send(messages.Helo(b"x")), [])
        self.assertEqual(driver.lines[-1], b"helo: <x>")
        driver.clock.advance(1.9)
        self.assertEqual(driver.replies(), [])
        driver.clock.advance(0.1)
        self.assertEqual(driver.replies(), [messages.CONTINUE])

    def test_wait_end_of_message_with_progress(self):
        """With --progress the progress goes out at once; modifications follow the wait."""
        driver = Driver("--progress", "--wait", "5", "--add-header", "X-Late:1")
        driver.start()
        self.assertEqual(driver.send(messages.END_OF_MESSAGE), [messages.PROGRESS])
        driver.clock.advance(5)
        self.assertEqual(driver.replies(),
                         [messages.AddHeader(b"X-Late", b"1"), messages.CONTINUE])

    def test_no_reply(self):
        """--no-reply negotiates NR steps and the event, still printed, gets no reply."""
        driver = Driver("--no-reply", "connect,helo")
        (reply,) = driver.send(OFFER_V6)
        self.assertEqual(reply.protocol, c.SMFIP_SKIP | c.SMFIP_NR_CONN | c.SMFIP_NR_HELO)
        self.assertEqual(driver.send(*ENVELOPE[:6]), [messages.CONTINUE])
        self.assertIn(b"helo: <client.example.net>", driver.lines)

    def test_no_event(self):
        """--no-event asks the MTA not to send those stages."""
        driver = Driver("--no-event", "helo,body")
        (reply,) = driver.send(OFFER_V6)
        self.assertEqual(reply.protocol, c.SMFIP_SKIP | c.SMFIP_NOHELO | c.SMFIP_NOBODY)

    def test_macros_request(self):
        """--macros sends symbol lists in the negotiate reply."""
        driver = Driver("--macros", "connect:j,{daemon_name}", "--macros", "end-of-message:i")
        (reply,) = driver.send(OFFER_V6)
        self.assertEqual(reply.macros, {0: [b"j", b"{daemon_name}"], 5: [b"i"]})
        self.assertTrue(reply.actions & c.SMFIF_SETSYMLIST)

    def test_version_2(self):
        """A version 2 MTA gets version 2 and no step it does not know."""
        driver = Driver()
        (reply,) = driver.send(negotiation.offer(2))
        self.assertEqual((reply.version, reply.protocol), (2, 0))
        self.assertTrue(driver.lines[0].startswith(b"negotiate: version=<2>"))


class LineWriterTests(unittest.TestCase):
    """Output goes out one event at a time, flushed, so readers see it live."""

    def test_one_write_per_event(self):
        """An event and its macros block are written and flushed together."""
        class Stream(io.BytesIO):
            flushes = 0

            def flush(self):
                self.flushes += 1

        stream = Stream()
        test_client.LineWriter(stream)([b"helo: <x>", b"macros:", b"  a=b"])
        self.assertEqual(stream.getvalue(), b"helo: <x>\nmacros:\n  a=b\n")
        self.assertEqual(stream.flushes, 1)

    def test_broken_stream(self):
        """A stream that breaks stops the printing, not the milter."""
        class Broken(io.BytesIO):
            def write(self, data):
                raise BrokenPipeError(32, "Broken pipe")

        writer = test_client.LineWriter(Broken())
        writer([b"helo: <x>"])
        writer([b"data"])
        self.assertTrue(writer.broken)


# ---------------------------------------------------------------- the real process

EVENT_LINE = re.compile(
    rb"(negotiate|connect|helo|envelope-from|envelope-recipient|data|header|end-of-header|body"
    rb"|end-of-message|abort|unknown|finished)(:|$)")


def parse_output(output):
    """Split printed output into [(event line, {macro: value})]; other lines continue the event."""
    events = []
    in_macros = False
    for line in output.split(b"\n")[:-1]:
        if line == b"macros:" and events:
            in_macros = True
        elif in_macros and line.startswith(b"  ") and b"=" in line:
            name, _, value = line[2:].partition(b"=")
            events[-1][1][name] = value
        elif EVENT_LINE.match(line) or not events:
            events.append((line, {}))
            in_macros = False
        else:
            events[-1] = (events[-1][0] + b"\n" + line, events[-1][1])
    return events


def event_names(events):
    return [EVENT_LINE.match(line).group(1).decode() for line, _ in events]


class ClientProcess:
    """The milter-test-client console script in a subprocess, its stdout read live."""

    def __init__(self, spec, *args):
        self.spec = spec
        self.args = args
        self.process = None
        self._output = bytearray()
        self._lock = threading.Lock()
        self._reader = None

    def command(self):
        """The installed console script (run-tests installs it with pip install -e .)."""
        return ["milter-test-client"]

    def start(self, ready):
        """Start it and wait until ready() is true (its socket is there)."""
        self.process = subprocess.Popen(
            [*self.command(), "-s", self.spec, *self.args], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 15
        while not ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"milter-test-client exited with {self.process.returncode}: "
                                   f"{self.process.stderr.read()!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("milter-test-client did not start listening")
            time.sleep(0.02)

    def _read(self):
        for line in iter(self.process.stdout.readline, b""):
            with self._lock:
                self._output += line

    def output(self):
        with self._lock:
            return bytes(self._output)

    def wait_for(self, line, timeout=20):
        """Wait until a printed line equals line; return the output so far."""
        deadline = time.monotonic() + timeout
        while line not in self.output().split(b"\n"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {line!r} line after {timeout} s; got:\n"
                                   + self.output().decode("utf-8", "replace"))
            time.sleep(0.02)
        return self.output()

    def stop(self, signum=signal.SIGTERM, timeout=15):
        """Send signum, wait for the exit, return the exit status (SIGKILL after timeout)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        os.kill(self.process.pid, signum)
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
            status = None
        self._reader.join(5)
        self.process.stdout.close()
        self.process.stderr.close()
        return status


def _port_open(port):
    """A readiness check that sees the listening socket without connecting to it.

    Connecting would start (and end) a milter session, which prints "finished".
    """
    def ready():
        try:
            with open("/proc/net/tcp") as table:
                rows = [line.split() for line in table.readlines()[1:]]
        except OSError:  # no procfs: fall back to nothing better than waiting
            time.sleep(1)
            return True
        return any(row[1].endswith(f":{port:04X}") and row[3] == "0A" for row in rows)
    return ready


def _short_tmpdir(testcase):
    """A directory short enough for UNIX socket paths (trial's temp paths are too long)."""
    directory = tempfile.mkdtemp(prefix="mtc-", dir="/tmp")
    testcase.addCleanup(shutil.rmtree, directory, True)
    return directory


class ProcessTests(unittest.TestCase):
    """The installed console script, driven over a real socket with the codec."""

    def start(self, spec, *args, ready):
        client = ClientProcess(spec, *args)
        client.start(ready)
        self.addCleanup(client.stop)
        return client

    def test_socket_session(self):
        """A whole session over TCP prints every event live and gets the scripted replies."""
        port = free_port()
        client = self.start(f"inet:{port}@[127.0.0.1]", "--add-header", "X-Test:yes",
                            "--envelope-recipient-action", "bad@example.org:reject",
                            ready=_port_open(port))
        decoder = FrameDecoder()
        replies = []
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            def exchange(commands, count):
                sock.sendall(b"".join(command.encode() for command in commands))
                while len(replies) < count:
                    data = sock.recv(65536)
                    self.assertTrue(data, "milter-test-client closed the connection")
                    replies.extend(decode_reply(code, payload)
                                   for code, payload in decoder.feed(data))
                return replies

            exchange([OFFER_V6], 1)
            client.wait_for(b"negotiate: version=<6>, action=<" + POSTFIX_ACTIONS.encode()
                            + b">, step=<" + POSTFIX_V6_STEPS.encode() + b">")
            exchange([*ENVELOPE, messages.Rcpt(b"<bad@example.org>"), messages.DATA,
                      messages.Header(b"Subject", b"Hi"), messages.END_OF_HEADERS,
                      messages.Body(b"Hello\r\n"), messages.END_OF_MESSAGE], 12)
            sock.sendall(messages.QUIT.encode())
            output = client.wait_for(b"finished")
        self.assertEqual(replies, [
            messages.Negotiate(6, c.SMFI_CURR_ACTS, c.SMFIP_SKIP, {}),
            *[messages.CONTINUE] * 4, messages.REJECT, *[messages.CONTINUE] * 4,
            messages.AddHeader(b"X-Test", b"yes"), messages.CONTINUE])
        events = parse_output(output)
        self.assertEqual(event_names(events), [
            "negotiate", "connect", "helo", "envelope-from", "envelope-recipient",
            "envelope-recipient", "data", "header", "end-of-header", "body",
            "end-of-message", "finished"])
        self.assertEqual(events[1], (
            b"connect: host=<client.example.net>, address=<inet:50443@[192.0.2.10]>",
            {b"j": b"mx.example.org", b"daemon_name": b"smtpd"}))
        self.assertEqual(events[9][0], b"body: <Hello\r\n>")
        self.assertEqual(client.stop(), 0)

    def test_unix_socket_removed_on_sigint(self):
        """On a UNIX socket it listens, SIGINT stops it with status 0 and the socket is removed."""
        path = os.path.join(_short_tmpdir(self), "milter.sock")
        client = self.start(f"unix:{path}", "--quiet", ready=lambda: os.path.exists(path))
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(OFFER_V6.encode())
            self.assertEqual(sock.recv(100)[4:5], c.NEGOTIATE)
        self.assertEqual(client.stop(signal.SIGINT), 0)
        self.assertFalse(os.path.exists(path))
        self.assertEqual(client.output(), b"")

    def test_stale_unix_socket_replaced(self):
        """A socket file left by a killed run is replaced, as upstream does; SIGTERM exits 0."""
        path = os.path.join(_short_tmpdir(self), "milter.sock")
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()
        client = self.start(f"unix:{path}", ready=lambda: _unix_listening(path))
        self.assertEqual(client.stop(signal.SIGTERM), 0)
        self.assertFalse(os.path.exists(path))

    def test_port_in_use(self):
        """A port it cannot listen on is reported and the exit status is 1."""
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            result = subprocess.run(
                [*ClientProcess("").command(), "-s", f"inet:{port}@[127.0.0.1]"],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        self.assertEqual(result.returncode, 1)
        self.assertIn(b"cannot listen on", result.stderr)


def _unix_listening(path):
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(path)
            return True
        except OSError:
            return False


# ---------------------------------------------------------------- Postfix

MESSAGE = b"""\
From: Sender <sender@harness.test>
To: Recipient <rcpt@example.org>
Subject: milter-test-client interop

La de da de da 1.
La de da de da 2.
"""


class PostfixTests(unittest.TestCase):
    """A private Postfix delivers one mail through the real milter-test-client."""

    def deliver(self, milter_protocol):
        """Send MESSAGE through Postfix at milter_protocol; return (events, delivered bytes)."""
        port = free_port()
        client = ClientProcess(f"inet:{port}@[127.0.0.1]", "--add-header",
                               "X-Test-Client:added")
        client.start(_port_open(port))
        self.addCleanup(client.stop)
        postfix = Postfix(self.mktemp(), milters=[f"inet:127.0.0.1:{port}"],
                                        milter_protocol=milter_protocol)
        postfix.start()
        self.addCleanup(postfix.stop)
        result = postfix.send("sender@harness.test", ["rcpt@example.org"], MESSAGE)
        self.assertTrue(result.accepted, result)
        (delivered,) = postfix.wait_delivered(1, timeout=30)
        output = client.wait_for(b"finished", timeout=30)
        self.assertEqual(client.stop(), 0)
        return parse_output(output), delivered

    def check(self, events, delivered, version, stages):
        names = event_names(events)
        headers = names.count("header")
        self.assertGreaterEqual(headers, 3)
        first_header = names.index("header")
        collapsed = names[:first_header + 1] + names[first_header + headers:]
        self.assertEqual(collapsed, stages)
        self.assertEqual(events[0][0][:22], b"negotiate: version=<%d>" % version)
        connect_line, connect_macros = events[1]
        self.assertTrue(connect_line.startswith(b"connect: host=<localhost>, address=<inet:"),
                        connect_line)
        self.assertTrue(connect_line.endswith(b"@[127.0.0.1]>"), connect_line)
        self.assertEqual(connect_macros[b"j"], b"mta.harness.test")
        self.assertIn(b"daemon_name", connect_macros)
        self.assertEqual(events[names.index("helo")][0], b"helo: <client.harness.test>")
        self.assertEqual(events[names.index("envelope-from")][0],
                         b"envelope-from: <<sender@harness.test>>")
        self.assertEqual(events[names.index("envelope-recipient")][0],
                         b"envelope-recipient: <<rcpt@example.org>>")
        header_lines = [line for line, _ in events if line.startswith(b"header: ")]
        for expected in (b"header: <From: Sender <sender@harness.test>>",
                         b"header: <To: Recipient <rcpt@example.org>>",
                         b"header: <Subject: milter-test-client interop>"):
            self.assertIn(expected, header_lines)
        self.assertEqual(events[names.index("body")][0],
                         b"body: <La de da de da 1.\r\nLa de da de da 2.\r\n>")
        self.assertRegex(delivered, rb"\nX-Test-Client: added\r?\n")

    def test_protocol_6(self):
        """At milter_protocol 6 every stage prints, with Postfix's macros; the header lands."""
        events, delivered = self.deliver(6)
        self.check(events, delivered, 6, [
            "negotiate", "connect", "helo", "envelope-from", "envelope-recipient", "data",
            "header", "end-of-header", "body", "end-of-message", "finished"])

    def test_protocol_2(self):
        """At milter_protocol 2 there is no data event; the rest prints and the header lands."""
        events, delivered = self.deliver(2)
        self.check(events, delivered, 2, [
            "negotiate", "connect", "helo", "envelope-from", "envelope-recipient",
            "header", "end-of-header", "body", "end-of-message", "finished"])
