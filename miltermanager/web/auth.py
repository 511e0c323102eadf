"""Web users, their passwords and their logins.

The password file (web.password_file) has one user per line:

    NAME:ROLE:scrypt$N$r$p$SALT$HASH

ROLE is "admin" (may change the configuration) or "read-only"; SALT and
HASH are base64 (hashlib.scrypt, 16 bytes of salt, 32 of hash). Lines
starting with # and blank lines are skipped. The file is read again when
it changed (size or time), so `milter-manager-ctl passwd` needs no reload.

A login is a random session id in an HttpOnly, SameSite=Strict cookie
(Secure under TLS) and a CSRF token of its own; it ends after
web.session_timeout seconds without a request, or at logout.

Wrong passwords are counted per client address (RateLimiter): after
LIMIT of them within WINDOW seconds the address is refused without a
check until the window passes. HTTP basic auth (for /metrics) counts in
the same limit; a good basic-auth check is remembered for CACHE_SECONDS
under a keyed hash of the name and password, never the password itself.
"""

import base64
import collections
import hashlib
import hmac
import os
import secrets
import tempfile

from twisted.logger import Logger

ROLES = ("admin", "read-only")
COOKIE = b"milter_manager_session"
# scrypt's cost: 2**14 * 8 * 128 bytes = 16 MiB and about 50 ms a check on this class of machine.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
LIMIT = 5  # wrong passwords from one address ...
WINDOW = 60  # ... within this many seconds; the next attempt is refused
MAX_ADDRESSES = 10000  # addresses remembered by the rate limiter at most
CACHE_SECONDS = 60  # a good basic-auth check spares scrypt for this long
MAX_CACHED = 256


class PasswordFileError(Exception):
    """The password file cannot be read or has a bad line (the text says which)."""


class User:
    __slots__ = ("name", "role")

    def __init__(self, name, role):
        self.name = name
        self.role = role

    @property
    def is_admin(self):
        return self.role == "admin"

    def __repr__(self):
        return f"User({self.name!r}, {self.role!r})"


def hash_password(password, salt=None):
    """The password file's hash text of password (a str)."""
    salt = os.urandom(16) if salt is None else salt
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R,
                            p=SCRYPT_P, maxmem=64 * 1024 * 1024, dklen=32)
    return (f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}$"
            f"{base64.b64encode(salt).decode('ascii')}${base64.b64encode(digest).decode('ascii')}")


