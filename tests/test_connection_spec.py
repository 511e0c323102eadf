"""Tests for miltermanager.connection_spec: parsing, canonical form and endpoints."""

from twisted.internet import endpoints
from twisted.internet.protocol import ClientFactory
from twisted.trial import unittest

from miltermanager.connection_spec import ConnectionSpec, parse

try:
    from twisted.internet.testing import MemoryReactorClock
except ImportError:  # Twisted < 21.2
    from twisted.test.proto_helpers import MemoryReactorClock


# spec -> (family, host, port, path, canonical form)
GOOD = {
    "unix:/run/milter.sock": ("unix", None, None, "/run/milter.sock", "unix:/run/milter.sock"),
    "local:/run/milter.sock": ("unix", None, None, "/run/milter.sock", "unix:/run/milter.sock"),
    "unix:relative/sock": ("unix", None, None, "relative/sock", "unix:relative/sock"),
    "unix:/run/a:b": ("unix", None, None, "/run/a:b", "unix:/run/a:b"),
    "/run/milter.sock": ("unix", None, None, "/run/milter.sock", "unix:/run/milter.sock"),
    "unix:/" + "x" * 106: ("unix", None, None, "/" + "x" * 106, "unix:/" + "x" * 106),
    "inet:10025": ("inet", None, 10025, None, "inet:10025"),
    "inet:0": ("inet", None, 0, None, "inet:0"),
    "inet:65535": ("inet", None, 65535, None, "inet:65535"),
    "inet:10025@localhost": ("inet", "localhost", 10025, None, "inet:10025@localhost"),
    "inet:10025@mx-1.example.org": (
        "inet", "mx-1.example.org", 10025, None, "inet:10025@mx-1.example.org"),
    "inet:10025@127.0.0.1": ("inet", "127.0.0.1", 10025, None, "inet:10025@[127.0.0.1]"),
    "inet:10025@[127.0.0.1]": ("inet", "127.0.0.1", 10025, None, "inet:10025@[127.0.0.1]"),
    "INET:10025@[127.0.0.1]": ("inet", "127.0.0.1", 10025, None, "inet:10025@[127.0.0.1]"),
    "inet6:10025": ("inet6", None, 10025, None, "inet6:10025"),
    "inet6:10025@::1": ("inet6", "::1", 10025, None, "inet6:10025@[::1]"),
    "inet6:10025@[::1]": ("inet6", "::1", 10025, None, "inet6:10025@[::1]"),
    "inet6:10025@[2001:db8::25]": (
        "inet6", "2001:db8::25", 10025, None, "inet6:10025@[2001:db8::25]"),
    "inet6:10025@localhost": ("inet6", "localhost", 10025, None, "inet6:10025@localhost"),
    # Postfix's smtpd_milters notation.
    "inet:127.0.0.1:8891": ("inet", "127.0.0.1", 8891, None, "inet:8891@[127.0.0.1]"),
    "inet:localhost:8891": ("inet", "localhost", 8891, None, "inet:8891@localhost"),
    "inet:[127.0.0.1]:8891": ("inet", "127.0.0.1", 8891, None, "inet:8891@[127.0.0.1]"),
    "inet:[::1]:8891": ("inet6", "::1", 8891, None, "inet6:8891@[::1]"),
    # Twisted endpoint strings we translate.
    "tcp:10025": ("inet", None, 10025, None, "inet:10025"),
    "tcp:port=10025": ("inet", None, 10025, None, "inet:10025"),
    "tcp:10025:interface=127.0.0.1": ("inet", "127.0.0.1", 10025, None, "inet:10025@[127.0.0.1]"),
    "tcp:host=127.0.0.1:port=10025": ("inet", "127.0.0.1", 10025, None, "inet:10025@[127.0.0.1]"),
    "tcp:localhost:10025": ("inet", "localhost", 10025, None, "inet:10025@localhost"),
    "tcp6:10025": ("inet6", None, 10025, None, "inet6:10025"),
    "tcp6:host=\\:\\:1:port=10025": ("inet6", "::1", 10025, None, "inet6:10025@[::1]"),
    "tcp6:10025:interface=\\:\\:1": ("inet6", "::1", 10025, None, "inet6:10025@[::1]"),
    "unix:path=/run/milter.sock": ("unix", None, None, "/run/milter.sock", "unix:/run/milter.sock"),
}

