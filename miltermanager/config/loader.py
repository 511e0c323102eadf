"""Evaluating configuration files: the namespace that reads like upstream's Ruby DSL.

A file is Python run with these names (upstream's, in snake_case):

    package.platform = "debian"
    security.effective_user = "milter-manager"
    log.level = "default"
    manager.connection_spec = "inet:10025@[127.0.0.1]"
    controller.connection_spec = None
    with define_applicable_condition("Internal Only") as condition:
        @condition.define_envelope_recipient_stopper
        def external(context, recipient): ...
    with define_milter("opendkim") as milter:
        milter.connection_spec = "inet:8891@[127.0.0.1]"
    defined_milters, remove_milter(name)
    load(glob), load_if_exist(path), load_default()

Every assignment is checked at once and remembered with its FILE:LINE; every
error becomes a ConfigurationError whose message starts with the FILE:LINE of
the offending line. As upstream, an error in a value is kept and loading goes
on, so that one pass finds them all; `Loader.finish` raises them together
(ConfigurationError.errors). Checks that need the whole configuration (a
milter's socket, the conditions a milter names) run in `Loader.finish`.

A configuration file is code that runs as root, so a file (or its directory)
that anyone but root and us could change is refused, as sshd's StrictModes.
"""

import ast
import difflib
import glob
import os
import pwd
import re
import stat
import sys

from twisted.logger import Logger

from miltermanager.conditions import accounts as _accounts

from .helpers import HELPERS, Call, literal
from .model import (
    REFUSED,
    STOPPERS,
    ConditionConfig,
    Configuration,
    ConfigurationError,
    Hook,
    InvalidValue,
    MilterConfig,
    check_arguments,
    located,
    set_value,
    settings_of,
    unknown_setting,
)

_log = Logger(namespace="miltermanager.config")

# Values accepted for upstream's files that change nothing here: loading warns of them.
WITHOUT_EFFECT = {
    ("manager", "event_loop_backend"):
        "accepted for upstream's files; milter-manager runs on Twisted's reactor whatever "
        "the value",
    ("manager", "suspend_time_on_unacceptable"):
        "accepted for upstream's files; accepting resumes as soon as a connection ends "
        "below max_connections, so nothing waits a fixed time (raise max_file_descriptors "
        "if the process runs out of them)",
    ("manager", "max_pending_finished_sessions"):
        "accepted for upstream's files; a finished session is freed at once here, and "
        "maintenance runs every maintenance_interval finished sessions even under constant "
        "load, so nothing waits for a cleanup",
}


class _SettingError(AttributeError):
    """Reading a setting that does not exist; its text is shown without the class name."""


class _Ignored:
    """What a file gets instead of something an error made unusable (a refused item, a
    milter without a name): whatever it does with it does nothing, so the file goes on
    to its other lines and their errors."""

    def __getattr__(self, name):
        return self

    def __setattr__(self, name, value):
        pass

    def __call__(self, *args, **kwargs):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def __iter__(self):
        return iter(())

    def __repr__(self):
        return "<ignored after a configuration error>"


_IGNORED = _Ignored()


class _Section:
    """`package`, `security`, `log`, `manager`, `controller`, `milter`, `condition` in a file.

    Attributes are the settings of the target record; public methods of a
    subclass are the section's verbs (add_applicable_condition, ...).
    """

    def __init__(self, loader, target):
        object.__setattr__(self, "_loader", loader)
        object.__setattr__(self, "_target", target)

    def __setattr__(self, name, value):
        origin = self._loader.location()
        try:
            set_value(self._target, name, value, origin, extra=self._verbs())
        except ConfigurationError as error:
            self._loader.report(error, self._target, name)
            return
        self._loader.noted(self._target, name, origin)

    def __getattr__(self, name):
        # Only called for names the proxy itself lacks: the settings.
        if name in settings_of(self._target):
            return getattr(self._target, name)
        message = unknown_setting(self._target, name, self._verbs())
        if f"{getattr(self._target, 'SECTION', None)}.{name}" in REFUSED:
            self._loader.report(ConfigurationError(message, self._loader.location()))
            return _IGNORED
        # Not kept to go on: the file needs a value here, and getattr(section,
        # name, default) relies on the AttributeError.
        raise _SettingError(message)

    @classmethod
    def _verbs(cls):
        return [name for name in dir(cls) if not name.startswith("_")]

    def __dir__(self):
        return sorted({*settings_of(self._target), *self._verbs()})

    def __repr__(self):
        return f"<configuration {self._target!r}>"


