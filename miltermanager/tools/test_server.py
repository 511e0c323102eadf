"""milter-test-server: an MTA simulator that drives one milter, and a load generator.

One session (the default) walks a milter through negotiation, CONNECT, HELO,
MAIL, RCPT..., UNKNOWN, DATA, the headers, the body and END_OF_MESSAGE with
upstream's options, and prints upstream's report: the status, the elapsed
time and, with --output-message, the message as the milter left it.
``--n-sessions N --concurrency C`` runs many such sessions at once instead
and prints throughput and latency; every packet that does not depend on the
milter's answers is encoded once and reused.
"""

import argparse
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from twisted.internet import defer

from .. import client, connection_spec
from ..protocol import constants as c
from ..protocol import messages as m
from ..protocol import negotiation
from ..protocol.errors import ProtocolError
from . import arguments
from . import message as msg

PROGRAM_NAME = "milter-test-server"
DEFAULT_NEGOTIATE_VERSION = 6  # upstream's code; its documentation says 8
COLOR_CHOICES = ("yes", "true", "no", "false", "auto")

# Final replies and the status upstream prints for them; None goes on.
_VERDICTS = {
    m.Continue: None,
    m.Skip: None,
    m.Accept: "accept",
    m.Reject: "reject",
    m.Tempfail: "temporary-failure",
    m.Discard: "discard",
    m.Shutdown: "shutdown",
}
_RECIPIENT_REFUSALS = frozenset({"reject", "temporary-failure"})


class UsageError(Exception):
    """A bad option value; main() prints the message and exits 1."""


def verdict(reply):
    """The status a final reply ends the session with, or None to go on."""
    kind = type(reply)
    if kind is m.ReplyCode:
        return "temporary-failure" if reply.is_temporary else "reject"
    try:
        return _VERDICTS[kind]
    except KeyError:
        raise ProtocolError(f"unexpected final reply {reply!r}") from None


# ------------------------------------------------------------------ packets


class Packet:
    """A command encoded once, sent as often as needed (the client calls encode())."""

    __slots__ = ("code", "command", "_packet")

    def __init__(self, command):
        self.code = command.code
        self.command = command
        self._packet = command.encode()

    def encode(self):
        return self._packet

    def __repr__(self):
        return repr(self.command)


def _other_form(name):
    if name[:1] == b"{" and name[-1:] == b"}":
        return name[1:-1]
    return b"{" + name + b"}"


class Step:
    """One command of the walk and the macros sent just before it."""

    __slots__ = ("stage", "command", "macros", "_macro_packets")

    def __init__(self, stage, command, macros=None):
        self.stage = stage
        self.command = Packet(command)
        self.macros = {msg.wire(name): msg.wire(value) for name, value in (macros or {}).items()}
        self._macro_packets = {}

    def macro_packet(self, options):
        """The D packet for this step (None without macros), filtered by the milter's symbol list.

        As Postfix: a non-empty list the milter asked for at negotiation names
        the macros it gets at that stage; otherwise it gets all of them.
        """
        requested = options.macro_names(self.stage) if options.macros else None
        key = tuple(requested) if requested else None
        try:
            return self._macro_packets[key]
        except KeyError:
            pass
        macros = self.macros
        if key is not None:
            wanted = set(key)
            macros = {name: value for name, value in macros.items()
                      if name in wanted or _other_form(name) in wanted}
        packet = Packet(m.Macro(self.stage, macros)) if macros else None
        self._macro_packets[key] = packet
        return packet


# ------------------------------------------------------------------ options


def _macro(value):
    name, colon, macro_value = value.partition(":")
    if not colon:
        raise argparse.ArgumentTypeError(
            f"macro name and value delimiter ':' doesn't exist: <{value}>")
    return name, macro_value


def _header(value):
    name, colon, header_value = value.partition(":")
    if not colon or not name:
        raise argparse.ArgumentTypeError("headers option should be 'NAME:VALUE'")
    return name.rstrip(" \t"), header_value.lstrip(" \t")


