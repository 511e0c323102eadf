"""Connection checkers: the SMTP client gone while children work ends the wait at once.

The kernel's TCP tables as the netstat checker reads them (lines captured
on this kind of machine, and live sockets), the context a checker gets,
the disconnect path in the scenario harness (fake clock), and the whole
path with real sockets: an MTA, an SMTP client that hangs up, and a slow
python3-milter child at end of message.
"""

import ipaddress
import os
import socket
import time

from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, formatEvent
from twisted.trial import unittest

from miltermanager import client
from miltermanager.client import Timeouts
from miltermanager.conditions.context import SocketAddress
from miltermanager.config import Configuration, Hook, ManagerConfig, MilterConfig
from miltermanager.connection_check import (
    CheckContext, NetstatChecker, parse_tcp_table, read_tcp_tables, same_host, server_address,
)
from miltermanager.events import MessageEnded, SessionEnded
from miltermanager.factory import ManagerFactory
from miltermanager.macros import Macros
from miltermanager.merge import Status
from miltermanager.protocol import constants as c
from miltermanager.protocol.messages import (
    ACCEPT, CONTINUE, DATA, END_OF_HEADERS, END_OF_MESSAGE, REJECT, TEMPFAIL, Body, Connect,
    Header, Helo, Macro, Mail, Negotiate, Rcpt,
)
from miltermanager.testing import ConnectionTracker, RecordingObserver
from tests.peers.fixtures import HOST, LibmilterMilter, MiltermanagerProcess, Postfix
from tests.test_server import Harness
from tests.test_session import (
    BODY, CONNECT, EOH, EOM, FULL_OFFER, HELO, MAIL, RCPT, SUBJECT, Hang, Kid, Scenario, ScenarioTestCase,
    Send,
)

# Captured from /proc/net/tcp on x86_64 (words in the host's byte order, little-endian):
# a listener on 127.0.0.1:37869, its accepted socket after the client (127.0.0.1:60186)
# closed, and that client's side.
TCP_LINES = [
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
    "timeout inode\n",
    "   0: 0100007F:93ED 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 "
    "3700822 1 000000007a7b90f6 100 0 0 10 0\n",
    "  71: 0100007F:93ED 0100007F:EB1A 08 00000000:00000001 00:00000000 00000000     0        0 "
    "3700824 1 000000009e37b4ac 20 4 0 10 -1\n",
    "  76: 0100007F:EB1A 0100007F:93ED 05 00000000:00000000 03:0000175C 00000000     0        0 "
    "0 3 0000000091a1926c\n",
]
# A server that closed first: its socket for the client 127.0.0.1:35210 in TIME_WAIT.
TIME_WAIT_LINE = ("  11: 0100007F:E321 0100007F:898A 06 00000000:00000000 03:0000175C 00000000     "
                  "0        0 0 3 000000002596fa12\n")
# From /proc/net/tcp6: a dual-stack listener on [::]:54129 with an IPv4 client
# (127.0.0.1:53866, shown IPv4-mapped) and an IPv6 one ([::1]:50302).
TCP6_LINES = [
    "   0: 00000000000000000000000000000000:D371 00000000000000000000000000000000:0000 0A "
    "00000000:00000000 00:00000000 00000000     0        0 3700844 1 000000007f0cb6ce "
    "100 0 0 10 0\n",
    "   1: 0000000000000000FFFF00000100007F:D371 0000000000000000FFFF00000100007F:D26A 01 "
    "00000000:00000000 00:00000000 00000000     0        0 3700846 1 00000000e2e263c9 "
    "20 0 0 10 -1\n",
    "   2: 00000000000000000000000001000000:D371 00000000000000000000000001000000:C47E 01 "
    "00000000:00000000 00:00000000 00000000     0        0 3700848 1 000000001110cbed "
    "20 0 0 10 -1\n",
]

LOOPBACK = ipaddress.ip_address("127.0.0.1")


def _context(address, port, family="inet", macros=None):
    return CheckContext(SocketAddress(family, address, port), SocketAddress("inet", "127.0.0.1", 1),
                        macros or Macros())


