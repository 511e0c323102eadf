"""milter-test-client: a milter that prints every event it receives, with its macros.

The output follows upstream's tool line for line (``negotiate: version=<6>, ...``,
``connect: host=<...>, address=<inet:PORT@[ADDR]>``, ... ``finished``), each event
followed by a ``macros:`` block when its stage carried macros. By default it
answers continue to everything; options make it reject, tempfail, wait, modify
the message and so on at a chosen stage, so tests can use it as a child milter.
"""

import os
import sys

from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from miltermanager import __version__
from miltermanager.protocol import constants as c
from miltermanager.protocol import messages
from miltermanager.server import IMilter

DEFAULT_CONNECTION_SPEC = "inet:10025@[127.0.0.1]"  # upstream MilterClient's default

# Upstream's GFlags nicknames (milter-option.h), in bit order.
ACTION_NAMES = (
    (c.SMFIF_ADDHDRS, "add-headers"),
    (c.SMFIF_CHGBODY, "change-body"),
    (c.SMFIF_ADDRCPT, "add-envelope-recipient"),
    (c.SMFIF_DELRCPT, "delete-envelope-recipient"),
    (c.SMFIF_CHGHDRS, "change-headers"),
    (c.SMFIF_QUARANTINE, "quarantine"),
    (c.SMFIF_CHGFROM, "change-envelope-from"),
    (c.SMFIF_ADDRCPT_PAR, "add-envelope-recipient-with-parameters"),
    (c.SMFIF_SETSYMLIST, "set-symbol-list"),
)
STEP_NAMES = (
    (c.SMFIP_NOCONNECT, "no-connect"),
    (c.SMFIP_NOHELO, "no-helo"),
    (c.SMFIP_NOMAIL, "no-envelope-from"),
    (c.SMFIP_NORCPT, "no-envelope-recipient"),
    (c.SMFIP_NOBODY, "no-body"),
    (c.SMFIP_NOHDRS, "no-headers"),
    (c.SMFIP_NOEOH, "no-end-of-header"),
    (c.SMFIP_NR_HDR, "no-reply-header"),
    (c.SMFIP_NOUNKNOWN, "no-unknown"),
    (c.SMFIP_NODATA, "no-data"),
    (c.SMFIP_SKIP, "skip"),
    (c.SMFIP_RCPT_REJ, "envelope-recipient-rejected"),
    (c.SMFIP_NR_CONN, "no-reply-connect"),
    (c.SMFIP_NR_HELO, "no-reply-helo"),
    (c.SMFIP_NR_MAIL, "no-reply-envelope-from"),
    (c.SMFIP_NR_RCPT, "no-reply-envelope-recipient"),
    (c.SMFIP_NR_DATA, "no-reply-data"),
    (c.SMFIP_NR_UNKN, "no-reply-unknown"),
    (c.SMFIP_NR_EOH, "no-reply-end-of-header"),
    (c.SMFIP_NR_BODY, "no-reply-body"),
    (c.SMFIP_HDR_LEADSPC, "header-value-with-leading-space"),
)
_STEP_FLAGS = dict((name, flag) for flag, name in STEP_NAMES)

# Upstream strips these from the MTA's offer before answering it.
STRIPPED_STEPS = c.SMFIP_RCPT_REJ | c.SMFIP_HDR_LEADSPC | c.NO_FLAGS | c.NO_REPLY_FLAGS

# Stage names as upstream's tools spell them, and the command each one is.
STAGES = {
    "connect": c.CONNECT,
    "helo": c.HELO,
    "envelope-from": c.MAIL,
    "envelope-recipient": c.RCPT,
    "data": c.DATA,
    "header": c.HEADER,
    "end-of-header": c.END_OF_HEADERS,
    "body": c.BODY,
    "end-of-message": c.END_OF_MESSAGE,
    "unknown": c.UNKNOWN,
}
DEFAULT_STAGE = "end-of-message"

STATUSES = {
    "accept": messages.ACCEPT,
    "reject": messages.REJECT,
    "temporary-failure": messages.TEMPFAIL,
    "discard": messages.DISCARD,
    "skip": messages.SKIP,
    "shutdown": messages.SHUTDOWN,
}
# Upstream's log level names and the Twisted level each one shows from.
_LOG_LEVELS = {
    "none": None,
    "critical": "critical",
    "error": "error",
    "warning": "warn",
    "message": "info",
    "info": "info",
    "statistics": "info",
    "profile": "debug",
    "debug": "debug",
    "all": "debug",
    "default": "warn",
}

