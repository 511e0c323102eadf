"""The resolved configuration: plain records with upstream's defaults, and the checks on values.

Each assignable setting is a dataclass field made with `setting()`, whose
metadata holds the check and a one-line description. The loader, the
command-line overrides and `dump` all find settings through `settings_of()`,
so a new setting is one field here and nothing anywhere else.

Functions a file registers (stoppers, connection checkers, manager hooks)
are kept as `Hook` records with where they were defined and their source
text, so that `dump` can write them back.
"""

import inspect
import math
import re
import shlex
from dataclasses import dataclass, field, fields
from typing import ClassVar

from miltermanager import client, connection_spec
from miltermanager.merge import FALLBACK_STATUSES, Status, parse_status

DEFAULT_CONNECTION_SPEC = "inet:10025@[127.0.0.1]"
DEFAULT_PLATFORM = "debian"
LOG_LEVELS = ("default", "all", "none", "critical", "error", "warning", "message", "info",
              "debug", "statistics", "profile", "trace")
SYSLOG_FACILITIES = ("authpriv", "cron", "daemon", "kern", "lpr", "mail", "news", "user",
                     "uucp", *(f"local{n}" for n in range(8)))
EVENT_LOOP_BACKENDS = ("glib", "libev")
MAX_WORKERS = 1000  # upstream's MILTER_CLIENT_MAX_N_WORKERS
MAX_TRACE_SESSIONS = 100000  # controller.trace_sessions: a few hundred bytes to kilobytes each

# The stoppers of an applicable condition: kind -> the arguments it is called
# with. Upstream's nine, in protocol order, then ours: `envelope` is called
# once at DATA with the sender and every recipient.
STOPPERS = {
    "connect": ("context", "host", "socket_address"),
    "helo": ("context", "fqdn"),
    "envelope_from": ("context", "sender"),
    "envelope_recipient": ("context", "recipient"),
    "data": ("context",),
    "header": ("context", "name", "value"),
    "end_of_header": ("context",),
    "body": ("context", "chunk"),
    "end_of_message": ("context",),
    "envelope": ("context", "sender", "recipients"),
}

# Upstream items that only made sense for its Ruby runtime: refused with the reason.
REFUSED = {
    "database": "milter-manager has no ActiveRecord; keep data in the child milters' own "
                "stores",
    "manager.run_gc_on_maintain": "there is no Ruby garbage collector to run; remove the line",
    "manager.report_memory_profile": "Ruby's memory profile does not exist here; "
                                     "use manager.report_memory_statistics()",
    "define_policy": "upstream's undocumented policy experiment is not supported; "
                     "use define_applicable_condition",
}


def located(location, text):
    """"LOCATION: TEXT", the way errors and warnings name where they come from; text alone
    when the location is unknown."""
    return f"{location}: {text}" if location else text


class ConfigurationError(Exception):
    """A configuration that cannot be used.

    location is "FILE:LINE" (or a command-line option such as
    "--connection-spec", or None when nothing better is known); reason says
    what was wrong and what was expected. str() is "LOCATION: REASON".

    errors is every error found, each a ConfigurationError with its own
    location: [self] for one error; for several (see `of`), location is None
    and str() is theirs, one per line.
    """

    def __init__(self, reason, location=None):
        super().__init__(located(location, reason))
        self.reason = reason
        self.location = location
        self.errors = [self]

    @classmethod
    def of(cls, errors):
        """The one error to raise for errors (a non-empty list): itself when it is alone."""
        errors = list(errors)
        if len(errors) == 1:
            return errors[0]
        error = cls("\n".join(str(each) for each in errors))
        error.errors = errors
        return error


class InvalidValue(ValueError):
    """Raised by a check; the text completes "SETTING ...", e.g. "must be True or False".

    With as_is, the text already names the value and says what was expected
    (a connection spec's parse error): it follows "SETTING: " unchanged.
    """

    def __init__(self, text, as_is=False):
        super().__init__(text)
        self.as_is = as_is


def setting(default=None, *, check, doc, factory=None, literal=None, secret=False):
    """A dataclass field that the configuration language may assign, validated by check.

    literal, if given, writes the value for `dump` (oct for a mode). A secret
    setting (a password) is never shown: `dump` and error messages print
    <hidden> instead of its value.
    """
    metadata = {"check": check, "doc": doc, "literal": literal, "secret": secret}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _origins():
    # Where each setting was assigned: "FILE:LINE" or a command-line option.
    # A setting missing here still has its default.
    return field(default_factory=dict, repr=False, compare=False)


