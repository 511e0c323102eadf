"""Tests for milter detection: fake /etc trees of every platform, the configuration, the CLI."""

import io
import json
import os
import random
import shutil
import socket
import tempfile
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from miltermanager import config, detect, tap
from miltermanager.detect import main as detect_main
from miltermanager.detect.apply import detect_milters
from miltermanager.detect.shell import Tree as ShellTree
from miltermanager.detect.shell import Variables, condition_holds, running_lines
from miltermanager.detect.specs import BadSpec, host_port, normalise
from tests import detect_trees

GREYLIST = ["Sendmail Compatible", "Stress Notify", "Trust", "Remote Network", "S25R",
            "Unauthenticated"]
FILTER = ["Remote Network", "Unauthenticated", "No Stress"]

OPENDKIM_UNIT = """\
[Unit]
Description=OpenDKIM Milter
After=network-online.target nss-lookup.target

[Service]
Type=forking
PIDFile=/run/opendkim/opendkim.pid
ExecStart=/usr/sbin/opendkim
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""

# Debian 12's own /etc/init.d/spamass-milter (package 0.4.0-2), as installed.
SPAMASS_INIT = detect_trees.fixture("debian-spamass-milter.init")

CLAMAV_INIT = """\
#!/bin/sh
### BEGIN INIT INFO
# Provides:          clamav-milter
# Description:       Clam AntiVirus milter interface
### END INIT INFO
NAME=clamav-milter
CLAMAVCONF=/etc/clamav/clamav-milter.conf
slurp_config()
{
  CLAMAVCONF="$1"
}
"""

OPENDKIM_RC = """\
#!/bin/sh
# PROVIDE: milter-opendkim
. /etc/rc.subr

name="milteropendkim"
rcvar=milteropendkim_enable
command="/usr/local/sbin/opendkim"

load_rc_config $name

: ${milteropendkim_enable:="NO"}
: ${milteropendkim_socket:="inet:8891@localhost"}
command_args="-l -p ${milteropendkim_socket}"
run_rc_command "$1"
"""


class Tree:
    """A fake root: files written at their real paths under a temporary directory."""

    def __init__(self, test):
        self.root = os.path.abspath(test.mktemp())
        os.makedirs(self.root)

    def write(self, path, text):
        real = os.path.join(self.root, path.lstrip("/"))
        os.makedirs(os.path.dirname(real), exist_ok=True)
        with open(real, "w", encoding="utf-8") as file:
            file.write(textwrap.dedent(text))
        return path

    def link(self, path, target):
        real = os.path.join(self.root, path.lstrip("/"))
        os.makedirs(os.path.dirname(real), exist_ok=True)
        os.symlink(target, real)

    def directory(self, path):
        os.makedirs(os.path.join(self.root, path.lstrip("/")), exist_ok=True)

    def detect(self, platform="debian", options=None):
        return detect.detect(platform, self.root, options)

    def enable(self, name):
        self.link(f"/etc/systemd/system/multi-user.target.wants/{name}.service",
                  f"/lib/systemd/system/{name}.service")


def found(name, spec, enabled, source, description=None, conditions=(), tarpit=None,
          note=None):
    return detect.Found(name, spec, enabled, source, description, list(conditions),
                        tarpit=tarpit, note=note)


class SpecTests(SynchronousTestCase):
    def test_forms(self):
        """Each milter's and Postfix's way of writing a socket becomes one spec."""
        for written, expected in [
                ("local:/run/opendkim/opendkim.sock", "unix:/run/opendkim/opendkim.sock"),
                ("/var/run/clamav/clamav-milter.ctl", "unix:/var/run/clamav/clamav-milter.ctl"),
                ("unix:/run/a.sock", "unix:/run/a.sock"),
                ("unix:unix:/run/a.sock", "unix:/run/a.sock"),
                ("local:unix:/run/a.sock", "unix:/run/a.sock"),
                ("inet:8891@localhost", "inet:8891@[127.0.0.1]"),
                ("inet:8891", "inet:8891@[127.0.0.1]"),
                ("inet:8891@0.0.0.0", "inet:8891@[127.0.0.1]"),
                ("inet:8891@192.0.2.7", "inet:8891@[192.0.2.7]"),
                ("inet:8891@[192.0.2.7]", "inet:8891@[192.0.2.7]"),
                ("inet:8891@mail.example.com", "inet:8891@mail.example.com"),
                ("inet:localhost:8891", "inet:8891@[127.0.0.1]"),
                ("inet:192.0.2.7:8891", "inet:8891@[192.0.2.7]"),
                ("inet:[::1]:8891", "inet6:8891@[::1]"),
                ("inet6:8891", "inet6:8891@[::1]"),
                ("inet6:8891@[2001:db8::1]", "inet6:8891@[2001:db8::1]"),
                ('  "inet:8891@localhost" ', "inet:8891@[127.0.0.1]")]:
            self.assertEqual(normalise(written), expected, written)

    def test_ipv6_loopback(self):
        """IPv6 loopback and any-address stay IPv6: the milter may listen on IPv6 only."""
        for written, expected in [
                ("inet:25@[::1]", "inet6:25@[::1]"),
                ("inet:25@::1", "inet6:25@[::1]"),
                ("inet:25@[::]", "inet6:25@[::1]"),
                ("inet6:25@localhost", "inet6:25@[::1]"),
                ("inet:25@ip6-localhost", "inet6:25@[::1]"),
                ("inet:[::]:25", "inet6:25@[::1]"),
                ("inet6:25@0.0.0.0", "inet:25@[127.0.0.1]"),
                ("inet:25@127.0.0.1", "inet:25@[127.0.0.1]")]:
            self.assertEqual(normalise(written), expected, written)
        self.assertEqual(host_port("[::]:11332"), "inet6:11332@[::1]")
        self.assertEqual(host_port("*:11332"), "inet:11332@[127.0.0.1]")

    def test_bad(self):
        """What is no socket says why."""
        for written, reason in [
                ("banana", "socket 'banana' has no type and is not a path"),
                ("local:run/x.sock", "socket 'local:run/x.sock' is not an absolute path"),
                ("inet:http@localhost", "socket 'inet:http@localhost' has no valid port"),
                ("inet:70000", "socket 'inet:70000' has no valid port"),
                ("tcp:8891", "socket 'tcp:8891' has an unknown type 'tcp'"),
                ("local:$RUNDIR/x.sock", "socket 'local:$RUNDIR/x.sock' uses a shell variable "
                                         "or command that is not set where it is read"),
                ("", "empty socket")]:
            with self.assertRaises(BadSpec) as caught:
                normalise(written)
            self.assertEqual(str(caught.exception), reason)


class ShellTests(SynchronousTestCase):
    def test_assignments(self):
        """VAR=value lines with quotes, $VAR, ${VAR:-default}; single quotes stay literal."""
        variables = Variables()
        variables.read_assignments(textwrap.dedent("""\
            RUNDIR=/run/x   # comment
            SOCKET="local:$RUNDIR/x.sock"
            export OTHER=${UNSET:-/d}/y
            LITERAL='$RUNDIR'
            ARGUMENT="$1"
            """), "/etc/default/x")
        self.assertEqual(variables.values, {"RUNDIR": "/run/x", "SOCKET": "local:/run/x/x.sock",
                                            "OTHER": "/d/y", "LITERAL": "$RUNDIR"})
        self.assertEqual(variables.origin("SOCKET"), "/etc/default/x")


class LinkLoopTests(SynchronousTestCase):
    """A chain of more than 40 symbolic links never leads out of the tree."""

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.root, "etc"))
        outside = os.path.abspath(self.mktemp())
        os.makedirs(outside)
        self.secret = os.path.join(outside, "secret")
        with open(self.secret, "w") as file:
            file.write("outside the tree\n")
        # /etc/a1 -> /etc/a2 -> ... -> /etc/a41 -> the file outside, by its host path.
        for number in range(1, 42):
            os.symlink(f"/etc/a{number + 1}", os.path.join(self.root, "etc", f"a{number}"))
        os.symlink(self.secret, os.path.join(self.root, "etc", "a42"))
        self.tree = ShellTree(self.root)

    def test_read_is_skipped(self):
        error = self.assertRaises(detect.Skip, self.tree.read, "/etc/a1")
        self.assertEqual(error.reason, "too many levels of symbolic links")

    def test_tests_are_false(self):
        self.assertFalse(self.tree.exists("/etc/a1"))
        self.assertFalse(self.tree.isfile("/etc/a1"))
        self.assertEqual(self.tree.glob("/etc/a1"), [])
        self.assertIs(condition_holds("[ -f /etc/a1 ]", self.tree, Variables()), False)

    def test_reachability(self):
        self.assertEqual(detect.connect_error("unix:/etc/a1", root=self.root),
                         "too many levels of symbolic links")


class ConditionTests(SynchronousTestCase):
    """`if` branches decided by file tests against the tree, as the shell would decide them."""

    def setUp(self):
        self.tree = Tree(self)
        self.tree.write("/usr/sbin/postfix", "#!/bin/sh\n")
        os.chmod(os.path.join(self.tree.root, "usr/sbin/postfix"), 0o755)
        self.tree.write("/etc/plain", "x\n")
        self.tree.write("/etc/empty", "")
        self.tree.directory("/var/spool/postfix")
        self.shell = ShellTree(self.tree.root)

    def holds(self, text, **values):
        variables = Variables()
        for name, value in values.items():
            variables.set(name, value, "/x")
        return condition_holds(text, self.shell, variables)

    def test_file_tests(self):
        """-x -f -d -e -r -s -L, `!` and `test` against the tree; not the host's files."""
        for text, expected in [
                ("[ -x /usr/sbin/postfix ]", True), ("[ -x /etc/plain ]", False),
                ("[ -f /etc/plain ]", True), ("[ -f /var/spool/postfix ]", False),
                ("[ -d /var/spool/postfix ]", True), ("[ -e /etc/absent ]", False),
                ("[ -e /bin/sh ]", False), ("[ -r /etc/plain ]", True),
                ("[ -s /etc/empty ]", False), ("[ -s /etc/plain ]", True),
                ("[ -L /etc/plain ]", False), ("[ ! -x /usr/sbin/postfix ]", False),
                ("! [ -e /etc/absent ]", True), ("test -f /etc/plain", True),
                ('[ -r "$DEFAULT" ]', True), ("[ -r $UNSET ]", None),
                ("[ -x usr/sbin/postfix ]", None), ('[ -n "$X" ]', None),
                ("grep -q x /etc/plain", None)]:
            self.assertEqual(self.holds(text, DEFAULT="/etc/plain"), expected, text)

    def test_and_or(self):
        """&& and || left to right; an unknown part decides nothing unless the other does."""
        for text, expected in [
                ("[ -e /etc/absent ] && egrep -q x /etc/absent", False),
                ("[ -e /etc/plain ] && egrep -q x /etc/plain", None),
                ("[ -e /etc/plain ] && [ -d /var/spool/postfix ]", True),
                ("[ -e /etc/absent ] || [ -f /etc/plain ]", True),
                ("egrep -q x /etc/plain || [ -f /etc/plain ]", True),
                ("[ -e /etc/absent ] || egrep -q x /etc/plain", None),
                ("[ -e /etc/absent ] && [ -f /etc/plain ] || [ -d /etc/plain ]", False),
                ("[ -e /etc/plain ] | cat", None)]:
            self.assertEqual(self.holds(text), expected, text)

    def test_branches(self):
        """Only the lines of branches that run (or may run) are read."""
        text = textwrap.dedent("""\
            A=1
            if [ -x /usr/sbin/postfix ]; then
                B=postfix
                if [ -e /etc/absent ]
                then
                    C=never
                else
                    C=else
                fi
            elif [ -e /etc/plain ]; then
                B=elif
            else
                B=else
            fi;
            if [ -e /etc/absent ]; then D=never; fi
            if [ -e /etc/plain ]; then E=one-line; fi
            if grep -q x /etc/plain; then
                F=unknown
            else
                F=unknown-else
            fi
            if [ -e /etc/absent ]; then
                G=no
            elif [ -f /etc/plain ]; then
                G=elif
            fi
            """)
        self.assertEqual(list(running_lines(text, self.shell, Variables())), [
            "A=1", "    B=postfix", "        C=else", "E=one-line", "    F=unknown",
            "    F=unknown-else", "    G=elif"])
        variables = Variables()
        variables.read_assignments(text, "/x", tree=self.shell)
        self.assertEqual(variables.values, {"A": "1", "B": "postfix", "C": "else",
                                            "E": "one-line", "F": "unknown-else", "G": "elif"})