def build_parser():
    """upstream's options; -h is --header as upstream, so only --help shows the help."""
    parser = argparse.ArgumentParser(
        prog=PROGRAM_NAME, add_help=False,
        description="Talk the milter protocol to one milter as an MTA would and print the result.")
    add = parser.add_argument
    add("--help", action="help", help="show this help and exit")
    add("--version", action="version", version=f"{PROGRAM_NAME} 0.1.0")
    add("--name", default=PROGRAM_NAME, help="the MTA's name, sent as {daemon_name}")
    add("-s", "--connection-spec", required=True, metavar="SPEC",
        help="the milter's socket: unix:PATH, inet:PORT@HOST, inet6:PORT@HOST")
    add("--negotiate-version", type=int, default=DEFAULT_NEGOTIATE_VERSION, metavar="VERSION",
        help="milter protocol version to offer (%(default)s)")
    add("--connect-host", default="mx.example.net", metavar="HOST",
        help="client host name on CONNECT (%(default)s)")
    add("--connect-address", default="inet:50443@[192.168.123.123]", metavar="SPEC",
        help="client address on CONNECT (%(default)s)")
    add("--connect-macro", type=_macro, action="append", default=[], metavar="NAME:VALUE",
        help="a macro for CONNECT (repeatable)")
    add("--helo-fqdn", default="delian", metavar="FQDN", help="HELO name (%(default)s)")
    add("--helo-macro", type=_macro, action="append", default=[], metavar="NAME:VALUE",
        help="a macro for HELO (repeatable)")
    add("-f", "--envelope-from", metavar="FROM", help="sender (sender@example.com)")
    add("--from", dest="envelope_from", help=argparse.SUPPRESS)
    add("--envelope-from-macro", type=_macro, action="append", default=[],
        metavar="NAME:VALUE", help="a macro for MAIL (repeatable)")
    add("-r", "--envelope-recipient", dest="recipients", action="append", metavar="RECIPIENT",
        help="a recipient (repeatable; receiver@example.org)")
    add("--recipient", dest="recipients", action="append", help=argparse.SUPPRESS)
    add("--envelope-recipient-macro", type=_macro, action="append", default=[],
        metavar="NAME:VALUE", help="a macro for RCPT (repeatable)")
    add("--data-macro", type=_macro, action="append", default=[], metavar="NAME:VALUE",
        help="a macro for DATA (repeatable)")
    add("-h", "--header", dest="headers", type=_header, action="append", default=[],
        metavar="NAME:VALUE", help="a header (repeatable); From: and To: follow the envelope")
    add("--end-of-header-macro", type=_macro, action="append", default=[],
        metavar="NAME:VALUE", help="a macro for END_OF_HEADERS (repeatable)")
    add("-b", "--body", dest="body_chunks", action="append", metavar="CHUNK",
        help="a body chunk (repeatable)")
    add("--end-of-message-macro", type=_macro, action="append", default=[],
        metavar="NAME:VALUE", help="a macro for END_OF_MESSAGE (repeatable)")
    add("--unknown", metavar="COMMAND", help="an SMTP command sent as UNKNOWN after RCPT")
    add("--authenticated-name", metavar="NAME", help="{auth_authen} on MAIL")
    add("--authenticated-type", metavar="TYPE", help="{auth_type} on MAIL")
    add("--authenticated-author", metavar="AUTHOR", help="{auth_author} on MAIL")
    add("-m", "--mail-file", metavar="PATH",
        help="an RFC 822 message for headers and body; its From:/To: give the envelope")
    add("--output-message", action="store_true", help="print the message as the milter left it")
    add("--color", nargs="?", const="yes", default="auto", choices=COLOR_CHOICES,
        help="color the message diff (auto: when stdout is a terminal)")
    add("--connection-timeout", type=arguments.seconds, default=300.0, metavar="SECONDS",
        help="seconds to connect to the milter (%(default)s)")
    add("--reading-timeout", type=arguments.seconds, default=10.0, metavar="SECONDS",
        help="seconds to wait for each reply (%(default)s)")
    add("--writing-timeout", type=arguments.seconds, default=10.0, metavar="SECONDS",
        help="seconds to write each command (%(default)s)")
    add("--end-of-message-timeout", type=arguments.seconds, default=300.0, metavar="SECONDS",
        help="seconds to wait for the end-of-message reply (%(default)s)")
    add("--all-timeouts", type=arguments.seconds, metavar="SECONDS", help="set all four timeouts")
    add("-t", "--threads", type=int, default=0, metavar="N",
        help="run N sessions at once and print each result (upstream's option)")
    add("-v", "--verbose", action="store_true", help="log every packet to stderr")
    load = parser.add_argument_group("load generation (prints a summary instead)")
    load.add_argument("--n-sessions", type=arguments.positive, metavar="N", help="sessions to run")
    load.add_argument("--concurrency", type=arguments.positive, default=1, metavar="C",
                      help="sessions at once (%(default)s)")
    load.add_argument("--n-messages-per-session", type=arguments.positive, default=1, metavar="M",
                      help="messages per connection, ABORT between them (%(default)s)")
    return parser


