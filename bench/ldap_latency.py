#!/usr/bin/env python3
"""Measure the LDAP Policy condition's lookup latency against a private slapd.

    python3 bench/ldap_latency.py [--lookups N] [--concurrency K] [--keep]

It starts a slapd (tests/peers/slapd.py) holding a policy directory of a few
hundred domains and users plus a global default (@.), starts the lookups as
the manager does (configuration.ldap.start(configuration, reactor): ldap3 in
its own thread pool behind the PolicyLookup cache) under the real reactor, and
times each lookup from lookup() to its result:

  cold, sequential   N addresses never looked up, one at a time (one search each)
  cold, K in flight  N other new addresses, K lookups outstanding at any time
  warm               the sequential addresses again: cache hits, answered at once

It prints p50/p90/p99/max in ms, lookups per second, this process's CPU time
per lookup over each phase (the manager's side: ldap3, the thread pool, the
reactor), slapd's CPU per lookup and the searches slapd logged. Informational:
exits 0 whatever the figures (1 if it could not set up, 130 on Ctrl-C).
Everything is on 127.0.0.1, in a temporary directory removed at the end
(--keep: kept, with slapd's log), and slapd is stopped by PID, also on Ctrl-C.
See bench/README.md.
"""

import argparse
import itertools
import math
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from twisted.internet import defer  # noqa: E402
from twisted.logger import (  # noqa: E402
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python.failure import Failure  # noqa: E402

from miltermanager.config.model import Configuration, MilterConfig  # noqa: E402
from miltermanager.policy.lookup import Unavailable  # noqa: E402
from tests.peers.slapd import SLAPD, Slapd  # noqa: E402

BASE = "ou=milter-policy,dc=example,dc=com"
CHILD = "child"
DOMAINS = 300
USERS_PER_DOMAIN = 3  # per prefix: u0..u2 (the sequential set), c0..c2 (the concurrent set)
PREFIXES = ("u", "c")
ENTRIES = 2 + DOMAINS * (1 + len(PREFIXES) * USERS_PER_DOMAIN)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def log(text):
    print(f"[ldap-latency] {text}", file=sys.stderr, flush=True)


def domain(number):
    return f"d{number:03d}.example"


def policy_ldif():
    """The policy subtree: @., DOMAINS domain entries, USERS_PER_DOMAIN users in each."""
    records = [f"dn: {BASE}\nobjectClass: organizationalUnit\nou: milter-policy\n",
               (f"dn: cn=global,{BASE}\nobjectClass: organizationalRole\n"
                f"objectClass: milterManagerPolicy\ncn: global\nmail: @.\n"
                f"milterManagerApply: {CHILD}\n")]
    for number in range(DOMAINS):
        name = domain(number)
        verb = "Bypass" if number % 2 else "Apply"
        records.append(f"dn: cn={name},{BASE}\nobjectClass: organizationalRole\n"
                       f"objectClass: milterManagerPolicy\ncn: {name}\nmail: @{name}\n"
                       f"milterManager{verb}: {CHILD}\n")
        for prefix, user in itertools.product(PREFIXES, range(USERS_PER_DOMAIN)):
            mail = f"{prefix}{user}@{name}"
            records.append(f"dn: cn={mail},{BASE}\nobjectClass: organizationalRole\n"
                           f"objectClass: milterManagerPolicy\ncn: {mail}\nmail: {mail}\n"
                           f"milterManagerEvaluate: {CHILD}\n")
    return "\n".join(records)


def addresses(prefix, count):
    """count distinct recipients PREFIX K@dNNN.example, K from 0: K < 3 have an entry of their own.

    Returns [(RCPT argument, the DN of the most specific entry expected)].
    """
    result = []
    for index in range(count):
        user, number = divmod(index, DOMAINS)
        name = domain(number)
        mail = f"{prefix}{user}@{name}"
        expected = mail if prefix in PREFIXES and user < USERS_PER_DOMAIN else name
        result.append((f"<{mail}>", f"cn={expected},{BASE}"))
    return result


# ------------------------------------------------------------------ figures


def percentile(ordered, fraction):
    """Nearest-rank percentile of an ordered list."""
    if not ordered:
        return None
    return ordered[max(1, math.ceil(len(ordered) * fraction)) - 1]


def process_cpu():
    """This process's user + system CPU seconds, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pid_cpu(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def count_searches(path, offset):
    with open(path, "rb") as log_file:
        log_file.seek(offset)
        return sum(1 for line in log_file if b" SRCH base=" in line)


class Phase:
    """One measured phase: per-lookup latencies, outcomes, CPU and searches over its window."""

    def __init__(self, name, slapd):
        self.name = name
        self.slapd = slapd
        self.latencies = []  # seconds
        self.failed = 0
        self.wrong = 0
        self.deferred = 0  # lookups not answered at once

    def __enter__(self):
        self.log_offset = os.path.getsize(self.slapd.log_path)
        self.slapd_cpu = pid_cpu(self.slapd.process.pid)
        self.cpu = process_cpu()
        self.started = time.perf_counter()
        return self

    def __exit__(self, kind, value, trace):
        if kind is not None:  # interrupted (the reactor stopped, or the generator was closed)
            return False
        self.elapsed = time.perf_counter() - self.started
        self.cpu = process_cpu() - self.cpu
        self.slapd_cpu = pid_cpu(self.slapd.process.pid) - self.slapd_cpu
        time.sleep(0.05)  # slapd writes its log line as it answers; let the last ones land
        self.searches = count_searches(self.slapd.log_path, self.log_offset)
        return False

    def record(self, elapsed, result, expected_dn):
        self.latencies.append(elapsed)
        if isinstance(result, Unavailable) or result is None:
            self.failed += 1
        elif not result.entries or result.entries[0].lower() != expected_dn.lower():
            self.wrong += 1


def timed(lookups, address):
    """lookup(address) -> a Deferred firing (seconds from the call to the result, result, deferred?)."""
    started = time.perf_counter()
    result = lookups.lookup(address)
    if isinstance(result, defer.Deferred):
        return result.addCallback(lambda found: (time.perf_counter() - started, found, True))
    return defer.succeed((time.perf_counter() - started, result, False))


@defer.inlineCallbacks
def run_phase(phase, lookups, targets, concurrency):
    pending = iter(targets)

    @defer.inlineCallbacks
    def worker():
        for address, expected in pending:
            elapsed, result, deferred = yield timed(lookups, address)
            phase.record(elapsed, result, expected)
            phase.deferred += deferred

    with phase:
        yield defer.gatherResults([worker() for _ in range(concurrency)], consumeErrors=True)
    return phase


@defer.inlineCallbacks
def warm_phase(phase, lookups, targets):
    """The cache hits: lookup() answers at once; time each call alone."""
    clock = time.perf_counter
    with phase:
        for address, expected in targets:
            started = clock()
            result = lookups.lookup(address)
            elapsed = clock() - started
            if isinstance(result, defer.Deferred):  # not cached after all: wait, and say so
                phase.deferred += 1
                result = yield result
                elapsed = clock() - started
            phase.record(elapsed, result, expected)


# ------------------------------------------------------------------ run


def configuration_for(slapd):
    configuration = Configuration(milters=[
        MilterConfig(CHILD, "inet:20025@[127.0.0.1]", applicable_conditions=["LDAP Policy"])])
    configuration.ldap.uris = [slapd.uri]
    configuration.ldap.base = BASE
    errors, _ = configuration.ldap.problems(configuration)
    if errors:
        raise RuntimeError("; ".join(str(error) for error in errors))
    return configuration


@defer.inlineCallbacks
def measure(args, slapd, reactor, outcome):
    configuration = configuration_for(slapd)
    settings = configuration.ldap
    settings.start(configuration, reactor)  # exactly what the service does at start
    lookups = settings.lookups
    try:
        # Not measured: every pool thread opens its connection to slapd on its first search.
        warmup = addresses("w", max(settings.threads, args.concurrency) * 4)
        yield run_phase(Phase("warm-up", slapd), lookups, warmup, args.concurrency)
        sequential = addresses("u", args.lookups)
        in_flight = addresses("c", args.lookups)
        log(f"cold, sequential: {args.lookups} lookups")
        cold = yield run_phase(Phase("cold, sequential", slapd), lookups, sequential, 1)
        log(f"cold, {args.concurrency} in flight: {args.lookups} lookups")
        parallel = yield run_phase(Phase(f"cold, {args.concurrency} in flight", slapd), lookups,
                                   in_flight, args.concurrency)
        log(f"warm: {args.lookups} lookups")
        warm = Phase("warm (cache hits)", slapd)
        yield warm_phase(warm, lookups, sequential)
        outcome["phases"] = [cold, parallel, warm]
        outcome["settings"] = settings
        outcome["users"] = sum(1 for _, dn in sequential if "@" in dn.split(",")[0])
    finally:
        settings.stop()


def report(args, slapd, outcome):
    settings = outcome["settings"]
    users = outcome["users"]
    out = ["",
           f"LDAP Policy lookup latency — {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M:%S')}",
           (f"slapd {slapd.uri}: {ENTRIES} entries under {BASE} ({DOMAINS} domains, "
            f"{DOMAINS * USERS_PER_DOMAIN * len(PREFIXES)} users, @.); ldap.threads {settings.threads}, "
            f"ldap.timeout {settings.timeout:g} s, ldap.cache_ttl {settings.cache_ttl:g} s"),
           (f"each cold set: {args.lookups} new addresses, {users} with an entry of their own, "
            f"{args.lookups - users} found through their domain's (and @.)"),
           "",
           (f"{'':22}{'lookups':>8} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}  {'lookups':>8}"
            f"  {'CPU':>7} {'slapd CPU':>9}  {'searches':>8} {'failed':>6} {'wrong':>5}"),
           (f"{'':22}{'':>8} {'ms':>8} {'ms':>8} {'ms':>8} {'ms':>8}  {'/s':>8}"
            f"  {'ms/lkp':>7} {'ms/lkp':>9}  {'':>8} {'':>6} {'':>5}")]
    for phase in outcome["phases"]:
        ordered = sorted(phase.latencies)
        n = len(ordered)
        cells = " ".join(f"{1000 * percentile(ordered, p):>8.3f}" for p in (0.5, 0.9, 0.99, 1.0))
        out.append(f"{phase.name:22}{n:>8} {cells}  {n / phase.elapsed:>8.0f}"
                   f"  {1000 * phase.cpu / n:>7.3f} {1000 * phase.slapd_cpu / n:>9.3f}"
                   f"  {phase.searches:>8} {phase.failed:>6} {phase.wrong:>5}")
    cold, parallel, warm = outcome["phases"]
    out.append("")
    notes = []
    for phase in (cold, parallel):
        if phase.searches != len(phase.latencies):
            notes.append(f"  ({phase.name}) slapd logged {phase.searches} searches for "
                         f"{len(phase.latencies)} lookups (one each expected)")
    if warm.deferred or warm.searches:
        notes.append(f"  (warm) {warm.deferred} lookups were not answered from the cache, "
                     f"{warm.searches} searches")
    if any(phase.failed or phase.wrong for phase in outcome["phases"]):
        notes.append("  INVALID: some lookups failed (Unavailable) or found another entry than "
                     "the most specific one expected")
    if parallel.latencies and args.concurrency > settings.threads:
        notes.append(f"  ({parallel.name}) {args.concurrency} lookups outstanding on "
                     f"{settings.threads} threads: the latency includes the wait for a thread")
    notes.append("  CPU ms/lkp: this process's CPU (all threads: ldap3 in the pool, the reactor)"
                 " over the phase, per lookup; slapd's is its /proc CPU over the same window")
    out += notes
    print("\n".join(out), flush=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="bench/ldap_latency.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--lookups", type=int, default=2000,
                        help="lookups per phase (%(default)s)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="lookups in flight in the concurrent cold phase (%(default)s)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (slapd's log) and say where")
    args = parser.parse_args(argv)
    if args.lookups < 1 or args.concurrency < 1:
        parser.error("--lookups and --concurrency must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not os.access(SLAPD, os.X_OK):
        log(f"no {SLAPD}: install slapd and ldap-utils")
        return 1

    def terminated(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    workdir = tempfile.mkdtemp(prefix="mm-ldap-latency-")
    os.chmod(workdir, 0o755)  # slapd runs as the openldap user
    slapd = Slapd(os.path.join(workdir, "slapd"), ldif=[policy_ldif()])
    outcome = {}
    status = 0
    try:
        log(f"starting slapd with {ENTRIES} entries")
        slapd.start(timeout=60)
        globalLogBeginner.beginLoggingTo(
            [FilteringLogObserver(textFileLogObserver(sys.stderr),
                                  [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)])],
            redirectStandardIO=False)
        from twisted.internet import reactor

        def finished(result):
            if isinstance(result, Failure):
                outcome["error"] = result
            if reactor.running:
                reactor.stop()

        reactor.callWhenRunning(lambda: measure(args, slapd, reactor, outcome).addBoth(finished))
        reactor.run()  # Ctrl-C or SIGTERM stop it
        if "error" in outcome:
            log("failed:\n" + outcome["error"].getTraceback())
            status = 1
        elif "phases" not in outcome:
            log("interrupted")
            status = 130
    except KeyboardInterrupt:
        log("interrupted")
        status = 130
    except Exception:  # noqa: BLE001 -- say what could not be set up, then clean up
        log("setup failed:\n" + traceback.format_exc())
        status = 1
    finally:
        slapd.stop()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if "phases" in outcome:
        report(args, slapd, outcome)
    return status


if __name__ == "__main__":
    sys.exit(main())
