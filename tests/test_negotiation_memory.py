"""The MTA's option negotiation answered from the children's last replies (negotiation_memory)."""

from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from miltermanager import client
from miltermanager.client import Timeouts
from miltermanager.config import Configuration, ManagerConfig, MilterConfig
from miltermanager.events import Cause, ChildFellBack
from miltermanager.factory import ManagerFactory
from miltermanager.merge import Status
from miltermanager.negotiation_memory import MAX_OFFERS, NegotiationMemory
from miltermanager.protocol import constants as c
from miltermanager.protocol.messages import CONTINUE, TEMPFAIL, Connect, Helo, Negotiate
from miltermanager.server import Milter, MilterServerFactory
from miltermanager.testing import ConnectionTracker, RecordingObserver, Script, ScriptedChild

OFFER = Negotiate(6, c.SMFI_CURR_ACTS, c.SMFI_CURR_PROT, {})
CONNECT = Connect(b"client.example.net", c.FAMILY_INET, 52258, b"192.0.2.10")
TIMEOUTS = Timeouts(connection=5.0, writing=5.0, reading=5.0, end_of_message=5.0)


def _reply(actions=0, protocol=0):
    return Negotiate(6, actions, protocol, {})


class NegotiationMemoryTests(unittest.TestCase):
    def setUp(self):
        self.memory = NegotiationMemory()
        self.configuration = object()

    def remember(self, offer=OFFER, names=("a",), replies=(_reply(1),), answer=_reply(1)):
        self.memory.remember(self.configuration, offer, names, replies, answer)

    def test_nothing_before_a_session_told_it(self):
        self.assertIsNone(self.memory.recall(self.configuration, OFFER, ("a",)))

    def test_the_replies_and_the_answer(self):
        self.remember(names=("a", "b"), replies=(_reply(1), _reply(2)), answer=_reply(3))
        self.assertEqual(self.memory.recall(self.configuration, OFFER, ("a", "b")),
                         ((_reply(1), _reply(2)), _reply(3)))

    def test_other_children_recall_nothing(self):
        self.remember(names=("a", "b"), replies=(_reply(1), _reply(2)))
        self.assertIsNone(self.memory.recall(self.configuration, OFFER, ("a",)))
        self.assertIsNone(self.memory.recall(self.configuration, OFFER, ("b", "a")))

    def test_another_offer_recalls_nothing(self):
        self.remember()
        other = Negotiate(6, c.SMFI_CURR_ACTS, c.SMFI_CURR_PROT & ~c.SMFIP_NR_HDR, {})
        self.assertIsNone(self.memory.recall(self.configuration, other, ("a",)))

    def test_another_configuration_starts_afresh(self):
        self.remember()
        reloaded = object()
        self.assertIsNone(self.memory.recall(reloaded, OFFER, ("a",)))
        self.assertIsNone(self.memory.recall(self.configuration, OFFER, ("a",)))

    def test_forget(self):
        self.remember()
        self.memory.forget(self.configuration, OFFER)
        self.assertIsNone(self.memory.recall(self.configuration, OFFER, ("a",)))

    def test_offers_are_bounded(self):
        offers = [Negotiate(6, number, 0, {}) for number in range(MAX_OFFERS + 1)]
        for offer in offers:
            self.remember(offer, answer=_reply(offer.actions))
        self.assertIsNone(self.memory.recall(self.configuration, offers[0], ("a",)))
        for offer in offers[1:]:
            self.assertEqual(self.memory.recall(self.configuration, offer, ("a",))[1],
                             _reply(offer.actions))


class _HeldNegotiation(Milter):
    """A child whose negotiation reply waits for the test: self.pending holds the Deferreds."""

    pending = None  # set per test: a list of Deferreds
    reply = _reply(c.SMFIF_ADDHDRS)

    def negotiate(self, offer):
        d = defer.Deferred()
        self.pending.append(d)
        return d