class _Named(_Section):
    """A section defined by name, used as `with define_...(name) as x:` or without `with`."""

    @property
    def name(self):
        """The name given at definition (read-only)."""
        return self._target.name

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False


class _Milter(_Named):
    """`milter` inside `with define_milter(name) as milter:`."""

    def add_applicable_condition(self, name):
        """Append a condition name to applicable_conditions (upstream's helper)."""
        self.applicable_conditions = [*self._target.applicable_conditions, name]


def _stopper_definer(kind):
    arguments = STOPPERS[kind]

    def define(self, function):
        self._loader.register(self._target.stoppers, kind, None, function,
                              f"{kind} stopper", arguments, describe=self._target)
        return function

    define.__name__ = f"define_{kind}_stopper"
    define.__doc__ = (f"Decorator: stop the child when function({', '.join(arguments)}) "
                      f"returns true.")
    return define


class _Condition(_Named):
    """`condition` inside `with define_applicable_condition(name) as condition:`.

    Its verbs are define_KIND_stopper for each kind of STOPPERS, decorators.
    """


for _kind in STOPPERS:
    setattr(_Condition, f"define_{_kind}_stopper", _stopper_definer(_kind))
del _kind


class _Manager(_Section):
    """`manager`: settings, and the hooks upstream registers with blocks."""

    def use_netstat_connection_checker(self, interval=5):
        """Check every interval seconds with netstat that each SMTP client is still there."""
        self.connection_check_interval = interval
        checkers = self._target.connection_checkers
        checkers.pop("netstat", None)
        checkers["netstat"] = Hook(
            "connection_checker", "netstat", origin=self._loader.location(),
            builtin="netstat", arguments=(interval,))

    def define_connection_checker(self, name, function=None):
        """Decorator: function(context) returns whether the SMTP client is still connected.

        A second checker of the same name replaces the first, as upstream.
        """
        if not isinstance(name, str) or not name:
            self._loader.report(ConfigurationError(
                f"manager.define_connection_checker needs a name (a non-empty string); "
                f"got {name!r}", self._loader.location()))
            return (lambda function: function) if function is None else function

        def define(function):
            self._target.connection_checkers.pop(name, None)
            self._loader.register(self._target.connection_checkers, "connection_checker",
                                  name, function, f"connection checker {name!r}", ("context",))
            return function
        return define if function is None else define(function)

    def maintained(self, function):
        """Decorator: call function() at each maintenance (see maintenance_interval)."""
        self._loader.register(self._target.maintained_hooks, "maintained", None, function,
                              "maintained hook", ())
        return function

    def event_loop_created(self, function):
        """Decorator: call function(reactor) once when the manager starts."""
        self._loader.register(self._target.event_loop_created_hooks, "event_loop_created",
                              None, function, "event_loop_created hook", ("reactor",))
        return function

    def report_memory_statistics(self):
        """Log memory use at each maintenance (the same as assigning True)."""
        self.report_memory_statistics = True


class _Helper(_Section):
    """A built-in condition's helper (`s25r`, `trust`, ...): settings, verbs and what stoppers use.

    A verb's error is reported with the FILE:LINE of the call and the file
    goes on; each call is kept (target.calls) for dump. _RUNTIME are the
    target's methods the shipped conditions' stoppers call.
    """

    _RUNTIME = ()
    _ALIASES = {}

    @classmethod
    def _verbs(cls):
        return [*cls._target_class.VERBS, *cls._ALIASES]

    def __getattr__(self, name):
        if name in self._RUNTIME:
            return getattr(self._target, name)
        if name in self._ALIASES:
            value = getattr(self._target, self._ALIASES[name][0])
            return value[0] if isinstance(value, list) and value else value
        return _Section.__getattr__(self, name)

    def __setattr__(self, name, value):
        if name in self._ALIASES:
            name, one = self._ALIASES[name]
            if one:
                value = [value]
        _Section.__setattr__(self, name, value)

    def _call(self, verb, *arguments, **keywords):
        loader = self._loader
        location = loader.location()
        if verb in _PATH_VERBS and arguments and isinstance(arguments[0], str):
            # A relative path is looked up as load() does, from the calling file's
            # directory on; dump writes the path found, which reloads from anywhere.
            arguments = (loader.resolve_one(arguments[0]), *arguments[1:])
        try:
            getattr(self._target, verb)(*arguments, **keywords)
        except (TypeError, ValueError, OSError) as error:
            if isinstance(error, OSError):
                text = f"cannot read {error.filename}: {error.strerror or error}"
            else:
                text = str(error)
            loader.report(ConfigurationError(
                f"{self._target.SECTION}.{verb}: {text}", location))
            return
        self._target.calls.append(loader.call_record(verb, arguments, keywords, location))


