"""The resolved configuration: plain records with upstream's defaults, and the checks on values.

Each assignable setting is a dataclass field made with `setting()`, whose
metadata holds the check and a one-line description. The loader, the
command-line overrides and `dump` all find settings through `settings_of()`,
so a new setting is one field here and nothing anywhere else.
"""

import math
from dataclasses import dataclass, field, fields
from typing import ClassVar

from miltermanager import client, connection_spec
from miltermanager.merge import FALLBACK_STATUSES, Status, parse_status

DEFAULT_CONNECTION_SPEC = "inet:10025@[127.0.0.1]"
LOG_LEVELS = ("default", "all", "none", "critical", "error", "warning", "message", "info",
              "debug", "statistics", "profile", "trace")
SYSLOG_FACILITIES = ("authpriv", "cron", "daemon", "kern", "lpr", "mail", "news", "user",
                     "uucp", *(f"local{n}" for n in range(8)))


class ConfigurationError(Exception):
    """A configuration that cannot be used.

    location is "FILE:LINE" (or a command-line option such as
    "--connection-spec", or None when nothing better is known); reason says
    what was wrong and what was expected. str() is "LOCATION: REASON".
    """

    def __init__(self, reason, location=None):
        super().__init__(f"{location}: {reason}" if location else reason)
        self.reason = reason
        self.location = location


class InvalidValue(ValueError):
    """Raised by a check; the text completes "SETTING ...", e.g. "must be True or False".

    With as_is, the text already names the value and says what was expected
    (a connection spec's parse error): it follows "SETTING: " unchanged.
    """

    def __init__(self, text, as_is=False):
        super().__init__(text)
        self.as_is = as_is


def setting(default=None, *, check, doc, factory=None, literal=None):
    """A dataclass field that the configuration language may assign, validated by check.

    literal, if given, writes the value for `dump` (oct for a mode).
    """
    metadata = {"check": check, "doc": doc, "literal": literal}
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


def _integer(low, high=None):
    expected = (f"an integer from {low} to {high}" if high is not None
                else f"an integer, {low} or more")

    def check(value):
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


def _optional_text(value):
    if value is not None and not (isinstance(value, str) and value):
        raise InvalidValue("must be a non-empty string or None")
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
    if not isinstance(value, str) or not value.strip() or not all(
            name.strip() in LOG_LEVELS for name in value.split("|")):
        raise InvalidValue(f"must be names joined with |, each one of {', '.join(LOG_LEVELS)}")
    return value


def _facility(value):
    if value not in SYSLOG_FACILITIES:
        raise InvalidValue(f"must be one of {', '.join(SYSLOG_FACILITIES)}")
    return value


@dataclass
class SecurityConfig:
    """`security.*`: stored only for now; applied when privilege dropping lands."""

    SECTION: ClassVar[str] = "security"
    effective_user: str | None = setting(
        check=_optional_text, doc="user to switch to after listening")
    effective_group: str | None = setting(
        check=_optional_text, doc="group to switch to after listening")
    origins: dict = _origins()


@dataclass
class LogConfig:
    """`log.*`: stored only for now; applied when logging configuration lands."""

    SECTION: ClassVar[str] = "log"
    level: str = setting("default", check=_log_level, doc="log levels joined with |")
    path: str | None = setting(check=_optional_text, doc="log file; None logs to standard output")
    use_syslog: bool = setting(True, check=_boolean, doc="also log to syslog")
    syslog_facility: str = setting("mail", check=_facility, doc="syslog facility")
    origins: dict = _origins()


@dataclass
class ManagerConfig:
    """`manager.*`: the MTA-facing side of milter-manager."""

    SECTION: ClassVar[str] = "manager"
    connection_spec: str = setting(
        DEFAULT_CONNECTION_SPEC, check=_spec, doc="where the MTA connects")
    fallback_status: Status = setting(
        Status.ACCEPT, check=_status, doc="answer to the MTA when no child milter can answer")
    chunk_size: int = setting(
        65535, check=_integer(1, 65535),
        doc="body chunk size when the body is replayed to children")
    unix_socket_mode: int = setting(
        0o660, check=_mode, literal=oct, doc="mode of the listening UNIX socket")
    unix_socket_group: str | None = setting(
        check=_optional_text, doc="group given the listening UNIX socket; None keeps ours")
    remove_unix_socket_on_create: bool = setting(
        True, check=_boolean, doc="remove a stale UNIX socket file before listening")
    max_body_memory: int = setting(
        5 * 1024 * 1024, check=_integer(0),
        doc="bytes of message body kept in memory before spilling to a temporary file")
    progress_interval: float = setting(
        10.0, check=_seconds_or_zero,
        doc="seconds between progress replies to the MTA while children work on end of "
            "message; 0 disables them")
    origins: dict = _origins()


