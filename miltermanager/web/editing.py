"""Changes to the configuration from the web: milter-manager.custom.conf, its versions, undo.

The web editor owns milter-manager.custom.conf (config.loader.custom_file),
which every load and reload reads after the main files. It writes the file
whole, in the configuration language, from the values the pages edit: one
statement for each value that differs from the configuration the main files
give without the custom file (the "base"). So the file only ever holds what
was changed in the web, and a value set back to the base's disappears from
it. Anything else a hand put in the file is not kept (the diff shows it).

A change goes: propose (the candidate text is generated, loaded with the
main files by the same loader and checks as --check-config, its errors
mapped back to the fields whose lines caused them) → confirm (the file is
unchanged since the page showed it, the previous file is kept as a version,
the candidate is written atomically, then the same reload as SIGHUP; a
reload that fails puts the previous file back). Undo proposes a kept
version the same way.
"""

import contextlib
import difflib
import hashlib
import json
import os
import re
import secrets
import stat
import tempfile
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.logger import Logger

from ..conditions.dnsbl import DNSBLService
from ..config import loader as config_loader
from ..config.model import ConfigurationError, InvalidValue, MilterConfig, settings_of
from ..merge import FALLBACK_STATUSES, Status

HEADER = (
    "# milter-manager.custom.conf: written by milter-manager's web editor (/edit).\n"
    "# It holds the values changed in the web pages, loaded after the main files.\n"
    "# The editor rewrites it whole: put hand-written settings in milter-manager.local.conf.\n"
)

# The settings of a child the pages edit, in the form's order.
MILTER_FIELDS = ("enabled", "evaluation_mode", "fallback_status", "applicable_conditions",
                 "connection_spec", "connection_timeout", "writing_timeout", "reading_timeout",
                 "end_of_message_timeout", "description")
BOOLEAN_FIELDS = ("enabled", "evaluation_mode")
TIMEOUT_FIELDS = ("connection_timeout", "writing_timeout", "reading_timeout",
                  "end_of_message_timeout")
# The condition helpers' lists the pages edit (scope "lists").
LIST_FIELDS = ("dnsbl_services", "trust_domains", "s25r_whitelist", "s25r_blacklist")
LISTS = "lists"  # the scope of the lists' fields; a child's fields have its name as scope

VERSIONS = "milter-manager.custom.versions"  # beside the file: the kept versions
PENDING_LIMIT = 32  # proposals waiting for confirmation, all users together
PENDING_SECONDS = 3600
ABSENT = None  # a version (or candidate) that is "no custom file at all"

CONFLICT = ("milter-manager.custom.conf was changed outside the web page since you loaded it; "
            "reload the page to see the change")


class EditRefused(Exception):
    """A change that cannot be made; str() says why, for the page."""


def digest(text):
    """The hash the pages carry of a custom file's text (None: no file)."""
    if text is ABSENT:
        return "absent"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def status_name(value):
    return value.label if isinstance(value, Status) else value


# ------------------------------------------------------------------ state


@dataclass
class State:
    """The values the pages edit, as a whole: the children in order and the lists.

    milters: [(name, {setting: value})] with every MILTER_FIELDS setting;
    values are what the configuration holds or what a form sent (then
    possibly invalid: the loader says so). dnsbl_services: [(domain,
    [cidr, ...] or None)]; trust_domains: entries (str or re.Pattern), or
    None when some entry cannot be written (a function); s25r_*: the
    entries added to the main files' lists.
    """

    milters: list = field(default_factory=list)
    dnsbl_services: list = field(default_factory=list)
    trust_domains: list | None = field(default_factory=list)
    s25r_whitelist: list = field(default_factory=list)
    s25r_blacklist: list = field(default_factory=list)

    def milter(self, name):
        return next((values for each, values in self.milters if each == name), None)

    def names(self):
        return [name for name, _ in self.milters]


def _milter_values(milter):
    values = {name: getattr(milter, name) for name in MILTER_FIELDS}
    values["fallback_status"] = status_name(values["fallback_status"])
    values["applicable_conditions"] = list(values["applicable_conditions"])
    return values


