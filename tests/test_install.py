"""A fresh install outside the checkout finds the shipped configuration.

The tracked files are copied as a release tarball extracted as root would leave
them (files 0664, directories 0775), installed with pip into a new virtual
environment in a temporary directory, and run from there with neither this
checkout nor an /etc tree on the path: a configuration in a directory of its own
loads `applicable-conditions/*.conf` and gives a child S25R, Remote Network and
DNSBL Listed, whose effect is seen through the installed milter-test-server.
"""

import os
import shutil
import stat
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from tests.peers.fixtures import (
    HOST, REPO, DNSServerProcess, LibmilterMilter, _stop_process, free_port, wait_for_port,
)

ZONE = """\
dnsbl.test SOA 60
1.2.0.192.dnsbl.test 300 A 127.0.0.2
1.0.0.10.dnsbl.test 300 A 127.0.0.2
"""

CONFIG = """\
manager.connection_spec = "inet:{port}@[127.0.0.1]"
log.use_syslog = False
load("applicable-conditions/*.conf")
dnsbl.name_servers = ["{name_server}"]
dnsbl.add_service("dnsbl.test", "127.0.0.2/32")

with define_milter("tagger") as milter:
    milter.connection_spec = "{child}"
    milter.applicable_conditions = ["S25R", "Remote Network", "DNSBL Listed"]
"""


def release_tree(destination):
    """Copy the tracked (and new, not ignored) files to destination with a tarball's modes."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = os.path.join(REPO, name)
        if not os.path.isfile(source):
            continue  # deleted in the working tree
        target = os.path.join(destination, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(source, target)
        executable = os.stat(source).st_mode & stat.S_IXUSR
        os.chmod(target, 0o775 if executable else 0o664)
    for directory, _, _ in os.walk(destination):
        os.chmod(directory, 0o775)


class FreshVenvInstallTests(SynchronousTestCase):
    """pip install into a new venv; the manager runs from it on the package's own etc/."""

    venv = None  # made once for the class: the install is the slow part

    @classmethod
    def install(cls):
        cls.dir = os.path.realpath(os.path.abspath("fresh-install"))
        shutil.rmtree(cls.dir, ignore_errors=True)
        os.makedirs(cls.dir)
        os.chmod(cls.dir, 0o755)
        source = os.path.join(cls.dir, "source")
        release_tree(source)
        venv = os.path.join(cls.dir, "venv")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        cls.env = {name: value for name, value in os.environ.items()
                   if name not in ("PYTHONPATH", "MILTER_MANAGER_CONFIG_DIR")}
        subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", source],
                       check=True, env=cls.env, cwd=cls.dir)
        cls.venv = venv

    def setUp(self):
        if self.venv is None:
            self.install()
        work = os.path.realpath(os.path.abspath(self.mktemp()))
        os.makedirs(work)
        os.chmod(work, 0o755)
        self.dns = DNSServerProcess(os.path.join(work, "dns"), ZONE)
        self.dns.start()
        self.addCleanup(self.dns.stop)
        self.child = LibmilterMilter(os.path.join(work, "child"), "tagger")
        self.child.start()
        self.addCleanup(self.child.stop)
        conf_dir = os.path.join(work, "conf")
        os.makedirs(conf_dir)
        self.config = os.path.join(conf_dir, "milter-manager.conf")
        self.port = free_port()
        with open(self.config, "w") as out:
            out.write(CONFIG.format(port=self.port, name_server=self.dns.name_server,
                                    child=self.child.spec))
        with open(os.path.join(work, "manager.log"), "wb") as log:
            manager = subprocess.Popen(
                [os.path.join(self.venv, "bin", "twistd"), "-n", "--pidfile=", "milter-manager",
                 "--config", self.config],
                cwd=work, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        self.addCleanup(_stop_process, manager)
        wait_for_port(self.port, 30, manager)

    def installed_etc(self):
        [site] = [os.path.join(self.venv, "lib", name, "site-packages")
                  for name in os.listdir(os.path.join(self.venv, "lib"))]
        return os.path.join(site, "miltermanager", "etc")

    def session(self, name, address):
        """One message from name/address through the installed milter-test-server; its output."""
        return subprocess.run(
            [os.path.join(self.venv, "bin", "milter-test-server"),
             "-s", f"inet:{self.port}@[{HOST}]", "--connect-host", name,
             "--connect-address", f"inet:40000@[{address}]", "-f", "alice@harness.test",
             "-r", "bob@example.com", "--output-message"],
            capture_output=True, text=True, timeout=60, check=True, env=self.env,
            cwd=self.dir).stdout

    def test_package_data_modes(self):
        """The installed copy of etc/ is writable by its owner only, though the source was 0664."""
        etc = self.installed_etc()
        names = set()
        for directory, _, files in os.walk(etc):
            for name in files:
                path = os.path.join(directory, name)
                names.add(os.path.relpath(path, etc))
                self.assertEqual(os.stat(path).st_mode & 0o022, 0, path)
        self.assertIn("milter-manager.conf", names)
        self.assertIn(os.path.join("applicable-conditions", "s25r.conf"), names)
        self.assertIn(os.path.join("applicable-conditions", "dnsbl.conf"), names)

    def test_conditions_come_from_the_installed_package(self):
        """--show-config names the installed package's files as where the conditions were set."""
        output = subprocess.run(
            [os.path.join(self.venv, "bin", "twistd"), "-n", "--pidfile=", "milter-manager",
             "--config", self.config, "--show-config"],
            capture_output=True, text=True, env=self.env, cwd=self.dir)
        self.assertEqual(output.returncode, 0, output.stderr)
        output = output.stdout
        s25r = os.path.join(self.installed_etc(), "applicable-conditions", "s25r.conf")
        self.assertIn(f'with define_applicable_condition("S25R") as condition:  # {s25r}:', output)
        self.assertNotIn(os.path.join(REPO, "etc") + os.sep, output)

    def test_dynamic_remote_listed_client_runs_the_child(self):
        """A dynamic-looking, remote, listed client: no condition stops the child."""
        output = self.session("dhcp-192-0-2-1.example.net", "192.0.2.1")
        self.assertIn("\n+ X-Libmilter: tagger", output)

    def test_s25r_stops_the_child(self):
        """A client with a proper name is stopped by S25R."""
        output = self.session("mail.example.com", "192.0.2.1")
        self.assertTrue(output.startswith("status: accept\n"), output)
        self.assertNotIn("X-Libmilter", output)

    def test_dnsbl_listed_stops_the_child(self):
        """A dynamic-looking client that the DNSBL does not list is stopped by DNSBL Listed."""
        output = self.session("dhcp-192-0-2-2.example.net", "192.0.2.2")
        self.assertTrue(output.startswith("status: accept\n"), output)
        self.assertNotIn("X-Libmilter", output)

    def test_remote_network_stops_the_child(self):
        """A dynamic-looking, listed client on a private network is stopped by Remote Network."""
        output = self.session("dhcp-10-0-0-1.example.net", "10.0.0.1")
        self.assertTrue(output.startswith("status: accept\n"), output)
        self.assertNotIn("X-Libmilter", output)
