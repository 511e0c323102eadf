"""Interop: a BODY chunk longer than 65535 bytes reaches real children in pieces they can read."""

from twisted.internet import defer
from twisted.trial import unittest

from miltermanager import client
from miltermanager.client import Response, Timeouts
from miltermanager.protocol import constants as c
from miltermanager.protocol import negotiation
from miltermanager.protocol.messages import (
    CONTINUE, END_OF_HEADERS, END_OF_MESSAGE, AddHeader, Body, Connect, Header, Helo, Macro,
    Mail, Rcpt,
)
from miltermanager.testing import Script, ScriptedChild
from tests.peers.fixtures import LibmilterMilter

TIMEOUTS = Timeouts(connection=10.0, writing=10.0, reading=10.0, end_of_message=10.0)
QUEUE_ID = b"4BC5D2125D2"
CONNECT = Connect(b"client.example.net", c.FAMILY_INET, 52258, b"192.0.2.10")
# 200,000 bytes of printable CRLF lines, so the libmilter peer's JSON log holds them as is.
LINE = b"".join(bytes([32 + i % 95]) for i in range(78)) + b"\r\n"
CHUNK = (LINE * (200_000 // len(LINE) + 1))[:200_000]


class LongBodyTestsMixin:
    """Send one message with a 200,000-byte body chunk to a child at protocol version 6."""

    @defer.inlineCallbacks
    def connect(self, spec, offer=None):
        """Connect and negotiate; close (and wait for it) at cleanup."""
        from twisted.internet import reactor
        protocol = yield client.connect(reactor, spec, TIMEOUTS)
        self.addCleanup(self.close, protocol)
        yield protocol.negotiate(offer or negotiation.offer(6))
        return protocol

    def close(self, protocol):
        protocol.close()
        return protocol.when_closed()

    @defer.inlineCallbacks
    def message(self, protocol):
        """Connect .. end of message with CHUNK as the only body chunk; return the replies."""
        send = protocol.send
        yield send(CONNECT)
        yield send(Helo(b"client.example.net"))
        yield send(Mail(b"<a@example.net>"), Macro(c.MAIL, {b"i": QUEUE_ID}))
        yield send(Rcpt(b"<ok@example.org>"))
        yield send(Header(b"Subject", b"Long"))
        yield send(END_OF_HEADERS)
        body = yield send(Body(CHUNK), Macro(c.BODY, {b"i": QUEUE_ID}))
        eom = yield send(END_OF_MESSAGE, Macro(c.END_OF_MESSAGE, {b"i": QUEUE_ID}))
        return body, eom


class ServerLibraryTests(LongBodyTestsMixin, unittest.TestCase):
    """The project's own server library (ScriptedChild) on loopback."""

    def start_child(self):
        """Listen on loopback; stop listening and wait for its connections at cleanup."""
        from twisted.internet import reactor
        child = ScriptedChild(Script())
        child.start(reactor)
        self.addCleanup(child.when_closed)
        self.addCleanup(child.stop)
        return child

    @defer.inlineCallbacks
    def test_long_body_in_pieces(self):
        """The child sees 65535+65535+65535+3395 bytes, all of CHUNK, each piece with its macro."""
        child = self.start_child()
        protocol = yield self.connect(child.spec)
        body, eom = yield self.message(protocol)
        self.assertEqual(body, Response(CONTINUE, [], 0))
        self.assertEqual(eom, Response(CONTINUE, [], 0))
        bodies = [event for event in child.events if event.name == "body"]
        self.assertEqual([len(event.command.chunk) for event in bodies],
                         [65535, 65535, 65535, 3395])
        self.assertEqual(b"".join(event.command.chunk for event in bodies), CHUNK)
        self.assertEqual([event.macros.get(b"i") for event in bodies], [QUEUE_ID] * 4)


class LibmilterTests(LongBodyTestsMixin, unittest.TestCase):
    """A real libmilter milter, which drops the connection on a packet over 65535 bytes."""

    def start_milter(self, *flags):
        milter = LibmilterMilter(self.mktemp(), "m1", *flags)
        milter.start()
        self.addCleanup(milter.stop)
        return milter

    @defer.inlineCallbacks
    def test_long_body_reaches_the_body_callback(self):
        """The body callback sees all 200,000 bytes, in 65535-byte pieces; EOM answers as usual."""
        milter = self.start_milter()
        protocol = yield self.connect(milter.spec)
        body, eom = yield self.message(protocol)
        self.assertEqual(body, Response(CONTINUE, [], 0))
        self.assertEqual(
            eom, Response(CONTINUE, [AddHeader(b"X-Libmilter", b"m1 saw " + QUEUE_ID)], 0))
        chunks = [event["chunk"].encode("utf-8", "surrogateescape")
                  for event in milter.events() if event["event"] == "body"]
        self.assertEqual([len(chunk) for chunk in chunks], [65535, 65535, 65535, 3395])
        self.assertEqual(b"".join(chunks), CHUNK)

    @defer.inlineCallbacks
    def test_mds_offered(self):
        """Offered MDS_256K and MDS_1M, the milter gets pieces no longer than what it echoed."""
        milter = self.start_milter()
        offer = negotiation.offer(6)
        offer.protocol |= c.SMFIP_MDS_256K | c.SMFIP_MDS_1M
        protocol = yield self.connect(milter.spec, offer)
        limit = protocol.options.max_data_size
        body, _ = yield self.message(protocol)
        self.assertEqual(body.reply, CONTINUE)
        chunks = [event["chunk"].encode("utf-8", "surrogateescape")
                  for event in milter.events() if event["event"] == "body"]
        self.assertEqual(b"".join(chunks), CHUNK)
        self.assertLessEqual(max(len(chunk) for chunk in chunks), limit)