BAD = {
    "": "no type prefix",
    "10025": "no type prefix",
    "inet": "no type prefix",
    "nonsense:10025": "unknown type 'nonsense'",
    "unix:": "empty socket path",
    "local:": "empty socket path",
    "unix:path=": "empty socket path",
    "inet:": "port '' is not a number",
    "inet:smtp": "port 'smtp' is not a number",
    "inet:-1": "port '-1' is not a number",
    "inet:+25": "port '+25' is not a number",
    "inet: 25": "port ' 25' is not a number",
    "inet:1_0": "port '1_0' is not a number",
    "inet:\u0663": "is not a number",
    "inet:65536": "port 65536 is over 65535",
    "inet:99999999999": "is over 65535",
    "inet:10025@": "empty host after '@'",
    "inet::10025": "empty host before ':'",
    "inet:10025@[127.0.0.1": "unbalanced brackets",
    "inet:10025@127.0.0.1]": "unbalanced brackets",
    "inet:10025@[::1]": "::1 is an IPv6 address: use inet6",
    "inet:10025@::1": "::1 is an IPv6 address: use inet6",
    "inet6:10025@[127.0.0.1]": "127.0.0.1 is an IPv4 address: use inet",
    "inet6:10025@127.0.0.1": "127.0.0.1 is an IPv4 address: use inet",
    "inet:10025@[localhost]": "[localhost] is not an IPv4 address",
    "inet6:10025@[::g]": "[::g] is not an IPv6 address",
    "inet:10025@bad host": "bad host name 'bad host'",
    "inet:10025@a/b": "bad host name 'a/b'",
    "inet:localhost:http": "port 'http' is not a number",
    "tcp:host=localhost": "no port",
    "tcp:port=99999": "port 99999 is over 65535",
    "tcp:a:b:c": "too many positional arguments",
    "tcp:host=a:interface=b:port=1": "give host or interface, not both",
    "unix:/a:/b:path=/c": "a unix endpoint takes only a path",
    "unix:/" + "x" * 107: "socket path is 108 bytes long; at most 107 fit",
    "unix:path=/" + "x" * 107: "socket path is 108 bytes long",
    "/" + "\u00e9" * 54: "socket path is 109 bytes long",
}


