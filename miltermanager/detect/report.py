"""What detection tells: the milters found, the candidates skipped and why, the MTA's own list."""

import dataclasses
from dataclasses import dataclass, field


@dataclass
class Found:
    """An installed milter: where it listens and whether its service is enabled.

    connection_spec is in milter-manager's syntax ("unix:/path",
    "inet:PORT@[ADDRESS]", "inet:PORT@host", "inet6:..."); source is the file
    it came from, as a path on the real system (not under a test's root).
    reachable is None until check_reachable ran, then True or False with
    reach_error saying why not. tarpit is milter-greylist's longest tarpit
    in seconds (added to its reading and writing timeouts), note says why a
    found milter is disabled.
    """

    name: str
    connection_spec: str
    enabled: bool
    source: str
    description: str | None = None
    applicable_conditions: list = field(default_factory=list)
    reachable: bool | None = None
    tarpit: int | None = None
    note: str | None = None
    reach_error: str | None = None


@dataclass(frozen=True)
class Skipped:
    """A candidate whose files are there but missing a part, odd or contradictory."""

    name: str
    path: str
    reason: str

    def __str__(self):
        return f"{self.name}: {self.path}: {self.reason}"


@dataclass(frozen=True)
class Direct:
    """One milter the MTA lists itself (Postfix smtpd_milters / non_smtpd_milters).

    written is the entry as Postfix has it; spec the same in milter-manager's
    syntax, or None with reason when it cannot be read as a socket.
    """

    parameter: str
    written: str
    spec: str | None
    reason: str | None = None


@dataclass
class Report:
    """The result of one detection run."""

    platform: str
    root: str
    found: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    direct: list = field(default_factory=list)

    def as_dict(self):
        """The report as plain JSON-ready values."""
        return dataclasses.asdict(self)


class Skip(Exception):
    """Raised by a detector: this candidate is skipped; path is the file at fault."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
