#!/usr/bin/env python3
"""Count the Python work per message of the manager's own code, in memory, repeatably.

    python3 bench/in_memory.py [--children K] [--messages N]

An MTA (the project's milter client), the manager's factory and K trivial
children (the server library answering CONTINUE) are joined by
twisted.test.iosim in one process: no sockets, no scheduler, no other
process. Each message is one MTA session (connect ... end of message). The
bytecode instructions executed per message are counted (sys.settrace with
opcode events), per module, as the difference between N+10 and 10 messages:
the same code gives the same figures on every run, so two checkouts can be
compared exactly:

    PYTHONPATH=/path/to/other/checkout python3 bench/in_memory.py

It complements bench/run, whose CPU figures move by 10 % from run to run.
It counts opcodes, not time: C work (allocation, system calls) is not in it.
"""

import argparse
import collections
import gc
import os
import sys

from twisted.internet import defer
from twisted.test import iosim

MANAGER_MODULES = ("session.py", "envelope.py", "message.py", "children.py", "merge.py",
                   "health.py", "stoppers.py", "factory.py", "service.py")


def run(messages, children, observe=()):
    """Run messages MTA sessions through the manager with children trivial children.

    observe: "statistics" (the statistics lines, written to /dev/null as the
    log file) and "metrics" (the Prometheus observer) attach those observers.
    """
    from twisted.internet import reactor

    from miltermanager import client, config
    from miltermanager.config import MilterConfig
    try:
        from miltermanager.factory import ManagerFactory
    except ImportError:  # a checkout from before the factory had a module of its own
        from miltermanager.service import ManagerFactory
    from miltermanager.protocol import constants as c
    from miltermanager.protocol import messages as m
    from miltermanager.server import Milter, MilterServerFactory

    pumps = []

    def join(server, peer):
        pumps.append(iosim.connect(server, iosim.FakeTransport(server, isServer=True),
                                   peer, iosim.FakeTransport(peer, isServer=False),
                                   greet=False))

    child_factory = MilterServerFactory(Milter, clock=reactor)

    def connect(reactor_, spec, timeouts=None, clock=None):
        protocol = client.MilterClientProtocol(reactor, timeouts)
        join(child_factory.buildProtocol(None), protocol)
        return defer.succeed(protocol)

    real_connect, client.connect = client.connect, connect
    try:
        configuration = config.default()
        for number in range(children):
            configuration.milters.append(MilterConfig(
                name=f"child{number}", connection_spec="inet:1@[127.0.0.1]"))
        factory = ManagerFactory(configuration, reactor, reactor)
        if "statistics" in observe:
            from miltermanager.logs import LogFile, LogRouter
            from miltermanager.statistics import StatisticsObserver

            router = LogRouter(base=LogFile(os.devnull))
            factory.add_observer(StatisticsObserver(write=router.statistics))
        if "metrics" in observe:
            from miltermanager.metrics import Metrics

            factory.add_observer(Metrics(factory))

        def pump():
            while any([each.pump() for each in pumps]):
                pass

        commands = [
            m.Connect(b"client.example.net", c.FAMILY_INET, 1234, b"192.0.2.1"),
            m.Helo(b"client.example.net"), m.Mail(b"<a@example.net>"),
            m.Rcpt(b"<b@example.org>"), m.DATA, m.Header(b"From", b"a@example.net"),
            m.Header(b"Subject", b"hi"), m.END_OF_HEADERS, m.Body(b"hello\r\n" * 50),
            m.END_OF_MESSAGE]
        for _ in range(messages):
            mta = client.MilterClientProtocol(reactor)
            join(factory.buildProtocol(None), mta)
            pump()
            mta.negotiate(m.Negotiate(6, c.SMFI_CURR_ACTS, c.SMFI_CURR_PROT, {}))
            pump()
            for command in commands:
                d = mta.send(command)
                pump()
                reply = d.result.reply if d.result is not None else None
                if reply is not None and reply != m.CONTINUE:
                    raise SystemExit(f"{command!r} was answered {reply!r}: not the trivial path")
            mta.close()
            pump()
            pumps.clear()
    finally:
        client.connect = real_connect


def count(messages, children, observe):
    """Opcodes executed by file name for a run of messages."""
    counts = collections.Counter()

    def tracer(frame, event, arg):
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        if event == "opcode":
            counts[os.path.basename(frame.f_code.co_filename)] += 1
        return tracer

    sys.settrace(tracer)
    try:
        run(messages, children, observe)
    finally:
        sys.settrace(None)
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=1)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--observe", action="append", default=[],
                        choices=("statistics", "metrics"),
                        help="attach this observer (repeat for both)")
    parser.add_argument("--by-file", action="store_true", help="every file's opcodes")
    options = parser.parse_args()
    gc.disable()  # a collection would land in one window and not the other
    observe = tuple(options.observe)
    run(5, options.children, observe)  # imports and first-call work out of the way
    before = count(10, options.children, observe)
    after = count(10 + options.messages, options.children, observe)
    per = {name: (after[name] - before[name]) / options.messages
           for name in set(after) | set(before)}
    import miltermanager
    print(f"{miltermanager.__file__.rsplit('/miltermanager/', 1)[0]}: "
          f"{options.children} child(ren), opcodes per message")
    manager = sum(per.get(name, 0) for name in MANAGER_MODULES)
    print(f"  manager session logic ({', '.join(MANAGER_MODULES)}): {manager:.0f}")
    for name in ("server.py", "client.py", "defer.py", "base.py"):
        print(f"  {name}: {per.get(name, 0):.0f}")
    print(f"  everything in the process: {sum(per.values()):.0f}")
    if options.by_file:
        for name, value in sorted(per.items(), key=lambda item: -item[1]):
            if value >= 1:
                print(f"    {name}: {value:.0f}")


if __name__ == "__main__":
    main()
