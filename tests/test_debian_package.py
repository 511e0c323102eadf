# -*- test-case-name: tests.test_debian_package -*-
"""Tests for the Debian package: build it from this tree and look inside, without installing.

scripts/build-deb builds milter-manager_VERSION_all.deb from a temporary copy of the
working tree (about 5 s); the tests read its file list, control fields and maintainer
scripts, and run the packaged plugin and configuration on Debian's own python3 and
Twisted from a `dpkg-deb -x` copy. Nothing is installed and the checkout is not touched.
The build dependencies come from scripts/install-test-deps.
"""

import atexit
import os
import re
import shutil
import subprocess
import tempfile

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST_PACKAGES = "usr/lib/python3/dist-packages"
# Debian's python3 and twistd3 only: no pyenv or virtualenv, no PYTHONPATH to the checkout.
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

_built = {}


def built_package():
    """Build the package once per process; return a dict describing it.

    Keys: deb (the .deb's path), files (its paths, without the leading "./"),
    listing (`dpkg-deb -c` lines), control (the DEBIAN/ directory extracted) and
    root (the package's files extracted).
    """
    if "error" in _built:
        raise _built["error"]
    if _built:
        return _built
    if shutil.which("dpkg-buildpackage", path=CLEAN_PATH) is None:
        _built["error"] = RuntimeError("no dpkg-buildpackage: scripts/install-test-deps installs it")
        raise _built["error"]
    work = tempfile.mkdtemp(prefix="milter-manager-test-deb.")
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    out = os.path.join(work, "out")
    result = subprocess.run(
        [os.path.join(ROOT, "scripts", "build-deb"), out],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
        env={"PATH": CLEAN_PATH, "TMPDIR": work, "LANG": "C.UTF-8"})
    if result.returncode != 0:
        _built["error"] = AssertionError(
            f"scripts/build-deb failed ({result.returncode}):\n{result.stdout[-6000:]}")
        raise _built["error"]
    [deb] = [os.path.join(out, name) for name in os.listdir(out) if name.endswith(".deb")]
    listing = subprocess.run(["dpkg-deb", "-c", deb], check=True, stdout=subprocess.PIPE,
                             text=True).stdout.splitlines()
    control = os.path.join(work, "control")
    root = os.path.join(work, "root")
    subprocess.run(["dpkg-deb", "-e", deb, control], check=True)
    subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
    files = set()
    for line in listing:
        path = line.split(None, 5)[5].split(" -> ")[0]
        files.add(path[2:].rstrip("/") if path.startswith("./") else path.rstrip("/"))
    files.discard("")
    _built.update(deb=deb, files=files, listing=listing, control=control, root=root,
                  build_log=result.stdout)
    return _built


def field(deb, name):
    """One control field of the .deb."""
    return subprocess.run(["dpkg-deb", "-f", deb, name], check=True, stdout=subprocess.PIPE,
                          text=True).stdout.strip()


def read(path):
    with open(path, encoding="utf-8") as file:
        return file.read()


