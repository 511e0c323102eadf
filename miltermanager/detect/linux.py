"""Debian and Red Hat: systemd units (with their EnvironmentFile), else init scripts.

A unit decides when there is one: it is what systemd starts, enabled by a
`*.wants/NAME.service` link, and its ExecStart is the command that runs, so
a socket given there (-p) wins over the milter's own file. Without a unit,
the init script and /etc/default/NAME (Debian) or /etc/sysconfig/NAME (Red
Hat) are read as upstream reads them.
"""

import re
from dataclasses import dataclass, field

from .common import checked, found, own_file, socket_option
from .report import Skip
from .shell import Variables, logical_lines, split

UNIT_DIRECTORIES = ("/etc/systemd/system", "/run/systemd/system", "/lib/systemd/system",
                    "/usr/lib/systemd/system")


@dataclass(frozen=True)
class Flavour:
    """What differs between Debian and Red Hat."""

    environment: str  # where an init script's variables are overridden
    sockets: tuple  # variables that hold the socket
    flags: tuple  # variables that hold the milter's command-line options
    files: dict = field(default_factory=dict)  # kind -> variables naming its own file


DEBIAN = Flavour("/etc/default", ("SOCKET", "SOCKFILE", "CONNECTION_SPEC"),
                 ("OPTARGS", "DAEMON_ARGS", "PARAMS", "OPTIONS", "DAEMON_OPTS"),
                 {"clamav": ("CLAMAVCONF", "CLAMAVMILTERCONF")})
REDHAT = Flavour("/etc/sysconfig", ("SOCKET", "SOCKET_ADDRESS", "MILTER_SOCKET",
                                    "CONNECTION_SPEC"),
                 ("OPTIONS", "CLAMAV_FLAGS", "EXTRA_FLAGS"),
                 {"opendkim": ("CONFIG",), "opendmarc": ("CONFIG",), "enma": ("CONF_FILE",)})


def detect(tree, candidate, flavour):
    """A Found for candidate, or None when neither a unit nor an init script is installed."""
    unit = read_unit(tree, candidate.name)
    if unit is not None:
        return _from_unit(tree, candidate, flavour, unit)
    script = f"/etc/init.d/{candidate.name}"
    if tree.isfile(script):
        return _from_init(tree, candidate, flavour, script)
    return None


@dataclass
class Unit:
    path: str
    description: str | None = None
    command: str | None = None  # ExecStart as written, its prefixes removed
    command_origin: str | None = None
    environment: list = field(default_factory=list)  # (assignments, file)
    environment_files: list = field(default_factory=list)  # (path, optional, file naming it)
    masked: bool = False


def read_unit(tree, name):
    """NAME.service with its drop-ins, or None when no unit file exists."""
    service = f"{name}.service"
    unit = None
    for directory in UNIT_DIRECTORIES:
        path = f"{directory}/{service}"
        if not tree.lexists(path):
            continue
        target = tree.link_target(path)
        if target == "/dev/null":
            unit = Unit(path, masked=True)
            continue
        if target is not None and target.startswith("/"):
            path = target
        if unit is None:
            unit = Unit(path)
        elif unit.masked and unit.command is None:
            unit.path = path
        _read_unit_file(tree, unit, path)
        break
    if unit is None:
        return None
    dropins = {}
    for directory in reversed(UNIT_DIRECTORIES):
        for path in tree.glob(f"{directory}/{service}.d/*.conf"):
            dropins[path.rsplit("/", 1)[1]] = path
    for name_ in sorted(dropins):
        _read_unit_file(tree, unit, dropins[name_])
    return unit


def _read_unit_file(tree, unit, path):
    section = None
    for line in logical_lines(tree.read(path)):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, equals, value = line.partition("=")
        if not equals:
            continue
        key, value = key.strip(), value.strip()
        if section == "Unit" and key == "Description":
            unit.description = value or None
        elif section != "Service":
            continue
        elif key == "ExecStart":
            if not value:
                unit.command, unit.command_origin = None, path  # a drop-in's reset
            elif unit.command is None:
                unit.command, unit.command_origin = value.lstrip("-@:+!"), path
        elif key == "Environment":
            if value:
                unit.environment.append((value, path))
            else:
                unit.environment.clear()
        elif key == "EnvironmentFile":
            if not value:
                unit.environment_files.clear()
            else:
                optional = value.startswith("-")
                unit.environment_files.append((value.lstrip("-"), optional, path))


def _unit_variables(tree, unit):
    variables = Variables()
    for assignments, path in unit.environment:
        for word in split(assignments):
            name, equals, value = word.partition("=")
            if equals and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                variables.set(name, value, path)
    for path, optional, named_by in unit.environment_files:
        if not tree.exists(path):
            if optional:
                continue
            raise Skip(path, f"missing, and {named_by} needs it (EnvironmentFile= without "
                             f"'-'): the service cannot start")
        variables.read_assignments(tree.read(path), path)
    return variables


