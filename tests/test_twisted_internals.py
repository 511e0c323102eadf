"""Tests for twisted_internals: the running Twisted still has what we use; else the fallback."""

import array
import errno
import os
import shutil
import socket
import tempfile

from twisted.internet import defer, protocol, reactor, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionDone
from twisted.internet.error import ConnectionRefusedError as Refused
from twisted.internet.interfaces import IFileDescriptorReceiver, IPushProducer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import log
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from miltermanager import twisted_internals


class _Peer(protocol.Protocol):
    """Fires `lost` when the connection ends, so a test can wait for its cleanup."""

    def __init__(self):
        self.lost = defer.Deferred()
        self.reason = None

    def connectionLost(self, reason=None):
        self.reason = reason
        self.lost.callback(None)


class _Factory(protocol.Factory):
    def buildProtocol(self, addr):
        self.built = _Peer()
        return self.built


class RealTransportTests(TestCase):
    """direct_writer on the transports the running Twisted really makes (UNIX and TCP)."""

    def connected_pair(self, family):
        """Return (Twisted's transport for one end, the other end as a plain socket)."""
        if family == socket.AF_UNIX:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.addCleanup(listener.close)
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            theirs = socket.create_connection(listener.getsockname())
            ours, _ = listener.accept()
        self.addCleanup(theirs.close)
        theirs.setblocking(False)
        ours.setblocking(False)
        factory = _Factory()
        reactor.adoptStreamConnection(ours.fileno(), family, factory)
        ours.close()  # the reactor holds its own duplicate
        peer = factory.built

        def close():
            peer.transport.abortConnection()
            return peer.lost

        self.addCleanup(close)
        return peer.transport, theirs

    def check_sends_at_once(self, family):
        transport, theirs = self.connected_pair(family)
        for name in twisted_internals._WRITE_BUFFER:
            self.assertTrue(hasattr(transport, name), name)
        write = twisted_internals.direct_writer(transport)
        self.assertNotEqual(write, transport.write)
        write(b"packet")
        # Twisted's own write only queues until the reactor turns: arriving now is the direct send.
        self.assertEqual(theirs.recv(100), b"packet")
        self.assertNotIn(transport, reactor.getWriters())

    def test_unix_sends_at_once(self):
        """On the running Twisted's UNIX transport the buffer is readable and sends are direct."""
        self.check_sends_at_once(socket.AF_UNIX)

    def test_tcp_sends_at_once(self):
        """On the running Twisted's TCP transport the buffer is readable and sends are direct."""
        self.check_sends_at_once(socket.AF_INET)

    def test_queued_data_not_overtaken(self):
        """With data in Twisted's buffer a write queues behind it instead of being sent first."""
        transport, theirs = self.connected_pair(socket.AF_UNIX)
        write = twisted_internals.direct_writer(transport)
        transport.write(b"first")
        write(b"second")
        self.assertRaises(BlockingIOError, theirs.recv, 100)
        self.assertEqual(transport._tempDataLen, len(b"firstsecond"))


def _read_to_end(sock):
    """Everything the plain socket receives until the other end closes (it must have)."""
    sock.setblocking(True)
    sock.settimeout(5)
    received = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return received
        received += data


def _ended(peer):
    """A Deferred of its own that fires once peer's connection is lost.

    Not peer.lost itself: the cleanup of connected_pair waits on that one.
    """
    ended = defer.Deferred()

    def fire(result):
        ended.callback(None)
        return result
    peer.lost.addBoth(fire)
    return ended


