"""`ldap.*`: where recipient policies are searched, and the `LDAP Policy` condition's stoppers.

The settings are checked where they are assigned (FILE:LINE); what only
the whole configuration can tell (the base, the milters named, the
timeout against the children's) by problems(). The bind password is
read from ldap.bind_password_file when it is assigned, as the loading
user (root at start), and never shown. The service starts the lookups
(start) and stops them; a reload starts with an empty cache and keeps the
running connections when the directory settings did not change.
"""

import re
from dataclasses import dataclass, field
from typing import ClassVar
from urllib.parse import urlsplit

from twisted.internet import defer, threads

from miltermanager.policy.cache import PolicyCache
from miltermanager.policy.lookup import OnError, PolicyLookup
from miltermanager.policy.query import Query, QueryError
from miltermanager.policy.rules import Attributes, Defaults, State
from miltermanager.policy.source import LDAPSource

from .model import (
    ConfigurationError, InvalidValue, _boolean, _names, _optional_text, located, setting,
)

CONDITION = "LDAP Policy"
DEFAULT_FILTER = "(&(objectClass=milterManagerPolicy)(mail=%m))"
MAX_TIMEOUT = 60.0
# Seconds a source that a reload replaced keeps serving sessions begun before it.
RETIRE_AFTER = 60.0
_ATTRIBUTE = re.compile(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(\.[0-9]+)+")


def _uris(value):
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise InvalidValue('must be a list of LDAP URIs, e.g. ["ldap://127.0.0.1:389"]')
    for uri in value:
        problem = _uri_problem(uri)
        if problem:
            raise InvalidValue(f"has {problem}", as_is=False)
    return list(value)


def _uri_problem(uri):
    if not isinstance(uri, str) or "\0" in uri:
        return f"a URI that is not a string: {uri!r}"
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        return f"a URI with a bad port: {uri!r}"
    if parts.scheme.lower() not in ("ldap", "ldaps"):
        return f"a URI that is neither ldap:// nor ldaps://: {uri!r}"
    if not parts.hostname:
        return f"a URI without a host: {uri!r}"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return f"a URI with a DN, attributes or a filter in it: {uri!r} (use ldap.base and ldap.filter)"
    if port == 0:
        return f"a URI with port 0: {uri!r}"
    return None


def _filter(value):
    if not isinstance(value, str) or not value.strip():
        raise InvalidValue(f"must be an LDAP filter such as {DEFAULT_FILTER}")
    try:
        Query(value, "dc=example,dc=com")
    except QueryError as error:
        raise InvalidValue(str(error)) from None
    return value


def _scope(value):
    if value not in ("sub", "one", "base"):
        raise InvalidValue('must be "sub", "one" or "base"')
    return value


def _timeout(value):
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and 0 < value <= MAX_TIMEOUT):
        raise InvalidValue(f"must be a number of seconds greater than 0, at most {MAX_TIMEOUT:g}")
    return float(value)


def _ttl(value):
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
            and value < float("inf")):
        raise InvalidValue("must be a number of seconds, 0 or more (0: not cached)")
    return float(value)


def _on_error(value):
    try:
        OnError.parse(value)
    except ValueError as error:
        raise InvalidValue(str(error)) from None
    return " ".join(value.split())


def _attribute(value):
    if not (isinstance(value, str) and _ATTRIBUTE.fullmatch(value)):
        raise InvalidValue("must be an LDAP attribute name (letters, digits, '-') or an OID")
    return value


def _delimiter(value):
    if not isinstance(value, str) or "@" in value or "\0" in value or any(
            char.isspace() for char in value):
        raise InvalidValue('must be the characters that start an address extension ("+"), '
                           'or "" for none')
    return value


def _threads(value):
    if type(value) is not int or not 1 <= value <= 64:
        raise InvalidValue("must be an integer from 1 to 64")
    return value


def _readable_file(value):
    _optional_text(value)
    if value is None:
        return None
    try:
        with open(value, "rb"):
            pass
    except OSError as error:
        raise InvalidValue(f"cannot be read: {value}: {error.strerror}", as_is=True) from None
    return value


