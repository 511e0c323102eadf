"""Real peers on loopback for integration tests: child milters, a private Postfix, the manager.

LibmilterMilter, OpenDKIM and GreylistMilter are child milters, Postfix is the MTA (relaying
to its own smtp-sink), MiltermanagerProcess runs this checkout's manager under twistd,
DNSServerProcess serves test zones on loopback; verify_dkim checks a delivered message's
DKIM-Signature offline.

Everything here is synchronous (subprocess, smtplib) and binds 127.0.0.1 only. Each fixture
is started by the test and stopped by PID, never by process name::

    milter = LibmilterMilter(self.mktemp(), "m1")
    milter.start()
    self.addCleanup(milter.stop)
    postfix = Postfix(self.mktemp(), milters=[milter.postfix_spec])
    postfix.start()
    self.addCleanup(postfix.stop)
"""

import json
import os
import re
import secrets
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

HOST = "127.0.0.1"
HERE = os.path.dirname(os.path.abspath(__file__))
LIBMILTER_MILTER = os.path.join(HERE, "libmilter_milter.py")
# Debian's interpreter: the only one that can import python3-milter's Milter package.
DEBIAN_PYTHON = "/usr/bin/python3"
POSTFIX_USER = "postfix"


def free_port():
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _listening(port):
    """Tell whether a TCP socket listens on port, from /proc/net/tcp (no probe connection)."""
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rpartition(":")[2], 16) == port:
                return True
    return False


def wait_for_port(port, timeout=10.0, process=None):
    """Wait until 127.0.0.1:port listens; fail early if process (a Popen) exits.

    It reads the kernel's socket table instead of connecting, so that no probe connection
    shows up in Postfix's log or as a milter session.
    """
    deadline = time.monotonic() + timeout
    while not _listening(port):
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before port {port} opened")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout} s")
        time.sleep(0.02)


def _alive(pid):
    """Tell whether pid still runs; reaps it if it is our own exited child."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The state follows the parenthesised command name; a zombie holds no sockets.
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False  # gone before the open, or between the open and the read (ESRCH)


def stop_pid(pid, timeout=15, wake=None):
    """SIGTERM pid, wait up to timeout seconds for it to exit, then SIGKILL it.

    wake, if given, is called shortly after the signal and then twice a second while pid runs.
    """
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    wake_at = time.monotonic() + 0.05
    while _alive(pid):
        now = time.monotonic()
        if now > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            while _alive(pid):
                time.sleep(0.02)
            return
        if wake is not None and now >= wake_at:
            wake()
            wake_at = now + 0.5
        time.sleep(0.02)


def _stop_process(process, timeout=15, wake=None):
    """Stop a Popen child by its pid and reap it."""
    if process is not None and process.poll() is None:
        stop_pid(process.pid, timeout, wake)
        process.wait()


def _poke(port):
    """Open and close one connection to port, if anything still listens there.

    After SIGTERM, libmilter's listener notices its stop flag only when poll() returns, which
    without traffic takes up to 5 s; one connection makes it return at once. The connection
    itself is dropped unanswered: the listener leaves its loop before serving it.
    """
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except OSError:
        pass


def _stop_libmilter(process, port, timeout=15):
    """Stop a milter built on libmilter by its pid, quickly (see _poke), and reap it."""
    _stop_process(process, timeout, wake=lambda: _poke(port))


class LibmilterMilter:
    """tests/peers/libmilter_milter.py run by Debian's python3 on a free port."""

    def __init__(self, tmpdir, name, *flags):
        self.tmpdir = os.path.abspath(tmpdir)
        self.name = name
        self.flags = list(flags)
        self.port = free_port()
        self.spec = f"inet:{self.port}@{HOST}"
        self.log_path = os.path.join(self.tmpdir, f"{name}.events")
        self.process = None

    @property
    def postfix_spec(self):
        """The socket in Postfix's notation, for smtpd_milters."""
        return f"inet:{HOST}:{self.port}"

    def start(self):
        """Start the milter and wait until its port accepts connections."""
        os.makedirs(self.tmpdir, exist_ok=True)
        command = [DEBIAN_PYTHON, LIBMILTER_MILTER, "--socket", self.spec, "--name", self.name,
                   "--log", self.log_path, *self.flags]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for_port(self.port, 10, self.process)
        except Exception:
            self.stop()
            raise

    def stop(self):
        """SIGTERM the milter and wait for it to exit."""
        _stop_process(self.process)

    def events(self):
        """Return the logged callbacks as a list of dicts."""
        try:
            with open(self.log_path, encoding="utf-8", errors="surrogateescape") as log:
                return [json.loads(line) for line in log if line.endswith("\n")]
        except FileNotFoundError:
            return []