def _service_tuple(service):
    expected = None if service.expected is None else [str(net) for net in service.expected]
    return (service.domain, expected)


def _added(base, running):
    """The entries of running beyond base's (a helper's list the custom file appended to)."""
    if running[:len(base)] == base:
        return list(running[len(base):])
    return [entry for entry in running if entry not in base]


def state_of(configuration, base):
    """The State of configuration; base is the configuration without the custom file."""
    domains = list(configuration.trust.domains)
    if not all(isinstance(entry, (str, re.Pattern)) for entry in domains):
        domains = None
    return State(
        milters=[(milter.name, _milter_values(milter)) for milter in configuration.milters],
        dnsbl_services=[_service_tuple(each) for each in configuration.dnsbl.services],
        trust_domains=domains,
        s25r_whitelist=_added(list(base.s25r.whitelist), list(configuration.s25r.whitelist)),
        s25r_blacklist=_added(list(base.s25r.blacklist), list(configuration.s25r.blacklist)))


# ------------------------------------------------------------------ forms


def form_values(raw, defined_conditions=()):
    """A child's form (field name -> list of str) as the values to write.

    Checkboxes are true when present; an empty description is None;
    a timeout that reads as a number is that number, anything else stays
    text, which the setting's own check refuses with its usual message.
    """
    values = {}
    for name in MILTER_FIELDS:
        given = raw.get(name, [])
        if name in BOOLEAN_FIELDS:
            values[name] = bool(given) and given[-1] not in ("", "0", "off", "false")
        elif name == "applicable_conditions":
            values[name] = [item.strip() for item in given if item.strip()]
        else:
            text = given[-1].strip() if given else ""
            if name in TIMEOUT_FIELDS:
                values[name] = _number(text)
            elif name == "description":
                values[name] = text or None
            else:
                values[name] = text
    return values