@dataclass
class LDAPConfig:
    """`ldap`: the directory recipient policies come from (the LDAP Policy condition)."""

    SECTION: ClassVar[str] = "ldap"
    VERBS: ClassVar[tuple] = ()
    EFFECTIVE: ClassVar[tuple] = ()
    uris: list = setting(
        check=_uris, factory=list,
        doc="LDAP servers in order of preference (ldap:// or ldaps://); empty: no LDAP")
    base: str | None = setting(
        check=_optional_text, doc="search base; %d is the recipient's domain")
    scope: str = setting("sub", check=_scope, doc='"sub", "one" or "base"')
    filter: str = setting(
        DEFAULT_FILTER, check=_filter,
        doc="search filter: (ATTR=%m) ORs the lookup keys, %d the domain, %u the mailbox")
    bind_dn: str | None = setting(check=_optional_text, doc="DN to bind as; None: anonymous")
    bind_password_file: str | None = setting(
        check=_readable_file, doc="file holding bind_dn's password (read at load, never shown)")
    tls_ca_file: str | None = setting(
        check=_readable_file, doc="CA certificates (PEM) the server's certificate must chain to")
    start_tls: bool = setting(
        False, check=_boolean, doc="StartTLS on ldap:// URIs (ldaps:// always uses TLS)")
    timeout: float = setting(
        5.0, check=_timeout,
        doc="seconds to connect, to wait for an answer, and for a whole lookup")
    cache_ttl: float = setting(300.0, check=_ttl, doc="seconds a found policy is kept")
    negative_cache_ttl: float = setting(
        60.0, check=_ttl, doc="seconds an address without any entry is kept")
    on_error: str = setting(
        "temporary-failure", check=_on_error,
        doc='when LDAP cannot be asked: "temporary-failure", "default-policy" or "stale N"')
    split_recipients: bool = setting(
        False, check=_boolean,
        doc="452 4.5.3 to a recipient whose policy differs from the first accepted one's")
    spam_milters: list = setting(
        check=_names, factory=list, doc="milters amavisBypassSpamChecks and amavisSpamLover mean")
    virus_milters: list = setting(
        check=_names, factory=list, doc="milters amavisBypassVirusChecks means")
    default_apply: list = setting(check=_names, factory=list, doc="milters run when no entry says")
    default_bypass: list = setting(
        check=_names, factory=list, doc="milters bypassed when no entry says otherwise")
    default_evaluate: list = setting(
        check=_names, factory=list, doc="milters only evaluated when no entry says otherwise")
    apply_attribute: str = setting(
        "milterManagerApply", check=_attribute, doc="attribute listing milters to run")
    bypass_attribute: str = setting(
        "milterManagerBypass", check=_attribute, doc="attribute listing milters to skip")
    evaluate_attribute: str = setting(
        "milterManagerEvaluate", check=_attribute, doc="attribute listing milters to evaluate")
    bypass_spam_attribute: str = setting(
        "amavisBypassSpamChecks", check=_attribute, doc="TRUE: spam_milters are bypassed")
    bypass_virus_attribute: str = setting(
        "amavisBypassVirusChecks", check=_attribute, doc="TRUE: virus_milters are bypassed")
    spam_lover_attribute: str = setting(
        "amavisSpamLover", check=_attribute, doc="TRUE: spam_milters only evaluate")
    recipient_delimiter: str = setting(
        "+", check=_delimiter, doc="characters starting an address extension; \"\": none")
    threads: int = setting(4, check=_threads, doc="searches run at once (the thread pool's size)")
    calls: list = field(default_factory=list, repr=False, compare=False)
    origins: dict = field(default_factory=dict, repr=False, compare=False)
    # Read from bind_password_file and tls_ca_file when assigned; never shown.
    password: str | None = field(default=None, repr=False, compare=False)
    ca_data: str | None = field(default=None, repr=False, compare=False)
    lookups: object = field(default=None, repr=False, compare=False)  # a PolicyLookup once started
    _source: object = field(default=None, repr=False, compare=False)

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        if name == "bind_password_file":
            text = _read(value)
            object.__setattr__(self, "password", None if text is None else
                               text.split("\n", 1)[0].rstrip("\r"))
        elif name == "tls_ca_file":
            object.__setattr__(self, "ca_data", _read(value))

    # ------------------------------------------------------------ checks

    def governed(self, configuration):
        """The enabled milters that list the LDAP Policy condition, in order."""
        return [milter for milter in configuration.milters
                if milter.enabled and CONDITION in milter.applicable_conditions]

    def problems(self, configuration):
        """(errors, warnings) only the whole configuration shows: ConfigurationErrors, lines."""
        errors, warnings = [], []
        governed = self.governed(configuration)
        where = self.origins.get

        def error(name, text, location=None):
            errors.append(ConfigurationError(text, location or where(name)))

        if not self.uris:
            for milter in governed:
                error(None, f'milter "{milter.name}": lists {CONDITION}, but ldap.uris is empty: '
                            f"set the LDAP servers policies are read from",
                      milter.origins.get("applicable_conditions"))
            return errors, warnings
        if not governed:
            warnings.append(located(where("uris"), f"ldap.uris is set, but no enabled milter "
                                                     f"lists the {CONDITION} condition: LDAP is "
                                                     f"never asked"))
        if not self.base:
            error("uris", "ldap.base is required with ldap.uris (the DN searched under)")
        else:
            try:
                Query(self.filter, self.base)
            except QueryError as problem:
                error("base", f"ldap.{problem}")
        if (self.bind_dn is None) != (self.bind_password_file is None):
            error("bind_dn" if self.bind_dn is not None else "bind_password_file",
                  "ldap.bind_dn and ldap.bind_password_file go together (None and None: "
                  "an anonymous bind)")
        ldaps = [uri for uri in self.uris if uri.lower().startswith("ldaps://")]
        if self.start_tls and ldaps:
            error("start_tls", f"ldap.start_tls is for ldap:// URIs; {ldaps[0]} uses TLS "
                               f"from the start")
        if self.tls_ca_file is not None and not ldaps and not self.start_tls:
            error("tls_ca_file", "ldap.tls_ca_file has no effect without TLS: use ldaps:// "
                                 "URIs or ldap.start_tls = True")
        if self.negative_cache_ttl > self.cache_ttl:
            error("negative_cache_ttl" if "negative_cache_ttl" in self.origins else "cache_ttl",
                  f"ldap.negative_cache_ttl ({self.negative_cache_ttl:g} s) must not be longer "
                  f"than ldap.cache_ttl ({self.cache_ttl:g} s)")
        defined = {milter.name for milter in configuration.milters}
        for name in ("spam_milters", "virus_milters", "default_apply", "default_bypass",
                     "default_evaluate"):
            unknown = [each for each in getattr(self, name) if each not in defined]
            if unknown:
                error(name, f"ldap.{name} names {unknown[0]!r}, which is no milter defined "
                            f"here (defined: {', '.join(sorted(defined)) or 'none'})")
        for milter in governed:
            if self.timeout >= milter.reading_timeout:
                error("timeout", f"ldap.timeout ({self.timeout:g} s) must be shorter than the "
                                 f'reading_timeout ({milter.reading_timeout:g} s) of milter '
                                 f'"{milter.name}", which waits for the policy',
                      None if "timeout" in self.origins
                      else milter.origins.get("reading_timeout"))
        return errors, warnings

    # ------------------------------------------------------------ running

    def _source_settings(self):
        return (tuple(self.uris), self.bind_dn, self.password, self.ca_data, self.start_tls,
                self.timeout, self.scope, self.threads)

    def start(self, configuration, reactor, previous=None, source=None):
        """Make the lookups; reuse previous's (an LDAPConfig) connections if they match.

        source: an IPolicySource to search instead of ldap.uris (tests, other
        directories). Does nothing when no enabled milter lists the condition.
        """
        if self.lookups is not None:
            return
        used = bool(self.uris and self.governed(configuration))
        if previous is not None and previous._source is not None:
            kept, previous._source = previous._source, None
            if used and source is None and previous._source_settings() == self._source_settings():
                source = kept
            else:
                # Sessions begun before the reload may still ask it for a while.
                reactor.callLater(RETIRE_AFTER, _stop_in_thread, kept)
        if not used:
            return
        if source is None:
            source = LDAPSource(self, reactor)
            source.start()
        self._source = source
        on_error = OnError.parse(self.on_error)
        cache = PolicyCache(reactor, self.cache_ttl, self.negative_cache_ttl, on_error.stale_for)
        attributes = Attributes(self.apply_attribute, self.bypass_attribute,
                                self.evaluate_attribute, self.bypass_spam_attribute,
                                self.bypass_virus_attribute, self.spam_lover_attribute)
        defaults = Defaults(tuple(self.default_apply), tuple(self.default_bypass),
                            tuple(self.default_evaluate), tuple(self.spam_milters),
                            tuple(self.virus_milters))
        self.lookups = PolicyLookup(
            source, Query(self.filter, self.base), attributes, defaults, cache, reactor,
            self.timeout, on_error, self.recipient_delimiter,
            [milter.name for milter in configuration.milters], self.uris)

    def stop(self):
        """Stop the searches' threads and close the connections (at the service's end)."""
        source, self._source = self._source, None
        if source is not None:
            source.stop()

    # ------------------------------------------------------------ the condition's stoppers

    def bypassed(self, context, recipient):
        """RCPT: whether the child misses this recipient (bypassed, or refused by the manager).

        Sets the child's evaluation mode for this recipient's RCPT.
        """
        gate = context.policy
        if gate is None:
            return False
        decision = gate.current()
        if isinstance(decision, defer.Deferred):
            return decision.addCallback(_misses, context)
        return _misses(decision, context)

    def evaluated(self, context, sender, recipients):
        """DATA: the child only evaluates the message when every recipient it has says so."""
        gate = context.policy
        if gate is not None:
            states = [gate.state(recipient, context.name) for recipient in recipients]
            context.evaluation_mode = bool(states) and all(
                state is State.EVALUATE for state in states)
        return False


def _misses(decision, context):
    if decision is None:
        return False  # no RCPT went through the gate: nothing to decide
    if decision.refusal is not None:
        return True
    state = decision.policy.state(context.name)
    if state is State.BYPASS:
        return True
    context.evaluation_mode = state is State.EVALUATE
    return False


def _stop_in_thread(source):
    return threads.deferToThread(source.stop).addErrback(lambda failure: None)


def _read(path):
    """The text of a password or CA file, or None."""
    if path is None:
        return None
    with open(path, encoding="utf-8", errors="surrogateescape") as secret:
        return secret.read()