def _connect_command(host, address_spec):
    try:
        spec = connection_spec.parse(address_spec)
    except ValueError as problem:
        raise UsageError(f"--connect-address: {problem}") from None
    if spec.family == "unix":
        return m.Connect(msg.wire(host), c.FAMILY_UNIX, 0, msg.wire(spec.path))
    if spec.family not in ("inet", "inet6") or spec.port is None:
        raise UsageError(f"--connect-address: {address_spec!r} is not unix:, inet: or inet6:")
    family = c.FAMILY_INET6 if spec.family == "inet6" else c.FAMILY_INET
    address = spec.host or ("::1" if spec.family == "inet6" else "127.0.0.1")
    return m.Connect(msg.wire(host), family, spec.port, msg.wire(address))


def _stage_macros(defaults, given):
    macros = dict(defaults)
    macros.update(given)  # upstream lets its defaults win; what the user asked for wins here
    return macros


@dataclass
class Settings:
    """Everything a run needs, decided before the first connection."""

    spec: str
    version: int
    timeouts: client.Timeouts
    original: msg.Message
    steps: dict
    output_message: bool = False
    color: bool = False
    verbose: bool = False
    threads: int = 0
    n_sessions: int | None = None
    concurrency: int = 1
    n_messages: int = 1
    offer: m.Negotiate = field(default=None)

    def __post_init__(self):
        if self.offer is None:
            # Every action and every step flag the version knows, as upstream offers.
            self.offer = negotiation.offer(self.version)


def _use_color(choice, stream):
    if choice in ("yes", "true"):
        return True
    if choice in ("no", "false"):
        return False
    return bool(getattr(stream, "isatty", None) and stream.isatty()
                and os.environ.get("TERM", "dumb") != "dumb")


