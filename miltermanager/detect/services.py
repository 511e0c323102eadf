"""Debian and RedHat services: systemd units (with EnvironmentFile), else init scripts.

A candidate with a systemd unit is judged by the unit alone, as systemd
does: its ExecStart, Environment and EnvironmentFile (drop-ins included),
enabled when a `*.wants/` link names it and it is not masked. Without a
unit, the init script and /etc/default/NAME (Debian) or /etc/sysconfig/NAME
(RedHat) are read, enabled when an rc S link names it and ENABLED is not 0.
"""

import re

from . import apps, shell
from .base import Skip

UNIT_DIRECTORIES = ("/etc/systemd/system", "/run/systemd/system", "/lib/systemd/system",
                    "/usr/lib/systemd/system")
# Variables init scripts and their defaults files give the socket in (upstream's),
# and those holding the daemon's options, where -p may give it.
SOCKET_VARIABLES = ("SOCKET", "SOCKFILE", "SOCKET_ADDRESS", "MILTER_SOCKET", "CONNECTION_SPEC")
OPTION_VARIABLES = ("OPTIONS", "OPTARGS", "DAEMON_ARGS", "DAEMON_OPTS", "PARAMS", "EXTRA_FLAGS")
CONF_VARIABLES = ("CLAMAVMILTERCONF", "CLAMAVCONF", "CONFIG", "CONF_FILE")
_DISABLED = ("0", "no", "false")


class Platform:
    """Where one Linux family keeps its files."""

    def __init__(self, name, defaults_directory, rc_links, confs):
        self.name = name
        self.defaults_directory = defaults_directory  # /etc/default or /etc/sysconfig
        self.rc_links = rc_links  # glob patterns of rc S links, NAME in them
        self.confs = confs  # kind -> default configuration files


def detect(tree, platform, candidate):
    """(spec, source, enabled, description, settings) or None when not installed; may Skip."""
    unit = next((f"{directory}/{candidate.name}.service" for directory in UNIT_DIRECTORIES
                 if tree.exists(f"{directory}/{candidate.name}.service")
                 and not tree.points_to_null(f"{directory}/{candidate.name}.service")), None)
    if unit is not None:
        return _systemd(tree, platform, candidate, unit)
    script = tree.first_existing([f"/etc/init.d/{candidate.name}",
                                  f"/etc/rc.d/init.d/{candidate.name}"])
    if script is not None:
        return _init(tree, platform, candidate, script)
    return None


def _systemd(tree, platform, candidate, unit):
    name = candidate.name
    files = [unit]
    dropins = {}
    for directory in reversed(UNIT_DIRECTORIES):  # /etc's drop-in of a name wins
        for path in tree.glob(f"{directory}/{name}.service.d/*.conf"):
            dropins[path.rsplit("/", 1)[1]] = path
    files.extend(dropins[key] for key in sorted(dropins))
    description, exec_start, exec_file = None, None, unit
    environment, environment_files = [], []
    for path in files:
        for section, key, value in _unit_entries(tree.read(path)):
            if section == "Unit" and key == "Description":
                description = value or None
            elif section == "Service" and key == "ExecStart":
                exec_start, exec_file = (value or None), path
            elif section == "Service" and key == "Environment":
                environment.extend((word, path) for word in shell.words(value))
            elif section == "Service" and key == "EnvironmentFile":
                if value:
                    environment_files.append((value, path))
                else:
                    environment_files = []
    variables = shell.Variables()
    for word, path in environment:
        key, equals, value = word.partition("=")
        if equals:
            variables.set(key, value, path)
    for value, path in environment_files:
        optional = value.startswith("-")
        file = value.lstrip("-")
        if not tree.exists(file):
            if optional:
                continue
            raise Skip(file, f"missing (the EnvironmentFile of {path}); systemd cannot start "
                             f"{name}")
        shell.read(tree.read(file), variables, file, tree.test)
    arguments = _exec_words(exec_start)
    masked = any(tree.points_to_null(f"{directory}/{name}.service")
                 for directory in UNIT_DIRECTORIES[:2])
    enabled = not masked and bool(tree.glob(f"/etc/systemd/system/*.wants/{name}.service"))
    sockets = [_expanded(value, variables, exec_file)
               for value in shell.option_values(arguments, "-p")]
    if not sockets and candidate.kind not in apps.CONF_OPTIONS:
        sockets = _variable_sockets(variables, SOCKET_VARIABLES[:1])
    conf = _conf(candidate.kind, arguments, variables, exec_file)
    spec, source, conf_enabled, settings = _resolve(
        tree, platform, candidate, sockets, conf, unit)
    if conf_enabled is False:
        enabled = False
    return spec, source, enabled, description, settings


