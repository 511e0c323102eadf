"""A stricter wire: children that break the protocol on purpose, and MTAs that never talk.

Each scenario runs the manager's factory on loopback with scripted children
that send what the MTAs would refuse (an invalid reply code, SHUTDOWN,
DISCARD at connect, progress before end of message, packets too large);
the manager must treat each as that child's protocol error: its fallback,
one log line, never the bogus reply forwarded.
"""

import socket

from twisted.internet import defer, protocol, reactor, task
from twisted.logger import LogLevel
from twisted.trial import unittest

from miltermanager import client
from miltermanager.config import Configuration, ManagerConfig, MilterConfig
from miltermanager.factory import ManagerFactory
from miltermanager.merge import Status
from miltermanager.protocol import constants as c
from miltermanager.protocol.messages import (
    ACCEPT, CONTINUE, DISCARD, PROGRESS, REJECT, SHUTDOWN, TEMPFAIL, Body, Negotiate, ReplyCode,
)
from miltermanager.server import MilterServerProtocol
from miltermanager.testing import Raw
from tests.peers.fixtures import LibmilterMilter
from tests.test_session import (
    ALL_SEEN, CONNECT, EOM, HELO, MAIL, MTA_TIMEOUTS, OFFER, RCPT, Hang, Kid, Scenario,
    ScenarioTestCase, Send, _message,
)

HELLO_WORLD = ReplyCode(b"hello world")


def _error_lines(lines, name):
    """The error-level log lines that name child name."""
    return [text for level, text in lines if level == LogLevel.error and f"] {name}:" in text]


class InvalidReplyCodeTests(ScenarioTestCase):
    """A reply code that is not a valid SMTP reply is the child's error, never forwarded."""

    @defer.inlineCallbacks
    def test_lone_child_at_rcpt_gets_its_fallback(self):
        """y "hello world" at RCPT: the MTA gets the child's fallback (tempfail), one error line."""
        lines = self.logged_at()
        yield self.run_scenario(Scenario(
            children=[Kid("bad", replies={"rcpt": HELLO_WORLD},
                          fallback=Status.TEMPORARY_FAILURE)],
            steps=_message(CONTINUE)[:3] + [(RCPT, TEMPFAIL), (RCPT, ACCEPT)],
            seen={"bad": "connect helo mail rcpt close"},
        ))
        [line] = _error_lines(lines, "bad")
        self.assertIn("[children][error][envelope-recipient][temporary-failure] bad: "
                      "invalid SMTP reply b'hello world'", line)

    def test_sibling_carries_the_message(self):
        """With fallback accept the bogus child drops out and its sibling's verdicts count."""
        return self.run_scenario(Scenario(
            children=[Kid("bad", replies={"mail": HELLO_WORLD}), Kid("two")],
            steps=_message(CONTINUE),
            seen={"bad": "connect helo mail close", "two": ALL_SEEN},
        ))

    def test_wrong_class_at_end_of_message(self):
        """550 with enhanced code 4.7.1 at end of message: the child's fallback reject."""
        return self.run_scenario(Scenario(
            children=[Kid("bad", replies={"end_of_message": ReplyCode(b"550 4.7.1 no")},
                          fallback=Status.REJECT)],
            steps=_message(REJECT),
        ))

    def test_valid_reply_code_goes_on_with_percent_doubled(self):
        """A valid reply code reaches the MTA; a lone % in it is doubled for the MTAs."""
        return self.run_scenario(Scenario(
            children=[Kid("good", replies={"rcpt": ReplyCode(b"550 5.7.1 100% spam")})],
            steps=_message(CONTINUE)[:3] + [(RCPT, ReplyCode(b"550 5.7.1 100%% spam"))],
        ))


