"""A recipient's policy: from the cache, or one search shared by everyone asking meanwhile.

When the directory cannot be asked (an error, or no answer within
ldap.timeout), ldap.on_error decides: "temporary-failure" (the default)
makes the recipient's answer a temporary failure, "default-policy" serves
the configuration's defaults, "stale N" serves the policy cached for the
address if it expired at most N seconds ago (else a temporary failure).
Never silently the defaults: an outage is logged when it starts (one
line, with the cause) and when it ends (how long, how many lookups
failed).
"""

from dataclasses import dataclass

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.logger import Logger

from miltermanager import probes

from .keys import parse
from .rules import Entry, RecipientPolicy, default_policy, resolve
from .source import SourceError


@dataclass(frozen=True)
class OnError:
    """ldap.on_error parsed: mode is "temporary-failure", "default-policy" or "stale"."""

    mode: str
    stale_for: float = 0.0

    @classmethod
    def parse(cls, text):
        """OnError of the setting's text; ValueError saying what is expected."""
        words = text.split() if isinstance(text, str) else []
        if words in (["temporary-failure"], ["default-policy"]):
            return cls(words[0])
        if len(words) == 2 and words[0] == "stale":
            try:
                seconds = float(words[1])
            except ValueError:
                seconds = -1
            if seconds > 0 and seconds < float("inf"):
                return cls("stale", seconds)
        raise ValueError('must be "temporary-failure", "default-policy" or "stale N" '
                         '(N seconds an expired entry may still be served)')

    def __str__(self):
        return f"stale {self.stale_for:g}" if self.mode == "stale" else self.mode


class Unavailable:
    """The recipient's policy cannot be known: its answer is a temporary failure."""

    __slots__ = ("reason",)

    def __init__(self, reason):
        self.reason = reason

    def __repr__(self):
        return f"<Unavailable {self.reason}>"


class _Shared:
    """One search's result, handed to everyone who asked while it ran."""

    __slots__ = ("waiters", "result")

    def __init__(self):
        self.waiters = []
        self.result = None

    def wait(self):
        d = defer.Deferred()
        self.waiters.append(d)
        return d

    def fire(self, result):
        self.result = result
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            d.callback(result)


class PolicyLookup:
    """Looks recipients' policies up in an IPolicySource, through a PolicyCache.

    lookup() answers a RecipientPolicy or an Unavailable at once when it
    can (cached, or nothing to search), else a Deferred firing with one
    (it never fails). known: the child names a policy may name; an entry
    naming another is logged once per name.
    """

    log = Logger()

    def __init__(self, source, query, attributes, defaults, cache, clock, timeout, on_error,
                 delimiter, known, uris=()):
        self.source = source
        self.query = query
        self.attributes = attributes
        self.defaults = defaults
        self.cache = cache
        self.clock = clock
        self.timeout = timeout
        self.on_error = on_error
        self.delimiter = delimiter
        self.known = frozenset(known)
        self.uris = ", ".join(uris) or "the directory"
        self.default = default_policy(attributes, defaults)
        self._fallback = default_policy(attributes, defaults, fallback=True)
        self._wanted = list(dict.fromkeys([*attributes.names(), *query.ranking_attributes]))
        self._running = {}  # address text -> _Shared
        self._unknown_names = set()
        self.outage_since = None  # when the directory stopped answering, or None
        self.failed = 0  # lookups that failed in this outage

    def lookup(self, recipient):
        address = parse(recipient, self.delimiter)
        if address.domain is None:
            return self.default  # nothing a directory of domains and users could say
        probe = probes.ldap_lookup
        cached = self.cache.get(address.text)
        if cached is not None:
            if probe is not None:
                probe("hit")
            return cached
        running = self._running.get(address.text)
        if running is not None:
            if probe is not None:
                probe("shared")
            return running.wait()
        if probe is not None:
            probe("miss")
        running = self._running[address.text] = _Shared()
        base, search_filter = self.query.for_address(address)
        started = self.clock.seconds()
        d = defer.maybeDeferred(self.source.search, base, search_filter, self._wanted)
        d.addTimeout(self.timeout, self.clock)
        if probes.ldap_search is not None:
            d.addBoth(self._report_search, started)
        d.addCallback(self._found, address)
        d.addErrback(self._failed, address)
        d.addCallback(self._done, address)
        if self._running.get(address.text) is not running:
            return running.result  # answered at once (a source that does not block)
        return running.wait()

    def _report_search(self, result, started):
        """Tell probes.ldap_search how a search ended and how long it took; result goes on."""
        probe = probes.ldap_search
        if probe is not None:
            probe(not isinstance(result, Failure), self.clock.seconds() - started)
        return result

    def _done(self, result, address):
        running = self._running.pop(address.text, None)
        if running is not None:
            running.fire(result)
        return result

    def _found(self, found, address):
        entries = []
        for dn, attributes in found:
            rank = self.query.rank(attributes, address)
            if rank is None:
                rank = len(address.keys) - 1  # found by the filter, key unknown: the least specific
            entries.append(Entry(dn, rank, attributes))
        policy = resolve(entries, self.attributes, self.defaults)
        self._check_names(policy)
        self.cache.put(address.text, policy)
        if self.outage_since is not None:
            self.log.info("[ldap][recovered] {uris} answers again after {seconds:.1f} s; "
                          "{failed} lookups failed meanwhile", uris=self.uris,
                          seconds=self.clock.seconds() - self.outage_since, failed=self.failed)
            self.outage_since, self.failed = None, 0
        self.log.debug("[ldap][policy] {address}: {policy} ({entries})", address=address.text,
                       policy=policy.describe(),
                       entries="; ".join(policy.entries) or "no entry: the defaults")
        return policy

    def _check_names(self, policy):
        for name in policy.states:
            if name not in self.known and name not in self._unknown_names:
                self._unknown_names.add(name)
                self.log.warn("[ldap][unknown-milter] {entries} name {name!r}, which is no "
                              "milter here; ignored", entries=", ".join(policy.entries)
                              or "the defaults", name=name)

    def _failed(self, failure, address):
        known = failure.check(defer.TimeoutError, defer.CancelledError, SourceError)
        if known is SourceError:
            reason = failure.getErrorMessage()
        elif known:
            reason = f"no answer in {self.timeout:g} s"
        else:
            reason = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        self.failed += 1
        if self.outage_since is None:
            self.outage_since = self.clock.seconds()
            text = ("[ldap][error] cannot ask {uris}: {reason}; on_error {on_error}: {what} "
                    "until it answers again")
            fields = dict(uris=self.uris, reason=reason, on_error=str(self.on_error),
                          what=self._what_happens())
            if known:
                self.log.error(text, **fields)
            else:
                self.log.failure(text, failure, **fields)  # unexpected: with its traceback
        mode = self.on_error.mode
        if mode == "default-policy":
            return self._fallback
        if mode == "stale":
            stale = self.cache.stale(address.text)
            if stale is not None:
                return RecipientPolicy(stale.states, stale.entries, stale=True)
        return Unavailable(reason)

    def _what_happens(self):
        mode = self.on_error.mode
        if mode == "default-policy":
            return "recipients get the default policy"
        if mode == "stale":
            return (f"recipients get their cached policy up to {self.on_error.stale_for:g} s "
                    f"after it expired, else a temporary failure")
        return "recipients get a temporary failure"

    def stop(self):
        self.source.stop()
