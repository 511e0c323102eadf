"""milter-performance-check: send test mails over SMTP and report how fast they were taken.

upstream milter manager's load tool of the same name, with its options and its report, on
Twisted: N parallel SMTP connections (one mail each, as upstream), or one mail every
--interval, or a --flood for a period. It measures the MTA together with its milters, so
running it once against Postfix without milter-manager and once with it shows what the
milters cost. Beyond upstream: latency percentiles in the report, a progress line on
standard error, and exit status 1 with a one-line error for a bad option or a server that
cannot be reached.
"""

import argparse
import base64
import hashlib
import hmac
import itertools
import json
import math
import os
import random
import re
import secrets
import signal
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import formatdate

from twisted.internet import defer, error, protocol
from twisted.protocols.basic import LineOnlyReceiver

from . import arguments

PROGRAM_NAME = "milter-performance-check"
STATUSES = ("success", "temporary-failure", "reject", "error")
AUTH_MECHANISMS = ("auto", "plain", "login", "cram-md5")
ADDITIONAL_LINE = b"0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ\r\n"
PROGRESS_INTERVAL = 0.5  # seconds between progress lines
_PERIOD = re.compile(r"(\d+(?:\.\d+)?)(s|sec|seconds?|m|min|minutes?|h|hours?)?", re.I)
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0}


class UsageError(Exception):
    """A bad option; main() prints the message on one line and exits 1."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as UsageError (one line, exit 1), not usage + exit 2."""

    def error(self, message):
        raise UsageError(message)


# ------------------------------------------------------------------ options


def parse_period(text):
    """Seconds in "5", "5s", "1.5m", "2h" (upstream's period syntax)."""
    match = _PERIOD.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid period: {text!r} (e.g. 5s, 5m, 1.5h)")
    return float(match.group(1)) * _UNIT[(match.group(2) or "s")[0].lower()]


def _mechanism(value):
    value = value.lower().replace("_", "-")
    if value not in AUTH_MECHANISMS:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {value!r} (choose from {', '.join(AUTH_MECHANISMS)})")
    return value