class TcpTableTests(unittest.TestCase):
    """parse_tcp_table and read_tcp_tables: the kernel's TCP tables keyed by the remote end."""

    def test_captured_ipv4_lines(self):
        """Each socket is found by its remote address and port, with its state's name."""
        table = parse_tcp_table(TCP_LINES)
        self.assertEqual(table, {
            (ipaddress.ip_address("0.0.0.0"), 0): {"LISTEN"},
            (LOOPBACK, 60186): {"CLOSE_WAIT"},  # the server's socket: the client closed
            (LOOPBACK, 37869): {"FIN_WAIT2"},  # the client's own socket
        })

    def test_captured_ipv6_lines(self):
        """An IPv4-mapped remote is its IPv4 address; ::1 stays IPv6."""
        table = parse_tcp_table(TCP6_LINES)
        self.assertEqual(table[(LOOPBACK, 53866)], {"ESTABLISHED"})
        self.assertEqual(table[(ipaddress.ip_address("::1"), 50302)], {"ESTABLISHED"})

    def test_lines_that_do_not_parse(self):
        """A line that is not a socket (or is cut short) is skipped, not an error."""
        table = parse_tcp_table(["garbage\n", "   9: 0100007F:93ED ZZZZ:0000 01\n", "",
                                 TCP_LINES[2]])
        self.assertEqual(table, {(LOOPBACK, 60186): {"CLOSE_WAIT"}})

    def test_missing_file(self):
        """A table that cannot be read is left out; with none readable there is no table."""
        missing = os.path.join(self.mktemp(), "none")
        self.assertIsNone(read_tcp_tables([missing]))
        path = self.mktemp()
        with open(path, "w") as file:
            file.writelines(TCP_LINES[:2])
        self.assertEqual(read_tcp_tables([missing, path]),
                         {(ipaddress.ip_address("0.0.0.0"), 0): {"LISTEN"}})

    def test_live_socket(self):
        """A real connection: ESTABLISHED on the server side, CLOSE_WAIT once the client closed."""
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        smtp_client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        self.addCleanup(accepted.close)
        key = (LOOPBACK, smtp_client.getsockname()[1])
        # An earlier connection of this machine from the same port may linger in TIME_WAIT
        # under the same key: only the live states are this connection's own.
        lingering = {"TIME_WAIT"}
        self.assertEqual(read_tcp_tables()[key] - lingering, {"ESTABLISHED"})
        smtp_client.close()
        deadline = time.monotonic() + 5
        while (read_tcp_tables().get(key, set()) - lingering != {"CLOSE_WAIT"}
               and time.monotonic() < deadline):
            time.sleep(0.01)
        self.assertEqual(read_tcp_tables()[key] - lingering, {"CLOSE_WAIT"})


