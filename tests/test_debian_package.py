# -*- test-case-name: tests.test_debian_package -*-
"""Tests for the Debian package: build it, lintian it, install, run and purge it.

scripts/build-deb builds milter-manager_VERSION_all.deb from a temporary copy of the
working tree (about 7 s, once per run); the tests read its file list, control fields and
maintainer scripts, run lintian --pedantic on it, and run the packaged plugin and
configuration on Debian's own python3 and Twisted from a `dpkg-deb -x` copy. A second
build comes from a `git archive` tarball of HEAD, whose files are 0664.

The install tests install the .deb with apt-get in a private mount namespace whose /etc,
/usr, /var and /run are overlays on tmpfs (InstalledSystem): the host and the other tests
never see the package, and after a purge what is left behind is exactly what the overlays
hold. There is no systemd in the container, so the units' commands are run by hand as
their User=, with RuntimeDirectory= and StateDirectory= made as systemd would.
The checkout is never touched; the dependencies come from scripts/install-test-deps.
"""

import atexit
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tarfile
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST_PACKAGES = "usr/lib/python3/dist-packages"
# Debian's python3 and twistd3 only: no pyenv or virtualenv, no PYTHONPATH to the checkout.
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

_builds = {}


def assert_root_writable_only(test, listing):
    """Every entry of a `dpkg-deb -c` listing but links is root's and writable by root only.

    Returns how many entries were checked.
    """
    checked = 0
    for line in listing:
        permissions, owner = line.split()[:2]
        if permissions.startswith("l"):
            continue
        test.assertEqual(owner, "root/root", line)
        test.assertFalse(permissions[5] == "w" or permissions[8] == "w", line)
        checked += 1
    return checked