# The first digit a --reply-code needs to stand in for a status.
_REPLY_CODE_CLASS = {"reject": "5", "temporary-failure": "4"}


# ---------------------------------------------------------------- formatting


def flag_names(flags, names, type_name):
    """Name the bits of flags as upstream does: nicknames joined by '|', then unknown bits."""
    known = 0
    parts = []
    for flag, name in names:
        known |= flag
        if flags & flag:
            parts.append(name)
    text = "|".join(parts)
    unknown = flags & ~known
    if unknown:
        text += (" " if text else "") + f"(unknown flags: {type_name}:0x{unknown:x})"
    return text


def action_names(actions):
    """Upstream's names for SMFIF_* flags, e.g. 'add-headers|change-body'."""
    return flag_names(actions, ACTION_NAMES, "MilterActionFlags")


def step_names(protocol):
    """Upstream's names for SMFIP_* flags, e.g. 'no-connect|no-reply-header'."""
    return flag_names(protocol, STEP_NAMES, "MilterStepFlags")


def address_spec(connect):
    """The client address of a Connect as upstream prints it: inet:PORT@[ADDR], unix:PATH."""
    if connect.family == c.FAMILY_INET:
        return b"inet:%d@[%s]" % (connect.port, connect.address)
    if connect.family == c.FAMILY_INET6:
        return b"inet6:%d@[%s]" % (connect.port, connect.address)
    if connect.family == c.FAMILY_UNIX:
        return b"unix:" + connect.address
    return b"unknown"


def format_macros(macros):
    """The 'macros:' block for one stage's macros (name -> value); nothing if there are none.

    Upstream's decoder stores {name} as name, so that is how it prints.
    """
    if not macros:
        return []
    lines = [b"macros:"]
    for name, value in macros.items():
        if name[:1] == b"{" and name[-1:] == b"}":
            name = name[1:-1]
        lines.append(b"  %s=%s" % (name, value))
    return lines


def format_event(command):
    """The event line for a command (bytes, no newline), as upstream's milter-test-client prints it."""
    code = command.code
    if code == c.NEGOTIATE:
        return ("negotiate: version=<%d>, action=<%s>, step=<%s>" % (
            command.version, action_names(command.actions),
            step_names(command.protocol))).encode("ascii")
    if code == c.CONNECT:
        return b"connect: host=<%s>, address=<%s>" % (command.hostname, address_spec(command))
    if code == c.HELO:
        return b"helo: <%s>" % command.name
    if code == c.MAIL:
        return b"envelope-from: <%s>" % command.sender
    if code == c.RCPT:
        return b"envelope-recipient: <%s>" % command.recipient
    if code == c.DATA:
        return b"data"
    if code == c.HEADER:
        return b"header: <%s: %s>" % (command.name, command.value)
    if code == c.END_OF_HEADERS:
        return b"end-of-header"
    if code == c.BODY:
        return b"body: <%s>" % command.chunk
    if code == c.END_OF_MESSAGE:
        if command.chunk:
            return b"end-of-message: <%s>" % command.chunk
        return b"end-of-message"
    if code == c.ABORT:
        return b"abort"
    if code == c.UNKNOWN:
        return b"unknown: <%s>" % command.line
    raise ValueError(f"no event line for command {code!r}")


FINISHED = b"finished"


# ---------------------------------------------------------------- options


def _stage_code(name, option):
    try:
        return STAGES[name]
    except KeyError:
        raise usage.UsageError(
            f"{option}: unknown stage {name!r}; expected one of {', '.join(STAGES)}") from None


def _split_stage(value, option):
    """'X@STAGE' -> ('X', command code); the stage defaults to end-of-message."""
    head, at, stage = value.partition("@")
    return head, _stage_code(stage if at else DEFAULT_STAGE, option)


def _status(name, option):
    if name not in STATUSES:
        raise usage.UsageError(
            f"{option}: unknown status {name!r}; expected one of {', '.join(STATUSES)}")
    return name


def _stage_list(value, option):
    """'connect,helo' -> [b'C', b'H']."""
    return [_stage_code(name.strip(), option) for name in value.split(",") if name.strip()]