# Checks: each takes the assigned value and returns what is stored, or raises
# InvalidValue saying what was expected.

def _boolean(value):
    if type(value) is not bool:
        raise InvalidValue("must be True or False")
    return value


def _boolean_or_word(value):
    # security.privilege_mode: upstream also takes the strings "true" and "false".
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if type(value) is not bool:
        raise InvalidValue('must be True or False (or "true", "false")')
    return value


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_seconds(value):
    if not (_is_number(value) and value > 0):
        raise InvalidValue("must be a number of seconds greater than 0")
    return float(value)


def _seconds_or_zero(value):
    if not (_is_number(value) and value >= 0):
        raise InvalidValue("must be a number of seconds, 0 or more (0 disables it)")
    return float(value)


def _integer(low, high=None, zero=None, none_is_zero=False):
    expected = (f"an integer from {low} to {high}" if high is not None
                else f"an integer, {low} or more")
    if zero:
        expected += f" (0 {zero})"

    def check(value):
        if value is None and none_is_zero:
            return 0
        if type(value) is not int or value < low or (high is not None and value > high):
            raise InvalidValue(f"must be {expected}")
        return value
    return check


def _status(value):
    if isinstance(value, Status) and value in FALLBACK_STATUSES.values():
        return value
    try:
        return parse_status(value)
    except ValueError:
        raise InvalidValue(f"must be one of {', '.join(FALLBACK_STATUSES)}") from None


def _spec(value):
    # The string is kept as written (dump prints it back); parse() only checks it.
    try:
        connection_spec.parse(value)
    except ValueError as error:
        raise InvalidValue(str(error), as_is=True) from None
    return value


def _optional_spec(value):
    return None if value is None else _spec(value)


def _optional_text(value):
    # A NUL cannot be in a name, a path or a command line the system takes.
    if value is not None and not (isinstance(value, str) and value and "\0" not in value):
        raise InvalidValue("must be a non-empty string without NUL characters, or None")
    return value


def _names(value):
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(
            isinstance(name, str) and name for name in value):
        raise InvalidValue("must be a list of names (non-empty strings)")
    return list(value)


def _mode(value):
    # Ruby's 0660 is a syntax error in Python; accept 0o660 and the string "0660".
    digits = value.removeprefix("0o") if isinstance(value, str) else None
    if digits and all(char in "01234567" for char in digits):
        value = int(digits, 8)
    if type(value) is not int or not 0 <= value <= 0o777:
        raise InvalidValue(
            "must be a permission mode from 0o000 to 0o777, written in octal (0o660)")
    return value


def _log_level(value):
    expected = f"each one of {', '.join(LOG_LEVELS)}"
    if not (isinstance(value, str) and value.strip()):
        raise InvalidValue(f"must be level names joined with |, {expected}")
    unknown = [name.strip() for name in value.split("|") if name.strip() not in LOG_LEVELS]
    if unknown:
        raise InvalidValue(f"has no level {unknown[0]!r}: the names joined with | are {expected}")
    return value


def _one_of(choices):
    def check(value):
        if value not in choices:
            raise InvalidValue(f"must be one of {', '.join(choices)}")
        return value
    return check


def _platform(value):
    # It names defaults/<platform>.conf, so it must not climb out of that directory.
    if not (isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value)):
        raise InvalidValue(
            "must be a platform name such as debian, redhat, freebsd or pkgsrc "
            "(letters, digits, '.', '_', '-')")
    return value


def _package_options(value):
    if value is None:
        return None
    if isinstance(value, str) and all(
            re.fullmatch(r"\s*[^=,\s][^=,]*=[^,]*", option) for option in value.split(",")):
        return value
    raise InvalidValue('must be None or "NAME=VALUE,NAME=VALUE" (e.g. "prefix=/usr/pkg")')


def _command_options(value):
    # Upstream: a list is shell-quoted element by element and joined with spaces.
    if isinstance(value, (list, tuple)) and all(
            isinstance(option, str) and "\0" not in option for option in value):
        return " ".join(shlex.quote(option) for option in value) or None
    if value is None or isinstance(value, str) and "\0" not in value:
        return value or None
    raise InvalidValue("must be a string, a list of strings, or None (without NUL characters)")