class LoseConnectionTests(TestCase):
    """lose_connection on the transports the running Twisted really makes."""

    connected_pair = RealTransportTests.connected_pair

    def ends_done(self, transport, theirs, expected):
        """Fires once transport's connection is lost: with ConnectionDone, theirs got expected."""
        peer = transport.protocol

        def lost(_):
            peer.reason.trap(ConnectionDone)
            self.assertEqual(_read_to_end(theirs), expected)
        return _ended(peer).addCallback(lost)

    def check_closes_at_once(self, family):
        transport, theirs = self.connected_pair(family)
        for name in twisted_internals._CLOSE_STATE:
            self.assertTrue(hasattr(transport, name), name)
        self.assertFalse(transport.TLS)
        peer = transport.protocol
        twisted_internals.lose_connection(transport)
        # Not registered for writing (what Twisted's loseConnection does), not reading any more,
        # and connectionLost still to come, after the call, as with loseConnection.
        self.assertNotIn(transport, reactor.getWriters())
        self.assertNotIn(transport, reactor.getReaders())
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(peer.reason)
        return self.ends_done(transport, theirs, b"")

    def test_tcp_closes_at_once(self):
        """A TCP connection with nothing queued closes in the next turn, with ConnectionDone."""
        return self.check_closes_at_once(socket.AF_INET)

    def test_unix_closes_at_once(self):
        """A UNIX connection with nothing queued closes in the next turn, with ConnectionDone."""
        return self.check_closes_at_once(socket.AF_UNIX)

    def test_written_after_is_delivered_before_the_end(self):
        """What is written after lose_connection is flushed by Twisted, then the connection ends."""
        transport, theirs = self.connected_pair(socket.AF_INET)
        twisted_internals.lose_connection(transport)
        transport.write(b"late")
        twisted_internals.direct_writer(transport)(b" and later")
        return self.ends_done(transport, theirs, b"late and later")

    def test_queued_data_goes_the_usual_way(self):
        """With data in Twisted's buffer it is Twisted's loseConnection: flushed, then closed."""
        transport, theirs = self.connected_pair(socket.AF_UNIX)
        transport.write(b"queued")
        twisted_internals.lose_connection(transport)
        self.assertIn(transport, reactor.getWriters())
        return self.ends_done(transport, theirs, b"queued")

    def test_paused_producer_goes_the_usual_way(self):
        """A paused producer is Twisted's to resume before it closes: left to loseConnection."""
        transport, theirs = self.connected_pair(socket.AF_UNIX)
        producer = _Producer()
        transport.registerProducer(producer, True)
        transport.producerPaused = True
        twisted_internals.lose_connection(transport)
        self.assertIn(transport, reactor.getWriters())
        transport.unregisterProducer()  # Twisted closes once the producer is gone
        return self.ends_done(transport, theirs, b"")

    def test_fallback_without_state(self):
        """A transport without FileDescriptor's state (StringTransport) gets its loseConnection."""
        transport = StringTransport()
        twisted_internals.lose_connection(transport)
        self.assertTrue(transport.disconnecting)

    def test_fallback_without_any_of_the_state(self):
        """A reactor's transport missing any attribute read (another Twisted): loseConnection."""
        for name in twisted_internals._CLOSE_STATE:
            transport, _ = self.connected_pair(socket.AF_UNIX)
            transport.registerProducer(_Producer(), True)  # so that every attribute is read
            setattr(transport, "loseConnection", lambda: setattr(transport, "fell_back", True))
            self.addCleanup(transport.__dict__.pop, "loseConnection")
            hidden = type("Hidden", (type(transport),), {name: property(_missing)})
            transport.__class__ = hidden
            self.addCleanup(setattr, transport, "__class__", hidden.__mro__[1])
            twisted_internals.lose_connection(transport)
            self.assertTrue(getattr(transport, "fell_back", False), name)
            self.assertIn(transport, reactor.getReaders(), name)  # still reading: not ours


def _missing(transport):
    raise AttributeError("not in this Twisted")


@implementer(IPushProducer)
class _Producer:
    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass

class _Dialler(protocol.ClientFactory):
    """Builds a _Receiving that fires `received`; fires `failed` (failure in `failure`) instead."""

    def __init__(self):
        self.received = defer.Deferred()
        self.failed = defer.Deferred()
        self.failure = None

    def buildProtocol(self, addr):
        return _Receiving(self.received)

    def clientConnectionFailed(self, connector, reason):
        self.failure = reason
        self.failed.callback(None)


class _Greeter(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"hello")