class ParseTests(unittest.TestCase):
    """parse() on the milter forms, Postfix's form and Twisted endpoint strings."""

    def test_good_specs(self):
        """Every accepted form gives the expected family, host, port, path and canonical form."""
        for spec, (family, host, port, path, canonical) in GOOD.items():
            parsed = parse(spec)
            self.assertEqual(
                (parsed.family, parsed.host, parsed.port, parsed.path, str(parsed)),
                (family, host, port, path, canonical), spec)
            self.assertEqual(parsed.is_unix, family == "unix", spec)

    def test_canonical_form_parses_to_the_same_spec(self):
        """str() of a parsed spec parses back to an equal spec."""
        for spec in GOOD:
            parsed = parse(spec)
            self.assertEqual(parse(str(parsed)), parsed, spec)

    def test_bad_specs(self):
        """A bad spec raises ValueError naming the spec, the problem and the forms expected."""
        for spec, reason in BAD.items():
            with self.assertRaises(ValueError, msg=spec) as caught:
                parse(spec)
            message = str(caught.exception)
            self.assertIn(repr(spec), message)
            self.assertIn(reason, message)
            self.assertIn("inet:PORT[@HOST]", message)
            self.assertIn("unix:/path", message)

    def test_not_a_string(self):
        """A spec that is not a str raises ValueError rather than AttributeError."""
        self.assertRaises(ValueError, parse, None)
        self.assertRaises(ValueError, parse, 10025)

    def test_twisted_string_with_other_options_is_kept(self):
        """A Twisted string with options we do not translate is passed to Twisted as written."""
        spec = parse("tcp:host=127.0.0.1:port=10025:timeout=5")
        self.assertEqual(spec.endpoint, "tcp:host=127.0.0.1:port=10025:timeout=5")
        self.assertEqual(str(spec), "tcp:host=127.0.0.1:port=10025:timeout=5")
        self.assertEqual((spec.host, spec.port), ("127.0.0.1", 10025))
        self.assertFalse(spec.is_unix)

    def test_twisted_unix_string_with_options_keeps_the_path(self):
        """unix:path=...:mode=... stays a Twisted string but still exposes its path."""
        spec = parse("unix:path=/run/m.sock:mode=660")
        self.assertTrue(spec.is_unix)
        self.assertEqual(spec.path, "/run/m.sock")
        self.assertEqual(str(spec), "unix:path=/run/m.sock:mode=660")

    def test_other_twisted_types_are_kept(self):
        """Endpoint types we do not know (ssl:, systemd:) are passed to Twisted unchanged."""
        spec = parse("ssl:10025:privateKey=key.pem")
        self.assertEqual((spec.family, spec.port), ("endpoint", 10025))
        self.assertEqual(str(spec), "ssl:10025:privateKey=key.pem")
        self.assertEqual(parse("systemd:domain=INET:index=0").family, "endpoint")

    def test_spec_is_hashable_and_comparable(self):
        """Specs are frozen values: equal when they point at the same place."""
        self.assertEqual(parse("inet:25@[127.0.0.1]"), parse("inet:127.0.0.1:25"))
        self.assertEqual(len({parse("unix:/a"), parse("local:/a")}), 1)
        self.assertIsInstance(parse("unix:/a"), ConnectionSpec)

    def test_parsed_once(self):
        """A spec parsed again (each child's, at every MTA connection) is the same object; a bad one still raises."""
        self.assertIs(parse("inet:10025@[192.0.2.7]"), parse("inet:10025@[192.0.2.7]"))
        for _ in range(2):
            with self.assertRaises(ValueError):
                parse("inet:99999@localhost")


