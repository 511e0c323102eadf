"""Interop: MilterClientProtocol driving a real libmilter milter (python3-milter) on loopback."""

import os
import tempfile

from twisted.internet import defer, task
from twisted.trial import unittest

from miltermanager import client
from miltermanager.client import MilterConnectError, Response, Timeouts
from miltermanager.protocol import constants as c
from miltermanager.protocol import negotiation
from miltermanager.protocol.messages import (
    CONTINUE, DATA, END_OF_HEADERS, END_OF_MESSAGE, AddHeader, Body, Connect, Header, Helo,
    Macro, Mail, Rcpt, ReplyCode,
)
from tests.peers.fixtures import HOST, LibmilterMilter, free_port


TIMEOUTS = Timeouts(connection=10.0, writing=10.0, reading=10.0, end_of_message=10.0)
QUEUE_ID = b"4BC5D2125D2"
CONNECT = Connect(b"client.example.net", c.FAMILY_INET, 52258, b"192.0.2.10")
RECIPIENTS = (b"<ok@example.org>", b"<reject@example.org>", b"<tempfail@example.org>")
HEADERS = ((b"From", b"a@example.net"), (b"To", b"ok@example.org"), (b"Subject", b"Hello"))


class LibmilterSessionTests(unittest.TestCase):
    """A full SMTP session's worth of commands against tests/peers/libmilter_milter.py."""

    def start_milter(self, *flags):
        """Start the libmilter peer; it is stopped by PID at cleanup."""
        milter = LibmilterMilter(self.mktemp(), "m1", *flags)
        milter.start()
        self.addCleanup(milter.stop)
        return milter

    @defer.inlineCallbacks
    def connect(self, milter, version):
        """Connect and negotiate at version; close (and wait for it) at cleanup."""
        from twisted.internet import reactor
        protocol = yield client.connect(reactor, milter.spec, TIMEOUTS)
        self.addCleanup(self.close, protocol)
        options = yield protocol.negotiate(negotiation.offer(version))
        return protocol, options

    def close(self, protocol):
        """Send Quit and wait until the socket is closed, so the reactor is clean."""
        protocol.close()
        return protocol.when_closed()

    @defer.inlineCallbacks
    def session(self, protocol):
        """Send connect .. end of message as Postfix would; return the replies by step."""
        replies = {}
        send = protocol.send
        yield send(Macro(c.CONNECT, {b"j": b"mx.example.org", b"{daemon_name}": b"smtpd"}))
        replies["connect"] = yield send(CONNECT)
        replies["helo"] = yield send(Helo(b"client.example.net"))
        yield send(Macro(c.MAIL, {b"i": QUEUE_ID, b"{mail_addr}": b"a@example.net"}))
        replies["mail"] = yield send(Mail(b"<a@example.net>", [b"SIZE=100"]))
        for recipient in RECIPIENTS:
            replies[recipient] = yield send(Rcpt(recipient))
        replies["data"] = yield send(DATA)
        replies["headers"] = []
        for name, value in HEADERS:
            replies["headers"].append((yield send(Header(name, value))))
        replies["eoh"] = yield send(END_OF_HEADERS)
        replies["body"] = yield send(Body(b"Hello,\r\nworld.\r\n"))
        replies["eom"] = yield send(END_OF_MESSAGE)
        return replies

    def assert_session(self, replies, data_sent=True):
        """Check the replies libmilter_milter.py gives to session()."""
        ok = Response(CONTINUE, [], 0)
        self.assertEqual(replies["mail"], ok)
        self.assertEqual(replies[b"<ok@example.org>"], ok)
        self.assertEqual(replies[b"<reject@example.org>"],
                         Response(ReplyCode(b"550 5.7.1 m1 rejected recipient"), [], 0))
        self.assertEqual(replies[b"<tempfail@example.org>"],
                         Response(ReplyCode(b"451 4.7.1 m1 tempfail recipient"), [], 0))
        self.assertEqual(replies["data"], ok if data_sent else None)
        self.assertEqual(replies["headers"], [ok] * len(HEADERS))
        self.assertEqual(replies["eoh"], ok)
        self.assertEqual(replies["body"], ok)
        self.assertEqual(
            replies["eom"],
            Response(CONTINUE, [AddHeader(b"X-Libmilter", b"m1 saw " + QUEUE_ID)], 0))

    def assert_events(self, milter, data_sent=True):
        """Check the callbacks the milter logged saw what was sent."""
        events = milter.events()
        names = [event["event"] for event in events]
        expected = (["negotiate", "connect", "helo", "envfrom"] + ["envrcpt"] * 3
                    + (["data"] if data_sent else []) + ["header"] * 3 + ["eoh", "body", "eom"])
        self.assertEqual(names[:len(expected)], expected)
        by_name = {event["event"]: event for event in events}
        self.assertEqual(by_name["connect"]["hostname"], "client.example.net")
        self.assertEqual(by_name["connect"]["hostaddr"], ["192.0.2.10", 52258])
        self.assertEqual(by_name["envfrom"]["params"], ["SIZE=100"])
        self.assertEqual(by_name["eom"]["macros"]["i"], QUEUE_ID.decode())
        self.assertEqual(by_name["eom"]["macros"]["j"], "mx.example.org")
        self.assertEqual(by_name["body"]["chunk"], "Hello,\r\nworld.\r\n")

    @defer.inlineCallbacks
    def test_session_version_6(self):
        """At version 6 every step is answered; reject@/tempfail@ get 550/451; EOM adds a header."""
        milter = self.start_milter()
        protocol, options = yield self.connect(milter, 6)
        self.assertEqual(options.version, 6)
        self.assertEqual(protocol.negotiate_reply.version, 6)
        replies = yield self.session(protocol)
        self.assertEqual(replies["connect"], Response(CONTINUE, [], 0))
        self.assertEqual(replies["helo"], Response(CONTINUE, [], 0))
        self.assert_session(replies)
        self.assert_events(milter)

    @defer.inlineCallbacks
    def test_session_version_2(self):
        """At version 2 DATA is not sent (fires None); everything else is as at version 6."""
        milter = self.start_milter()
        protocol, options = yield self.connect(milter, 2)
        self.assertEqual(options.version, 2)
        self.assertFalse(options.sends(c.DATA))
        replies = yield self.session(protocol)
        self.assertEqual(replies["connect"], Response(CONTINUE, [], 0))
        self.assert_session(replies, data_sent=False)
        self.assert_events(milter, data_sent=False)

    @defer.inlineCallbacks
    def test_no_reply_steps_version_6(self):
        """A milter negotiating NR for connect/helo gets them without replies (fire None)."""
        milter = self.start_milter("--noreply-connect-helo")
        protocol, options = yield self.connect(milter, 6)
        self.assertFalse(options.replies(c.CONNECT))
        self.assertFalse(options.replies(c.HELO))
        replies = yield self.session(protocol)
        self.assertIsNone(replies["connect"])
        self.assertIsNone(replies["helo"])
        self.assert_session(replies)
        self.assert_events(milter)

    @defer.inlineCallbacks
    def test_no_reply_steps_version_2(self):
        """At version 2 NR cannot be negotiated: libmilter answers connect/helo itself."""
        milter = self.start_milter("--noreply-connect-helo")
        protocol, options = yield self.connect(milter, 2)
        self.assertTrue(options.replies(c.CONNECT))
        replies = yield self.session(protocol)
        self.assertEqual(replies["connect"], Response(CONTINUE, [], 0))
        self.assertEqual(replies["helo"], Response(CONTINUE, [], 0))
        self.assert_session(replies, data_sent=False)

    @defer.inlineCallbacks
    def test_pipelined_sends(self):
        """Commands sent without waiting go out one at a time and each gets its own reply."""
        milter = self.start_milter()
        protocol, _ = yield self.connect(milter, 6)
        sends = [protocol.send(CONNECT), protocol.send(Helo(b"h")), protocol.send(Mail(b"<a@b>"))]
        sends += [protocol.send(Rcpt(recipient)) for recipient in RECIPIENTS]
        results = yield defer.gatherResults(sends)
        self.assertEqual([type(result.reply) for result in results],
                         [type(CONTINUE)] * 4 + [ReplyCode] * 2)

    @defer.inlineCallbacks
    def test_quit_runs_close_callback(self):
        """close() sends Quit: the milter's close callback runs."""
        from twisted.internet import reactor
        milter = self.start_milter()
        protocol, _ = yield self.connect(milter, 6)
        yield protocol.send(CONNECT)
        yield self.close(protocol)
        for _ in range(100):
            if any(event["event"] == "close" for event in milter.events()):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(milter.events()[-1]["event"], "close")


class ConnectFailureTests(unittest.TestCase):
    """connect() to nothing fails cleanly, naming the spec."""

    @defer.inlineCallbacks
    def test_closed_port(self):
        """A closed TCP port gives MilterConnectError with the spec and 'refused'."""
        from twisted.internet import reactor
        spec = f"inet:{free_port()}@{HOST}"
        with self.assertRaises(MilterConnectError) as caught:
            yield client.connect(reactor, spec, TIMEOUTS)
        message = str(caught.exception)
        self.assertIn(f"cannot connect to the milter at {spec}", message)
        self.assertIn("refused", message.lower())

    @defer.inlineCallbacks
    def test_missing_unix_socket(self):
        """A UNIX socket path that does not exist gives MilterConnectError with the spec."""
        from twisted.internet import reactor
        # Under /tmp: trial's temp paths are longer than a UNIX socket path may be.
        directory = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, directory)
        spec = f"unix:{directory}/missing.sock"
        with self.assertRaises(MilterConnectError) as caught:
            yield client.connect(reactor, spec, TIMEOUTS)
        self.assertIn(spec, str(caught.exception))