def built_package(tarball=False):
    """Build the package once per process; return a dict describing it.

    With tarball, the build is from `git archive --prefix=milter-manager-VERSION/ HEAD`
    (committed files only, 0664 as git archive makes them), extracted with its modes.
    Keys: deb (the .deb's path), files (its paths, without the leading "./"),
    listing (`dpkg-deb -c` lines), control (the DEBIAN/ directory extracted),
    root (the package's files extracted) and, for tarball, source_listing (the
    tarball's members).
    """
    _built = _builds.setdefault(tarball, {})
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
    command = [os.path.join(ROOT, "scripts", "build-deb"), out]
    if tarball:
        path = os.path.join(work, "release.tar")
        version = setup_py_value(r'\bversion="([^"]+)"')
        subprocess.run(["git", "archive", f"--prefix=milter-manager-{version}/", "-o", path,
                        "HEAD"], cwd=ROOT, check=True)
        with tarfile.open(path) as archive:
            _built["source_listing"] = archive.getmembers()
        command[1:1] = ["--tarball", path]
    result = subprocess.run(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
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

    def test_web_static_files(self):
        """The web interface's scripts and style sheets are in the package (no CDN)."""
        source = os.path.join(ROOT, "miltermanager", "web", "static")
        wanted = {f"{DIST_PACKAGES}/miltermanager/web/static/{name}"
                  for name in os.listdir(source)}
        self.assertIn(f"{DIST_PACKAGES}/miltermanager/web/static/dashboard.js", wanted)
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
        """Every file of etc/ (but the examples and ldap/) is under /etc/milter-manager, as a conffile.

        The examples go to /usr/share/doc/milter-manager/examples/; the LDAP schema and
        example directory (not configuration) to /usr/share/milter-manager/ldap/, their
        README to /usr/share/doc/milter-manager/ldap/; /etc/default holds the unit's options.
        """
        etc = os.path.join(ROOT, "etc")
        configuration, examples = set(), set()
        for directory, _, names in os.walk(etc):
            for name in names:
                relative = os.path.relpath(os.path.join(directory, name), etc)
                if relative.startswith("examples/") or relative == "ldap/README":
                    examples.add(f"usr/share/doc/milter-manager/{relative}")
                elif relative.startswith("ldap/"):
                    examples.add(f"usr/share/milter-manager/{relative}")
                else:
                    configuration.add(f"etc/milter-manager/{relative}")
        self.assertIn("usr/share/milter-manager/ldap/milter-manager.ldif", examples)
        self.assertIn("etc/milter-manager/milter-manager.conf", configuration)
        self.assertIn("etc/milter-manager/defaults/debian.conf", configuration)
        self.assertEqual(sorted(configuration - self.files), [])
        self.assertEqual(sorted(examples - self.files), [])
        shipped = set()
        for directory, _, names in os.walk(os.path.join(self.package["root"], "etc")):
            shipped.update(os.path.relpath(os.path.join(directory, name), self.package["root"])
                           for name in names)
        defaults = {"etc/default/milter-manager", "etc/default/milter-manager-greylist"}
        self.assertEqual(sorted(shipped), sorted(configuration | defaults))
        conffiles = read(os.path.join(self.package["control"], "conffiles")).split()
        self.assertEqual(sorted(conffiles), sorted("/" + path for path in configuration | defaults))
        self.assertNotIn("/etc/milter-manager/milter-manager.local.conf", conffiles)

    def test_owned_by_root(self):
        """Files are root's: the configuration loader refuses files others could change."""
        assert_root_writable_only(self, self.package["listing"])

    def test_systemd_and_tmpfiles(self):
        """Both units, and tmpfiles entries for /run/milter-manager and /var/lib/milter-manager."""
        self.assertIn("lib/systemd/system/milter-manager.service", self.files)
        self.assertIn("lib/systemd/system/milter-manager-greylist.service", self.files)
        tmpfiles = read(os.path.join(self.package["root"], "usr/lib/tmpfiles.d/milter-manager.conf"))
        self.assertIn("d /run/milter-manager 0755 milter-manager milter-manager -",
                      tmpfiles.splitlines())
        self.assertIn("d /var/lib/milter-manager 0750 milter-manager milter-manager -",
                      tmpfiles.splitlines())
        self.assertIn("usr/share/doc/milter-manager/README.Debian", self.files)
        self.assertIn("usr/share/doc/milter-manager/copyright", self.files)

    def test_manual_pages(self):
        """A manual page for each command in /usr/bin, the manager and its configuration file."""
        commands = sorted(path[len("usr/bin/"):] for path in self.files
                          if path.startswith("usr/bin/"))
        self.assertIn("milter-manager-greylist", commands)
        pages = sorted(path for path in self.files
                       if path.startswith("usr/share/man/") and path.endswith(".gz"))
        self.assertEqual(pages, sorted([f"usr/share/man/man1/{name}.1.gz" for name in commands]
                                       + ["usr/share/man/man5/milter-manager.conf.5.gz",
                                          "usr/share/man/man8/milter-manager.8.gz"]))

    def test_docs(self):
        """docs/ (its *.md and their images) is shipped uncompressed beside README.md, so its
        links docs/X.md and the images they show work."""
        source = os.path.join(ROOT, "docs")
        docs = sorted(os.path.relpath(os.path.join(directory, name), source)
                      for directory, _, names in os.walk(source) for name in names)
        self.assertIn("configuration.md", docs)
        self.assertIn("images/log-analyzer-report.png", docs)
        doc = "usr/share/doc/milter-manager"
        self.assertIn(f"{doc}/README.md", self.files)
        self.assertEqual(sorted(path[len(f"{doc}/docs/"):] for path in self.files
                                if path.startswith(f"{doc}/docs/") and not os.path.isdir(
                                    os.path.join(self.package["root"], path))), docs)
        readme = read(os.path.join(self.package["root"], doc, "README.md"))
        links = set(re.findall(r"\]\((docs/[\w.-]+\.md)\)", readme))
        self.assertIn("docs/configuration.md", links)
        self.assertEqual(sorted(link for link in links if f"{doc}/{link}" not in self.files), [])

    def test_readme_debian(self):
        """README.Debian names twistd3 (never bare twistd) and points at the pages and docs."""
        text = read(os.path.join(self.package["root"], "usr/share/doc/milter-manager/README.Debian"))
        self.assertIn("twistd3 -n --pidfile= milter-manager --check-config", text)
        self.assertEqual(re.findall(r"\btwistd\s+(?:-|milter-manager)", text), [])
        self.assertIn("Detected milters are defined by defaults/debian.conf", text)
        self.assertIn("/usr/share/doc/milter-manager/docs/", text)
        self.assertIn("--no-syslog", text)


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
                       "python3-pyasn1", "python3-prometheus-client", "adduser"):
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
        """Foreground twistd3 without pid file, checked before start and reload, HUP reloads.

        --no-syslog: the log goes to standard output (the journal) only, once.
        """
        config = "--config /etc/milter-manager/milter-manager.conf --no-syslog"
        self.assertEqual(self.service["Type"], ["simple"])
        self.assertEqual(self.service["ExecStart"], [
            "/usr/bin/twistd3 --nodaemon --pidfile= --logfile=- milter-manager "
            f"{config} $MILTER_MANAGER_OPTS"])
        self.assertEqual(self.service["SyslogFacility"], ["mail"])
        check = f"/usr/bin/twistd3 --nodaemon --pidfile= milter-manager {config} --check-config " \
                "$MILTER_MANAGER_OPTS"
        self.assertEqual(self.service["ExecStartPre"], [check])
        self.assertEqual(self.service["ExecReload"], [
            check.replace("--check-config", "--check-reload"), "/bin/kill -HUP $MAINPID"])
        self.assertEqual(self.service["Restart"], ["on-failure"])
        self.assertIn("etc/milter-manager/milter-manager.conf", self.package["files"])

    def test_user_and_runtime_directory(self):
        """It runs as the user postinst creates, with /run/milter-manager as its own."""
        self.assertEqual(self.service["User"], ["milter-manager"])
        self.assertEqual(self.service["Group"], ["milter-manager"])
        self.assertEqual(self.service["RuntimeDirectory"], ["milter-manager"])
        self.assertEqual(self.service["EnvironmentFile"], ["-/etc/default/milter-manager"])

    def test_greylist_unit(self):
        """The greylist unit runs the program as milter-manager with /var/lib/milter-manager."""
        path = os.path.join(self.package["root"],
                            "lib/systemd/system/milter-manager-greylist.service")
        service = unit_section(read(path), "Service")
        self.assertEqual(service["ExecStart"],
                         ["/usr/bin/milter-manager-greylist $MILTER_MANAGER_GREYLIST_OPTS"])
        self.assertEqual(service["User"], ["milter-manager"])
        self.assertEqual(service["StateDirectory"], ["milter-manager"])
        self.assertEqual(service["EnvironmentFile"], ["-/etc/default/milter-manager-greylist"])
        self.assertNotIn("RuntimeDirectory", service)  # stopping it would remove the manager's


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
        """The shipped /etc/milter-manager/milter-manager.conf passes --check-config as is.

        (On a free port: --check-config tries to bind the address, and 10025 may be taken.)
        """
        path = os.path.join(self.root, "etc/milter-manager/milter-manager.conf")
        result = self.run_twistd("milter-manager", "--config", path, "--check-config",
                                 "--connection-spec", f"inet:{free_port()}@[127.0.0.1]")
        self.assertEqual((result.returncode, result.stdout.strip()),
                         (0, f"configuration OK: {path}"))


