"""Evaluating configuration files: the namespace that reads like upstream's Ruby DSL.

A file is Python run with these names (upstream's, in snake_case):

    manager.connection_spec = "inet:10025@[127.0.0.1]"
    security.effective_user = "milter-manager"
    log.level = "default"
    with define_milter("opendkim") as milter:
        milter.connection_spec = "inet:8891@[127.0.0.1]"
    defined_milters, remove_milter(name)
    load(glob), load_if_exist(path), load_default()

Every assignment is checked at once and remembered with its FILE:LINE; every
error becomes a ConfigurationError whose message starts with the FILE:LINE of
the offending line.
"""

import glob
import os
import sys

from .model import (
    Configuration,
    ConfigurationError,
    MilterConfig,
    set_value,
    settings_of,
    unknown_setting,
)


class _SettingError(AttributeError):
    """Reading a setting that does not exist; its text is shown without the class name."""


class _Section:
    """`manager`, `security`, `log` and `milter` in a file: attributes are the settings."""

    def __init__(self, loader, target):
        object.__setattr__(self, "_loader", loader)
        object.__setattr__(self, "_target", target)

    def __setattr__(self, name, value):
        set_value(self._target, name, value, self._loader.location())

    def __getattr__(self, name):
        # Only called for names the proxy itself lacks: the settings.
        if name in settings_of(self._target):
            return getattr(self._target, name)
        raise _SettingError(unknown_setting(self._target, name))

    def __dir__(self):
        return sorted(settings_of(self._target))

    def __repr__(self):
        return f"<configuration {self._target!r}>"


class _Milter(_Section):
    """`milter` inside `with define_milter(name) as milter:`; also usable without `with`."""

    @property
    def name(self):
        """The milter's name (read-only)."""
        return self._target.name

    def add_applicable_condition(self, name):
        """Append a condition name to applicable_conditions (upstream's helper)."""
        self.applicable_conditions = [*self._target.applicable_conditions, name]

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def __dir__(self):
        return [*super().__dir__(), "add_applicable_condition", "name"]


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
    """Evaluates configuration files into one Configuration."""

    def __init__(self, configuration=None):
        self.configuration = configuration if configuration is not None else Configuration()
        self._loading = []  # files being evaluated, outermost first
        self._sections = {
            "manager": _Section(self, self.configuration.manager),
            "security": _Section(self, self.configuration.security),
            "log": _Section(self, self.configuration.log),
        }
        self._defined_milters = _DefinedMilters(self.configuration)

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
        """Evaluate one file; raise ConfigurationError with its FILE:LINE."""
        path = os.path.abspath(path)
        if path in self._loading:
            raise ConfigurationError(
                f"{path} is already being loaded (a load loop)", self.location())
        try:
            with open(path, "rb") as file:
                source = file.read()
        except OSError as error:
            raise ConfigurationError(
                f"cannot read {path}: {error.strerror}", self.location()) from None
        self._loading.append(path)
        try:
            exec(compile(source, path, "exec", dont_inherit=True), self._namespace(path))
        except ConfigurationError as error:
            if error.location is not None:
                raise
            raise ConfigurationError(error.reason, _traceback_location(error, path)) from error
        except SyntaxError as error:
            if error.filename != path:
                raise ConfigurationError(
                    _describe(error), _traceback_location(error, path)) from error
            raise ConfigurationError(
                f"syntax error: {error.msg}", f"{path}:{error.lineno}") from None
        except Exception as error:
            raise ConfigurationError(_describe(error), _traceback_location(error, path)) from error
        finally:
            self._loading.pop()
        self.configuration.files.append(path)

    def finish(self):
        """Check what only a whole configuration can tell; return it."""
        for milter in self.configuration.milters:
            # A disabled child is never contacted, so it may lack a socket: a
            # local file can disable a milter some platform file never defined.
            if milter.enabled and milter.connection_spec is None:
                raise ConfigurationError(
                    f'milter "{milter.name}": connection_spec is required '
                    f'(where the child milter listens, e.g. "inet:8891@[127.0.0.1]")',
                    milter.origins.get("name"))
        return self.configuration

    # The names a file sees.

    def _namespace(self, path):
        directory = os.path.dirname(path)

        def load(pattern):
            """Load the files matching pattern (a glob), relative to this file's directory.

            A pattern without wildcards must name an existing file; a glob may match nothing.
            """
            resolved = os.path.join(directory, pattern)
            if _has_wildcards(resolved):
                for match in sorted(glob.glob(resolved)):
                    self.load_file(match)
            else:
                self.load_file(resolved)

        def load_if_exist(pattern):
            """Like load, but a missing file is silently skipped."""
            resolved = os.path.join(directory, pattern)
            if _has_wildcards(resolved) or os.path.exists(resolved):
                load(pattern)

        def load_default():
            """Upstream loads the platform defaults (which detect installed milters) here.

            A no-op for now: detection is a later release. Keep the call in
            milter-manager.conf so that files keep working when it lands.
            """

        return {
            "__name__": "milter_manager_configuration",
            "__file__": path,
            **self._sections,
            "define_milter": self.define_milter,
            "defined_milters": self._defined_milters,
            "remove_milter": self.remove_milter,
            "load": load,
            "load_if_exist": load_if_exist,
            "load_default": load_default,
        }

    def define_milter(self, name):
        """Define the child milter name, or update it if defined already.

        As upstream, a redefined milter moves to the end of the child order
        (the order children are contacted in).
        """
        if not isinstance(name, str) or not name:
            raise ConfigurationError(
                f"define_milter needs a name (a non-empty string); got {name!r}", self.location())
        milter = self.configuration.milter(name)
        if milter is None:
            milter = MilterConfig(name)
            milter.origins["name"] = self.location()
        else:
            self.configuration.milters.remove(milter)
        self.configuration.milters.append(milter)
        return _Milter(self, milter)

    def remove_milter(self, name):
        """Forget the child milter name; a name never defined is ignored, as upstream."""
        milter = self.configuration.milter(name)
        if milter is not None:
            self.configuration.milters.remove(milter)


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


def _describe(error):
    if isinstance(error, _SettingError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def load(path):
    """Load the configuration file at path (and the files it loads)."""
    loader = Loader()
    loader.load_file(path)
    return loader.finish()


def default():
    """The embedded configuration used when there is no file: upstream's defaults, no child."""
    return Configuration()
