"""Prometheus metrics of milter-manager-greylist (--metrics-listen), served as the manager's are.

GreylistMetrics only counts, in plain dicts, as miltermanager.metrics.Metrics
does: the milter reports each recipient's decision and the time the store
took, ThreadedGreylist its purges and errors. The triplets and networks in
the store are a state of the database file (which other processes may share),
not of this process: refresh() counts them in the store's thread pool before
each scrape, and GreylistCollector writes the last counts.

/metrics and its exposition (OpenMetrics or Prometheus text, gzip) are the
manager's own: miltermanager.metrics.web_root, QuietSite and listen.
"""

from twisted.logger import Logger

from .. import metrics as manager_metrics
from ..metrics import LOOKUP_BUCKETS, PREFIX, Histogram

GREYLIST_PREFIX = f"{PREFIX}_greylist"
# A decision is some 40 µs in SQLite plus the thread pool's hand-over; a locked
# database waits up to the busy timeout (5 s).
DECISION_BUCKETS = (0.0001, 0.00025, 0.0005) + LOOKUP_BUCKETS

# Why a recipient passed without a decision of the store (GreylistMilter counts them).
WHITELISTED = "whitelisted"  # the client is in a --whitelist network
NOT_IP = "not-ip"  # the client did not connect over IP (a UNIX socket, a local program)
BAD_INPUT = "bad-input"  # an odd client address, sender or recipient, or no MAIL before RCPT
ERROR = "error"  # the store failed: passed (fail open)


class GreylistMetrics:
    """Counts of the greylist's decisions since the process started, and the store's size.

    greylist (a ThreadedGreylist, or None) is counted by refresh().
    """

    log = Logger()

    def __init__(self, greylist=None):
        self.greylist = greylist
        self.decisions = {}  # ("greylisted" or "passed", reason) -> count
        self.latency = Histogram(DECISION_BUCKETS)
        self.errors = {}  # (operation, kind) -> count
        self.purged = 0
        self.store_counts = None  # (pending, passed, auto-whitelisted networks) or None

    def decided(self, passed, reason):
        """A recipient was answered: passed or greylisted, for reason (a store.Reason value
        or one of WHITELISTED, NOT_IP, BAD_INPUT, ERROR)."""
        key = ("passed" if passed else "greylisted", reason)
        self.decisions[key] = self.decisions.get(key, 0) + 1

    def store_answered(self, seconds):
        """The store decided (or failed to) after seconds."""
        self.latency.observe(seconds)

    def failed(self, operation, kind):
        """operation ("decide", "purge", "count") failed; kind "database" or "internal"."""
        key = (operation, kind)
        self.errors[key] = self.errors.get(key, 0) + 1

    def purged_rows(self, count):
        self.purged += count

    def refresh(self):
        """Count the store's rows in its thread pool; fires when done (never fails).

        A failure is counted and logged, and the triplet gauges are left out
        of the scrape rather than shown stale.
        """
        if self.greylist is None:
            return None

        def counted(counts):
            self.store_counts = counts

        def failed(failure):
            from .store import STORE_ERRORS

            self.store_counts = None
            self.failed("count", "database" if failure.check(*STORE_ERRORS) else "internal")
            self.log.error("[greylist][metrics][error] cannot count the triplets: {error}",
                           error=failure.getErrorMessage())

        return self.greylist.counts().addCallbacks(counted, failed)


class GreylistCollector:
    """A prometheus_client collector that reads a GreylistMetrics when scraped."""

    def __init__(self, metrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
        )

        m = self.metrics
        decisions = CounterMetricFamily(
            f"{GREYLIST_PREFIX}_decisions", "Recipients answered, by result and reason: "
            "greylisted (new, early) or passed (retried, known, auto-whitelisted, "
            "whitelisted, not-ip, bad-input, error: fail open)", labels=["result", "reason"])
        for (result, reason), count in sorted(m.decisions.items()):
            decisions.add_metric([result, reason], count)
        yield decisions
        latency = HistogramMetricFamily(
            f"{GREYLIST_PREFIX}_decision", "Time the store took to decide on a triplet "
            "(its thread pool included)", unit="seconds")
        if sum(m.latency.counts):
            latency.add_metric([], m.latency.buckets(), m.latency.sum)
        yield latency
        errors = CounterMetricFamily(
            f"{GREYLIST_PREFIX}_errors", "Failures of the store, by operation (decide, purge, "
            "count) and kind (database, internal)", labels=["operation", "kind"])
        for (operation, kind), count in sorted(m.errors.items()):
            errors.add_metric([operation, kind], count)
        yield errors
        yield CounterMetricFamily(f"{GREYLIST_PREFIX}_purged_rows", "Expired rows the "
                                  "periodic purge deleted", value=m.purged)
        triplets = GaugeMetricFamily(
            f"{GREYLIST_PREFIX}_triplets", "Triplets in the database file (shared by every "
            "process using it), by state: pending (greylisted) or passed", labels=["state"])
        networks = GaugeMetricFamily(
            f"{GREYLIST_PREFIX}_auto_whitelisted_networks", "Client networks auto-whitelisted "
            "in the database file")
        if m.store_counts is not None:
            pending, passed, auto = m.store_counts
            triplets.add_metric(["pending"], pending)
            triplets.add_metric(["passed"], passed)
            networks.add_metric([], auto)
        yield triplets
        yield networks


def registry_for(metrics):
    """A new CollectorRegistry holding metrics' collector (and nothing else)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(GreylistCollector(metrics))
    return registry


def start(reactor, spec, metrics):
    """Serve metrics on /metrics at the connection spec text spec; fires with the port."""
    site = manager_metrics.QuietSite(manager_metrics.web_root(registry_for(metrics),
                                                              metrics.refresh))
    return manager_metrics.listen(reactor, spec, site)