class RefusedReplyTests(ScenarioTestCase):
    """SHUTDOWN anywhere and DISCARD at connect or HELO are the child's error."""

    @defer.inlineCallbacks
    def test_shutdown_at_connect(self):
        """SHUTDOWN at connect: never forwarded; the lone child's fallback tempfail answers."""
        lines = self.logged_at()
        yield self.run_scenario(Scenario(
            children=[Kid("bad", replies={"connect": SHUTDOWN},
                          fallback=Status.TEMPORARY_FAILURE)],
            steps=[(CONNECT, TEMPFAIL)],
            seen={"bad": "connect close"},
        ))
        [line] = _error_lines(lines, "bad")
        self.assertIn("[children][error][connect][temporary-failure] bad: shutdown", line)

    def test_shutdown_at_end_of_message(self):
        """SHUTDOWN at end of message from the first child: its fallback accept; the next runs."""
        return self.run_scenario(Scenario(
            children=[Kid("bad", replies={"end_of_message": SHUTDOWN}), Kid("two")],
            steps=_message(CONTINUE),
            seen={"bad": ALL_SEEN, "two": ALL_SEEN},
        ))

    def test_discard_at_connect_lone_child(self):
        """DISCARD at connect: the child's fallback (accept) is the MTA's reply, not DISCARD."""
        return self.run_scenario(Scenario(
            children=[Kid("bad", replies={"connect": DISCARD})],
            steps=[(CONNECT, ACCEPT)],
            seen={"bad": "connect close"},
        ))

    def test_discard_at_helo_with_sibling(self):
        """DISCARD at HELO with fallback accept: the sibling goes on with the message."""
        return self.run_scenario(Scenario(
            children=[Kid("bad", replies={"helo": DISCARD}), Kid("two")],
            steps=_message(CONTINUE),
            seen={"bad": "connect helo close", "two": ALL_SEEN},
        ))

    def test_discard_at_helo_fallback_tempfail(self):
        """DISCARD at HELO with fallback temporary-failure: TEMPFAIL for HELO."""
        return self.run_scenario(Scenario(
            children=[Kid("bad", replies={"helo": DISCARD}, fallback=Status.TEMPORARY_FAILURE),
                      Kid("two")],
            steps=[(CONNECT, CONTINUE), (HELO, TEMPFAIL)],
            seen={"bad": "connect helo close", "two": "connect helo close"},
        ))

    def test_discard_fallback_at_helo_waits_for_mail(self):
        """A child failing at HELO with fallback discard: HELO goes on, its MAIL is discarded."""
        return self.run_scenario(Scenario(
            children=[Kid("bad", replies={"helo": SHUTDOWN}, fallback=Status.DISCARD),
                      Kid("two")],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, DISCARD)],
            seen={"bad": "connect helo close", "two": "connect helo mail abort close"},
        ))


class ProgressBeforeEndOfMessageTests(ScenarioTestCase):
    """Progress outside end of message is a protocol error, not a reason to wait forever."""

    @defer.inlineCallbacks
    def test_progress_at_rcpt_is_the_childs_error_at_once(self):
        """A child answering RCPT with progress only: its fallback at once, no timeout needed."""
        lines = self.logged_at()
        yield self.run_scenario(Scenario(
            children=[Kid("bad", replies={"rcpt": Raw(PROGRESS.encode() * 3)},
                          fallback=Status.TEMPORARY_FAILURE),
                      Kid("two")],
            steps=_message(CONTINUE)[:3] + [(RCPT, TEMPFAIL)],
            seen={"bad": "connect helo mail rcpt close",
                  "two": "connect helo mail rcpt abort close"},
        ))
        [line] = _error_lines(lines, "bad")
        self.assertIn("[children][error][envelope-recipient][temporary-failure] bad:", line)
        self.assertIn("progress", line.lower())

    def test_progress_at_end_of_message_is_fine(self):
        """Progress at end of message keeps the child alive; its final reply counts."""
        return self.run_scenario(Scenario(
            children=[Kid("slow", replies={"end_of_message": Raw(PROGRESS.encode(), REJECT)})],
            steps=_message(REJECT),
        ))


MDS_OFFER = Negotiate(6, c.SMFI_CURR_ACTS, OFFER.protocol | c.SMFIP_MDS_256K, {})


class MaxDataSizeTests(ScenarioTestCase):
    """Never promise the MTA a packet size a child cannot take; split body chunks per child."""

    timeout = 60

    def test_mds_not_echoed_when_a_child_did_not(self):
        """The MTA offers MDS_256K, the child answers protocol 0: no MDS in the manager's reply."""
        return self.run_scenario(Scenario(
            children=[Kid("one")],
            offer=MDS_OFFER,
            steps=[(CONNECT, CONTINUE)],
            negotiated=Negotiate(6, 0, 0, {}),
        ))

    def test_big_chunk_split_for_a_scripted_child(self):
        """A 200,000-byte chunk reaches a protocol-0 child in pieces of at most 65535 bytes."""
        chunk = bytes(range(256)) * 781 + b"0123456789ABCDEF"[:64]
        return self.run_scenario(Scenario(
            children=[Kid("one")],
            offer=MDS_OFFER,
            steps=_message(CONTINUE)[:-2] + [(Body(chunk), CONTINUE), (EOM, CONTINUE)],
            body_seen={"one": chunk},
            chunks_seen={"one": [65535, 65535, 65535, len(chunk) - 3 * 65535]},
        ))

    @defer.inlineCallbacks
    def test_big_chunk_to_a_real_libmilter_child(self):
        """A real libmilter child (limited to 65535 bytes) gets every byte and stays connected."""
        milter = LibmilterMilter(self.mktemp(), "lib", "--no-add-header")
        milter.start()
        self.addCleanup(milter.stop)
        chunk = (b"x" * 99 + b"\n") * 2000  # 200,000 bytes
        yield self.run_scenario(Scenario(
            children=[Kid("lib", spec=milter.spec)],
            offer=MDS_OFFER,
            steps=_message(CONTINUE)[:-2] + [(Body(chunk), CONTINUE), (EOM, CONTINUE)],
        ))
        events = milter.events()
        for _ in range(500):  # the milter logs its close callback after we hung up
            if events and events[-1]["event"] == "close":
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
            events = milter.events()
        body = "".join(event["chunk"] for event in events if event["event"] == "body")
        self.assertEqual(len(body), len(chunk))
        self.assertEqual([event["event"] for event in events][-2:], ["eom", "close"])