@dataclass
class Hook:
    """A function a configuration file registered, kept to be called later.

    kind is a stopper kind (a key of STOPPERS), "connection_checker",
    "maintained" or "event_loop_created"; name is a connection checker's name
    or the function's. source is the function's definition as the file wrote
    it, which `dump` writes back; None when it cannot be shown (a lambda, a
    function from elsewhere). builtin names a checker milter-manager provides
    ("netstat"), with its arguments; then function is None.
    """

    kind: str
    name: str
    function: object = field(default=None, compare=False, repr=False)
    origin: str | None = field(default=None, compare=False)
    source: str | None = None
    builtin: str | None = None
    arguments: tuple = ()


@dataclass
class PackageConfig:
    """`package.*`: which platform's defaults `load_default()` loads."""

    SECTION: ClassVar[str] = "package"
    platform: str = setting(
        DEFAULT_PLATFORM, check=_platform,
        doc="platform whose defaults/PLATFORM.conf load_default() loads")
    options: str | None = setting(
        check=_package_options, doc='"NAME=VALUE,..." for the platform defaults (pkgsrc: prefix=)')
    origins: dict = _origins()

    @property
    def parsed_options(self):
        """options as {name: value}, or {} when unset."""
        if not self.options:
            return {}
        pairs = (option.split("=", 1) for option in self.options.split(","))
        return {name.strip(): value.strip() for name, value in pairs}


@dataclass
class SecurityConfig:
    """`security.*`: privileges; stored here, applied by the service."""

    SECTION: ClassVar[str] = "security"
    privilege_mode: bool = setting(
        False, check=_boolean_or_word,
        doc="start child milters (milter.command) as root when they cannot be reached")
    effective_user: str | None = setting(
        check=_optional_text, doc="user to switch to after listening")
    effective_group: str | None = setting(
        check=_optional_text, doc="group to switch to after listening")
    origins: dict = _origins()


@dataclass
class LogConfig:
    """`log.*`: stored here, applied by the service."""

    SECTION: ClassVar[str] = "log"
    level: str = setting("default", check=_log_level, doc="log levels joined with |")
    path: str | None = setting(check=_optional_text, doc="log file; None logs to standard output")
    use_syslog: bool = setting(True, check=_boolean, doc="also log to syslog")
    syslog_facility: str = setting(
        "mail", check=_one_of(SYSLOG_FACILITIES), doc="syslog facility")
    syslog_socket: str | None = setting(
        check=_optional_text,
        doc="the local syslog daemon's socket; None: /dev/log (a chroot or container may "
            "have it elsewhere)")
    origins: dict = _origins()

    @property
    def levels(self):
        """log.level as a set of names."""
        return {name.strip() for name in self.level.split("|")}


