"""`twistd milter-manager`: command-line options and the listening service."""

from twisted.python import usage

DEFAULT_CONNECTION_SPEC = "inet:10025@[127.0.0.1]"


class Options(usage.Options):
    """Options of `twistd milter-manager`, named as upstream's milter-manager."""

    optParameters = [
        ["connection-spec", "s", DEFAULT_CONNECTION_SPEC,
         "Where the MTA connects: unix:/path, inet:PORT@HOST, inet:PORT@[ADDR], inet6:..."],
        ["fallback-status", None, "accept",
         "Answer when no child milter can: accept, temporary-failure, reject, discard"],
    ]

    def postOptions(self):
        from miltermanager import connection_spec
        try:
            connection_spec.parse(self["connection-spec"])
        except ValueError as error:
            raise usage.UsageError(str(error))
        from miltermanager.merge import parse_status
        try:
            parse_status(self["fallback-status"])
        except ValueError as error:
            raise usage.UsageError(f"--fallback-status: {error}")


def makeService(options):
    """Listen for the MTA; with no child milters every command gets the fallback."""
    from twisted.application.internet import StreamServerEndpointService
    from twisted.internet import reactor

    from miltermanager import connection_spec
    from miltermanager.fallback import FallbackMilter
    from miltermanager.server import MilterServerFactory

    spec = connection_spec.parse(options["connection-spec"])
    factory = MilterServerFactory(
        lambda connection: FallbackMilter(options["fallback-status"]))
    service = StreamServerEndpointService(spec.server_endpoint(reactor), factory)
    service.setName("milter-manager")
    return service
