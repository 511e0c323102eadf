"""Whether a found milter's socket takes connections now (for milter-manager-detect)."""

import socket


def check_reachable(report, timeout=1.0):
    """Fill reachable (and reach_error) of each found milter by connecting to its socket."""
    for found in report.found:
        error = connect_error(found.connection_spec, timeout)
        found.reachable = error is None
        found.reach_error = error
    return report


def connect_error(spec, timeout=1.0):
    """None if a connection to spec (our syntax) succeeds, else why it did not."""
    from miltermanager import connection_spec

    try:
        parsed = connection_spec.parse(spec)
    except ValueError as error:
        return str(error)
    if parsed.is_unix:
        family, address = socket.AF_UNIX, parsed.path
    else:
        family = socket.AF_INET6 if parsed.family == "inet6" else socket.AF_INET
        address = (parsed.host, parsed.port)
    try:
        if family != socket.AF_UNIX:
            # A host name is resolved here, as the manager would.
            with socket.create_connection(address, timeout=timeout):
                return None
        with socket.socket(family, socket.SOCK_STREAM) as connection:
            connection.settimeout(timeout)
            connection.connect(address)
        return None
    except OSError as error:
        return error.strerror or str(error) or type(error).__name__