@dataclass
class ManagerConfig:
    """`manager.*`: the MTA-facing side of milter-manager and its process."""

    SECTION: ClassVar[str] = "manager"
    connection_spec: str = setting(
        DEFAULT_CONNECTION_SPEC, check=_spec, doc="where the MTA connects")
    unix_socket_mode: int = setting(
        0o660, check=_mode, literal=oct, doc="mode of the listening UNIX socket")
    unix_socket_group: str | None = setting(
        check=_optional_text, doc="group given the listening UNIX socket; None keeps ours")
    remove_unix_socket_on_create: bool = setting(
        True, check=_boolean, doc="remove a stale UNIX socket file before listening")
    remove_unix_socket_on_close: bool = setting(
        True, check=_boolean, doc="remove the UNIX socket file when stopping")
    daemon: bool = setting(False, check=_boolean, doc="run in the background")
    pid_file: str | None = setting(check=_optional_text, doc="file the process id is written to")
    maintenance_interval: int = setting(
        10, check=_integer(0, zero="disables it", none_is_zero=True),
        doc="run maintenance (the maintained hooks) every N finished sessions")
    suspend_time_on_unacceptable: int = setting(
        5, check=_integer(1),
        doc="seconds to wait before accepting again when no connection can be accepted")
    max_connections: int = setting(
        0, check=_integer(0, zero="is unlimited"), doc="most MTA connections served at once")
    max_file_descriptors: int = setting(
        0, check=_integer(0, zero="keeps the system's"), doc="limit of open files (RLIMIT_NOFILE)")
    custom_configuration_directory: str | None = setting(
        check=_optional_text,
        doc="directory whose milter-manager.custom.conf is loaded last, if it exists; None: "
            "~EFFECTIVE_USER/.milter-manager")
    fallback_status: Status = setting(
        Status.ACCEPT, check=_status, doc="answer to the MTA when no child milter can answer")
    fallback_status_at_disconnect: Status = setting(
        Status.TEMPORARY_FAILURE, check=_status,
        doc="answer when a connection checker finds the SMTP client gone")
    event_loop_backend: str = setting(
        "glib", check=_one_of(EVENT_LOOP_BACKENDS),
        doc="accepted for upstream's files; Twisted's reactor runs whatever the value")
    n_workers: int = setting(
        0, check=_integer(0, MAX_WORKERS, zero="serves in this process"),
        doc="worker processes sharing the listening socket")
    packet_buffer_size: int = setting(
        0, check=_integer(0, zero="disables it"),
        doc="bytes of end-of-message replies buffered before sending to the MTA")
    chunk_size: int = setting(
        65535, check=_integer(1, 65535),
        doc="body chunk size when the body is replayed to children")
    max_pending_finished_sessions: int = setting(
        0, check=_integer(0, zero="cleans up only when idle"),
        doc="finished sessions kept before cleaning up")
    connection_check_interval: float = setting(
        0.0, check=_seconds_or_zero,
        doc="seconds between checks that the SMTP client is still connected")
    report_memory_statistics: bool = setting(
        False, check=_boolean, doc="log memory use at each maintenance")
    max_body_memory: int = setting(
        5 * 1024 * 1024, check=_integer(0),
        doc="bytes of message body kept in memory before spilling to a temporary file")
    progress_interval: float = setting(
        10.0, check=_seconds_or_zero,
        doc="seconds between progress replies to the MTA while children work on end of "
            "message; 0 disables them")
    negotiation_timeout: float = setting(
        30.0, check=_seconds_or_zero,
        doc="seconds an MTA connection may take to send its option negotiation; "
            "0 disables it")
    idle_timeout: float = setting(
        7210.0, check=_seconds_or_zero,
        doc="seconds an MTA connection may go without a command while nothing is pending; "
            "0 disables it")
    down_after_failures: int = setting(
        3, check=_integer(0, zero="never marks a child down"),
        doc="failures in a row to connect to or negotiate with a child that mark it down")
    down_retry_interval: float = setting(
        5.0, check=_positive_seconds,
        doc="seconds a down child is left alone before a session tries it again; "
            "doubles after each failed try")
    max_down_retry_interval: float = setting(
        60.0, check=_positive_seconds,
        doc="the most down_retry_interval doubles to (never less than down_retry_interval)")
    # Registered functions: name -> Hook ("netstat" is built in), and two hook lists.
    connection_checkers: dict = field(default_factory=dict)
    maintained_hooks: list = field(default_factory=list)
    event_loop_created_hooks: list = field(default_factory=list)
    origins: dict = _origins()

    @property
    def down_retry_limit(self):
        """max_down_retry_interval, raised to down_retry_interval when set below it.

        Raising only down_retry_interval above the default cap then means
        "do not double", rather than a configuration refused.
        """
        return max(self.max_down_retry_interval, self.down_retry_interval)


@dataclass
class ControllerConfig:
    """`controller.*`: the control socket; None connection_spec: no controller."""

    SECTION: ClassVar[str] = "controller"
    connection_spec: str | None = setting(
        check=_optional_spec, doc="where the control socket listens; None disables it")
    unix_socket_mode: int = setting(
        0o660, check=_mode, literal=oct, doc="mode of the control UNIX socket")
    unix_socket_group: str | None = setting(
        check=_optional_text, doc="group given the control UNIX socket")
    remove_unix_socket_on_create: bool = setting(
        True, check=_boolean, doc="remove a stale UNIX socket file before listening")
    remove_unix_socket_on_close: bool = setting(
        True, check=_boolean, doc="remove the UNIX socket file when stopping")
    trace_sessions: int = setting(
        1000, check=_integer(0, MAX_TRACE_SESSIONS, zero="keeps no trace"),
        doc="finished sessions whose decisions milter-manager-ctl trace can show")
    origins: dict = _origins()