def _index(text, option):
    try:
        index = int(text)
    except ValueError:
        raise usage.UsageError(f"{option}: index {text!r} is not a number") from None
    if index < 0:
        raise usage.UsageError(f"{option}: index {index} is negative")
    return index


def _bytes(text):
    """Command-line text as the bytes the user typed (surrogate escapes undone)."""
    return os.fsencode(text)


class Options(usage.Options):
    """milter-test-client's command line: upstream's options plus scripted replies."""

    synopsis = "milter-test-client [options]"
    longdesc = ("A milter that prints every event it receives from the MTA, with its macros, "
                "and answers continue unless told otherwise.")

    optFlags = [
        ["verbose", "v", "Log verbosely (the same as --log-level=all)."],
        ["quiet", "q", "Print no events (for benchmarks)."],
        ["no-report-request", None, "Upstream's name for --quiet."],
        ["progress", None, "Send progress at end of message before the modifications."],
    ]
    optParameters = [
        ["connection-spec", "s", DEFAULT_CONNECTION_SPEC,
         "Where to listen: unix:PATH, inet:PORT, inet:PORT@HOST, inet:PORT@[ADDRESS], inet6:..."],
        ["log-level", None, "default",
         "Log levels joined by '|': error, warning, message, info, debug, all, default, none."],
        ["reply-code", None, None,
         "SMTP reply for reject/temporary-failure, e.g. '550 5.7.1 Go away'."],
        ["no-reply", None, None,
         "Stages (comma-separated) to negotiate no reply for, e.g. connect,helo."],
        ["no-event", None, None,
         "Stages (comma-separated) the MTA should not send, e.g. helo,body."],
        ["negotiate-flags", None, None,
         "More step flags to request, upstream names joined by '|' or ',', "
         "e.g. skip|header-value-with-leading-space."],
    ]
    compData = usage.Completions(optActions={"log-level": usage.CompleteList(
        ["default", "all", "none", "error", "warning", "message", "info", "debug"])})

    def __init__(self):
        super().__init__()
        self["actions"] = {}
        self["recipient-actions"] = []
        self["modifications"] = []
        self["waits"] = {}
        self["macros"] = {}

    def opt_version(self):
        """Show the version and exit."""
        print(__version__)
        sys.exit(0)

    def opt_action(self, value):
        """STATUS[@STAGE]: answer STATUS (accept, reject, temporary-failure, discard, skip, shutdown) at STAGE (default end-of-message). Repeatable."""  # noqa: E501
        status, code = _split_stage(value, "--action")
        _status(status, "--action")
        if code in self["actions"]:
            raise usage.UsageError(f"--action: two statuses for the same stage: {value!r}")
        self["actions"][code] = status

    def opt_envelope_recipient_action(self, value):
        """ADDRESS:STATUS: answer STATUS to this recipient only. Repeatable."""
        address, colon, status = value.rpartition(":")
        if not colon or not address:
            raise usage.UsageError(
                f"--envelope-recipient-action: expected ADDRESS:STATUS, got {value!r}")
        _status(status, "--envelope-recipient-action")
        self["recipient-actions"].append((_normalize_address(_bytes(address)), status))

    def opt_add_header(self, value):
        """NAME:VALUE: append a header at end of message. Repeatable."""
        name, colon, header_value = value.partition(":")
        if not colon or not name:
            raise usage.UsageError(f"--add-header: expected NAME:VALUE, got {value!r}")
        self["modifications"].append(messages.AddHeader(_bytes(name), _bytes(header_value)))

    def opt_insert_header(self, value):
        """INDEX:NAME:VALUE: insert a header at INDEX (0 is first). Repeatable."""
        parts = value.split(":", 2)
        if len(parts) != 3 or not parts[1]:
            raise usage.UsageError(
                f"--insert-header: expected INDEX:NAME:VALUE, got {value!r}")
        index = _index(parts[0], "--insert-header")
        self["modifications"].append(
            messages.InsertHeader(index, _bytes(parts[1]), _bytes(parts[2])))

    def opt_change_header(self, value):
        """NAME:INDEX:VALUE: change the INDEX-th (from 1) header NAME. Repeatable."""
        parts = value.split(":", 2)
        if len(parts) != 3 or not parts[0]:
            raise usage.UsageError(
                f"--change-header: expected NAME:INDEX:VALUE, got {value!r}")
        index = _index(parts[1], "--change-header")
        self["modifications"].append(
            messages.ChangeHeader(index, _bytes(parts[0]), _bytes(parts[2])))

    def opt_delete_header(self, value):
        """NAME:INDEX: delete the INDEX-th (from 1) header NAME. Repeatable."""
        name, colon, index = value.rpartition(":")
        if not colon or not name:
            raise usage.UsageError(f"--delete-header: expected NAME:INDEX, got {value!r}")
        self["modifications"].append(
            messages.ChangeHeader(_index(index, "--delete-header"), _bytes(name), b""))

    def opt_change_from(self, value):
        """ADDRESS: change the envelope sender."""
        self["modifications"].append(messages.ChangeFrom(_bytes(value)))

    def opt_add_recipient(self, value):
        """ADDRESS: add an envelope recipient. Repeatable."""
        self["modifications"].append(messages.AddRecipient(_bytes(value)))

    def opt_delete_recipient(self, value):
        """ADDRESS: delete an envelope recipient. Repeatable."""
        self["modifications"].append(messages.DeleteRecipient(_bytes(value)))

    def opt_replace_body(self, value):
        """TEXT: replace the body (line ends become CRLF)."""
        if any(isinstance(m, messages.ReplaceBody) for m in self["modifications"]):
            raise usage.UsageError("--replace-body: given twice")
        body = _bytes(value).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        # One run of chunks: the MTA wants the 'b' packets contiguous.
        chunks = [body[i:i + c.MAX_CHUNK_SIZE] for i in range(0, len(body), c.MAX_CHUNK_SIZE)]
        self["modifications"].extend(messages.ReplaceBody(chunk) for chunk in chunks or [b""])

    def opt_quarantine(self, value):
        """REASON: quarantine the message."""
        self["modifications"].append(messages.Quarantine(_bytes(value)))

    def opt_wait(self, value):
        """SECONDS[@STAGE]: delay the reply at STAGE (default end-of-message). Repeatable."""
        seconds, code = _split_stage(value, "--wait")
        try:
            delay = float(seconds)
        except ValueError:
            raise usage.UsageError(f"--wait: {seconds!r} is not a number of seconds") from None
        if delay < 0:
            raise usage.UsageError(f"--wait: {delay} is negative")
        self["waits"][code] = delay

    def opt_macros(self, value):
        """STAGE:NAME,NAME: ask the MTA for these macros at STAGE (connect, helo, envelope-from, envelope-recipient, data, end-of-header, end-of-message). Repeatable."""  # noqa: E501
        stage, colon, names = value.partition(":")
        code = _stage_code(stage, "--macros")
        if not colon or code not in c.MACRO_STAGE_INDEXES:
            raise usage.UsageError(
                f"--macros: expected STAGE:NAME,NAME with STAGE one of "
                f"{', '.join(s for s, k in STAGES.items() if k in c.MACRO_STAGE_INDEXES)}; "
                f"got {value!r}")
        index = c.MACRO_STAGE_INDEXES[code]
        self["macros"].setdefault(index, []).extend(
            _bytes(name.strip()) for name in names.split(",") if name.strip())

    def postOptions(self):
        self["quiet"] = bool(self["quiet"] or self["no-report-request"])
        self["no-reply-stages"] = _stage_list(self["no-reply"] or "", "--no-reply")
        self["no-event-stages"] = _stage_list(self["no-event"] or "", "--no-event")
        for code in self["no-reply-stages"]:
            if code not in c.NO_REPLY_FLAG:
                raise usage.UsageError("--no-reply: end-of-message always needs a reply")
        for code in self["no-event-stages"]:
            if code not in c.NO_FLAG:
                raise usage.UsageError("--no-event: end-of-message is always sent")
        extra = 0
        for name in (self["negotiate-flags"] or "").replace(",", "|").split("|"):
            name = name.strip()
            if not name:
                continue
            if name not in _STEP_FLAGS:
                raise usage.UsageError(
                    f"--negotiate-flags: unknown step {name!r}; expected one of "
                    + ", ".join(_STEP_FLAGS))
            extra |= _STEP_FLAGS[name]
        self["step-flags"] = extra
        for code in list(self["actions"]) + list(self["waits"]):
            if code in self["no-reply-stages"]:
                stage = next(name for name, k in STAGES.items() if k == code)
                raise usage.UsageError(
                    f"--action/--wait at {stage} need a reply; --no-reply {stage} forbids one")
        reply_code = self["reply-code"]
        if reply_code is not None:
            self["reply-code"] = _bytes(reply_code)
            if not (reply_code[:3].isdigit() and reply_code[:1] in "45"
                    and reply_code[3:4] in ("", " ", "-")):
                raise usage.UsageError(
                    f"--reply-code: expected '4xx ...' or '5xx ...', got {reply_code!r}")
            statuses = set(self["actions"].values()) | {s for _, s in self["recipient-actions"]}
            users = statuses & set(_REPLY_CODE_CLASS)
            if not users:
                raise usage.UsageError(
                    "--reply-code needs a reject or temporary-failure status to go with")
            for status in users:
                if reply_code[0] != _REPLY_CODE_CLASS[status]:
                    raise usage.UsageError(
                        f"--reply-code {reply_code!r} cannot stand for {status}: "
                        f"it must start with {_REPLY_CODE_CLASS[status]}")
        self["log-levels"] = _log_levels(self)
        from miltermanager import connection_spec
        try:
            connection_spec.parse(self["connection-spec"])
        except ValueError as error:
            raise usage.UsageError(f"--connection-spec: {error}") from None