class MatrixTests(SynchronousTestCase):
    """The detection matrix of docs/detection.md: every platform and milter, broken cases."""

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def test_platforms(self):
        """Each platform's tree with all six milters: the socket each is found on, from where."""
        self.assertEqual(detect_trees.matrix(self.directory), MATRIX)

    def test_cases(self):
        """Variants and broken files: the socket, or the skip with its file and reason."""
        self.assertEqual(detect_trees.cases(self.directory), CASES)

    def test_docs(self):
        """docs/detection.md holds the matrix as scripts/detection-matrix prints it."""
        docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "docs", "detection.md")
        with open(docs, encoding="utf-8") as file:
            self.assertIn(detect_trees.markdown(self.directory), file.read())


MATRIX = {
    ("debian", "opendkim"): "`unix:/run/opendkim/opendkim.sock` from `/etc/opendkim.conf`",
    ("debian", "opendmarc"): "`unix:/run/opendmarc/opendmarc.sock` from `/etc/opendmarc.conf`",
    ("debian", "clamav-milter"):
        "`unix:/var/run/clamav/clamav-milter.ctl` from `/etc/clamav/clamav-milter.conf`",
    ("debian", "spamass-milter"):
        "`unix:/var/spool/postfix/spamass/spamass.sock` from `/etc/init.d/spamass-milter`",
    ("debian", "milter-greylist"): "`unix:/var/run/milter-greylist/milter-greylist.sock` "
                                   "from `/etc/milter-greylist/greylist.conf`",
    ("debian", "rspamd"): "`inet:11332@[127.0.0.1]` from `/etc/rspamd/worker-proxy.inc`",
    ("redhat", "opendkim"): "`inet:8891@[127.0.0.1]` from `/etc/opendkim.conf`",
    ("redhat", "opendmarc"): "`inet:8893@[127.0.0.1]` from `/etc/opendmarc.conf`",
    ("redhat", "clamav-milter"):
        "`unix:/run/clamav-milter/clamav-milter.socket` from `/etc/mail/clamav-milter.conf`",
    ("redhat", "spamass-milter"):
        "`unix:/run/spamass-milter/spamass-milter.sock` from `/etc/sysconfig/spamass-milter`",
    ("redhat", "milter-greylist"):
        "`unix:/run/milter-greylist/milter-greylist.sock` from `/etc/mail/greylist.conf`",
    ("redhat", "rspamd"):
        "`unix:/run/rspamd/milter.sock` from `/etc/rspamd/local.d/worker-proxy.inc`",
    ("freebsd", "opendkim"):
        "milter-opendkim: `inet:8891@[127.0.0.1]` from `/usr/local/etc/rc.d/milter-opendkim`",
    ("freebsd", "opendmarc"): "`inet:8893@[127.0.0.1]` from `/usr/local/etc/rc.d/opendmarc`",
    ("freebsd", "clamav-milter"):
        "`unix:/var/run/clamav/clmilter.sock` from `/usr/local/etc/clamav-milter.conf`",
    ("freebsd", "spamass-milter"):
        "`unix:/var/run/spamass-milter.sock` from `/usr/local/etc/rc.d/spamass-milter`",
    ("freebsd", "milter-greylist"): "`unix:/var/milter-greylist/milter-greylist.sock` from "
                                    "`/usr/local/etc/mail/greylist.conf`",
    ("freebsd", "rspamd"):
        "`inet:11332@[127.0.0.1]` from `/usr/local/etc/rspamd/worker-proxy.inc`",
    ("pkgsrc", "opendkim"): "dkim-filter: `unix:/var/run/dkim-filter/dkim-filter.sock` from "
                            "`/usr/pkg/etc/rc.d/dkim-filter`",
    ("pkgsrc", "opendmarc"): "`inet:8893@[127.0.0.1]` from `/usr/pkg/etc/opendmarc.conf`",
    ("pkgsrc", "clamav-milter"): "not a candidate",
    ("pkgsrc", "spamass-milter"):
        "`unix:/var/run/spamass.sock` from `/usr/pkg/etc/rc.d/spamass-milter`",
    ("pkgsrc", "milter-greylist"):
        "`unix:/var/run/milter-greylist.sock` from `/usr/pkg/etc/mail/greylist.conf`",
    ("pkgsrc", "rspamd"): "not a candidate",
}

