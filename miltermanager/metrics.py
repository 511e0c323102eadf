"""Prometheus metrics: an observer of the event stream, and its page on the web endpoint.

Metrics observes the sessions (events.ISessionObserver) and the probes
(miltermanager.probes) and only counts, in plain dicts: an event costs a
dict update, no lock and no label lookup. MetricsCollector turns the counts
into prometheus_client metric families when /metrics is scraped, in the
manager's own CollectorRegistry (never prometheus_client's global one), and
reads what is a state rather than an event (sessions in flight, children up
or down) from the factory at that moment. prometheus_client writes the text:
OpenMetrics when the scraper's Accept header asks for it, Prometheus' text
format otherwise, as its own handlers choose.

With manager.n_workers, each worker counts in its own Metrics and sends
as_data() to the supervisor when /metrics is scraped; the supervisor adds
them up in a MergedMetrics, which the same MetricsCollector renders
(WorkersCollector adds the workers' own gauges).

The web endpoint (web.connection_spec) serves a twisted.web Resource tree:
web_root() gives the root, to which /metrics is one child; other pages are
further children (see web_root).
"""

from bisect import bisect_left

from twisted.logger import Logger
from twisted.web import resource, server
from zope.interface import implementer

from . import probes
from .events import ISessionObserver

PREFIX = "milter_manager"
# Upper bounds (seconds) of the latency histograms' buckets: child replies go from a
# millisecond to the 297 s of end_of_message_timeout.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0, 300.0)
# DNS and LDAP answer within their own timeouts (seconds).
LOOKUP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Observations counted per bucket, cumulated only when read."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value):
        # bisect_left: a value equal to a bound belongs to that bucket (le is "<=").
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self):
        """[(le, cumulative count)] ending with ("+Inf", total), as prometheus_client takes them."""
        total = 0
        result = []
        for bound, count in zip((*map(_bound, self.bounds), "+Inf"), self.counts):
            total += count
            result.append((bound, total))
        return result


def _bound(value):
    return repr(float(value))


