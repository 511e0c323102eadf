"""The configuration language of milter-manager: loading, checking and dumping it.

    configuration = config.load("/etc/milter-manager/milter-manager.conf")
    configuration.manager.connection_spec, configuration.enabled_milters, ...
    configuration.conditions["S25R"].stoppers_of("connect"), ...

See miltermanager.config.loader for the language and model for the settings.
"""

import os

from .dump import dump
from .loader import Loader, check_trusted, default, embedded, load, shipped_directory
from .model import (
    DEFAULT_CONNECTION_SPEC,
    STOPPERS,
    ConditionConfig,
    Configuration,
    ConfigurationError,
    ControllerConfig,
    Hook,
    LogConfig,
    ManagerConfig,
    MilterConfig,
    PackageConfig,
    SecurityConfig,
    set_value,
    settings_of,
)

DEFAULT_DIRECTORY = "/etc/milter-manager"
FILE_NAME = "milter-manager.conf"
# Upstream's variable: the directory holding milter-manager.conf.
DIRECTORY_VARIABLE = "MILTER_MANAGER_CONFIG_DIR"


def locate(path=None, directory=None, environ=None, default_directory=DEFAULT_DIRECTORY):
    """The configuration file to load, or None to run on `default()`.

    path (--config) wins; a directory there means its milter-manager.conf.
    Then directory (--config-dir), then $MILTER_MANAGER_CONFIG_DIR: both name
    the directory holding milter-manager.conf, which must then exist. The
    default directory's file is used only if it exists.
    """
    if path is not None and directory is not None:
        raise ConfigurationError("give --config or --config-dir, not both")
    if path is not None:
        return os.path.join(path, FILE_NAME) if os.path.isdir(path) else path
    if directory is None:
        directory = (os.environ if environ is None else environ).get(DIRECTORY_VARIABLE) or None
    if directory is not None:
        return os.path.join(directory, FILE_NAME)
    candidate = os.path.join(default_directory, FILE_NAME)
    return candidate if os.path.exists(candidate) else None


def load_paths(directory=None, environ=None, default_directory=DEFAULT_DIRECTORY):
    """Where a relative load() looks after the including file's directory, as upstream.

    directory (--config-dir) first, then $MILTER_MANAGER_CONFIG_DIR, then the
    default directory, last the package's own copy of the shipped files (so
    `load("applicable-conditions/*.conf")` finds the built-in conditions in a
    pip or venv install without /etc); pass the result as
    `load(path, load_paths=...)`.
    """
    environment = (os.environ if environ is None else environ).get(DIRECTORY_VARIABLE) or None
    return list(dict.fromkeys(
        path for path in (directory, environment, default_directory, shipped_directory())
        if path is not None))


__all__ = [
    "DEFAULT_CONNECTION_SPEC", "DEFAULT_DIRECTORY", "DIRECTORY_VARIABLE", "FILE_NAME",
    "STOPPERS", "ConditionConfig", "Configuration", "ConfigurationError", "ControllerConfig",
    "Hook", "Loader", "LogConfig", "ManagerConfig", "MilterConfig", "PackageConfig",
    "SecurityConfig", "check_trusted", "default", "dump", "embedded", "load", "load_paths",
    "locate", "set_value", "settings_of", "shipped_directory",
]