@dataclass
class WebConfig:
    """`web.*`: the web interface and /metrics (miltermanager.web); None connection_spec: none."""

    SECTION: ClassVar[str] = "web"
    connection_spec: str | None = setting(
        check=_optional_spec,
        doc="where the web interface and Prometheus' /metrics listen; None disables both")
    password_file: str | None = setting(
        check=_optional_text,
        doc="the web users and their scrypt hashes (milter-manager-ctl passwd); "
            "required with connection_spec unless only /metrics is served")
    metrics_without_login: bool = setting(
        False, check=_boolean, doc="serve /metrics without a login (basic auth still works)")
    tls_certificate: str | None = setting(
        check=_optional_text, doc="PEM certificate (chain) file: serve HTTPS; with tls_key")
    tls_key: str | None = setting(
        check=_optional_text, doc="PEM private key file of tls_certificate")
    session_timeout: int = setting(
        3600, check=_integer(60, 7 * 24 * 3600),
        doc="seconds a login lasts without a request before it must log in again")
    custom_versions: int = setting(
        10, check=_integer(1, 1000),
        doc="earlier versions of milter-manager.custom.conf the web editor keeps for undo")
    origins: dict = _origins()


@dataclass
class ConditionConfig:
    """One applicable condition, `define_applicable_condition(name)`, and its stoppers.

    stoppers is a list of Hook in definition order; stoppers_of(kind) picks
    one kind. A child stops when any stopper of the stage returns true.
    """

    KIND: ClassVar[str] = "condition"
    name: str
    description: str | None = setting(check=_optional_text, doc="free text")
    stoppers: list = field(default_factory=list)
    # The helper call that defined it (restrict_accounts_by_list ...), a
    # helpers.Call that dump writes instead of the stoppers.
    helper: object = None
    origins: dict = _origins()

    def stoppers_of(self, kind):
        """The stoppers of one kind (a key of STOPPERS), in definition order."""
        return [stopper for stopper in self.stoppers if stopper.kind == kind]


@dataclass
class MilterConfig:
    """One child milter, `define_milter(name)`; timeouts are upstream's (server's less 3 s)."""

    KIND: ClassVar[str] = "milter"
    name: str
    connection_spec: str | None = setting(check=_spec, doc="where the child listens (required)")
    description: str | None = setting(check=_optional_text, doc="free text")
    enabled: bool = setting(True, check=_boolean, doc="False: the child is never contacted")
    fallback_status: Status = setting(
        Status.ACCEPT, check=_status, doc="this child's verdict when it fails or times out")
    evaluation_mode: bool = setting(
        False, check=_boolean, doc="log the child's verdict and changes without applying them")
    applicable_conditions: list = setting(
        check=_names, factory=list, doc="names of the conditions that may stop this child")
    command: str | None = setting(
        check=_optional_text,
        doc="command starting the child when it cannot be reached (security.privilege_mode)")
    command_options: str | None = setting(
        check=_command_options, doc="arguments of command: a string, or a list to shell-quote")
    user_name: str | None = setting(check=_optional_text, doc="user command runs as")
    connection_timeout: float = setting(297.0, check=_positive_seconds, doc="seconds to connect")
    writing_timeout: float = setting(7.0, check=_positive_seconds, doc="seconds per write")
    reading_timeout: float = setting(
        7.0, check=_positive_seconds, doc="seconds to wait for a reply")
    end_of_message_timeout: float = setting(
        297.0, check=_positive_seconds, doc="seconds to wait for the end-of-message reply")
    origins: dict = _origins()

    @property
    def timeouts(self):
        """This child's timeouts as the client takes them."""
        return client.Timeouts(
            connection=self.connection_timeout, writing=self.writing_timeout,
            reading=self.reading_timeout, end_of_message=self.end_of_message_timeout)