def build_parser():
    """upstream's options, and ours: --report-interval, --progress."""
    parser = _Parser(
        prog=PROGRAM_NAME, usage="%(prog)s [options] [MAIL_FILE_OR_DIRECTORY ...]",
        description="Send test mails to an SMTP server (an MTA with its milters) and report "
                    "throughput, latency and the servers' answers.")
    add = parser.add_argument
    add("--version", action="version", version=f"{PROGRAM_NAME} 0.1.0")
    add("mails", nargs="*", metavar="MAIL_FILE_OR_DIRECTORY",
        help="mail files to send (directories are searched; - is standard input); "
             "without any, a generated test mail is sent --n-mails times")

    smtp = parser.add_argument_group("SMTP options")
    add = smtp.add_argument
    add("--smtp-server", default="localhost", metavar="SERVER",
        help="the SMTP server (%(default)s)")
    add("--smtp-port", type=arguments.port, default=25, metavar="PORT", help="its port (%(default)s)")
    add("--connect-host", metavar="HOST",
        help="send XCLIENT NAME=HOST (Postfix: smtpd_authorized_xclient_hosts)")
    add("--connect-address", metavar="ADDRESS",
        help="send XCLIENT ADDR=ADDRESS (Postfix: smtpd_authorized_xclient_hosts)")
    add("--helo-fqdn", default="localhost.localdomain", metavar="FQDN",
        help="EHLO name, unless a mail file's first Received: names one (%(default)s)")
    add("--starttls", choices=("auto", "always", "disable"), default="auto", metavar="HOW",
        help="auto: STARTTLS when the server offers it; always: fail without it; "
             "disable: never (%(default)s). The certificate is not verified")
    add("--auth-user", metavar="USER", help="authenticate as USER")
    add("--auth-password", metavar="PASSWORD", help="with PASSWORD")
    add("--auth-mechanism", type=_mechanism, default="auto", metavar="MECHANISM",
        help="auto, plain, login or cram-md5 (cram_md5 too); auto takes the first the "
             "server offers of cram-md5, plain, login (%(default)s)")
    add("--auth-map", action="append", default=[], metavar="FILE",
        help="read users per server from FILE, lines of 'SERVER:PORT USER:PASSWORD'; "
             "used when --auth-user is not given")
    add("--from", dest="senders", action="append", metavar="FROM",
        help="envelope sender when a mail file names none (repeatable: taken in turn; "
             "from@example.com)")
    add("--recipient", dest="recipients", action="append", metavar="RECIPIENT",
        help="envelope recipient when a mail file names none (repeatable; to@example.com)")
    add("--force-from", metavar="FROM", help="envelope sender of every mail")
    add("--force-recipient", dest="force_recipients", action="append", metavar="RECIPIENT",
        help="envelope recipient of every mail (repeatable)")
    add("--reading-timeout", type=arguments.seconds, default=60.0, metavar="SECONDS",
        help="seconds to wait for the connection and for each reply (%(default)g)")

    load = parser.add_argument_group("Load options")
    add = load.add_argument
    add("--n-mails", type=arguments.positive, default=100, metavar="N",
        help="send the test mail (or the one mail file) N times (%(default)s)")
    add("--n-additional-lines", type=arguments.not_negative, default=0, metavar="N",
        help="append N lines to the generated test mail (%(default)s)")
    add("--n-concurrent-connections", type=arguments.positive, default=1, metavar="N",
        help="SMTP connections at once, one mail each (%(default)s, as upstream's code; "
             "its documentation says 10)")
    add("--n-workers", type=arguments.positive, default=1, metavar="N",
        help="run N processes, each sending the whole load (%(default)s)")
    timing = load.add_mutually_exclusive_group()
    timing.add_argument(
        "--period", type=parse_period, metavar="PERIOD",
        help="spread the mails evenly over PERIOD (5s, 5m, 1.5h; seconds without a unit)")
    timing.add_argument(
        "--interval", type=parse_period, metavar="INTERVAL",
        help="start one mail every INTERVAL (5s, 5m, 1.5h; seconds without a unit)")
    timing.add_argument(
        "--flood", nargs="?", const="endless", metavar="PERIOD",
        help="send the mails over and over on every connection for PERIOD, or until "
             "interrupted (Ctrl-C) when no PERIOD is given")
    add("--shuffle", action=argparse.BooleanOptionalAction, default=False,
        help="send the mails in random order (no)")

    report = parser.add_argument_group("Report options")
    add = report.add_argument
    add("--report-statistics-data", metavar="FILE",
        help="write one CSV line per mail to FILE: wall clock time, response time, "
             "message size")
    add("--report-failure-responses", action=argparse.BooleanOptionalAction, default=False,
        help="list the servers' temporary failure, reject and error responses at the end (no)")
    add("--report-periodically", dest="report_interval", nargs="?", type=parse_period,
        const=1.0, metavar="INTERVAL",
        help="print a table row every INTERVAL (1s when no INTERVAL is given)")
    add("--report-interval", dest="report_interval", type=parse_period, metavar="SECONDS",
        help="the same: print a table row every SECONDS")
    add("--progress", action=argparse.BooleanOptionalAction, default=None,
        help="a progress line on standard error while it runs (default: when standard "
             "error is a terminal)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


@dataclass
class Settings:
    """Everything a run needs, checked."""

    server: str = "localhost"
    port: int = 25
    connect_host: str = None
    connect_address: str = None
    helo: str = "localhost.localdomain"
    starttls: str = "auto"
    auth_user: str = None
    auth_password: str = None
    auth_mechanism: str = "auto"
    auth_map: dict = field(default_factory=dict)
    senders: list = field(default_factory=lambda: ["from@example.com"])
    recipients: list = field(default_factory=lambda: ["to@example.com"])
    force_from: str = None
    force_recipients: list = None
    reading_timeout: float = 60.0
    n_mails: int = 100
    n_additional_lines: int = 0
    concurrency: int = 1
    n_workers: int = 1
    period: float = None
    interval: float = None
    flood: object = None  # None, "endless" or seconds
    shuffle: bool = False
    data_file: str = None
    report_failures: bool = False
    report_interval: float = None
    progress: bool = None
    worker: bool = False
    paths: list = field(default_factory=list)  # mail files; "-" is standard input
    argv: list = field(default_factory=list)


def parse_auth_map(path):
    """{(server, port): (user, password)} from an --auth-map file; UsageError names the line."""
    entries = {}
    try:
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                match = re.fullmatch(r"(.+):(\w+)\s+([^:\s]+):(.+)", line)
                if match is None:
                    raise UsageError(f"--auth-map: {path}:{number}: expected "
                                     f"'SERVER:PORT USER:PASSWORD'")
                server, port, user, password = match.groups()
                try:
                    port = int(port)
                except ValueError:
                    import socket
                    try:
                        port = socket.getservbyname(port)
                    except OSError:
                        raise UsageError(f"--auth-map: {path}:{number}: "
                                         f"unknown port {port!r}") from None
                entries[(server, port)] = (user, password)
    except OSError as problem:
        raise UsageError(f"--auth-map: {path}: {problem.strerror}") from None
    return entries


def expand_paths(paths):
    """The mail files named: directories searched, sorted as upstream does; "-" kept."""
    files = []
    for path in paths:
        if path == "-" and not os.path.exists(path):
            files.append(path)
        elif os.path.isdir(path):
            for directory, _, names in os.walk(path):
                files.extend(os.path.join(directory, name) for name in names
                             if os.path.isfile(os.path.join(directory, name)))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UsageError(f"{path}: no such file or directory")
    return sorted(files)


def parse_options(argv=None):
    """Parse the command line into Settings; UsageError for anything wrong."""
    argv = list(sys.argv[1:] if argv is None else argv)
    options = build_parser().parse_args(argv)
    flood = options.flood
    if flood is not None and flood != "endless":
        try:
            flood = parse_period(flood)
        except argparse.ArgumentTypeError as problem:
            raise UsageError(f"argument --flood: {problem}") from None
    if options.auth_password is not None and options.auth_user is None:
        raise UsageError("--auth-password needs --auth-user")
    auth_map = {}
    for path in options.auth_map:
        auth_map.update(parse_auth_map(path))
    paths = expand_paths(options.mails)
    if "-" in paths and options.n_workers > 1 and not options.worker:
        raise UsageError("a mail on standard input works with one worker only (--n-workers 1)")
    if options.mails and not paths:
        raise UsageError(f"no mail files in {' '.join(options.mails)}")
    return Settings(
        server=options.smtp_server, port=options.smtp_port,
        connect_host=options.connect_host, connect_address=options.connect_address,
        helo=options.helo_fqdn, starttls=options.starttls, auth_user=options.auth_user,
        auth_password=options.auth_password or "", auth_mechanism=options.auth_mechanism,
        auth_map=auth_map, senders=options.senders or ["from@example.com"],
        recipients=options.recipients or ["to@example.com"], force_from=options.force_from,
        force_recipients=options.force_recipients, reading_timeout=options.reading_timeout,
        n_mails=options.n_mails, n_additional_lines=options.n_additional_lines,
        concurrency=options.n_concurrent_connections, n_workers=options.n_workers,
        period=options.period, interval=options.interval, flood=flood,
        shuffle=options.shuffle, data_file=options.report_statistics_data,
        report_failures=options.report_failure_responses,
        report_interval=options.report_interval, progress=options.progress,
        worker=options.worker, paths=paths, argv=argv)


# ------------------------------------------------------------------ mails


@dataclass(slots=True)
class Mail:
    """One mail to send: the envelope and the data, CRLF and dot-stuffed, "." line included."""

    path: str  # the file, or None for the generated mail
    helo: str
    sender: str
    recipients: list
    data: bytes
    size: int  # of the source, as upstream reports it


def to_crlf(source):
    """source with CRLF line ends, ending in one."""
    text = re.sub(rb"\r?\n", b"\r\n", source)
    return text if text.endswith(b"\r\n") else text + b"\r\n"


def dot_stuff(source):
    """DATA's content for source (CRLF lines): leading dots doubled, the final "." added."""
    if source.startswith(b"."):
        source = b"." + source
    return source.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def extract_address(value):
    """The address in 'Name <a@b>' or 'a@b (Name)'."""
    match = re.search(r"<(.+?)>", value)
    if match:
        return match.group(1)
    return re.sub(r"\(.*?\)", "", value).strip()


def parse_mail_source(source):
    """(helo, sender, recipients) a mail file names, each None when it names none.

    As upstream: the EHLO name from the first Received: "from NAME", the sender from
    From:, the recipients from To: and Cc:.
    """
    text = source.decode("utf-8", "replace")
    head = re.split(r"\r?\n\r?\n", text, maxsplit=1)[0]
    headers = {}
    received = []
    for match in re.finditer(r"^([A-Za-z][A-Za-z-]+):[ \t]*(.*(?:\r?\n[ \t].*)*)", head, re.M):
        name = match.group(1).lower()
        value = re.sub(r"\r?\n\s*", " ", match.group(2)).strip()
        if name == "received":
            received.append(value)
        headers.setdefault(name, value)
    helo = None
    if received:
        found = re.match(r"from ([A-Za-z0-9.-]+)", received[0], re.I)
        helo = found and found.group(1)
    sender = extract_address(headers["from"]) if "from" in headers else None
    recipients = [extract_address(part) for name in ("to", "cc") if name in headers
                  for part in headers[name].split(",") if part.strip()]
    return helo, sender or None, recipients or None


class MailSource:
    """The mails of a run, in order: files (each once, or one N times) or the generated mail."""

    def __init__(self, settings, stdin=None):
        self.settings = settings
        self._senders = itertools.cycle(settings.senders)
        self._files = {}
        for path in dict.fromkeys(settings.paths):
            if path == "-":
                data = (stdin or sys.stdin.buffer).read()
            else:
                try:
                    with open(path, "rb") as mail_file:
                        data = mail_file.read()
                except OSError as problem:
                    raise UsageError(f"{path}: {problem.strerror}") from None
            self._files[path] = (data, parse_mail_source(data), dot_stuff(to_crlf(data)))
        paths = list(settings.paths)
        if len(paths) <= 1:
            paths = [paths[0] if paths else None] * settings.n_mails
        self.paths = paths

    def order(self):
        """The paths in sending order (None: the generated mail)."""
        paths = list(self.paths)
        if self.settings.shuffle:
            random.shuffle(paths)
        return paths

    def mail(self, path):
        """The Mail for path (None: a freshly generated one)."""
        settings = self.settings
        if path is None:
            sender = next(self._senders)
            source = self.generate(sender)
            helo, recipients = settings.helo, settings.recipients
            data = dot_stuff(source)
        else:
            source, (helo, sender, recipients), data = self._files[path]
            if path == "-":
                # A fresh Message-Id each time, as upstream, so that no duplicate is dropped.
                tag = secrets.token_hex(32).encode()
                data = re.sub(rb"(?mi)^Message-Id:.*$", b"Message-Id: <" + tag +
                              b"@mail.example.com>\r", data, count=1)
            helo = helo or settings.helo
            sender = sender or next(self._senders)
            recipients = recipients or settings.recipients
        sender = settings.force_from or sender
        recipients = settings.force_recipients or recipients
        return Mail(path, helo, sender, list(recipients), data, len(source))

    def generate(self, sender):
        """upstream's test mail, CRLF, with a fresh Message-Id and Date."""
        settings = self.settings
        now = formatdate(localtime=True)
        queue_id = "".join(random.choices("0123456789abcdefghijklmnopqrstuvwxyz"
                                          "ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=10))
        head = (f"Return-Path: <{sender}>\r\n"
                f"Received: from {settings.helo} ({settings.helo} [192.168.1.1])\r\n"
                f"\tby mail.example.com with ESMTP id {queue_id};\r\n"
                f"\t{now}\r\n"
                "MIME-Version: 1.0\r\n"
                "Content-Transfer-Encoding: 7bit\r\n"
                "Content-Type: text/plain; charset=US-ASCII\r\n"
                f"X-Mailer: {PROGRAM_NAME}\r\n"
                f"Message-Id: <{secrets.token_hex(32)}@mail.example.com>\r\n"
                "Subject: test mail\r\n"
                f"From: {sender}\r\n"
                f"To: {', '.join(settings.recipients)}\r\n"
                f"Date: {now}\r\n"
                "\r\n"
                "Hello,\r\n"
                "\r\n"
                "This is a test mail.\r\n")
        return head.encode("utf-8") + ADDITIONAL_LINE * settings.n_additional_lines


# ------------------------------------------------------------------ SMTP client


@dataclass(slots=True)
class Reply:
    """One SMTP reply: its code and its lines of text."""

    code: int
    lines: list

    def __str__(self):
        return "\n".join(f"{self.code} {line}" for line in self.lines)


class ReplyError(Exception):
    """The server answered a command with an unexpected code."""

    def __init__(self, reply, command):
        super().__init__(str(reply))
        self.reply = reply
        self.command = command

    @property
    def status(self):
        """temporary-failure (4XX), reject (5XX) or error (anything else), as upstream."""
        return {4: "temporary-failure", 5: "reject"}.get(self.reply.code // 100, "error")


class SessionError(Exception):
    """The session could not go on: a timeout, a lost connection, a missing extension."""


class SMTPClientProtocol(LineOnlyReceiver):
    """Frames SMTP replies; command() sends a line and returns a Deferred for its reply.

    Replies that arrive before anyone waits (the greeting) are kept for the next reply().
    On connectionLost every Deferred still waiting fails with SessionError.
    """

    delimiter = b"\r\n"
    MAX_LENGTH = 65536

    def __init__(self, clock):
        self.clock = clock
        self._lines = []
        self._replies = deque()
        self._waiting = deque()
        self._lost = None
        self.extensions = {}

    def connectionMade(self):
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass  # not TCP (a test transport)

    def lineReceived(self, line):
        code, separator = line[:3], line[3:4]
        if not code.isdigit() or separator not in (b"", b" ", b"-"):
            self._fail(SessionError(f"not an SMTP reply: {line[:80]!r}"))
            self.transport.abortConnection()
            return
        self._lines.append(line[4:].decode("utf-8", "replace"))
        if separator == b"-":
            return
        reply = Reply(int(code), self._lines)
        self._lines = []
        if self._waiting:
            self._waiting.popleft().callback(reply)
        else:
            self._replies.append(reply)

    def lineLengthExceeded(self, line):
        self._fail(SessionError("reply line too long"))
        self.transport.abortConnection()

    def reply(self, timeout):
        """A Deferred firing with the next Reply; TimeoutError after timeout seconds."""
        if self._replies:
            return defer.succeed(self._replies.popleft())
        if self._lost is not None:
            return defer.fail(self._lost)
        d = defer.Deferred(self._waiting.remove)
        self._waiting.append(d)
        return d.addTimeout(timeout, self.clock)

    def command(self, line, timeout):
        """Send line (bytes, without CRLF) and return reply(timeout)."""
        self.transport.write(line + b"\r\n")
        return self.reply(timeout)

    def _fail(self, problem):
        if self._lost is None:
            self._lost = problem
        waiting, self._waiting = self._waiting, deque()
        for d in waiting:
            d.errback(problem)

    def connectionLost(self, reason=protocol.connectionDone):
        self._fail(SessionError("connection lost" if reason.check(error.ConnectionDone)
                                else f"connection lost: {reason.getErrorMessage()}"))


class _ClientFactory(protocol.Factory):
    def __init__(self, clock):
        self.clock = clock

    def buildProtocol(self, addr):
        return SMTPClientProtocol(self.clock)


class Unreachable(Exception):
    """The connection to the server could not be made."""


class Session:
    """One SMTP session sending one mail, as Ruby's Net::SMTP does for upstream's tool."""

    def __init__(self, reactor, settings, clock=None):
        self.reactor = reactor
        self.settings = settings
        self.clock = clock or reactor
        self.protocol = None

    async def expect(self, line, code_class=2):
        """Send line (None: only read) and return the reply; ReplyError if its class differs."""
        timeout = self.settings.reading_timeout
        if line is None:
            reply = await self.protocol.reply(timeout)
        else:
            reply = await self.protocol.command(line, timeout)
        if reply.code // 100 != code_class:
            raise ReplyError(reply, (line or b"").split(b" ", 1)[0].decode("ascii", "replace"))
        return reply

    async def connect(self):
        from twisted.internet.endpoints import HostnameEndpoint

        settings = self.settings
        endpoint = HostnameEndpoint(self.reactor, settings.server, settings.port,
                                    timeout=settings.reading_timeout)
        try:
            self.protocol = await endpoint.connect(_ClientFactory(self.clock))
        except (error.ConnectError, error.DNSLookupError, OSError) as problem:
            raise Unreachable(f"cannot connect to {settings.server}:{settings.port}: "
                              f"{_reason(problem)}") from None

    async def hello(self, helo):
        """EHLO (HELO if refused); remember the extensions."""
        try:
            reply = await self.expect(b"EHLO " + helo.encode())
        except ReplyError as refused:
            if refused.reply.code // 100 != 5:
                raise
            await self.expect(b"HELO " + helo.encode())
            self.protocol.extensions = {}
            return
        extensions = {}
        for line in reply.lines[1:]:
            keyword, _, parameters = line.partition(" ")
            extensions[keyword.upper()] = parameters.upper().split()
        self.protocol.extensions = extensions

    async def starttls(self, helo):
        how = self.settings.starttls
        if how == "disable":
            return
        offered = "STARTTLS" in self.protocol.extensions
        if not offered:
            if how == "always":
                raise SessionError("the server does not offer STARTTLS")
            return
        try:
            from twisted.internet import ssl
            options = ssl.CertificateOptions()
        except (ImportError, AttributeError, NotImplementedError):
            if how == "always":
                raise SessionError("STARTTLS needs pyOpenSSL (python3-openssl)") from None
            return
        await self.expect(b"STARTTLS")
        self.protocol.transport.startTLS(options)
        await self.hello(helo)

    async def xclient(self, helo):
        settings = self.settings
        attributes = []
        if settings.connect_host:
            attributes.append(f"NAME={settings.connect_host}")
        if settings.connect_address:
            attributes.append(f"ADDR={settings.connect_address}")
        if not attributes:
            return
        if "XCLIENT" not in self.protocol.extensions:
            raise SessionError("XCLIENT isn't enabled; see smtpd_authorized_xclient_hosts "
                               "in Postfix")
        await self.expect(("XCLIENT " + " ".join(attributes)).encode())
        await self.hello(helo)

    async def authenticate(self):
        settings = self.settings
        if settings.auth_user is not None:
            user, password = settings.auth_user, settings.auth_password
            mechanism = settings.auth_mechanism
        else:
            user, password = settings.auth_map.get((settings.server, settings.port),
                                                   (None, None))
            mechanism = "auto"
        if user is None:
            return
        offered = [name.lower() for name in self.protocol.extensions.get("AUTH", [])]
        if mechanism == "auto":
            mechanism = next((name for name in ("cram-md5", "plain", "login")
                              if name in offered), None)
            if mechanism is None:
                raise SessionError("the server offers no authentication mechanism we know: "
                                   f"{offered or 'none'}")
        elif mechanism not in offered:
            raise SessionError(f"the server does not offer AUTH {mechanism.upper()}: "
                               f"{offered or 'none'}")
        user_bytes, password_bytes = user.encode(), password.encode()
        try:
            if mechanism == "plain":
                token = base64.b64encode(b"\0" + user_bytes + b"\0" + password_bytes)
                await self.expect(b"AUTH PLAIN " + token)
            elif mechanism == "login":
                await self.expect(b"AUTH LOGIN", 3)
                await self.expect(base64.b64encode(user_bytes), 3)
                await self.expect(base64.b64encode(password_bytes))
            else:
                challenge = await self.expect(b"AUTH CRAM-MD5", 3)
                nonce = base64.b64decode(challenge.lines[0].strip())
                digest = hmac.new(password_bytes, nonce, hashlib.md5).hexdigest()
                await self.expect(base64.b64encode(user_bytes + b" " + digest.encode()))
        except ReplyError as refused:
            raise SessionError(f"authentication failed: {refused.reply}") from None

    async def send(self, mail):
        """Run the whole session for mail; ReplyError, SessionError, Unreachable or TimeoutError."""
        await self.connect()
        transport = self.protocol.transport
        try:
            await self.expect(None)  # the greeting
            await self.hello(mail.helo)
            await self.starttls(mail.helo)
            await self.xclient(mail.helo)
            await self.authenticate()
            await self.expect(b"MAIL FROM:<" + mail.sender.encode() + b">")
            for recipient in mail.recipients:
                await self.expect(b"RCPT TO:<" + recipient.encode() + b">")
            await self.expect(b"DATA", 3)
            transport.write(mail.data)
            await self.expect(None)
        except (ReplyError, SessionError):
            transport.write(b"QUIT\r\n")  # and close without waiting, as after any refusal
            transport.loseConnection()
            raise
        except defer.TimeoutError:
            transport.abortConnection()
            raise
        try:
            await self.protocol.command(b"QUIT", self.settings.reading_timeout)
        except (SessionError, defer.TimeoutError):
            pass  # a server that closes at once is fine too
        transport.loseConnection()


def _reason(problem):
    return str(problem).strip().rstrip(".") or type(problem).__name__


@dataclass(slots=True)
class Result:
    """One mail's outcome."""

    path: str
    status: str  # one of STATUSES
    message: str  # the server's response or the error; None on success
    finished: float  # wall clock, seconds since the epoch
    response_time: float  # seconds
    size: int
    connected: bool = True

    def to_json(self):
        return json.dumps([self.path, self.status, self.message, self.finished,
                           self.response_time, self.size, self.connected])

    @classmethod
    def from_json(cls, line):
        return cls(*json.loads(line))


async def send_mail(reactor, settings, mail, clock=None):
    """Send mail in one SMTP session; return its Result (never raises for SMTP trouble)."""
    session = Session(reactor, settings, clock)
    started = time.perf_counter()
    status, message, connected = "success", None, True
    try:
        await session.send(mail)
    except ReplyError as refused:
        status, message = refused.status, str(refused.reply)
    except Unreachable as problem:
        status, message, connected = "error", str(problem), False
    except SessionError as problem:
        status, message = "error", str(problem)
    except defer.TimeoutError:
        status = "error"
        message = f"timeout: no reply within {settings.reading_timeout:g} s"
    return Result(mail.path, status, message, time.time(), time.perf_counter() - started,
                  mail.size, connected)


# ------------------------------------------------------------------ statistics


class Statistics:
    """Counts and response times of the mails of a run or of one report interval."""

    def __init__(self, started):
        self.started = started  # time.monotonic()
        self.elapsed = None
        self.times = []
        self.counts = Counter()
        self.responses = {status: [] for status in STATUSES[1:]}
        self.sources = []  # (response time, path) of mail files
        self.failed_sources = {"reject": [], "temporary-failure": []}
        self.total_time = 0.0
        self.max_time = 0.0
        self.min_time = None

    def update(self, result):
        response_time = result.response_time
        self.times.append(response_time)
        self.total_time += response_time
        self.max_time = max(self.max_time, response_time)
        self.min_time = response_time if self.min_time is None else min(self.min_time,
                                                                        response_time)
        self.counts[result.status] += 1
        if result.message is not None:
            self.responses[result.status].append(result.message)
        if result.path is not None:
            self.sources.append((response_time, result.path))
            if result.status in self.failed_sources:
                self.failed_sources[result.status].append(result.path)

    def finish(self, now):
        self.elapsed = now - self.started

    @property
    def n_mails(self):
        return len(self.times)

    def throughput(self, now):
        elapsed = self.elapsed if self.elapsed is not None else now - self.started
        return self.n_mails / elapsed if elapsed > 0 else float(self.n_mails)

    @property
    def average(self):
        return self.total_time / self.n_mails if self.times else 0.0

    def percentiles(self, *fractions):
        """Nearest-rank percentiles of the response times (0.0 with no mail)."""
        ordered = sorted(self.times)
        if not ordered:
            return [0.0 for _ in fractions]
        return [ordered[min(len(ordered), max(1, math.ceil(q * len(ordered)))) - 1]
                for q in fractions]

    def format(self, cpu_time=None):
        """upstream's final report, with percentiles, a Success line and the CPU time."""
        out = []
        if self.sources:
            slowest = sorted(self.sources, key=lambda entry: -entry[0])[:10]
            out.extend(f"{seconds:5.2f} (sec): {path}" for seconds, path in slowest)
            out.append("")
        for label, status in (("Rejected mails:", "reject"),
                              ("Temporary failed mails:", "temporary-failure")):
            if self.failed_sources[status]:
                out.append(label)
                out.extend(self.failed_sources[status])
                out.append("")
        elapsed = self.elapsed or 0.0
        out += ["Total:",
                f"      N mails: {self.n_mails:6d}",
                f" Elapsed time: {elapsed:6.2f} (sec)",
                f"   Throughput: {self.throughput(self.started + elapsed):6.2f} (mails/sec)"]
        if cpu_time is not None:
            out.append(f"     CPU time: {cpu_time:6.2f} (sec)")
        p50, p90, p99 = self.percentiles(0.5, 0.9, 0.99)
        out += ["",
                "Per mail:",
                f"          Max: {self.max_time:8.4f} (sec)",
                f"          Min: {self.min_time or 0.0:8.4f} (sec)",
                f"      Average: {self.average:8.4f} (sec)",
                f"          p50: {p50:8.4f} (sec)",
                f"          p90: {p90:8.4f} (sec)",
                f"          p99: {p99:8.4f} (sec)",
                "",
                "Status:"]
        for label, status in (("Temporary failure", "temporary-failure"),
                              ("           Reject", "reject"),
                              ("            Error", "error"),
                              ("          Success", "success")):
            count = self.counts[status]
            share = 100.0 * count / self.n_mails if self.n_mails else 0.0
            out.append(f" {label}: {count:3d} ({share:6.2f}%)")
        return "\n".join(out) + "\n"

    def format_responses(self):
        """The servers' failure responses, numbered (--report-failure-responses)."""
        out = []
        for label, status in (("Temporary failures:", "temporary-failure"),
                              ("Rejects:", "reject"), ("Errors:", "error")):
            responses = self.responses[status]
            if responses:
                width = len(str(len(responses)))
                out.append(label)
                out.extend(f"  {number:{width}d} {response}"
                           for number, response in enumerate(responses, 1))
        return "\n".join(out) + "\n" if out else ""


PERIODIC_HEADER = ("Time", "Sent", "mails/s", "Max(s)", "Min(s)", "Avg(s)", "4XX", "5XX",
                   "Error", "p99(s)")


def periodic_line(items):
    """One row of the periodic table: upstream's columns, then ours."""
    return "%8s %5s %7s %6s %6s %6s %5s %5s %5s %6s" % tuple(items)


def periodic_row(statistics, now, wall=None):
    """The row for one interval's statistics."""
    (p99,) = statistics.percentiles(0.99)
    return periodic_line([
        time.strftime("%H:%M:%S", time.localtime(wall)), statistics.n_mails,
        f"{statistics.throughput(now):7.2f}", f"{statistics.max_time:6.3f}",
        f"{statistics.min_time or 0.0:6.3f}", f"{statistics.average:6.3f}",
        statistics.counts["temporary-failure"], statistics.counts["reject"],
        statistics.counts["error"], f"{p99:6.3f}"])


class Progress:
    """A progress line on stderr: over the same line on a terminal, one line each otherwise."""

    def __init__(self, stream, total):
        self.stream = stream
        self.total = total  # None for a flood without end
        self.tty = stream.isatty() if hasattr(stream, "isatty") else False
        self.shown = False

    def show(self, statistics, now, in_flight):
        counts = statistics.counts
        done = statistics.n_mails
        text = (f"{PROGRAM_NAME}: {done}" + (f"/{self.total}" if self.total else "")
                + f" mails, {counts['success']} ok, {counts['temporary-failure']} 4XX,"
                  f" {counts['reject']} 5XX, {counts['error']} errors,"
                + ("" if in_flight is None else f" {in_flight} in flight,")
                + f" {statistics.throughput(now):.1f} mails/s")
        self.stream.write(f"\r{text}\x1b[K" if self.tty else text + "\n")
        self.stream.flush()
        self.shown = True

    def finish(self):
        if self.shown and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ------------------------------------------------------------------ the run


class Checker:
    """Runs the load a Settings describes and collects the Results."""

    def __init__(self, reactor, settings, stdout, stderr, mails=None, clock=None):
        self.reactor = reactor
        self.clock = clock or reactor
        self.settings = settings
        self.stdout = stdout
        self.stderr = stderr
        self.mails = mails
        self.statistics = None
        self.periodic = None
        self.in_flight = 0
        self.connected = 0
        self.unreachable = None
        self.stopping = False
        self.data_file = None
        self.on_result = None  # a worker's: write each Result to the parent instead
        self._workers = []
        self._worker_started = False
        self._interrupts = 0

    # --- results

    def record(self, result):
        if result.connected:
            self.connected += 1
        elif self.connected == 0 and self.unreachable is None:
            # Nothing has answered yet: stop rather than wait out every mail's timeout.
            self.unreachable = result.message
            self.stopping = True
        if self.on_result is not None:
            self.on_result(result)
            return
        self.statistics.update(result)
        if self.periodic is not None:
            self.periodic.update(result)
        if self.data_file is not None:
            stamp = datetime.fromtimestamp(result.finished).astimezone()
            self.data_file.write(f"{stamp.isoformat(timespec='microseconds')},"
                                 f"{result.response_time:.6f},{result.size}\n")

    def worker_started(self, wall):
        """A worker began sending at wall (epoch seconds): the run's clock starts there."""
        if not self._worker_started:
            self._worker_started = True
            started = time.monotonic() - max(0.0, time.time() - wall)
            self.statistics.started = started
            if self.periodic is not None:
                self.periodic.started = started

    async def _send(self, path):
        self.in_flight += 1
        try:
            result = await send_mail(self.reactor, self.settings, self.mails.mail(path),
                                     self.clock)
        finally:
            self.in_flight -= 1
        self.record(result)

    # --- the ways to send

    async def _parallel(self, paths):
        pending = iter(paths)

        async def connection():
            for path in pending:
                if self.stopping:
                    return
                await self._send(path)

        await defer.gatherResults(
            [defer.ensureDeferred(connection())
             for _ in range(min(self.settings.concurrency, len(paths)))], consumeErrors=True)

    async def _spaced(self, paths, interval):
        started = []
        for number, path in enumerate(paths):
            if self.stopping:
                break
            if number:
                await _sleep(self.clock, interval)
                if self.stopping:
                    break
            started.append(defer.ensureDeferred(self._send(path)))
        await defer.gatherResults(started, consumeErrors=True)

    async def _flood(self, paths):
        flood = self.settings.flood
        end = None if flood == "endless" else time.monotonic() + flood

        async def connection():
            while not self.stopping:
                for path in paths:
                    if self.stopping or (end is not None and time.monotonic() >= end):
                        return
                    await self._send(path)

        await defer.gatherResults(
            [defer.ensureDeferred(connection()) for _ in range(self.settings.concurrency)],
            consumeErrors=True)

    async def _load(self):
        settings = self.settings
        paths = self.mails.order()
        if settings.interval is not None:
            await self._spaced(paths, settings.interval)
        elif settings.period is not None:
            await self._spaced(paths, settings.period / len(paths))
        elif settings.flood is not None:
            await self._flood(paths)
        else:
            await self._parallel(paths)

    # --- several processes

    async def _run_workers(self):
        argv = [sys.executable, "-m", "miltermanager.tools.performance_check",
                *self.settings.argv, "--worker", "--no-progress"]
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        ended = []
        for _ in range(self.settings.n_workers):
            worker = _WorkerProtocol(self)
            self.reactor.spawnProcess(worker, sys.executable, argv, env=env,
                                      childFDs={0: "w", 1: "r", 2: 2})
            worker.transport.closeStdin()
            self._workers.append(worker)
            ended.append(worker.ended)
        codes = await defer.gatherResults(ended, consumeErrors=True)
        failed = [code for code in codes if code]
        if failed and self.statistics.n_mails == 0 and self.unreachable is None:
            self.unreachable = (f"{len(failed)} of {len(codes)} workers failed "
                                f"(exit status {failed[0]})")

    # --- stopping

    def interrupt(self):
        """SIGINT: the first stops starting mails; a second (not in a worker) stops at once."""
        self._interrupts += 1
        self.stopping = True
        for worker in self._workers:
            worker.signal("INT")
        if self._interrupts > 1 and not self.settings.worker:
            for worker in self._workers:
                worker.signal("KILL")
            os._exit(130)

    # --- the whole run

    def _in_flight(self):
        """Mails being sent now; None when workers send them (they do not say)."""
        return None if self.settings.n_workers > 1 else self.in_flight

    def _open_data_file(self):
        path = self.settings.data_file
        try:
            self.data_file = open(path, "w", encoding="utf-8")
        except OSError as problem:
            raise UsageError(f"--report-statistics-data: {path}: {problem.strerror}") from None
        self.data_file.write("wall clock time,response time,message size\n")

    def _start_reports(self):
        """Start the progress line and the periodic report; return (progress, loops)."""
        from twisted.internet import task

        settings = self.settings
        progress, loops = None, []
        show_progress = settings.progress
        if show_progress is None:
            show_progress = bool(getattr(self.stderr, "isatty", lambda: False)())
        if show_progress:
            total = None
            if settings.flood is None:
                total = len(self.mails.paths) * settings.n_workers
            progress = Progress(self.stderr, total)
            loops.append(task.LoopingCall(
                lambda: progress.show(self.statistics, time.monotonic(), self._in_flight())))
            loops[-1].clock = self.clock
            loops[-1].start(PROGRESS_INTERVAL, now=False)
        if settings.report_interval is not None:
            self.stdout.write(periodic_line(PERIODIC_HEADER) + "\n")
            self.stdout.flush()
            self.periodic = Statistics(time.monotonic())

            def report_interval():
                now = time.monotonic()
                self.periodic.finish(now)
                self.stdout.write(periodic_row(self.periodic, now, time.time()) + "\n")
                self.stdout.flush()
                self.periodic = Statistics(now)

            loops.append(task.LoopingCall(report_interval))
            loops[-1].clock = self.clock
            loops[-1].start(settings.report_interval, now=False)
        return progress, loops

    async def run(self):
        """Send and print the report; return the exit status (1: the server was unreachable)."""
        settings = self.settings
        self.statistics = Statistics(time.monotonic())
        if settings.worker:
            # The parent's clock starts when the first worker starts sending, not at the
            # interpreters' start-up.
            self.stdout.write(json.dumps({"started": time.time()}) + "\n")
            await self._load()
            return 0
        if settings.data_file is not None:
            self._open_data_file()
        progress, loops = self._start_reports()
        cpu_before = _cpu_time()
        try:
            if settings.n_workers > 1:
                await self._run_workers()
            else:
                await self._load()
        finally:
            self.statistics.finish(time.monotonic())
            for loop in loops:
                if loop.running:
                    loop.stop()
            if self.periodic is not None and self.periodic.n_mails:
                now = time.monotonic()
                self.periodic.finish(now)  # the last, shorter interval
                self.stdout.write(periodic_row(self.periodic, now, time.time()) + "\n")
            if progress is not None:
                progress.show(self.statistics, time.monotonic(), self._in_flight())
                progress.finish()
            if self.data_file is not None:
                self.data_file.close()
        if self.unreachable is not None and self.connected == 0:
            self.stderr.write(f"{PROGRAM_NAME}: {self.unreachable}\n")
            self.stderr.flush()
            return 1
        report = self.statistics.format(_cpu_time() - cpu_before)
        if settings.report_interval is not None:
            report = "\n" + report
        if settings.report_failures:
            responses = self.statistics.format_responses()
            if responses:
                report += "\n" + responses
        self.stdout.write(report)
        self.stdout.flush()
        return 0


def _cpu_time():
    """User and system CPU seconds of this process and its reaped children (the workers)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _sleep(clock, seconds):
    from twisted.internet import task

    return task.deferLater(clock, seconds, lambda: None)


class _WorkerProtocol(protocol.ProcessProtocol):
    """A --worker child: one Result per stdout line, {"error": ...} if it could not connect."""

    def __init__(self, checker):
        self.checker = checker
        self.buffer = b""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        lines = (self.buffer + data).split(b"\n")
        self.buffer = lines.pop()
        for line in lines:
            if line.startswith(b"{"):
                self.checker.worker_started(json.loads(line)["started"])
            elif line:
                self.checker.record(Result.from_json(line))

    def signal(self, name):
        try:
            self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass

    def processEnded(self, reason):
        self.ended.callback(getattr(reason.value, "exitCode", None) or 0)


# ------------------------------------------------------------------ main


async def run(reactor, settings, stdout=None, stderr=None, stdin=None):
    """Run what settings ask for and print the report; return the exit status."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    checker = Checker(reactor, settings, stdout, stderr, MailSource(settings, stdin))
    if settings.worker:
        def forward(result):
            stdout.write(result.to_json() + "\n")
            stdout.flush()

        checker.on_result = forward
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT,
                  lambda number, frame: reactor.callFromThread(checker.interrupt))
    try:
        return await checker.run()
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv=None):
    """The milter-performance-check console script."""
    try:
        settings = parse_options(argv)
        if settings.worker:
            settings.n_workers = 1
    except UsageError as problem:
        sys.stderr.write(f"{PROGRAM_NAME}: {problem}\n")
        sys.exit(1)
    from twisted.internet import task

    def start(reactor):
        d = defer.ensureDeferred(run(reactor, settings))

        def exit_status(code):
            if code:
                raise SystemExit(code)

        def usage(failure):
            failure.trap(UsageError)
            sys.stderr.write(f"{PROGRAM_NAME}: {failure.value}\n")
            raise SystemExit(1)

        return d.addCallbacks(exit_status, usage)

    task.react(start)


if __name__ == "__main__":
    main()