CASES = [
    ("debian", "spamass-milter", "Debian's own files, Postfix not installed",
     "`unix:/var/run/spamass/spamass.sock` from `/etc/init.d/spamass-milter`"),
    ("debian", "opendkim", "Socket written twice with different values",
     ("skipped: `/etc/opendkim.conf`: Socket is set more than once with different values "
      "(line 1: 'inet:8891@localhost', line 2: 'local:/run/o.sock'); which one the milter "
      "uses is unclear")),
    ("debian", "opendkim", "the unit's -x names a file that is not there",
     ("skipped: `/etc/opendkim/opendkim.conf`: missing, yet "
      "/lib/systemd/system/opendkim.service names it as opendkim's configuration")),
    ("debian", "opendkim", "init script, SOCKET uses $RUNDIR, which nothing sets",
     ("skipped: `/etc/default/opendkim`: SOCKET: socket 'local:$RUNDIR/opendkim.sock' uses a "
      "shell variable or command that is not set where it is read")),
    ("debian", "opendmarc", "unit, but no opendmarc.conf",
     ("skipped: `/lib/systemd/system/opendmarc.service`: no socket found (looked for -p in "
      "ExecStart; a socket in /etc/opendmarc.conf; the variables SOCKET, SOCKFILE, "
      "CONNECTION_SPEC)")),
    ("debian", "clamav-milter", "clamav-milter.conf still the example",
     ("skipped: `/etc/clamav/clamav-milter.conf`: still the example configuration (an "
      "Example line, no MilterSocket): clamav-milter is not configured")),
    ("debian", "rspamd", "proxy worker not in milter mode",
     ("skipped: `/etc/rspamd/override.d/worker-proxy.inc`: rspamd's proxy worker is not in "
      "milter mode (milter = yes)")),
    ("redhat", "spamass-milter", "the unit's EnvironmentFile= (no '-') is missing",
     ("skipped: `/etc/sysconfig/spamass-milter`: missing, and "
      "/usr/lib/systemd/system/spamass-milter.service needs it (EnvironmentFile= without "
      "'-'): the service cannot start")),
    ("redhat", "opendkim", "unit masked (linked to /dev/null)",
     "`inet:8891@[127.0.0.1]` (disabled) from `/etc/opendkim.conf`"),
    ("freebsd", "spamass-milter", "rc.d script without name=",
     ("skipped: `/usr/local/etc/rc.d/spamass-milter`: no name= line: the rc.d script's "
      "variables cannot be known")),
    ("pkgsrc", "milter-greylist", "greylist.conf socket is a relative path",
     ("skipped: `/usr/pkg/etc/mail/greylist.conf`: socket: socket 'var/run/greylist.sock' has "
      "no type and is not a path")),
]


