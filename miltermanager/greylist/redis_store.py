"""Greylisting state in Redis, shared by the greylist milters of several MX hosts.

The decision is store.GreylistRules.judge, as for SQLite; only the keeping
differs. Each decision is one optimistic transaction: WATCH the triplet's
keys, read them, judge, then MULTI/EXEC the writes. When another host
changed a watched key in between, EXEC fails and the decision is taken again
on what that host wrote, so two hosts never both let a first attempt through
nor both start a triplet's delay.

Keys (PREFIX is "greylist:" unless the URL's prefix says otherwise), each
expiring once it can no longer change a decision (no purge job):

  PREFIX triplet:NETWORK \\0 SENDER \\0 RECIPIENT   hash: first_seen, last_seen, passed
  PREFIX passed:NETWORK                            sorted set: SENDER \\0 RECIPIENT by last use
  PREFIX network:NETWORK                           string: last use of an auto-whitelisted network

Times are the deciding host's clock (keep the hosts on NTP); a key's time to
live is counted by the Redis server and outlives its last use by TTL_SLACK.

Everything blocks (redis-py's blocking client, with socket timeouts);
threaded.ThreadedGreylist runs it off the reactor thread. redis is imported
only when a store is built, so that parse_url works without it.

Through Sentinel, a failover moves the master; SentinelMaster and decide
make sure that no pooled connection keeps writing to the old one.
"""

import threading
import time
import urllib.parse
from dataclasses import dataclass, field

from zope.interface import implementer

from .interfaces import IGreylist
from .store import GreylistRules, Reason, Seen, StoreError, Verdict

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_PREFIX = "greylist:"
DEFAULT_TIMEOUT = 1.0
# Keys live this much longer than their use, so that hosts whose clocks differ
# by less never see a key vanish that their own clock still counts as live.
TTL_SLACK = 60
# Taking a decision again after another host changed the triplet under it:
# a few times at most, since each retry reads what that host wrote.
MAX_ATTEMPTS = 10
SCAN_BATCH = 1000
# How often, at most, decide asks the Sentinels where the master is (see SentinelMaster).
MASTER_CHECK_INTERVAL = 1.0
_SEPARATOR = "\0"
SCHEMES = ("redis", "rediss", "unix", "sentinel")


@dataclass(frozen=True)
class StoreURL:
    """A parsed --store URL (see parse_url); text is it with the password hidden."""

    scheme: str
    text: str
    url: str = ""  # for redis, rediss and unix: what redis-py's from_url reads
    sentinels: tuple = ()  # for sentinel: ((host, port), ...)
    master: str = ""
    db: int = 0
    password: str = field(default=None, repr=False)
    prefix: str = DEFAULT_PREFIX
    timeout: float = DEFAULT_TIMEOUT


def parse_url(text):
    """A StoreURL for a --store value; ValueError says what is wrong with it.

    redis://[:PASSWORD@]HOST[:PORT][/DB], rediss://... (TLS), unix://PATH[?db=DB],
    sentinel://[:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER[/DB]; each may end
    with ?prefix=KEYPREFIX&timeout=SECONDS. The password is the data servers'.
    """
    parts = urllib.parse.urlsplit(text.strip())
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"{text!r}: expected a URL starting redis://, rediss://, unix:// or "
                         "sentinel://")
    try:
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=True) \
            if parts.query else {}
    except ValueError:
        raise ValueError(f"{text!r}: unreadable query {parts.query!r}") from None
    unknown = sorted(set(query) - {"prefix", "timeout", "db"})
    if unknown:
        raise ValueError(f"{text!r}: unknown parameter {unknown[0]!r} (known: prefix, timeout, "
                         "db)")
    prefix = query.pop("prefix", [DEFAULT_PREFIX])[-1]
    timeout = _number(query.pop("timeout", [str(DEFAULT_TIMEOUT)])[-1], text, "timeout")
    if not timeout > 0:
        raise ValueError(f"{text!r}: timeout must be more than 0 seconds")
    hidden = _hide_password(parts)
    if "db" in query and scheme != "unix":
        raise ValueError(f"{text!r}: give the database as the path (/DB), not ?db=")
    if scheme == "sentinel":
        return _parse_sentinel(parts, text, hidden, prefix, timeout)
    if scheme == "unix":
        if not parts.path:
            raise ValueError(f"{text!r}: no socket path")
        db = _db(query.pop("db", ["0"])[-1], text)
    else:
        if not parts.hostname:
            raise ValueError(f"{text!r}: no host")
        _port(parts, text, DEFAULT_PORT)
        db = _db(parts.path.strip("/") or "0", text)
    # redis-py reads the rest (host, port, password, TLS); our own parameters stay ours.
    url = f"{scheme}://{parts.netloc}{parts.path}" + (f"?db={db}" if scheme == "unix" else "")
    return StoreURL(scheme, hidden, url=url, db=db, prefix=prefix, timeout=timeout,
                    password=_password(parts))