OPENDKIM_USER = "opendkim"
OPENDKIM_CONF = """\
Syslog                  no
Background              no
Mode                    {mode}
Domain                  {domain}
Selector                {selector}
KeyFile                 {key_file}
Socket                  {spec}
UserID                  {user}:{user}
UMask                   007
Canonicalization        relaxed/simple
SignatureAlgorithm      rsa-sha256
InternalHosts           {internal_hosts}
AlwaysAddARHeader       yes
AuthservID              mta.harness.test
TestDNSData             file:{testdns}
RequireSafeKeys         no
"""


class OpenDKIM:
    """Debian's opendkim on a free port: mode "s" signs mail from 127.0.0.1, mode "v" verifies it.

    The key is generated under tmpdir (or copied from key_from, another OpenDKIM, so that a
    verifier knows a signer's key). TestDNSData serves the key record from DIR/testdns, and
    opendkim runs in a private mount namespace whose resolv.conf names 127.0.0.1, where nothing
    answers: no DNS query leaves the machine. opendkim logs only through syslog(3), so
    Syslog is off; DIR/opendkim.log holds its stderr (configuration errors).
    """

    def __init__(self, tmpdir, mode="s", domain="harness.test", selector="test", key_from=None,
                 port=None, internal_hosts=None):
        if mode not in ("s", "v"):
            raise ValueError(f"mode must be 's' (sign) or 'v' (verify), not {mode!r}")
        self.dir = os.path.realpath(tmpdir)
        self.mode = mode
        self.domain = domain
        self.selector = selector
        self.key_from = key_from
        self.key_dir = os.path.join(self.dir, "keys")
        self.conf_path = os.path.join(self.dir, "opendkim.conf")
        self.log_path = os.path.join(self.dir, "opendkim.log")
        self.port = port or free_port()  # port: a fixed one, e.g. an installed opendkim.conf's
        self.spec = f"inet:{self.port}@{HOST}"
        self.internal_hosts = internal_hosts  # InternalHosts; None: the mode's default below
        self.public_key_txt = None
        self.process = None

    @property
    def postfix_spec(self):
        """The socket in Postfix's notation, for smtpd_milters."""
        return f"inet:{HOST}:{self.port}"

    @property
    def dns_name(self):
        """The name of the key's TXT record: SELECTOR._domainkey.DOMAIN."""
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def txt_records(self):
        """{name: TXT value} for the key, as verify_dkim() takes it."""
        return {self.dns_name: self.public_key_txt}

    def _make_key(self):
        """Generate (or copy) the key into DIR/keys and return the TXT value from its zone snippet."""
        os.makedirs(self.key_dir)
        private = os.path.join(self.key_dir, f"{self.selector}.private")
        snippet = os.path.join(self.key_dir, f"{self.selector}.txt")
        if self.key_from is not None:
            if (self.key_from.domain, self.key_from.selector) != (self.domain, self.selector):
                raise ValueError("key_from must have the same domain and selector")
            for path in (private, snippet):
                shutil.copyfile(os.path.join(self.key_from.key_dir, os.path.basename(path)), path)
        else:
            subprocess.run(["opendkim-genkey", "-b", "1024", "-D", self.key_dir, "-d", self.domain,
                            "-s", self.selector], check=True, stdin=subprocess.DEVNULL,
                           capture_output=True)
        shutil.chown(self.key_dir, OPENDKIM_USER, OPENDKIM_USER)
        os.chmod(self.key_dir, 0o700)
        for name in os.listdir(self.key_dir):
            shutil.chown(os.path.join(self.key_dir, name), OPENDKIM_USER, OPENDKIM_USER)
            os.chmod(os.path.join(self.key_dir, name), 0o600)
        with open(snippet) as zone:
            # test._domainkey IN TXT ( "v=DKIM1; h=sha256; k=rsa; " "p=MIG..." "...")  ; comment
            return "".join(re.findall(r'"([^"]*)"', zone.read()))

    def _write_config(self):
        """Write the key, DIR/testdns, DIR/resolv.conf and DIR/opendkim.conf."""
        _make_reachable(self.dir)
        os.makedirs(self.dir, exist_ok=True)
        self.public_key_txt = self._make_key()
        testdns = os.path.join(self.dir, "testdns")
        with open(testdns, "w") as out:
            out.write(f"{self.dns_name} {self.public_key_txt}\n")
        with open(os.path.join(self.dir, "resolv.conf"), "w") as out:
            out.write("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        # Mail from 127.0.0.1 is internal, so signed; a verifier must see it as external.
        internal_hosts = HOST if self.mode == "s" else "192.0.2.1"
        if self.internal_hosts is not None:
            internal_hosts = self.internal_hosts
        with open(self.conf_path, "w") as out:
            out.write(OPENDKIM_CONF.format(
                mode=self.mode, domain=self.domain, selector=self.selector, spec=self.spec,
                key_file=os.path.join(self.key_dir, f"{self.selector}.private"), user=OPENDKIM_USER,
                internal_hosts=internal_hosts, testdns=testdns))

    def start(self):
        """Generate the key, write the configuration, start opendkim and wait for its port."""
        self._write_config()
        # unshare and sh exec, so the Popen pid is opendkim's own.
        command = ["unshare", "-m", "/bin/sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
                   os.path.join(self.dir, "resolv.conf"), "opendkim", "-f", "-x", self.conf_path]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            start_new_session=True)
        try:
            wait_for_port(self.port, 10, self.process)
        except Exception as error:
            self.stop()
            raise RuntimeError(f"opendkim did not start: {error}\n{self.log()}") from error

    def stop(self):
        """SIGTERM opendkim and wait for it to exit."""
        _stop_libmilter(self.process, self.port)

    def log(self):
        """Return what opendkim wrote to stderr."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                return log.read()
        except FileNotFoundError:
            return ""


# The lines smtp-sink -d writes before the message: the envelope, then its own Received header.
_SINK_ENVELOPE = re.compile(rb"\A(?:X-(?:Client-Addr|Client-Proto|Helo-Args|Mail-Args|Rcpt-Args):[^\n]*\n)+"
                            rb"Received:[^\n]*\n(?:[ \t][^\n]*\n)*")


def sink_message(dump):
    """Return the message in one of smtp-sink's dump files as it was relayed, with CRLF line ends.

    smtp-sink writes its envelope lines and its own Received header first, drops every CR and
    ends the file with one extra LF for the terminating ".". A message that is not such a dump
    only gets its line ends turned into CRLF.
    """
    envelope = _SINK_ENVELOPE.match(dump)
    if envelope is not None:
        dump = dump[envelope.end():]
        if dump.endswith(b"\n\n"):
            dump = dump[:-1]
    return re.sub(rb"\r?\n", b"\r\n", dump)


def verify_dkim(message, txt_records):
    """Tell whether the first DKIM-Signature of message (bytes) verifies, offline.

    message may be an smtp-sink dump (see sink_message). txt_records maps DNS names to TXT values,
    e.g. OpenDKIM.txt_records; any other name is looked up as missing, never in the DNS.
    """
    import dkim

    records = {name.lower().rstrip("."): value for name, value in txt_records.items()}

    def lookup(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode("ascii")
        value = records.get(name.lower().rstrip("."))
        return None if value is None else value.encode("ascii")

    return dkim.verify(sink_message(message), dnsfunc=lookup)


REPO = os.path.dirname(os.path.dirname(HERE))
# twistd's own entry point, so that the interpreter is this one whatever `twistd` on PATH is.
TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"


class MiltermanagerProcess:
    """This checkout's manager run by `twistd -n milter-manager` on a free port, logging to a file.

    config_text is written to DIR/milter-manager.conf; args (default: --config FILE) follow
    `milter-manager` on the command line. In both, {port}, {spec} (inet:PORT@[127.0.0.1]),
    {dir} and {config} (the file's path) are replaced; other braces stay as they are, so the
    configuration can hold Python dicts. The twistd plugin is found through PYTHONPATH, which
    starts with the checkout; the working directory is DIR.
    """

    def __init__(self, tmpdir, config_text, args=None):
        self.dir = os.path.realpath(tmpdir)
        self.port = free_port()
        self.spec = f"inet:{self.port}@[{HOST}]"
        self.config_path = os.path.join(self.dir, "milter-manager.conf")
        self.log_path = os.path.join(self.dir, "milter-manager.log")
        self.config_text = self._fill(config_text)
        self.args = [self._fill(arg) for arg in (args if args is not None else ["--config", "{config}"])]
        self.process = None

    def _fill(self, text):
        """Replace the placeholders in text."""
        for name, value in (("port", str(self.port)), ("spec", self.spec), ("dir", self.dir),
                            ("config", self.config_path)):
            text = text.replace("{" + name + "}", value)
        return text

    @property
    def postfix_spec(self):
        """The socket in Postfix's notation, for smtpd_milters."""
        return f"inet:{HOST}:{self.port}"

    @property
    def command(self):
        """The command line that start() runs."""
        return [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "milter-manager", *self.args]

    def start(self, timeout=30):
        """Write the configuration, start the manager and wait for its port.

        If the manager exits first (a configuration or usage error), or the port does not open
        in time, the error raised holds the log.
        """
        os.makedirs(self.dir, exist_ok=True)
        with open(self.config_path, "w") as out:
            out.write(self.config_text)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([REPO, *filter(None, [env.get("PYTHONPATH")])])
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, cwd=self.dir, env=env, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port(self.port, timeout, self.process)
        except (RuntimeError, TimeoutError) as error:
            self.stop()
            raise RuntimeError(f"milter-manager did not start: {error}; its log:\n{self.log()}") from None

    def stop(self):
        """SIGTERM the manager and wait for it to exit."""
        _stop_process(self.process)

    def log(self):
        """Return the manager's output so far (twistd's log, tracebacks)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                return log.read()
        except FileNotFoundError:
            return ""


def _repo_env():
    """os.environ with this checkout first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, *filter(None, [env.get("PYTHONPATH")])])
    return env