@implementer(ISessionObserver)
class Metrics:
    """Counts of everything the sessions and the probes report, since the process started.

    factory (a ManagerFactory, or None) is read at scrape time for the
    sessions in flight and the children's health. start() registers the
    probes; stop() clears them.
    """

    def __init__(self, factory=None):
        self.factory = factory
        self.sessions = 0
        self.messages = {}  # verdict label -> count
        # (child, Stage, Status) -> Histogram of the replies' latency: it counts the replies
        # too, so a reply costs one lookup (latency() merges the statuses when scraped).
        self.replies = {}
        self.fallbacks = {}  # (child, Stage, Cause) -> count
        self.stops = {}  # (child, condition) -> count
        self.health_changes = {}  # (child, "up" or "down") -> count
        self.spooled_bodies = 0
        self.spooled_bytes = 0
        self.dnsbl = {}  # (result, "cache" or "dns") -> count
        self.dnsbl_latency = Histogram(LOOKUP_BUCKETS)
        self.ldap_lookups = {}  # "hit", "shared", "miss" -> count
        self.ldap_searches = {}  # "ok", "error" -> count
        self.ldap_latency = Histogram(LOOKUP_BUCKETS)

    # ------------------------------------------------------------ the probes

    def start(self):
        """Be told of body spooling, DNSBL and LDAP lookups (probes) from now on."""
        probes.body_spooled = self.body_spooled
        probes.dnsbl_lookup = self.dnsbl_lookup
        probes.ldap_lookup = self.ldap_lookup
        probes.ldap_search = self.ldap_search

    def stop(self):
        """Stop listening to the probes (those that are still ours)."""
        for name in ("body_spooled", "dnsbl_lookup", "ldap_lookup", "ldap_search"):
            if getattr(probes, name) == getattr(self, name):
                setattr(probes, name, None)

    def body_spooled(self, size):
        self.spooled_bodies += 1
        self.spooled_bytes += size

    def dnsbl_lookup(self, result, seconds):
        key = (result, "cache" if seconds is None else "dns")
        self.dnsbl[key] = self.dnsbl.get(key, 0) + 1
        if seconds is not None:
            self.dnsbl_latency.observe(seconds)

    def ldap_lookup(self, result):
        self.ldap_lookups[result] = self.ldap_lookups.get(result, 0) + 1

    def ldap_search(self, ok, seconds):
        key = "ok" if ok else "error"
        self.ldap_searches[key] = self.ldap_searches.get(key, 0) + 1
        self.ldap_latency.observe(seconds)

    # ------------------------------------------------------------ the event stream

    def session_started(self, event):
        self.sessions += 1

    def child_replied(self, event):
        key = (event.child, event.stage, event.status)
        histogram = self.replies.get(key)
        if histogram is None:
            histogram = self.replies[key] = Histogram(LATENCY_BUCKETS)
        elapsed = event.elapsed  # Histogram.observe inlined: this runs for every reply
        histogram.counts[bisect_left(LATENCY_BUCKETS, elapsed)] += 1
        histogram.sum += elapsed

    def child_stopped(self, event):
        key = (event.child, event.condition)
        self.stops[key] = self.stops.get(key, 0) + 1

    def child_fell_back(self, event):
        key = (event.child, event.stage, event.cause)
        self.fallbacks[key] = self.fallbacks.get(key, 0) + 1

    def message_ended(self, event):
        if event.status is not None:
            verdict = event.status.label
        else:
            verdict = "aborted"
        self.messages[verdict] = self.messages.get(verdict, 0) + 1

    def session_ended(self, event):
        pass

    def child_health_changed(self, event):
        key = (event.child, "up" if event.up else "down")
        self.health_changes[key] = self.health_changes.get(key, 0) + 1

    # ------------------------------------------------------------ scrape time

    def reply_counts(self):
        """{(child, Stage, Status): replies}."""
        return {key: sum(histogram.counts) for key, histogram in self.replies.items()}

    def latency(self):
        """{(child, Stage): Histogram} of the replies whatever their status."""
        merged = {}
        for (child, stage, _status), histogram in self.replies.items():
            into = merged.get((child, stage))
            if into is None:
                into = merged[(child, stage)] = Histogram(histogram.bounds)
            into.counts = [a + b for a, b in zip(into.counts, histogram.counts)]
            into.sum += histogram.sum
        return merged

    def in_flight(self):
        """MTA connections open now (0 without a factory)."""
        return self.factory.connections if self.factory is not None else 0

    def children_up(self):
        """[(child, up)] for the enabled children of the current configuration, in order."""
        if self.factory is None:
            return []
        records = self.factory.health.records
        result = []
        for milter in self.factory.configuration.enabled_milters:
            record = records.get((milter.name, milter.connection_spec))
            result.append((milter.name, record is None or record.down_since is None))
        return result

    def as_data(self):
        """The counts and the states now, as JSON-ready data (MergedMetrics.add reads it)."""
        def table(counts, key=lambda key: key):
            return [[*key(k), value] for k, value in counts.items()]

        return {
            "sessions": self.sessions,
            "messages": self.messages,
            "replies": [[child, stage.name, status.name, histogram.counts, histogram.sum]
                        for (child, stage, status), histogram in self.replies.items()],
            "fallbacks": table(self.fallbacks, lambda k: (k[0], k[1].name, k[2].value)),
            "stops": table(self.stops),
            "health_changes": table(self.health_changes),
            "spooled_bodies": self.spooled_bodies,
            "spooled_bytes": self.spooled_bytes,
            "dnsbl": table(self.dnsbl),
            "dnsbl_latency": [self.dnsbl_latency.counts, self.dnsbl_latency.sum],
            "ldap_lookups": self.ldap_lookups,
            "ldap_searches": self.ldap_searches,
            "ldap_latency": [self.ldap_latency.counts, self.ldap_latency.sum],
            "in_flight": self.in_flight(),
            "children_up": [[child, up] for child, up in self.children_up()],
        }


class MergedMetrics(Metrics):
    """The sum of several processes' Metrics.as_data() (the workers'), for MetricsCollector.

    add(data) adds a worker's counts; with live, also its sessions in flight
    and its view of the children (a child is up only where every worker
    has it up). workers ({state: n}) and restarts are the supervisor's,
    rendered by WorkersCollector.
    """

    def __init__(self):
        super().__init__(None)
        self._in_flight = 0
        self._up = {}  # child -> up in every worker that answered, in first-seen order
        self.workers = {}
        self.restarts = 0

    def add(self, data, live=True):
        from . import stages
        from .events import Cause
        from .merge import Status

        def add_to(counts, key, value):
            counts[key] = counts.get(key, 0) + value

        self.sessions += data["sessions"]
        for verdict, value in data["messages"].items():
            add_to(self.messages, verdict, value)
        for child, stage, status, counts, total in data["replies"]:
            key = (child, stages.BY_NAME[stage], Status[status])
            histogram = self.replies.get(key)
            if histogram is None:
                histogram = self.replies[key] = Histogram(LATENCY_BUCKETS)
            _add_histogram(histogram, counts, total)
        for child, stage, cause, value in data["fallbacks"]:
            add_to(self.fallbacks, (child, stages.BY_NAME[stage], Cause(cause)), value)
        for name in ("stops", "health_changes", "dnsbl"):
            counts = getattr(self, name)
            for *key, value in data[name]:
                add_to(counts, tuple(key), value)
        for name in ("ldap_lookups", "ldap_searches"):
            counts = getattr(self, name)
            for key, value in data[name].items():
                add_to(counts, key, value)
        self.spooled_bodies += data["spooled_bodies"]
        self.spooled_bytes += data["spooled_bytes"]
        _add_histogram(self.dnsbl_latency, *data["dnsbl_latency"])
        _add_histogram(self.ldap_latency, *data["ldap_latency"])
        if live:
            self._in_flight += data["in_flight"]
            for child, up in data["children_up"]:
                self._up[child] = self._up.get(child, True) and up

    def in_flight(self):
        return self._in_flight

    def children_up(self):
        return list(self._up.items())


