"""Whether a found milter's socket takes connections now (for milter-manager-detect).

Under a root other than / (another machine's tree, a container's), a UNIX
socket is looked for under that root, its links followed inside it; an inet
socket is not checked, because connecting from here would test this host's
port, not that tree's milter: reachable stays None, and reach_error says so.
"""

import os
import socket

from .report import Skip
from .shell import Tree

NOT_THIS_HOST = "not checked: an inet socket of the tree under {root}, not of this host"


def check_reachable(report, timeout=1.0):
    """Fill reachable (and reach_error) of each found milter, under report.root."""
    for found in report.found:
        error = connect_error(found.connection_spec, timeout, report.root)
        found.reachable = None if error and error.startswith("not checked") else error is None
        found.reach_error = error
    return report


def connect_error(spec, timeout=1.0, root="/"):
    """None if a connection to spec (our syntax) under root succeeds, else why it did not."""
    from miltermanager import connection_spec

    try:
        parsed = connection_spec.parse(spec)
    except ValueError as error:
        return str(error)
    local = os.path.abspath(root) == "/"
    if parsed.is_unix:
        try:
            family, address = socket.AF_UNIX, Tree(root).real(parsed.path)
        except Skip as skipped:
            return skipped.reason
    elif not local:
        return NOT_THIS_HOST.format(root=os.path.abspath(root))
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
