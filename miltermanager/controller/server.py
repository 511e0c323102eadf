"""The controller socket: one ControllerProtocol per admin connection, answering upstream's commands.

Commands are answered one at a time, in the order they came (a reload may
take a moment). A packet that cannot be understood gets `error\\0TEXT`
and one log line; a bad length also closes the connection, since the
stream cannot be read on from there. Nothing a client sends can stop the
manager.
"""

import json
import os
import stat
import tempfile

from twisted.internet import defer, protocol
from twisted.logger import Logger

from . import protocol as wire
from .trace import TraceObserver
from .. import connection_spec
from ..status import StatusObserver

# The most set-configuration may write: a configuration file, not a data store.
MAX_CONFIGURATION = 1024 * 1024


class Refused(Exception):
    """A command understood but refused; str() is the reason sent back."""


class ConfigurationCommands:
    """get-configuration and set-configuration, on service's configuration.

    The same for a single manager (Controller) and for the supervisor of
    workers (controller.supervisor.SupervisorController).
    """

    log = Logger()

    def __init__(self, service):
        self.service = service

    @property
    def settings(self):
        return self.service.configuration.controller

    def get_configuration(self):
        from ..config import dump

        return dump(self.service.configuration)

    def set_configuration(self, content):
        """Write content as milter-manager.custom.conf, as upstream does; nothing is reloaded.

        The file is Python that the manager runs at its next (re)load, as
        root before dropping privileges at start: so only a UNIX controller
        socket that others cannot write to may set it, and only text that
        compiles is written (mode 0600, replacing the file at once).
        """
        from ..config.loader import check_trusted, custom_file

        spec = connection_spec.parse(self.settings.connection_spec)
        if not spec.is_unix:
            raise Refused("set-configuration is refused on a TCP controller socket: anyone "
                          "who can connect could make the manager run code; use a unix: "
                          "controller.connection_spec")
        if self.settings.unix_socket_mode & 0o002:
            raise Refused(f"set-configuration is refused: controller.unix_socket_mode "
                          f"{self.settings.unix_socket_mode:04o} lets any local user "
                          f"connect, and the file is code the manager runs")
        if len(content) > MAX_CONFIGURATION:
            raise Refused(f"the configuration is {len(content)} bytes; at most "
                          f"{MAX_CONFIGURATION} are accepted")
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as error:
            raise Refused(f"the configuration is not UTF-8 text (byte {error.start})") from None
        if text.lstrip().startswith("<"):
            raise Refused("the configuration is XML (upstream's format); milter-manager's "
                          "files are written in its Python language (see --show-config)")
        path = custom_file(self.service.configuration)
        if path is None:
            raise Refused("no directory for milter-manager.custom.conf: set "
                          "manager.custom_configuration_directory")
        try:
            compile(text, path, "exec")
        except SyntaxError as error:
            raise Refused(f"syntax error at line {error.lineno}: {error.msg}") from None
        directory = os.path.dirname(path)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd, temporary = tempfile.mkstemp(prefix=".custom-", dir=directory)
        except OSError as error:
            raise Refused(f"failed to save custom configuration file: {directory}: "
                          f"{error.strerror}") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
            os.chmod(temporary, stat.S_IRUSR | stat.S_IWUSR)
            check_trusted(temporary)
            os.replace(temporary, path)
        except Exception as error:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            reason = error.strerror if isinstance(error, OSError) else str(error)
            raise Refused(f"failed to save custom configuration file: {reason}") from None
        self.log.info("[controller][set-configuration] wrote {path} ({size} bytes); it takes "
                      "effect at the next reload", path=path, size=len(content))
        return None


