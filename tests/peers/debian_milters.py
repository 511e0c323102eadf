"""Debian's opendmarc, spamass-milter (with spamd) and clamav-milter (with clamd), run by hand.

Each runs in the foreground from a configuration under its own temporary directory, on the
socket the test gives it (tests/test_detect_real.py: the one CI wrote into the package's own
file), is waited for without a probe connection and is stopped by PID. Nothing leaves
loopback: spamd runs with -L and no DNS; clamd loads only DIR/db/harness.ndb (no signature
download); opendmarc resolves through the test DNS server named by its own resolv.conf, in a
private mount namespace. opendkim is tests/peers/fixtures.OpenDKIM.
"""

import os
import shutil
import socket
import subprocess
import time

from tests.peers.fixtures import (
    HOST, _listening, _make_reachable, _poke, _stop_process, free_port, wait_for_port,
)

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def in_resolver_namespace(resolv_conf, command):
    """command run with resolv_conf bind-mounted on /etc/resolv.conf, in its own mount namespace.

    unshare and sh exec, so the process started is the daemon itself (its pid is Popen's).
    """
    return ["unshare", "-m", "/bin/sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
            resolv_conf, *command]


def wait_for_unix_socket(path, timeout=10.0, process=None):
    """Wait until a UNIX stream socket listens at path (from /proc/net/unix, no probe)."""
    deadline = time.monotonic() + timeout
    while True:
        with open("/proc/net/unix") as table:
            for line in list(table)[1:]:
                fields = line.split()
                # Flags 00010000 is __SO_ACCEPTCON: a listening socket.
                if len(fields) == 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                    return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}"
                               f" before {path} listened")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {path} after {timeout} s")
        time.sleep(0.02)


def _spec_port(spec):
    """The port of a libmilter inet socket written as inet:PORT@HOST."""
    return int(spec.split(":", 1)[1].split("@", 1)[0])


def _port_free(port):
    """Fail with a clear message if something already listens on port (a fixed one)."""
    if _listening(port):
        raise RuntimeError(f"something already listens on port {port}: stop it first")


def _read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as log:
            return log.read()
    except FileNotFoundError:
        return ""


class _Daemon:
    """A foreground daemon under DIR whose output goes to DIR/NAME.log.

    With name_server (an address), it resolves through that server only (DIR/resolv.conf in
    a private mount namespace), so a lookup it makes shows up in the test server's log and
    never reaches the system's resolver.
    """

    def __init__(self, tmpdir, name, name_server=None):
        self.dir = os.path.realpath(tmpdir)
        self.name = name
        self.name_server = name_server
        self.log_path = os.path.join(self.dir, f"{name}.log")
        self.process = None

    def _popen(self, command):
        """Start command (in the resolver namespace if there is a name server); return the Popen."""
        if self.name_server is not None:
            resolv_conf = os.path.join(self.dir, "resolv.conf")
            with open(resolv_conf, "w") as out:
                out.write(f"nameserver {self.name_server}\noptions timeout:1 attempts:1\n")
            command = in_resolver_namespace(resolv_conf, command)
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def _spawn(self, command):
        self.process = self._popen(command)

    def log(self):
        """Return what the daemon wrote to its log file and its output."""
        return _read(self.log_path)


OPENDMARC_CONF = """\
AuthservID              mta.harness.test
TrustedAuthservIDs      mta.harness.test
Socket                  {spec}
PidFile                 {dir}/opendmarc.pid
Background              false
Syslog                  false
UserID                  opendmarc
UMask                   0002
IgnoreHosts             {dir}/ignore.hosts
RejectFailures          true
SPFSelfValidate         true
PublicSuffixList        /usr/share/publicsuffix/public_suffix_list.dat
"""


class OpenDMARC(_Daemon):
    """Debian's opendmarc on spec (inet:PORT@HOST), resolving through name_server (an address).

    IgnoreHosts names only 203.0.113.250: its default, 127.0.0.1, would ignore all our mail.
    opendmarc checks SPF itself (SPFSelfValidate), so a DMARC pass needs the sender domain's
    SPF record to cover the client address, or an aligned DKIM result from a trusted
    Authentication-Results header.
    """

    def __init__(self, tmpdir, spec, name_server):
        super().__init__(tmpdir, "opendmarc", name_server)
        self.spec = spec
        self.port = _spec_port(spec)

    def start(self):
        _port_free(self.port)
        _make_reachable(self.dir)
        os.makedirs(self.dir, exist_ok=True)
        files = {"opendmarc.conf": OPENDMARC_CONF.format(spec=self.spec, dir=self.dir),
                 "ignore.hosts": "203.0.113.250\n"}
        for name, text in files.items():
            with open(os.path.join(self.dir, name), "w") as out:
                out.write(text)
        shutil.chown(self.dir, "opendmarc", "opendmarc")
        self._spawn(["opendmarc", "-f", "-c", os.path.join(self.dir, "opendmarc.conf")])
        try:
            wait_for_port(self.port, 10, self.process)
        except (RuntimeError, TimeoutError) as error:
            self.stop()
            raise RuntimeError(f"opendmarc did not start: {error}\n{self.log()}") from None

    def stop(self):
        _stop_process(self.process, wake=lambda: _poke(self.port))