class DebianSystemdTests(SynchronousTestCase):
    def setUp(self):
        self.tree = Tree(self)

    def opendkim(self, socket_line="Socket local:/run/opendkim/opendkim.sock\n"):
        self.tree.write("/lib/systemd/system/opendkim.service", OPENDKIM_UNIT)
        self.tree.write("/etc/opendkim.conf", "Syslog yes\nUMask 007\n" + socket_line)

    def test_opendkim(self):
        """An enabled unit and opendkim.conf's Socket."""
        self.opendkim()
        self.tree.enable("opendkim")
        report = self.tree.detect()
        self.assertEqual(report.found, [found(
            "opendkim", "unix:/run/opendkim/opendkim.sock", True, "/etc/opendkim.conf",
            "OpenDKIM Milter")])
        self.assertEqual(report.skipped, [])
        self.assertEqual(report.direct, [])

    def test_not_enabled(self):
        """Without a wants link the milter is found disabled, with why."""
        self.opendkim("Socket inet:8891@localhost\n")
        self.assertEqual(self.tree.detect().found, [found(
            "opendkim", "inet:8891@[127.0.0.1]", False, "/etc/opendkim.conf", "OpenDKIM Milter",
            note="not enabled: no /etc/systemd/system/*.wants/opendkim.service link "
                 "(systemctl enable)")])

    def test_masked(self):
        """A unit masked to /dev/null is disabled, even with a wants link."""
        self.opendkim()
        self.tree.enable("opendkim")
        self.tree.link("/etc/systemd/system/opendkim.service", "/dev/null")
        [result] = self.tree.detect().found
        self.assertEqual((result.enabled, result.note), (
            False, "masked (/etc/systemd/system/opendkim.service points to /dev/null)"))

    def test_dropin_socket_option(self):
        """A drop-in's ExecStart -p wins over opendkim.conf, as opendkim reads them."""
        self.opendkim()
        self.tree.enable("opendkim")
        path = self.tree.write("/etc/systemd/system/opendkim.service.d/override.conf", """\
            [Service]
            ExecStart=
            ExecStart=/usr/sbin/opendkim -P /run/opendkim/opendkim.pid -p inet:12345@localhost
            """)
        self.assertEqual(self.tree.detect().found, [found(
            "opendkim", "inet:12345@[127.0.0.1]", True, path, "OpenDKIM Milter")])

    def test_environment_file_names_config(self):
        """$OPTIONS from the unit's EnvironmentFile names another opendkim.conf (-x)."""
        self.tree.write("/lib/systemd/system/opendkim.service", """\
            [Unit]
            Description=OpenDKIM
            [Service]
            EnvironmentFile=-/etc/default/opendkim
            EnvironmentFile=-/etc/default/absent
            ExecStart=/usr/sbin/opendkim $OPTIONS
            """)
        self.tree.write("/etc/default/opendkim", 'OPTIONS="-x /etc/dkim/other.conf -u dkim"\n')
        self.tree.write("/etc/dkim/other.conf", "Socket inet:9999@192.0.2.1\n")
        self.tree.enable("opendkim")
        self.assertEqual(self.tree.detect().found, [found(
            "opendkim", "inet:9999@[192.0.2.1]", True, "/etc/dkim/other.conf", "OpenDKIM")])

    def test_named_config_missing(self):
        """A -x file that does not exist skips the milter, naming who names it."""
        self.tree.write("/lib/systemd/system/opendkim.service",
                        "[Service]\nExecStart=/usr/sbin/opendkim -x /etc/nope.conf\n")
        self.assertEqual(self.tree.detect().skipped, [detect.Skipped(
            "opendkim", "/etc/nope.conf",
            "missing, yet /lib/systemd/system/opendkim.service names it as opendkim's "
            "configuration")])

    def test_required_environment_file_missing(self):
        """EnvironmentFile= without '-' that is missing: the unit cannot start, skipped."""
        self.tree.write("/lib/systemd/system/spamass-milter.service", """\
            [Service]
            EnvironmentFile=/etc/default/spamass-milter
            ExecStart=/usr/sbin/spamass-milter -p $SOCKET
            """)
        self.assertEqual(self.tree.detect().skipped, [detect.Skipped(
            "spamass-milter", "/etc/default/spamass-milter",
            "missing, and /lib/systemd/system/spamass-milter.service needs it "
            "(EnvironmentFile= without '-'): the service cannot start")])

    def test_socket_from_environment_variable(self):
        """-p $SOCKET: the socket, and the file that set it."""
        self.tree.write("/lib/systemd/system/spamass-milter.service", """\
            [Service]
            Environment=SOCKET=/run/wrong.sock
            EnvironmentFile=/etc/default/spamass-milter
            ExecStart=/usr/sbin/spamass-milter -p ${SOCKET} -- -u spamd
            """)
        self.tree.write("/etc/default/spamass-milter", "SOCKET=/run/spamass/spamass.sock\n")
        self.tree.enable("spamass-milter")
        self.assertEqual(self.tree.detect().found, [found(
            "spamass-milter", "unix:/run/spamass/spamass.sock", True,
            "/etc/default/spamass-milter", conditions=FILTER)])

    def test_no_config_file(self):
        """A unit whose milter has no socket anywhere is skipped, saying where it looked."""
        self.tree.write("/lib/systemd/system/opendkim.service", OPENDKIM_UNIT)
        self.assertEqual(self.tree.detect().skipped, [detect.Skipped(
            "opendkim", "/lib/systemd/system/opendkim.service",
            "no socket found (looked for -p in ExecStart; a socket in /etc/opendkim.conf; "
            "the variables SOCKET, SOCKFILE, CONNECTION_SPEC)")])

    def test_contradictory_socket(self):
        """Two different Socket lines: which one opendkim uses is unclear, skipped."""
        self.opendkim("Socket inet:8891@localhost\n# Socket local:/x\nSocket local:/run/o.sock\n")
        self.assertEqual(self.tree.detect().skipped, [detect.Skipped(
            "opendkim", "/etc/opendkim.conf",
            "Socket is set more than once with different values (line 3: "
            "'inet:8891@localhost', line 5: 'local:/run/o.sock'); which one the milter uses "
            "is unclear")])

    def test_garbage(self):
        """Lines that mean nothing are passed over; a Socket that is none skips, saying why."""
        self.opendkim("\x00\x01 binary junk\n===\nSocket inet:8891\n")
        self.assertEqual(self.tree.detect().found[0].connection_spec, "inet:8891@[127.0.0.1]")
        self.opendkim("Socket banana\n")
        self.assertEqual(self.tree.detect().skipped, [detect.Skipped(
            "opendkim", "/etc/opendkim.conf",
            "Socket: socket 'banana' has no type and is not a path")])

    def test_unreadable(self):
        """A configuration that cannot be read skips the milter with the system's reason."""
        self.tree.write("/lib/systemd/system/opendkim.service", OPENDKIM_UNIT)
        self.tree.directory("/etc/opendkim.conf")
        self.assertEqual(self.tree.detect().skipped, [detect.Skipped(
            "opendkim", "/etc/opendkim.conf", "cannot read it: Is a directory")])

    def test_opendmarc_after_opendkim(self):
        """OpenDMARC is found after OpenDKIM (it reads what OpenDKIM adds), for remote mail."""
        self.opendkim()
        self.tree.write("/lib/systemd/system/opendmarc.service",
                        "[Unit]\nDescription=OpenDMARC Milter\n[Service]\n"
                        "ExecStart=/usr/sbin/opendmarc\n")
        self.tree.write("/etc/opendmarc.conf", "PidFile /run/opendmarc/opendmarc.pid\n"
                                               "Socket inet:8893@localhost\n")
        self.tree.enable("opendmarc")
        self.assertEqual(self.tree.detect().found, [
            found("opendkim", "unix:/run/opendkim/opendkim.sock", False, "/etc/opendkim.conf",
                  "OpenDKIM Milter", note="not enabled: no /etc/systemd/system/*.wants/"
                                          "opendkim.service link (systemctl enable)"),
            found("opendmarc", "inet:8893@[127.0.0.1]", True, "/etc/opendmarc.conf",
                  "OpenDMARC Milter", ["Remote Network", "Unauthenticated"])])

    def test_rspamd_proxy(self):
        """rspamd's proxy worker in milter mode; local.d and override.d win over the default."""
        self.tree.write("/lib/systemd/system/rspamd.service",
                        "[Unit]\nDescription=rapid spam filtering system\n[Service]\n"
                        "ExecStart=/usr/bin/rspamd -c /etc/rspamd/rspamd.conf -f\n")
        self.tree.enable("rspamd")
        self.tree.write("/etc/rspamd/worker-proxy.inc", """\
            milter = yes; # Enable milter mode
            timeout = 120s;
            upstream "local" {
              default = yes;
              bind_socket = "nowhere:1";
            }
            bind_socket = "localhost:11332";
            """)
        self.assertEqual(self.tree.detect().found, [found(
            "rspamd", "inet:11332@[127.0.0.1]", True, "/etc/rspamd/worker-proxy.inc",
            "rapid spam filtering system", FILTER)])
        path = self.tree.write("/etc/rspamd/local.d/worker-proxy.inc",
                               'bind_socket = "/run/rspamd/milter.sock mode=0660";\n')
        self.assertEqual(self.tree.detect().found[0].connection_spec,
                         "unix:/run/rspamd/milter.sock")
        self.assertEqual(self.tree.detect().found[0].source, path)
        self.tree.write("/etc/rspamd/override.d/worker-proxy.inc", "milter = no;\n")
        self.assertEqual(self.tree.detect().skipped, [detect.Skipped(
            "rspamd", "/etc/rspamd/override.d/worker-proxy.inc",
            "rspamd's proxy worker is not in milter mode (milter = yes)")])

    def test_greylist_tarpit(self):
        """milter-greylist's socket from the -f file, and its longest tarpit in seconds."""
        self.tree.write("/lib/systemd/system/milter-greylist.service",
                        "[Service]\nExecStart=/usr/sbin/milter-greylist -D -f /etc/mail/g.conf\n")
        self.tree.write("/etc/mail/g.conf", """\
            # socket "/commented.sock"
            socket "/run/milter-greylist/milter-greylist.sock" 660
            racl whitelist list "my network"
            racl greylist default tarpit 2m \\
                 delay 15m
            racl greylist list "late" tarpit 30s
            dacl continue default
            """)
        self.tree.enable("milter-greylist")
        self.assertEqual(self.tree.detect().found, [found(
            "milter-greylist", "unix:/run/milter-greylist/milter-greylist.sock", True,
            "/etc/mail/g.conf", conditions=GREYLIST, tarpit=120)])


