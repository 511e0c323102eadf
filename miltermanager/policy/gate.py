"""One MTA connection's recipients through their policies, before the children hear of them.

At each RCPT the gate starts the recipient's lookup; the children that
list the LDAP Policy condition wait for it (their stoppers read current()),
the others are asked at once. The manager itself answers a recipient whose
policy cannot be known with a temporary failure (ldap.on_error), and, with
ldap.split_recipients, one whose policy differs from the first accepted
recipient's with 452 4.5.3 (RFC 5321 §4.5.3.1.10: the sender delivers it
in a following transaction, so each transaction has one policy).
"""

from twisted.internet import defer
from twisted.logger import Logger

from ..merge import Status
from .keys import bare
from .lookup import Unavailable
from .rules import State

UNAVAILABLE_REPLY = b"451 4.4.3 Recipient policy directory unavailable, try again later"
SPLIT_REPLY = b"452 4.5.3 Too many recipients"


class Decision:
    """A recipient's policy as this transaction takes it.

    policy: its RecipientPolicy (None when it could not be known). refusal:
    the manager's own reply (Status, reply text) for it, or None.
    """

    __slots__ = ("recipient", "policy", "refusal")

    def __init__(self, recipient, policy, refusal=None):
        self.recipient = recipient
        self.policy = policy
        self.refusal = refusal

    def __repr__(self):
        return f"<Decision {self.recipient} {self.refusal or self.policy}>"


class PolicyGate:
    """The recipients of one MTA connection's transactions and their decisions.

    lookup: a PolicyLookup. governed: the names of the children that list
    the condition, whose states two policies are compared on. split:
    ldap.split_recipients.
    """

    log = Logger()

    def __init__(self, lookup, governed, split):
        self.lookup = lookup
        self.governed = tuple(governed)
        self.split = split
        self.new_transaction()

    def new_transaction(self):
        """MAIL or an abort: no recipient yet."""
        self.decisions = {}  # recipient -> Decision
        self._current = None  # the RCPT being asked: a Decision, or a list of waiters
        self._first = None  # the first accepted recipient's Decision

    def rcpt(self, recipient):
        """Decide recipient: a Decision, or a Deferred firing with one (never failing)."""
        found = self.lookup.lookup(recipient)
        if not isinstance(found, defer.Deferred):
            return self._decided(found, recipient)
        waiting = self._current = []
        return found.addCallback(self._decided, recipient, waiting)

    def _decided(self, found, recipient, waiting=None):
        if isinstance(found, Unavailable):
            decision = Decision(recipient, None, (Status.TEMPORARY_FAILURE, UNAVAILABLE_REPLY))
        else:
            decision = Decision(recipient, found)
            first = self._first
            if (self.split and first is not None
                    and found.key(self.governed) != first.policy.key(self.governed)):
                decision.refusal = (Status.TEMPORARY_FAILURE, SPLIT_REPLY)
                self.log.info("[ldap][split] {recipient}: deferred to another transaction: "
                              "{policy} differs from {first}'s {first_policy}",
                              recipient=bare(recipient), policy=found.describe(),
                              first=bare(first.recipient), first_policy=first.policy.describe())
        if waiting is None or waiting is self._current:
            self._current = decision
        self.decisions[recipient] = decision
        for d in waiting or ():
            d.callback(decision)
        return decision

    def accepted(self, decision):
        """The MTA accepted decision's recipient (the children let it through)."""
        if self._first is None and decision.refusal is None:
            self._first = decision

    # ------------------------------------------------------------ for the stoppers

    def current(self):
        """The Decision of the RCPT being asked, or a Deferred firing with it."""
        current = self._current
        if isinstance(current, list):
            d = defer.Deferred()
            current.append(d)
            return d
        return current

    def state(self, recipient, name):
        """The State recipient's policy gives child name (RUN when it was never decided)."""
        decision = self.decisions.get(recipient)
        if decision is None or decision.policy is None:
            return State.RUN
        return decision.policy.state(name)
