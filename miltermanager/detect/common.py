"""What every platform's detector shares: reading a milter's own file, checking a socket."""

from . import milters
from .report import Found, Skip
from .shell import find_option
from .specs import BadSpec, normalise


def own_file(tree, candidate, command=None, variables=None, origin=None, named=None):
    """The Own record of the candidate's own file, or None.

    The file is the one a command-line option names (candidate.file_options
    in command), else named (a path a service variable gives), else the
    first of candidate.files that exists. A file named explicitly that is
    missing skips the candidate: the milter could not start either.
    """
    if candidate.kind is None:
        return None
    option = None
    if command is not None and candidate.file_options:
        option = find_option(command, variables, candidate.file_options, origin)
    if option is not None or named is not None:
        path, by = option if option is not None else named
        if not tree.exists(path):
            raise Skip(path, f"missing, yet {by} names it as {candidate.name}'s configuration")
    else:
        path = next((path for path in candidate.files if tree.exists(path)), None)
        if path is None:
            return None
    if candidate.kind in ("opendkim", "opendmarc"):
        return milters.key_value_socket(tree, path, "Socket")
    return getattr(milters, candidate.kind)(tree, path)


def socket_option(candidate, command, variables, origin):
    """(spec, file) from the socket option (-p) on a command line, or None."""
    if not candidate.socket_options or not command:
        return None
    found = find_option(command, variables, candidate.socket_options, origin)
    if found is None:
        return None
    return checked(found[0], found[1], "-p"), found[1]


def checked(value, path, what):
    """value normalised; Skip naming path and what when it is no socket."""
    try:
        return normalise(value)
    except BadSpec as error:
        raise Skip(path, f"{what}: {error}") from None


def found(candidate, spec, source, enabled, description, own=None, note=None, name=None):
    """The Found record; an unconfigured clamav-milter is found disabled, as upstream."""
    if own is not None and own.unconfigured and enabled:
        enabled = False
        note = f"{own.path} still has its Example line: clamav-milter is not configured"
    return Found(name or candidate.name, spec, enabled, source, description,
                 list(candidate.conditions), tarpit=own.tarpit if own else None, note=note)