class DebianInitTests(SynchronousTestCase):
    def setUp(self):
        self.tree = Tree(self)

    def test_spamass_milter(self):
        """An init script, /etc/default overriding it, S links in the runlevels."""
        self.tree.write("/etc/init.d/spamass-milter", SPAMASS_INIT)
        self.tree.write("/etc/default/spamass-milter", """\
            OPTIONS="-u spamass-milter -i 127.0.0.1"
            SOCKET="/run/milter-test/spamass.sock"
            """)
        for level in "2345":
            self.tree.link(f"/etc/rc{level}.d/S01spamass-milter", "../init.d/spamass-milter")
        self.assertEqual(self.tree.detect().found, [found(
            "spamass-milter", "unix:/run/milter-test/spamass.sock", True,
            "/etc/default/spamass-milter",
            "Calls spamassassin to allow filtering out spam from ham in libmilter compatible "
            "MTAs.", FILTER)])

    def test_script_default_postfix_branch(self):
        """Debian's own script and /etc/default: the socket of the branch that runs in the tree.

        The script sets /var/run/spamass/spamass.sock, then, inside
        `if [ -x /usr/sbin/postfix ]`, /var/spool/postfix/spamass/spamass.sock.
        """
        self.tree.write("/etc/init.d/spamass-milter", SPAMASS_INIT)
        self.tree.write("/etc/default/spamass-milter",
                        detect_trees.fixture("debian-spamass-milter.default"))

        def result():
            [found_] = self.tree.detect().found
            return found_.connection_spec, found_.source, found_.enabled

        self.assertEqual(result(), ("unix:/var/run/spamass/spamass.sock",
                                    "/etc/init.d/spamass-milter", True))
        self.tree.write("/usr/sbin/postfix", "not executable\n")
        self.assertEqual(result()[0], "unix:/var/run/spamass/spamass.sock")
        os.chmod(os.path.join(self.tree.root, "usr/sbin/postfix"), 0o755)
        self.assertEqual(result(), ("unix:/var/spool/postfix/spamass/spamass.sock",
                                    "/etc/init.d/spamass-milter", True))

    def test_postfix_link_inside_root(self):
        """/usr/sbin/postfix as an absolute link is followed inside the tree, not on this host."""
        self.tree.write("/etc/init.d/spamass-milter", SPAMASS_INIT)
        self.tree.link("/usr/sbin/postfix", "/bin/sh")  # exists on this host, not in the tree
        self.assertEqual(self.tree.detect().found[0].connection_spec,
                         "unix:/var/run/spamass/spamass.sock")
        self.tree.write("/bin/sh", "#!/bin/true\n")
        os.chmod(os.path.join(self.tree.root, "bin/sh"), 0o755)
        self.assertEqual(self.tree.detect().found[0].connection_spec,
                         "unix:/var/spool/postfix/spamass/spamass.sock")

    def test_enabled_zero(self):
        """ENABLED=0 in /etc/default disables it."""
        self.tree.write("/etc/init.d/spamass-milter", SPAMASS_INIT)
        self.tree.write("/etc/default/spamass-milter", "ENABLED=0\n")
        [result] = self.tree.detect().found
        self.assertEqual((result.enabled, result.note),
                         (False, "ENABLED=0 in /etc/default/spamass-milter"))

    def test_disabled_links(self):
        """Only K links (update-rc.d disable, systemctl disable): disabled."""
        self.tree.write("/etc/init.d/spamass-milter", SPAMASS_INIT)
        for level in "2345":
            self.tree.link(f"/etc/rc{level}.d/K01spamass-milter", "../init.d/spamass-milter")
        [result] = self.tree.detect().found
        self.assertEqual((result.enabled, result.note), (
            False, "not enabled: no /etc/rc[2345].d/S??spamass-milter link "
                   "(update-rc.d or chkconfig)"))

    def test_unset_variable(self):
        """A socket built from a variable nobody sets is skipped with the text as written."""
        self.tree.write("/etc/init.d/opendkim", "#!/bin/sh\nNAME=opendkim\n")
        self.tree.write("/etc/default/opendkim", "SOCKET=local:$RUNDIR/opendkim.sock\n")
        self.assertEqual(self.tree.detect().skipped, [detect.Skipped(
            "opendkim", "/etc/default/opendkim",
            "SOCKET: socket 'local:$RUNDIR/opendkim.sock' uses a shell variable or command "
            "that is not set where it is read")])

    def test_clamav(self):
        """clamav-milter: CLAMAVCONF names the file (not the function's "$1"), MilterSocket."""
        self.tree.write("/etc/init.d/clamav-milter", CLAMAV_INIT)
        self.tree.write("/etc/clamav/clamav-milter.conf",
                        "MilterSocket /var/run/clamav/clamav-milter.ctl\nUser clamav\n")
        self.assertEqual(self.tree.detect().found, [found(
            "clamav-milter", "unix:/var/run/clamav/clamav-milter.ctl", True,
            "/etc/clamav/clamav-milter.conf", "Clam AntiVirus milter interface")])

    def test_clamav_example(self):
        """An Example line: unconfigured, so found disabled; without MilterSocket, skipped."""
        self.tree.write("/etc/init.d/clamav-milter", CLAMAV_INIT)
        self.tree.write("/etc/clamav/clamav-milter.conf",
                        "Example\nMilterSocket inet:7357\n")
        [result] = self.tree.detect().found
        self.assertEqual((result.connection_spec, result.enabled, result.note), (
            "inet:7357@[127.0.0.1]", False,
            "/etc/clamav/clamav-milter.conf still has its Example line: clamav-milter is not "
            "configured"))
        self.tree.write("/etc/clamav/clamav-milter.conf", "Example\n#MilterSocket inet:7357\n")
        self.assertEqual(self.tree.detect().skipped, [detect.Skipped(
            "clamav-milter", "/etc/clamav/clamav-milter.conf",
            "still the example configuration (an Example line, no MilterSocket): "
            "clamav-milter is not configured")])

    def test_no_socket(self):
        """An init script with no socket anywhere is skipped."""
        self.tree.write("/etc/init.d/amavisd-new-milter", "#!/bin/sh\nDAEMON=/usr/sbin/x\n")
        self.assertEqual(self.tree.detect().skipped, [detect.Skipped(
            "amavisd-new-milter", "/etc/init.d/amavisd-new-milter",
            "no socket found (looked for -p in OPTARGS DAEMON_ARGS PARAMS OPTIONS "
            "DAEMON_OPTS; the variables SOCKET, SOCKFILE, CONNECTION_SPEC)")])

    def test_nothing_installed(self):
        """An empty system: nothing found, nothing skipped."""
        report = self.tree.detect()
        self.assertEqual((report.found, report.skipped), ([], []))


class RedHatTests(SynchronousTestCase):
    def setUp(self):
        self.tree = Tree(self)

    def test_systemd_sysconfig(self):
        """A unit in /usr/lib/systemd/system with /etc/sysconfig, its socket from -p."""
        self.tree.write("/usr/lib/systemd/system/spamass-milter.service", """\
            [Unit]
            Description=Mail filter for SpamAssassin
            [Service]
            EnvironmentFile=-/etc/sysconfig/spamass-milter
            ExecStart=/usr/sbin/spamass-milter -p $SOCKET -g $SOCKET_GROUP $EXTRA_FLAGS
            """)
        self.tree.write("/etc/sysconfig/spamass-milter",
                        "SOCKET=/run/spamass-milter/spamass-milter.sock\nSOCKET_GROUP=postfix\n")
        self.tree.link("/etc/systemd/system/multi-user.target.wants/spamass-milter.service",
                       "/usr/lib/systemd/system/spamass-milter.service")
        self.assertEqual(self.tree.detect("redhat").found, [found(
            "spamass-milter", "unix:/run/spamass-milter/spamass-milter.sock", True,
            "/etc/sysconfig/spamass-milter", "Mail filter for SpamAssassin", FILTER)])

    def test_clamav_unit(self):
        """clamav-milter's unit names its file with -c."""
        self.tree.write("/usr/lib/systemd/system/clamav-milter.service",
                        "[Service]\nExecStart=/usr/sbin/clamav-milter -c /etc/mail/cm.conf\n")
        self.tree.write("/etc/mail/cm.conf", "MilterSocket inet:7357@localhost\n")
        [result] = self.tree.detect("redhat").found
        self.assertEqual((result.name, result.connection_spec, result.source, result.enabled),
                         ("clamav-milter", "inet:7357@[127.0.0.1]", "/etc/mail/cm.conf", False))

    def test_init_script(self):
        """An init script and /etc/sysconfig; enabled only by an S link."""
        self.tree.write("/etc/init.d/milter-greylist", """\
            #!/bin/sh
            # chkconfig: - 79 21
            # description: Milter-greylist is a stand-alone milter \\
            #              that implements greylisting.
            """)
        self.tree.write("/etc/sysconfig/milter-greylist", 'OPTIONS="-f /etc/mail/greylist.conf"\n')
        self.tree.write("/etc/mail/greylist.conf", 'socket "/run/milter-greylist.sock"\n')
        [result] = self.tree.detect("redhat").found
        self.assertEqual(result, found(
            "milter-greylist", "unix:/run/milter-greylist.sock", False, "/etc/mail/greylist.conf",
            "Milter-greylist is a stand-alone milter that implements greylisting.", GREYLIST,
            note="not enabled: no /etc/rc[0123456].d/S??milter-greylist link "
                 "(update-rc.d or chkconfig)"))
        self.tree.link("/etc/rc.d/rc3.d/S79milter-greylist", "../init.d/milter-greylist")
        self.assertTrue(self.tree.detect("redhat").found[0].enabled)


