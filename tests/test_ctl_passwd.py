"""milter-manager-ctl passwd: the real command, the password on standard input, no manager."""

import os
import stat
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from miltermanager.web import auth

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ctl(*args, stdin="", check=False):
    """Run this checkout's milter-manager-ctl with this interpreter; the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=REPO)
    code = "import sys; from miltermanager.tools.ctl import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], input=stdin,
                          capture_output=True, text=True, timeout=60, env=env, check=check)


class PasswdTests(SynchronousTestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.mkdir(self.directory)
        self.path = os.path.join(self.directory, "web-users")

    def assertFails(self, result, text):
        self.assertEqual(result.returncode, 1, result)
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.stderr, f"milter-manager-ctl: {text}\n")

    def test_creates_the_file(self):
        """passwd USER with --password-file creates it 0600 with a hash that verifies."""
        result = ctl("passwd", "alice", "--password-file", self.path,
                     stdin="open sesame\nsecond line\n")
        self.assertEqual(result.returncode, 0, result)
        self.assertEqual(result.stdout, f"set the password of alice (admin) in {self.path}\n")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        with open(self.path) as stream:
            self.assertNotIn("open sesame", stream.read())
        role, stored = auth.read_users(self.path)["alice"]
        self.assertEqual(role, "admin")
        self.assertTrue(auth.verify_password("open sesame", stored))
        self.assertFalse(auth.verify_password("second line", stored))

    def test_roles_and_other_users(self):
        """--role sets the role; a new password keeps the role and leaves other users alone."""
        ctl("passwd", "alice", "--password-file", self.path, stdin="a-password\n", check=True)
        ctl("passwd", "reader", "--role", "read-only", "--password-file", self.path,
            stdin="r-password\n", check=True)
        alice = auth.read_users(self.path)["alice"]
        result = ctl("passwd", "reader", "--password-file", self.path, stdin="new\r\n")
        self.assertEqual(result.stdout,
                         f"set the password of reader (read-only) in {self.path}\n")
        users = auth.read_users(self.path)
        self.assertEqual(users["alice"], alice)
        self.assertEqual(users["reader"][0], "read-only")
        self.assertTrue(auth.verify_password("new", users["reader"][1]))

    def test_delete(self):
        """--delete removes the user; removing an unknown user is an error."""
        ctl("passwd", "alice", "--password-file", self.path, stdin="a\n", check=True)
        ctl("passwd", "bob", "--password-file", self.path, stdin="b\n", check=True)
        result = ctl("passwd", "alice", "--delete", "--password-file", self.path)
        self.assertEqual((result.returncode, result.stdout),
                         (0, f"removed alice from {self.path}\n"))
        self.assertEqual(list(auth.read_users(self.path)), ["bob"])
        self.assertFails(ctl("passwd", "alice", "--delete", "--password-file", self.path),
                         f"{self.path} has no user alice; nothing changed")

    def test_password_file_from_the_configuration(self):
        """Without --password-file, web.password_file of the -c configuration file is used."""
        configuration = os.path.join(self.directory, "milter-manager.conf")
        with open(configuration, "w") as stream:
            stream.write(f'web.password_file = "{self.path}"\n')
        result = ctl("-c", configuration, "passwd", "alice", stdin="pw\n")
        self.assertEqual(result.returncode, 0, result)
        self.assertIn("alice", auth.read_users(self.path))
        with open(configuration, "w") as stream:
            stream.write("log.level = \"default\"\n")
        self.assertFails(ctl("-c", configuration, "passwd", "alice", stdin="pw\n"),
                         f"{configuration} sets no web.password_file; set it, or give "
                         "--password-file")

    def test_errors(self):
        """Empty password, unknown role, bad name, unwritable place: exit 1 and one line."""
        self.assertFails(ctl("passwd", "alice", "--password-file", self.path, stdin="\n"),
                         "the password is empty; nothing changed")
        self.assertFails(ctl("passwd", "alice", "--password-file", self.path, stdin=""),
                         "the password is empty; nothing changed")
        self.assertFails(ctl("passwd", "alice", "--role", "root", "--password-file", self.path,
                             stdin="pw\n"),
                         "the role is admin or read-only, not 'root'")
        self.assertFails(ctl("passwd", "a:b", "--password-file", self.path, stdin="pw\n"),
                         "a user name is 1 to 64 printable characters without spaces, ':' or "
                         "'#': 'a:b'")
        self.assertFails(ctl("passwd", "--password-file", self.path, stdin="pw\n"),
                         "passwd needs a user name")
        self.assertFalse(os.path.exists(self.path))
        blocker = os.path.join(self.directory, "a-file")
        open(blocker, "w").close()
        inside = os.path.join(blocker, "web-users")
        self.assertFails(ctl("passwd", "alice", "--password-file", inside, stdin="pw\n"),
                         f"cannot write {inside}: Not a directory")
        missing = os.path.join(self.directory, "missing", "web-users")
        self.assertFails(ctl("passwd", "alice", "--password-file", missing, stdin="pw\n"),
                         f"cannot write {missing}: No such file or directory")

    def test_bad_file_left_alone(self):
        """A password file with a bad line is refused with its line number and not rewritten."""
        with open(self.path, "w") as stream:
            stream.write("not a user line\n")
        self.assertFails(ctl("passwd", "alice", "--password-file", self.path, stdin="pw\n"),
                         f"{self.path}:1: not NAME:ROLE:scrypt$... with ROLE admin or "
                         "read-only; nothing changed")
        with open(self.path) as stream:
            self.assertEqual(stream.read(), "not a user line\n")
