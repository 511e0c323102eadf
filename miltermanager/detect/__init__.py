"""Finding the milters installed on this system, as upstream's platform defaults did.

    from miltermanager import detect
    report = detect.detect(platform="debian", root="/", options=None)
    report.found    # [Found(name, connection_spec, enabled, source, description,
                    #        applicable_conditions, reachable=None, ...)], candidate order
    report.skipped  # [Skipped(name, path, reason)]: installed, but files missing or odd
    report.direct   # [Direct(parameter, written, spec, reason)]: Postfix's own milter lists
    detect.check_reachable(report, timeout=1.0)   # fills Found.reachable, under report.root

Nothing here raises for what it reads: a candidate whose files are broken
is skipped with the file and the reason. Detection never sets a command to
start a milter: the milters' own services start them.
"""

from . import candidates as _candidates
from . import linux, postfix, rc
from .reach import check_reachable, connect_error
from .report import Direct, Found, Report, Skip, Skipped
from .shell import Tree

PLATFORMS = _candidates.PLATFORMS


def candidates(platform, options=None):
    """The Candidate records platform looks for, in order (options: package.options)."""
    options = options or {}
    if platform == "debian":
        return _candidates.DEBIAN
    if platform == "redhat" or platform.startswith("redhat"):
        return _candidates.REDHAT
    if platform == "freebsd":
        return _candidates.FREEBSD
    if platform == "pkgsrc":
        return _candidates.pkgsrc(options.get("prefix") or "/usr/pkg/etc")
    raise ValueError(f"no milter detection for platform {platform!r}; "
                     f"known: {', '.join(PLATFORMS)}")


def detect(platform="debian", root="/", options=None, postconf=None):
    """Look for platform's candidates under root; return a Report.

    options is package.options as a dict (pkgsrc: prefix, rcddir). postconf
    is the command asking Postfix for its milters: by default `postconf`
    when root is "/", none under another root; False never asks.
    """
    options = options or {}
    tree = Tree(root)
    report = Report(platform, tree.root)
    for candidate in candidates(platform, options):
        try:
            report.found.extend(_detect_one(tree, candidate, platform, options))
        except Skip as skip:
            report.skipped.append(Skipped(candidate.name, skip.path, skip.reason))
        except Exception as error:  # a file odder than the readers foresaw: still one line
            report.skipped.append(Skipped(candidate.name, tree.root, (
                f"its files could not be read: {type(error).__name__}: {error}")))
    if postconf is None and tree.root == "/":
        postconf = "postconf"
    if postconf:
        report.direct = postfix.direct(postconf)
    return report


def _detect_one(tree, candidate, platform, options):
    if platform == "freebsd":
        return rc.detect(tree, candidate, platform, "/usr/local/etc/rc.d")
    if platform == "pkgsrc":
        prefix = options.get("prefix") or "/usr/pkg/etc"
        return rc.detect(tree, candidate, platform, options.get("rcddir") or f"{prefix}/rc.d")
    flavour = linux.DEBIAN if platform == "debian" else linux.REDHAT
    result = linux.detect(tree, candidate, flavour)
    return [] if result is None else [result]


__all__ = ["Direct", "Found", "PLATFORMS", "Report", "Skipped", "candidates",
           "check_reachable", "connect_error", "detect"]