def _normalize_address(address):
    """Compare addresses without angle brackets and case."""
    return address.strip().strip(b"<>").lower()


# ---------------------------------------------------------------- the milter


@implementer(IMilter)
class TestClientMilter:
    """One MTA connection: print each event, answer as the options say.

    options is a parsed Options; write(lines) prints a list of byte lines;
    server_protocol (a MilterServerProtocol) sends progress; clock delays
    replies for --wait (the global reactor if None).
    """

    def __init__(self, options, write, server_protocol=None, clock=None):
        self.options = options
        self.write = None if options["quiet"] else write
        self.server_protocol = server_protocol
        self.clock = clock
        self.replies = {code: self._status_reply(status)
                        for code, status in options["actions"].items()}
        self.recipient_replies = [(address, self._status_reply(status))
                                  for address, status in options["recipient-actions"]]

    def _status_reply(self, status):
        if self.options["reply-code"] is not None and status in _REPLY_CODE_CLASS:
            return messages.ReplyCode(self.options["reply-code"])
        return STATUSES[status]

    def _report(self, command, macros, code):
        if self.write is None:
            return
        lines = [format_event(command)]
        if macros is not None:
            lines.extend(format_macros(macros.stage(code)))
        self.write(lines)

    def _answer(self, code, reply=None):
        if reply is None:
            reply = self.replies.get(code, messages.CONTINUE)
        delay = self.options["waits"].get(code)
        if delay is None:
            return reply
        clock = self.clock
        if clock is None:
            from twisted.internet import reactor as clock
        return deferLater(clock, delay, lambda: reply)

    def negotiate(self, offer):
        if self.write is not None:
            self.write([format_event(offer)])
        options = self.options
        offered = offer.protocol or c.SMFI_V1_PROT
        protocol = offered & ~STRIPPED_STEPS
        for code in options["no-reply-stages"]:
            protocol |= c.NO_REPLY_FLAG[code]  # the server fakes those the MTA lacks
        for code in options["no-event-stages"]:
            protocol |= c.NO_FLAG[code] & offered
        extra = options["step-flags"]
        protocol |= (extra & offered) | (extra & c.NO_REPLY_FLAGS)
        return messages.Negotiate(offer.version, offer.actions or c.SMFI_V1_ACTS, protocol,
                                  {stage: list(names) for stage, names in options["macros"].items()})

    def connect(self, command, macros):
        self._report(command, macros, c.CONNECT)
        return self._answer(c.CONNECT)

    def helo(self, command, macros):
        self._report(command, macros, c.HELO)
        return self._answer(c.HELO)

    def mail(self, command, macros):
        self._report(command, macros, c.MAIL)
        return self._answer(c.MAIL)

    def rcpt(self, command, macros):
        self._report(command, macros, c.RCPT)
        recipient = _normalize_address(command.recipient)
        for address, reply in self.recipient_replies:
            if address == recipient:
                return self._answer(c.RCPT, reply)
        return self._answer(c.RCPT)

    def data(self, command, macros):
        self._report(command, macros, c.DATA)
        return self._answer(c.DATA)

    def header(self, command, macros):
        self._report(command, macros, c.HEADER)
        return self._answer(c.HEADER)

    def end_of_headers(self, command, macros):
        self._report(command, macros, c.END_OF_HEADERS)
        return self._answer(c.END_OF_HEADERS)

    def body(self, command, macros):
        self._report(command, macros, c.BODY)
        return self._answer(c.BODY)

    def end_of_message(self, command, macros):
        self._report(command, macros, c.END_OF_MESSAGE)
        if self.options["progress"] and self.server_protocol is not None:
            self.server_protocol.progress()
        final = self.replies.get(c.END_OF_MESSAGE, messages.CONTINUE)
        return self._answer(c.END_OF_MESSAGE, [*self.options["modifications"], final])

    def unknown(self, command, macros):
        self._report(command, macros, c.UNKNOWN)
        return self._answer(c.UNKNOWN)

    def abort(self, macros):
        if self.write is not None:
            self.write([format_event(messages.ABORT)])

    def close(self):
        if self.write is not None:
            self.write([FINISHED])


