"""What detection reports, and the tree (a root directory) it reads files from."""

import glob
import os
from dataclasses import dataclass, field


@dataclass
class Found:
    """An installed milter: where it listens, whether its service is enabled, and from where.

    source is the file the connection spec came from, as the path on the real
    system (the tree's root left out). settings are further milter settings
    detection implies (milter-greylist's tarpit lengthens its timeouts).
    """

    name: str
    connection_spec: str
    enabled: bool
    source: str
    description: str | None
    applicable_conditions: list
    reachable: bool | None = None
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Skipped:
    """A candidate whose files are there but missing a piece, odd or contradictory."""

    name: str
    path: str
    reason: str


@dataclass(frozen=True)
class Direct:
    """A milter the MTA talks to itself (Postfix's setting lists it), not through the manager.

    connection_spec is None when spec cannot be turned into ours (reason says why).
    """

    setting: str
    spec: str
    connection_spec: str | None
    reason: str | None = None


@dataclass
class Report:
    """The result of one detection, candidates in the platform's order."""

    platform: str
    root: str
    found: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    direct: list = field(default_factory=list)


class Skip(Exception):
    """Raised inside a detector: the candidate is skipped, path says which file and why."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class Tree:
    """Files under root, named by the paths they have on the system being detected."""

    def __init__(self, root="/"):
        self.root = os.path.abspath(root)

    def real(self, path):
        """Where path (absolute on the detected system) is on this machine."""
        return os.path.join(self.root, path.lstrip("/"))

    def exists(self, path):
        return os.path.lexists(self.real(path))

    def is_file(self, path):
        return os.path.isfile(self.real(path))

    def test(self, path, flag):
        """sh's `[ -FLAG path ]` for the flags x, e, f, d, r, s."""
        real = self.real(path)
        if flag == "x":
            return os.path.isfile(real) and os.access(real, os.X_OK)
        if flag == "d":
            return os.path.isdir(real)
        if flag == "f":
            return os.path.isfile(real)
        if flag == "r":
            return os.access(real, os.R_OK)
        if flag == "s":
            return os.path.isfile(real) and os.path.getsize(real) > 0
        return os.path.exists(real)

    def read(self, path):
        """The text of path; raise Skip if it is missing, not a file or unreadable."""
        real = self.real(path)
        if os.path.isdir(real):
            raise Skip(path, "is a directory, not a file")
        try:
            with open(real, "rb") as file:
                data = file.read(1 << 20)
        except FileNotFoundError:
            raise Skip(path, "missing") from None
        except OSError as error:
            raise Skip(path, f"cannot read: {error.strerror or error}") from None
        return data.decode("utf-8", "replace")

    def first_existing(self, paths):
        """The first of paths that exists, else None."""
        return next((path for path in paths if self.exists(path)), None)

    def glob(self, pattern):
        """Paths (as on the detected system) matching pattern, sorted."""
        prefix = len(self.root.rstrip("/"))
        return sorted(match[prefix:] or "/" for match in glob.glob(self.real(pattern)))

    def points_to_null(self, path):
        """Whether path is a symbolic link to /dev/null (a masked systemd unit)."""
        try:
            return os.readlink(self.real(path)) == "/dev/null"
        except OSError:
            return False