class EndpointTests(unittest.TestCase):
    """client_endpoint() and server_endpoint() build the right Twisted endpoints."""

    def setUp(self):
        self.reactor = MemoryReactorClock()

    def connect(self, spec, timeout=5):
        """Connect spec's client endpoint on the memory reactor; return connectTCP/UNIX's args."""
        parse(spec).client_endpoint(self.reactor, timeout).connect(None)
        return (self.reactor.tcpClients or self.reactor.unixClients)[-1]

    def listen(self, spec, **kwargs):
        """Listen on spec's server endpoint; return listenTCP/UNIX's args."""
        parse(spec).server_endpoint(self.reactor, **kwargs).listen(None)
        return (self.reactor.tcpServers or self.reactor.unixServers)[-1]

    def test_inet_client_without_host_connects_to_loopback(self):
        """inet:PORT connects to 127.0.0.1 with the given timeout."""
        host, port, _, timeout, _ = self.connect("inet:10025", timeout=7)
        self.assertEqual((host, port, timeout), ("127.0.0.1", 10025, 7))

    def test_inet6_client_without_host_connects_to_loopback(self):
        """inet6:PORT connects to ::1."""
        host, port, _, _, _ = self.connect("inet6:10025")
        self.assertEqual((host, port), ("::1", 10025))

    def test_inet_client_with_host(self):
        """inet:PORT@[ADDRESS] connects to that address."""
        host, port, _, _, _ = self.connect("inet:8891@[192.0.2.1]")
        self.assertEqual((host, port), ("192.0.2.1", 8891))

    def test_inet_server_without_host_listens_everywhere(self):
        """inet:PORT listens on 0.0.0.0 with the given backlog."""
        port, _, backlog, interface = self.listen("inet:10025", backlog=7)
        self.assertEqual((port, backlog, interface), (10025, 7, "0.0.0.0"))

    def test_inet6_server_without_host_listens_everywhere(self):
        """inet6:PORT listens on ::."""
        port, _, _, interface = self.listen("inet6:10025")
        self.assertEqual((port, interface), (10025, "::"))

    def test_inet_server_with_host(self):
        """inet:PORT@[ADDRESS] listens on that address only."""
        port, _, _, interface = self.listen("inet:10025@[127.0.0.1]")
        self.assertEqual((port, interface), (10025, "127.0.0.1"))

    def test_unix_client(self):
        """unix:/path connects to that socket with the given timeout."""
        path, _, timeout, _ = self.connect("unix:/run/m.sock", timeout=3)
        self.assertEqual((path, timeout), ("/run/m.sock", 3))

    def test_unix_server_mode_and_backlog(self):
        """unix:/path listens there with the mode and backlog asked for."""
        path, _, backlog, mode, _ = self.listen("local:/run/m.sock", backlog=9, mode=0o600)
        self.assertEqual((path, backlog, mode), ("/run/m.sock", 9, 0o600))

    def test_unix_server_default_mode(self):
        """The default socket mode is 0660: the MTA's group may connect, others may not."""
        _, _, _, mode, _ = self.listen("unix:/run/m.sock")
        self.assertEqual(mode, 0o660)

    def test_twisted_string_goes_to_twisted(self):
        """A Twisted string we keep as written is parsed by clientFromString/serverFromString."""
        client = parse("tcp:host=127.0.0.1:port=10025:timeout=5").client_endpoint(self.reactor, 30)
        self.assertIsInstance(client, endpoints.TCP4ClientEndpoint)
        server = parse("tcp:10025:interface=127.0.0.1:backlog=5").server_endpoint(self.reactor)
        self.assertIsInstance(server, endpoints.TCP4ServerEndpoint)


class DirectConnectTests(unittest.TestCase):
    """connect(): what the reactor dials itself, and what is left to an endpoint."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.factory = ClientFactory()

    def test_inet_dials_tcp(self):
        """inet with an address, a host name or no host: connectTCP with the timeout."""
        for spec, host in (("inet:10025@[192.0.2.7]", "192.0.2.7"), ("inet:10025@mx.example", "mx.example"),
                           ("inet:10025", "127.0.0.1"), ("inet6:10025@[2001:db8::7]", "2001:db8::7"),
                           ("inet6:10025", "::1")):
            connector = parse(spec).connect(self.reactor, self.factory, 4)
            self.assertIs(connector, self.reactor.connectors[-1], spec)
            self.assertEqual(self.reactor.tcpClients[-1], (host, 10025, self.factory, 4, None), spec)

    def test_unix_dials_unix(self):
        """unix:/path: connectUNIX with the timeout."""
        parse("unix:/run/m.sock").connect(self.reactor, self.factory, 4)
        self.assertEqual(self.reactor.unixClients[-1][:3], ("/run/m.sock", self.factory, 4))

    def test_left_to_an_endpoint(self):
        """A Twisted endpoint string and an inet6 host name (resolved for IPv6) dial nothing here."""
        for spec in ("tcp:host=127.0.0.1:port=10025:timeout=5", "unix:path=/run/m.sock:timeout=3",
                     "inet6:10025@mx.example", "tcp6:host=mx.example:port=10025"):
            self.assertIsNone(parse(spec).connect(self.reactor, self.factory, 4), spec)
        self.assertEqual((self.reactor.tcpClients, self.reactor.unixClients), ([], []))