def parse_options(argv=None, stdout=None):
    """Parse the command line into Settings; UsageError for values argparse cannot judge."""
    options = build_parser().parse_args(argv)
    if options.negotiate_version < 2:
        raise UsageError(f"--negotiate-version: {options.negotiate_version} is below 2")
    try:
        connection_spec.parse(options.connection_spec)
    except ValueError as problem:
        raise UsageError(str(problem)) from None

    mail = None
    if options.mail_file is not None:
        try:
            if options.mail_file == "-":
                data = sys.stdin.buffer.read()
            else:
                with open(options.mail_file, "rb") as mail_file:
                    data = mail_file.read()
            mail = msg.parse_mail(data)
        except OSError as problem:
            raise UsageError(f"{options.mail_file}: {problem.strerror}") from None
        except msg.MailFileError as problem:
            raise UsageError(f"{options.mail_file}: {problem}") from None

    sender = options.envelope_from
    if sender is None:
        sender = mail.sender if mail and mail.sender else "sender@example.com"
    sender = msg.normalize_address(sender)
    recipients = options.recipients
    if not recipients:
        recipients = mail.recipients if mail and mail.recipients else ["receiver@example.org"]
    recipients = [msg.normalize_address(recipient) for recipient in recipients]

    headers = list(options.headers) + (list(mail.headers) if mail else [])
    names = {name.lower() for name, _ in headers}
    if "from" not in names:
        headers.append(("From", sender))
    if "to" not in names:
        headers.append(("To", recipients[0]))

    if options.body_chunks:
        chunks = [piece for chunk in options.body_chunks
                  for piece in msg.split_body(msg.wire(chunk))]
    elif mail is not None:
        chunks = msg.split_body(mail.body)
    else:
        chunks = msg.split_body(msg.to_crlf(msg.wire(msg.DEFAULT_BODY)))
    original = msg.Message(sender, recipients, headers, b"".join(chunks))

    timeouts = client.Timeouts(
        connection=options.connection_timeout, writing=options.writing_timeout,
        reading=options.reading_timeout, end_of_message=options.end_of_message_timeout)
    if options.all_timeouts is not None:
        timeouts = client.Timeouts(*(options.all_timeouts,) * 4)

    mail_macros = {"i": "i", "{mail_mailer}": "mail_mailer", "{mail_host}": "mail_host",
                   "{mail_addr}": "mail_addr"}
    for macro, value in (("{auth_authen}", options.authenticated_name),
                         ("{auth_type}", options.authenticated_type),
                         ("{auth_author}", options.authenticated_author)):
        if value is not None:
            mail_macros[macro] = value
    rcpt_macros = _stage_macros({"{rcpt_mailer}": "rcpt_mailer", "{rcpt_host}": "rcpt_host"},
                                options.envelope_recipient_macro)
    steps = {
        "connect": Step(c.CONNECT, _connect_command(options.connect_host,
                                                    options.connect_address),
                        _stage_macros({"{daemon_name}": options.name, "{if_name}": "localhost",
                                       "{if_addr}": "127.0.0.1", "j": "mail.example.com"},
                                      options.connect_macro)),
        "helo": Step(c.HELO, m.Helo(msg.wire(options.helo_fqdn)),
                     _stage_macros({"{tls_version}": "0", "{cipher}": "0", "{cipher_bits}": "0",
                                    "{cert_subject}": "cert_subject",
                                    "{cert_issuer}": "cert_issuer"}, options.helo_macro)),
        "mail": Step(c.MAIL, m.Mail(msg.wire(sender)),
                     _stage_macros(mail_macros, options.envelope_from_macro)),
        "rcpts": [Step(c.RCPT, m.Rcpt(msg.wire(recipient)),
                       {**rcpt_macros, "{rcpt_addr}": recipient}) for recipient in recipients],
        "unknown": (None if options.unknown is None
                    else Step(c.UNKNOWN, m.Unknown(msg.wire(options.unknown)))),
        "data": Step(c.DATA, m.DATA, _stage_macros({}, options.data_macro)),
        "headers": [Step(c.HEADER, m.Header(msg.wire(name), msg.wire(value)))
                    for name, value in headers],
        # With SMFIP_HDR_LEADSPC the milter gets the space after the colon too.
        "headers_leading_space": [Step(c.HEADER, m.Header(msg.wire(name), msg.wire(" " + value)))
                                  for name, value in headers],
        "end_of_headers": Step(c.END_OF_HEADERS, m.END_OF_HEADERS,
                               _stage_macros({}, options.end_of_header_macro)),
        "body": [Step(c.BODY, m.Body(chunk)) for chunk in chunks],
        "end_of_message": Step(c.END_OF_MESSAGE, m.END_OF_MESSAGE,
                               _stage_macros({"i": "message-id"},
                                             options.end_of_message_macro)),
    }
    return Settings(
        spec=options.connection_spec, version=options.negotiate_version, timeouts=timeouts,
        original=original, steps=steps, output_message=options.output_message,
        color=_use_color(options.color, stdout if stdout is not None else sys.stdout),
        verbose=options.verbose, threads=max(options.threads, 0),
        n_sessions=options.n_sessions, concurrency=options.concurrency,
        n_messages=options.n_messages_per_session)


# ------------------------------------------------------------------ one session


@dataclass
class SessionResult:
    """What upstream's report prints about one session."""

    original: msg.Message
    status: str = "pass"
    reply_code: tuple | None = None
    quarantine_reason: str | None = None
    message: msg.Message | None = None
    body_replaced: bool = False
    elapsed: float = 0.0
    error: str | None = None
    stage: str | None = None  # where a non-pass status came from


class _Ended(Exception):
    """The milter's reply ends the session (or, in load mode, the message)."""

    def __init__(self, status, stage):
        super().__init__(status)
        self.status = status
        self.stage = stage


def _ignore(failure):
    """A MACRO's Deferred: its failure shows again on the command that follows it."""
    return None


