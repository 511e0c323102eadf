"""Tests for the web users: scrypt hashes, the password file, logins, the rate limit, basic auth."""

import os
import stat

from twisted.internet import task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from miltermanager.config import model
from miltermanager.web import auth


def settings_of(path, timeout=3600):
    settings = model.WebConfig()
    settings.password_file = path
    settings.session_timeout = timeout
    return settings


class HashTests(unittest.SynchronousTestCase):
    def test_verify(self):
        """A hash verifies its own password only, and is salted (two hashes differ)."""
        stored = auth.hash_password("sésame")
        self.assertTrue(stored.startswith("scrypt$16384$8$1$"))
        self.assertTrue(auth.verify_password("sésame", stored))
        self.assertFalse(auth.verify_password("sesame", stored))
        self.assertNotEqual(stored, auth.hash_password("sésame"))

    def test_malformed_hash_never_matches(self):
        """A damaged hash text is a mismatch, not an exception."""
        for stored in ("", "scrypt$1$2", "md5$16384$8$1$AAAA$AAAA", "scrypt$x$8$1$AAAA$AAAA",
                       "scrypt$16384$8$1$!!!$AAAA"):
            self.assertFalse(auth.verify_password("x", stored), stored)


class PasswordFileTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.path = os.path.abspath(self.mktemp())

    def test_add_user_creates_0600_without_plain_text(self):
        """add_user creates the file mode 0600 holding the hash, never the password."""
        auth.add_user(self.path, "alice", "correct horse", "read-only")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        with open(self.path) as stream:
            text = stream.read()
        self.assertNotIn("correct horse", text)
        self.assertTrue(text.startswith("alice:read-only:scrypt$"))
        role, stored = auth.read_users(self.path)["alice"]
        self.assertEqual(role, "read-only")
        self.assertTrue(auth.verify_password("correct horse", stored))

    def test_add_user_keeps_the_others(self):
        """Adding or replacing one user leaves the other users' lines as they were."""
        auth.add_user(self.path, "alice", "a-password")
        auth.add_user(self.path, "bob", "b-password", "read-only")
        before = auth.read_users(self.path)["bob"]
        auth.add_user(self.path, "alice", "new-password")
        users = auth.read_users(self.path)
        self.assertEqual(users["bob"], before)
        self.assertTrue(auth.verify_password("new-password", users["alice"][1]))
        self.assertEqual(sorted(os.listdir(os.path.dirname(self.path))),
                         [os.path.basename(self.path)])  # no temporary file left

    def test_delete_user(self):
        """delete_user removes one user; an unknown one is a KeyError and changes nothing."""
        auth.add_user(self.path, "alice", "a-password")
        auth.add_user(self.path, "bob", "b-password")
        auth.delete_user(self.path, "alice")
        self.assertEqual(list(auth.read_users(self.path)), ["bob"])
        self.assertRaises(KeyError, auth.delete_user, self.path, "alice")

    def test_bad_input_refused(self):
        """Bad names, roles and an empty password are ValueErrors and write nothing."""
        self.assertRaises(ValueError, auth.add_user, self.path, "a:b", "x")
        self.assertRaises(ValueError, auth.add_user, self.path, "a b", "x")
        self.assertRaises(ValueError, auth.add_user, self.path, "alice", "x", "root")
        self.assertRaises(ValueError, auth.add_user, self.path, "alice", "")
        self.assertFalse(os.path.exists(self.path))

    def test_bad_lines_named_with_their_number(self):
        """A bad line is a PasswordFileError naming the file and the line."""
        good = f"alice:admin:{auth.hash_password('x')}"
        for line in ("alice:admin", "alice:root:scrypt$1", "alice:admin:md5$1",
                     "al ice:admin:scrypt$1"):
            with open(self.path, "w") as stream:
                stream.write(f"# users\n\n{good}\n{line}\n")
            error = self.assertRaises(auth.PasswordFileError, auth.read_users, self.path)
            self.assertTrue(str(error).startswith(f"{self.path}:4: "), str(error))

    def test_missing_file(self):
        """A missing file is a PasswordFileError with the system's reason."""
        error = self.assertRaises(auth.PasswordFileError, auth.read_users, self.path)
        self.assertEqual(str(error), f"{self.path}: No such file or directory")


class LoginTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.path = os.path.abspath(self.mktemp())
        auth.add_user(self.path, "alice", "a-password")
        auth.add_user(self.path, "reader", "r-password", "read-only")
        self.clock = task.Clock()
        self.settings = settings_of(self.path, timeout=600)
        self.auth = auth.Auth(lambda: self.settings, self.clock)

    def test_check(self):
        """check gives the User for the right password, None otherwise or for unknown users."""
        user = self.auth.check("alice", "a-password")
        self.assertEqual((user.name, user.role, user.is_admin), ("alice", "admin", True))
        self.assertFalse(self.auth.check("reader", "r-password").is_admin)
        self.assertIsNone(self.auth.check("alice", "r-password"))
        self.assertIsNone(self.auth.check("nobody", "a-password"))

    def test_login_expires_after_session_timeout(self):
        """A login lasts session_timeout seconds after its last request, then is gone."""
        session = self.auth.log_in(self.auth.check("alice", "a-password"))
        self.clock.advance(599)
        self.assertEqual(self.auth.login_of(session).user.name, "alice")
        self.clock.advance(599)  # refreshed by the request before
        self.assertIsNotNone(self.auth.login_of(session))
        self.clock.advance(601)
        self.assertIsNone(self.auth.login_of(session))
        self.assertEqual(self.auth.logins, {})

    def test_logout(self):
        """After log_out the session id is worth nothing; others stay."""
        first = self.auth.log_in(self.auth.check("alice", "a-password"))
        second = self.auth.log_in(self.auth.check("alice", "a-password"))
        self.assertNotEqual(first, second)
        self.assertNotEqual(self.auth.login_of(first).csrf, self.auth.login_of(second).csrf)
        self.auth.log_out(first)
        self.assertIsNone(self.auth.login_of(first))
        self.assertIsNotNone(self.auth.login_of(second))

    def test_removed_user_loses_login(self):
        """A user removed from the file is logged out at the next request."""
        session = self.auth.log_in(self.auth.check("reader", "r-password"))
        auth.delete_user(self.path, "reader")
        self.assertIsNone(self.auth.login_of(session))


class RateLimiterTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.limiter = auth.RateLimiter(self.clock)
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def lines(self):
        return [event["log_format"].format(**event) for event in self.logged
                if "[limited]" in event.get("log_format", "")]

    def test_sixth_refused_until_the_window_passes(self):
        """Five wrong passwords pass; then the address is refused until 60 s after the first."""
        for _ in range(5):
            self.assertFalse(self.limiter.refused("192.0.2.1"))
            self.limiter.failed("192.0.2.1")
            self.clock.advance(10)
        self.assertTrue(self.limiter.refused("192.0.2.1"))
        self.assertFalse(self.limiter.refused("192.0.2.2"))  # per address
        self.assertEqual(self.limiter.retry_after("192.0.2.1"), 10)
        self.clock.advance(9.5)
        self.assertTrue(self.limiter.refused("192.0.2.1"))
        self.clock.advance(0.5)
        self.assertFalse(self.limiter.refused("192.0.2.1"))
        self.assertEqual(self.limiter.retry_after("192.0.2.1"), 0)

    def test_new_window_after_the_old(self):
        """Four wrong passwords, a minute passes: the count starts again."""
        for _ in range(4):
            self.limiter.failed("192.0.2.1")
        self.clock.advance(60)
        for _ in range(4):
            self.limiter.failed("192.0.2.1")
        self.assertFalse(self.limiter.refused("192.0.2.1"))
        self.limiter.failed("192.0.2.1")
        self.assertTrue(self.limiter.refused("192.0.2.1"))

    def test_one_log_line_per_address_and_window(self):
        """Refusals log once per address per window."""
        for _ in range(5):
            self.limiter.failed("192.0.2.1")
            self.limiter.failed("192.0.2.9")
        for _ in range(3):
            self.limiter.refused("192.0.2.1")
        self.limiter.refused("192.0.2.9")
        self.assertEqual(self.lines(), [
            "[web][login][limited] 192.0.2.1: 5 wrong passwords within 60 s; its logins are "
            "refused for 60 s",
            "[web][login][limited] 192.0.2.9: 5 wrong passwords within 60 s; its logins are "
            "refused for 60 s"])
        self.clock.advance(60)
        for _ in range(5):
            self.limiter.failed("192.0.2.1")
        self.limiter.refused("192.0.2.1")
        self.limiter.refused("192.0.2.1")
        self.assertEqual(len(self.lines()), 3)

    def test_memory_bounded(self):
        """Ended windows are forgotten, and no more than max_addresses are kept."""
        limiter = auth.RateLimiter(self.clock, max_addresses=100)
        for number in range(250):
            limiter.failed(f"10.0.{number // 256}.{number % 256}")
        self.assertEqual(len(limiter), 100)
        self.assertEqual(next(iter(limiter._windows)), "10.0.0.150")  # the oldest went first
        self.clock.advance(61)
        limiter.failed("192.0.2.1")
        self.assertEqual(len(limiter), 1)


class BasicAuthCacheTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.path = os.path.abspath(self.mktemp())
        auth.add_user(self.path, "prometheus", "scrape-me", "read-only")
        self.clock = task.Clock()
        self.settings = settings_of(self.path)
        self.auth = auth.Auth(lambda: self.settings, self.clock)
        self.checks = []
        original = self.auth.check

        def counting(name, password):
            self.checks.append(name)
            return original(name, password)

        self.auth.check = counting

    def test_success_remembered_for_a_while(self):
        """A good check is reused for CACHE_SECONDS, then scrypt runs again."""
        self.assertEqual(self.auth.check_basic("prometheus", "scrape-me").role, "read-only")
        self.clock.advance(auth.CACHE_SECONDS - 1)
        self.assertEqual(self.auth.check_basic("prometheus", "scrape-me").name, "prometheus")
        self.assertEqual(len(self.checks), 1)
        self.clock.advance(1)
        self.assertIsNotNone(self.auth.check_basic("prometheus", "scrape-me"))
        self.assertEqual(len(self.checks), 2)

    def test_failures_and_other_passwords_not_remembered(self):
        """A wrong password is checked every time and never answered from the cache."""
        self.auth.check_basic("prometheus", "scrape-me")
        self.assertIsNone(self.auth.check_basic("prometheus", "scrape-me!"))
        self.assertIsNone(self.auth.check_basic("prometheus", "scrape-me!"))
        self.assertEqual(len(self.checks), 3)

    def test_keyed_by_hash_not_password(self):
        """The cache holds no password text."""
        self.auth.check_basic("prometheus", "scrape-me")
        self.assertNotIn("scrape-me", repr(self.auth._basic))
        self.assertTrue(all(isinstance(key, bytes) and len(key) == 32
                            for key in self.auth._basic))

    def test_changed_password_drops_the_memory(self):
        """After the user's password changes in the file, the old one no longer passes."""
        self.auth.check_basic("prometheus", "scrape-me")
        auth.add_user(self.path, "prometheus", "new-secret", "read-only")
        os.utime(self.path, ns=(1, 1))  # a different stamp even within the clock's tick
        self.assertIsNone(self.auth.check_basic("prometheus", "scrape-me"))
        self.assertIsNotNone(self.auth.check_basic("prometheus", "new-secret"))


class PasswordFileProblemsTests(unittest.TestCase):
    """The start-up check: the password file exists and the effective user can read it."""

    def settings(self, path):
        from miltermanager.config.model import WebConfig

        web = WebConfig()
        web.connection_spec = "inet:1@[127.0.0.1]"
        web.password_file = path
        return web

    def test_missing_file(self):
        from miltermanager.web.app import problems

        path = os.path.join(self.mktemp(), "users")
        [(name, text)] = problems(self.settings(path))
        self.assertEqual(name, "password_file")
        self.assertIn("No such file or directory (create it with milter-manager-ctl passwd",
                      text)

    def test_unreadable_by_the_effective_user(self):
        """A root-owned 0600 file cannot be read by nobody: said with the fix; 0644 can."""
        from miltermanager.web.app import problems

        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "users")
        auth.add_user(path, "admin", "secret")
        [(_, text)] = problems(self.settings(path), "nobody")
        self.assertEqual(text, f"web.password_file {path}: not readable by "
                               f"security.effective_user nobody (owner uid {os.getuid()}, "
                               f"mode 0600): chown nobody {path}")
        os.chmod(path, 0o644)
        self.assertEqual(problems(self.settings(path), "nobody"), [])
        self.assertEqual(problems(self.settings(path)), [])
