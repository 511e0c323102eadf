"""Socket tuning shared by the MTA-facing and child-facing connections.

Milter traffic is small request/response packets on the path of every SMTP
command, so what each packet costs in system calls and delays shows.
"""

import socket

from twisted.internet.address import IPv4Address, IPv6Address

from .twisted_internals import direct_writer

# Linux only; elsewhere delayed ACKs stay as they are.
TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def tcp_socket(transport):
    """Set TCP_NODELAY on a TCP transport and return its socket; None for others.

    Without TCP_NODELAY, Nagle plus delayed ACKs cost ~40 ms per body chunk.
    UNIX transports claim ITCPTransport too, so the address family decides:
    the socket's own, or where there is none (TLS), the transport's address
    (getHost asks the kernel, a system call per connection).
    """
    sock = getattr(transport, "socket", None)
    family = getattr(sock, "family", None)
    if family is not None:
        tcp = family in (socket.AF_INET, socket.AF_INET6)
    else:
        tcp = isinstance(transport.getHost(), (IPv4Address, IPv6Address))
    if not tcp or not hasattr(transport, "setTcpNoDelay"):
        return None
    transport.setTcpNoDelay(True)
    return sock


def writer(transport):
    """Return write(data) for transport that sends at once when nothing is queued.

    Twisted's transport.write queues the data and asks the reactor for
    writability: an epoll registration, one more reactor turn through its
    logging context, the send, and an epoll deregistration for every packet.
    Sending right away when the queue is empty is one system call; whatever
    the kernel does not take goes through transport.write as usual, so
    ordering, flow control and errors stay Twisted's. Whether the queue is
    empty is Twisted's private knowledge: see twisted_internals.direct_writer,
    which falls back to transport.write where it cannot tell.
    """
    return direct_writer(transport)


def quick_ack(sock):
    """ACK what arrives next at once instead of up to 40 ms later.

    libmilter writes each end-of-message packet separately with Nagle on:
    the second one waits for the ACK of the first, which a delayed ACK holds
    back. Linux clears the flag by itself, so it is set again for each read.
    Returns False when the socket refuses it.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
    except OSError:
        return False
    return True
