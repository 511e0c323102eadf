"""The six things we need from Twisted that its public API does not offer, each with a fallback.

Everything here reads or writes attributes Twisted does not document, so
it lives in one place, says which Twisted versions have them (checked on
Debian 12's 22.4 and on 26.x), and falls back to Twisted's public
behaviour when they are missing. tests/test_twisted_internals.py checks on
the running Twisted that the attributes are still there and used.
"""

import errno
import os
import socket

from twisted.internet import error, tcp, unix
from twisted.internet.main import CONNECTION_DONE
from twisted.python import log as twisted_log

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # no epoll (not Linux): lean_event_loop and connect_* leave the reactor alone
    EPollReactor = None

# twisted.internet.abstract.FileDescriptor's write buffer: data queued by
# write() waits in _tempDataBuffer (its size in _tempDataLen) and then in
# dataBuffer from offset on. The same three names from 22.4 to 26.x.
_WRITE_BUFFER = ("_tempDataLen", "dataBuffer", "offset")


def _nothing_queued(transport):
    return not transport._tempDataLen and len(transport.dataBuffer) == transport.offset


def direct_writer(transport):
    """write(data) that sends on transport's socket at once when Twisted has nothing queued.

    Twisted offers no public way to ask whether a transport's write buffer
    is empty, and without knowing it a direct send could overtake queued
    data. So this reads FileDescriptor's _tempDataLen, dataBuffer and
    offset (Twisted 22.4 to 26.x at least). A transport without them, or
    without a socket (TLS, StringTransport, a future Twisted), gets its
    own transport.write back: correct, one reactor turn slower per packet.

    The attributes are looked for once here; the returned function reads
    them on every call, as it must, and nothing more.
    """
    sock = getattr(transport, "socket", None)
    try:
        _nothing_queued(transport)
    except AttributeError:
        sock = None
    if sock is None:
        return transport.write
    send = sock.send
    queue = transport.write

    def write(data):
        # not _nothing_queued(transport), inlined: this runs for every packet.
        if (transport._tempDataLen or len(transport.dataBuffer) != transport.offset
                or not transport.connected or transport.disconnecting):
            queue(data)
            return
        try:
            sent = send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            queue(data)  # Twisted's own write path reports the error
            return
        if sent < len(data):
            queue(data[sent:])

    return write


# FileDescriptor's state lose_connection reads besides the write buffer (22.4 to 26.x),
# and tcp.Connection's TLS flag.
_CLOSE_STATE = _WRITE_BUFFER + ("connected", "disconnecting", "disconnected", "producer",
                                "streamingProducer", "producerPaused", "_writeDisconnecting",
                                "_writeDisconnected", "TLS")


def lose_connection(transport):
    """transport.loseConnection(), closing in the next reactor turn without a write event.

    Twisted's loseConnection registers the socket for writing and closes it
    from doWrite, after a send of the empty buffer: two epoll_ctl calls, a
    wakeup, an empty send() and a dispatch for each connection, even with
    nothing to flush, which is the rule here (direct_writer sends at once).
    When nothing is queued, this stops reading, marks the transport
    disconnecting as loseConnection does, and closes it from a call in the
    next reactor turn through the reactor's own _disconnectSelectable, as
    doWrite would: connectionLost still comes after this returns, with
    ConnectionDone. Data written meanwhile is queued (the transport is
    disconnecting) and Twisted flushes it and closes; the call then stands
    back.

    Reads the transport's state named in _CLOSE_STATE and the reactor's
    _disconnectSelectable (Twisted 22.4 to 26.x). Any other transport (TLS,
    StringTransport, a future Twisted) gets its own loseConnection.
    """
    reactor = getattr(transport, "reactor", None)
    if getattr(reactor, "_disconnectSelectable", None) is None or not _closes_at_once(transport):
        transport.loseConnection()
        return
    transport.stopReading()
    transport.disconnecting = True
    reactor.callLater(0, _close_if_flushed, transport)


def _closes_at_once(transport):
    """True if transport is a plain socket connection with nothing for doWrite to do."""
    try:
        return not (transport.TLS or not transport.connected or transport.disconnecting
                    or transport.disconnected
                    or transport._writeDisconnecting or transport._writeDisconnected
                    or not _nothing_queued(transport)
                    or (transport.producer is not None
                        and (not transport.streamingProducer or transport.producerPaused)))
    except AttributeError:  # not a FileDescriptor of Twisted 22.4 to 26.x
        return False


def _close_if_flushed(transport):
    if transport.disconnected or not _nothing_queued(transport):
        return  # gone already, or written to since: doWrite flushes and closes it
    transport.reactor._disconnectSelectable(transport, CONNECTION_DONE, False)


