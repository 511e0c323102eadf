"""Tests for the controller socket: upstream's framing, its commands, errors, the socket file."""

import grp
import json
import os
import shutil
import stat
import struct
import tempfile

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import TestCase

from miltermanager import config, service
from miltermanager.controller import server as controller_server


def packet(name, content=b""):
    """A control packet as upstream's encoder makes it (written here, not the project's code)."""
    payload = name + b"\0" + content
    return struct.pack(">I", len(payload)) + payload


class Client(protocol.Protocol):
    """Collects the controller's replies as (name, content) pairs."""

    def __init__(self):
        self.buffer = b""
        self.replies = []
        self.waiting = []
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        self.buffer += data
        while len(self.buffer) >= 4:
            (length,) = struct.unpack(">I", self.buffer[:4])
            if len(self.buffer) < 4 + length:
                return
            payload, self.buffer = self.buffer[4:4 + length], self.buffer[4 + length:]
            name, _, content = payload.partition(b"\0")
            self.replies.append((name, content))
        self._check()

    def _check(self):
        for count, d in list(self.waiting):
            if len(self.replies) >= count:
                self.waiting.remove((count, d))
                d.callback(self.replies[:count])

    def wait(self, count):
        d = defer.Deferred()
        self.waiting.append((count, d))
        self._check()
        return d

    def connectionLost(self, reason=None):
        self.closed.callback(None)


CONFIG = """\
manager.connection_spec = "inet:0@[127.0.0.1]"
controller.connection_spec = "unix:{dir}/controller.sock"
manager.custom_configuration_directory = "{dir}/custom"
{extra}
with define_milter("alpha") as milter:
    milter.connection_spec = "inet:1@[127.0.0.1]"
"""


