"""Greylisting state in one SQLite file and the decision taken on it for each triplet.

GreylistRules is the policy every store shares (the decision on a triplet's
Seen, the whitelist, the networks); Greylist keeps its state in SQLite,
redis_store.RedisGreylist in Redis.

Everything here blocks: each decision is one short ``BEGIN IMMEDIATE``
transaction on a connection of the calling thread. ``threaded.py`` runs it off
the reactor thread; tests call it directly with a ``task.Clock``.

Several processes (milter-manager workers, several greylist milters on one
host) may share the file: it is in WAL mode, every connection waits up to
``busy_timeout`` seconds for the write lock, and a decision reads and writes
its rows in one transaction, so two processes never both let a first attempt
through. ``synchronous=NORMAL`` (safe in WAL mode) spares an fsync per
decision; a power cut may forget the last few triplets, which only means
those senders are greylisted once more.
"""

import enum
import ipaddress
import math
import sqlite3
import threading
from dataclasses import dataclass

from zope.interface import implementer

from .interfaces import IGreylist

DEFAULT_DELAY = 300
DEFAULT_RETRY_WINDOW = 4 * 3600
DEFAULT_EXPIRY = 36 * 86400
DEFAULT_AUTO_WHITELIST = 5
DEFAULT_WHITELIST = ("127.0.0.0/8", "::1/128")
DEFAULT_IPV4_PREFIX = 24
DEFAULT_IPV6_PREFIX = 64
DEFAULT_BUSY_TIMEOUT = 5.0
# Purging deletes this many rows per transaction, so that a large purge never
# holds the write lock long enough to stall the decisions of other processes.
PURGE_BATCH = 500
# Longer addresses are not mail addresses (RFC 5321 allows 256 octets for a path).
MAX_ADDRESS_LENGTH = 512

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS triplets (
    network TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    first_seen REAL NOT NULL,
    -- pending: equal to first_seen, passed: the last time it let a message through
    last_seen REAL NOT NULL,
    passed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (network, sender, recipient)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS triplets_age ON triplets (passed, last_seen);
CREATE TABLE IF NOT EXISTS auto_whitelist (
    network TEXT PRIMARY KEY,
    since REAL NOT NULL,
    last_seen REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS auto_whitelist_age ON auto_whitelist (last_seen);
"""


class BadInput(ValueError):
    """An address the greylist cannot judge; the milter lets such mail pass."""


class StoreError(Exception):
    """A store other than SQLite failed: unreachable, timed out, read-only, ... (fail open)."""


# What a failing store raises: the milter passes the recipient and counts a database error.
STORE_ERRORS = (sqlite3.Error, StoreError)


class Reason(enum.Enum):
    """Why a triplet passed or was greylisted."""

    WHITELISTED = "whitelisted"  # the client is in a --whitelist network
    AUTO_WHITELISTED = "auto-whitelisted"  # its network passed enough triplets
    NEW = "new"  # first seen now (or again, after its retry window or expiry)
    EARLY = "early"  # seen before, but the delay has not passed yet
    RETRIED = "retried"  # retried after the delay, within the retry window: passes
    KNOWN = "known"  # passed before and not expired: passes


@dataclass(frozen=True, slots=True)
class Triplet:
    """What greylisting keys on: client network, sender and recipient, normalised."""

    network: str
    sender: str
    recipient: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision for one triplet.

    remaining: for a greylisted triplet, whole seconds until a retry passes.
    delayed: for Reason.RETRIED, the seconds since the triplet was first seen.
    """

    passed: bool
    reason: Reason
    remaining: int = 0
    delayed: float = 0.0


@dataclass(frozen=True, slots=True)
class Seen:
    """What a store keeps of one triplet.

    first_seen: when its current greylisting started; last_seen: for a
    passed triplet, the last time it let a message through (for a pending
    one, equal to first_seen).
    """

    first_seen: float
    last_seen: float
    passed: bool


def normalize_address(address):
    """An envelope address as the greylist keys it: lower-case, no <>, no spaces around.

    Takes the bytes an MTA sent (or a str). ``<>`` becomes "". Raises
    BadInput for control characters or an address over MAX_ADDRESS_LENGTH.
    Bytes that are not UTF-8 are kept readable as backslash escapes.
    """
    if address is None:
        raise BadInput("no address")
    if isinstance(address, bytes):
        address = address.decode("utf-8", "backslashreplace")
    if len(address) > MAX_ADDRESS_LENGTH:
        raise BadInput(f"address of {len(address)} characters")
    text = address.strip()
    if text.startswith("<"):
        text = text[1:]
    if text.endswith(">"):
        text = text[:-1]
    text = text.strip()
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        raise BadInput(f"control character in address {address!r}")
    return text.lower()


def normalize_recipient(recipient):
    """normalize_address, and an empty recipient is BadInput (the null sender is fine)."""
    text = normalize_address(recipient)
    if not text:
        raise BadInput("empty recipient")
    return text


def parse_address(address):
    """An ipaddress object for a connect address (bytes or str); BadInput if it is none.

    An IPv4-mapped IPv6 address (::ffff:192.0.2.1) is its IPv4 address; a
    scope (%eth0) is dropped.
    """
    if isinstance(address, bytes):
        address = address.decode("ascii", "replace")
    text = address.strip().strip("[]").partition("%")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise BadInput(f"client address {address!r} is not an IP address") from None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_networks(networks):
    """ipaddress networks for CIDR strings (host bits allowed); ValueError names a bad one."""
    parsed = []
    for network in networks:
        try:
            parsed.append(ipaddress.ip_network(network.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{network!r} is not an IPv4 or IPv6 network (CIDR)") from None
    return tuple(parsed)


class GreylistRules:
    """The greylisting policy, apart from where its state is kept.

    clock provides seconds() (IReactorTime; a task.Clock in tests). Times are
    in seconds: delay before a retry passes, retry_window after the delay in
    which it must come, expiry of a passed triplet and of an auto-whitelisted
    network after their last use. auto_whitelist is the number of passed
    triplets after which their network passes without greylisting (0: never).

    A store (Greylist here, redis_store.RedisGreylist) reads a triplet's Seen,
    asks judge() and writes back what it answers, in one atomic step.
    """

    def __init__(self, clock, *, delay=DEFAULT_DELAY, retry_window=DEFAULT_RETRY_WINDOW,
                 expiry=DEFAULT_EXPIRY, auto_whitelist=DEFAULT_AUTO_WHITELIST,
                 whitelist=DEFAULT_WHITELIST, ipv4_prefix=DEFAULT_IPV4_PREFIX,
                 ipv6_prefix=DEFAULT_IPV6_PREFIX):
        if not 0 <= ipv4_prefix <= 32:
            raise ValueError(f"IPv4 prefix {ipv4_prefix} is not within 0..32")
        if not 0 <= ipv6_prefix <= 128:
            raise ValueError(f"IPv6 prefix {ipv6_prefix} is not within 0..128")
        for name, value in (("delay", delay), ("retry window", retry_window),
                            ("expiry", expiry), ("auto-whitelist", auto_whitelist)):
            if value < 0:
                raise ValueError(f"{name} {value} is negative")
        self.clock = clock
        self.delay = delay
        self.retry_window = retry_window
        self.expiry = expiry
        self.auto_whitelist = auto_whitelist
        self.whitelist = parse_networks(whitelist)
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix

    # ------------------------------------------------------------ the client

    def is_whitelisted(self, address):
        """Is the client at address (bytes or str) in a whitelisted network? BadInput if odd."""
        ip = parse_address(address)
        return any(ip in network for network in self.whitelist)

    def client_network(self, address):
        """The network a client address is greylisted as, e.g. "192.0.2.0/24"; BadInput if odd."""
        ip = parse_address(address)
        prefix = self.ipv4_prefix if ip.version == 4 else self.ipv6_prefix
        return str(ipaddress.ip_network((ip, prefix), strict=False))

    def triplet(self, address, sender, recipient):
        """The normalised Triplet for raw connect address, sender and recipient; BadInput if odd."""
        return Triplet(self.client_network(address), normalize_address(sender),
                       normalize_recipient(recipient))

    def check(self, address, sender, recipient):
        """Decide for raw values, whitelist included; a Verdict. Blocks."""
        if self.is_whitelisted(address):
            return Verdict(True, Reason.WHITELISTED)
        return self.decide(self.triplet(address, sender, recipient))

    def decide(self, triplet, now=None):
        """Decide on a Triplet and record it, atomically; a Verdict. Blocks.

        Each store implements it: read the triplet's Seen, judge() it, write
        back the Seen judge() answers. now defaults to clock.seconds().
        """
        raise NotImplementedError

    # ------------------------------------------------------------ the decision

    def judge(self, seen, now):
        """(Verdict, the Seen to store or None to leave it) for a triplet's Seen (None: unknown)."""
        if seen is None:
            return self._greylisted(Reason.NEW, 0.0), Seen(now, now, False)
        if seen.passed and now - seen.last_seen <= self.expiry:
            return Verdict(True, Reason.KNOWN), Seen(seen.first_seen, now, True)
        age = now - seen.first_seen
        if not seen.passed and age < self.delay:
            return self._greylisted(Reason.EARLY, age), None
        if not seen.passed and age <= self.delay + self.retry_window:
            return Verdict(True, Reason.RETRIED, delayed=age), Seen(seen.first_seen, now, True)
        # Retried too late, or passed but expired: it starts over.
        return self._greylisted(Reason.NEW, 0.0), Seen(now, now, False)

    def forget_after(self, seen):
        """The time after which seen can no longer change a decision (purge or expire it)."""
        if seen.passed:
            return seen.last_seen + self.expiry
        return seen.first_seen + self.delay + self.retry_window

    def network_whitelisted(self, last_seen, now):
        """Is an auto-whitelisted network last used at last_seen still whitelisted at now?"""
        return now - last_seen <= self.expiry

    def earns_auto_whitelist(self, passed):
        """Does a network with this many unexpired passed triplets get auto-whitelisted?"""
        return bool(self.auto_whitelist) and passed >= self.auto_whitelist

    def _greylisted(self, reason, age):
        return Verdict(False, reason, remaining=max(0, math.ceil(self.delay - age)))


@implementer(IGreylist)
class Greylist(GreylistRules):
    """The greylisting policy (GreylistRules) and its state in an SQLite file.

    Each thread gets its own connection; decide and purge may run in any
    number of threads and processes at once.
    """

    def __init__(self, path, clock, *, busy_timeout=DEFAULT_BUSY_TIMEOUT, **settings):
        super().__init__(clock, **settings)
        self.path = path
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._connections = []
        self._lock = threading.Lock()
        self._closed = False
        self._create_schema()

    # ------------------------------------------------------------ the state

    def decide(self, triplet, now=None):
        """Decide on a Triplet in one transaction and record it; a Verdict. Blocks.

        now defaults to clock.seconds(). Raises sqlite3.Error when the
        database fails (locked longer than busy_timeout, unreadable, ...).
        """
        if now is None:
            now = self.clock.seconds()
        with self._transaction() as db:
            if self.auto_whitelist and self._auto_whitelisted(db, triplet.network, now):
                return Verdict(True, Reason.AUTO_WHITELISTED)
            key = (triplet.network, triplet.sender, triplet.recipient)
            row = db.execute(
                "SELECT first_seen, last_seen, passed FROM triplets"
                " WHERE network = ? AND sender = ? AND recipient = ?", key).fetchone()
            verdict, seen = self.judge(None if row is None else Seen(row[0], row[1], bool(row[2])),
                                       now)
            if seen is not None:
                db.execute("INSERT INTO triplets (network, sender, recipient, first_seen,"
                           " last_seen, passed) VALUES (?, ?, ?, ?, ?, ?)"
                           " ON CONFLICT (network, sender, recipient) DO UPDATE SET"
                           " first_seen = excluded.first_seen, last_seen = excluded.last_seen,"
                           " passed = excluded.passed",
                           (*key, seen.first_seen, seen.last_seen, int(seen.passed)))
            if verdict.reason is Reason.RETRIED and self.auto_whitelist:
                self._count_for_auto_whitelist(db, triplet.network, now)
            return verdict

    def _auto_whitelisted(self, db, network, now):
        row = db.execute("SELECT last_seen FROM auto_whitelist WHERE network = ?",
                         (network,)).fetchone()
        if row is None or not self.network_whitelisted(row[0], now):
            return False
        db.execute("UPDATE auto_whitelist SET last_seen = ? WHERE network = ?", (now, network))
        return True

    def _count_for_auto_whitelist(self, db, network, now):
        (count,) = db.execute(
            "SELECT COUNT(*) FROM triplets WHERE network = ? AND passed = 1 AND last_seen >= ?",
            (network, now - self.expiry)).fetchone()
        if self.earns_auto_whitelist(count):
            db.execute("INSERT INTO auto_whitelist (network, since, last_seen) VALUES (?, ?, ?)"
                       " ON CONFLICT (network) DO UPDATE SET since = excluded.since,"
                       " last_seen = excluded.last_seen", (network, now, now))

    def purge(self, now=None):
        """Delete what can no longer change a decision; return the number of rows. Blocks.

        Pending triplets older than delay + retry window, passed triplets and
        auto-whitelisted networks unused for longer than the expiry. Works in
        batches of PURGE_BATCH rows, one transaction each.
        """
        if now is None:
            now = self.clock.seconds()
        statements = (
            ("DELETE FROM triplets WHERE (network, sender, recipient) IN"
             " (SELECT network, sender, recipient FROM triplets"
             " WHERE passed = 0 AND last_seen < ? LIMIT ?)",
             now - self.delay - self.retry_window),
            ("DELETE FROM triplets WHERE (network, sender, recipient) IN"
             " (SELECT network, sender, recipient FROM triplets"
             " WHERE passed = 1 AND last_seen < ? LIMIT ?)", now - self.expiry),
            ("DELETE FROM auto_whitelist WHERE network IN"
             " (SELECT network FROM auto_whitelist WHERE last_seen < ? LIMIT ?)",
             now - self.expiry),
        )
        total = 0
        for statement, before in statements:
            while True:
                with self._transaction() as db:
                    deleted = db.execute(statement, (before, PURGE_BATCH)).rowcount
                total += deleted
                if deleted < PURGE_BATCH:
                    break
        return total

    def counts(self):
        """(pending triplets, passed triplets, auto-whitelisted networks), for logs and tests."""
        db = self._connection()
        rows = dict(db.execute("SELECT passed, COUNT(*) FROM triplets GROUP BY passed"))
        (networks,) = db.execute("SELECT COUNT(*) FROM auto_whitelist").fetchone()
        return rows.get(0, 0), rows.get(1, 0), networks

    def close(self):
        """Close every thread's connection; call it once no thread uses the store any more."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()

    # ------------------------------------------------------------ SQLite

    def _connection(self):
        db = getattr(self._local, "db", None)
        if db is None:
            with self._lock:
                if self._closed:
                    raise sqlite3.ProgrammingError("the greylist store is closed")
                # isolation_level=None: we write BEGIN IMMEDIATE ourselves.
                # check_same_thread=False only so that close() may close it.
                db = sqlite3.connect(self.path, timeout=self.busy_timeout,
                                     isolation_level=None, check_same_thread=False)
                self._connections.append(db)
            try:
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")
            except sqlite3.Error:
                with self._lock:
                    self._connections.remove(db)
                db.close()
                raise
            self._local.db = db
        return db

    def _transaction(self):
        return _Transaction(self._connection())

    def _create_schema(self):
        with self._transaction() as db:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"{self.path}: schema version {version} is newer than this "
                    f"program's ({SCHEMA_VERSION})")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK when the block raises."""

    __slots__ = ("db",)

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, value, traceback):
        if kind is None:
            try:
                self.db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        else:
            self._rollback()
        return False

    def _rollback(self):
        if self.db.in_transaction:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the error being raised says more than this one