# Verbs whose first argument is a file, relative to the configuration's directories.
_PATH_VERBS = frozenset({"load_envelope_from_domains"})


def _helper_class(target_class, runtime, aliases=None):
    verbs = {}
    for verb in target_class.VERBS:
        def method(self, *arguments, _verb=verb, **keywords):
            self._call(_verb, *arguments, **keywords)
        method.__name__ = verb
        method.__doc__ = getattr(target_class, verb).__doc__
        verbs[verb] = method
    return type(f"_{target_class.__name__}", (_Helper,), {
        "_target_class": target_class, "_RUNTIME": runtime, "_ALIASES": aliases or {},
        **verbs})


_HELPER_PROXIES = {
    "s25r": _helper_class(HELPERS["s25r"], ("stop", "dynamic", "whitelisted", "blacklisted"),
                          {"only_check_ipv4": ("check_only_ipv4", False)}),
    "remote_network": _helper_class(HELPERS["remote_network"], ("stop", "remote")),
    "stress": _helper_class(HELPERS["stress"], ("stressed", "threshold")),
    "trust": _helper_class(HELPERS["trust"], ("trusted",)),
    "dnsbl": _helper_class(HELPERS["dnsbl"], ("lookup", "listed", "not_listed", "resolver"),
                           {"name_server": ("name_servers", True)}),
    "ldap": _helper_class(HELPERS["ldap"], ("bypassed", "evaluated")),
}


class _Refused:
    """An upstream name that only made sense for Ruby: any use is an error saying why."""

    def __init__(self, loader, name):
        object.__setattr__(self, "_loader", loader)
        object.__setattr__(self, "_name", name)

    def _refuse(self, attribute=None):
        name = self._name if attribute is None else f"{self._name}.{attribute}"
        self._loader.report(
            ConfigurationError(f"{name}: {REFUSED[self._name]}", self._loader.location()))
        return _IGNORED

    def __getattr__(self, name):
        return self._refuse(name)

    def __setattr__(self, name, value):
        self._refuse(name)

    def __call__(self, *args, **kwargs):
        return self._refuse()


class _DefinedMilters:
    """`defined_milters`: the names of the defined milters, in order.

    Upstream's Ruby calls it without parentheses, so it is iterable as is
    (`"clamav" in defined_milters`) and also callable (`defined_milters()`).
    """

    def __init__(self, configuration):
        self._configuration = configuration

    def __call__(self):
        return [milter.name for milter in self._configuration.milters]

    def __iter__(self):
        return iter(self())

    def __contains__(self, name):
        return name in self()

    def __len__(self):
        return len(self._configuration.milters)

    def __repr__(self):
        return repr(self())