class Driver:
    """Walks one connected, negotiated milter through SMTP stages; one per connection."""

    def __init__(self, protocol, settings, log=None):
        self.protocol = protocol
        self.settings = settings
        self.steps = settings.steps
        self.log = log
        self.options = None
        self.leading_space = False
        self.reply_code = None
        self.quarantine_reason = None
        self.refused = []  # indexes of the recipients refused in the current transaction

    async def negotiate(self):
        options = await self.protocol.negotiate(self.settings.offer)
        self.options = options
        self.leading_space = bool(options.protocol & c.SMFIP_HDR_LEADSPC)
        if self.log:
            self.log(f"[negotiated] version={options.version} actions=0x{options.actions:x} "
                     f"protocol=0x{options.protocol:x} macros={options.macros!r}")
        return options

    async def send(self, step):
        """Send a step's macros and command; return its Response (None: no reply)."""
        protocol = self.protocol
        log = self.log
        macros = step.macro_packet(self.options)
        if macros is not None:
            if log:
                log(f"[send] {macros!r}")
            protocol.send(macros).addErrback(_ignore)
        if log:
            log(f"[send] {step.command!r}")
        response = await protocol.send(step.command)
        if response is None:
            if log:
                log("[receive] (no reply expected)")
            return None
        if log:
            for modification in response.modifications:
                log(f"[receive] {modification!r}")
            log(f"[receive] {response.reply!r}")
        for modification in response.modifications:
            if type(modification) is m.Quarantine:
                self.quarantine_reason = msg.text(modification.reason)
        reply = response.reply
        if type(reply) is m.ReplyCode:
            self.reply_code = msg.parse_reply_code(msg.text(reply.text))
        return response

    async def step(self, step, stage):
        """Send a step; raise _Ended unless the milter lets the session go on."""
        response = await self.send(step)
        if response is not None:
            status = verdict(response.reply)
            if status is not None:
                raise _Ended(status, stage)
        return response

    async def greet(self):
        """CONNECT and HELO."""
        await self.step(self.steps["connect"], "connect")
        await self.step(self.steps["helo"], "helo")

    async def transaction(self):
        """MAIL to END_OF_MESSAGE; return (status, EOM response, accepted recipients).

        A rejected or tempfailed recipient is dropped while others remain;
        SKIP in the body goes on with END_OF_MESSAGE.
        """
        steps = self.steps
        await self.step(steps["mail"], "envelope-from")
        recipients = self.settings.original.recipients
        self.refused = refused = []
        for index, rcpt in enumerate(steps["rcpts"]):
            response = await self.send(rcpt)
            status = None if response is None else verdict(response.reply)
            if status is None:
                continue
            if status in _RECIPIENT_REFUSALS:
                refused.append(index)
                if len(refused) < len(recipients):
                    continue
            raise _Ended(status, "envelope-recipient")
        if steps["unknown"] is not None:
            await self.step(steps["unknown"], "unknown")
        await self.step(steps["data"], "data")
        for header in steps["headers_leading_space" if self.leading_space else "headers"]:
            await self.step(header, "header")
        await self.step(steps["end_of_headers"], "end-of-header")
        for chunk in steps["body"]:
            response = await self.step(chunk, "body")
            if response is not None and type(response.reply) is m.Skip:
                break
        response = await self.send(steps["end_of_message"])
        status = verdict(response.reply) if response is not None else None
        return status or "pass", response, self.accepted_recipients()

    def accepted_recipients(self):
        """The recipients of the current transaction that were not rejected or tempfailed."""
        refused = self.refused
        recipients = self.settings.original.recipients
        if not refused:
            return list(recipients)
        return [rcpt for index, rcpt in enumerate(recipients) if index not in refused]

    def abort(self):
        self.protocol.send(m.ABORT).addErrback(_ignore)


_SESSION_ERRORS = (client.MilterTimeoutError, client.MilterConnectionLost, ProtocolError)


async def run_session(reactor, settings, clock=None, log=None):
    """Run one session as upstream does; return its SessionResult.

    Raises client.MilterConnectError when the milter cannot be reached;
    any later failure is recorded in SessionResult.error.
    """
    protocol = await client.connect(reactor, settings.spec, settings.timeouts, clock)
    result = SessionResult(settings.original)
    started = time.perf_counter()
    driver = Driver(protocol, settings, log)
    finished = False
    try:
        await driver.negotiate()
        await driver.greet()
        status, response, recipients = await driver.transaction()
        finished = True
        result.status = status
        message = settings.original.copy()
        message.recipients = recipients
        if response is not None and response.modifications:
            message, result.body_replaced = msg.apply_modifications(
                message, response.modifications, driver.leading_space)
        result.message = message
        if status != "pass":
            result.stage = "end-of-message"
    except _Ended as ended:
        result.status = ended.status
        result.stage = ended.stage
        result.message = settings.original.copy()
        result.message.recipients = driver.accepted_recipients()
    except _SESSION_ERRORS as problem:
        result.error = str(problem)
    finally:
        if not finished and protocol.connected:
            driver.abort()  # upstream sends ABORT, then QUIT, when a reply ends the session
        protocol.close()
        result.elapsed = time.perf_counter() - started
        result.reply_code = driver.reply_code
        result.quarantine_reason = driver.quarantine_reason
    # QUIT must reach the milter before the reactor stops.
    await protocol.when_closed()
    return result


# ------------------------------------------------------------------ many sessions


