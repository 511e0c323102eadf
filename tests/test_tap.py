"""Tests for the twistd plugin, its options and the no-children fallback milter."""

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from miltermanager import tap
from miltermanager.fallback import FallbackMilter, fallback_reply
from miltermanager.macros import Macros
from miltermanager.protocol import messages, negotiation
from miltermanager.server import IMilter


class PluginTests(SynchronousTestCase):
    def test_plugin_is_found(self):
        """`twistd milter-manager` is discoverable as a twistd plugin."""
        names = [maker.tapname for maker in getPlugins(IServiceMaker)]
        self.assertIn("milter-manager", names)


class OptionsTests(SynchronousTestCase):
    def test_default_connection_spec(self):
        """Without options it listens on inet:10025@[127.0.0.1], as upstream's generic default."""
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options["connection-spec"], "inet:10025@[127.0.0.1]")

    def test_bad_connection_spec(self):
        """A connection spec that is no milter or endpoint form stops start-up with a usage error."""
        options = tap.Options()
        error = self.assertRaises(
            usage.UsageError, options.parseOptions, ["--connection-spec", "bogus:1"])
        self.assertIn("bogus:1", str(error))

    def test_bad_fallback_status(self):
        """An unknown fallback status is refused at start-up."""
        options = tap.Options()
        self.assertRaises(
            usage.UsageError, options.parseOptions, ["--fallback-status", "maybe"])

    def test_make_service(self):
        """makeService builds a named listening service."""
        options = tap.Options()
        options.parseOptions(["--connection-spec", "inet:0@[127.0.0.1]"])
        service = tap.makeService(options)
        self.assertEqual(service.name, "milter-manager")


class FallbackMilterTests(SynchronousTestCase):
    def test_provides_imilter(self):
        """The fallback milter is an IMilter."""
        verifyObject(IMilter, FallbackMilter("accept"))

    def test_negotiates_every_event_with_reply(self):
        """It asks for every event and negotiates no "no reply" step."""
        wanted = FallbackMilter("reject").negotiate(negotiation.offer())
        self.assertEqual((wanted.actions, wanted.protocol), (0, 0))

    def test_answers_each_command_with_the_status(self):
        """Every command gets the fallback status as its one reply."""
        milter = FallbackMilter("temporary_failure")
        for event in (milter.connect, milter.helo, milter.mail, milter.rcpt,
                      milter.end_of_message):
            self.assertIs(event(None, Macros()), messages.TEMPFAIL)

    def test_status_names(self):
        """Status names are upstream's, case-insensitive, with _ for -."""
        self.assertIs(fallback_reply("Accept"), messages.ACCEPT)
        self.assertIs(fallback_reply("discard"), messages.DISCARD)
        self.assertRaises(ValueError, fallback_reply, "bounce")