# Where twisted.internet.unix.Port keeps the path it unlinks in connectionLost:
# `port` in 22.4, `_bindPath` in later releases (26.x too).
_BIND_PATH = ("_bindPath", "port")


def forget_socket_file(port, path):
    """Make a listening twisted.internet.unix.Port leave its socket file at close; True if it will.

    unix.Port.connectionLost unlinks its path unconditionally, and when that
    fails (the file is gone, or privileges were dropped) the port is left
    half closed with its socket open. Twisted has no option against it,
    and adopting a socket we bound ourselves (reactor.adoptStreamPort) does
    not help: the adopted port chmods the file to 0666 and unlinks it at
    close all the same. So the path Twisted remembers is rewritten to one
    in Linux's abstract namespace (a leading NUL), which it never unlinks;
    the kernel's socket keeps its real name, so getHost() is unchanged.

    The attribute is rewritten only if it holds path. Otherwise (a Twisted
    that keeps it elsewhere) nothing is changed and False says that Twisted
    will unlink the file itself at close.
    """
    wanted = os.fsencode(path)
    for name in _BIND_PATH:
        current = getattr(port, name, None)
        if isinstance(current, (bytes, str)) and os.fsencode(current) == wanted:
            setattr(port, name, b"\0" if isinstance(current, bytes) else "\0")
            # Its "(UNIX Port PATH Closed)" line would print that NUL into the log.
            port._logConnectionLostMsg = lambda: twisted_log.msg(f"(UNIX Port {path} Closed)")
            return True
    return False


class _PlainReadServer(unix.Server):
    doRead = tcp.Connection.doRead


def read_plainly(port):
    """Make a listening twisted.internet.unix.Port's connections read with recv(); True if done.

    unix.Server and unix.Client read through twisted.python.sendmsg.recvmsg,
    for protocols that receive file descriptors: a 4 kB ancillary buffer, a
    named tuple and untilConcludes for every read, about 2 µs more than the
    recv() of a TCP connection, for each of a message's 23 reads. None of
    ours takes descriptors, so their UNIX connections read as TCP ones do,
    with tcp.Connection.doRead (the same from 22.4 to 26.x); descriptors a
    peer sends anyway are closed by the kernel, not handed to us. Clients
    get it through connect_unix; listening ports through this, which swaps
    the transport class the port builds its connections with (Port.transport,
    unix.Server in 22.4 to 26.x). A port whose transport is anything else is
    left as it is and False says so.
    """
    if getattr(port, "transport", None) is not unix.Server:
        return False
    port.transport = _PlainReadServer
    return True


# EPollReactor's own state doPoll reads: the same names from 22.4 to 26.x.
_EPOLL_STATE = ("_poller", "_selectables", "_doReadOrWrite")