class ControllerTests(TestCase):
    """A ManagerService with a controller on a UNIX socket, driven by a client of the test's own."""

    def setUp(self):
        # Short: a UNIX socket path holds at most 107 bytes.
        self.dir = tempfile.mkdtemp(prefix="mm-ctl-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "milter-manager.conf")
        self.events = []
        self.patch(controller_server.ControllerProtocol, "log",
                   Logger(namespace="test", observer=self.events.append))

    def write(self, extra=""):
        with open(self.path, "w") as out:
            out.write(CONFIG.format(dir=self.dir, extra=extra))
        os.chmod(self.path, 0o600)

    def load(self):
        return config.load(self.path)

    def start(self, extra=""):
        self.write(extra)
        made = service.ManagerService(reactor, self.load(), load=self.load)
        made.privilegedStartService()
        self.addCleanup(made.stopService)
        self.service = made
        return made

    @defer.inlineCallbacks
    def connect(self):
        client = Client()
        yield connectProtocol(UNIXClientEndpoint(reactor, f"{self.dir}/controller.sock"),
                              client)
        self.addCleanup(lambda: client.transport.loseConnection() or client.closed)
        return client

    @defer.inlineCallbacks
    def ask(self, *packets):
        self.start() if not hasattr(self, "service") else None
        client = yield self.connect()
        client.transport.write(b"".join(packets))
        replies = yield client.wait(len(packets))
        return replies

    def log_lines(self):
        return [formatEvent(event) for event in self.events
                if event.get("log_level").name in ("warn", "error", "critical")]

    @defer.inlineCallbacks
    def test_get_status(self):
        """get-status answers status\\0JSON: no session yet, the child up, generation 1."""
        [(name, content)] = yield self.ask(packet(b"get-status"))
        self.assertEqual(name, b"status")
        data = json.loads(content)
        self.assertEqual(data["sessions"], {"started": 0, "finished": 0, "in_flight": 0})
        self.assertEqual(data["messages"], {"total": 0, "verdicts": {}})
        self.assertEqual(data["configuration"]["generation"], 1)
        self.assertEqual(data["configuration"]["files"], [self.path])
        self.assertEqual(data["pid"], os.getpid())
        self.assertEqual([(child["name"], child["state"], child["failures_in_row"],
                           child["messages"]) for child in data["children"]],
                         [("alpha", "up", 0, 0)])
        self.assertEqual(data["trace_sessions"], 1000)

    @defer.inlineCallbacks
    def test_get_configuration(self):
        """get-configuration answers configuration\\0 and the configuration as --show-config."""
        [(name, content)] = yield self.ask(packet(b"get-configuration"))
        self.assertEqual(name, b"configuration")
        self.assertIn(f'controller.connection_spec = "unix:{self.dir}/controller.sock"'
                      .encode(), content)
        self.assertIn(b'define_milter("alpha")', content)

    @defer.inlineCallbacks
    def test_reload(self):
        """reload answers success once the new configuration is in use; the generation counts it."""
        self.start()
        self.write('manager.fallback_status = "reject"')
        replies = yield self.ask(packet(b"reload"), packet(b"get-status"))
        self.assertEqual(replies[0], (b"success", b""))
        self.assertEqual(json.loads(replies[1][1])["configuration"]["generation"], 2)
        self.assertEqual(self.service.configuration.manager.fallback_status.label, "reject")

    @defer.inlineCallbacks
    def test_reload_failure(self):
        """A reload that fails answers failure\\0 with the error and where it is (upstream: success)."""
        self.start()
        self.write('manager.fallback_status = "maybe"')
        replies = yield self.ask(packet(b"reload"), packet(b"get-status"))
        name, content = replies[0]
        self.assertEqual(name, b"failure")
        self.assertTrue(content.startswith(
            b"reload failed; the running configuration is kept: " + self.path.encode()
            + b":4: manager.fallback_status"), content)
        self.assertEqual(json.loads(replies[1][1])["configuration"]["generation"], 1)

    @defer.inlineCallbacks
    def test_unknown_command(self):
        """An unknown command gets error\\0 and one log line; the connection goes on."""
        replies = yield self.ask(packet(b"stop-child", b"alpha"), packet(b"get-status"))
        self.assertEqual(replies[0],
                         (b"error", b"unexpected command was received: <stop-child>"))
        self.assertEqual(replies[1][0], b"status")
        self.assertEqual(self.log_lines(), [
            "[controller][error][decode] unexpected command was received: <stop-child>"])

    @defer.inlineCallbacks
    def test_no_nul(self):
        """A payload without a NUL-terminated name gets error\\0 and one log line."""
        replies = yield self.ask(struct.pack(">I", 10) + b"get-status")
        self.assertEqual(replies, [(b"error", b"control command isn't terminated by NUL")])
        self.assertEqual(len(self.log_lines()), 1)

    @defer.inlineCallbacks
    def test_content_where_none_belongs(self):
        """reload with content is refused as upstream's decoder refuses it."""
        replies = yield self.ask(packet(b"reload", b"now"))
        self.assertEqual(replies, [(b"error", b"reload command carries 3 unexpected bytes")])

    @defer.inlineCallbacks
    def test_bad_length_closes(self):
        """A length beyond any command gets error\\0, one log line, and the connection is closed."""
        self.start()
        client = yield self.connect()
        client.transport.write(struct.pack(">I", 0x7FFFFFFF) + b"x")
        replies = yield client.wait(1)
        yield client.closed
        self.assertEqual(replies, [(b"error", b"packet length 2147483647 is out of range "
                                              b"(1 to 1048640)")])
        self.assertEqual(len(self.log_lines()), 1)

    @defer.inlineCallbacks
    def test_split_packets(self):
        """A packet arriving a byte at a time is answered once, whole."""
        self.start()
        client = yield self.connect()
        for byte in packet(b"get-status"):
            client.transport.write(bytes([byte]))
        replies = yield client.wait(1)
        self.assertEqual(replies[0][0], b"status")

    @defer.inlineCallbacks
    def test_set_configuration(self):
        """set-configuration writes milter-manager.custom.conf (mode 0600); the reload loads it."""
        text = b'manager.fallback_status = "temporary-failure"\n'
        replies = yield self.ask(packet(b"set-configuration", text), packet(b"reload"))
        self.assertEqual(replies, [(b"success", b""), (b"success", b"")])
        custom = os.path.join(self.dir, "custom", "milter-manager.custom.conf")
        with open(custom, "rb") as file:
            self.assertEqual(file.read(), text)
        self.assertEqual(stat.S_IMODE(os.stat(custom).st_mode), 0o600)
        self.assertEqual(self.service.configuration.manager.fallback_status.label,
                         "temporary-failure")

    @defer.inlineCallbacks
    def test_set_configuration_refusals(self):
        """XML, a syntax error and non-UTF-8 text are refused with the reason; nothing is written."""
        replies = yield self.ask(packet(b"set-configuration", b"<configuration/>"),
                                 packet(b"set-configuration", b"manager.x = (\n"),
                                 packet(b"set-configuration", b"\xff"))
        self.assertEqual(replies, [
            (b"error", b"the configuration is XML (upstream's format); milter-manager's files "
                       b"are written in its Python language (see --show-config)"),
            (b"error", b"syntax error at line 1: '(' was never closed"),
            (b"error", b"the configuration is not UTF-8 text (byte 0)")])
        self.assertFalse(os.path.exists(os.path.join(self.dir, "custom")))
        self.assertEqual(len(self.log_lines()), 3)

    @defer.inlineCallbacks
    def test_set_configuration_world_writable_socket(self):
        """A controller socket any local user may connect to cannot set the configuration."""
        self.start("controller.unix_socket_mode = 0o666")
        replies = yield self.ask(packet(b"set-configuration", b"x = 1\n"))
        self.assertEqual(replies, [(b"error", b"set-configuration is refused: controller."
                                              b"unix_socket_mode 0666 lets any local user "
                                              b"connect, and the file is code the manager runs")])

    @defer.inlineCallbacks
    def test_trace_unknown(self):
        """get-trace of a queue id nobody saw answers error\\0 saying what is kept."""
        replies = yield self.ask(packet(b"get-trace", b"4BC5D2125D2"))
        self.assertEqual(replies, [(b"error", b"no session or queue id '4BC5D2125D2' among "
                                              b"the 0 sessions in flight and the last 0 "
                                              b"finished (controller.trace_sessions = 1000)")])

    def test_socket_mode_and_group(self):
        """The socket gets unix_socket_mode (default 0660) and unix_socket_group."""
        group = grp.getgrgid(os.getgid()).gr_name
        self.start(f'controller.unix_socket_mode = 0o640\ncontroller.unix_socket_group = '
                   f'"{group}"')
        info = os.stat(f"{self.dir}/controller.sock")
        self.assertTrue(stat.S_ISSOCK(info.st_mode))
        self.assertEqual(stat.S_IMODE(info.st_mode), 0o640)
        self.assertEqual(info.st_gid, os.getgid())

    def test_default_mode(self):
        """Without unix_socket_mode the socket is 0660, upstream's default."""
        self.start()
        self.assertEqual(stat.S_IMODE(os.stat(f"{self.dir}/controller.sock").st_mode), 0o660)

    @defer.inlineCallbacks
    def test_removed_at_stop(self):
        """The socket file is removed at stop (remove_unix_socket_on_close, default true)."""
        made = self.start()
        yield made.stopService()
        self.assertFalse(os.path.exists(f"{self.dir}/controller.sock"))

    @defer.inlineCallbacks
    def test_kept_at_stop(self):
        """remove_unix_socket_on_close = False leaves the socket file at stop."""
        made = self.start("controller.remove_unix_socket_on_close = False")
        yield made.stopService()
        self.assertTrue(stat.S_ISSOCK(os.lstat(f"{self.dir}/controller.sock").st_mode))

    def test_stale_socket_removed(self):
        """A stale socket file nobody listens on is removed before listening."""
        import socket

        stale = socket.socket(socket.AF_UNIX)
        stale.bind(f"{self.dir}/controller.sock")
        stale.close()
        self.start()
        self.assertTrue(stat.S_ISSOCK(os.lstat(f"{self.dir}/controller.sock").st_mode))

    def test_cannot_listen(self):
        """A controller socket in a missing directory stops the start with the setting named."""
        self.write()
        settings = self.load()
        config.set_value(settings.controller, "connection_spec", f"unix:{self.dir}/no/c.sock")
        made = service.ManagerService(reactor, settings)
        error = self.assertRaises(service.StartError, made.privilegedStartService)
        self.assertEqual(str(error), f"controller.connection_spec unix:{self.dir}/no/c.sock: "
                                     f"directory {self.dir}/no does not exist")
        self.assertIsNone(made.port)