# ---------------------------------------------------------------- running it


class LineWriter:
    """Write byte lines to a binary stream, one write and one flush per event.

    If the stream breaks (the reader went away) printing stops; the milter
    goes on answering, since mail must not fail because nobody watches.
    """

    log = Logger(namespace="milter-test-client")

    def __init__(self, stream):
        self.stream = stream
        self.broken = False

    def __call__(self, lines):
        if self.broken:
            return
        try:
            self.stream.write(b"".join(line + b"\n" for line in lines))
            self.stream.flush()
        except (OSError, ValueError) as error:  # ValueError: the stream was closed
            self.broken = True
            self.log.warn("[client][output] stopped printing: {error}", error=error)


def milter_factory(options, write, clock):
    """The milter_factory for MilterServerFactory: one TestClientMilter per connection."""
    def build(server_protocol):
        return TestClientMilter(options, write, server_protocol, clock)
    return build



def _log_levels(options):
    """The Twisted log level names for --log-level (or --verbose); usage error if unknown."""
    names = ["all"] if options["verbose"] else options["log-level"].replace(",", "|").split("|")
    levels = []
    for name in names:
        name = name.strip().lower()
        if name not in _LOG_LEVELS:
            raise usage.UsageError(
                f"--log-level: unknown level {name!r}; expected one of {', '.join(_LOG_LEVELS)}")
        if _LOG_LEVELS[name] is not None:
            levels.append(_LOG_LEVELS[name])
    return levels