def _number(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def list_text(entries):
    """A helper list as the textarea shows it: one entry a line, /RE/ for an expression."""
    return "".join(f"/{entry.pattern}/\n" if isinstance(entry, re.Pattern) else f"{entry}\n"
                   for entry in entries)


def parse_entries(text):
    """The entries of a list textarea: one a line; /RE/ is a case-insensitive expression.

    An expression is kept as its text (("re", pattern)) for the generator:
    compiling it is the loader's job, which reports a bad one on its line.
    """
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if len(line) >= 2 and line.startswith("/") and line.endswith("/"):
            entries.append(("re", line[1:-1]))
        else:
            entries.append(line)
    return entries


def services_text(services):
    return "".join(f"{domain} {','.join(expected)}\n" if expected else f"{domain}\n"
                   for domain, expected in services)


def parse_services(text):
    """DNSBL services, one a line: "ZONE [CIDR[,CIDR...]]"."""
    services = []
    for line in text.splitlines():
        words = line.replace(",", " ").split()
        if words:
            services.append((words[0], words[1:] or None))
    return services


# ------------------------------------------------------------------ generation


@dataclass
class Generated:
    """A candidate custom file: its text and, per line number, the (scope, field) that wrote it."""

    text: str
    fields: dict


def _literal(value):
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "re":
        return f"re.compile({value[1]!r}, re.IGNORECASE)"
    if isinstance(value, re.Pattern):
        return f"re.compile({value.pattern!r}, {_flags(value)})"
    if isinstance(value, Status):
        return repr(value.label)
    if isinstance(value, float) and value.is_integer():
        return repr(int(value)) if abs(value) < 1e15 else repr(value)
    return repr(value)


def _flags(pattern):
    names = [name for name in ("IGNORECASE", "MULTILINE", "DOTALL", "VERBOSE")
             if pattern.flags & getattr(re, name)]
    return " | ".join(f"re.{name}" for name in names) or "0"


def _same(name, value, base_value):
    """Whether a child's setting as given equals the base's, as the file's check reads it."""
    try:
        checked = settings_of(MilterConfig)[name].metadata["check"](value)
    except (InvalidValue, TypeError, ValueError, AttributeError):
        return False
    return checked == base_value


def _entry_key(entry):
    if isinstance(entry, tuple):
        return ("re", entry[1], re.IGNORECASE)
    if isinstance(entry, re.Pattern):
        return ("re", entry.pattern, entry.flags & ~re.UNICODE)
    return entry


def _same_entries(given, base):
    return [_entry_key(each) for each in given] == [_entry_key(each) for each in base]


def _same_services(given, base):
    try:
        made = [DNSBLService(domain, expected) for domain, expected in given]
    except (TypeError, ValueError):
        return False
    return made == list(base)


def generate(state, base):
    """The custom file that turns base (the main files' configuration) into state."""
    lines = [HEADER]
    fields = {}

    def emit(text, scope, name):
        lines.append(text + "\n")
        fields[len("".join(lines).splitlines())] = (scope, name)

    defaults = MilterConfig("")
    changes = {}
    for name, values in state.milters:
        before = base.milter(name)
        reference = before if before is not None else defaults
        changed = [setting for setting in MILTER_FIELDS
                   if not _same(setting, values.get(setting), getattr(reference, setting))]
        if before is None and "connection_spec" not in changed:
            changed.insert(0, "connection_spec")
        changes[name] = changed
    wanted = state.names()
    removed = [milter.name for milter in base.milters if milter.name not in wanted]
    kept = [milter.name for milter in base.milters if milter.name in wanted]
    # define_milter moves a child to the end of the order: from the first child that
    # changes (or moved), every later child is defined again, so the order stays.
    first = 0
    while (first < len(wanted) and first < len(kept) and wanted[first] == kept[first]
           and not changes[wanted[first]]):
        first += 1
    if removed:
        lines.append("\n")
        for name in removed:
            emit(f"remove_milter({name!r})", name, "remove")
    for name in wanted[first:]:
        values = state.milter(name)
        lines.append("\n")
        if not changes[name]:
            emit(f"define_milter({name!r})  # again, to keep the child order", name, "name")
            continue
        emit(f"with define_milter({name!r}) as milter:", name, "name")
        for setting in changes[name]:
            emit(f"    milter.{setting} = {_literal(values.get(setting))}", name, setting)
    if not _same_services(state.dnsbl_services, base.dnsbl.services):
        lines.append("\n")
        emit("dnsbl.clear_services()", LISTS, "dnsbl_services")
        for domain, expected in state.dnsbl_services:
            arguments = repr(domain) if expected is None else f"{domain!r}, {list(expected)!r}"
            emit(f"dnsbl.add_service({arguments})", LISTS, "dnsbl_services")
    if state.trust_domains is not None and not _same_entries(state.trust_domains,
                                                               base.trust.domains):
        lines.append("\n")
        emit("trust.clear()", LISTS, "trust_domains")
        for entry in state.trust_domains:
            emit(f"trust.add_envelope_from_domain({_literal(entry)})", LISTS, "trust_domains")
    for kind in ("whitelist", "blacklist"):
        entries = getattr(state, f"s25r_{kind}")
        if entries:
            lines.append("\n")
            for entry in entries:
                emit(f"s25r.add_{kind}({_literal(entry)})", LISTS, f"s25r_{kind}")
    return Generated("".join(lines), fields)


# ------------------------------------------------------------------ checking


@dataclass
class Checked:
    """A candidate checked: errors[(scope, field)] and general (not tied to a field) texts."""

    errors: dict = field(default_factory=dict)
    general: list = field(default_factory=list)
    configuration: object = None

    @property
    def ok(self):
        return not self.errors and not self.general

    def of(self, scope):
        """{field: [texts]} for one scope (a child's name, or LISTS)."""
        return {name: texts for (where, name), texts in self.errors.items() if where == scope}


@dataclass
class Pending:
    """A change shown as a diff, waiting for its user to confirm it."""

    token: str
    user: str
    summary: str
    text: str | None  # None: remove the file
    before: str | None
    created: float
    undo_of: int | None = None


@dataclass
class Proposal:
    """What a page shows after a form: errors beside fields, or the diff to confirm."""

    checked: Checked
    diff: str = ""
    pending: Pending | None = None

    @property
    def ok(self):
        return self.checked.ok


class Editor:
    """What the web may change in the configuration, and how it is written and undone.

    service: the ManagerService (its load(), configuration and controller);
    clock: for the versions' times and the proposals' expiry.
    """

    log = Logger()

    def __init__(self, service, clock):
        self.service = service
        self.clock = clock
        self.pending = {}
        self._lock = defer.DeferredLock()

    # -------------------------------------------------------------- the file

    @property
    def path(self):
        """milter-manager.custom.conf of the running configuration (None: no directory)."""
        return config_loader.custom_file(self.service.configuration)

    def _require_path(self):
        path = self.path
        if path is None:
            raise EditRefused("no directory for milter-manager.custom.conf: set "
                              "manager.custom_configuration_directory")
        return path

    def read(self):
        """The custom file's text now, or None when there is none."""
        path = self.path
        if path is None:
            return ABSENT
        try:
            with open(path, "rb") as file:
                return file.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ABSENT

    def file_hash(self):
        return digest(self.read())

    # -------------------------------------------------------------- loading

    def _load_with(self, text):
        """The configuration the main files and text (as the custom file) give; Checked."""
        path = self._require_path()
        directory = os.path.dirname(path)
        checked = Checked()
        if text is ABSENT:
            # A name that does not exist: the base, without any custom file.
            candidate = os.path.join(directory, f".web-none-{secrets.token_hex(8)}.conf")
            created = None
        else:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd, candidate = tempfile.mkstemp(prefix=".web-candidate-", suffix=".conf",
                                             dir=directory)
            created = candidate
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
        try:
            try:
                configuration = self.service.load(custom=candidate)
            except ConfigurationError as error:
                return checked, error.errors, candidate
            from ..service import startup_problems

            problems = startup_problems(configuration)
            checked.configuration = configuration
            return checked, [each for problem in problems for each in problem.errors], candidate
        finally:
            if created is not None:
                with contextlib.suppress(OSError):
                    os.unlink(created)

    def check(self, generated, scope=None):
        """Load generated's text with the main files; Checked, its errors at their fields."""
        checked, errors, candidate = self._load_with(generated.text)
        real = self.path
        for error in errors:
            where = error.location or ""
            file, _, line = where.rpartition(":")
            text = str(error).replace(candidate, real)
            if file == candidate and line.isdigit() and int(line) in generated.fields:
                key = generated.fields[int(line)]
                checked.errors.setdefault(key, []).append(error.reason.replace(candidate, real))
                if scope is not None and key[0] != scope:
                    checked.general.append(text)
            else:
                checked.general.append(text)
        return checked

    def base(self):
        """The configuration of the main files alone (ConfigurationError if they are broken)."""
        checked, errors, _ = self._load_with(ABSENT)
        if errors:
            raise ConfigurationError.of(errors)
        return checked.configuration

    def current(self):
        """(configuration with the custom file as it is now, base); ConfigurationError."""
        base = self.base()
        text = self.read()
        if text is ABSENT:
            return base, base
        checked, errors, candidate = self._load_with(text)
        if errors:
            real = self.path
            error = ConfigurationError.of(errors)
            raise ConfigurationError(str(error).replace(candidate, real))
        return checked.configuration, base

    def state(self):
        """(State now, current configuration, base configuration)."""
        configuration, base = self.current()
        return state_of(configuration, base), configuration, base

    # -------------------------------------------------------------- proposals

    def _propose(self, user, file_hash, state, base, summary, scope):
        before = self.read()
        if file_hash != digest(before):
            raise EditRefused(CONFLICT)
        generated = generate(state, base)
        checked = self.check(generated, scope)
        if not checked.ok:
            return Proposal(checked)
        text = generated.text
        if text == HEADER:
            text = ABSENT  # nothing differs from the main files: no file at all
        return self._pending(user, summary, text, before, checked)

    def _pending(self, user, summary, text, before, checked, undo_of=None):
        now = self.clock.seconds()
        for token, pending in list(self.pending.items()):
            if now - pending.created > PENDING_SECONDS:
                del self.pending[token]
        while len(self.pending) >= PENDING_LIMIT:
            del self.pending[next(iter(self.pending))]
        pending = Pending(secrets.token_urlsafe(18), user, summary, text, before, now, undo_of)
        self.pending[pending.token] = pending
        return Proposal(checked, diff(before, text), pending)

    def propose_milter(self, user, file_hash, name, values, new=False):
        """Set the child name's editable settings to values (or add it, new=True)."""
        state, configuration, base = self.state()
        if new:
            checked = Checked()
            problem = _name_problem(name, state)
            if problem:
                checked.errors[(name, "name")] = [problem]
                return Proposal(checked)
            state.milters.append((name, values))
        else:
            if state.milter(name) is None:
                raise EditRefused(f"there is no child milter {name!r}")
            state.milters = [(each, values if each == name else old)
                             for each, old in state.milters]
        verb = "add" if new else "change"
        was = {} if new else dict(state_of(configuration, base).milter(name))
        changed = [f"{setting}={_literal(values.get(setting))}" for setting in MILTER_FIELDS
                   if new or was.get(setting) != values.get(setting)]
        summary = f'{verb} milter "{name}": {", ".join(changed) or "nothing"}'
        return self._propose(user, file_hash, state, base, summary, name)

    def propose_removal(self, user, file_hash, name):
        state, _, base = self.state()
        if state.milter(name) is None:
            raise EditRefused(f"there is no child milter {name!r}")
        state.milters = [(each, values) for each, values in state.milters if each != name]
        return self._propose(user, file_hash, state, base, f'remove milter "{name}"', name)

    def propose_lists(self, user, file_hash, dnsbl_services, trust_domains, s25r_whitelist,
                      s25r_blacklist):
        """Set the helpers' lists; each argument is a textarea's text (None: unchanged)."""
        old, _, base = self.state()
        state = State(**vars(old))  # the fields below are replaced, never changed in place
        changed = []
        if dnsbl_services is not None:
            state.dnsbl_services = parse_services(dnsbl_services)
        if trust_domains is not None and state.trust_domains is not None:
            state.trust_domains = parse_entries(trust_domains)
        if s25r_whitelist is not None:
            state.s25r_whitelist = parse_entries(s25r_whitelist)
        if s25r_blacklist is not None:
            state.s25r_blacklist = parse_entries(s25r_blacklist)
        for name in LIST_FIELDS:
            key = (lambda entry: entry) if name == "dnsbl_services" else _entry_key
            if ([key(entry) for entry in getattr(old, name) or []]
                    != [key(entry) for entry in getattr(state, name) or []]):
                changed.append(name)
        summary = f"lists: {', '.join(changed) or 'nothing'}"
        return self._propose(user, file_hash, state, base, summary, LISTS)

    def propose_undo(self, user, file_hash, version):
        """Put the kept version back (its text, or no file)."""
        before = self.read()
        if file_hash != digest(before):
            raise EditRefused(CONFLICT)
        entry = self.version(version)
        text = self.version_text(entry)
        checked = Checked()
        if text is not ABSENT:
            generated = Generated(text, {})
            checked = self.check(generated)
            if not checked.ok:
                return Proposal(checked)
        summary = f"undo: back to version {version} (from {entry['user']})"
        return self._pending(user, summary, text, before, checked, undo_of=version)

    # -------------------------------------------------------------- applying

    def apply(self, user, token, file_hash):
        """Write the pending change token, then reload.

        Fires with None when the change is in use, or the text saying why
        the running configuration was kept (the previous file is then back).
        Fails with EditRefused (nothing written) for a conflict or a token
        that is unknown, expired or someone else's.
        """
        return self._lock.run(self._apply, user, token, file_hash)

    def _apply(self, user, token, file_hash):
        pending = self.pending.get(token)
        if pending is None or pending.user != user:
            raise EditRefused("this change is no longer waiting for confirmation (it was "
                              "confirmed already, or expired); make it again")
        path = self._require_path()
        before = self.read()
        if file_hash != digest(before) or digest(pending.before) != digest(before):
            del self.pending[token]
            raise EditRefused(CONFLICT)
        del self.pending[token]
        version = self._keep(before, user, pending.summary)
        _write(path, pending.text)
        stat_text = diff_stat(before, pending.text)

        def reloaded(problem):
            if problem is None:
                self.log.info("[web][edit] {user}: {summary} ({stat})", user=user,
                              summary=pending.summary, stat=stat_text)
                return None
            _write(path, before)
            self._forget(version)
            self.log.warn("[web][edit][error] {user}: {summary} ({stat}): {problem}; the "
                          "previous milter-manager.custom.conf is back", user=user,
                          summary=pending.summary, stat=stat_text, problem=problem)
            return (f"{problem}. The change was not kept: the previous "
                    f"milter-manager.custom.conf is back in place.")

        return self._reload().addCallback(reloaded)

    def _reload(self):
        controller = getattr(self.service, "controller", None)
        if controller is not None:
            return controller.reload()
        return self.service.reload().addCallback(
            lambda adopted: None if adopted else "reload failed; the running configuration is "
            "kept: " + "; ".join(self.service.reload_errors))

    # -------------------------------------------------------------- versions

    @property
    def versions_directory(self):
        return os.path.join(os.path.dirname(self._require_path()), VERSIONS)

    def versions(self):
        """The kept versions, newest first: dicts with id, time, user, summary, absent."""
        try:
            with open(os.path.join(self.versions_directory, "index.json"),
                      encoding="utf-8") as file:
                entries = json.load(file)
        except (FileNotFoundError, ValueError):
            return []
        return sorted(entries, key=lambda entry: entry["id"], reverse=True)

    def version(self, number):
        for entry in self.versions():
            if entry["id"] == number:
                return entry
        raise EditRefused(f"there is no kept version {number}")

    def version_text(self, entry):
        if entry["absent"]:
            return ABSENT
        with open(os.path.join(self.versions_directory, f"{entry['id']}.conf"), "rb") as file:
            return file.read().decode("utf-8")

    def _keep(self, text, user, summary):
        directory = self.versions_directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        entries = self.versions()
        number = max((entry["id"] for entry in entries), default=0) + 1
        if text is not ABSENT:
            _write(os.path.join(directory, f"{number}.conf"), text)
        entries.insert(0, {"id": number, "time": self.clock.seconds(), "user": user,
                           "summary": summary, "absent": text is ABSENT})
        limit = self.service.configuration.web.custom_versions
        for old in entries[limit:]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, f"{old['id']}.conf"))
        self._index(entries[:limit])
        return number

    def _forget(self, number):
        entries = [entry for entry in self.versions() if entry["id"] != number]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.versions_directory, f"{number}.conf"))
        self._index(entries)

    def _index(self, entries):
        _write(os.path.join(self.versions_directory, "index.json"),
               json.dumps(entries, indent=1) + "\n")


