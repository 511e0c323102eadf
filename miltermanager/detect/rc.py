"""FreeBSD and pkgsrc: rc.d scripts and the rc.conf files that enable and configure them.

The script gives `name=`, its defaults (`: ${name_socket:="..."}`) and
command_args; /etc/rc.conf, /etc/rc.conf.local and /etc/rc.conf.d/NAME set
`NAME_VAR=value`. Enabled is the rcvar set to YES (FreeBSD's
`NAME_enable`, pkgsrc's `NAME`). FreeBSD's milter-opendkim may run several
profiles (`NAME_profiles="a b"`): each is its own milter,
milter-opendkim-PROFILE, whose `NAME_PROFILE_VAR` falls back to `NAME_VAR`.
"""

import re

from .common import checked, found, own_file, socket_option
from .report import Skip
from .shell import ASSIGNMENT, Variables, logical_lines, running_lines, shell_word

_YES = ("yes", "true", "on", "1")


def detect(tree, candidate, platform, rc_d):
    """Found records for candidate (several with profiles), [] when no script is installed."""
    script = f"{rc_d}/{candidate.name}"
    if not tree.isfile(script):
        return []
    text = tree.read(script)
    variables = Variables()
    name = _script_name(text, variables, script)
    if not name:
        raise Skip(script, "no name= line: the rc.d script's variables cannot be known")
    rcvar, defaults, command_args = _read_script(tree, text, name, variables, script, platform)
    conf_files = ["/etc/rc.conf", "/etc/rc.conf.local", f"/etc/rc.conf.d/{name}",
                  f"/usr/local/etc/rc.conf.d/{name}"] if platform == "freebsd" else \
        ["/etc/rc.conf", f"/etc/rc.conf.d/{name}"]
    for path in conf_files:
        if tree.isfile(path):
            variables.read_assignments(tree.read(path), path, tree=tree)
    for variable, value in defaults:
        if not variables.get(variable):
            variables.set(variable, variables.expand(value), script)
    rcvar = variables.expand(rcvar)
    profiles = variables.get(f"{name}_profiles", "").split() if platform == "freebsd" else []
    if not profiles:
        return [_one(tree, candidate, name, rcvar, variables, command_args, script,
                     candidate.name)]
    results = []
    for profile in profiles:
        # As the script does for a profile: NAME_PROFILE_VAR, where set, becomes NAME_VAR.
        own = Variables()
        own.values, own.origins = dict(variables.values), dict(variables.origins)
        prefix = f"{name}_{profile}_"
        for variable in list(variables.values):
            if variable.startswith(prefix):
                own.set(f"{name}_{variable[len(prefix):]}", variables.get(variable),
                        variables.origin(variable))
        results.append(_one(tree, candidate, name, rcvar, own, command_args, script,
                            f"{candidate.name}-{profile}"))
    return results


def _script_name(text, variables, script):
    for line in logical_lines(text):
        match = ASSIGNMENT.fullmatch(line)
        if match and match.group(1) == "name":
            return variables.expand(shell_word(match.group(2)))
    return None


def _read_script(tree, text, name, variables, script, platform):
    """(rcvar as written, [(variable, default)], command_args as written)."""
    rcvar = f"{name}_enable" if platform == "freebsd" else name
    defaults, command_args = [], None
    before_load = True
    pattern = re.compile(r"\$\{(" + re.escape(name) + r"_\w+?)(?::?[-=])((?:[^{}]|\{[^{}]*\})*)\}")
    for line in running_lines(text, tree, variables):
        if re.match(r"\s*load_rc_config\b", line):
            before_load = False
        for variable, value in pattern.findall(line):
            defaults.append((variable, shell_word(value)))
        match = ASSIGNMENT.fullmatch(line)
        if match is None:
            continue
        variable, value = match.groups()
        if variable == "rcvar":
            value = shell_word(value)
            rcvar = f"{name}_enable" if "set_rcvar" in value else value
        elif variable == "command_args":
            command_args = shell_word(value)
        elif not variable.startswith(f"{name}_") or before_load:
            variables.set(variable, variables.expand(shell_word(value)), script)
    return rcvar, defaults, command_args


def _one(tree, candidate, prefix, rcvar, variables, command_args, script, milter):
    """The Found of one service (prefix: its rc.conf name), or Skip."""

    def get(suffix):
        return variables.get(f"{prefix}_{suffix}")

    flags_name = f"{prefix}_flags"
    command = " ".join(part for part in (f"${{{flags_name}}}" if get("flags") else None,
                                         command_args) if part)
    named = None
    for suffix in ("cfgfile", "conf_file"):
        if get(suffix):
            named = (get(suffix), f"{prefix}_{suffix} in {variables.origin(prefix + '_' + suffix)}")
            break
    own = own_file(tree, candidate, command, variables, script, named)
    if own is not None:
        spec, source = own.spec, own.path
    else:
        spec = source = None
        for suffix in ("socket", "sockfile", "connection_spec", "socketspec"):
            if get(suffix):
                source = variables.origin(f"{prefix}_{suffix}") or script
                spec = checked(get(suffix), source, f"{prefix}_{suffix}")
                break
        else:
            option = socket_option(candidate, command, variables, script)
            if option is not None:
                spec, source = option
    if spec is None:
        raise Skip(script, f"no socket found (looked for {prefix}_socket, {prefix}_sockfile, "
                           f"{prefix}_connection_spec, -p in {prefix}_flags and command_args"
                           + (f", a socket in {' or '.join(candidate.files)}"
                              if candidate.files else "") + ")")
    value = variables.get(rcvar, "NO")
    enabled = value.strip().lower() in _YES
    note = None if enabled else (
        f"not enabled: {rcvar}={value!r}" + (f" in {variables.origin(rcvar)}"
                                             if variables.origin(rcvar) else " (the default)"))
    return found(candidate, spec, source, enabled, None, own, note, name=milter)
