"""The MTA connections: a session each, counted, limited by max_connections, drained at stop.

The factory is what the sessions share: the configuration current when
each connected, the count of sessions in flight, the children's health
(miltermanager.health), their last negotiation replies
(miltermanager.negotiation_memory) and the observers of the event stream
(miltermanager.events).
"""

import gc

from twisted.internet import defer
from twisted.logger import Logger

from .connection_check import ConnectionChecks
from .events import Observers
from .health import ChildHealth
from .negotiation_memory import NegotiationMemory
from .server import MilterServerFactory, MilterServerProtocol
from .session import ManagerSession


class ManagerConnection(MilterServerProtocol):
    """One MTA connection, counted by its factory."""

    def connectionMade(self):
        self.factory.connection_made(self)
        super().connectionMade()

    def connectionLost(self, reason=None):
        try:
            super().connectionLost(reason)
        finally:
            self.factory.connection_lost(self)


class ManagerFactory(MilterServerFactory):
    """MTA connections on the current configuration, limited by manager.max_connections.

    At max_connections concurrent connections the listening ports stop
    accepting; the kernel queues new connections in the backlog until one
    ends. Upstream polls again every suspend_time_on_unacceptable seconds;
    here the port resumes as soon as a connection ends, so nothing waits
    longer than needed. Every manager.maintenance_interval finished
    connections the `maintained` hooks run.
    """

    protocol = ManagerConnection
    noisy = False  # no "Starting factory" line per port
    log = Logger()
    # The sessions' event stream goes to these (None while there is none: it then costs
    # one attribute test per report).
    observer = None
    # The process launcher's manager side (launcher.Launcher) when privilege mode runs one.
    launcher = None

    def __init__(self, configuration, reactor, clock=None):
        super().__init__(self._session, clock=clock or reactor)
        self.configuration = configuration
        self.reactor = reactor
        self.session_clock = clock
        self.connections = 0  # open now
        self.finished = 0  # since start
        self.ports = []
        self.paused = False
        self._drained = []  # Deferreds waiting for connections to reach 0
        self._open = set()  # the ManagerConnections, to close what a drain leaves
        self._observers = Observers()
        self.health = ChildHealth(clock or reactor, self._manager_settings,
                                  lambda: self.observer)
        self.negotiation_memory = NegotiationMemory()
        self.sessions_started = 0
        self.connection_checks = ConnectionChecks(self, self.clock)

    def _session(self, server):
        return ManagerSession(server, self)

    def _manager_settings(self):
        return self.configuration.manager

    def new_session_number(self):
        """The next session's number: 1 for the first since start."""
        self.sessions_started += 1
        return self.sessions_started

    # The MTA-facing timeouts follow the configuration, reloads included.

    @property
    def negotiation_timeout(self):
        return self.configuration.manager.negotiation_timeout

    @property
    def idle_timeout(self):
        return self.configuration.manager.idle_timeout

    @property
    def packet_buffer_size(self):
        return self.configuration.manager.packet_buffer_size

    def add_observer(self, observer):
        """Tell observer (an events.ISessionObserver) what every session from now on does."""
        self._observers.add(observer)
        self.observer = self._observers

    def remove_observer(self, observer):
        self._observers.remove(observer)
        if not self._observers.observers:
            self.observer = None

    def processing_sessions(self):
        """How many MTA connections are open now: the conditions' n_processing_sessions.

        A method, so a session can hand it on as the callable the
        conditions ask when they need the figure.
        """
        return self.connections

    def connection_made(self, connection=None):
        self.connections += 1
        if connection is not None:
            self._open.add(connection)
        self.connection_checks.connection_made()
        self.update_accepting()

    def connection_lost(self, connection=None):
        self.connections -= 1
        self.finished += 1
        self._open.discard(connection)
        if not self.connections:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)
        self.connection_checks.connection_lost()
        interval = self.configuration.manager.maintenance_interval
        if interval and self.finished % interval == 0:
            self.maintain()
        self.update_accepting()

    def open_connections(self):
        """The MTA connections open now (ManagerConnection protocols)."""
        return self._open

    def maintain(self):
        """Run the `maintained` hooks; one that fails is logged and the others still run.

        With manager.report_memory_statistics, one line tells the memory in use first.
        """
        manager = self.configuration.manager
        if manager.report_memory_statistics:
            self.log.info("[maintain][memory] {memory}",
                          memory=memory_statistics(self.connections),
                          milter_log_level="statistics")
        for hook in manager.maintained_hooks:
            try:
                hook.function()
            except Exception:
                self.log.failure("[maintain][error] a maintained hook failed")

    def update_accepting(self):
        """Stop or resume accepting for max_connections (after a change of either)."""
        limit = self.configuration.manager.max_connections
        full = bool(limit) and self.connections >= limit
        if full == self.paused:
            return
        self.paused = full
        for port in self.ports:
            _set_accepting(port, not full)
        if full:
            self.log.info("[accept][suspend] {n} connections (max_connections): not accepting "
                          "until one ends", n=self.connections)
        else:
            self.log.info("[accept][resume] {n} connections", n=self.connections)

    def drain(self, timeout, clock):
        """Fire once every MTA connection has ended, closing those left after timeout seconds.

        Sessions in flight finish their message instead of being cut off
        at stop; an MTA that keeps an idle connection open is not waited
        for forever.
        """
        if not self.connections:
            return defer.succeed(None)
        self.log.info("[stop][drain] waiting up to {timeout} s for {n} MTA connections",
                      timeout=timeout, n=self.connections)
        d = defer.Deferred()
        self._drained.append(d)

        def too_long():
            if d.called:
                return
            self.log.warn("[stop][drain] closing {n} MTA connections still open after {timeout} s",
                          n=self.connections, timeout=timeout)
            for connection in list(self._open):
                connection.transport.loseConnection()

        timer = clock.callLater(timeout, too_long)
        d.addBoth(lambda result: timer.cancel() if timer.active() else None)
        return d

    def add_port(self, port):
        self.ports.append(port)
        if self.paused:
            _set_accepting(port, False)

    def remove_port(self, port):
        self.ports.remove(port)