@dataclass
class Configuration:
    """Everything milter-manager runs on; `milters` is in upstream's child order.

    conditions maps each applicable condition's name to its ConditionConfig,
    in definition order. warnings are "FILE:LINE: text" lines for settings
    accepted but without effect here (logged at start, printed by --check-config).
    """

    manager: ManagerConfig = field(default_factory=ManagerConfig)
    milters: list = field(default_factory=list)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    log: LogConfig = field(default_factory=LogConfig)
    package: PackageConfig = field(default_factory=PackageConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    web: WebConfig = field(default_factory=WebConfig)
    conditions: dict = field(default_factory=dict)
    # The built-in conditions' helpers (miltermanager.config.helpers), one each per configuration.
    s25r: object = field(default_factory=lambda: _helper("s25r"))
    remote_network: object = field(default_factory=lambda: _helper("remote_network"))
    stress: object = field(default_factory=lambda: _helper("stress"))
    trust: object = field(default_factory=lambda: _helper("trust"))
    dnsbl: object = field(default_factory=lambda: _helper("dnsbl"))
    ldap: object = field(default_factory=lambda: _helper("ldap"))
    files: list = field(default_factory=list, compare=False)  # loaded files, in order
    warnings: list = field(default_factory=list, compare=False)

    # The top-level sections, in the order dump writes them (upstream's).
    SECTIONS: ClassVar[tuple] = ("package", "security", "log", "manager", "controller", "web")
    # The built-in conditions' helpers, in the order dump writes them.
    HELPERS: ClassVar[tuple] = ("s25r", "remote_network", "stress", "trust", "dnsbl", "ldap")

    def milter(self, name):
        """The child milter called name, or None."""
        return next((milter for milter in self.milters if milter.name == name), None)

    @property
    def enabled_milters(self):
        """The children a session contacts, in order."""
        return [milter for milter in self.milters if milter.enabled]

    def sections(self):
        """The top-level section records, in dump order."""
        return [getattr(self, name) for name in self.SECTIONS]

    def helpers(self):
        """The built-in conditions' helper records, in dump order."""
        return [getattr(self, name) for name in self.HELPERS]


def _helper(name):
    # helpers imports this module: it is looked up when a Configuration is made.
    from .helpers import HELPERS
    return HELPERS[name]()


def settings_of(section):
    """The assignable settings of a section, {name: dataclass field}, in declaration order."""
    return {item.name: item for item in fields(section) if "check" in item.metadata}


def describe(section, name):
    """How errors name a setting: 'manager.chunk_size' or 'milter "clamav": fallback_status'."""
    if hasattr(section, "KIND"):
        return f'{section.KIND} "{section.name}": {name}'
    return f"{section.SECTION}.{name}"


def _owner(section):
    if hasattr(section, "KIND"):
        return f'{section.KIND} "{section.name}"'
    return section.SECTION


def unknown_setting(section, name, extra=()):
    """The message for a setting that does not exist, with the ones that do.

    extra are further names the section offers (methods such as
    add_applicable_condition).
    """
    import difflib

    refused = REFUSED.get(f"{getattr(section, 'SECTION', None)}.{name}")
    if refused:
        return f"{describe(section, name)}: {refused}"
    known = list(dict.fromkeys([*settings_of(section), *extra]))
    if hasattr(section, "KIND") and "name" not in known:
        known.append("name")
    hint = difflib.get_close_matches(name, known, n=1)
    suggestion = f"did you mean {hint[0]}? " if hint else ""
    return f"{_owner(section)} has no setting {name!r}; {suggestion}known: {', '.join(sorted(known))}"


def show(item, value):
    """value as messages may show it: <hidden> for a secret setting."""
    return "<hidden>" if item.metadata.get("secret") else repr(value)


def set_value(section, name, value, origin=None, extra=()):
    """Check value, store it in section and remember origin; raise ConfigurationError.

    origin is where the value comes from ("FILE:LINE" or a command-line
    option); it prefixes the error and is what `dump` prints.
    """
    settings = settings_of(section)
    if name not in settings:
        if hasattr(section, "KIND") and name == "name":
            raise ConfigurationError(f"{describe(section, name)} is read-only", origin)
        raise ConfigurationError(unknown_setting(section, name, extra), origin)
    item = settings[name]
    try:
        stored = item.metadata["check"](value)
    except InvalidValue as error:
        reason = (f"{describe(section, name)}: {error}" if error.as_is
                  else f"{describe(section, name)} {error}; got {show(item, value)}")
        raise ConfigurationError(reason, origin) from None
    setattr(section, name, stored)
    if origin is not None:
        section.origins[name] = origin
    return stored


def check_arguments(function, arguments, what):
    """Raise InvalidValue unless function can be called with the named arguments.

    what names the registration in the message ("connect stopper").
    """
    if not callable(function):
        raise InvalidValue(f"{what} must be a function; got {function!r}", as_is=True)
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # a builtin without a signature: trust it
    try:
        signature.bind(*arguments)
    except TypeError:
        name = getattr(function, "__name__", repr(function))
        wanted = f"({', '.join(arguments)})" if arguments else "no arguments"
        raise InvalidValue(
            f"{what} {name}{signature} must take {wanted}", as_is=True) from None
