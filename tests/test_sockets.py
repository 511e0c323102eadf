"""Tests for miltermanager.sockets: direct writes and TCP options."""

import errno
import socket

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase

from miltermanager import sockets

try:
    from twisted.internet.testing import StringTransport
except ImportError:  # Twisted < 21.2
    from twisted.test.proto_helpers import StringTransport


class FakeSocket:
    """Takes at most `room` bytes per send; or raises `error`."""

    def __init__(self, room=1 << 20, error=None):
        self.room = room
        self.error = error
        self.sent = []
        self.options = []

    def send(self, data):
        if self.error is not None:
            raise self.error
        taken = bytes(data[:self.room])
        self.sent.append(taken)
        return len(taken)

    def setsockopt(self, level, option, value):
        self.options.append((level, option, value))


class FakeTransport:
    """The parts of Twisted's socket transports that writer() looks at."""

    def __init__(self, sock, address=None):
        self.socket = sock
        self.address = address or IPv4Address("TCP", "127.0.0.1", 1)
        self._tempDataLen = 0
        self.dataBuffer = b""
        self.offset = 0
        self.connected = True
        self.disconnecting = False
        self.queued = []
        self.no_delay = None

    def write(self, data):
        self.queued.append(data)
        self._tempDataLen += len(data)

    def getHost(self):
        return self.address

    def setTcpNoDelay(self, enabled):
        self.no_delay = enabled


class WriterTests(SynchronousTestCase):
    def test_sends_at_once_when_nothing_is_queued(self):
        """With an empty queue the data goes straight to the socket, nothing is queued."""
        transport = FakeTransport(FakeSocket())
        sockets.writer(transport)(b"packet")
        self.assertEqual((transport.socket.sent, transport.queued), ([b"packet"], []))

    def test_rest_of_a_partial_send_is_queued(self):
        """What the kernel does not take goes through transport.write."""
        transport = FakeTransport(FakeSocket(room=2))
        sockets.writer(transport)(b"packet")
        self.assertEqual((transport.socket.sent, transport.queued), ([b"pa"], [b"cket"]))

    def test_queued_data_keeps_its_order(self):
        """Once something is queued, later writes queue behind it."""
        transport = FakeTransport(FakeSocket(room=2))
        write = sockets.writer(transport)
        write(b"first")
        write(b"second")
        self.assertEqual(transport.queued, [b"rst", b"second"])

    def test_would_block(self):
        """A full socket buffer queues everything."""
        transport = FakeTransport(FakeSocket(error=BlockingIOError(errno.EAGAIN, "full")))
        sockets.writer(transport)(b"packet")
        self.assertEqual(transport.queued, [b"packet"])

    def test_error_left_to_twisted(self):
        """A socket error queues the data so Twisted's write path reports it."""
        transport = FakeTransport(FakeSocket(error=ConnectionResetError()))
        sockets.writer(transport)(b"packet")
        self.assertEqual(transport.queued, [b"packet"])

    def test_closing_transport_queues(self):
        """A transport that is disconnecting gets the data through its own write."""
        transport = FakeTransport(FakeSocket())
        transport.disconnecting = True
        sockets.writer(transport)(b"packet")
        self.assertEqual((transport.socket.sent, transport.queued), ([], [b"packet"]))

    def test_other_transports_use_their_write(self):
        """A transport without a plain socket is written the usual way."""
        transport = StringTransport()
        self.assertEqual(sockets.writer(transport), transport.write)


class TCPOptionTests(SynchronousTestCase):
    def test_no_delay_on_tcp(self):
        """TCP transports get TCP_NODELAY and hand out their socket."""
        transport = FakeTransport(FakeSocket())
        self.assertIs(sockets.tcp_socket(transport), transport.socket)
        self.assertTrue(transport.no_delay)

    def test_unix_transport_left_alone(self):
        """A UNIX transport is not TCP, whatever interfaces it claims."""
        transport = FakeTransport(FakeSocket(), UNIXAddress("/tmp/x"))
        self.assertIsNone(sockets.tcp_socket(transport))
        self.assertIsNone(transport.no_delay)

    def test_quick_ack(self):
        """quick_ack sets TCP_QUICKACK on the socket."""
        sock = FakeSocket()
        self.assertTrue(sockets.quick_ack(sock))
        self.assertEqual(sock.options, [(socket.IPPROTO_TCP, sockets.TCP_QUICKACK, 1)])
