"""`twistd milter-manager`: command-line options and the listening service."""

import errno
import os
import socket
import stat
import sys

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    """Options of `twistd milter-manager`, named as upstream's milter-manager.

    After parsing, `configuration` holds the loaded Configuration with the
    command-line overrides applied.
    """

    optParameters = [
        ["config", "c", None,
         "Configuration file (a directory means its milter-manager.conf). Default: "
         "/etc/milter-manager/milter-manager.conf if it exists, else built-in defaults"],
        ["config-dir", None, None,
         "Directory holding milter-manager.conf, as upstream's option "
         "($MILTER_MANAGER_CONFIG_DIR does the same)"],
        ["connection-spec", "s", None,
         "Overrides manager.connection_spec, where the MTA connects: unix:/path, "
         "inet:PORT@HOST, inet:PORT@[ADDR], inet6:... (default inet:10025@[127.0.0.1])"],
        ["fallback-status", None, None,
         "Overrides manager.fallback_status, the answer when no child milter can: "
         "accept, temporary-failure, reject, discard (default accept)"],
    ]
    optFlags = [
        ["show-config", None,
         "Print the resolved configuration, each value with where it was set, and exit"],
    ]
    # Where the configuration is looked for without --config; tests point it elsewhere.
    default_config_directory = "/etc/milter-manager"

    configuration = None

    def postOptions(self):
        from miltermanager import config

        try:
            path = config.locate(self["config"], self["config-dir"],
                                 default_directory=self.default_config_directory)
            configuration = config.load(path) if path is not None else config.default()
            for option in ("connection-spec", "fallback-status"):
                if self[option] is not None:
                    config.set_value(configuration.manager, option.replace("-", "_"),
                                     self[option], origin=f"--{option}")
        except config.ConfigurationError as error:
            raise usage.UsageError(str(error)) from None
        self.configuration = configuration
        if self["show-config"]:
            sys.stdout.write(config.dump(configuration))
            sys.stdout.flush()
            raise SystemExit(0)


def makeService(options):
    """Listen for the MTA; each MTA connection becomes a ManagerSession."""
    from twisted.internet import reactor

    from miltermanager.session import manager_factory

    configuration = options.configuration
    factory = manager_factory(configuration, reactor)
    factory.noisy = False  # no "Starting factory" line per connection
    service = listen_service(reactor, configuration.manager, factory)
    service.setName("milter-manager")
    service.configuration = configuration
    return service


def listen_service(reactor, settings, factory, backlog=50):
    """A service listening on settings.connection_spec with upstream's UNIX socket handling.

    settings carries connection_spec, unix_socket_mode, unix_socket_group and
    remove_unix_socket_on_create: `manager.*` now, `controller.*` (same names
    upstream) later. This is the one place those settings meet an endpoint.
    Preparing the socket file happens when the service starts listening
    (privilegedStartService, after twistd daemonized and before privileges
    are dropped), never when the service is built: building also happens for
    checks and tests, and must not delete a running manager's socket.
    """
    from twisted.application.internet import StreamServerEndpointService

    from miltermanager import connection_spec

    spec = connection_spec.parse(settings.connection_spec)
    endpoint = spec.server_endpoint(reactor, backlog, settings.unix_socket_mode)
    if spec.is_unix:
        endpoint = UNIXSocketEndpoint(
            endpoint, spec.path, settings.remove_unix_socket_on_create,
            settings.unix_socket_group)
    service = StreamServerEndpointService(endpoint, factory)
    # As twisted.application.strports.service does: a socket that cannot be
    # bound stops twistd with the error instead of a process that serves nothing.
    service._raiseSynchronously = True
    return service


@implementer(IStreamServerEndpoint)
class UNIXSocketEndpoint:
    """Wraps a UNIX server endpoint: removes a stale socket file first, sets the group after.

    Twisted's own mode handling (chmod after bind) applies the mode.
    """

    def __init__(self, endpoint, path, remove_stale=True, group=None):
        self.endpoint = endpoint
        self.path = path
        self.remove_stale = remove_stale
        self.group = group

    def listen(self, factory):
        gid = None
        if self.group is not None:
            import grp

            try:
                gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                return defer.fail(self._group_error("no such group"))
        if self.remove_stale:
            try:
                remove_stale_socket(self.path)
            except CannotListenError:
                return defer.fail()
        listening = self.endpoint.listen(factory)
        if gid is not None:
            listening.addCallback(self._give_to_group, gid)
        return listening

    def _give_to_group(self, port, gid):
        try:
            os.chown(self.path, -1, gid)
        except OSError as error:
            problem = self._group_error(error.strerror)

            def stopped(_):
                raise problem

            # Fail once the port is closed, so nothing unlinks the socket later.
            return defer.maybeDeferred(port.stopListening).addBoth(stopped)
        return port

    def _group_error(self, reason):
        return CannotListenError(
            None, self.path, f"cannot give the socket to group {self.group}: {reason}")


def remove_stale_socket(path):
    """Remove path if it is a UNIX socket nobody listens on.

    Anything else is left alone: a regular file makes the bind fail with its
    own error, and a socket that accepts connections belongs to a running
    process (upstream removes it anyway, leaving that process unreachable);
    that raises CannotListenError.
    """
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except OSError as error:
        # EAGAIN: the listener's backlog is full, so it is alive.
        alive = error.errno in (errno.EAGAIN, errno.EINPROGRESS)
    else:
        alive = True
    finally:
        probe.close()
    if alive:
        raise CannotListenError(None, path, "another process is listening on this socket")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