class AnsweredAheadTests(unittest.TestCase):
    """Second and later MTA connections are answered before the children negotiate."""

    timeout = 15

    def setUp(self):
        self.logged = []
        globalLogPublisher.addObserver(self._log)
        self.addCleanup(globalLogPublisher.removeObserver, self._log)

    def _log(self, event):
        self.logged.append(formatEvent(event))

    def scripted_child(self, script):
        child = ScriptedChild(script)
        child.start(reactor)
        self.addCleanup(self._stop_child, child)
        return child

    def held_child(self):
        pending = []
        milter = type("Held", (_HeldNegotiation,), {"pending": pending})
        factory = MilterServerFactory(milter)
        factory.noisy = False
        tracker = ConnectionTracker()
        tracker.track(factory)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(tracker.wait)
        return f"inet:{port.getHost().port}@[127.0.0.1]", pending

    @defer.inlineCallbacks
    def _stop_child(self, child):
        yield child.stop()
        yield child.when_closed()

    def manager(self, specs, fallback=Status.ACCEPT):
        milters = [MilterConfig(name=f"child{number}", connection_spec=spec,
                                fallback_status=fallback, connection_timeout=5.0,
                                writing_timeout=5.0, reading_timeout=5.0,
                                end_of_message_timeout=5.0)
                   for number, spec in enumerate(specs, 1)]
        configuration = Configuration(manager=ManagerConfig(down_after_failures=0),
                                      milters=milters)
        factory = ManagerFactory(configuration, reactor)
        self.observer = RecordingObserver()
        factory.add_observer(self.observer)
        tracker = ConnectionTracker()
        tracker.track(factory)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(tracker.wait)
        self.addCleanup(port.stopListening)
        return f"inet:{port.getHost().port}@[127.0.0.1]"

    @defer.inlineCallbacks
    def mta(self, spec):
        """A negotiated MTA connection to the manager, closed at the end of the test."""
        mta = yield client.connect(reactor, spec, TIMEOUTS)
        self.addCleanup(mta.when_closed)
        self.addCleanup(mta.close)
        yield mta.negotiate(OFFER)
        return mta

    @defer.inlineCallbacks
    def test_answered_before_the_child_negotiates(self):
        child_spec, pending = self.held_child()
        spec = self.manager([child_spec])
        first = yield client.connect(reactor, spec, TIMEOUTS)
        negotiated = first.negotiate(OFFER)
        while not pending:
            yield task.deferLater(reactor, 0, lambda: None)
        self.assertNoResult(negotiated)  # the first one waits for the child
        pending.pop().callback(_HeldNegotiation.reply)
        yield negotiated
        first.close()
        yield first.when_closed()

        second = yield self.mta(spec)  # answered while the child has not negotiated
        self.assertEqual(second.negotiate_reply, first.negotiate_reply)
        while not pending:
            yield task.deferLater(reactor, 0, lambda: None)
        connected = second.send(CONNECT)
        for _ in range(5):
            yield task.deferLater(reactor, 0, lambda: None)
        self.assertNoResult(connected)  # the first command waits for the child
        pending.pop().callback(_HeldNegotiation.reply)
        reply = yield connected
        self.assertEqual(reply.reply, CONTINUE)

    @defer.inlineCallbacks
    def test_not_ahead_when_the_mta_would_read_no_reply_at_connect(self):
        child_spec, pending = self.held_child()
        spec = self.manager([child_spec])
        reply = _reply(c.SMFIF_ADDHDRS, c.SMFIP_NR_CONN)
        for _ in range(2):
            mta = yield client.connect(reactor, spec, TIMEOUTS)
            negotiated = mta.negotiate(OFFER)
            while not pending:
                yield task.deferLater(reactor, 0, lambda: None)
            self.assertNoResult(negotiated)
            pending.pop().callback(reply)
            yield negotiated
            self.assertTrue(mta.negotiate_reply.protocol & c.SMFIP_NR_CONN)
            mta.close()
            yield mta.when_closed()

    @defer.inlineCallbacks
    def test_a_child_gone_since_gives_its_fallback(self):
        child = self.scripted_child(Script(actions=c.SMFIF_ADDHDRS))
        spec = self.manager([child.spec], fallback=Status.TEMPORARY_FAILURE)
        first = yield self.mta(spec)
        self.assertEqual(first.negotiate_reply.actions, c.SMFIF_ADDHDRS)
        yield child.stop()

        second = yield self.mta(spec)  # answered from the first
        self.assertEqual(second.negotiate_reply, first.negotiate_reply)
        reply = yield second.send(CONNECT)
        self.assertEqual(reply.reply, TEMPFAIL)

        third = yield self.mta(spec)  # the second forgot the offer: negotiated first
        self.assertEqual(third.negotiate_reply, Negotiate(6, 0, 0, {}))
        reply = yield third.send(CONNECT)
        self.assertEqual(reply.reply, TEMPFAIL)

    @defer.inlineCallbacks
    def test_a_changed_negotiation_sits_out_the_connection(self):
        script = Script(actions=c.SMFIF_ADDHDRS)
        child = self.scripted_child(script)
        spec = self.manager([child.spec], fallback=Status.TEMPORARY_FAILURE)
        first = yield self.mta(spec)
        reply = yield first.send(CONNECT)
        self.assertEqual(reply.reply, CONTINUE)
        script.actions = c.SMFIF_ADDHDRS | c.SMFIF_CHGHDRS  # restarted with other settings

        second = yield self.mta(spec)
        self.assertEqual(second.negotiate_reply.actions, c.SMFIF_ADDHDRS)
        reply = yield second.send(CONNECT)
        self.assertEqual(reply.reply, TEMPFAIL)
        [fell_back] = self.observer.of(ChildFellBack)
        self.assertEqual((fell_back.child, fell_back.cause, fell_back.status),
                         ("child1", Cause.CHANGED, Status.TEMPORARY_FAILURE))
        [line] = [line for line in self.logged if "negotiated" in line and "before" in line]
        self.assertIn("child1", line)

        third = yield self.mta(spec)  # answered from the new reply, and the child takes part
        self.assertEqual(third.negotiate_reply.actions, c.SMFIF_ADDHDRS | c.SMFIF_CHGHDRS)
        reply = yield third.send(CONNECT)
        self.assertEqual(reply.reply, CONTINUE)
        self.assertEqual(len(self.observer.of(ChildFellBack)), 1)

    @defer.inlineCallbacks
    def test_a_changed_negotiation_the_answer_covers(self):
        """Fewer actions, and "no reply" to HELO, which the manager makes up for: it takes part."""
        script = Script(actions=c.SMFIF_ADDHDRS | c.SMFIF_CHGHDRS)
        child = self.scripted_child(script)
        spec = self.manager([child.spec], fallback=Status.TEMPORARY_FAILURE)
        yield self.mta(spec)
        script.actions, script.protocol = c.SMFIF_ADDHDRS, c.SMFIP_NR_HELO

        second = yield self.mta(spec)
        self.assertEqual(second.negotiate_reply.actions, c.SMFIF_ADDHDRS | c.SMFIF_CHGHDRS)
        reply = yield second.send(CONNECT)
        self.assertEqual(reply.reply, CONTINUE)
        reply = yield second.send(Helo(b"client.example.net"))
        self.assertEqual(reply.reply, CONTINUE)
        self.assertEqual(self.observer.of(ChildFellBack), [])
        [line] = [line for line in self.logged if "[children][negotiate][changed]" in line]
        self.assertIn("covers it", line)
        self.assertEqual([event.name for event in child.events].count("helo"), 1)