class NetstatCheckerTests(unittest.TestCase):
    """The built-in checker: missing or CLOSE_WAIT is gone, only for an MTA on this machine."""

    def checker(self, lines):
        path = self.mktemp()
        with open(path, "w") as file:
            file.writelines(lines)
        return NetstatChecker(paths=(path,))

    def local_mta(self):
        return StringTransport(IPv4Address("TCP", "127.0.0.1", 10025),
                               IPv4Address("TCP", "127.0.0.1", 41000))

    def test_states(self):
        """CLOSE_WAIT, TIME_WAIT and no socket at all are gone; ESTABLISHED is there."""
        checker = self.checker(TCP_LINES + TCP6_LINES + [TIME_WAIT_LINE])
        mta = self.local_mta()
        self.assertFalse(checker.connected(_context("127.0.0.1", 60186), mta))
        self.assertFalse(checker.connected(_context("127.0.0.1", 35210), mta))
        self.assertFalse(checker.connected(_context("127.0.0.1", 1), mta))
        self.assertTrue(checker.connected(_context("127.0.0.1", 53866), mta))
        self.assertTrue(checker.connected(_context("0:0::1", 50302, "inet6"), mta))
        self.assertTrue(checker.connected(_context("::ffff:127.0.0.1", 53866, "inet6"), mta))

    def test_mta_elsewhere(self):
        """An MTA on another host (even on a private network) is never judged from our tables."""
        checker = self.checker(TCP_LINES)
        remote = StringTransport(IPv4Address("TCP", "192.168.1.5", 10025),
                                 IPv4Address("TCP", "192.168.1.9", 41000))
        self.assertFalse(same_host(remote))
        self.assertTrue(checker.connected(_context("127.0.0.1", 1), remote))

    def test_same_host(self):
        """Loopback, a UNIX socket, or the MTA coming from the address it reached us on."""
        self.assertTrue(same_host(self.local_mta()))
        self.assertTrue(same_host(StringTransport(UNIXAddress("/run/mm.sock"),
                                                  UNIXAddress(None))))
        self.assertTrue(same_host(StringTransport(IPv4Address("TCP", "192.168.1.5", 10025),
                                                  IPv4Address("TCP", "192.168.1.5", 41000))))

    def test_clients_it_cannot_judge(self):
        """A UNIX, unknown or unparsable client address is taken as connected."""
        checker = self.checker([])
        mta = self.local_mta()
        self.assertTrue(checker.connected(CheckContext(
            SocketAddress("unix", path="/tmp/x"), None, Macros()), mta))
        self.assertTrue(checker.connected(CheckContext(SocketAddress("unknown"), None,
                                                       Macros()), mta))
        self.assertTrue(checker.connected(_context("not-an-ip", 25), mta))

    def test_without_tables(self):
        """No readable table (no Linux /proc): every client is connected, and that is said once."""
        checker = NetstatChecker(paths=(os.path.join(self.mktemp(), "tcp"),))
        mta = self.local_mta()
        logged = []
        checker.log = Logger(observer=logged.append)
        for _ in range(2):
            checker.new_round()
            self.assertTrue(checker.connected(_context("127.0.0.1", 60186), mta))
        self.assertEqual(len(logged), 1)
        self.assertIn("takes every SMTP client as connected", formatEvent(logged[0]))

    def test_one_read_per_round(self):
        """The table is read once per round, whatever the number of sessions asked about."""
        path = self.mktemp()
        with open(path, "w") as file:
            file.writelines(TCP6_LINES)
        checker = NetstatChecker(paths=(path,))
        mta = self.local_mta()
        self.assertTrue(checker.connected(_context("127.0.0.1", 53866), mta))
        with open(path, "w") as file:
            file.writelines(TCP6_LINES[:1])  # only the listener is left
        self.assertTrue(checker.connected(_context("127.0.0.1", 53866), mta))  # same round
        checker.new_round()
        self.assertFalse(checker.connected(_context("127.0.0.1", 53866), mta))


class CheckContextTests(unittest.TestCase):
    """What a custom checker is given."""

    def test_server_address(self):
        """The MTA's end of its connection: inet, inet6 or a UNIX socket, as SocketAddress."""
        for peer, expected in (
                (IPv4Address("TCP", "127.0.0.1", 41000), "inet:41000@[127.0.0.1]"),
                (IPv6Address("TCP", "::1", 41000), "inet6:41000@[::1]"),
                (UNIXAddress(b"/run/postfix.sock"), "unix:/run/postfix.sock"),
                (UNIXAddress(None), "unix:None")):
            address = server_address(StringTransport(peerAddress=peer))
            self.assertEqual(str(address), expected)
            self.assertTrue(address.local)

    def test_macros(self):
        """context[name] is an MTA macro as str, braces optional; smtp_server_name is v."""
        macros = Macros()
        macros.set_stage(c.CONNECT, {b"v": b"Postfix 3.7.11", b"{daemon_addr}": b"192.0.2.1"})
        context = _context("192.0.2.10", 52258, macros=macros)
        self.assertEqual((context["daemon_addr"], context["{daemon_addr}"], context["j"]),
                         ("192.0.2.1", "192.0.2.1", None))
        self.assertEqual(context.smtp_server_name, "Postfix 3.7.11")
        self.assertEqual(str(context.smtp_client_address), "inet:52258@[192.0.2.10]")


