#!/usr/bin/env python3
"""The least a relay between a milter client and one child can do, for bench/floor to measure.

    python3 bench/relays.py plain|twisted|twisted-lean LISTEN_PORT CHILD_PORT

Each relay makes the same round trips as the manager with one child, and nothing more: it
frames what the MTA sends, connects to the child at the option negotiation, asks the MTA for
no reply to headers and to the end of headers, sends the child one command at a time and
passes on the replies the MTA reads. No macro, no merge, no timer, no statistics, no error
handling: a benchmark's yardstick, never a milter to run.

  plain         Python's selectors (epoll) and sockets, no Twisted
  twisted       Twisted's epoll reactor through its public API (connectTCP, transport.write)
  twisted-lean  the same on the manager's own shortcuts (miltermanager.twisted_internals:
                the event loop, direct writes, connect and close)
"""

import selectors
import socket
import struct
import sys

HOST = "127.0.0.1"
NEGOTIATE, QUIT = ord("O"), ord("Q")
UNANSWERED = frozenset(map(ord, "DAQ"))  # macros, abort, quit
SILENT = frozenset(map(ord, "LN"))  # headers, end of headers: the MTA reads no reply
NO_REPLY_TO_HEADERS = 0x80 | 0x40000  # SMFIP_NR_HDR | SMFIP_NR_EOH
_LENGTH = struct.Struct("!I")
_OPTIONS = struct.Struct("!III")


def frames(buffer):
    """(complete packets, the rest) of buffer.

    Framing of its own, not miltermanager.protocol.framing: a yardstick carries none of the
    manager's code but, in twisted-lean, its Twisted shortcuts.
    """
    packets, position, size = [], 0, len(buffer)
    while size - position >= 4:
        end = position + 4 + _LENGTH.unpack_from(buffer, position)[0]
        if end > size:
            break
        packets.append(buffer[position:end])
        position = end
    return packets, buffer[position:]


def reply_for_mta(command, packet):
    """The child's reply as the MTA gets it (None: not at all)."""
    if command == NEGOTIATE:
        version, actions, protocol = _OPTIONS.unpack_from(packet, 5)
        return packet[:5] + _OPTIONS.pack(version, actions, protocol | NO_REPLY_TO_HEADERS) + packet[17:]
    return None if command in SILENT else packet


class Relay:
    """One MTA connection: the commands waiting for the child, and the one it answers now."""

    def __init__(self, to_mta):
        self.to_mta = to_mta
        self.to_child = None
        self.mta_rest = self.child_rest = b""
        self.queue = []
        self.waiting = None

    def from_mta(self, data):
        packets, self.mta_rest = frames(self.mta_rest + data)
        self.queue += packets

    def from_child(self, data):
        packets, self.child_rest = frames(self.child_rest + data)
        for packet in packets:
            command, self.waiting = self.waiting, None
            reply = reply_for_mta(command, packet)
            if reply is not None:
                self.to_mta(reply)

    def next_command(self):
        """The next packet for the child while none waits for its reply, else None."""
        if self.waiting is not None or not self.queue:
            return None
        packet = self.queue.pop(0)
        if packet[4] not in UNANSWERED:
            self.waiting = packet[4]
        return packet


def run_plain(listen_port, child_port):
    selector = selectors.EpollSelector()

    def close(*sockets):
        for sock in sockets:
            if sock is not None and sock.fileno() >= 0:
                selector.unregister(sock)
                sock.close()

    def pump(relay, mta, child):
        while True:
            packet = relay.next_command()
            if packet is None:
                return child
            if packet[4] == NEGOTIATE:
                child = socket.create_connection((HOST, child_port))
                child.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                child.setblocking(False)
                selector.register(child, selectors.EVENT_READ, (relay, mta, child, False))
                selector.modify(mta, selectors.EVENT_READ, (relay, mta, child, True))
            child.send(packet)
            if packet[4] == QUIT:
                close(mta, child)
                return None

    def accept(listener):
        mta, _ = listener.accept()
        mta.setblocking(False)
        mta.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        selector.register(mta, selectors.EVENT_READ, (Relay(mta.send), mta, None, True))

    listener = socket.create_server((HOST, listen_port), backlog=128)
    listener.setblocking(False)
    selector.register(listener, selectors.EVENT_READ, None)
    while True:
        for key, _ in selector.select():
            if key.data is None:
                accept(listener)
                continue
            relay, mta, child, from_mta = key.data
            data = key.fileobj.recv(65536)
            if not data:
                close(mta, child)
                continue
            if from_mta:
                relay.from_mta(data)
            else:
                relay.from_child(data)
            pump(relay, mta, child)


def run_twisted(listen_port, child_port, lean):
    from twisted.internet import epollreactor
    epollreactor.install()
    from twisted.internet import protocol, reactor

    if lean:
        from miltermanager import twisted_internals
        twisted_internals.lean_event_loop(reactor)
        writer, close = twisted_internals.direct_writer, twisted_internals.lose_connection
    else:
        writer = lambda transport: transport.write  # noqa: E731
        close = lambda transport: transport.loseConnection()  # noqa: E731

    class Child(protocol.Protocol):
        def __init__(self, mta):
            self.mta = mta

        def connectionMade(self):
            self.transport.setTcpNoDelay(True)
            self.write = writer(self.transport)
            self.mta.child = self
            self.mta.pump()

        def dataReceived(self, data):
            self.mta.relay.from_child(data)
            self.mta.pump()

        def connectionLost(self, reason):
            close(self.mta.transport)

    class Mta(protocol.Protocol):
        child = None

        def connectionMade(self):
            self.transport.setTcpNoDelay(True)
            self.relay = Relay(writer(self.transport))

        def dataReceived(self, data):
            relay = self.relay
            relay.from_mta(data)
            if self.child is not None:
                self.pump()
            elif relay.queue and relay.queue[0][4] == NEGOTIATE:
                factory = protocol.ClientFactory()
                factory.buildProtocol = lambda address: Child(self)
                if lean:
                    twisted_internals.connect_tcp(reactor, HOST, child_port, factory, 30)
                else:
                    reactor.connectTCP(HOST, child_port, factory, 30)

        def pump(self):
            while True:
                packet = self.relay.next_command()
                if packet is None:
                    return
                self.child.write(packet)
                if packet[4] == QUIT:
                    close(self.child.transport)
                    close(self.transport)
                    return

        def connectionLost(self, reason):
            if self.child is not None:
                close(self.child.transport)

    factory = protocol.Factory()
    factory.protocol = Mta
    reactor.listenTCP(listen_port, factory, backlog=128, interface=HOST)
    reactor.run()


def main(argv):
    if len(argv) != 3 or argv[0] not in ("plain", "twisted", "twisted-lean"):
        sys.exit(__doc__.splitlines()[2].strip())
    kind, listen_port, child_port = argv[0], int(argv[1]), int(argv[2])
    if kind == "plain":
        run_plain(listen_port, child_port)
    else:
        run_twisted(listen_port, child_port, lean=kind == "twisted-lean")


if __name__ == "__main__":
    main(sys.argv[1:])