@dataclass
class MilterConfig:
    """One child milter, `define_milter(name)`; timeouts are upstream's (server's less 3 s)."""

    name: str
    connection_spec: str | None = setting(check=_spec, doc="where the child listens (required)")
    description: str | None = setting(check=_optional_text, doc="free text")
    enabled: bool = setting(True, check=_boolean, doc="False: the child is never contacted")
    fallback_status: Status = setting(
        Status.ACCEPT, check=_status, doc="this child's verdict when it fails or times out")
    evaluation_mode: bool = setting(
        False, check=_boolean, doc="log the child's verdict and changes without applying them")
    connection_timeout: float = setting(297.0, check=_positive_seconds, doc="seconds to connect")
    writing_timeout: float = setting(7.0, check=_positive_seconds, doc="seconds per write")
    reading_timeout: float = setting(
        7.0, check=_positive_seconds, doc="seconds to wait for a reply")
    end_of_message_timeout: float = setting(
        297.0, check=_positive_seconds, doc="seconds to wait for the end-of-message reply")
    applicable_conditions: list = setting(
        check=_names, factory=list, doc="names of the conditions that may stop this child")
    origins: dict = _origins()

    @property
    def timeouts(self):
        """This child's timeouts as the client takes them."""
        return client.Timeouts(
            connection=self.connection_timeout, writing=self.writing_timeout,
            reading=self.reading_timeout, end_of_message=self.end_of_message_timeout)


@dataclass
class Configuration:
    """Everything milter-manager runs on; `milters` is in upstream's child order."""

    manager: ManagerConfig = field(default_factory=ManagerConfig)
    milters: list = field(default_factory=list)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    log: LogConfig = field(default_factory=LogConfig)
    files: list = field(default_factory=list, compare=False)  # loaded files, in order

    def milter(self, name):
        """The child milter called name, or None."""
        return next((milter for milter in self.milters if milter.name == name), None)

    @property
    def enabled_milters(self):
        """The children a session contacts, in order."""
        return [milter for milter in self.milters if milter.enabled]


def settings_of(section):
    """The assignable settings of a section, {name: dataclass field}, in declaration order."""
    return {item.name: item for item in fields(section) if "check" in item.metadata}


def describe(section, name):
    """How errors name a setting: 'manager.chunk_size' or 'milter "clamav": fallback_status'."""
    if isinstance(section, MilterConfig):
        return f'milter "{section.name}": {name}'
    return f"{section.SECTION}.{name}"


def unknown_setting(section, name):
    """The message for a setting that does not exist, with the ones that do."""
    import difflib

    known = list(settings_of(section))
    if isinstance(section, MilterConfig):
        known.append("name")
        where = f'milter "{section.name}" has'
    else:
        where = f"{section.SECTION} has"
    hint = difflib.get_close_matches(name, known, n=1)
    suggestion = f"did you mean {hint[0]}? " if hint else ""
    return f"{where} no setting {name!r}; {suggestion}known: {', '.join(sorted(known))}"


def set_value(section, name, value, origin=None):
    """Check value, store it in section and remember origin; raise ConfigurationError.

    origin is where the value comes from ("FILE:LINE" or a command-line
    option); it prefixes the error and is what `dump` prints.
    """
    settings = settings_of(section)
    if name not in settings:
        if isinstance(section, MilterConfig) and name == "name":
            raise ConfigurationError(f'milter "{section.name}": name is read-only', origin)
        raise ConfigurationError(unknown_setting(section, name), origin)
    try:
        stored = settings[name].metadata["check"](value)
    except InvalidValue as error:
        reason = (f"{describe(section, name)}: {error}" if error.as_is
                  else f"{describe(section, name)} {error}; got {value!r}")
        raise ConfigurationError(reason, origin) from None
    setattr(section, name, stored)
    if origin is not None:
        section.origins[name] = origin
    return stored
