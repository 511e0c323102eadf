"""Tests for miltermanager.sockets: direct writes and TCP options."""

import socket

from twisted.internet.address import UNIXAddress
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from miltermanager import sockets
from tests.test_twisted_internals import FakeSocket, FakeTransport


class WriterTests(SynchronousTestCase):
    """sockets.writer; its choices are tested in test_twisted_internals."""

    def test_sends_at_once_when_nothing_is_queued(self):
        """A socket transport with an empty queue gets a writer that sends directly."""
        transport = FakeTransport(FakeSocket())
        sockets.writer(transport)(b"packet")
        self.assertEqual((transport.socket.sent, transport.queued), ([b"packet"], []))

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
        transport = FakeTransport(FakeSocket(family=socket.AF_UNIX), UNIXAddress("/tmp/x"))
        self.assertIsNone(sockets.tcp_socket(transport))
        self.assertIsNone(transport.no_delay)

    def test_socket_family_decides(self):
        """A transport's socket is asked its family, not the kernel its address (a system call)."""
        transport = FakeTransport(FakeSocket(family=socket.AF_INET6), UNIXAddress("/tmp/x"))
        self.assertIs(sockets.tcp_socket(transport), transport.socket)
        self.assertTrue(transport.no_delay)

    def test_transport_without_socket(self):
        """Without a socket (TLS over TCP, say) the address decides; no socket is handed out."""
        transport = FakeTransport(None)
        self.assertIsNone(sockets.tcp_socket(transport))
        self.assertTrue(transport.no_delay)
        unix = FakeTransport(None, UNIXAddress("/tmp/x"))
        self.assertIsNone(sockets.tcp_socket(unix))
        self.assertIsNone(unix.no_delay)

    def test_quick_ack(self):
        """quick_ack sets TCP_QUICKACK on the socket."""
        sock = FakeSocket()
        self.assertTrue(sockets.quick_ack(sock))
        self.assertEqual(sock.options, [(socket.IPPROTO_TCP, sockets.TCP_QUICKACK, 1)])