def unit_section(text, name):
    """{key: [values]} of one section of a systemd unit (no continuation lines)."""
    section, values = None, {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == name:
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def setup_py_value(pattern):
    """A value out of setup.py (read as text: importing it would run setup())."""
    match = re.search(pattern, read(os.path.join(ROOT, "setup.py")), re.S)
    assert match, pattern
    return match.group(1)


class FileListTests(SynchronousTestCase):
    """What the .deb installs, and where."""

    def setUp(self):
        self.package = built_package()
        self.files = self.package["files"]

    def test_plugin_where_debian_twisted_looks(self):
        """The twistd plugin is in Debian's dist-packages/twisted/plugins, with no __init__.py.

        An __init__.py in twisted/ or twisted/plugins/ would shadow Twisted's own package
        and hide every plugin.
        """
        self.assertIn(f"{DIST_PACKAGES}/twisted/plugins/milter_manager_plugin.py", self.files)
        self.assertNotIn(f"{DIST_PACKAGES}/twisted/__init__.py", self.files)
        self.assertNotIn(f"{DIST_PACKAGES}/twisted/plugins/__init__.py", self.files)
        self.assertEqual(
            sorted(path for path in self.files if path.startswith(f"{DIST_PACKAGES}/twisted/")
                   and not path.endswith("/plugins")),
            [f"{DIST_PACKAGES}/twisted/plugins/milter_manager_plugin.py"])

    def test_no_plugin_cache(self):
        """No dropin.cache is shipped: python3-twisted's trigger rebuilds the system one."""
        self.assertEqual([path for path in self.files if "dropin.cache" in path], [])
        self.assertEqual(read(os.path.join(self.package["control"], "triggers")).split(),
                         ["activate-noawait", "twisted-plugins-cache"])

    def test_every_module(self):
        """Every module of the miltermanager package in this tree is in the package."""
        wanted = set()
        for directory, subdirectories, names in os.walk(os.path.join(ROOT, "miltermanager")):
            subdirectories[:] = [name for name in subdirectories
                                 if os.path.exists(os.path.join(directory, name, "__init__.py"))]
            relative = os.path.relpath(directory, ROOT)
            wanted.update(f"{DIST_PACKAGES}/{relative}/{name}" for name in names
                          if name.endswith(".py"))
        self.assertIn(f"{DIST_PACKAGES}/miltermanager/tap.py", wanted)
        self.assertEqual(sorted(wanted - self.files), [])

    def test_no_tests_or_bytecode(self):
        """The test suite, build leftovers and .pyc files stay out (py3compile makes them)."""
        unwanted = [path for path in self.files
                    if path.startswith(f"{DIST_PACKAGES}/tests") or "__pycache__" in path
                    or path.endswith(".pyc") or "_trial_temp" in path]
        self.assertEqual(unwanted, [])
        self.assertEqual([path for path in self.files if "/python3.11/" in path], [])

    def test_console_scripts(self):
        """Each console script setup.py declares is in /usr/bin, and nothing else is."""
        scripts = set(re.findall(r'"([\w-]+)\s*=\s*miltermanager[\w.]*:\w+"', setup_py_value(
            r'"console_scripts"\s*:\s*\[(.*?)\]')))
        self.assertIn("milter-test-server", scripts)
        self.assertEqual({path[len("usr/bin/"):] for path in self.files
                          if path.startswith("usr/bin/")}, scripts)

    def test_configuration(self):
        """Every file of etc/ (but the examples) is under /etc/milter-manager, as a conffile.

        The examples go to /usr/share/doc/milter-manager/examples/; /etc/default holds
        the unit's options.
        """
        etc = os.path.join(ROOT, "etc")
        configuration, examples = set(), set()
        for directory, _, names in os.walk(etc):
            for name in names:
                relative = os.path.relpath(os.path.join(directory, name), etc)
                if relative.startswith("examples/"):
                    examples.add(f"usr/share/doc/milter-manager/{relative}")
                else:
                    configuration.add(f"etc/milter-manager/{relative}")
        self.assertIn("etc/milter-manager/milter-manager.conf", configuration)
        self.assertIn("etc/milter-manager/defaults/debian.conf", configuration)
        self.assertEqual(sorted(configuration - self.files), [])
        self.assertEqual(sorted(examples - self.files), [])
        shipped = set()
        for directory, _, names in os.walk(os.path.join(self.package["root"], "etc")):
            shipped.update(os.path.relpath(os.path.join(directory, name), self.package["root"])
                           for name in names)
        self.assertEqual(sorted(shipped), sorted(configuration | {"etc/default/milter-manager"}))
        conffiles = read(os.path.join(self.package["control"], "conffiles")).split()
        self.assertEqual(sorted(conffiles),
                         sorted("/" + path for path in configuration | {"etc/default/milter-manager"}))
        self.assertNotIn("/etc/milter-manager/milter-manager.local.conf", conffiles)

    def test_owned_by_root(self):
        """Files are root's: the configuration loader refuses files others could change."""
        for line in self.package["listing"]:
            permissions, owner = line.split()[:2]
            if permissions.startswith("l"):
                continue
            self.assertEqual(owner, "root/root", line)
            self.assertFalse(permissions[5] == "w" or permissions[8] == "w", line)

    def test_systemd_and_tmpfiles(self):
        """The unit and the tmpfiles entry for /run/milter-manager are installed."""
        self.assertIn("lib/systemd/system/milter-manager.service", self.files)
        tmpfiles = read(os.path.join(self.package["root"], "usr/lib/tmpfiles.d/milter-manager.conf"))
        self.assertIn("d /run/milter-manager 0755 milter-manager milter-manager -",
                      tmpfiles.splitlines())
        self.assertIn("usr/share/doc/milter-manager/README.Debian", self.files)
        self.assertIn("usr/share/doc/milter-manager/copyright", self.files)


class ControlTests(SynchronousTestCase):
    """The control fields and maintainer scripts."""

    def setUp(self):
        self.package = built_package()

    def test_fields(self):
        """Architecture all, setup.py's version, section mail."""
        deb = self.package["deb"]
        self.assertEqual(field(deb, "Package"), "milter-manager")
        self.assertEqual(field(deb, "Architecture"), "all")
        self.assertEqual(field(deb, "Section"), "mail")
        version = setup_py_value(r'\bversion="([^"]+)"')
        self.assertEqual(re.sub(r"-[^-]*$", "", field(deb, "Version")), version)

    def test_depends_on_debian_libraries(self):
        """It runs on Debian's Twisted (>= 22.4) and the libraries setup.py requires."""
        depends = [item.strip() for item in field(self.package["deb"], "Depends").split(",")]
        for wanted in ("python3-twisted (>= 22.4)", "python3-zope.interface", "python3-ldap3",
                       "python3-pyasn1", "adduser"):
            self.assertIn(wanted, depends)
        self.assertTrue(any(item.startswith("python3:any (>= 3.11") for item in depends), depends)

    def test_postinst_user(self):
        """postinst makes the system user and group before the tmpfiles entry needs them."""
        postinst = read(os.path.join(self.package["control"], "postinst"))
        adduser = postinst.index("adduser --system")
        self.assertIn("--group", postinst[adduser:adduser + 200])
        self.assertLess(adduser, postinst.index("systemd-tmpfiles"))
        self.assertIn("getent group postfix", postinst)
        self.assertIn('adduser --quiet "$USER" postfix', postinst)
        self.assertIn("deb-systemd-helper enable 'milter-manager.service'", postinst)

    def test_build_checked_plugin_on_debian_python(self):
        """The build's own check found the plugin with Debian's python3 and Twisted."""
        log = self.package["build_log"]
        self.assertRegex(log, r"check-plugin: tap milter-manager from \S+/\.pybuild/\S+, "
                              r"Twisted [\d.]+ from /usr/lib/python3/dist-packages/twisted/")


class UnitTests(SynchronousTestCase):
    """milter-manager.service."""

    def setUp(self):
        self.package = built_package()
        self.path = os.path.join(self.package["root"], "lib/systemd/system/milter-manager.service")
        self.service = unit_section(read(self.path), "Service")

    def test_commands(self):
        """Foreground twistd3 without pid file, checked before start and reload, HUP reloads."""
        config = "--config /etc/milter-manager/milter-manager.conf"
        self.assertEqual(self.service["Type"], ["simple"])
        self.assertEqual(self.service["ExecStart"], [
            "/usr/bin/twistd3 --nodaemon --pidfile= --logfile=- milter-manager "
            f"{config} $MILTER_MANAGER_OPTS"])
        check = f"/usr/bin/twistd3 --nodaemon --pidfile= milter-manager {config} --check-config " \
                "$MILTER_MANAGER_OPTS"
        self.assertEqual(self.service["ExecStartPre"], [check])
        self.assertEqual(self.service["ExecReload"], [check, "/bin/kill -HUP $MAINPID"])
        self.assertEqual(self.service["Restart"], ["on-failure"])
        self.assertIn(config.split()[1].lstrip("/"), self.package["files"])

    def test_user_and_runtime_directory(self):
        """It runs as the user postinst creates, with /run/milter-manager as its own."""
        self.assertEqual(self.service["User"], ["milter-manager"])
        self.assertEqual(self.service["Group"], ["milter-manager"])
        self.assertEqual(self.service["RuntimeDirectory"], ["milter-manager"])
        self.assertEqual(self.service["EnvironmentFile"], ["-/etc/default/milter-manager"])

    def test_systemd_accepts_it(self):
        """systemd-analyze verify finds nothing wrong with the unit."""
        if shutil.which("systemd-analyze", path=CLEAN_PATH) is None:
            self.fail("no systemd-analyze: scripts/install-test-deps installs systemd")
        if not os.path.exists("/usr/bin/twistd3"):
            self.fail("no /usr/bin/twistd3 (python3-twisted) to check ExecStart against")
        result = subprocess.run(["systemd-analyze", "verify", self.path],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={"PATH": CLEAN_PATH, "SYSTEMD_LOG_LEVEL": "warning"})
        problems = [line for line in result.stdout.splitlines()
                    if "milter-manager.service" in line]
        self.assertEqual((result.returncode, problems), (0, []), result.stdout)


class PackagedPluginTests(SynchronousTestCase):
    """The packaged files, run on Debian's python3 and Twisted from a `dpkg-deb -x` copy."""

    def setUp(self):
        self.package = built_package()
        if not os.path.exists("/usr/bin/twistd3"):
            self.fail("no /usr/bin/twistd3: apt-get install python3-twisted")
        self.root = self.package["root"]
        self.environ = {"PATH": CLEAN_PATH, "LANG": "C.UTF-8",
                        "PYTHONPATH": os.path.join(self.root, DIST_PACKAGES)}

    def run_twistd(self, *arguments):
        return subprocess.run(["/usr/bin/twistd3", "--nodaemon", "--pidfile=", *arguments],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=self.environ, cwd=self.root, timeout=120)

    def test_twistd_lists_plugin(self):
        """Debian's twistd3 lists milter-manager, imported from the package's files."""
        result = self.run_twistd("--help")
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertRegex(result.stdout, r"\n\s+milter-manager\s")
        where = subprocess.run(
            ["/usr/bin/python3", "-c", "import miltermanager, twisted; "
             "print(miltermanager.__file__); print(twisted.__file__)"],
            stdout=subprocess.PIPE, text=True, env=self.environ, check=True).stdout.split()
        self.assertEqual(where, [os.path.join(self.root, DIST_PACKAGES, "miltermanager/__init__.py"),
                                 "/usr/lib/python3/dist-packages/twisted/__init__.py"])

    def test_shipped_configuration_checks(self):
        """The shipped /etc/milter-manager/milter-manager.conf passes --check-config as is."""
        path = os.path.join(self.root, "etc/milter-manager/milter-manager.conf")
        result = self.run_twistd("milter-manager", "--config", path, "--check-config")
        self.assertEqual((result.returncode, result.stdout.strip()),
                         (0, f"configuration OK: {path}"))