class FreeBSDTests(SynchronousTestCase):
    def setUp(self):
        self.tree = Tree(self)

    def test_opendkim_default_socket(self):
        """The rc.d script's default inet:8891@localhost is expanded (upstream #154)."""
        self.tree.write("/usr/local/etc/rc.d/milter-opendkim", OPENDKIM_RC)
        self.tree.write("/etc/rc.conf", 'hostname="mx"\nmilteropendkim_enable="YES"\n')
        self.assertEqual(self.tree.detect("freebsd").found, [found(
            "milter-opendkim", "inet:8891@[127.0.0.1]", True,
            "/usr/local/etc/rc.d/milter-opendkim")])

    def test_rc_conf_socket_and_disabled(self):
        """rc.conf.d/NAME sets the socket; without NAME_enable=YES the milter is disabled."""
        self.tree.write("/usr/local/etc/rc.d/milter-opendkim", OPENDKIM_RC)
        path = self.tree.write("/etc/rc.conf.d/milteropendkim",
                               'milteropendkim_socket="local:/var/run/dkim.sock"\n')
        self.assertEqual(self.tree.detect("freebsd").found, [found(
            "milter-opendkim", "unix:/var/run/dkim.sock", False, path,
            note="not enabled: milteropendkim_enable='NO' in "
                 "/usr/local/etc/rc.d/milter-opendkim")])

    def test_opendkim_profiles(self):
        """Each profile is a milter of its own, falling back to the main variables."""
        self.tree.write("/usr/local/etc/rc.d/milter-opendkim", OPENDKIM_RC)
        self.tree.write("/etc/rc.conf", """\
            milteropendkim_enable="YES"
            milteropendkim_profiles="sign verify"
            milteropendkim_sign_socket="inet:9001@localhost"
            milteropendkim_verify_socket="/var/run/verify.sock"
            milteropendkim_verify_enable="NO"
            """)
        self.assertEqual(self.tree.detect("freebsd").found, [
            found("milter-opendkim-sign", "inet:9001@[127.0.0.1]", True, "/etc/rc.conf"),
            found("milter-opendkim-verify", "unix:/var/run/verify.sock", False, "/etc/rc.conf",
                  note="not enabled: milteropendkim_enable='NO' in /etc/rc.conf")])

    def test_clamav_conf(self):
        """clamav-milter's socket from its own file in the default place, YES in any case."""
        self.tree.write("/usr/local/etc/rc.d/clamav-milter", """\
            name=clamav_milter
            rcvar=clamav_milter_enable
            load_rc_config $name
            """)
        self.tree.write("/usr/local/etc/clamav-milter.conf",
                        "MilterSocket unix:/var/run/clamav/clmilter.sock\n")
        self.tree.write("/etc/rc.conf", "clamav_milter_enable=yes\n")
        self.assertEqual(self.tree.detect("freebsd").found, [found(
            "clamav-milter", "unix:/var/run/clamav/clmilter.sock", True,
            "/usr/local/etc/clamav-milter.conf")])

    def test_no_name(self):
        """An rc.d script without name= cannot be read: skipped."""
        self.tree.write("/usr/local/etc/rc.d/spamass-milter", "#!/bin/sh\necho hi\n")
        self.assertEqual(self.tree.detect("freebsd").skipped, [detect.Skipped(
            "spamass-milter", "/usr/local/etc/rc.d/spamass-milter",
            "no name= line: the rc.d script's variables cannot be known")])

    def test_flags(self):
        """-p in NAME_flags from rc.conf.local."""
        self.tree.write("/usr/local/etc/rc.d/spamass-milter",
                        "name=spamass_milter\nrcvar=`set_rcvar`\n")
        self.tree.write("/etc/rc.conf.local", 'spamass_milter_enable="YES"\n'
                                              'spamass_milter_flags="-f -p /var/run/sm.sock"\n')
        self.assertEqual(self.tree.detect("freebsd").found, [found(
            "spamass-milter", "unix:/var/run/sm.sock", True, "/etc/rc.conf.local",
            conditions=FILTER)])


class PkgsrcTests(SynchronousTestCase):
    def setUp(self):
        self.tree = Tree(self)

    def test_prefix(self):
        """prefix= moves the rc.d directory and the milters' files; rcvar is the name."""
        self.tree.write("/opt/pkg/etc/rc.d/milter-greylist", """\
            name="milter_greylist"
            rcvar=$name
            command_args="-f /opt/pkg/etc/mail/greylist.conf"
            """)
        self.tree.write("/opt/pkg/etc/mail/greylist.conf", 'socket "/var/run/greylist.sock"\n')
        self.tree.write("/etc/rc.conf", "milter_greylist=YES\n")
        self.assertEqual(self.tree.detect("pkgsrc", {"prefix": "/opt/pkg/etc"}).found, [found(
            "milter-greylist", "unix:/var/run/greylist.sock", True,
            "/opt/pkg/etc/mail/greylist.conf", conditions=GREYLIST)])
        self.assertEqual(self.tree.detect("pkgsrc").found, [])

    def test_rcddir(self):
        """rcddir= names the scripts' directory; not enabled in rc.conf: disabled."""
        self.tree.write("/etc/rc.d/spamass-milter", """\
            name="spamass_milter"
            rcvar=$name
            : ${spamass_milter_socket:=/var/run/spamass.sock}
            """)
        self.assertEqual(self.tree.detect("pkgsrc", {"rcddir": "/etc/rc.d"}).found, [found(
            "spamass-milter", "unix:/var/run/spamass.sock", False, "/etc/rc.d/spamass-milter",
            conditions=FILTER, note="not enabled: spamass_milter='NO' (the default)")])


class GarbageTests(SynchronousTestCase):
    def test_random_bytes_everywhere(self):
        """Every file detection reads, filled with random bytes: no exception, valid results."""
        paths = ["/etc/default/{}", "/etc/sysconfig/{}", "/etc/init.d/{}",
                 "/lib/systemd/system/{}.service", "/usr/local/etc/rc.d/{}",
                 "/usr/pkg/etc/rc.d/{}", "/etc/rc.conf", "/etc/opendkim.conf",
                 "/etc/opendmarc.conf", "/etc/clamav/clamav-milter.conf",
                 "/etc/milter-greylist/greylist.conf", "/etc/rspamd/worker-proxy.inc",
                 "/usr/local/etc/mail/opendkim.conf", "/usr/local/etc/clamav-milter.conf"]
        generator = random.Random(9)
        alphabet = "SOCKET=-p:/$@{}\"' \n\t#=;local:inet:8891@localhost\x00\xff"
        for round_ in range(4):
            tree = Tree(self)
            for platform in detect.PLATFORMS:
                for candidate in detect.candidates(platform):
                    for path in paths:
                        text = "".join(generator.choice(alphabet)
                                       for _ in range(generator.randrange(200)))
                        tree.write(path.format(candidate.name), text)
            for platform in detect.PLATFORMS:
                report = tree.detect(platform)
                for result in report.found:
                    self.assertIsInstance(result.connection_spec, str)
                for skipped in report.skipped:
                    self.assertNotIn("could not be read", skipped.reason, (round_, skipped))