class LintianTests(SynchronousTestCase):
    """lintian --pedantic on the .deb."""

    def test_lintian_pedantic_clean(self):
        """No tag at all, pedantic and info included, but those overridden with a reason."""
        if shutil.which("lintian", path=CLEAN_PATH) is None:
            self.fail("no lintian: scripts/install-test-deps installs it")
        # --fail-on info would count the tags lintian's own screens mask (M:, the
        # egg-info files dh_python3 installs); the output shows every unmasked tag.
        result = subprocess.run(
            ["lintian", "--pedantic", "--display-info", "--display-experimental",
             "--fail-on", "error,warning,pedantic", self.package_path()],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300,
            env={"PATH": CLEAN_PATH, "LANG": "C.UTF-8", "HOME": "/nonexistent"})
        tags = [line for line in result.stdout.splitlines() if not line.startswith(("N:", "M:"))]
        self.assertEqual((result.returncode, tags), (0, []), result.stdout + result.stderr)

    def test_overrides_have_reasons(self):
        """Each lintian override follows a comment that says why."""
        overrides = read(os.path.join(ROOT, "debian", "milter-manager.lintian-overrides"))
        previous = ""
        for line in overrides.splitlines():
            if line.startswith("milter-manager:"):
                self.assertTrue(previous.startswith(("#", "milter-manager:")), line)
            if line.strip():
                previous = line
        self.assertIn("spare-manual-page", overrides)

    def package_path(self):
        return built_package()["deb"]