def lean_event_loop(reactor):
    """Dispatch the epoll reactor's ready descriptors without a log context per event; True if done.

    EPollReactor.doPoll hands each ready descriptor to log.callWithLogger,
    which asks it for its logPrefix, copies the legacy logging context into
    a new dict and pushes it for the call: some ten Python calls per event,
    and a message through the manager is 27 events. Only Twisted's legacy
    log.msg reads that context (the manager logs through twisted.logger,
    whose lines name their own system), so doPoll is replaced on this
    reactor by one that calls _doReadOrWrite directly. What _doReadOrWrite
    lets through is logged as callWithLogger would, with the descriptor's
    logPrefix. A legacy line Twisted logs while handling an event shows
    [-] instead of, say, [MilterServerProtocol,7,127.0.0.1].

    Needs EPollReactor's _poller, _selectables and _doReadOrWrite (22.4 to
    26.x); any other reactor (asyncio, poll, select, a test's) is left as it is.
    """
    if EPollReactor is None or not isinstance(reactor, EPollReactor) or not all(
            hasattr(reactor, name) for name in _EPOLL_STATE):
        return False
    poll = reactor._poller.poll
    selectables = reactor._selectables
    dispatch = reactor._doReadOrWrite

    def doPoll(timeout):
        try:
            ready = poll(-1 if timeout is None else timeout, len(selectables))
        except InterruptedError:
            return  # a signal: the reactor's loop runs its handlers and comes back
        for fd, event in ready:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # removed by a handler earlier in this batch
            try:
                dispatch(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                twisted_log.err(system=_log_prefix(selectable))

    reactor.doPoll = reactor.doIteration = doPoll
    return True


def _log_prefix(selectable):
    try:
        return selectable.logPrefix()
    except Exception:
        return "(buggy logPrefix method)"


_IN_PROGRESS = (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK)

# What _LeanConnect and the connectors below use of Twisted's clients and connectors
# (22.4 to 26.x): realAddress, connector, socket, failIfNotConnected, _connectDone,
# _makeTransport. The methods are looked for once: the classes do not change.
_HAS_CONNECT_STATE = (all(hasattr(client, name) for client in (tcp.Client, unix.Client)
                          for name in ("failIfNotConnected", "_connectDone"))
                      and all(hasattr(connector, "_makeTransport")
                              for connector in (tcp.Connector, unix.Connector)))


class _LeanConnect:
    """BaseClient.doConnect without the system calls Twisted itself calls redundant.

    Twisted asks SO_ERROR before each connect(), and once connected stops
    reading and writing to start reading again: nine system calls from
    connect() to connected where five do. connect() on a socket whose
    attempt ended returns its error (or 0, or EISCONN), so SO_ERROR adds
    nothing; and on success only the writing registration has to go. On the
    loopback the attempt has ended by the time the first connect() returns
    EINPROGRESS, so a second one at once finds the connection made: two
    connect() calls and _connectDone's one epoll_ctl, in the same reactor
    turn. The socket is made non-blocking by socket() itself. Otherwise as
    Twisted's: reading and writing are watched while connecting, so that a
    refusal is seen, and the errors are Twisted's. For EPollReactor only,
    which looks doRead and doWrite up at each event (the stop-and-start
    Twisted does is for reactors that keep them).
    """

    def doConnect(self):
        self.doWrite = self.doConnect
        self.doRead = self.doConnect
        if not hasattr(self, "connector"):
            return  # failed already while this was scheduled, as in Twisted's
        result = self._connect_ex()
        if result in _IN_PROGRESS:
            # On the loopback the handshake is over by the time connect() says it is in
            # progress: asked again at once, it says so, and no reactor turn (nor two
            # epoll_ctl calls) waits for writability. Elsewhere it costs one system call.
            result = self._connect_ex()
        if result in _IN_PROGRESS:
            self.startReading()
            self.startWriting()
            return
        if result and result != errno.EISCONN:
            self.failIfNotConnected(error.getConnectError((result, os.strerror(result))))
            return
        del self.doWrite
        del self.doRead
        self.stopWriting()  # reading goes on: _connectDone's startReading finds it on
        self._connectDone()

    def createInternetSocket(self):
        # Non-blocking from socket() itself (SOCK_NONBLOCK): Twisted's ioctl for it, and on
        # 22.4 its two fcntl calls for close-on-exec, which Python sockets are (PEP 446),
        # would come on top of the one Connection.__init__ makes anyway.
        return socket.socket(self.addressFamily, self.socketType | socket.SOCK_NONBLOCK)

    def _connect_ex(self):
        try:
            return self.socket.connect_ex(self.realAddress)
        except OSError as problem:
            return problem.args[0]


class _TCPClient(_LeanConnect, tcp.Client):
    pass


class _TCPConnector(tcp.Connector):
    def _makeTransport(self):
        return _TCPClient(self.host, self.port, self.bindAddress, self, self.reactor)


def _lean_connect(reactor):
    return EPollReactor is not None and isinstance(reactor, EPollReactor) and _HAS_CONNECT_STATE


def connect_tcp(reactor, host, port, factory, timeout):
    """reactor.connectTCP(host, port, factory, timeout) with _LeanConnect's doConnect.

    The connector is the one connectTCP makes (PosixReactorBase.connectTCP
    builds a tcp.Connector and calls its connect()), its _makeTransport
    making the leaner client. Any reactor but epoll, or a Twisted without
    these names, gets connectTCP itself.
    """
    if not _lean_connect(reactor):
        return reactor.connectTCP(host, port, factory, timeout)
    connector = _TCPConnector(host, port, factory, timeout, None, reactor)
    connector.connect()
    return connector


class _UNIXClient(_LeanConnect, unix.Client):
    doRead = tcp.Connection.doRead  # see read_plainly


class _UNIXConnector(unix.Connector):
    def _makeTransport(self):
        return _UNIXClient(self.address, self, self.reactor, self.checkPID)


def connect_unix(reactor, path, factory, timeout):
    """reactor.connectUNIX(path, factory, timeout) with _LeanConnect's doConnect and recv() reads.

    See connect_tcp, and read_plainly for the reads: factory's protocol must
    not expect file descriptors.
    """
    if not _lean_connect(reactor):
        return reactor.connectUNIX(path, factory, timeout)
    connector = _UNIXConnector(path, factory, timeout, reactor, 0)
    connector.connect()
    return connector