def _parse_sentinel(parts, text, hidden, prefix, timeout):
    userinfo, _, hosts = parts.netloc.rpartition("@")
    sentinels = []
    for item in hosts.split(","):
        piece = urllib.parse.urlsplit(f"//{item}")
        if not piece.hostname:
            raise ValueError(f"{text!r}: empty sentinel address in {hosts!r}")
        sentinels.append((piece.hostname, _port(piece, text, DEFAULT_SENTINEL_PORT)))
    path = [segment for segment in parts.path.split("/") if segment]
    if not 1 <= len(path) <= 2:
        raise ValueError(f"{text!r}: expected /MASTERNAME or /MASTERNAME/DB after the sentinels")
    db = _db(path[1] if len(path) == 2 else "0", text)
    password = urllib.parse.unquote(userinfo.partition(":")[2]) if ":" in userinfo else None
    return StoreURL("sentinel", hidden, sentinels=tuple(sentinels),
                    master=urllib.parse.unquote(path[0]), db=db, password=password or None,
                    prefix=prefix, timeout=timeout)


def _number(value, text, name):
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{text!r}: {name} {value!r} is not a number") from None


def _db(value, text):
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"{text!r}: database {value!r} is not a whole number")
    return int(value)


def _port(parts, text, default):
    try:
        return parts.port or default
    except ValueError:
        raise ValueError(f"{text!r}: bad port in {parts.netloc!r}") from None


def _password(parts):
    userinfo = parts.netloc.rpartition("@")[0]
    return urllib.parse.unquote(userinfo.partition(":")[2]) if ":" in userinfo else None


def _hide_password(parts):
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if ":" in userinfo:
        userinfo = userinfo.partition(":")[0] + ":***"
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{userinfo}{at}{hosts}{parts.path}{query}"