class LeanConnectTests(TestCase):
    """connect_tcp and connect_unix on the running Twisted's reactor (epoll)."""

    def setUp(self):
        self.factory = protocol.Factory.forProtocol(_Greeter)

    @defer.inlineCallbacks
    def dial(self, connect, *address):
        """Connect with connect(reactor, *address, ...): the client's protocol once it has our data."""
        dialler = _Dialler()
        connector = connect(reactor, *address, dialler, 5)
        self.assertIsInstance(connector.transport, twisted_internals._LeanConnect)
        client = yield dialler.received
        self.assertNotIn(client.transport, reactor.getWriters())
        self.assertIn(client.transport, reactor.getReaders())
        lost = client.lost
        client.transport.loseConnection()
        yield lost
        return client

    @defer.inlineCallbacks
    def test_tcp_connects(self):
        """connect_tcp: the lean client connects, reads, is not left registered for writing."""
        port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = yield self.dial(twisted_internals.connect_tcp, "127.0.0.1", port.getHost().port)
        self.assertEqual(client.received, b"hello")

    @defer.inlineCallbacks
    def test_loopback_connects_without_waiting_for_writability(self):
        """On the loopback the connection is made in the first doConnect: it never registers
        for writing, so no reactor turn waits for the handshake."""
        port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        dialler = _Dialler()
        connector = twisted_internals.connect_tcp(
            reactor, "127.0.0.1", port.getHost().port, dialler, 5)
        client = connector.transport
        writes = []
        client.startWriting = lambda: writes.append(True)
        received = yield dialler.received
        self.assertEqual((received.received, writes), (b"hello", []))
        del client.startWriting
        received.transport.loseConnection()
        yield received.lost

    def test_socket_made_non_blocking_and_close_on_exec(self):
        """The lean clients' sockets come non-blocking and close-on-exec from socket() itself."""
        for client in (twisted_internals._TCPClient, twisted_internals._UNIXClient):
            sock = client.createInternetSocket(client.__new__(client))
            self.addCleanup(sock.close)
            self.assertEqual((sock.gettimeout(), os.get_blocking(sock.fileno()),
                              os.get_inheritable(sock.fileno()), sock.type),
                             (0.0, False, False, socket.SOCK_STREAM), client)

    @defer.inlineCallbacks
    def test_unix_connects(self):
        """connect_unix: the same over a UNIX socket."""
        path = os.path.join(tempfile.mkdtemp(), "s")
        self.addCleanup(shutil.rmtree, os.path.dirname(path))
        port = reactor.listenUNIX(path, self.factory)
        self.addCleanup(port.stopListening)
        client = yield self.dial(twisted_internals.connect_unix, path)
        self.assertEqual(client.received, b"hello")

    @defer.inlineCallbacks
    def failures(self, connect, twisted_connect, address):
        """The failure of our connect and of Twisted's to address, for comparison."""
        found = []
        for dial in (connect, twisted_connect):
            dialler = _Dialler()
            dial(reactor, *address, dialler, 5)
            yield dialler.failed
            found.append(dialler.failure)
        return found

    @defer.inlineCallbacks
    def test_tcp_refused_as_twisted_says(self):
        """A closed port fails as Twisted's connectTCP fails: ConnectionRefusedError."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        closed_port = listener.getsockname()[1]
        listener.close()
        ours, theirs = yield self.failures(
            twisted_internals.connect_tcp,
            lambda r, *a: r.connectTCP(*a), ("127.0.0.1", closed_port))
        self.assertIs(theirs.type, Refused)
        self.assertIs(ours.type, theirs.type)

    @defer.inlineCallbacks
    def test_unix_missing_as_twisted_says(self):
        """A missing socket file fails as Twisted's connectUNIX fails."""
        path = os.path.join(tempfile.mkdtemp(), "missing")
        self.addCleanup(shutil.rmtree, os.path.dirname(path))
        ours, theirs = yield self.failures(
            twisted_internals.connect_unix, lambda r, *a: r.connectUNIX(*a), (path,))
        self.assertIs(ours.type, theirs.type)
        self.assertEqual(ours.getErrorMessage(), theirs.getErrorMessage())

    def test_other_reactors_dial_their_own_way(self):
        """Any reactor but epoll (here a memory reactor) gets connectTCP and connectUNIX."""
        memory = MemoryReactorClock()
        factory = protocol.ClientFactory()
        twisted_internals.connect_tcp(memory, "127.0.0.1", 25, factory, 4)
        twisted_internals.connect_unix(memory, "/run/m.sock", factory, 4)
        self.assertEqual(memory.tcpClients, [("127.0.0.1", 25, factory, 4, None)])
        self.assertEqual(memory.unixClients[0][:3], ("/run/m.sock", factory, 4))


class _Receiving(_Peer):
    """Keeps what arrives; fires `received` with itself at the first data."""

    def __init__(self, received):
        super().__init__()
        self.received = b""
        self._waiting = received

    def dataReceived(self, data):
        self.received += data
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.callback(self)