def memory_statistics(sessions, status="/proc/self/status"):
    """The process's memory as upstream's [maintain][memory] text, then our own figures.

    "(RSSKB) total:N Proc:N GLib::Object:N VmHWM:PEAKKB sessions:N", the
    first part in upstream's words so tools that read its line keep working:
    resident memory (kB, from the kernel); the objects the garbage collector
    tracks (Ruby's ObjectSpace count upstream); the functions and methods
    among them (Ruby's Proc objects); the Twisted protocols among them, one
    per MTA or child connection (upstream's GLib objects are its agents).
    Then the peak resident memory and the sessions in flight. Counting
    walks every object once: it runs only at maintenance, and only with
    manager.report_memory_statistics. Without /proc the memory figures read "?".
    """
    from types import BuiltinMethodType, FunctionType, MethodType

    from twisted.internet.protocol import Protocol

    figures = {}
    try:
        with open(status, encoding="ascii", errors="replace") as file:
            for line in file:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    figures[name] = value.split()[0] + "KB"
    except OSError:
        pass
    objects = gc.get_objects()
    functions = protocols = 0
    for obj in objects:
        if isinstance(obj, (FunctionType, MethodType, BuiltinMethodType)):
            functions += 1
        elif isinstance(obj, Protocol):
            protocols += 1
    total = len(objects)
    del objects
    return (f"({figures.get('VmRSS', '?')}) total:{total} Proc:{functions} "
            f"GLib::Object:{protocols} VmHWM:{figures.get('VmHWM', '?')} sessions:{sessions}")


def _set_accepting(port, accepting):
    # Reading is accepting for Twisted's listening ports (tcp.Port, unix.Port).
    method = getattr(port, "startReading" if accepting else "stopReading", None)
    if method is not None:
        method()