def connect(store_url):
    """A blocking redis-py client for a StoreURL (ImportError without redis-py).

    Connection and socket timeouts are the URL's timeout, for the Sentinels
    as well; redis-py never retries on its own (RedisGreylist.decide does,
    once, on a dropped connection), so a down server costs one timeout, not
    a backoff. A sentinel:// client's connection pool asks the Sentinels for
    the master each time it opens a connection.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    settings = {"socket_timeout": store_url.timeout,
                "socket_connect_timeout": store_url.timeout,
                "retry": Retry(NoBackoff(), 0), "health_check_interval": 30}
    if store_url.scheme != "sentinel":
        return redis.Redis.from_url(store_url.url, **settings)
    from redis.sentinel import Sentinel

    sentinel = Sentinel(list(store_url.sentinels),
                        sentinel_kwargs={"socket_timeout": store_url.timeout,
                                         "socket_connect_timeout": store_url.timeout},
                        socket_timeout=store_url.timeout)
    return sentinel.master_for(store_url.master, db=store_url.db, password=store_url.password,
                               **settings)


class SentinelMaster:
    """Where the Sentinels say the master is, asked again at most every interval seconds.

    redis-py asks the Sentinels only when it opens a connection. After a
    failover with the old master still up (SENTINEL FAILOVER, a partition),
    the old master accepts writes until the Sentinel reconfigures it, some
    10 s later; pooled connections would keep writing there, and what they
    wrote is lost when it turns replica. RedisGreylist.decide compares each
    connection with address() and drops those that point elsewhere, so a
    failover costs at most about interval seconds of such writes.
    """

    def __init__(self, sentinel, service_name, interval=MASTER_CHECK_INTERVAL,
                 monotonic=time.monotonic):
        self.sentinel = sentinel  # a redis.sentinel.Sentinel
        self.service_name = service_name
        self.interval = interval
        self.monotonic = monotonic
        self._lock = threading.Lock()
        self._address = None  # (host, port) as last named; None: unknown
        self._asked = None  # monotonic time of the last question

    def address(self, now=False):
        """The master's (host, port), or None when no Sentinel names one. May block.

        Asks the Sentinels when the last answer is older than interval, or
        now; a thread that finds another one asking takes the last answer.
        None while the master is down or being failed over, or when no
        Sentinel answers: then there is nothing to compare connections with.
        """
        import redis

        if not now and self._asked is not None and \
                self.monotonic() - self._asked < self.interval:
            return self._address
        if not self._lock.acquire(blocking=now):
            return self._address
        try:
            try:
                self._address = self.sentinel.discover_master(self.service_name)
            except redis.RedisError:  # MasterNotFoundError above all
                self._address = None
            self._asked = self.monotonic()
            return self._address
        finally:
            self._lock.release()


class _StaleConnection(Exception):
    """A pooled connection points at another server than the master the Sentinels name."""


def _connection_failure(error):
    """The ConnectionError or TimeoutError behind error, or None.

    redis-py turns a connection that fails inside a WATCH into a WatchError
    ("A ConnectionError occurred ... while watching"), raised while handling
    the real error: that is a connection failure, not another host's write.
    Through Sentinel, READONLY from a demoted master arrives as a
    ConnectionError ("The previous master is now a slave").
    """
    import redis

    if isinstance(error, redis.WatchError):
        error = error.__context__
    if isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
        return error
    return None


def _describe(error):
    """A RedisError as one line: its class (ConnectionError, ReadOnlyError, ...) and message.

    A pipeline's error quotes the command (with its keys' NUL separators):
    only the server's message is kept.
    """
    message = str(error).strip().rpartition(" of pipeline caused error: ")[2] or "no message"
    message = "".join(char if char.isprintable() else repr(char)[1:-1] for char in message)
    return f"redis {type(error).__name__}: {message}"


@dataclass(frozen=True, slots=True)
class _Keys:
    triplet: str
    passed: str
    network: str
    member: str


@implementer(IGreylist)
class RedisGreylist(GreylistRules):
    """The greylisting policy (store.GreylistRules) and its state in Redis.

    client is a blocking redis-py client (connect()); name says where it
    points in log lines; prefix starts every key; master, a SentinelMaster
    for a client through Sentinel, else None. The client's connection
    pool lets decide run in any number of threads and hosts at once. A Redis
    failure raises store.StoreError.
    """

    def __init__(self, client, clock, *, name="redis", prefix=DEFAULT_PREFIX, master=None,
                 **settings):
        super().__init__(clock, **settings)
        self.client = client
        self.name = name
        self.prefix = prefix
        self.master = master

    @classmethod
    def from_url(cls, store_url, clock, **settings):
        """A RedisGreylist on a StoreURL (parse_url); ImportError without redis-py."""
        client = connect(store_url)
        master = None
        if store_url.scheme == "sentinel":
            pool = client.connection_pool
            master = SentinelMaster(pool.sentinel_manager, pool.service_name)
        return cls(client, clock, name=store_url.text, prefix=store_url.prefix, master=master,
                   **settings)

    def keys(self, triplet):
        """The Redis keys of a Triplet (triplet, passed, network) and its member in passed."""
        member = f"{triplet.sender}{_SEPARATOR}{triplet.recipient}"
        return _Keys(f"{self.prefix}triplet:{triplet.network}{_SEPARATOR}{member}",
                     f"{self.prefix}passed:{triplet.network}",
                     f"{self.prefix}network:{triplet.network}", member)

    def decide(self, triplet, now=None):
        """Decide on a Triplet in one WATCH/MULTI transaction and record it; a Verdict. Blocks.

        now defaults to clock.seconds(). Raises store.StoreError when Redis
        fails (unreachable, timed out, a read-only replica, ...).

        A connection that failed (the server closed it: a restart, a
        failover; or READONLY through Sentinel: a demoted master) gets one
        fresh try on a new connection, which through Sentinel asks where
        the master is now; so does a connection to a server the Sentinels
        no longer name. The idle pooled connections are closed first: they
        point where the failed one did.
        """
        import redis

        if now is None:
            now = self.clock.seconds()
        keys = self.keys(triplet)
        dropped = False
        for _ in range(MAX_ATTEMPTS):
            try:
                with self.client.pipeline() as pipe:
                    return self._decide(pipe, keys, now)
            except _StaleConnection:
                self._close_idle()
            except redis.RedisError as error:
                failure = _connection_failure(error)
                if failure is None and isinstance(error, redis.WatchError):
                    continue  # another host changed the triplet: decide on what it wrote
                if not isinstance(failure, redis.ConnectionError) or dropped:
                    raise StoreError(_describe(failure or error)) from error
                dropped = True
                self._close_idle()
        raise StoreError(f"the triplet changed under {MAX_ATTEMPTS} attempts in a row")

    def _close_idle(self):
        """Close the pool's idle connections (redis-py reconnects them when used)."""
        self.client.connection_pool.disconnect(inuse_connections=False)

    def _decide(self, pipe, keys, now):
        """One attempt: WATCH, read, judge, MULTI/EXEC (WatchError when another host won)."""
        pipe.watch(keys.triplet, keys.passed, keys.network)
        if self.master is not None:
            self._check_master(pipe.connection)
        self._read(pipe, keys)
        if self.auto_whitelist:
            last_seen = pipe.get(keys.network)
            if last_seen is not None and self.network_whitelisted(float(last_seen), now):
                pipe.multi()
                pipe.set(keys.network, repr(now), px=self._ttl(now + self.expiry, now))
                pipe.execute()
                return Verdict(True, Reason.AUTO_WHITELISTED)
        fields = pipe.hgetall(keys.triplet)
        seen = None
        if fields:
            seen = Seen(float(fields[b"first_seen"]), float(fields[b"last_seen"]),
                        fields[b"passed"] == b"1")
        verdict, new = self.judge(seen, now)
        if new is None:
            pipe.unwatch()
            return verdict
        passed = None
        if verdict.reason is Reason.RETRIED and self.auto_whitelist:
            # This triplet counts once passed; its own old score, if any, is expired.
            passed = pipe.zcount(keys.passed, now - self.expiry, "+inf") + 1
        pipe.multi()
        pipe.hset(keys.triplet, mapping={"first_seen": repr(new.first_seen),
                                         "last_seen": repr(new.last_seen),
                                         "passed": "1" if new.passed else "0"})
        pipe.pexpire(keys.triplet, self._ttl(self.forget_after(new), now))
        if new.passed:
            pipe.zadd(keys.passed, {keys.member: new.last_seen})
            pipe.zremrangebyscore(keys.passed, "-inf", f"({now - self.expiry!r}")
            pipe.pexpire(keys.passed, self._ttl(now + self.expiry, now))
        if passed is not None and self.earns_auto_whitelist(passed):
            pipe.set(keys.network, repr(now), px=self._ttl(now + self.expiry, now))
        pipe.execute()
        return verdict

    def _check_master(self, connection):
        """Raise _StaleConnection if connection is not to the master the Sentinels name.

        A mismatch with the last answer is asked again at once: the
        connection may be newer than the answer (opened after a failover).
        """
        where = (connection.host, connection.port)
        named = self.master.address()
        if named is not None and named != where:
            named = self.master.address(now=True)
            if named is not None and named != where:
                raise _StaleConnection(f"{where} is not the master {named}")

    def _read(self, pipe, keys):
        """Called between WATCH and the reads (a seam for tests that race two hosts)."""

    @staticmethod
    def _ttl(until, now):
        """Milliseconds a key lives: until its last useful moment, plus TTL_SLACK."""
        return max(1, int((until - now + TTL_SLACK) * 1000))

    def purge(self, now=None):
        """Nothing to do: every key expires in Redis. 0 (rows deleted), as Greylist.purge."""
        return 0

    def counts(self):
        """(pending triplets, passed triplets, auto-whitelisted networks): SCANs the keys. Blocks.

        Walks every key of the prefix: fine for a scrape a minute of a few
        hundred thousand triplets; raises store.StoreError when Redis fails.
        """
        import redis

        try:
            pending = passed = 0
            batch = []
            for key in self.client.scan_iter(match=_glob(self.prefix) + "triplet:*",
                                             count=SCAN_BATCH):
                batch.append(key)
                if len(batch) == SCAN_BATCH:
                    done = self._count_passed(batch)
                    passed += done
                    pending += len(batch) - done
                    batch = []
            done = self._count_passed(batch)
            passed += done
            pending += len(batch) - done
            networks = sum(1 for _ in self.client.scan_iter(
                match=_glob(self.prefix) + "network:*", count=SCAN_BATCH))
        except redis.RedisError as error:
            raise StoreError(_describe(error)) from error
        return pending, passed, networks

    def _count_passed(self, keys):
        if not keys:
            return 0
        with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hget(key, "passed")
            return sum(1 for value in pipe.execute() if value == b"1")

    def ping(self):
        """Raise store.StoreError unless Redis answers. Blocks."""
        import redis

        try:
            self.client.ping()
        except redis.RedisError as error:
            raise StoreError(_describe(error)) from error

    def close(self):
        """Close the client's connections (a later use opens new ones)."""
        self.client.close()


def _glob(text):
    """text as a literal in a Redis MATCH pattern."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)