class AnswerNowTests(unittest.SynchronousTestCase):
    """MilterServerProtocol.answer_now: the MTA answered once, the milter's work let go."""

    def pending(self, answer):
        h = Harness()
        h.negotiate()
        h.milter.answers["connect"] = answer
        h.send(CONNECT, HELO)
        self.assertEqual(h.take(), b"")
        return h

    def test_answer_then_queued_commands(self):
        """The pending command gets the reply, its Deferred is cancelled, HELO is handled next."""
        cancelled = []
        h = self.pending(defer.Deferred(cancelled.append))
        self.assertTrue(h.protocol.answer_now(TEMPFAIL))
        self.assertEqual(h.take(), TEMPFAIL.encode() + CONTINUE.encode())
        self.assertEqual(h.names(), ["connect", "helo"])
        self.assertEqual(len(cancelled), 1)
        self.assertFalse(h.protocol.waiting)

    def test_work_that_answers_after_cancel(self):
        """Work that goes on after cancel() and answers later: its answer never reaches the MTA."""
        later = defer.Deferred()
        work = defer.Deferred()
        work.addErrback(lambda failure: later)
        h = self.pending(work)
        h.protocol.answer_now(TEMPFAIL)
        self.assertEqual(h.take(), TEMPFAIL.encode() + CONTINUE.encode())
        later.callback(REJECT)
        self.assertEqual(h.take(), b"")
        h.send(MAIL)
        self.assertEqual(h.take(), CONTINUE.encode())

    def test_nothing_waiting(self):
        """With no command pending there is nothing to answer."""
        h = Harness()
        h.negotiate()
        self.assertFalse(h.protocol.answer_now(TEMPFAIL))
        self.assertEqual(h.take(), b"")


# ---------------------------------------------------------------- the scenario harness

def _continue(*commands):
    return [Send(command) for command in commands]


def _checkers(**functions):
    return {name: Hook("connection_checker", name, function=function, origin=f"test:{name}")
            for name, function in functions.items()}