def _from_unit(tree, candidate, flavour, unit):
    if unit.masked and unit.command is None:
        return None  # masked and nothing else installed: nothing to find
    variables = _unit_variables(tree, unit)
    command, origin = unit.command, unit.command_origin
    own = None
    option = socket_option(candidate, command, variables, origin)
    if option is not None:
        spec, source = option
    else:
        own = own_file(tree, candidate, command, variables, origin)
        spec, source = (own.spec, own.path) if own else _variable_socket(
            variables, flavour, candidate, unit.path)
    if spec is None:
        raise Skip(unit.path, _no_socket(candidate, flavour, "ExecStart"))
    wants = tree.glob(f"/etc/systemd/system/*.wants/{candidate.name}.service")
    if unit.masked:
        enabled, note = False, f"masked ({UNIT_DIRECTORIES[0]}/{candidate.name}.service "\
                               f"points to /dev/null)"
    elif wants:
        enabled, note = True, None
    else:
        enabled, note = False, (f"not enabled: no /etc/systemd/system/*.wants/"
                                f"{candidate.name}.service link (systemctl enable)")
    return found(candidate, spec, source, enabled, unit.description, own, note)


def _variable_socket(variables, flavour, candidate, path):
    """(spec, file) from the first socket variable set, or (None, None)."""
    for name in flavour.sockets:
        value = variables.get(name)
        if value:
            where = variables.origin(name) or path
            return checked(value, where, name), where
    return None, None


def _no_socket(candidate, flavour, where):
    tried = [f"{' or '.join(candidate.socket_options)} in {where}"] if candidate.socket_options \
        else []
    if candidate.files:
        tried.append(f"a socket in {' or '.join(candidate.files)}")
    tried.append(f"the variables {', '.join(flavour.sockets)}")
    return f"no socket found (looked for {'; '.join(tried)})"


def _from_init(tree, candidate, flavour, script):
    text = tree.read(script)
    variables = Variables()
    variables.read_assignments(text, script, tree=tree)
    environment = f"{flavour.environment}/{candidate.name}"
    if tree.exists(environment):
        variables.read_assignments(tree.read(environment), environment, tree=tree)
    flags = " ".join(f"${name}" for name in flavour.flags if name in variables)
    named = None
    for name in flavour.files.get(candidate.kind, ()):
        if variables.get(name):
            named = (variables.get(name), f"{name} in {variables.origin(name)}")
            break
    own = own_file(tree, candidate, flags, variables, script, named)
    if own is not None:
        spec, source = own.spec, own.path
    else:
        spec, source = _variable_socket(variables, flavour, candidate, script)
        if spec is None:
            option = socket_option(candidate, flags, variables, script)
            if option is not None:
                spec, source = option
    if spec is None:
        raise Skip(script, _no_socket(candidate, flavour, " ".join(flavour.flags)))
    enabled, note = _init_enabled(tree, candidate.name, variables, flavour)
    return found(candidate, spec, source, enabled, _init_description(text), own, note)


def _init_enabled(tree, name, variables, flavour):
    value = variables.get("ENABLED")
    if value is not None and value.strip().lower() in ("0", "no", "false"):
        return False, f"ENABLED={value} in {variables.origin('ENABLED')}"
    runlevels = "0123456" if flavour is REDHAT else "2345"
    links = [*tree.glob(f"/etc/rc[{runlevels}].d/[SK][0-9][0-9]{name}"),
             *tree.glob(f"/etc/rc.d/rc[{runlevels}].d/[SK][0-9][0-9]{name}")]
    starts = [link for link in links if link.rsplit("/", 1)[1].startswith("S")]
    if starts:
        return True, None
    if links or flavour is REDHAT:
        return False, (f"not enabled: no /etc/rc[{runlevels}].d/S??{name} link "
                       f"(update-rc.d or chkconfig)")
    return True, None


def _init_description(text):
    """The LSB Description (or Short-Description), else chkconfig's `# description:`."""
    fields, current = {}, None
    for line in text.splitlines():
        match = re.match(r"#\s*([A-Za-z-]+):\s*(.*?)\s*\\?$", line)
        if match and not line.startswith("#  ") and not line.startswith("#\t"):
            current = match.group(1).lower()
            fields.setdefault(current, match.group(2))
        elif current and re.match(r"#(\s{2,}|\t)\S", line):
            fields[current] += " " + line[1:].strip().rstrip("\\").strip()
        else:
            current = None
    description = fields.get("description") or fields.get("short-description")
    return description.strip() or None if description else None