class TarballBuildTests(SynchronousTestCase):
    """The package built from a release tarball (git archive of HEAD, files 0664)."""

    def setUp(self):
        self.package = built_package(tarball=True)

    def test_tarball_is_group_writable(self):
        """The tarball really has the 0664 files and 0775 directories of a git archive."""
        modes = {member.mode for member in self.package["source_listing"]
                 if member.isfile() and member.name.endswith((".py", ".conf"))}
        self.assertEqual(modes - {0o775}, {0o664})  # 0775: executable scripts
        self.assertIn(0o775, {member.mode for member in self.package["source_listing"]
                              if member.isdir()})

    def test_nothing_writable_but_by_root(self):
        """Every file and directory in the .deb is root's, writable by root only.

        The configuration loader refuses /etc files and package data others could change.
        """
        self.assertGreater(assert_root_writable_only(self, self.package["listing"]), 50)
        self.assertIn(f"{DIST_PACKAGES}/miltermanager/etc/applicable-conditions/s25r.conf",
                      self.package["files"])

    def test_configuration_loads(self):
        """The loader accepts the extracted /etc tree and the package data (trust check included)."""
        root = self.package["root"]
        environ = {"PATH": CLEAN_PATH, "LANG": "C.UTF-8",
                   "PYTHONPATH": os.path.join(root, DIST_PACKAGES)}
        for directory in ("etc/milter-manager", f"{DIST_PACKAGES}/miltermanager/etc"):
            path = os.path.join(root, directory, "milter-manager.conf")
            result = subprocess.run(
                ["/usr/bin/twistd3", "--nodaemon", "--pidfile=", "milter-manager", "--config",
                 path, "--check-config", "--connection-spec", f"inet:{free_port()}@[127.0.0.1]"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environ,
                cwd=root, timeout=120)
            self.assertEqual((result.returncode, result.stdout.strip().splitlines()[-1:]),
                             (0, [f"configuration OK: {path}"]), result.stdout)


def free_port():
    """A loopback TCP port nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port, process, timeout=60):
    """Wait until 127.0.0.1:port accepts; fail early if process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class InstalledSystem:
    """A private mount namespace in which /etc, /usr, /var and /run are overlays on tmpfs.

    The package is installed there with apt-get; the host's files and the other tests
    never see it. Commands run in it through nsenter; its files are read through
    /proc/PID/root. stop() ends every process started in it and then the namespace
    (its tmpfs goes with it).
    """

    OVERLAID = ("etc", "usr", "var", "run")

    def __init__(self):
        for tool in ("unshare", "nsenter", "setpriv", "apt-get"):
            if shutil.which(tool, path=CLEAN_PATH) is None:
                raise AssertionError(f"no {tool}: scripts/install-test-deps installs util-linux")
        self.processes = []
        self.work = tempfile.mkdtemp(prefix="milter-manager-test-system.")
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sleep", "infinity"],
            env={"PATH": CLEAN_PATH})
        host = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 10
        # Until unshare has run, nsenter would reach the host's own mounts: never mount then.
        while self.namespace() in (None, host):
            if time.monotonic() > deadline or self.holder.poll() is not None:
                self.stop()
                raise AssertionError("unshare --mount did not give a namespace of its own")
            time.sleep(0.01)
        script = [f"mount -t tmpfs milter-manager-test {shlex.quote(self.work)}"]
        for directory in self.OVERLAID:
            upper, work = f"{self.work}/upper/{directory}", f"{self.work}/work/{directory}"
            script += [f"mkdir -p {upper} {work}",
                       f"mount -t overlay overlay -o lowerdir=/{directory},upperdir={upper},"
                       f"workdir={work} /{directory}"]
        self.check("sh", "-e", "-c", "\n".join(script))

    def namespace(self):
        try:
            return os.readlink(f"/proc/{self.holder.pid}/ns/mnt")
        except OSError:
            return None

    def path(self, path):
        """Where the host sees the namespace's path."""
        return f"/proc/{self.holder.pid}/root{path}"

    def upper(self, directory):
        """The overlay's upper directory for /directory: what changed there."""
        return self.path(f"{self.work}/upper/{directory}")

    def command(self, *arguments, user=None):
        prefix = ["nsenter", f"--target={self.holder.pid}", "--mount", "--"]
        if user:
            # As systemd's User=/Group= (supplementary groups too) with NoNewPrivileges=.
            prefix += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                       "--no-new-privs", "--"]
        return prefix + list(arguments)

    def run(self, *arguments, user=None, environ=None, timeout=300):
        return subprocess.run(self.command(*arguments, user=user), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              env=environ or {"PATH": CLEAN_PATH, "LANG": "C.UTF-8"})

    def check(self, *arguments, **keywords):
        result = self.run(*arguments, **keywords)
        if result.returncode != 0:
            raise AssertionError(f"{arguments} failed ({result.returncode}):\n{result.stdout}")
        return result.stdout

    def start(self, arguments, user, environ, log):
        """Start a long-running command in the namespace; stop() ends it by its PID."""
        with open(log, "wb") as output:
            process = subprocess.Popen(self.command(*arguments, user=user), stdout=output,
                                       stderr=subprocess.STDOUT, env=environ)
        self.processes.append(process)
        return process

    def install(self, deb):
        # man-db's trigger would rebuild its whole index (most of a minute): no index here.
        self.check("sh", "-c", "echo 'man-db man-db/auto-update boolean false' "
                               "| debconf-set-selections")
        return self.check("apt-get", "install", "-y", "-q", "--no-install-recommends", deb,
                          environ={"PATH": CLEAN_PATH, "LANG": "C.UTF-8",
                                   "DEBIAN_FRONTEND": "noninteractive"})

    def stop(self):
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.wait()
        shutil.rmtree(self.work, ignore_errors=True)