class Controller(ConfigurationCommands):
    """What the commands act on: the running ManagerService, its status and trace.

    Built when controller.connection_spec is set; observe() attaches the
    status and trace observers to the service's factory.
    """

    def __init__(self, service, clock):
        super().__init__(service)
        self.clock = clock
        self.status = StatusObserver(clock)
        limit = service.configuration.controller.trace_sessions
        self.trace = TraceObserver(clock, limit) if limit else None
        self.generation = 1
        self.loaded_at = None

    def observe(self):
        factory = self.service.factory
        factory.add_observer(self.status)
        if self.trace is not None:
            factory.add_observer(self.trace)

    # ------------------------------------------------------------ commands

    def status_data(self, samples=False):
        """The status as plain data; samples: with each child's raw latency samples."""
        factory = self.service.factory
        data = self.status.snapshot(self.service.configuration, factory.health,
                                    factory.connections, self.generation, self.loaded_at,
                                    samples=samples)
        data["trace_sessions"] = self.trace.limit if self.trace is not None else 0
        return data

    def get_status(self):
        return json.dumps(self.status_data(), indent=1, sort_keys=False)

    def get_trace(self, query):
        if self.trace is None:
            raise Refused("no trace is kept: controller.trace_sessions is 0")
        try:
            text = query.decode("utf-8")
        except UnicodeDecodeError:
            raise Refused("a queue id or session number is ASCII text") from None
        found = self.trace.find(text)
        if found is None:
            raise Refused(f"no session or queue id {text!r} among the "
                          f"{len(self.trace.in_flight)} sessions in flight and the last "
                          f"{len(self.trace.finished)} finished (controller.trace_sessions = "
                          f"{self.trace.limit})")
        return json.dumps(found, indent=1)

    def reload(self):
        """Fires with None when the new configuration is in use, or the reason it is not."""
        def done(problem):
            if problem is None:
                self.generation += 1
                self.loaded_at = self.clock.seconds()
            return problem

        return reload_outcome(self.service).addCallback(done)


def reload_outcome(service):
    """Reload service: fires with None once the new configuration is in use, else the reason."""
    def done(adopted):
        if adopted:
            return None
        errors = getattr(service, "reload_errors", None) or []
        return "reload failed; the running configuration is kept: " + "; ".join(errors)

    return service.reload().addCallback(done)


class ControllerProtocol(protocol.Protocol):
    """One admin connection: packets in, one reply per command, in order."""

    log = Logger()

    def connectionMade(self):
        self.decoder = wire.Decoder()
        self.queue = defer.succeed(None)

    def dataReceived(self, data):
        try:
            payloads = self.decoder.feed(data)
        except wire.PacketError as error:
            self._bad(error)
            return
        for payload in payloads:
            self.queue.addCallback(lambda _, payload=payload: self._command(payload))

    def _bad(self, error):
        self.log.warn("[controller][error][decode] {error}", error=str(error))
        self.transport.write(wire.encode("error", str(error)))
        if error.fatal:
            self.transport.loseConnection()

    def _command(self, payload):
        try:
            name, content = wire.split(payload)
            wire.check_command(name, content, self.factory.commands)
        except wire.PacketError as error:
            self._bad(error)
            return None
        self.log.debug("[controller][command] {name}", name=name)
        reply, method, with_content = HANDLERS[name]
        call = getattr(self.factory.controller, method)
        d = defer.maybeDeferred(call, content) if with_content else defer.maybeDeferred(call)
        d.addCallback(_OUTCOMES.get(reply, lambda text, reply=reply: (reply, text)))
        d.addCallbacks(self._reply, self._failed, errbackArgs=(name,))
        return d

    def _reply(self, reply):
        name, text = reply
        if self.transport is not None:
            self.transport.write(wire.encode(name, text))

    def _failed(self, failure, name):
        if failure.check(Refused):
            text = failure.getErrorMessage()
            self.log.warn("[controller][error][{command}] {text}", command=name, text=text)
        else:
            self.log.failure("[controller][error][{command}] unexpected failure", failure,
                             command=name)
            text = f"{name} failed: {failure.getErrorMessage()}"
        self._reply(("error", text))


# command -> (reply, the controller's method, whether it takes the command's content).
HANDLERS = {
    "get-status": ("status", "get_status", False),
    "get-configuration": ("configuration", "get_configuration", False),
    "get-trace": ("trace", "get_trace", True),
    "set-configuration": ("success", "set_configuration", True),
    "reload": ("outcome", "reload", False),
    "get-worker-status": ("status", "get_worker_status", False),
    "get-metrics": ("metrics", "get_metrics", False),
}
# How a method's result becomes the reply, for the replies that carry no text of the method.
_OUTCOMES = {
    "success": lambda _: ("success", ""),
    "outcome": lambda problem: ("success", "") if problem is None else ("failure", problem),
}


class ControllerFactory(protocol.Factory):
    """Connections to one controller, answering commands (the admin's: wire.COMMANDS)."""

    protocol = ControllerProtocol
    noisy = False

    def __init__(self, controller, commands=wire.COMMANDS):
        self.controller = controller
        self.commands = commands