class Loader:
    """Evaluates configuration files into one Configuration.

    load_paths are further directories a relative `load()` pattern is looked
    up in, after the including file's directory: upstream's --config-dir,
    $MILTER_MANAGER_CONFIG_DIR and /etc/milter-manager (see
    `miltermanager.config.load_paths`). strict refuses files that others
    could change (see check_trusted); only tests on odd file systems turn it off.

    load_file keeps the errors it finds in `errors` and goes on; `finish`
    adds those of the whole configuration and raises them all. A
    configuration with errors is never returned.
    """

    def __init__(self, configuration=None, load_paths=(), strict=True, detect_root="/"):
        self.configuration = configuration if configuration is not None else Configuration()
        self.load_paths = [os.path.abspath(path) for path in load_paths]
        self.strict = strict
        self.detect_root = detect_root  # where milter detection looks (tests: a fake tree)
        self._loading = []  # files being evaluated, outermost first
        self._sources = {}  # path -> text, to show registered functions
        self._trees = {}
        self._sections = {
            name: (_Manager if name == "manager" else _Section)(self, section)
            for name, section in zip(Configuration.SECTIONS, self.configuration.sections())
        }
        self._defined_milters = _DefinedMilters(self.configuration)
        self._helpers = {name: _HELPER_PROXIES[name](self, getattr(self.configuration, name))
                         for name in self.configuration.HELPERS}
        self.errors = []  # ConfigurationErrors found so far, in the order found
        # (id(section), setting) -> section (kept, so that its id stays its
        # own), for assignments refused: finish must not report a refused
        # connection_spec as missing as well.
        self._refused = {}
        # A file stopped early (syntax error, exception): its later lines never
        # ran, so finish's checks would report what they would have set.
        self._stopped = False

    def location(self):
        """FILE:LINE of the innermost configuration-file line running now, or None."""
        # Walking the live stack finds the file's line even when the assignment
        # happens in a function the file defined and called.
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_filename in self._loading:
                return f"{frame.f_code.co_filename}:{frame.f_lineno}"
            frame = frame.f_back
        return None

    def load_file(self, path):
        """Evaluate one file; its errors, and those of the files it loads, go to `errors`.

        As upstream, an error in a value, or a loaded file that is missing,
        refused or loaded in a loop, is kept with its FILE:LINE and the file
        goes on. A syntax error or an exception from the file's own code stops
        that file, whose later lines could not mean what they say; the files
        that loaded it go on. Call `finish` to have the errors raised.
        """
        path = os.path.abspath(path)
        location = self.location()
        if path in self._loading:
            self.errors.append(ConfigurationError(
                f"{path} is already being loaded (a load loop)", location))
            return
        try:
            with open(path, "rb") as file:
                if self.strict:
                    check_trusted(path, os.fstat(file.fileno()))
                source = file.read()
        except OSError as error:
            self.errors.append(
                ConfigurationError(f"cannot read {path}: {error.strerror}", location))
            return
        except ConfigurationError as error:
            self.errors.append(ConfigurationError(error.reason, location))
            return
        self._sources[path] = source
        self._loading.append(path)
        try:
            exec(compile(source, path, "exec", dont_inherit=True), self._namespace(path))
        except Exception as error:
            self.errors.append(_stopping_error(error, path))
            self._stopped = True
            return
        finally:
            self._loading.pop()
        self.configuration.files.append(path)

    def load_custom(self, overrides=None, path=None):
        """Load milter-manager.custom.conf (see `custom_file`) if it exists.

        overrides(configuration), if given, applies the command line first:
        --user-name decides whose home the default directory is in. path, if
        given, is read instead (the web editor checks a candidate file so).
        """
        if self._stopped:
            return  # the main file stopped early: its custom_configuration_directory is unknown
        if overrides is not None:
            overrides(self.configuration)
        if path is None:
            path = custom_file(self.configuration)
        if path is not None and os.path.exists(path):
            self.load_file(path)

    def report(self, error, section=None, name=None):
        """Keep error and go on while a file is being loaded; otherwise raise it.

        section and name, if given, are the setting whose value error refuses.
        Outside a file (a hook the file defined, run later; a tool probing
        the language) there is nothing to go on with, so the error is raised.
        """
        if not self._loading:
            raise error
        self.errors.append(error)
        if section is not None:
            self._refused[(id(section), name)] = section

    def finish(self):
        """Check what only a whole configuration can tell; return it, or raise every error.

        The error raised is `ConfigurationError.of(errors)`: one error as it
        is, several together, in the order found.
        """
        configuration = self.configuration
        errors = list(self.errors)
        if not self._stopped:
            errors.extend(self._whole_configuration_errors())
        if errors:
            raise ConfigurationError.of(errors)
        for warning in configuration.warnings:
            _log.warn("[configuration][warning] {text}", text=warning)
        return configuration

    def _whole_configuration_errors(self):
        configuration = self.configuration
        for milter in configuration.milters:
            # A disabled child is never contacted, so it may lack a socket: a
            # local file can disable a milter some platform file never defined.
            # A refused connection_spec or enabled is reported already.
            if (milter.enabled and milter.connection_spec is None
                    and (id(milter), "connection_spec") not in self._refused
                    and (id(milter), "enabled") not in self._refused):
                yield ConfigurationError(
                    f'milter "{milter.name}": connection_spec is required '
                    f'(where the child milter listens, e.g. "inet:8891@[127.0.0.1]")',
                    milter.origins.get("name"))
            # Checked here, not at assignment, so that conditions may be
            # defined after the milters that name them.
            for name in milter.applicable_conditions:
                if name not in configuration.conditions:
                    yield ConfigurationError(
                        _unknown_condition(milter, name, configuration.conditions),
                        milter.origins.get("applicable_conditions"))
        errors, warnings = configuration.ldap.problems(configuration)
        configuration.warnings.extend(warnings)
        yield from errors

    def noted(self, section, name, origin):
        """Record a note if assigning section.name changes nothing here."""
        note = WITHOUT_EFFECT.get((getattr(section, "SECTION", None), name))
        if note:
            self.configuration.warnings.append(located(
                origin, f"{section.SECTION}.{name} = {getattr(section, name)!r}: {note}"))

    def register(self, hooks, kind, name, function, what, arguments, describe=None):
        """Check function takes arguments and keep it as a Hook in hooks (a list or dict)."""
        location = self.location()
        try:
            check_arguments(function, arguments, what)
        except InvalidValue as error:
            prefix = f'{describe.KIND} "{describe.name}": ' if describe is not None else ""
            self.report(ConfigurationError(f"{prefix}{error}", location))
            return None
        code = getattr(function, "__code__", None)
        if code is not None and code.co_filename in self._sources:
            location = f"{code.co_filename}:{code.co_firstlineno}"
        hook = Hook(kind, name or getattr(function, "__name__", repr(function)), function,
                    location, self.source_of(function))
        if isinstance(hooks, dict):
            hooks[name] = hook
        else:
            hooks.append(hook)
        return hook

    def source_of(self, function):
        """The `def` of function as its file wrote it (decorators left out), or None."""
        code = getattr(function, "__code__", None)
        if code is None or code.co_filename not in self._sources:
            return None
        tree = self._trees.get(code.co_filename)
        if tree is None:
            tree = self._trees[code.co_filename] = ast.parse(self._sources[code.co_filename])
        for node in ast.walk(tree):
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and node.name == function.__name__
                    and (node.decorator_list[0] if node.decorator_list else node).lineno
                    == code.co_firstlineno):
                break
        else:
            return None  # a lambda
        lines = self._sources[code.co_filename].decode("utf-8").splitlines(keepends=True)
        indent = node.col_offset
        text = "".join(line[indent:] if not line[:indent].strip() else line
                       for line in lines[node.lineno - 1:node.end_lineno])
        text = text.rstrip() + "\n"
        try:
            ast.parse(text)
        except SyntaxError:
            return None
        return text

    # The names a file sees.

    def _namespace(self, path):
        directory = os.path.dirname(path)

        def load(pattern):
            """Load the files matching pattern (a glob), relative to this file's directory.

            Then the load paths are tried (--config-dir, $MILTER_MANAGER_CONFIG_DIR, the
            default directory, the package's own copy). A pattern without wildcards must
            name an existing file; a glob that matches nothing is a warning (what it was
            meant to define is missing: an error under --strict).
            """
            matches = self._resolve(pattern, directory)
            if not matches and not _has_wildcards(pattern):
                matches = [os.path.join(directory, pattern)]  # fails, naming the file
            if not matches:
                where = self.location()
                searched = "" if os.path.isabs(pattern) else " (looked in {})".format(
                    ", ".join(dict.fromkeys([directory, *self.load_paths])))
                self.configuration.warnings.append(
                    located(where, f"load({pattern!r}) matched no file{searched}"))
            for match in matches:
                self.load_file(match)

        def load_if_exist(pattern):
            """Like load, but a missing file is silently skipped."""
            for match in self._resolve(pattern, directory):
                self.load_file(match)

        def load_default():
            """Load defaults/PLATFORM.conf (package.platform) from the load paths, if present."""
            load_if_exist(os.path.join("defaults", f"{self.configuration.package.platform}.conf"))

        return {
            "__name__": "milter_manager_configuration",
            "__file__": path,
            **self._sections,
            "database": _Refused(self, "database"),
            "define_policy": _Refused(self, "define_policy"),
            "define_milter": self.define_milter,
            "define_applicable_condition": self.define_applicable_condition,
            "defined_milters": self._defined_milters,
            "remove_milter": self.remove_milter,
            **self._helpers,
            "restrict_accounts_by_list": self.restrict_accounts_by_list,
            "restrict_accounts_generic": self.restrict_accounts_generic,
            "re": re,
            "load": load,
            "load_if_exist": load_if_exist,
            "load_default": load_default,
            "detect_milters": lambda platform=None, options=None: _detect_milters(
                self, platform, options),
        }

    def _resolve(self, pattern, directory):
        """The files pattern names: in the first of directory and the load paths that has any."""
        bases = [""] if os.path.isabs(pattern) else dict.fromkeys([directory, *self.load_paths])
        for base in bases:
            resolved = os.path.join(base, pattern)
            if _has_wildcards(resolved):
                matches = sorted(glob.glob(resolved))
            else:
                matches = [resolved] if os.path.exists(resolved) else []
            if matches:
                return matches
        return []

    def _named(self, what, name):
        """Whether name can name a milter or condition; if not, the error is reported."""
        if isinstance(name, str) and name:
            return True
        self.report(ConfigurationError(
            f"{what} needs a name (a non-empty string); got {name!r}", self.location()))
        return False

    def define_milter(self, name):
        """Define the child milter name, or update it if defined already.

        As upstream, a redefined milter moves to the end of the child order
        (the order children are contacted in).
        """
        if not self._named("define_milter", name):
            return _IGNORED
        milter = self.configuration.milter(name)
        if milter is None:
            milter = MilterConfig(name)
            milter.origins["name"] = self.location()
        else:
            self.configuration.milters.remove(milter)
        self.configuration.milters.append(milter)
        return _Milter(self, milter)

    def define_applicable_condition(self, name):
        """Define the applicable condition name, or add to it if defined already."""
        if not self._named("define_applicable_condition", name):
            return _IGNORED
        condition = self.configuration.conditions.get(name)
        if condition is None:
            condition = self.configuration.conditions[name] = ConditionConfig(name)
            condition.origins["name"] = self.location()
        return _Condition(self, condition)

    def resolve_one(self, path):
        """path, or the file it names relative to the running file's directory or the load paths."""
        if os.path.isabs(path) or not self._loading:
            return path
        directory = os.path.dirname(self._loading[-1])
        bases = dict.fromkeys([directory, *self.load_paths])
        for base in bases:
            candidate = os.path.join(base, path)
            if os.path.exists(candidate):
                return candidate
        return os.path.join(directory, path)

    def call_record(self, verb, arguments, keywords, location):
        """The Call dump writes back for verb(*arguments, **keywords)."""
        source = None
        texts = []
        for value in arguments:
            if callable(value) and not isinstance(value, re.Pattern):
                source = self.source_of(value)
                texts.append(value.__name__ if source is not None else None)
            else:
                texts.append(literal(value))
        texts.extend(f"{name}={literal(value)}" if literal(value) is not None else None
                     for name, value in keywords.items())
        text = None if None in texts else ", ".join(texts)
        return Call(verb, text, location, source)

    def restrict_accounts_by_list(self, *accounts, condition_name=None, milters=None):
        """Define a condition running milters only for mail whose every recipient is listed.

        accounts are addresses (strings, matched exactly, case-insensitively)
        or compiled regular expressions; condition_name defaults to upstream's
        "Restrict Accounts by List: ACCOUNTS"; milters names the children it
        applies to (None: every milter defined so far).
        """
        location = self.location()
        try:
            accounts = [_accounts.check_account(account) for account in accounts]
        except TypeError as error:
            self.report(ConfigurationError(f"restrict_accounts_by_list: {error}", location))
            return None
        if condition_name is None:
            # Upstream's default: the accounts in the name.
            condition_name = "Restrict Accounts by List: " + ", ".join(
                account if isinstance(account, str) else f"/{account.pattern}/"
                for account in accounts)
        arguments = [literal(account) for account in accounts]
        arguments.append(f"condition_name={literal(condition_name)}")
        self._restrict_accounts(
            condition_name, milters, _accounts.list_matcher(accounts),
            Call("restrict_accounts_by_list", ", ".join(arguments), location),
            "restrict_accounts_by_list", location)
        return None

    def restrict_accounts_generic(self, function=None, *, condition_name="Restrict Accounts",
                                  milters=None):
        """Like restrict_accounts_by_list, with function(context, recipient) telling restricted.

        Used as a decorator (`@restrict_accounts_generic(condition_name=...)`)
        or called with the function.
        """
        location = self.location()

        def define(function):
            try:
                check_arguments(function, ("context", "recipient"), "restrict_accounts_generic")
            except InvalidValue as error:
                self.report(ConfigurationError(str(error), location))
                return function
            source = self.source_of(function)
            if source is not None:
                source = "\n".join(line for line in source.splitlines()
                                   if not line.lstrip().startswith("@")) + "\n"
            call = Call("restrict_accounts_generic",
                        f"condition_name={literal(condition_name)}", location,
                        source if source is not None else None)
            self._restrict_accounts(condition_name, milters, function, call,
                                    "restrict_accounts_generic", location)
            return function

        return define if function is None else define(function)

    def _restrict_accounts(self, condition_name, milters, restricted, call, what, location):
        if not self._named(what, condition_name):
            return
        if condition_name in self.configuration.conditions:
            self.report(ConfigurationError(
                f"{what}: the condition {condition_name!r} is defined already", location))
            return
        if milters is None:
            targets = list(self.configuration.milters)
        elif isinstance(milters, str) or not isinstance(milters, (list, tuple)):
            self.report(ConfigurationError(
                f"{what}: milters must be a list of milter names; got {milters!r}", location))
            return
        else:
            targets = []
            for name in milters:
                milter = self.configuration.milter(name)
                if milter is None:
                    self.report(ConfigurationError(
                        f"{what}: no milter {name!r} is defined (define it before)", location))
                    return
                targets.append(milter)
        condition = ConditionConfig(condition_name, helper=call)
        condition.origins["name"] = location
        condition.description = "runs its milters only when every recipient is restricted"
        for function in _accounts.stoppers(condition_name, restricted):
            condition.stoppers.append(Hook(
                "envelope_recipient" if "recipient" in function.__name__ else "data",
                function.__name__, function, location, None, builtin="restrict_accounts"))
        self.configuration.conditions[condition_name] = condition
        for milter in targets:
            if condition_name not in milter.applicable_conditions:
                milter.applicable_conditions = [*milter.applicable_conditions, condition_name]
                milter.origins.setdefault("applicable_conditions", location)

    def remove_milter(self, name):
        """Forget the child milter name; a name never defined is ignored, as upstream."""
        milter = self.configuration.milter(name)
        if milter is not None:
            self.configuration.milters.remove(milter)