class ConfigurationTests(SynchronousTestCase):
    """detect_milters() in a configuration file, and the embedded configuration."""

    def setUp(self):
        self.tree = Tree(self)
        self.tree.write("/lib/systemd/system/opendkim.service", OPENDKIM_UNIT)
        self.tree.write("/etc/opendkim.conf", "Socket inet:8891@localhost\n")
        self.tree.enable("opendkim")
        self.tree.write("/etc/init.d/spamass-milter", SPAMASS_INIT)
        self.tree.write("/etc/default/spamass-milter", "SOCKET=/run/spamass.sock\n")
        self.tree.write("/usr/lib/systemd/system/opendmarc.service",
                        "[Service]\nExecStart=/usr/sbin/opendmarc\n")  # no opendmarc.conf
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def load(self, text):
        path = os.path.join(self.directory, "milter-manager.conf")
        with open(path, "w", encoding="utf-8") as file:
            file.write(text)
        self.path = path
        return config.load(path, load_paths=config.load_paths(None, {}, self.directory),
                           strict=False, detect_root=self.tree.root)

    def test_defines_found_milters(self):
        """Found milters are defined with their values, each from "detected from FILE"."""
        configuration = self.load('load("applicable-conditions/*.conf")\nload_default()\n')
        self.assertEqual(
            [(milter.name, milter.connection_spec, milter.enabled, milter.description,
              milter.applicable_conditions) for milter in configuration.milters],
            [("opendkim", "inet:8891@[127.0.0.1]", True, "OpenDKIM Milter", []),
             ("spamass-milter", "unix:/run/spamass.sock", True,
              "Calls spamassassin to allow filtering out spam from ham in libmilter "
              "compatible MTAs.", FILTER)])
        self.assertEqual(configuration.milter("spamass-milter").origins["connection_spec"],
                         "detected from /etc/default/spamass-milter")
        dumped = config.dump(configuration)
        self.assertIn('with define_milter("opendkim") as milter:  # detected from '
                      '/etc/opendkim.conf\n', dumped)
        self.assertIsNone(configuration.milter("opendkim").command)
        debian = os.path.join(config.shipped_directory(), "defaults", "debian.conf")
        self.assertEqual(configuration.warnings, [
            f"{debian}:19: detect_milters: opendmarc skipped: "
            "/usr/lib/systemd/system/opendmarc.service: no socket found (looked for -p in "
            "ExecStart; a socket in /etc/opendmarc.conf; the variables SOCKET, SOCKFILE, "
            "CONNECTION_SPEC)"])

    def test_local_file_overrides(self):
        """A later define_milter changes a detected milter; its other values stay detected."""
        configuration = self.load(
            'load("applicable-conditions/*.conf")\nload_default()\n'
            'with define_milter("opendkim") as milter:\n'
            '    milter.fallback_status = "temporary-failure"\n'
            'define_milter("spamass-milter").enabled = False\n')
        self.assertEqual([(milter.name, milter.enabled, milter.fallback_status.label)
                          for milter in configuration.milters],
                         [("opendkim", True, "temporary-failure"),
                          ("spamass-milter", False, "accept")])
        self.assertEqual(configuration.milter("opendkim").origins["connection_spec"],
                         "detected from /etc/opendkim.conf")

    def test_conditions_not_loaded(self):
        """Without the conditions loaded, the detected milters run unconditioned: one warning."""
        configuration = self.load("detect_milters()\n")
        self.assertEqual(configuration.milter("spamass-milter").applicable_conditions, [])
        self.assertEqual(configuration.warnings[1:], [
            f"{self.path}:1: detect_milters: conditions not defined, left out: "
            "'Remote Network' (for spamass-milter); 'Unauthenticated' (for spamass-milter); "
            "'No Stress' (for spamass-milter) "
            '(load("applicable-conditions/*.conf") before load_default())'])

    def test_greylist_timeouts(self):
        """A tarpitting milter-greylist gets its tarpit added to reading and writing timeouts."""
        self.tree.write("/lib/systemd/system/milter-greylist.service",
                        "[Service]\nExecStart=/usr/sbin/milter-greylist\n")
        self.tree.write("/etc/milter-greylist/greylist.conf",
                        'socket "/run/g.sock"\nracl greylist default tarpit 1h\n')
        milter = self.load("detect_milters()\n").milter("milter-greylist")
        self.assertEqual((milter.writing_timeout, milter.reading_timeout,
                          milter.connection_timeout), (3607.0, 3607.0, 297.0))

    def test_failure_is_a_warning(self):
        """A detection that raises costs its children only: one warning, the file loads."""
        def broken(*arguments, **keywords):
            raise RuntimeError("boom")
        self.patch(detect, "detect", broken)
        configuration = self.load("detect_milters()\nmanager.chunk_size = 9\n")
        self.assertEqual(configuration.milters, [])
        self.assertEqual(configuration.manager.chunk_size, 9)
        self.assertEqual(configuration.warnings, [
            f"{self.path}:1: detect_milters: milter detection failed, no milter detected: "
            "RuntimeError: boom"])

    def test_platform_defaults(self):
        """Each shipped defaults/PLATFORM.conf runs detection for its platform."""
        self.tree.write("/usr/local/etc/rc.d/milter-opendkim", OPENDKIM_RC)
        self.tree.write("/etc/rc.conf", 'milteropendkim_enable="YES"\n')
        self.tree.write("/usr/lib/systemd/system/opendkim.service", OPENDKIM_UNIT)
        self.tree.write("/usr/pkg/etc/rc.d/dkim-filter",
                        'name=dkim_filter\nrcvar=$name\n: ${dkim_filter_socket:=/run/d.sock}\n')
        names = {}
        for platform in ("debian", "redhat", "freebsd", "pkgsrc"):
            configuration = self.load(f'package.platform = "{platform}"\nload_default()\n')
            names[platform] = [milter.name for milter in configuration.milters]
        # Red Hat reads init scripts too (spamass-milter's, found disabled: no S link), and
        # lists spamass-milter before opendkim, as upstream's redhat.conf.
        self.assertEqual(names, {"debian": ["opendkim", "spamass-milter"],
                                 "redhat": ["spamass-milter", "opendkim"],
                                 "freebsd": ["milter-opendkim"], "pkgsrc": ["dkim-filter"]})

    def test_embedded_default(self):
        """With no file, the embedded configuration detects the milters under detect_root."""
        configuration = config.embedded(detect_root=self.tree.root)
        self.assertEqual([milter.name for milter in configuration.milters],
                         ["opendkim", "spamass-milter"])
        self.assertEqual(configuration.milter("spamass-milter").applicable_conditions, FILTER)
        options = tap.Options()
        options.default_config_directory = self.directory  # no milter-manager.conf there
        options.detect_root = self.tree.root
        self.patch(os, "environ", {})
        options.parseOptions([])
        self.assertEqual(options.configuration.milter("opendkim").connection_spec,
                         "inet:8891@[127.0.0.1]")

    def test_function_directly(self):
        """detect_milters returns the report it defined the milters from."""
        loader = config.Loader(detect_root=self.tree.root)
        report = detect_milters(loader)
        self.assertEqual([found.name for found in report.found], ["opendkim", "spamass-milter"])
        self.assertEqual(len(loader.configuration.milters), 2)