def _name_problem(name, state):
    if not name:
        return "a child milter needs a name"
    if "\0" in name or any(ord(char) < 32 for char in name):
        return "a name cannot hold control characters"
    if len(name) > 200:
        return "a name is at most 200 characters"
    if state.milter(name) is not None:
        return f"there is a child milter {name!r} already"
    return None


def _write(path, text):
    """Replace path with text at once (mode 0600), or remove it for ABSENT.

    A temporary file in the same directory is written, synced, checked as
    the loader checks a configuration file, then renamed over path; the
    directory is synced so that the rename survives a crash.
    """
    directory = os.path.dirname(path)
    if text is ABSENT:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".web-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(text.encode("utf-8"))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, stat.S_IRUSR | stat.S_IWUSR)
        config_loader.check_trusted(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def diff(before, after):
    """The unified diff of two versions of the custom file (None: no file)."""
    return "".join(difflib.unified_diff(
        (before or "").splitlines(keepends=True), (after or "").splitlines(keepends=True),
        "milter-manager.custom.conf (now)" if before is not ABSENT else "(no file)",
        "milter-manager.custom.conf (new)" if after is not ABSENT else "(no file)"))


def diff_stat(before, after):
    added = removed = 0
    for line in diff(before, after).splitlines():
        if line.startswith("+") and not line.startswith("+++"):
            added += 1
        elif line.startswith("-") and not line.startswith("---"):
            removed += 1
    return f"+{added} -{removed} lines"


FALLBACK_NAMES = tuple(FALLBACK_STATUSES)