def check_trusted(path, status=None, euid=None):
    """Raise ConfigurationError unless only root and we can change path and its directory.

    A file that others may write (group- or world-writable, or owned by
    another user), or a file in such a directory, could be made to run any
    code as root. status is path's os.stat result if already known.
    """
    euid = os.geteuid() if euid is None else euid
    real = os.path.realpath(path)
    checks = [(path, status if status is not None else os.stat(real), None)]
    for directory in dict.fromkeys([os.path.dirname(os.path.abspath(path)),
                                    os.path.dirname(real)]):
        checks.append((directory, os.stat(directory), os.path.basename(path)))
    for target, status_, name in checks:
        if status_.st_uid not in (0, euid):
            problem = (f"owned by {_user_name(status_.st_uid)}, who could change code that "
                       f"runs as root")
        elif status_.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            problem = (f"mode {stat.S_IMODE(status_.st_mode):04o} lets others change code "
                       f"that runs as root")
        else:
            continue
        refusal = "refusing to load" if name is None else f"refusing to load {name} from it"
        raise ConfigurationError(f"{target}: {refusal}: {problem}")


def _user_name(uid):
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _unknown_condition(milter, name, conditions):
    hint = difflib.get_close_matches(name, list(conditions), n=1)
    suggestion = f"did you mean {hint[0]!r}? " if hint else ""
    defined = (f"defined: {', '.join(repr(known) for known in conditions)}" if conditions
               else "no condition is defined")
    return (f'milter "{milter.name}": applicable_conditions: no condition {name!r}; '
            f"{suggestion}{defined}")


