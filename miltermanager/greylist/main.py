"""milter-manager-greylist: the greylisting milter as a command-line program."""

import socket
import sqlite3
import sys

from twisted.logger import Logger
from twisted.python import usage

from . import store

PROGRAM = "milter-manager-greylist"
DEFAULT_CONNECTION_SPEC = "inet:10030@[127.0.0.1]"
DEFAULT_DATABASE = "/var/lib/milter-manager/greylist.sqlite3"
# Threads deciding on Redis at once: each mostly waits for the network.
REDIS_THREADS = 4
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text, option):
    """Seconds from "300", "5m", "4h", "36d" or "1w"; usage error otherwise."""
    value = text.strip().lower()
    unit = _UNITS.get(value[-1:])
    number = value[:-1] if unit else value
    if not (number.isascii() and number.isdigit()):
        raise usage.UsageError(
            f"{option}: expected seconds, optionally with s, m, h, d or w; got {text!r}")
    return int(number) * (unit or 1)


def _count(text, option, low, high=None):
    if not (text.isascii() and text.isdigit()) or int(text) < low or (
            high is not None and int(text) > high):
        within = f"{low}..{high}" if high is not None else f"{low} or more"
        raise usage.UsageError(f"{option}: expected a whole number {within}, got {text!r}")
    return int(text)


class Options(usage.Options):
    synopsis = f"{PROGRAM} [options]"
    longdesc = ("A greylisting milter: the first delivery attempt for each (client network, "
                "sender, recipient) gets a temporary failure; a retry after --delay passes. "
                "State is kept in an SQLite file that several processes may share, or with "
                "--store in Redis that several hosts may share.")

    optParameters = [
        ["connection-spec", "s", DEFAULT_CONNECTION_SPEC,
         "where to listen: unix:PATH, inet:PORT@HOST, inet:PORT@[ADDRESS], inet6:..."],
        ["database", None, DEFAULT_DATABASE, "the SQLite file (created if missing)"],
        ["store", None, None,
         "keep the state in Redis instead of SQLite: redis://[:PASSWORD@]HOST[:PORT][/DB], "
         "rediss://..., unix://PATH[?db=DB] or sentinel://HOST[:PORT][,HOST[:PORT]...]/MASTER"
         "[/DB], each optionally ending ?prefix=KEYPREFIX&timeout=SECONDS"],
        ["delay", None, str(store.DEFAULT_DELAY),
         "seconds a new triplet waits before a retry passes (also 5m, 1h, ...)"],
        ["retry-window", None, str(store.DEFAULT_RETRY_WINDOW),
         "seconds after the delay in which the retry must come, else it starts over"],
        ["expiry", None, str(store.DEFAULT_EXPIRY),
         "seconds a passed triplet (or auto-whitelisted network) stays good after its last use"],
        ["auto-whitelist", None, str(store.DEFAULT_AUTO_WHITELIST),
         "whitelist a client network once it passed this many triplets (0: never)"],
        ["ipv4-prefix", None, str(store.DEFAULT_IPV4_PREFIX),
         "IPv4 clients are greylisted per network of this prefix length"],
        ["ipv6-prefix", None, str(store.DEFAULT_IPV6_PREFIX),
         "IPv6 clients are greylisted per network of this prefix length"],
        ["metrics-listen", None, None,
         "serve Prometheus metrics on /metrics at this connection spec, e.g. "
         "inet:10031@[127.0.0.1] (default: no metrics)"],
    ]
    optFlags = [
        ["quiet", "q", "log warnings and errors only"],
        ["verbose", "v", "log every decision (debug level)"],
    ]

    def __init__(self):
        super().__init__()
        self["whitelist"] = []

    def opt_whitelist(self, value):
        """CIDR: never greylist clients in this network (repeatable; default 127.0.0.0/8 and ::1/128; any --whitelist replaces the default)."""  # noqa: E501
        try:
            store.parse_networks([value])
        except ValueError as error:
            raise usage.UsageError(f"--whitelist: {error}") from None
        self["whitelist"].append(value)

    def opt_version(self):
        """Print the version and exit."""
        from miltermanager import __version__
        print(f"{PROGRAM} {__version__}")
        sys.exit(0)

    def postOptions(self):
        if self["store"] is not None:
            if self["database"] != DEFAULT_DATABASE:
                raise usage.UsageError("--store and --database: the state is kept in one of "
                                       "them; give one")
            self["database"] = None
        for name in ("delay", "retry-window", "expiry"):
            self[name] = parse_duration(self[name], f"--{name}")
        self["auto-whitelist"] = _count(self["auto-whitelist"], "--auto-whitelist", 0)
        self["ipv4-prefix"] = _count(self["ipv4-prefix"], "--ipv4-prefix", 0, 32)
        self["ipv6-prefix"] = _count(self["ipv6-prefix"], "--ipv6-prefix", 0, 128)
        if not self["whitelist"]:
            self["whitelist"] = list(store.DEFAULT_WHITELIST)
        if self["quiet"] and self["verbose"]:
            raise usage.UsageError("--quiet and --verbose contradict each other")
        from miltermanager import connection_spec
        for name in ("connection-spec", "metrics-listen"):
            if self[name] is None:
                continue
            try:
                connection_spec.parse(self[name])
            except ValueError as error:
                raise usage.UsageError(f"--{name}: {error}") from None
        if self["metrics-listen"] is not None and (
                self["metrics-listen"] == self["connection-spec"]):
            raise usage.UsageError("--metrics-listen: the same as --connection-spec "
                                   f"({self['connection-spec']}); give each its own")

    def store_settings(self):
        """The keyword arguments of store.Greylist these options stand for."""
        return {
            "delay": self["delay"],
            "retry_window": self["retry-window"],
            "expiry": self["expiry"],
            "auto_whitelist": self["auto-whitelist"],
            "whitelist": self["whitelist"],
            "ipv4_prefix": self["ipv4-prefix"],
            "ipv6_prefix": self["ipv6-prefix"],
        }