class DisconnectScenarioTests(ScenarioTestCase):
    """The session's side, on the fake clock: answer at once, let the children go, tell."""

    def setUp(self):
        self.observer = RecordingObserver()
        self.contexts = []

    def configure_checks(self, interval=5.0, at_disconnect=None, **functions):
        def configure(configuration):
            manager = configuration.manager
            manager.connection_check_interval = interval
            manager.connection_checkers = _checkers(**functions)
            if at_disconnect is not None:
                manager.fallback_status_at_disconnect = at_disconnect
        self.configure = configure

    def gone(self, context):
        self.contexts.append(context)
        return False

    @defer.inlineCallbacks
    def test_gone_at_end_of_message(self):
        """The MTA gets temporary-failure for EOM; the next child gets ABORT; later: fallback."""
        self.configure_checks(gone=self.gone)
        lines = self.logged()
        yield self.run_scenario(Scenario(
            children=[Kid("slow", {"end_of_message": Hang()}), Kid("next")],
            steps=[*_continue(CONNECT, HELO, MAIL, RCPT, DATA, SUBJECT, EOH, BODY),
                   Send(EOM, TEMPFAIL, advance=5), Send(MAIL, ACCEPT)],
            seen={"slow": "connect helo mail rcpt data header eoh body eom close",
                  "next": "connect helo mail rcpt data abort close"},
            aborted=("next",),
        ))
        disconnected = [line for line in lines if "[session][disconnected]" in line]
        self.assertEqual(disconnected, ["[session][disconnected][5](1)"])
        gone = [line for line in lines if "[session][client-gone]" in line]
        self.assertEqual(gone, ["[session][client-gone](1) gone found the SMTP client "
                                "inet:52258@[192.0.2.10] gone at end-of-message; answering "
                                "temporary-failure"])
        self.assertEqual([line for line in lines if "[children][error]" in line], [])
        ended = self.observer.of(MessageEnded)
        self.assertEqual([(event.status, event.client_gone, event.aborted) for event in ended],
                         [(Status.TEMPORARY_FAILURE, "gone", False),
                          (Status.ACCEPT, "gone", False)])
        (session,) = self.observer.of(SessionEnded)
        self.assertEqual((session.client_gone, session.status),
                         ("gone", Status.ACCEPT))
        (context,) = self.contexts
        self.assertEqual((str(context.smtp_client_address), context.smtp_server_address.address),
                         ("inet:52258@[192.0.2.10]", "127.0.0.1"))

    @defer.inlineCallbacks
    def test_gone_at_end_of_message_of_a_lone_child(self):
        """One child, the whole chain: its end of message is let go, the MTA gets temporary-failure."""
        self.configure_checks(gone=self.gone)
        lines = self.logged()
        yield self.run_scenario(Scenario(
            children=[Kid("slow", {"end_of_message": Hang()})],
            steps=[*_continue(CONNECT, HELO, MAIL, RCPT, DATA, SUBJECT, EOH, BODY),
                   Send(EOM, TEMPFAIL, advance=5)],
            seen={"slow": "connect helo mail rcpt data header eoh body eom close"},
        ))
        self.assertEqual([line for line in lines if "[session][disconnected]" in line],
                         ["[session][disconnected][5](1)"])
        self.assertEqual([line for line in lines if "[error]" in line], [])
        ended = self.observer.of(MessageEnded)
        self.assertEqual([(event.status, event.client_gone, event.aborted) for event in ended],
                         [(Status.TEMPORARY_FAILURE, "gone", False)])
        (session,) = self.observer.of(SessionEnded)
        self.assertEqual(session.client_gone, "gone")

    def test_gone_at_recipient(self):
        """Children working on RCPT are let go; fallback_status_at_disconnect is the answer."""
        self.configure_checks(gone=self.gone, at_disconnect=Status.REJECT)
        return self.run_scenario(Scenario(
            children=[Kid("one", {"rcpt": Hang()}), Kid("two", {"rcpt": Hang()})],
            steps=[*_continue(CONNECT, HELO, MAIL), Send(RCPT, REJECT, advance=5)],
            seen={"one": "connect helo mail rcpt close", "two": "connect helo mail rcpt close"},
        ))

    def test_gone_at_a_header_the_mta_reads_no_reply_to(self):
        """Postfix reads no reply to headers: the fallback goes with the first reply it reads."""
        self.configure_checks(gone=self.gone, at_disconnect=Status.REJECT)
        return self.run_scenario(Scenario(
            children=[Kid("slow", {"header": Hang()})],
            offer=FULL_OFFER,
            steps=[*_continue(CONNECT, HELO, MAIL, RCPT, DATA), Send(SUBJECT, None, advance=5),
                   Send(EOH, None), Send(BODY, REJECT)],
            seen={"slow": "connect helo mail rcpt data header close"},
        ))

    def test_discard_at_helo(self):
        """A discard at HELO, which the MTAs refuse, is answered as a temporary failure."""
        self.configure_checks(gone=self.gone, at_disconnect=Status.DISCARD)
        return self.run_scenario(Scenario(
            children=[Kid("one", {"helo": Hang()})],
            steps=[Send(CONNECT), Send(HELO, TEMPFAIL, advance=5), Send(MAIL, ACCEPT)],
            seen={"one": "connect helo close"},
        ))

    @defer.inlineCallbacks
    def test_checker_that_raises(self):
        """A checker that raises is one log line and counts as connected: the child answers."""
        calls = []
        self.configure_checks(broken=lambda context: calls.append(context) or 1 / 0)
        lines = self.logged()
        yield self.run_scenario(Scenario(
            children=[Kid("slow", {"end_of_message": Hang(CONTINUE, after=10.5)})],
            steps=[*_continue(CONNECT, HELO, MAIL, RCPT, DATA),
                   Send(EOM, CONTINUE, advance=10.5)],
            seen={"slow": "connect helo mail rcpt data eom close"},
        ))
        errors = [line for line in lines if "[connection-check][error]" in line]
        self.assertEqual((len(calls), len(errors)), (2, 1), lines)  # asked twice, told once
        self.assertIn("checker broken (test:broken) failed: ZeroDivisionError", errors[0])
        self.assertEqual([line for line in lines if "[session][disconnected]" in line], [])

    @defer.inlineCallbacks
    def test_connected_client(self):
        """A client found there changes nothing: the child's answer comes through."""
        calls = []
        self.configure_checks(there=lambda context: calls.append(context) or True)
        yield self.run_scenario(Scenario(
            children=[Kid("slow", {"end_of_message": Hang(CONTINUE, after=10.5)})],
            steps=[*_continue(CONNECT, HELO, MAIL, RCPT, DATA),
                   Send(EOM, CONTINUE, advance=10.5)],
            seen={"slow": "connect helo mail rcpt data eom close"},
        ))
        self.assertEqual(len(calls), 2)  # at 5 and 10 s

    @defer.inlineCallbacks
    def test_no_timer_without_checker_or_interval(self):
        """No checker, or an interval of 0: no timer at all on the clock."""
        for interval, functions in ((5.0, {}), (0.0, {"gone": self.gone})):
            self.configure_checks(interval, **functions)
            yield self.run_scenario(Scenario(
                children=[Kid("slow", {"end_of_message": Hang(CONTINUE, after=12)})],
                steps=[*_continue(CONNECT, HELO, MAIL, RCPT, DATA),
                       Send(EOM, CONTINUE, advance=20)],
            ))
            self.assertIsNone(self.factory.connection_checks._loop)
        self.assertEqual(self.contexts, [])

    def test_timer_stops_with_the_last_connection(self):
        """The factory's one timer stops when no MTA connection is left."""
        self.configure_checks(there=lambda context: True)
        d = self.run_scenario(Scenario(
            children=[Kid("one")], steps=_continue(CONNECT, HELO)))

        def stopped(_):
            self.assertIsNone(self.factory.connection_checks._loop)
            self.assertEqual(self.clock.getDelayedCalls(), [])
        return d.addCallback(stopped)