def _has_wildcards(pattern):
    return any(char in pattern for char in "*?[")


def _traceback_location(error, path):
    """FILE:LINE of the innermost frame of path in error's traceback."""
    line = None
    traceback = error.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename == path:
            line = traceback.tb_lineno
        traceback = traceback.tb_next
    return f"{path}:{line}" if line is not None else path


def _stopping_error(error, path):
    """The ConfigurationError for an exception that stopped the file at path."""
    if isinstance(error, SyntaxError) and error.filename == path:
        return ConfigurationError(f"syntax error: {error.msg}", f"{path}:{error.lineno}")
    if isinstance(error, ConfigurationError):
        if error.location is not None:
            return error
        stopping = ConfigurationError(error.reason, _traceback_location(error, path))
    else:
        stopping = ConfigurationError(_describe(error), _traceback_location(error, path))
    stopping.__cause__ = error
    return stopping


def _detect_milters(loader, platform, options):
    """detect_milters(): define the installed milters (miltermanager.detect.apply)."""
    from miltermanager.detect.apply import detect_milters

    return detect_milters(loader, platform, options)


def _describe(error):
    if isinstance(error, _SettingError):
        return str(error)
    return f"{type(error).__name__}: {error}"


CUSTOM_FILE = "milter-manager.custom.conf"