class GreylistMilter:
    """This checkout's `milter-manager-greylist` on a free port, its database and log in tmpdir.

    It runs as `python -m miltermanager.greylist.main` under this interpreter (the console
    script on PATH may belong to another one), with --verbose so that every decision is logged.
    """

    def __init__(self, tmpdir, delay=1, *options):
        self.dir = os.path.realpath(tmpdir)
        self.delay = delay
        self.options = list(options)
        self.port = free_port()
        self.spec = f"inet:{self.port}@[{HOST}]"
        self.database = os.path.join(self.dir, "greylist.sqlite3")
        self.log_path = os.path.join(self.dir, "greylist.log")
        self.process = None

    def start(self):
        """Start the milter and wait for its port."""
        os.makedirs(self.dir, exist_ok=True)
        command = [sys.executable, "-m", "miltermanager.greylist.main", "-s", self.spec,
                   "--database", self.database, "--delay", str(self.delay), "--verbose",
                   *self.options]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=self.dir, env=_repo_env(),
                                            stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port(self.port, 30, self.process)
        except (RuntimeError, TimeoutError) as error:
            self.stop()
            raise RuntimeError(f"milter-manager-greylist did not start: {error}\n{self.log()}") from None

    def stop(self):
        """SIGTERM the milter and wait for it to exit."""
        _stop_process(self.process)

    def log(self):
        """Return the milter's log so far."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                return log.read()
        except FileNotFoundError:
            return ""


class DNSServerProcess:
    """tests/peers/dns.py as a process on 127.0.0.1 serving zone_text, logging every question.

    zone_text is in the zone-file format of tests/peers/dns.py; the port (UDP and TCP) is the
    one the server picked, known once start() returns.
    """

    def __init__(self, tmpdir, zone_text, address=HOST, port=0):
        self.dir = os.path.realpath(tmpdir)
        self.address = address
        self.requested_port = port  # 0: a free one; 53 for resolv.conf, which names no port
        self.zone_path = os.path.join(self.dir, "zone")
        self.query_log_path = os.path.join(self.dir, "queries.jsonl")
        self.zone_text = zone_text
        self.port = None
        self.process = None

    @property
    def name_server(self):
        """The server as dnsbl.name_servers takes it: "ADDRESS:PORT"."""
        return f"{self.address}:{self.port}"

    def start(self, timeout=30):
        """Start the server and wait for its "listening on" line."""
        os.makedirs(self.dir, exist_ok=True)
        with open(self.zone_path, "w") as out:
            out.write(self.zone_text)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.peers.dns", "--address", self.address,
             "--port", str(self.requested_port),
             "--zone-file", self.zone_path, "--query-log", self.query_log_path],
            cwd=REPO, env=_repo_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
        # readline blocks: a timer kills a server that never says where it listens.
        timer = threading.Timer(timeout, self.process.kill)
        timer.start()
        try:
            line = self.process.stdout.readline()
        finally:
            timer.cancel()
        match = re.fullmatch(r"listening on (\S+):(\d+)\n", line)
        if match is None:
            rest = line + (self.process.stdout.read() if self.process.poll() is not None else "")
            self.stop()
            raise RuntimeError(f"the test DNS server did not start:\n{rest}")
        self.port = int(match.group(2))

    def stop(self):
        """SIGTERM the server and wait for it to exit."""
        _stop_process(self.process)
        if self.process is not None:
            self.process.stdout.close()

    def queries(self):
        """Return the questions received so far as (name, type) pairs, in order."""
        try:
            with open(self.query_log_path, encoding="utf-8") as log:
                return [(entry["name"], entry["type"]) for entry in
                        (json.loads(line) for line in log if line.endswith("\n"))]
        except FileNotFoundError:
            return []


@dataclass
class SendResult:
    """The SMTP replies to one transaction, as (code, text) pairs; nothing is raised on rejects."""

    mail: tuple
    rcpts: dict = field(default_factory=dict)
    data: tuple = None  # the final reply: after "." or, if DATA itself failed, DATA's reply
    ehlo: tuple = None

    @property
    def accepted(self):
        """Tell whether the message was queued."""
        return self.data is not None and self.data[0] == 250

    @property
    def queue_id(self):
        """Postfix's queue id from "250 2.0.0 Ok: queued as ID", or None."""
        match = re.search(r"queued as (\w+)", self.data[1]) if self.accepted else None
        return match and match.group(1)


MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {queue_link}
data_directory = {dir}/data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = mta.harness.test
mydomain = harness.test
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_banner = $myhostname ESMTP Postfix-harness
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
alias_maps =
alias_database =
biff = no
smtputf8_enable = no
disable_dns_lookups = yes
smtp_host_lookup = native
relayhost = [127.0.0.1]:{sink_port}
default_transport = smtp
maximal_queue_lifetime = 1h
bounce_queue_lifetime = 1h
queue_run_delay = 10s
minimal_backoff_time = 10s
maximal_backoff_time = 60s
smtpd_milters = {milters}
non_smtpd_milters =
milter_default_action = {default_action}
milter_protocol = {milter_protocol}
milter_command_timeout = 30s
milter_connect_timeout = 10s
milter_content_timeout = 300s
"""

MASTER_CF = """\
127.0.0.1:{smtp_port} inet n - n - - smtpd
pickup    unix  n - n 60   1 pickup
cleanup   unix  n - n -    0 cleanup
qmgr      unix  n - n 300  1 qmgr
rewrite   unix  - - n -    - trivial-rewrite
bounce    unix  - - n -    0 bounce
defer     unix  - - n -    0 bounce
trace     unix  - - n -    0 bounce
verify    unix  - - n -    1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -    - proxymap
proxywrite unix - - n -    1 proxymap
smtp      unix  - - n -    - smtp
relay     unix  - - n -    - smtp
showq     unix  n - n -    - showq
error     unix  - - n -    - error
retry     unix  - - n -    - error
discard   unix  - - n -    - discard
anvil     unix  - - n -    1 anvil
scache    unix  - - n -    1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class Postfix:
    """A private Postfix instance relaying everything to its own smtp-sink, all under tmpdir."""

    def __init__(self, tmpdir, milters=(), milter_protocol=6, default_action="tempfail", extra_main_cf=None):
        self.dir = os.path.realpath(tmpdir)  # realpath: compared with smtp-sink's /proc fd links
        self.conf_dir = os.path.join(self.dir, "conf")
        self.sink_dir = os.path.join(self.dir, "sink")
        self.milters = list(milters)
        self.milter_protocol = milter_protocol
        self.default_action = default_action
        self.extra_main_cf = dict(extra_main_cf or {})
        self.smtp_port = free_port()
        self.sink_port = free_port()
        self.sink = None
        self.master_pid = None
        self.queue_link = None

    def _write_config(self):
        """Write main.cf and master.cf and create the directories Postfix expects."""
        _make_reachable(self.dir)
        for sub in ("conf", "spool", "data", "sink"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        for sub in ("data", "sink"):
            shutil.chown(os.path.join(self.dir, sub), POSTFIX_USER, POSTFIX_USER)
        self.queue_link = _short_link(os.path.join(self.dir, "spool"))
        main_cf = MAIN_CF.format(dir=self.dir, queue_link=self.queue_link, sink_port=self.sink_port,
                                 milters=", ".join(self.milters), default_action=self.default_action,
                                 milter_protocol=self.milter_protocol)
        settings = dict(map(str.strip, line.split("=", 1)) for line in main_cf.splitlines())
        settings.update(self.extra_main_cf)
        files = {"main.cf": "".join(f"{key} = {value}\n" for key, value in settings.items()),
                 "master.cf": MASTER_CF.format(smtp_port=self.smtp_port)}
        # Postfix rereads a configuration file every 300 ms for as long as its mtime is within
        # the last second ("pausing to let main.cf cool down", util/dict.c); a fresh file costs
        # about 1.5 s in `postfix start`. Backdating says the files are complete.
        past = time.time() - 60
        for name, text in files.items():
            path = os.path.join(self.conf_dir, name)
            with open(path, "w") as out:
                out.write(text)
            os.utime(path, (past, past))

    def start(self):
        """Start smtp-sink and Postfix; return when Postfix's smtpd port listens."""
        self._write_config()
        try:
            self.sink = subprocess.Popen(
                ["smtp-sink", "-u", POSTFIX_USER, "-4", "-d", os.path.join(self.sink_dir, "%Y%m%d%H%M%S."),
                 f"{HOST}:{self.sink_port}", "256"],
                stdin=subprocess.DEVNULL, start_new_session=True)
            wait_for_port(self.sink_port, 10, self.sink)
            started = subprocess.run(["postfix", "-c", self.conf_dir, "start"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if started.returncode != 0:
                raise RuntimeError(f"postfix start failed:\n{started.stdout}\n{self.maillog()}")
            with open(os.path.join(self.dir, "spool", "pid", "master.pid")) as pid_file:
                self.master_pid = int(pid_file.read().split()[0])
            wait_for_port(self.smtp_port, 10)
        except Exception:
            self.stop()
            raise

    def stop(self):
        """SIGTERM the master daemon (as `postfix stop` does) and smtp-sink, and wait for both."""
        if self.master_pid is not None:
            stop_pid(self.master_pid)
            self.master_pid = None
        _stop_process(self.sink)
        if self.queue_link is not None:
            os.unlink(self.queue_link)
            self.queue_link = None

    def send(self, sender, recipients, message, helo="client.harness.test"):
        """Send message (bytes) in one SMTP transaction; return a SendResult."""
        message = re.sub(rb"\r?\n", b"\r\n", message)
        client = smtplib.SMTP(HOST, self.smtp_port, local_hostname=helo, timeout=60)
        try:
            ehlo = _reply(*client.ehlo())
            result = SendResult(mail=_reply(*client.mail(sender)), ehlo=ehlo)
            if result.mail[0] != 250:
                return result
            for recipient in recipients:
                result.rcpts[recipient] = _reply(*client.rcpt(recipient))
            if any(code in (250, 251) for code, _ in result.rcpts.values()):
                try:
                    result.data = _reply(*client.data(message))
                except smtplib.SMTPDataError as refused:  # DATA itself was not answered with 354
                    result.data = _reply(refused.smtp_code, refused.smtp_error)
            return result
        finally:
            try:
                client.quit()
            except smtplib.SMTPException:
                client.close()

    def _delivered_paths(self):
        """Return smtp-sink's finished dump files, oldest first."""
        open_paths = set()
        fd_dir = f"/proc/{self.sink.pid}/fd"
        for fd in os.listdir(fd_dir):
            try:
                open_paths.add(os.readlink(os.path.join(fd_dir, fd)))
            except OSError:
                pass
        paths = [os.path.join(self.sink_dir, name) for name in os.listdir(self.sink_dir)]
        paths = [path for path in paths if path not in open_paths]
        return sorted(paths, key=lambda path: (os.stat(path).st_mtime_ns, path))

    def wait_delivered(self, count, timeout=20):
        """Wait until smtp-sink holds count finished transactions; return their bytes, oldest first.

        One file per relayed transaction: X-Client-Addr, X-Client-Proto, X-Helo-Args, X-Mail-Args
        and one X-Rcpt-Args line per recipient, smtp-sink's Received:, then the message as
        Postfix relayed it. smtp-sink drops every CR, so lines end in LF, and the terminating
        "." leaves one extra LF at the end.
        """
        deadline = time.monotonic() + timeout
        while True:
            paths = self._delivered_paths()
            if len(paths) >= count:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(paths)} of {count} messages delivered after {timeout} s;"
                                   f" maillog:\n{self.maillog()}")
            time.sleep(0.05)
        messages = []
        for path in paths:
            with open(path, "rb") as dump:
                messages.append(dump.read())
        return messages

    def wait_maillog(self, text, timeout=10):
        """Wait until Postfix's log holds text (postlogd writes it a moment later); return the log."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.maillog()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not in Postfix's log after {timeout} s:\n{log}")
            time.sleep(0.05)
        return log

    def maillog(self):
        """Return Postfix's log so far."""
        try:
            with open(os.path.join(self.dir, "maillog"), encoding="utf-8", errors="replace") as log:
                return log.read()
        except FileNotFoundError:
            return ""


def _short_link(target, prefix="mm-pf"):
    """Create a fresh symlink /tmp/PREFIX-XXXXXXXX to target and return its path.

    UNIX sockets (Postfix's public/postlog in its queue directory, slapd's ldapi) must fit
    in 108 bytes, which trial's mktemp() paths do not.
    """
    while True:
        link = f"/tmp/{prefix}-{secrets.token_hex(4)}"
        try:
            os.symlink(target, link)
            return link
        except FileExistsError:
            pass


def _make_reachable(path, user=POSTFIX_USER):
    """Let user traverse to path: add o+x to it and its private ancestors under the working directory.

    trial's mktemp() parents are mkdtemp() directories (mode 0700) below _trial_temp, trial's
    working directory; directories above it are never changed.
    """
    cwd = os.path.realpath(os.getcwd())
    parent = path
    while parent != os.path.dirname(parent):
        if os.path.exists(parent):
            mode = os.stat(parent).st_mode
            if not mode & 0o001:
                if not (parent + os.sep).startswith(cwd + os.sep) or cwd == "/":
                    raise RuntimeError(f"user {user} cannot reach {path}: {parent} lacks o+x")
                os.chmod(parent, (mode & 0o7777) | 0o011)
        parent = os.path.dirname(parent)


def _reply(code, text):
    """Turn smtplib's (code, bytes) into (code, str)."""
    return code, text.decode("utf-8", "replace") if isinstance(text, bytes) else text


def send_with_test_server(spec, *argv):
    """One session of milter-test-server (this checkout's) against spec: its first output line.

    "status: pass", "status: reject [...]", ...; standard error when it printed nothing.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [REPO, *filter(None, [os.environ.get("PYTHONPATH")])])}
    process = subprocess.run(
        [sys.executable, "-m", "miltermanager.tools.test_server", "-s", spec, *argv],
        capture_output=True, text=True, timeout=60, env=env)
    return process.stdout.splitlines()[0] if process.stdout else process.stderr
