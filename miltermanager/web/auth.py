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
"""

import base64
import hashlib
import hmac
import os
import secrets

ROLES = ("admin", "read-only")
COOKIE = b"milter_manager_session"
# scrypt's cost: 2**14 * 8 * 128 bytes = 16 MiB and about 50 ms a check on this class of machine.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1


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
        users[parts[0]] = (parts[1], parts[2])
    return users


def add_user(path, name, password, role="admin"):
    """Add or replace user name in the password file at path (created 0600), atomically."""
    check_name(name)
    if role not in ROLES:
        raise ValueError(f"the role is {' or '.join(ROLES)}, not {role!r}")
    users = read_users(path) if os.path.exists(path) else {}
    users[name] = (role, hash_password(password))
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for each, (each_role, stored) in users.items():
                out.write(f"{each}:{each_role}:{stored}\n")
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
        self._users = {}
        self._stamp = None  # (path, size, mtime) of the file _users came from

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