class FakeSocket:
    """Takes at most `room` bytes per send; or raises `error`; records socket options."""

    def __init__(self, room=1 << 20, error=None, family=socket.AF_INET):
        self.room = room
        self.error = error
        self.family = family
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
    """The parts of Twisted's socket transports that direct_writer and sockets look at."""

    def __init__(self, sock, address=None):
        self.socket = sock
        self.address = address or IPv4Address("TCP", "127.0.0.1", 1)
        self.no_delay = None
        self._tempDataLen = 0
        self.dataBuffer = b""
        self.offset = 0
        self.connected = True
        self.disconnecting = False
        self.queued = []

    def write(self, data):
        self.queued.append(data)
        if hasattr(self, "_tempDataLen"):  # the fallback tests remove it
            self._tempDataLen += len(data)

    def getHost(self):
        return self.address

    def setTcpNoDelay(self, enabled):
        self.no_delay = enabled


class DirectWriterTests(SynchronousTestCase):
    """direct_writer's choices between a direct send and Twisted's queue."""

    def test_sends_at_once_when_nothing_is_queued(self):
        """With an empty queue the data goes straight to the socket, nothing is queued."""
        transport = FakeTransport(FakeSocket())
        twisted_internals.direct_writer(transport)(b"packet")
        self.assertEqual((transport.socket.sent, transport.queued), ([b"packet"], []))

    def test_rest_of_a_partial_send_is_queued(self):
        """What the kernel does not take goes through transport.write."""
        transport = FakeTransport(FakeSocket(room=2))
        twisted_internals.direct_writer(transport)(b"packet")
        self.assertEqual((transport.socket.sent, transport.queued), ([b"pa"], [b"cket"]))

    def test_queued_data_keeps_its_order(self):
        """Once something is queued, later writes queue behind it."""
        transport = FakeTransport(FakeSocket(room=2))
        write = twisted_internals.direct_writer(transport)
        write(b"first")
        write(b"second")
        self.assertEqual(transport.queued, [b"rst", b"second"])

    def test_unsent_buffer_queues(self):
        """Data left in dataBuffer past offset also makes writes queue."""
        transport = FakeTransport(FakeSocket())
        transport.dataBuffer, transport.offset = b"leftover", 3
        twisted_internals.direct_writer(transport)(b"packet")
        self.assertEqual((transport.socket.sent, transport.queued), ([], [b"packet"]))

    def test_would_block(self):
        """A full socket buffer queues everything."""
        transport = FakeTransport(FakeSocket(error=BlockingIOError(errno.EAGAIN, "full")))
        twisted_internals.direct_writer(transport)(b"packet")
        self.assertEqual(transport.queued, [b"packet"])

    def test_error_left_to_twisted(self):
        """A socket error queues the data so Twisted's write path reports it."""
        transport = FakeTransport(FakeSocket(error=ConnectionResetError()))
        twisted_internals.direct_writer(transport)(b"packet")
        self.assertEqual(transport.queued, [b"packet"])

    def test_closing_transport_queues(self):
        """A transport that is disconnecting gets the data through its own write."""
        transport = FakeTransport(FakeSocket())
        transport.disconnecting = True
        twisted_internals.direct_writer(transport)(b"packet")
        self.assertEqual((transport.socket.sent, transport.queued), ([], [b"packet"]))

    def test_fallback_without_buffer_attributes(self):
        """A socket transport missing any buffer attribute (another Twisted) uses its own write."""
        for name in twisted_internals._WRITE_BUFFER:
            transport = FakeTransport(FakeSocket())
            delattr(transport, name)
            write = twisted_internals.direct_writer(transport)
            self.assertEqual(write, transport.write, name)
            write(b"packet")
            self.assertEqual((transport.socket.sent, transport.queued), ([], [b"packet"]))

    def test_fallback_without_socket(self):
        """A transport without a socket (TLS, StringTransport) uses its own write."""
        transport = StringTransport()
        self.assertEqual(twisted_internals.direct_writer(transport), transport.write)


@implementer(IFileDescriptorReceiver)
class _DescriptorTaker(_Receiving):
    """A _Receiving that would also take file descriptors, were they handed over."""

    def __init__(self, received):
        super().__init__(received)
        self.descriptors = []

    def fileDescriptorReceived(self, descriptor):
        self.descriptors.append(descriptor)
        os.close(descriptor)


def _send_with_descriptor(sock, data):
    """Send data with a descriptor (of /dev/null) in SCM_RIGHTS ancillary data."""
    with open(os.devnull) as null:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                               array.array("i", [null.fileno()]))])


class _DescriptorSender(protocol.Protocol):
    def connectionMade(self):
        _send_with_descriptor(self.transport.socket, b"data")