def closed_port():
    """A loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class CommandTests(SynchronousTestCase):
    def setUp(self):
        self.tree = Tree(self)
        self.port = closed_port()
        self.tree.write("/lib/systemd/system/opendkim.service", OPENDKIM_UNIT)
        self.tree.write("/etc/opendkim.conf", f"Socket inet:{self.port}@localhost\n")
        self.tree.enable("opendkim")
        self.tree.write("/etc/init.d/clamav-milter", CLAMAV_INIT)
        self.tree.write("/etc/clamav/clamav-milter.conf", "Example\n")

    def run_main(self, *arguments):
        output = io.StringIO()
        status = detect_main.main(["--root", self.tree.root, *arguments], stdout=output)
        return status, output.getvalue()

    def test_text(self):
        """Found, skipped and the lines to paste, without connecting (--no-check)."""
        status, output = self.run_main("--no-check")
        self.assertEqual(status, 0)
        skipped = ("  clamav-milter: /etc/clamav/clamav-milter.conf: still the example "
                   "configuration (an Example line, no MilterSocket): clamav-milter is not "
                   "configured")
        pasted = ("as configuration (detect_milters() in defaults/debian.conf defines these; "
                  "to pin them instead):")
        self.assertEqual(output, textwrap.dedent(f"""\
            milter detection for debian under {self.tree.root}

            found (1):
              opendkim: inet:{self.port}@[127.0.0.1] (enabled)
                from /etc/opendkim.conf
                applicable conditions: none

            skipped (1):
            {skipped}

            {pasted}
            with define_milter("opendkim") as milter:
                milter.connection_spec = "inet:{self.port}@[127.0.0.1]"
                milter.enabled = True
                milter.applicable_conditions = []
            """))

    def test_reader_gone(self):
        """A reader that leaves early (`| head`) ends the command with status 1, no traceback."""
        class Closed(io.StringIO):
            def write(self, text):
                raise BrokenPipeError(32, "Broken pipe")

        status = detect_main.main(["--root", self.tree.root, "--json"], stdout=Closed())
        self.assertEqual(status, 1)

    def test_json(self):
        """--json: the same report as one document; another tree's inet socket not checked."""
        status, output = self.run_main("--json")
        self.assertEqual(status, 0)
        self.assertEqual(json.loads(output), {
            "platform": "debian", "root": self.tree.root, "direct": [],
            "found": [{"name": "opendkim", "connection_spec": f"inet:{self.port}@[127.0.0.1]",
                       "enabled": True, "source": "/etc/opendkim.conf",
                       "description": "OpenDKIM Milter", "applicable_conditions": [],
                       "reachable": None, "reach_error":
                           f"not checked: an inet socket of the tree under {self.tree.root}, "
                           "not of this host",
                       "tarpit": None, "note": None}],
            "skipped": [{"name": "clamav-milter", "path": "/etc/clamav/clamav-milter.conf",
                         "reason": "still the example configuration (an Example line, no "
                                   "MilterSocket): clamav-milter is not configured"}]})

    def test_nothing_found(self):
        """An empty tree: exit 0, and it says so."""
        output = io.StringIO()
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        status = detect_main.main(["--root", root, "--no-check", "--platform", "freebsd"],
                                  stdout=output)
        self.assertEqual((status, output.getvalue()), (
            0, f"milter detection for freebsd under {root}\n\nfound: none\n\nskipped: none\n"))

    def test_usage_errors(self):
        """Unknown platform, bad package options, a root that is no directory: exit 2."""
        for arguments in (["--platform", "solaris"], ["--package-options", "prefix"],
                          ["--root", "/nonexistent/root"]):
            stderr = io.StringIO()
            self.patch(detect_main.sys, "stderr", stderr)
            with self.assertRaises(SystemExit) as caught:
                detect_main.main(arguments, stdout=io.StringIO())
            self.assertEqual(caught.exception.code, 2, arguments)
            self.assertIn("milter-manager-detect: error: ", stderr.getvalue())

    def test_postfix_direct(self):
        """The milters Postfix lists itself, read by the real postconf from a main.cf."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "main.cf"), "w", encoding="utf-8") as file:
            file.write("smtpd_milters = inet:localhost:8891, { unix:/run/x.sock, "
                       "default_action=accept } local:relative\n"
                       "non_smtpd_milters = $smtpd_milters\n")
        postconf = ["/usr/sbin/postconf", "-c", directory]
        self.tree.write("/etc/opendkim.conf", "Socket inet:8891@localhost\n")
        report = detect.detect("debian", self.tree.root, postconf=postconf)
        self.assertEqual(report.direct[:3], [
            detect.Direct("smtpd_milters", "inet:localhost:8891", "inet:8891@[127.0.0.1]"),
            detect.Direct("smtpd_milters", "{ unix:/run/x.sock, default_action=accept }",
                          "unix:/run/x.sock"),
            detect.Direct("smtpd_milters", "local:relative", None,
                          "socket 'local:relative' is not an absolute path")])
        self.assertEqual([direct.parameter for direct in report.direct],
                         ["smtpd_milters"] * 3 + ["non_smtpd_milters"] * 3)
        status, output = self.run_main("--no-check", "--postconf", " ".join(postconf))
        self.assertIn("listed by Postfix itself (move them behind milter-manager, or they run "
                      "outside it):\n"
                      "  smtpd_milters: inet:localhost:8891 = inet:8891@[127.0.0.1] "
                      "(found above: opendkim)\n", output)

    def test_postconf_not_utf8(self):
        """A main.cf in Latin-1 (real postconf passes its bytes on): read, not a traceback."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "main.cf"), "wb") as file:
            file.write(b"smtpd_milters = unix:/run/caf\xe9.sock\n")
        report = detect.detect("debian", self.tree.root,
                               postconf=["/usr/sbin/postconf", "-c", directory])
        self.assertEqual(report.direct[0].spec, "unix:/run/caf\ufffd.sock")

    def test_no_postconf(self):
        """A postconf that cannot be run: no direct list, no error."""
        report = detect.detect("debian", self.tree.root, postconf="/nonexistent/postconf")
        self.assertEqual(report.direct, [])

    def test_parser(self):
        """build_parser() is the command's parser (the manual page is made from it)."""
        parser = detect_main.build_parser()
        self.assertEqual(parser.prog, "milter-manager-detect")
        arguments = parser.parse_args(["--platform", "pkgsrc", "--json", "--no-check"])
        self.assertEqual((arguments.platform, arguments.json, arguments.no_check, arguments.root),
                         ("pkgsrc", True, True, "/"))


class ReachableTests(SynchronousTestCase):
    def test_tcp(self):
        """A listening TCP socket is reachable; the same port closed is not."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        report = detect.Report("debian", "/", [
            found("up", f"inet:{port}@[127.0.0.1]", True, "/x")])
        detect.check_reachable(report, timeout=2)
        self.assertEqual((report.found[0].reachable, report.found[0].reach_error), (True, None))
        listener.close()
        detect.check_reachable(report, timeout=2)
        self.assertEqual((report.found[0].reachable, report.found[0].reach_error),
                         (False, "Connection refused"))

    def test_unix(self):
        """A listening UNIX socket is reachable; a missing one says so."""
        path = os.path.abspath(self.mktemp())
        listener = socket.socket(socket.AF_UNIX)
        self.addCleanup(listener.close)
        listener.bind(path)
        listener.listen(1)
        report = detect.Report("debian", "/", [
            found("up", f"unix:{path}", True, "/x"),
            found("down", f"unix:{path}.missing", True, "/x")])
        detect.check_reachable(report, timeout=2)
        self.assertEqual([(result.reachable, result.reach_error) for result in report.found],
                         [(True, None), (False, "No such file or directory")])

    def test_under_root(self):
        """Under another root, UNIX paths are that tree's; inet sockets are not this host's."""
        root = tempfile.mkdtemp(prefix="mm-")  # short: a UNIX socket path holds 107 bytes
        self.addCleanup(shutil.rmtree, root)
        os.makedirs(os.path.join(root, "run"))
        os.symlink("/run", os.path.join(root, "var-run"))  # followed inside the root
        listener = socket.socket(socket.AF_UNIX)
        self.addCleanup(listener.close)
        listener.bind(os.path.join(root, "run", "m.sock"))
        listener.listen(1)
        host = socket.socket(socket.AF_UNIX)  # a socket of this host, at a path not in root
        self.addCleanup(host.close)
        host.bind(os.path.join(root, "host.sock"))
        host.listen(1)
        tcp = socket.socket()
        self.addCleanup(tcp.close)
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(1)
        report = detect.Report("debian", root, [
            found("tree", "unix:/run/m.sock", True, "/x"),
            found("linked", "unix:/var-run/m.sock", True, "/x"),
            found("host", f"unix:{root}/host.sock", True, "/x"),
            found("tcp", f"inet:{tcp.getsockname()[1]}@[127.0.0.1]", True, "/x")])
        detect.check_reachable(report, timeout=2)
        self.assertEqual([(result.reachable, result.reach_error) for result in report.found], [
            (True, None), (True, None), (False, "No such file or directory"),
            (None, f"not checked: an inet socket of the tree under {root}, not of this host")])
        report.found = report.found[3:]
        self.assertIn(f"  tcp: {report.found[0].connection_spec} (enabled, not checked: an "
                      f"inet socket of the tree under {root}, not of this host)\n",
                      detect_main.text(report))