def _add_histogram(histogram, counts, total):
    if len(counts) != len(histogram.counts):
        raise ValueError(f"a histogram of {len(counts)} buckets, not {len(histogram.counts)}")
    histogram.counts = [a + b for a, b in zip(histogram.counts, counts)]
    histogram.sum += total


class MetricsCollector:
    """A prometheus_client collector that reads a Metrics when scraped."""

    def __init__(self, metrics):
        self.metrics = metrics

    def describe(self):
        # Nothing to check at registration: the names are fixed and ours alone.
        return []

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
        )

        m = self.metrics

        def counter(name, doc, labels, counts, label_values=lambda key: key):
            family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
            for key, value in sorted(counts.items(), key=_sort_key):
                family.add_metric(list(label_values(key)), value)
            return family

        def histogram(name, doc, labels, histograms, label_values=lambda key: key):
            family = HistogramMetricFamily(f"{PREFIX}_{name}", doc, labels=labels,
                                           unit="seconds")
            for key, each in sorted(histograms.items(), key=_sort_key):
                family.add_metric(list(label_values(key)), each.buckets(), each.sum)
            return family

        yield counter("sessions", "MTA connections accepted", [], {(): m.sessions})
        yield GaugeMetricFamily(f"{PREFIX}_sessions_in_flight", "MTA connections open now",
                                value=m.in_flight())
        yield counter("messages", "Transactions ended, by the verdict the MTA got "
                      "(aborted: the MTA aborted it or went away)", ["verdict"],
                      {(verdict,): count for verdict, count in m.messages.items()})
        yield counter("child_replies", "Child replies, by stage and the status they count "
                      "for", ["child", "stage", "status"], m.reply_counts(),
                      lambda key: (key[0], key[1].name, key[2].label))
        yield histogram("child_reply", "Time from a command to the child's reply",
                        ["child", "stage"], m.latency(), lambda key: (key[0], key[1].name))
        yield counter("child_fallbacks", "A child's fallback_status used instead of its "
                      "reply, by cause", ["child", "stage", "cause"], m.fallbacks,
                      lambda key: (key[0], key[1].name, key[2].value))
        yield counter("child_stops", "Children stopped by an applicable condition",
                      ["child", "condition"], m.stops)
        yield counter("child_health_changes", "Children marked down or back up",
                      ["child", "state"], m.health_changes)
        up = GaugeMetricFamily(f"{PREFIX}_child_up", "1 while the child is up, 0 while it "
                               "is marked down after failures in a row", labels=["child"])
        for child, is_up in m.children_up():
            up.add_metric([child], 1 if is_up else 0)
        yield up
        yield counter("body_spooled_messages", "Message bodies that went to a temporary "
                      "file (beyond manager.max_body_memory)", [], {(): m.spooled_bodies})
        yield counter("body_spooled_bytes", "Bytes of message bodies that went to a "
                      "temporary file", [], {(): m.spooled_bytes})
        yield counter("dnsbl_lookups", "DNSBL lookups, by result and by what answered",
                      ["result", "source"], m.dnsbl)
        single = {(): m.dnsbl_latency} if sum(m.dnsbl_latency.counts) else {}
        yield histogram("dnsbl_lookup", "Time of DNSBL lookups the DNS answered", [], single)
        yield counter("ldap_policy_lookups", "Recipient policy lookups: hit (cached), "
                      "shared (joined a running search), miss (searched)", ["result"],
                      {(key,): count for key, count in m.ldap_lookups.items()})
        yield counter("ldap_policy_searches", "LDAP policy searches, by outcome", ["result"],
                      {(key,): count for key, count in m.ldap_searches.items()})
        single = {(): m.ldap_latency} if sum(m.ldap_latency.counts) else {}
        yield histogram("ldap_policy_search", "Time of LDAP policy searches", [], single)