def custom_file(configuration):
    """milter-manager.custom.conf in manager.custom_configuration_directory, as upstream.

    None (the default) means ~EFFECTIVE_USER/.milter-manager: the effective
    user's home, or the running user's without one; None when that user has no
    home we can find.
    """
    directory = configuration.manager.custom_configuration_directory
    if directory is None:
        user = configuration.security.effective_user
        try:
            entry = pwd.getpwnam(user) if user is not None else pwd.getpwuid(os.geteuid())
        except KeyError:
            return None  # an unknown effective user is a start-up error of its own
        directory = os.path.join(entry.pw_dir, ".milter-manager")
    return os.path.join(directory, CUSTOM_FILE)


def load(path, load_paths=(), strict=True, detect_root="/", overrides=None, custom=None):
    """Load the configuration file at path (and the files it loads), then the custom file.

    The custom file (`custom_file`), where upstream's controller saves the
    changes made through it, is loaded last if it exists, under the same
    trust check as every other file. overrides: see Loader.load_custom;
    custom: a file read in its place.
    """
    loader = Loader(load_paths=load_paths, strict=strict, detect_root=detect_root)
    loader.load_file(path)
    loader.load_custom(overrides, custom)
    return loader.finish()


def default():
    """Upstream's defaults with no child and no condition: what every file starts from."""
    return Configuration()


def shipped_directory():
    """The package's own copy of the shipped etc/, or None.

    Installed, it is the package data `miltermanager/etc`; in a checkout (an
    editable install) it is the checkout's `etc/`.
    """
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for candidate in (os.path.join(package, "etc"), os.path.join(os.path.dirname(package), "etc")):
        if os.path.isfile(os.path.join(candidate, "milter-manager.conf")):
            return candidate
    return None


def embedded(load_paths=(), detect_root="/", overrides=None, custom=None):
    """The configuration used when there is no file: the package's own milter-manager.conf.

    So a manager without /etc/milter-manager has the built-in conditions, and
    its platform defaults detect the installed milters (under detect_root).
    """
    directory = shipped_directory()
    if directory is None:
        raise ConfigurationError(
            "the shipped milter-manager.conf is missing from the installed package; "
            "reinstall milter-manager or give --config")
    loader = Loader(load_paths=load_paths, detect_root=detect_root)
    loader.load_file(os.path.join(directory, "milter-manager.conf"))
    loader.load_custom(overrides, custom)
    return loader.finish()