# ---------------------------------------------------------------- real sockets

MTA_TIMEOUTS = Timeouts(connection=10.0, writing=10.0, reading=10.0, end_of_message=10.0)


class RealDisconnectTests(unittest.TestCase):
    """An MTA, a real SMTP client that hangs up, a slow python3-milter: the netstat checker."""

    timeout = 60

    def start_milter(self, name, *flags):
        milter = LibmilterMilter(self.mktemp(), name, *flags)
        milter.start()
        self.addCleanup(milter.stop)
        return milter

    @defer.inlineCallbacks
    def wait_for_event(self, milter, event, timeout=15):
        deadline = time.monotonic() + timeout
        while not any(record["event"] == event for record in milter.events()):
            if time.monotonic() > deadline:
                self.fail(f"{milter.name} never logged {event}: {milter.events()}")
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def test_client_hangs_up_during_a_slow_end_of_message(self):
        """The MTA gets temporary-failure long before the child ends; the next child is aborted."""
        slow = self.start_milter("slow", "--eom-delay", "4", "--no-add-header")
        after = self.start_milter("after", "--no-add-header")
        manager = ManagerConfig(connection_check_interval=0.2)
        manager.connection_checkers["netstat"] = Hook(
            "connection_checker", "netstat", builtin="netstat", arguments=(0.2,))
        configuration = Configuration(manager=manager, milters=[
            MilterConfig(name="slow", connection_spec=slow.spec),
            MilterConfig(name="after", connection_spec=after.spec)])
        factory = ManagerFactory(configuration, reactor)
        tracker = ConnectionTracker()
        tracker.track(factory)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        lines = []
        from twisted.logger import formatEvent, globalLogPublisher

        def observe(event):
            lines.append(formatEvent(event))
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

        # The SMTP session the MTA tells the manager about: a real TCP connection.
        smtp_server = socket.socket()
        self.addCleanup(smtp_server.close)
        smtp_server.bind(("127.0.0.1", 0))
        smtp_server.listen()
        smtp_client = socket.create_connection(smtp_server.getsockname())
        self.addCleanup(smtp_client.close)
        accepted, _ = smtp_server.accept()
        self.addCleanup(accepted.close)
        host, client_port = smtp_client.getsockname()

        mta = yield client.connect(reactor, f"inet:{port.getHost().port}@[127.0.0.1]",
                                   MTA_TIMEOUTS, task.Clock())
        try:
            yield mta.negotiate(Negotiate(6, c.SMFI_CURR_ACTS, c.SMFI_CURR_PROT, {}))
            # The manager asks this MTA for no reply to headers and their end (None).
            for command, macro, expected in (
                    (Connect(b"client.example.net", c.FAMILY_INET, client_port, host.encode()),
                     Macro(c.CONNECT, {b"j": b"mx.example.org"}), CONTINUE),
                    (Helo(b"client.example.net"), None, CONTINUE),
                    (Mail(b"<a@example.net>"), None, CONTINUE),
                    (Rcpt(b"<b@example.org>"), None, CONTINUE), (DATA, None, CONTINUE),
                    (Header(b"Subject", b"slow"), None, None), (END_OF_HEADERS, None, None),
                    (Body(b"hello\r\n"), None, CONTINUE)):
                response = yield mta.send(command, macro)
                self.assertEqual(response and response.reply, expected, command)
            started = time.monotonic()
            eom = mta.send(END_OF_MESSAGE)
            yield self.wait_for_event(slow, "eom")
            smtp_client.close()  # the SMTP client hangs up; smtpd's socket is in CLOSE_WAIT
            response = yield eom
            elapsed = time.monotonic() - started
        finally:
            mta.close()
            yield mta.when_closed()
            yield tracker.wait()
        self.assertEqual(response.reply, TEMPFAIL)
        self.assertLess(elapsed, 3.0)  # the child works 4 s
        yield self.wait_for_event(after, "close")
        yield self.wait_for_event(slow, "close")
        self.assertEqual([record["event"] for record in after.events()][-2:],
                         ["abort", "close"])
        self.assertNotIn("eom", [record["event"] for record in after.events()])
        disconnected = [line for line in lines if "[session][disconnected]" in line]
        self.assertEqual(len(disconnected), 1, lines)
        self.assertRegex(disconnected[0], r"^\[session\]\[disconnected\]\[[0-9.e-]+\]\(\d+\)$")
        gone = [line for line in lines if "[session][client-gone]" in line]
        self.assertEqual(len(gone), 1, lines)
        self.assertIn(f"netstat found the SMTP client inet:{client_port}@[127.0.0.1] gone at "
                      "end-of-message; answering temporary-failure", gone[0])
        self.assertEqual([line for line in lines if "[children][error]" in line], [])
        self.assertIsNone(factory.connection_checks._loop)


