"""Running a milter console script: listen on its connection spec until SIGTERM or SIGINT."""

from twisted.internet.error import CannotListenError

from miltermanager import connection_spec
from miltermanager.listening import remove_stale_socket


def serve(reactor, spec_text, factory, program, stderr, listening=None, start=None, stop=None):
    """Listen with factory on spec_text and run the reactor; return the exit status.

    A socket file left by a crashed run is removed first (a live one is
    refused); stopping the port at shutdown closes it and removes a UNIX
    socket file. listening(port), start() and stop() are the program's own
    hooks: stop runs once no connection is accepted any more.
    """
    spec = connection_spec.parse(spec_text)
    state = {"status": 0}

    def failed(reason):
        stderr.write(f"{program}: cannot listen on {spec_text}: {reason}\n")
        state["status"] = 1
        reactor.stop()

    def listened(port):
        reactor.addSystemEventTrigger("before", "shutdown", port.stopListening)
        if listening is not None:
            listening(port)

    def begin():
        if start is not None:
            start()
        if stop is not None:
            # "during" runs after the "before" triggers: no connection is accepted any more.
            reactor.addSystemEventTrigger("during", "shutdown", stop)
        if spec.is_unix:
            try:
                remove_stale_socket(spec.path)
            except CannotListenError as error:
                failed(error.socketError)
                return
        d = spec.server_endpoint(reactor).listen(factory)
        d.addCallbacks(listened, lambda failure: failed(failure.getErrorMessage()))

    reactor.callWhenRunning(begin)
    reactor.run()
    return state["status"]