def environment_file(text):
    """The variables of a systemd EnvironmentFile (KEY=VALUE lines, values maybe quoted)."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")) and "=" in line:
            key, _, value = line.partition("=")
            words = shlex.split(value)
            values[key.strip()] = " ".join(words)
    return values


def exec_line(line, variables):
    """A unit's Exec*= line as systemd runs it: $NAME is split into words, ${NAME} is not."""
    words = []
    for word in shlex.split(line):
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:
            words.extend(variables.get(whole.group(1), "").split())
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda match: variables.get(match.group(1), ""),
                                word))
    return words


_installed = {}


def installed_system():
    """The package installed in an InstalledSystem, once per process (stopped at exit)."""
    if "error" in _installed:
        raise _installed["error"]
    if not _installed:
        package = built_package()
        system = InstalledSystem()
        atexit.register(system.stop)
        try:
            system.install(package["deb"])
        except AssertionError as error:
            _installed["error"] = error
            raise
        _installed["system"] = system
    return _installed["system"]


class InstalledPackageTests(SynchronousTestCase):
    """The package installed with apt-get, its units' commands run as systemd would."""

    def setUp(self):
        self.system = installed_system()

    def unit(self, name):
        text = read(self.system.path(f"/lib/systemd/system/{name}"))
        return unit_section(text, "Service")

    def configure(self, default_file, variable, value):
        """Set VARIABLE in /etc/default/FILE, as an admin would, and return the unit's variables."""
        path = self.system.path(f"/etc/default/{default_file}")
        text = re.sub(rf'^{variable}=.*$', f'{variable}="{value}"', read(path), flags=re.M)
        with open(path, "w", encoding="utf-8") as file:
            file.write(text)
        return environment_file(text)

    def make_directory(self, path, service, mode_key):
        """A RuntimeDirectory=/StateDirectory= as systemd makes it: owned by User=, its mode."""
        self.system.check("rm", "-rf", path)
        self.system.check("install", "-d", "-o", service["User"][0], "-g", service["Group"][0],
                          "-m", service.get(mode_key, ["0755"])[0], path)

    def service_environ(self, variables):
        return {"PATH": CLEAN_PATH, "LANG": "C.UTF-8", **variables}

    def test_installed(self):
        """apt-get installs it: the user and group exist, the plugin cache trigger ran."""
        passwd = read(self.system.path("/etc/passwd"))
        self.assertRegex(passwd, r"(?m)^milter-manager:x:\d+:\d+:.*:/nonexistent:/usr/sbin/nologin$")
        self.assertRegex(read(self.system.path("/etc/group")), r"(?m)^milter-manager:x:\d+:")
        self.assertIn("milter-manager",
                      self.system.check("twistd3", "--help"))
        self.assertTrue(os.path.isdir(self.system.path("/var/lib/milter-manager")))

    def test_enabled_units(self):
        """Installing enables milter-manager.service; the greylist unit is left to the admin."""
        wants = "/etc/systemd/system/multi-user.target.wants"
        self.assertEqual(os.readlink(self.system.path(f"{wants}/milter-manager.service")),
                         "/lib/systemd/system/milter-manager.service")
        self.assertFalse(os.path.lexists(self.system.path(f"{wants}/milter-manager-greylist.service")))

    def test_manual_pages_installed(self):
        """man finds each installed page by name, as systemd's Documentation=man: does."""
        for page in ("milter-manager", "milter-manager.conf", "milter-manager-greylist",
                     "milter-test-server"):
            result = self.system.run("man", "-w", page)
            self.assertEqual(result.returncode, 0, f"{page}: {result.stdout}")

    def test_systemd_accepts_units(self):
        """systemd-analyze verify finds nothing wrong with either installed unit."""
        if shutil.which("systemd-analyze", path=CLEAN_PATH) is None:
            self.fail("no systemd-analyze: scripts/install-test-deps installs systemd")
        units = ["/lib/systemd/system/milter-manager.service",
                 "/lib/systemd/system/milter-manager-greylist.service"]
        result = self.system.run("env", "SYSTEMD_LOG_LEVEL=warning", "systemd-analyze", "verify",
                                 *units)
        problems = [line for line in result.stdout.splitlines() if "milter-manager" in line]
        self.assertEqual((result.returncode, problems), (0, []), result.stdout)

    def test_manager_unit(self):
        """ExecStartPre and ExecStart as milter-manager: checked, listening, answering a milter.

        The port comes from MILTER_MANAGER_OPTS in /etc/default/milter-manager (the
        unit's EnvironmentFile); the log is standard output only (use_syslog False).
        """
        service = self.unit("milter-manager.service")
        port = free_port()
        variables = self.configure("milter-manager", "MILTER_MANAGER_OPTS",
                                   f"--connection-spec inet:{port}@[127.0.0.1]")
        self.make_directory("/run/milter-manager", service, "RuntimeDirectoryMode")
        environ = self.service_environ(variables)
        user = service["User"][0]
        [check] = service["ExecStartPre"]
        result = self.system.run(*exec_line(check, variables), user=user, environ=environ)
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertIn("configuration OK: /etc/milter-manager/milter-manager.conf",
                      result.stdout.splitlines())

        [start] = service["ExecStart"]
        shown = self.system.run(*exec_line(start, variables), "--show-config", user=user,
                                environ=environ)
        self.assertIn("log.use_syslog = False  # --no-syslog", shown.stdout)

        log = os.path.join(self.mktemp() + ".log")
        manager = self.system.start(exec_line(start, variables), user, environ, log)
        try:
            wait_for_port(port, manager)
            status = read(f"/proc/{manager.pid}/status")
            uid = int(re.search(r"(?m)^Uid:\s+(\d+)", status).group(1))
            passwd = read(self.system.path("/etc/passwd"))
            self.assertEqual(re.search(r"(?m)^milter-manager:x:(\d+):", passwd).group(1), str(uid))
            session = self.system.run("milter-test-server", "-s", f"inet:{port}@[127.0.0.1]",
                                      timeout=60)
            self.assertEqual(session.returncode, 0, session.stdout)
            self.assertRegex(session.stdout, r"^status: \w")
            # systemctl reload: the check passes while the manager holds its address,
            # then SIGHUP to $MAINPID reloads.
            reload_check, reload_signal = service["ExecReload"]
            result = self.system.run(*exec_line(reload_check, variables), user=user,
                                     environ=environ)
            self.assertEqual(result.returncode, 0, result.stdout)
            self.system.check(*exec_line(reload_signal, {"MAINPID": str(manager.pid)}),
                              user=user)
            deadline = time.monotonic() + 30
            while "[reload][start]" not in read(log) and time.monotonic() < deadline:
                time.sleep(0.1)
            self.assertIn("[reload][start]", read(log))
            self.assertNotIn("[reload][error]", read(log))
            self.assertIsNone(manager.poll())
            session = self.system.run("milter-test-server", "-s", f"inet:{port}@[127.0.0.1]",
                                      timeout=60)
            self.assertEqual(session.returncode, 0, session.stdout)
        finally:
            manager.send_signal(signal.SIGTERM)
            manager.wait(timeout=30)
        # twistd ends itself with the signal it got, which systemd counts as a clean stop.
        self.assertIn(manager.returncode, (0, -signal.SIGTERM), read(log))
        self.assertIn("Server Shut Down.", read(log))
        # Standard output is the journal's; each line is on it once.
        self.assertEqual(read(log).count("[manager][start]"), 1, read(log))

    def test_greylist_unit(self):
        """The greylist unit's command as milter-manager opens its database in StateDirectory=."""
        service = self.unit("milter-manager-greylist.service")
        port = free_port()
        variables = self.configure("milter-manager-greylist", "MILTER_MANAGER_GREYLIST_OPTS",
                                   f"-s inet:{port}@[127.0.0.1]")
        state = f"/var/lib/{service['StateDirectory'][0]}"
        self.make_directory(state, service, "StateDirectoryMode")
        [start] = service["ExecStart"]
        log = os.path.join(self.mktemp() + ".log")
        greylist = self.system.start(exec_line(start, variables), service["User"][0],
                                     self.service_environ(variables), log)
        try:
            wait_for_port(port, greylist)
            session = self.system.run(
                "milter-test-server", "-s", f"inet:{port}@[127.0.0.1]",
                "--connect-address", "inet:2525@[192.0.2.7]", timeout=60)
            self.assertEqual(session.returncode, 0, session.stdout)
            self.assertRegex(session.stdout, r"^status: temporary-failure \[451\]<4\.7\.1>")
        finally:
            greylist.send_signal(signal.SIGTERM)
            greylist.wait(timeout=30)
        database = os.stat(self.system.path(f"{state}/greylist.sqlite3"))
        self.assertEqual(database.st_uid, os.stat(self.system.path(state)).st_uid)
        self.assertEqual(stat.S_IMODE(os.stat(self.system.path(state)).st_mode), 0o750)
        self.assertEqual(greylist.returncode, 0, read(log))