@dataclass
class LoadReport:
    """What --n-sessions prints."""

    sessions: int = 0
    messages: int = 0
    elapsed: float = 0.0
    latencies: list = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)

    def percentile(self, fraction):
        """Nearest-rank percentile of the message latencies, in seconds."""
        ordered = self.latencies
        if not ordered:
            return 0.0
        rank = max(1, math.ceil(fraction * len(ordered)))
        return ordered[min(rank, len(ordered)) - 1]

    def render(self):
        self.latencies.sort()
        ms = [1000 * self.percentile(q) for q in (0.5, 0.9, 0.99, 1.0)]
        throughput = self.messages / self.elapsed if self.elapsed > 0 else 0.0
        lines = [
            f"sessions: {self.sessions}",
            f"messages: {self.messages}",
            "elapsed-time: %g seconds" % self.elapsed,
            f"throughput: {throughput:.1f} messages/s",
            "latency p50/p90/p99/max: {:.2f}/{:.2f}/{:.2f}/{:.2f} ms".format(*ms),
        ]
        lines.extend(f"status {status}: {count}" for status, count in sorted(self.statuses.items()))
        lines.extend(f"error: {count} × {error}" for error, count in self.errors.most_common())
        return "\n".join(lines) + "\n"


async def _load_session(reactor, settings, report, log):
    perf_counter = time.perf_counter
    try:
        protocol = await client.connect(reactor, settings.spec, settings.timeouts)
    except client.MilterConnectError as problem:
        report.errors[str(problem)] += 1
        return
    report.sessions += 1
    driver = Driver(protocol, settings, log)
    try:
        await driver.negotiate()
        try:
            await driver.greet()
        except _Ended as ended:
            report.statuses[f"{ended.status} at {ended.stage}"] += 1
            driver.abort()
            return
        for number in range(settings.n_messages):
            if number:
                driver.abort()  # Postfix resets the milter between transactions
            started = perf_counter()
            try:
                status = (await driver.transaction())[0]
            except _Ended as ended:
                status = ended.status
            report.latencies.append(perf_counter() - started)
            report.messages += 1
            report.statuses[status] += 1
            if status == "shutdown":
                break
    except _SESSION_ERRORS as problem:
        report.errors[str(problem)] += 1
    finally:
        protocol.close()
    await protocol.when_closed()


async def run_load(reactor, settings, log=None):
    """Run settings.n_sessions sessions, settings.concurrency at a time; return a LoadReport."""
    report = LoadReport()
    pending = iter(range(settings.n_sessions))

    async def worker():
        for _ in pending:
            await _load_session(reactor, settings, report, log)

    started = time.perf_counter()
    workers = [defer.ensureDeferred(worker())
               for _ in range(min(settings.concurrency, settings.n_sessions))]
    await defer.gatherResults(workers, consumeErrors=True)
    report.elapsed = time.perf_counter() - started
    return report


# ------------------------------------------------------------------ main


def _write(stream, text):
    """Write text with any 8-bit bytes it carries (as surrogates) restored."""
    data = text.encode("utf-8", "surrogateescape")
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        stream.flush()
        buffer.write(data)
        buffer.flush()
    else:
        stream.write(data.decode("utf-8", "replace"))
        stream.flush()


async def run(reactor, settings, stdout=None, stderr=None):
    """Run what settings ask for, print the report; return the exit status."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    log = (lambda line: _write(stderr, line + "\n")) if settings.verbose else None
    if settings.n_sessions is not None:
        report = await run_load(reactor, settings, log)
        _write(stdout, report.render())
        return 0 if report.sessions else 1
    count = max(settings.threads, 1)
    connected = 0

    async def one():
        nonlocal connected
        try:
            result = await run_session(reactor, settings, log=log)
        except client.MilterConnectError as problem:
            _write(stderr, f"{problem}\n")
            return
        connected += 1
        if result.error is not None:
            _write(stderr, f"{result.error}\n")  # upstream prints only the error
        else:
            _write(stdout, msg.render_result(result, settings.output_message, settings.color))

    await defer.gatherResults([defer.ensureDeferred(one()) for _ in range(count)],
                              consumeErrors=True)
    return 0 if connected == count else 1


def main(argv=None):
    """The milter-test-server console script."""
    try:
        settings = parse_options(argv)
    except UsageError as problem:
        _write(sys.stderr, f"{PROGRAM_NAME}: {problem}\n")
        sys.exit(1)
    from twisted.internet import task

    def start(reactor):
        d = defer.ensureDeferred(run(reactor, settings))

        def exit_status(code):
            if code:
                raise SystemExit(code)

        return d.addCallback(exit_status)

    task.react(start)


if __name__ == "__main__":
    main()