class PostfixDisconnectTests(unittest.TestCase):
    """Behind a real Postfix: the SMTP client hangs up after its message, the child is slow."""

    timeout = 90

    def test_postfix_client_hangs_up(self):
        """Postfix's cleanup gets temporary-failure within a second or so; nothing is delivered."""
        slow = LibmilterMilter(self.mktemp(), "slow", "--eom-delay", "8", "--no-add-header")
        slow.start()
        self.addCleanup(slow.stop)
        manager = MiltermanagerProcess(self.mktemp(), (
            'manager.connection_spec = "{spec}"\n'
            "manager.use_netstat_connection_checker(0.3)\n"
            'with define_milter("slow") as milter:\n'
            f'    milter.connection_spec = "{slow.spec}"\n'))
        manager.start()
        self.addCleanup(manager.stop)
        postfix = Postfix(self.mktemp(), milters=[manager.postfix_spec])
        postfix.start()
        self.addCleanup(postfix.stop)

        smtp = socket.create_connection((HOST, postfix.smtp_port), timeout=30)
        self.addCleanup(smtp.close)
        replies = smtp.makefile("rb")

        def say(line, expect):
            if line is not None:
                smtp.sendall(line + b"\r\n")
            while True:
                reply = replies.readline()
                if reply[3:4] != b"-":
                    break
            self.assertTrue(reply.startswith(expect), reply)

        say(None, b"220")
        say(b"EHLO client.harness.test", b"250")
        say(b"MAIL FROM:<alice@harness.test>", b"250")
        say(b"RCPT TO:<bob@example.com>", b"250")
        say(b"DATA", b"354")
        smtp.sendall(b"Subject: slow\r\n\r\nHello.\r\n.\r\n")
        deadline = time.monotonic() + 30
        while not any(event["event"] == "eom" for event in slow.events()):
            self.assertLess(time.monotonic(), deadline, postfix.maillog())
            time.sleep(0.05)
        started = time.monotonic()
        replies.close()  # (the socket stays open while its file object does)
        smtp.close()  # the SMTP client gives up while the child works
        postfix.wait_maillog("milter-reject: END-OF-MESSAGE", timeout=6)
        self.assertLess(time.monotonic() - started, 6.0)  # the child works 8 s
        self.assertIn("4.7.1", postfix.maillog())
        log = manager.log()
        self.assertEqual(log.count("[session][disconnected]"), 1, log)
        self.assertIn("netstat found the SMTP client inet:", log)
        self.assertIn("gone at end-of-message; answering temporary-failure", log)
        self.assertEqual(postfix._delivered_paths(), [])