def _unit_entries(text):
    """(section, key, value) of a unit file, continuation lines joined."""
    section = None
    pending = ""
    for line in text.splitlines():
        line = pending + line.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, equals, value = line.partition("=")
        if equals:
            yield section, key.strip(), value.strip()


def _exec_words(exec_start):
    """ExecStart's words, its prefixes (-@:+!) left out; variables are left as written."""
    if not exec_start:
        return []
    return shell.words(exec_start.lstrip("-@:+!"))


def _expanded(value, variables, path):
    """(value with its variables expanded, the file the value came from)."""
    names = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", value)
    try:
        expanded = shell.expand(value, variables)
    except shell.Unknown as why:
        raise Skip(path, f"the socket {value!r} is set at run time ({why})") from None
    origin = next((variables.origins[name] for name in names if name in variables.origins),
                  path)
    return expanded, origin


def _variable_sockets(variables, names):
    """The socket of the first of names that is set, as [(socket, file)]."""
    for name in names:
        try:
            value = variables.get(name)
        except shell.Unknown as why:
            raise Skip(variables.origins[name], f"{name} is set at run time ({why})") from None
        if value:
            return [(value, variables.origins[name])]
    return []


def _conf(kind, arguments, variables, path):
    """(configuration file, where it is named) from the milter's options, or (None, None)."""
    if kind not in apps.CONF_OPTIONS:
        return None, None
    values = [_expanded(value, variables, path)
              for value in shell.option_values(arguments, *apps.CONF_OPTIONS[kind])]
    distinct = list(dict.fromkeys(value for value, _ in values))
    if len(distinct) > 1:
        raise Skip(values[-1][1], f"contradictory configuration files: {distinct[0]!r} and "
                                  f"{distinct[1]!r}")
    return values[0] if values else (None, None)


def _resolve(tree, platform, candidate, sockets, conf, main_path):
    if candidate.kind in ("clamav-milter", "rspamd"):
        sockets = []  # they take no socket on the command line
    path, named_by = conf
    return apps.resolve(tree, candidate.kind, sockets, conf=path,
                        default_confs=platform.confs.get(candidate.kind, ()),
                        named_by=named_by, fallback_path=main_path)


def _init(tree, platform, candidate, script):
    text = tree.read(script)
    variables = shell.Variables()
    shell.read(text, variables, script, tree.test)
    defaults = f"{platform.defaults_directory}/{candidate.name}"
    if tree.exists(defaults):
        shell.read(tree.read(defaults), variables, defaults, tree.test)
    enabled_value = variables.values.get("ENABLED", "1")
    enabled = enabled_value.strip().lower() not in _DISABLED and any(
        tree.glob(pattern.replace("NAME", candidate.name)) for pattern in platform.rc_links)
    sockets = _variable_sockets(variables, SOCKET_VARIABLES)
    arguments, conf = [], (None, None)
    for name in OPTION_VARIABLES:
        value = variables.values.get(name)
        if value:
            origin = variables.origins[name]
            words = shell.words(value)
            sockets.extend((socket, origin) for socket in shell.option_values(words, "-p"))
            arguments.extend(words)
            if candidate.kind in apps.CONF_OPTIONS and conf == (None, None):
                found = shell.option_values(words, *apps.CONF_OPTIONS[candidate.kind])
                if found:
                    conf = (found[0], origin)
    if candidate.kind in apps.CONF_OPTIONS and conf == (None, None):
        for name in CONF_VARIABLES:
            if variables.values.get(name):
                conf = (variables.values[name], variables.origins[name])
                break
    spec, source, conf_enabled, settings = _resolve(
        tree, platform, candidate, sockets, conf, script)
    if conf_enabled is False:
        enabled = False
    return spec, source, enabled, _init_description(text), settings


def _init_description(text):
    """The LSB Description (or Short-Description), else a chkconfig `# description:`."""
    lsb = re.search(r"^### BEGIN INIT INFO$(.*?)^### END INIT INFO$", text, re.M | re.S)
    if lsb:
        fields, last = {}, None
        for line in lsb.group(1).splitlines():
            match = re.match(r"#\s*([A-Za-z-]+):\s*(.*)", line)
            if match:
                last = match.group(1)
                fields[last] = match.group(2).strip()
            elif last and re.match(r"#(\t|\s{2,})", line):
                fields[last] += " " + line.lstrip("#").strip()
        description = fields.get("Description") or fields.get("Short-Description")
        if description:
            return description
    match = re.search(r"^# description:\s*(.*?)$((?:\n#\s+.*)*)", text, re.M)
    if match:
        parts = [match.group(1)] + [line.lstrip("#").strip()
                                    for line in match.group(2).splitlines() if line]
        return " ".join(part.rstrip("\\").strip() for part in parts if part.strip()) or None
    return None