class _Silent(protocol.Protocol):
    """A child that accepts the connection and never says a word."""

    def dataReceived(self, data):
        pass


class MTAGoneTests(unittest.TestCase):
    """The MTA leaving while the children negotiate is no child's error."""

    timeout = 15

    @defer.inlineCallbacks
    def test_mta_leaves_during_negotiation(self):
        """No error line: the children's negotiation is cancelled and logged at debug."""
        silent = protocol.Factory.forProtocol(_Silent)
        port = reactor.listenTCP(0, silent, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        configuration = Configuration(milters=[MilterConfig(
            name="slow", connection_spec=f"inet:{port.getHost().port}@[127.0.0.1]")])
        factory = ManagerFactory(configuration, reactor, task.Clock())
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        lines = ScenarioTestCase.logged_at(self)
        made = []
        make_session = factory.milter_factory

        def milter_factory(server):
            session = make_session(server)
            made.append(session)
            return session

        factory.milter_factory = milter_factory
        mta = yield client.connect(
            reactor, f"inet:{listening.getHost().port}@[127.0.0.1]", MTA_TIMEOUTS, task.Clock())
        negotiating = mta.negotiate(Negotiate(6, c.SMFI_CURR_ACTS, c.SMFI_CURR_PROT, {}))
        negotiating.addErrback(lambda failure: None)
        while not made or made[0].children[0].connection is None:
            yield task.deferLater(reactor, 0.01, lambda: None)
        mta.transport.loseConnection()
        yield mta.when_closed()
        yield made[0].children[0].connection.when_closed()
        self.assertEqual([text for level, text in lines if level >= LogLevel.warn], [])
        self.assertTrue(any("[children][cancelled][negotiate] slow" in text
                            for level, text in lines if level == LogLevel.debug))


class MTATimeoutTests(unittest.TestCase):
    """MTA connections that never negotiate or stay idle are closed (the configured bounds)."""

    timeout = 15

    @defer.inlineCallbacks
    def test_silent_connections_closed_after_negotiation_timeout(self):
        """Ten connections that never send OPTNEG are closed at manager.negotiation_timeout."""
        clock = task.Clock()
        configuration = Configuration(manager=ManagerConfig(negotiation_timeout=5.0))
        factory = ManagerFactory(configuration, reactor, clock)
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        sockets = []
        for _ in range(10):
            sock = socket.create_connection(("127.0.0.1", listening.getHost().port))
            sock.setblocking(False)
            sockets.append(sock)
            self.addCleanup(sock.close)
        while factory.connections < 10:
            yield task.deferLater(reactor, 0.01, lambda: None)
        clock.advance(4.9)
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(factory.connections, 10)
        clock.advance(0.2)
        while factory.connections:
            yield task.deferLater(reactor, 0.01, lambda: None)
        for sock in sockets:
            self.assertEqual(_read_eof(sock), b"")

    @defer.inlineCallbacks
    def test_idle_connection_closed_after_idle_timeout(self):
        """A negotiated connection with no command for manager.idle_timeout is closed."""
        clock = task.Clock()
        configuration = Configuration(manager=ManagerConfig(idle_timeout=60.0))
        factory = ManagerFactory(configuration, reactor, clock)
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        mta = yield client.connect(
            reactor, f"inet:{listening.getHost().port}@[127.0.0.1]", MTA_TIMEOUTS, task.Clock())
        yield mta.negotiate(Negotiate(6, c.SMFI_CURR_ACTS, c.SMFI_CURR_PROT, {}))
        reply = yield mta.send(CONNECT)
        self.assertEqual(reply.reply, ACCEPT)  # no child: the manager's fallback
        clock.advance(59)
        self.assertEqual(factory.connections, 1)
        clock.advance(2)
        yield mta.when_closed()


def _read_eof(sock):
    """What sock reads once the peer closed it (b"" at EOF)."""
    sock.setblocking(True)
    sock.settimeout(5)
    try:
        return sock.recv(1)
    except ConnectionResetError:
        return b""


class ProgressErrbackTests(ScenarioTestCase):
    """The progress timer's chain ends in an errback: a failure is logged, the message goes on."""

    @defer.inlineCallbacks
    def test_progress_failure_is_logged(self):
        """server.progress raising: one logged failure, the end-of-message reply still comes."""
        def broken(self):
            raise RuntimeError("progress broke")

        self.patch(MilterServerProtocol, "progress", broken)
        yield self.run_scenario(Scenario(
            children=[Kid("slow", replies={"end_of_message": Hang(CONTINUE, after=25)})],
            progress_interval=10,
            steps=_message(CONTINUE)[:-1] + [Send(EOM, CONTINUE, advance=25)],
        ))
        errors = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(len(errors), 1)