class PurgeTests(SynchronousTestCase):
    """apt-get purge leaves nothing of the package behind but its system user."""

    maxDiff = None

    # Changes an install and purge make that are not the package's files: dpkg's, apt's
    # and debconf's own records, locks and logs; the accounts of the system user (kept
    # by design, see README.Debian) and adduser's locks; python3-twisted's plugin cache,
    # which its trigger rebuilds without our plugin (checked below).
    BOOKKEEPING = re.compile(
        r"(var/lib/dpkg/|var/lib/apt/extended_states$|var/log/(apt/|dpkg\.log$)"
        r"|var/cache/(apt|debconf|man)/"
        r"|etc/(passwd|group|shadow|gshadow)-?$|etc/\.pwd\.lock$|run/adduser$"
        r"|usr/lib/python3/dist-packages/twisted/plugins/dropin\.cache$)")

    def setUp(self):
        self.package = built_package()
        self.system = InstalledSystem()
        self.addCleanup(self.system.stop)

    def leftovers(self):
        """Paths the overlays hold that the host does not have: new or changed files."""
        found = []
        for directory in InstalledSystem.OVERLAID:
            upper = self.system.upper(directory)
            for parent, names, files in os.walk(upper):
                for name in names + files:
                    full = os.path.join(parent, name)
                    relative = os.path.relpath(full, os.path.dirname(upper))
                    if os.path.isdir(full) and not os.path.islink(full):
                        if os.path.isdir(f"/{relative}"):
                            continue  # a host directory that holds a change
                        relative += "/"
                    found.append(relative)
        return sorted(found)

    def test_purge(self):
        """After using both units and adding local settings, purge leaves only bookkeeping."""
        self.system.install(self.package["deb"])
        self.system.check("sh", "-c", "echo 'manager.fallback_status = \"reject\"' "
                                      "> /etc/milter-manager/milter-manager.local.conf")
        self.system.check("runuser", "-u", "milter-manager", "--", "touch",
                          "/var/lib/milter-manager/greylist.sqlite3",
                          "/run/milter-manager/milter-manager.sock")
        before = self.leftovers()
        self.assertIn("etc/milter-manager/", before)
        self.assertIn("var/lib/milter-manager/", before)
        self.system.check("apt-get", "purge", "-y", "-q", "milter-manager",
                          environ={"PATH": CLEAN_PATH, "LANG": "C.UTF-8",
                                   "DEBIAN_FRONTEND": "noninteractive"})
        status = self.system.run("dpkg-query", "-W", "-f", "${Status}", "milter-manager")
        self.assertNotIn("installed", status.stdout)
        left = [path for path in self.leftovers() if not self.BOOKKEEPING.match(path)]
        self.assertEqual(left, [])
        for path in ("/etc/milter-manager", "/etc/default/milter-manager",
                     "/var/lib/milter-manager", "/run/milter-manager",
                     "/lib/systemd/system/milter-manager.service", "/usr/bin/milter-test-server",
                     "/usr/lib/python3/dist-packages/miltermanager"):
            self.assertFalse(os.path.lexists(self.system.path(path)), path)
        # The system user is kept (Debian's usual choice, README.Debian says why).
        self.assertRegex(read(self.system.path("/etc/passwd")), r"(?m)^milter-manager:")
        cache = self.system.path("/usr/lib/python3/dist-packages/twisted/plugins/dropin.cache")
        if os.path.exists(cache):
            with open(cache, "rb") as file:
                self.assertNotIn(b"milter_manager", file.read())