def verify_password(password, stored):
    """Whether password matches the stored hash text (False for a malformed one)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest, validate=True)
        actual = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt, validate=True),
                                n=int(n), r=int(r), p=int(p), maxmem=64 * 1024 * 1024,
                                dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def check_name(name):
    """name if it can be a user name (no colon, no space, no control), else ValueError."""
    if not name or len(name) > 64 or any(char in ":#" or char.isspace() or not char.isprintable()
                                         for char in name):
        raise ValueError(f"a user name is 1 to 64 printable characters without spaces, "
                         f"':' or '#': {name!r}")
    return name


def read_users(path):
    """{name: (role, hash text)} from the password file at path; PasswordFileError if bad."""
    try:
        with open(path, encoding="utf-8") as stream:
            lines = stream.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise PasswordFileError(f"{path}: {getattr(error, 'strerror', None) or error}") from None
    users = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(":", 2)
        if len(parts) != 3 or parts[1] not in ROLES or not parts[2].startswith("scrypt$"):
            raise PasswordFileError(f"{path}:{number}: not NAME:ROLE:scrypt$... with ROLE "
                                    f"{' or '.join(ROLES)}")
        try:
            check_name(parts[0])
        except ValueError as error:
            raise PasswordFileError(f"{path}:{number}: {error}") from None
        users[parts[0]] = (parts[1], parts[2])
    return users


def add_user(path, name, password, role="admin"):
    """Add or replace user name in the password file at path (created 0600), atomically."""
    check_name(name)
    if role not in ROLES:
        raise ValueError(f"the role is {' or '.join(ROLES)}, not {role!r}")
    if not password:
        raise ValueError("the password is empty")
    users = read_users(path) if os.path.exists(path) else {}
    users[name] = (role, hash_password(password))
    _write_users(path, users)


def delete_user(path, name):
    """Remove user name from the password file at path; KeyError if it has no such user."""
    users = read_users(path)
    if name not in users:
        raise KeyError(name)
    del users[name]
    _write_users(path, users)


def _write_users(path, users):
    """Replace the file at path with users, atomically; its owner and group are kept."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        before = os.stat(path)
    except FileNotFoundError:
        before = None
    fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), 0o600)
            if before is not None and (before.st_uid, before.st_gid) != (os.geteuid(),
                                                                         os.getegid()):
                # The manager reads the file after dropping privileges: keep it readable.
                os.fchown(out.fileno(), before.st_uid, before.st_gid)
            for each, (each_role, stored) in users.items():
                out.write(f"{each}:{each_role}:{stored}\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


class Login:
    __slots__ = ("user", "csrf", "last_seen")

    def __init__(self, user, csrf, last_seen):
        self.user = user
        self.csrf = csrf
        self.last_seen = last_seen


class Auth:
    """The users (read from the password file when it changed) and the logins in progress.

    settings() gives the web section in use; clock has seconds().
    """

    def __init__(self, settings, clock):
        self.settings = settings
        self.clock = clock
        self.logins = {}  # session id -> Login
        self.limiter = RateLimiter(clock)
        self._users = {}
        self._stamp = None  # (path, size, mtime) of the file _users came from
        self._cache_key = secrets.token_bytes(32)
        self._basic = {}  # keyed hash of name and password -> (name, stored hash, until)

    def users(self):
        """{name: (role, hash)}: the password file as it is now; {} without one."""
        path = self.settings().password_file
        if path is None:
            return {}
        try:
            status = os.stat(path)
        except OSError as error:
            raise PasswordFileError(f"{path}: {error.strerror}") from None
        stamp = (path, status.st_size, status.st_mtime_ns)
        if stamp != self._stamp:
            self._users = read_users(path)
            self._stamp = stamp
        return self._users

    def check(self, name, password):
        """The User if name's password is password, else None."""
        entry = self.users().get(name)
        if entry is None:
            verify_password(password, hash_password("-"))  # the same time for unknown users
            return None
        role, stored = entry
        return User(name, role) if verify_password(password, stored) else None

    def check_basic(self, name, password):
        """check(), remembering a success for CACHE_SECONDS (scrypt costs ~50 ms a scrape).

        The memory is keyed by an HMAC of name and password under a key of
        this process; a hit counts only while the user's hash in the file
        is the one it was checked against.
        """
        key = hmac.new(self._cache_key, f"{name}\0{password}".encode("utf-8"),
                       hashlib.sha256).digest()
        now = self.clock.seconds()
        cached = self._basic.get(key)
        if cached is not None:
            cached_name, stored, until = cached
            entry = self.users().get(cached_name)
            if now < until and entry is not None and entry[1] == stored:
                return User(cached_name, entry[0])
            del self._basic[key]
        user = self.check(name, password)
        if user is not None:
            if len(self._basic) >= MAX_CACHED:
                self._basic.clear()
            self._basic[key] = (name, self.users()[name][1], now + CACHE_SECONDS)
        return user

    def log_in(self, user):
        """A new session id (str) for user."""
        self._expire()
        session = secrets.token_urlsafe(32)
        self.logins[session] = Login(user, secrets.token_urlsafe(32), self.clock.seconds())
        return session

    def log_out(self, session):
        self.logins.pop(session, None)

    def login_of(self, session):
        """The Login of session id (refreshed), or None if unknown, expired or its user gone."""
        login = self.logins.get(session)
        if login is None:
            return None
        now = self.clock.seconds()
        if now - login.last_seen > self.settings().session_timeout:
            del self.logins[session]
            return None
        entry = self.users().get(login.user.name)
        if entry is None:
            del self.logins[session]
            return None
        login.user.role = entry[0]  # a role changed in the file applies at once
        login.last_seen = now
        return login

    def _expire(self):
        now, timeout = self.clock.seconds(), self.settings().session_timeout
        for session in [key for key, login in self.logins.items()
                        if now - login.last_seen > timeout]:
            del self.logins[session]


class RateLimiter:
    """Wrong passwords per client address: the (LIMIT + 1)th within WINDOW seconds is refused.

    A window starts at an address's first wrong password and lasts WINDOW
    seconds; refused() is true once LIMIT wrong passwords fell in it,
    until it ends. At most MAX_ADDRESSES addresses are remembered: ended
    windows are forgotten first, then the oldest.
    """

    log = Logger()

    def __init__(self, clock, limit=LIMIT, window=WINDOW, max_addresses=MAX_ADDRESSES):
        self.clock = clock
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        # address -> [window start, wrong passwords, refusal logged]; oldest window first
        self._windows = collections.OrderedDict()

    def __len__(self):
        return len(self._windows)

    def refused(self, address):
        """Whether address may not try a password now (logs the first refusal of a window)."""
        now = self.clock.seconds()
        self._forget(now)
        entry = self._windows.get(address)
        if entry is None or entry[1] < self.limit:
            return False
        if not entry[2]:
            entry[2] = True
            self.log.warn("[web][login][limited] {address}: {count} wrong passwords within "
                          "{window} s; its logins are refused for {left:.0f} s",
                          address=address, count=entry[1], window=self.window,
                          left=entry[0] + self.window - now)
        return True

    def retry_after(self, address):
        """Whole seconds until address may try again (0 if it may now)."""
        entry = self._windows.get(address)
        if entry is None or entry[1] < self.limit:
            return 0
        return max(0, int(entry[0] + self.window - self.clock.seconds() + 0.999))

    def failed(self, address):
        """Count one wrong password from address."""
        now = self.clock.seconds()
        self._forget(now)
        entry = self._windows.get(address)
        if entry is None:
            self._windows[address] = [now, 1, False]
            while len(self._windows) > self.max_addresses:
                self._windows.popitem(last=False)
        else:
            entry[1] += 1

    def _forget(self, now):
        windows = self._windows
        while windows:
            address, entry = next(iter(windows.items()))
            if now - entry[0] < self.window:
                break
            del windows[address]
