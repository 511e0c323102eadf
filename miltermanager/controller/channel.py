"""The private channel between the supervisor and one worker (manager.n_workers).

The supervisor makes a socketpair per worker and passes one end to it as
descriptor CONTROL_FD (named by CONTROL_FD_ENV). The worker serves the
controller's wire protocol on it with the INTERNAL commands only, answered
by WorkerControl; the supervisor's end is a WorkerChannel, whose ask()
sends a command and fires with the answer. Answers come in the order the
commands went, so they are matched in order. A worker that is gone, or
that does not answer in time, fails the request with WorkerUnreachable:
the admin's command never waits on it for longer than the timeout. The
channel is made anew with each worker process.
"""

import collections
import json
import os
import socket

from twisted.internet import defer, protocol

from . import protocol as wire
from .server import ControllerFactory, Refused, reload_outcome

CONTROL_FD = 4  # the channel's descriptor in a worker
CONTROL_FD_ENV = "MILTER_MANAGER_CONTROL_FD"
# A worker's status carries up to LATENCY_SAMPLES raw samples per child (~10 bytes each).
CHANNEL_MAX_PACKET = 64 * 1024 * 1024
# Requests a worker may leave unanswered (timed out) before the next fails at once.
MAX_PENDING = 16


class WorkerUnreachable(Exception):
    """The worker did not answer: its channel is closed, or no answer came in time."""


class WorkerChannel(protocol.Protocol):
    """The supervisor's end of one worker's channel: ask() a command, get its answer."""

    def __init__(self, clock):
        self.clock = clock
        self.decoder = wire.Decoder(CHANNEL_MAX_PACKET)
        # One Deferred per command sent and not yet answered, oldest first; one that timed
        # out stays until its late answer arrives, so later answers still match.
        self.pending = collections.deque()
        self.closed = False

    def ask(self, name, content=b"", timeout=2.0):
        """Send command name; fires with (reply name, reply text), or fails (WorkerUnreachable)."""
        if self.transport is None or self.closed:
            return defer.fail(WorkerUnreachable("its channel is closed"))
        if len(self.pending) >= MAX_PENDING:
            return defer.fail(WorkerUnreachable(
                f"{len(self.pending)} earlier requests are still unanswered"))
        answer = defer.Deferred()
        self.pending.append(answer)
        self.transport.write(wire.encode(name, content))

        def timed_out(failure):
            failure.trap(defer.TimeoutError)
            raise WorkerUnreachable(f"no answer to {name} within {timeout:g} s")

        return answer.addTimeout(timeout, self.clock).addErrback(timed_out)

    def dataReceived(self, data):
        try:
            payloads = self.decoder.feed(data)
        except wire.PacketError as error:
            self._fail_all(f"it sent a bad packet ({error})")
            self.transport.loseConnection()
            return
        for payload in payloads:
            if not self.pending:
                continue  # an answer to nothing: the worker is confused, not us
            answer = self.pending.popleft()
            if answer.called:
                continue  # it timed out already
            try:
                name, content = wire.split(payload)
                text = content.decode("utf-8")
            except (wire.PacketError, UnicodeDecodeError) as error:
                answer.errback(WorkerUnreachable(f"its answer cannot be read ({error})"))
            else:
                answer.callback((name, text))

    def connectionLost(self, reason=None):
        self.closed = True
        self._fail_all("its channel closed")

    def _fail_all(self, text):
        pending, self.pending = self.pending, collections.deque()
        for answer in pending:
            if not answer.called:
                answer.errback(WorkerUnreachable(text))


class ChannelFactory(protocol.Factory):
    """Builds the given WorkerChannel for the adopted socket."""

    noisy = False

    def __init__(self, channel):
        self.channel = channel

    def buildProtocol(self, addr):
        return self.channel


def open_channel(reactor, channel):
    """A socketpair for one worker: (the worker's end, to pass as CONTROL_FD; close it once
    the worker is spawned). The supervisor's end is adopted at once as channel's transport."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, ChannelFactory(channel))
    except BaseException:
        theirs.close()
        raise
    finally:
        ours.close()  # the reactor holds its own duplicate
    return theirs


# ---------------------------------------------------------------- the worker's end


class WorkerControl:
    """What a worker answers on its channel: its status, a trace, its metrics; reload.

    service is the WorkerService; its controller exists when
    controller.connection_spec is set, metrics when web.connection_spec is.
    """

    def __init__(self, service, metrics=None):
        self.service = service
        self.metrics = metrics

    def _controller(self):
        controller = self.service.controller
        if controller is None:
            raise Refused("this worker keeps no status: controller.connection_spec is not set")
        return controller

    def get_worker_status(self):
        return json.dumps(self._controller().status_data(samples=True))

    def get_trace(self, query):
        return self._controller().get_trace(query)

    def reload(self):
        controller = self.service.controller
        return controller.reload() if controller is not None else reload_outcome(self.service)

    def get_metrics(self):
        if self.metrics is None:
            raise Refused("this worker keeps no metrics: web.connection_spec is not set")
        return json.dumps(self.metrics.as_data())


def serve_channel(reactor, fd, control):
    """Answer the supervisor on the inherited channel socket fd with control; fd is closed."""
    try:
        reactor.adoptStreamConnection(fd, socket.AF_UNIX,
                                      ControllerFactory(control, wire.INTERNAL))
    finally:
        os.close(fd)