class WorkersCollector(MetricsCollector):
    """MetricsCollector of a MergedMetrics, with the supervisor's gauges of its workers."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield from super().collect()
        m = self.metrics
        workers = GaugeMetricFamily(f"{PREFIX}_workers", "Worker processes by state: running "
                                    "(answered this scrape), unreachable (running, no answer "
                                    "in time), restarting (waiting to be started again)",
                                    labels=["state"])
        for state in ("running", "unreachable", "restarting"):
            workers.add_metric([state], m.workers.get(state, 0))
        yield workers
        restarts = CounterMetricFamily(f"{PREFIX}_worker_restarts", "Workers that exited "
                                       "while the supervisor was not stopping, and were "
                                       "restarted")
        restarts.add_metric([], m.restarts)
        yield restarts


def _sort_key(item):
    return tuple(str(getattr(part, "name", part)) for part in item[0])


def registry_for(metrics):
    """A new CollectorRegistry holding metrics' collector (and nothing else)."""
    return registry_of(MetricsCollector(metrics))


def registry_of(collector):
    """A new CollectorRegistry holding collector (and nothing else)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


class MetricsResource(resource.Resource):
    """/metrics: the registry in the format the scraper's Accept header asks for."""

    isLeaf = True
    log = Logger()

    def __init__(self, registry, refresh=None):
        super().__init__()
        self.registry = registry
        self.refresh = refresh

    def render_GET(self, request):
        if self.refresh is None:
            return self._render(request)
        # refresh() reads a state off the reactor thread (a Deferred); write once it fired.
        from twisted.internet import defer
        from twisted.web.server import NOT_DONE_YET

        finished = []
        request.notifyFinish().addBoth(finished.append)

        def write(_):
            if not finished:  # the scraper is still there
                request.write(self._render(request))
                request.finish()

        defer.maybeDeferred(self.refresh).addBoth(write)
        return NOT_DONE_YET

    def _render(self, request):
        from prometheus_client.exposition import choose_encoder, gzip_accepted

        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        try:
            output = encoder(self.registry)
        except Exception:
            self.log.failure("[web][metrics][error] cannot write the metrics")
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"cannot write the metrics; the log says why\n"
        request.setHeader(b"content-type", content_type.encode("ascii"))
        encoding = request.getHeader(b"accept-encoding")
        if encoding and gzip_accepted(encoding.decode("latin-1")):
            import gzip

            output = gzip.compress(output)
            request.setHeader(b"content-encoding", b"gzip")
        return output

    render_HEAD = render_GET


class Index(resource.Resource):
    """/: a plain list of the pages below the root."""

    isLeaf = True

    def __init__(self, root):
        super().__init__()
        self.root = root

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        pages = sorted(name.decode("ascii") for name in self.root.children if name)
        return "".join(f"/{page}\n" for page in pages).encode("ascii")


def web_root(registry, refresh=None):
    """The web endpoint's Resource tree: / (an index) and /metrics.

    Further pages are added with root.putChild(b"NAME", resource); the
    index lists them. refresh, if given, is called before each scrape and may
    return a Deferred: /metrics is written once it fired (whatever its result;
    refresh logs its own failures).
    """
    root = resource.Resource()
    root.putChild(b"", Index(root))
    root.putChild(b"metrics", MetricsResource(registry, refresh))
    return root


class QuietSite(server.Site):
    """A Site that writes no access log line per request: a scrape every 15 s is no news."""

    noisy = False
    displayTracebacks = False

    def log(self, request):
        pass


def start(factory, reactor, settings):
    """Observe factory's sessions and listen on settings.connection_spec (the web section).

    Fires with a WebEndpoint whose stop() undoes both; fails as listening
    does (CannotListenError).
    """
    metrics = Metrics(factory)
    site = QuietSite(web_root(registry_for(metrics)))
    listening = listen(reactor, settings.connection_spec, site)

    def listening_now(port):
        factory.add_observer(metrics)
        metrics.start()
        return WebEndpoint(factory, metrics, site, port)

    return listening.addCallback(listening_now)


def listen(reactor, spec, site):
    """Listen with site on the connection spec text spec; fires with the port.

    A UNIX socket is made as upstream makes its own (WebSocketSettings).
    Fails as listening does (CannotListenError).
    """
    from .listening import listen_endpoint

    return listen_endpoint(reactor, WebSocketSettings(spec)).listen(site)


class WebEndpoint:
    """The running web endpoint: the metrics observer, the site (its resource is the root)."""

    def __init__(self, factory, metrics, site, port):
        self.factory = factory
        self.metrics = metrics
        self.site = site
        self.port = port

    def stop(self):
        """Stop observing and listening; fires when the port is closed."""
        from twisted.internet import defer

        self.metrics.stop()
        try:
            self.factory.remove_observer(self.metrics)
        except ValueError:
            pass  # stopped twice
        return defer.maybeDeferred(self.port.stopListening)


class WebSocketSettings:
    """listen_endpoint's settings for the web endpoint: its spec, a UNIX socket as upstream's."""

    unix_socket_mode = 0o660
    unix_socket_group = None
    remove_unix_socket_on_create = True
    remove_unix_socket_on_close = True

    def __init__(self, spec):
        self.connection_spec = spec
