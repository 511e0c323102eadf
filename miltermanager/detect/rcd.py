"""BSD rc.d scripts (FreeBSD's /usr/local/etc/rc.d, pkgsrc's rc.d) and rc.conf.

The script gives `name=`, `rcvar=` and its `: ${name_var:=default}`
defaults; /etc/rc.conf, /etc/rc.conf.local and rc.conf.d/NAME set
`NAME_VAR=` values. Enabled when the rcvar (`NAME_enable`) is YES.
The socket is `NAME_socket` (or _sockfile, _connection_spec), else `-p` in
`NAME_flags` or `command_args`, else the milter's own file. FreeBSD's
opendkim may run several instances, `NAME_profiles`: each is its own
milter, `SCRIPT-PROFILE`.
"""

import re

from . import apps, shell
from .base import Skip

_CONF_VARIABLES = ("cfgfile", "conf_file", "config")


def detect(tree, rc_d, rc_confs, confs, candidate):
    """[(name, spec, source, enabled, description, settings) or Skip] or None if not installed."""
    script = f"{rc_d}/{candidate.name}"
    if not tree.exists(script):
        return None
    text = tree.read(script)
    names = re.findall(r"^\s*name=[\"']?([A-Za-z0-9_]+)", text, re.M)
    if not names:
        raise Skip(script, "no name= line (not an rc.d script)")
    name = names[0]
    variables = shell.Variables()
    for path in [*rc_confs, *(f"{directory}/{name}" for directory in
                              ("/etc/rc.conf.d", "/usr/local/etc/rc.conf.d"))]:
        if tree.exists(path):
            shell.read(tree.read(path), variables, path, tree.test)
    defined = {key: (value, variables.origins[key]) for key, value in variables.values.items()}
    shell.read(text, variables, script, tree.test)
    # rc.conf is read before the script's defaults run; a plain assignment in
    # the script to a variable rc.conf sets does not override it.
    for key, (value, origin) in defined.items():
        if key.startswith(f"{name}_"):
            variables.set(key, value, origin)
    rcvar = variables.values.get("rcvar") or f"{name}_enable"
    profiles = shell.words(variables.values.get(f"{name}_profiles", ""))
    if profiles and candidate.kind == "opendkim":
        results = []
        for profile in profiles:
            try:
                results.append(_one(tree, confs, candidate, variables, name, script,
                                    f"{candidate.name}-{profile}", f"{name}_{profile}", rcvar))
            except Skip as skip:
                results.append((f"{candidate.name}-{profile}", skip))
        return results
    return [_one(tree, confs, candidate, variables, name, script, candidate.name, name, rcvar)]


def _one(tree, confs, candidate, variables, name, script, milter, prefix, rcvar):
    """One instance: prefix is NAME, or NAME_PROFILE for an opendkim profile."""
    def value(*keys):
        for key in keys:
            if variables.values.get(key):
                return variables.values[key], variables.origins[key]
            if key in variables.unknown:
                raise Skip(variables.origins[key],
                           f"{key} is set at run time ({variables.unknown[key]})")
        return None, None

    enable_keys = [f"{prefix}_enable", rcvar] if prefix != name else [rcvar]
    enable, _ = value(*enable_keys)
    enabled = bool(enable) and enable.strip().upper() == "YES"
    sockets = []
    for suffix in ("socket", "sockfile", "connection_spec"):
        keys = [f"{prefix}_{suffix}"] + ([f"{name}_{suffix}"] if prefix != name else [])
        socket = value(*keys)
        if socket[0]:
            sockets.append(socket)
            break
    arguments = []
    for key in (f"{prefix}_flags", f"{name}_flags", "command_args"):
        flags, origin = value(key)
        if flags:
            words = shell.words(flags)
            arguments.append((words, origin))
            if not sockets:
                sockets.extend((socket, origin) for socket in shell.option_values(words, "-p")
                               if "$" not in socket)
    conf = (None, None)
    if candidate.kind in apps.CONF_OPTIONS:
        keys = [f"{prefix}_{suffix}" for suffix in _CONF_VARIABLES]
        if prefix != name:
            keys += [f"{name}_{suffix}" for suffix in _CONF_VARIABLES]
        conf = value(*keys)
        if conf[0] is None:
            options = apps.CONF_OPTIONS[candidate.kind]
            extra = ("-C",) if candidate.kind == "opendkim" else ()
            for words, origin in arguments:
                found = shell.option_values(words, *options) or [
                    item for short in extra for item in shell.option_values(words, short)]
                if found and "$" not in found[0]:
                    conf = (found[0], origin)
                    break
    if candidate.kind in ("clamav-milter", "rspamd"):
        sockets = []
    spec, source, conf_enabled, settings = apps.resolve(
        tree, candidate.kind, sockets, conf=conf[0], default_confs=confs.get(candidate.kind, ()),
        named_by=conf[1], fallback_path=script)
    if conf_enabled is False:
        enabled = False
    return milter, spec, source, enabled, None, settings