class Spamd(_Daemon):
    """SpamAssassin's spamd on a free loopback port: local tests only, no Bayes, no DNS."""

    def __init__(self, tmpdir, name_server=None):
        super().__init__(tmpdir, "spamd", name_server)
        self.port = free_port()

    def start(self):
        siteconf = os.path.join(self.dir, "siteconf")
        home = os.path.join(self.dir, "home")
        _make_reachable(self.dir)
        # The packaged *.pre files load the plugins; local.cf switches off what needs the net.
        shutil.copytree("/etc/spamassassin", siteconf)
        with open(os.path.join(siteconf, "local.cf"), "a") as out:
            out.write("\nuse_bayes 0\nbayes_auto_learn 0\ndns_available no\nskip_rbl_checks 1\n")
        os.makedirs(home)
        shutil.chown(home, "debian-spamd", "debian-spamd")
        self._spawn(["spamd", "-L", f"--listen={HOST}:{self.port}", f"--allowed-ips={HOST}",
                     "--min-children=1", "--max-children=2", "--nouser-config",
                     "-u", "debian-spamd", f"--siteconfigpath={siteconf}",
                     f"--helper-home-dir={home}", f"--syslog={self.dir}/spamd.syslog",
                     f"--pidfile={self.dir}/spamd.pid"])
        try:
            wait_for_port(self.port, 30, self.process)
        except (RuntimeError, TimeoutError) as error:
            self.stop()
            raise RuntimeError(f"spamd did not start: {error}\n{self.log()}"
                               f"{_read(self.dir + '/spamd.syslog')}") from None

    def stop(self):
        _stop_process(self.process)


class SpamassMilter(_Daemon):
    """Debian's spamass-milter on a UNIX socket path, asking spamd; rejects at score 15."""

    def __init__(self, tmpdir, path, spamd, name_server=None):
        super().__init__(tmpdir, "spamass-milter", name_server)
        self.path = path
        self.spamd = spamd
        self.made_socket_dir = False

    def start(self):
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            os.makedirs(directory)
            self.made_socket_dir = True
        if os.path.exists(self.path):
            os.unlink(self.path)  # a stale socket: libmilter refuses to bind over it
        os.makedirs(self.dir, exist_ok=True)
        self._spawn(["spamass-milter", "-p", self.path, "-r", "15", "-m",
                     "--", "-d", HOST, "-p", str(self.spamd.port)])
        try:
            wait_for_unix_socket(self.path, 10, self.process)
        except (RuntimeError, TimeoutError) as error:
            self.stop()
            raise RuntimeError(f"spamass-milter did not start: {error}\n{self.log()}") from None

    def _poke(self):
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(self.path)
            except OSError:
                pass

    def stop(self):
        _stop_process(self.process, wake=self._poke)
        if os.path.exists(self.path):
            os.unlink(self.path)
        if self.made_socket_dir:
            os.rmdir(os.path.dirname(self.path))
            self.made_socket_dir = False


CLAMD_CONF = """\
Foreground yes
TCPSocket {port}
TCPAddr 127.0.0.1
DatabaseDirectory {dir}/db
TemporaryDirectory {dir}/tmp
LogFile {dir}/clamd.log
LogTime yes
PidFile {dir}/clamd.pid
User clamav
"""

CLAMAV_MILTER_CONF = """\
MilterSocket {spec}
ClamdSocket tcp:127.0.0.1:{clamd_port}
Foreground yes
PidFile {dir}/clamav-milter.pid
TemporaryDirectory {dir}/tmp
LogFile {dir}/clamav-milter.log
LogTime yes
LogInfected Basic
LogClean Basic
OnInfected Reject
OnClean Accept
AddHeader Replace
ReportHostname mta.harness.test
User clamav
"""


class ClamAV(_Daemon):
    """clamd on a free port with one local signature (EICAR), and clamav-milter on spec.

    No virus database is downloaded: clamd starts on any database directory holding at least
    one signature file, here DIR/db/harness.ndb.
    """

    def __init__(self, tmpdir, spec, name_server=None):
        super().__init__(tmpdir, "clamav", name_server)
        self.spec = spec
        self.port = _spec_port(spec)
        self.clamd_port = free_port()
        self.clamd = None

    def start(self):
        _port_free(self.port)
        _make_reachable(self.dir)
        for sub in ("db", "tmp"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        with open(os.path.join(self.dir, "db", "harness.ndb"), "w") as out:
            out.write(f"Eicar-Test-Signature:0:*:{EICAR.hex()}\n")
        files = {"clamd.conf": CLAMD_CONF.format(port=self.clamd_port, dir=self.dir),
                 "clamav-milter.conf": CLAMAV_MILTER_CONF.format(
                     spec=self.spec, clamd_port=self.clamd_port, dir=self.dir)}
        for name, text in files.items():
            with open(os.path.join(self.dir, name), "w") as out:
                out.write(text)
        for parent, directories, names in os.walk(self.dir):
            for name in [parent, *(os.path.join(parent, n) for n in directories + names)]:
                shutil.chown(name, "clamav", "clamav")
        self.clamd = self._popen(["clamd", "-c", os.path.join(self.dir, "clamd.conf")])
        try:
            wait_for_port(self.clamd_port, 30, self.clamd)
            self._spawn(["clamav-milter", "-c", os.path.join(self.dir, "clamav-milter.conf")])
            wait_for_port(self.port, 10, self.process)
        except (RuntimeError, TimeoutError) as error:
            self.stop()
            raise RuntimeError(f"clamd or clamav-milter did not start: {error}\n{self.log()}"
                               f"{_read(self.dir + '/clamd.log')}"
                               f"{_read(self.dir + '/clamav-milter.log')}") from None

    def stop(self):
        _stop_process(self.process, wake=lambda: _poke(self.port))
        _stop_process(self.clamd)

    def milter_log(self):
        """Return clamav-milter's own log (one line per scanned message)."""
        return _read(os.path.join(self.dir, "clamav-milter.log"))