class ReadPlainlyTests(TestCase):
    """read_plainly and connect_unix: UNIX connections read with recv(), as TCP ones do."""

    def setUp(self):
        # sun_path holds 108 bytes: trial's _trial_temp paths may be too long.
        self.directory = tempfile.mkdtemp(prefix="mm-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.directory)
        self.path = os.path.join(self.directory, "s.sock")

    @defer.inlineCallbacks
    def accepted(self, plainly):
        """The protocol of a connection accepted on a UNIX port, with data and a descriptor sent."""
        received = defer.Deferred()
        port = reactor.listenUNIX(self.path, protocol.Factory.forProtocol(
            lambda: _DescriptorTaker(received)))
        self.addCleanup(port.stopListening)
        if plainly:
            self.assertTrue(twisted_internals.read_plainly(port))
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.connect(self.path)
        _send_with_descriptor(client, b"data")
        server = yield received
        server.transport.loseConnection()
        yield _ended(server)
        return server

    @defer.inlineCallbacks
    def test_twisted_reads_with_recvmsg(self):
        """Twisted's own UNIX server hands a descriptor over: the path read_plainly replaces."""
        server = yield self.accepted(plainly=False)
        self.assertEqual(server.received, b"data")
        self.assertEqual(len(server.descriptors), 1)

    @defer.inlineCallbacks
    def test_port_reads_plainly(self):
        """After read_plainly the data arrives and no descriptor is handed over."""
        server = yield self.accepted(plainly=True)
        self.assertEqual(server.received, b"data")
        self.assertEqual(server.descriptors, [])

    @defer.inlineCallbacks
    def test_connect_unix_reads_plainly(self):
        """A connect_unix client gets the data and no descriptor, the kernel having closed it."""
        port = reactor.listenUNIX(self.path, protocol.Factory.forProtocol(_DescriptorSender))
        self.addCleanup(port.stopListening)
        dialler = _Dialler()
        dialler.buildProtocol = lambda addr: _DescriptorTaker(dialler.received)
        twisted_internals.connect_unix(reactor, self.path, dialler, 5)
        client = yield dialler.received
        self.assertEqual(client.received, b"data")
        self.assertEqual(client.descriptors, [])
        client.transport.loseConnection()
        yield _ended(client)

    def test_other_ports_left_alone(self):
        """A port that builds other transports (TCP) is not changed: False."""
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertFalse(twisted_internals.read_plainly(port))
        self.assertIs(port.transport, tcp.Server)


class ForgetSocketFileTests(TestCase):
    """forget_socket_file on the running Twisted's UNIX port, and where it cannot work."""

    def setUp(self):
        # sun_path holds 108 bytes: trial's _trial_temp paths may be too long.
        self.directory = tempfile.mkdtemp(prefix="mm-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.directory)
        self.path = os.path.join(self.directory, "s.sock")

    def listen(self):
        return reactor.listenUNIX(self.path, protocol.Factory.forProtocol(protocol.Protocol))

    @defer.inlineCallbacks
    def test_twisted_unlinks_by_itself(self):
        """Twisted's UNIX port still removes its file at close: forgetting it is still needed."""
        yield self.listen().stopListening()
        self.assertFalse(os.path.exists(self.path))

    @defer.inlineCallbacks
    def test_file_kept(self):
        """A forgotten port closes its socket and leaves the file, with getHost() unchanged."""
        port = self.listen()
        self.assertTrue(twisted_internals.forget_socket_file(port, self.path))
        rewritten = [name for name in twisted_internals._BIND_PATH
                     if getattr(port, name, None) in (b"\0", "\0")]
        self.assertEqual(len(rewritten), 1)  # _bindPath, or port on 22.4
        self.assertEqual(port.getHost().name, os.fsencode(self.path))
        messages = []
        log.addObserver(messages.append)
        self.addCleanup(log.removeObserver, messages.append)
        yield port.stopListening()
        self.assertTrue(os.path.exists(self.path))
        closed = [" ".join(map(str, event["message"])) for event in messages
                  if "Closed" in " ".join(map(str, event.get("message", ())))]
        self.assertEqual(closed, [f"(UNIX Port {self.path} Closed)"])  # no NUL in the log
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(probe.close)
        self.assertRaises(ConnectionRefusedError, probe.connect, self.path)

    def test_fallback_without_path_attribute(self):
        """A port keeping its path under another name is left as it is: False."""
        class Port:
            port = 0  # what tcp.Port's constructor leaves on a UNIX port after 22.4

        port = Port()
        self.assertFalse(twisted_internals.forget_socket_file(port, self.path))
        self.assertEqual(port.port, 0)

    def test_other_path_left_alone(self):
        """An attribute that holds some other path is not rewritten."""
        class Port:
            _bindPath = b"/elsewhere.sock"

        port = Port()
        self.assertFalse(twisted_internals.forget_socket_file(port, self.path))
        self.assertEqual(port._bindPath, b"/elsewhere.sock")


class _Readable:
    """A reader on one end of a socketpair that records what doRead finds; fails on demand."""

    def __init__(self, sock, name, fail_lost=False):
        self.sock, self.name, self.fail_lost = sock, name, fail_lost
        self.read = []
        self.lost = []

    def fileno(self):
        return self.sock.fileno()

    def logPrefix(self):
        return self.name

    def doRead(self):
        data = self.sock.recv(100)
        self.read.append(data)
        return None if data else ConnectionDone()

    def connectionLost(self, reason):
        self.lost.append(reason)
        if self.fail_lost:
            raise RuntimeError(f"{self.name} broke in connectionLost")


class LeanEventLoopTests(SynchronousTestCase):
    """lean_event_loop on a fresh EPollReactor of the running Twisted (not the global one)."""

    def setUp(self):
        self.reactor = EPollReactor()
        self.addCleanup(self.reactor._poller.close)
        self.errors = []
        log.addObserver(self.errors.append)
        self.addCleanup(log.removeObserver, self.errors.append)

    def readable(self, name, **kwargs):
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        ours.setblocking(False)
        reader = _Readable(ours, name, **kwargs)
        self.reactor.addReader(reader)
        return reader, theirs

    def test_replaces_do_poll(self):
        """The running Twisted's epoll reactor still has what the lean loop needs."""
        self.assertTrue(twisted_internals.lean_event_loop(self.reactor))
        self.assertIn("doIteration", vars(self.reactor))
        self.assertIs(self.reactor.doPoll, self.reactor.doIteration)

    def test_dispatches_every_ready_descriptor(self):
        """Each ready reader's doRead runs once per turn, with what its peer wrote."""
        twisted_internals.lean_event_loop(self.reactor)
        first, first_peer = self.readable("first")
        second, second_peer = self.readable("second")
        first_peer.send(b"one")
        second_peer.send(b"two")
        self.reactor.doIteration(0)
        self.assertEqual((first.read, second.read), ([b"one"], [b"two"]))
        self.reactor.doIteration(0)  # nothing more is ready
        self.assertEqual((first.read, second.read), ([b"one"], [b"two"]))

    def test_closed_peer_disconnects(self):
        """A peer's close reaches connectionLost and takes the reader out of the reactor."""
        twisted_internals.lean_event_loop(self.reactor)
        reader, peer = self.readable("reader")
        peer.close()
        self.reactor.doIteration(0)
        self.assertEqual(len(reader.lost), 1)
        self.assertNotIn(reader, self.reactor.getReaders())

    def test_failure_is_logged_with_the_prefix_and_the_turn_goes_on(self):
        """What escapes _doReadOrWrite is logged once under the reader's logPrefix; the others still run."""
        twisted_internals.lean_event_loop(self.reactor)
        broken, broken_peer = self.readable("broken", fail_lost=True)
        healthy, healthy_peer = self.readable("healthy")
        broken_peer.close()
        healthy_peer.send(b"data")
        self.reactor.doIteration(0)
        self.assertEqual(healthy.read, [b"data"])
        failures = [event for event in self.errors if event.get("isError")]
        self.assertEqual([event["system"] for event in failures], ["broken"])
        self.assertIn("broke in connectionLost", str(failures[0]["failure"].value))
        self.flushLoggedErrors(RuntimeError)

    def test_other_reactors_are_left_alone(self):
        """A reactor that is not epoll's keeps its own loop."""
        other = MemoryReactorClock()
        self.assertFalse(twisted_internals.lean_event_loop(other))
        self.assertNotIn("doIteration", vars(other))

    def test_missing_state_falls_back(self):
        """An EPollReactor without its poller or descriptor map (another Twisted) keeps Twisted's doPoll."""
        for name in ("_poller", "_selectables"):
            fresh = EPollReactor()
            self.addCleanup(fresh._poller.close)
            poller = fresh._poller
            delattr(fresh, name)
            self.assertFalse(twisted_internals.lean_event_loop(fresh), name)
            self.assertNotIn("doIteration", vars(fresh), name)
            fresh._poller = poller
