"""What a recipient's entries say about each child, and what a message's recipients say together.

A recipient's entries are ranked (0: the most specific, `user+ext@domain`;
the configuration's defaults come last). Each attribute is taken from the
most specific entry that has it, as iRedMail and Zimbra inherit settings:
a user's `milterManagerBypass` replaces its domain's. A child named by
several of the attributes in effect gets the state of the most specific
one; named at the same rank, evaluate wins over apply and apply over
bypass (the safer reading of a contradiction). amavisd-new's attributes
count at the rank of their entry: `amavisBypassSpamChecks: TRUE` bypasses
`ldap.spam_milters`, `amavisBypassVirusChecks: TRUE` `ldap.virus_milters`,
`amavisSpamLover: TRUE` makes the spam milters evaluate only; FALSE hides a
less specific TRUE. A child nothing names runs.

For a message (see session.PolicySession), a child runs if any
recipient's state is RUN or EVALUATE, is bypassed only if every
recipient's state is BYPASS, and evaluates only if every recipient it
runs for says EVALUATE.
"""

import enum
from dataclasses import dataclass, field


class State(enum.Enum):
    """What a recipient's policy says of one child."""

    RUN = "apply"
    EVALUATE = "evaluate"
    BYPASS = "bypass"


# At the same rank: evaluate wins over apply, apply over bypass.
_PRECEDENCE = {State.EVALUATE: 0, State.RUN: 1, State.BYPASS: 2}
DEFAULT_RANK = 1 << 30  # below every entry


@dataclass(frozen=True)
class Attributes:
    """The attribute names read from an entry (lower-cased when compared)."""

    apply: str = "milterManagerApply"
    bypass: str = "milterManagerBypass"
    evaluate: str = "milterManagerEvaluate"
    bypass_spam: str = "amavisBypassSpamChecks"
    bypass_virus: str = "amavisBypassVirusChecks"
    spam_lover: str = "amavisSpamLover"

    def names(self):
        return [self.apply, self.bypass, self.evaluate, self.bypass_spam, self.bypass_virus,
                self.spam_lover]


@dataclass(frozen=True)
class Entry:
    """One entry a search found: its DN, its rank, its attributes (lower-cased names -> values)."""

    dn: str
    rank: int
    attributes: dict = field(compare=False)


@dataclass(frozen=True)
class RecipientPolicy:
    """A recipient's policy: child name -> State for the children named (others run).

    entries: the DNs it came from, most specific first (empty: the
    configuration's defaults alone). fallback: it is the defaults because
    LDAP could not be asked (ldap.on_error = "default-policy"); stale: an
    expired cached policy served because LDAP could not be asked.
    """

    states: dict
    entries: tuple = ()
    fallback: bool = False
    stale: bool = False

    def state(self, name):
        return self.states.get(name, State.RUN)

    def key(self, names):
        """The states of the children names, to compare two recipients' policies."""
        return tuple(self.state(name) for name in names)

    def describe(self):
        """"apply a, b; bypass c" for the log; "run everything" when nothing is named."""
        parts = []
        for state in State:
            named = [name for name, each in self.states.items() if each is state]
            if named:
                parts.append(f"{state.value} {', '.join(named)}")
        return "; ".join(parts) or "run everything"


@dataclass(frozen=True)
class Defaults:
    """The configuration's default policy and the amavis groups."""

    apply: tuple = ()
    bypass: tuple = ()
    evaluate: tuple = ()
    spam_milters: tuple = ()
    virus_milters: tuple = ()


def _true(values):
    return bool(values) and values[0].strip().upper() == "TRUE"


def resolve(entries, attributes, defaults):
    """The RecipientPolicy of a recipient's ranked entries (any order) and the defaults."""
    entries = sorted(entries, key=lambda entry: (entry.rank, entry.dn))
    effective = {}  # attribute name -> (rank, values), the most specific entry's
    for entry in entries:
        for name in attributes.names():
            key = name.lower()
            if key not in effective and entry.attributes.get(key):
                effective[key] = (entry.rank, list(entry.attributes[key]))
    claims = {}  # child -> (rank, precedence, state)

    def claim(names, rank, state):
        for name in names:
            name = name.strip()
            if not name:
                continue
            candidate = (rank, _PRECEDENCE[state], state)
            if name not in claims or candidate < claims[name]:
                claims[name] = candidate

    for name, state, default in ((attributes.apply, State.RUN, defaults.apply),
                                 (attributes.evaluate, State.EVALUATE, defaults.evaluate),
                                 (attributes.bypass, State.BYPASS, defaults.bypass)):
        found = effective.get(name.lower())
        if found is not None:
            claim(found[1], found[0], state)
        else:
            claim(default, DEFAULT_RANK, state)
    for name, state, group in ((attributes.bypass_spam, State.BYPASS, defaults.spam_milters),
                               (attributes.bypass_virus, State.BYPASS, defaults.virus_milters),
                               (attributes.spam_lover, State.EVALUATE, defaults.spam_milters)):
        found = effective.get(name.lower())
        if found is not None and _true(found[1]):
            claim(group, found[0], state)
    states = {name: state for name, (_, _, state) in claims.items()}
    return RecipientPolicy(states, tuple(entry.dn for entry in entries))


def default_policy(attributes, defaults, fallback=False):
    """The policy of a recipient no entry speaks for."""
    policy = resolve((), attributes, defaults)
    return RecipientPolicy(policy.states, (), fallback=fallback)