def _start_logging(options, stream):
    """Log to stream (stderr) at the most verbose of the levels given; stdout is for events."""
    from twisted.logger import (
        FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner,
        textFileLogObserver,
    )
    levels = [LogLevel.levelWithName(name) for name in options["log-levels"]]
    observers = []
    if levels:
        predicate = LogLevelFilterPredicate(defaultLogLevel=min(levels, key=_level_rank))
        observers.append(FilteringLogObserver(textFileLogObserver(stream), [predicate]))
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)


def _level_rank(level):
    from twisted.logger import LogLevel
    return list(LogLevel.iterconstants()).index(level)



def main(argv=None, reactor=None, stdout=None, stderr=None):
    """Entry point of the milter-test-client console script."""
    stdout = stdout if stdout is not None else sys.stdout.buffer
    stderr = stderr if stderr is not None else sys.stderr
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as error:
        stderr.write(f"milter-test-client: {error}\n")
        stderr.write("Try 'milter-test-client --help' for usage.\n")
        return 2
    _start_logging(options, stderr)
    if reactor is None:
        from twisted.internet import reactor

    from miltermanager.server import MilterServerFactory
    from miltermanager.tools.serve import serve

    log = Logger(namespace="milter-test-client")
    spec_text = options["connection-spec"]
    factory = MilterServerFactory(milter_factory(options, LineWriter(stdout), reactor),
                                  clock=reactor)

    def listening(port):
        log.info("[client][listen] {spec}", spec=spec_text)

    return serve(reactor, spec_text, factory, "milter-test-client", stderr, listening=listening)


def run():
    sys.exit(main())


if __name__ == "__main__":
    run()