def _start_logging(options, stream):
    from twisted.logger import (
        FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner,
        textFileLogObserver,
    )
    level = (LogLevel.warn if options["quiet"] else
             LogLevel.debug if options["verbose"] else LogLevel.info)
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(stream), [predicate])],
        redirectStandardIO=False)



def main(argv=None, reactor=None, stderr=None):
    """Entry point of the milter-manager-greylist console script; returns the exit status."""
    stderr = stderr if stderr is not None else sys.stderr
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as error:
        stderr.write(f"{PROGRAM}: {error}\n")
        stderr.write(f"Try '{PROGRAM} --help' for usage.\n")
        return 2
    if reactor is None:
        from twisted.internet import reactor

    from miltermanager.tools.serve import serve

    from .milter import GreylistMilter, server_factory
    from .outage import StoreOutage
    from .threaded import ThreadedGreylist

    if options["store"] is not None:
        greylist_store = _redis_store(options, reactor, stderr)
        if greylist_store is None:
            return 1
        where = f"store {greylist_store.name}"
    else:
        database = options["database"]
        try:
            greylist_store = store.Greylist(database, reactor, **options.store_settings())
        except (sqlite3.Error, OSError) as error:
            stderr.write(f"{PROGRAM}: cannot open the database {database}: {error}\n")
            return 1
        where = f"database {database}"
    _start_logging(options, stderr)
    log = Logger(namespace=PROGRAM)
    metrics = None
    if options["metrics-listen"] is not None:
        from .metrics import GreylistMetrics

        metrics = GreylistMetrics()
    if options["store"] is not None:
        # Redis keys expire by themselves; each decision waits on the network.
        greylist = ThreadedGreylist(greylist_store, reactor, metrics=metrics,
                                    threads=REDIS_THREADS, purge_interval=0)
    else:
        greylist = ThreadedGreylist(greylist_store, reactor, metrics=metrics)
    if metrics is not None:
        metrics.greylist = greylist
    hostname = socket.gethostname().encode("ascii", "replace")
    outage = StoreOutage(reactor, GreylistMilter.log)
    factory = server_factory(greylist, reactor, hostname, metrics, outage)
    spec_text = options["connection-spec"]
    state = {"status": 0}

    def start():
        greylist.start()
        if options["store"] is not None:
            _ping(greylist, outage)
        if metrics is not None:
            _serve_metrics(reactor, options["metrics-listen"], metrics, stderr, state, log)

    def listening(port):
        log.info("[greylist][listen] {spec}; {where}, delay {delay} s, retry window "
                 "{window} s, expiry {expiry} s, auto-whitelist {auto}", spec=spec_text,
                 where=where, delay=options["delay"], window=options["retry-window"],
                 expiry=options["expiry"], auto=options["auto-whitelist"])

    status = serve(reactor, spec_text, factory, PROGRAM, stderr,
                   listening=listening, start=start, stop=greylist.stop)
    return status or state["status"]


def _ping(greylist, outage):
    """Ask Redis at start: one line if it does not answer (mail passes until it does)."""
    from twisted.internet import threads

    def answered(result):
        outage.answered()

    def failed(failure):
        outage.failed(failure.value)

    threads.deferToThreadPool(greylist.reactor, greylist.pool, greylist.greylist.ping
                              ).addCallbacks(answered, failed)


def _redis_store(options, reactor, stderr):
    """The RedisGreylist of --store, or None after one line on stderr (bad URL, no redis-py)."""
    from . import redis_store

    try:
        store_url = redis_store.parse_url(options["store"])
    except ValueError as error:
        stderr.write(f"{PROGRAM}: --store: {error}\n")
        return None
    try:
        return redis_store.RedisGreylist.from_url(store_url, reactor,
                                                  **options.store_settings())
    except ImportError:
        stderr.write(f"{PROGRAM}: --store {store_url.text}: the redis Python library is not "
                     "installed (Debian: python3-redis; pip: redis)\n")
        return None


def _serve_metrics(reactor, spec_text, metrics, stderr, state, log):
    """Listen for scrapes on spec_text; a failure to listen stops the program (status 1)."""
    from .metrics import start

    def listened(port):
        reactor.addSystemEventTrigger("before", "shutdown", port.stopListening)
        log.info("[greylist][metrics] /metrics on {spec}", spec=spec_text)

    def failed(failure):
        stderr.write(f"{PROGRAM}: cannot listen on {spec_text} (--metrics-listen): "
                     f"{failure.getErrorMessage()}\n")
        state["status"] = 1
        reactor.stop()

    start(reactor, spec_text, metrics).addCallbacks(listened, failed)


def run():
    sys.exit(main())


if __name__ == "__main__":
    run()
