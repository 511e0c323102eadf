"""The children's last option-negotiation replies, to answer the MTA's next negotiation at once.

Connecting to a child and negotiating with it is a round trip the MTA would
wait for at the start of every SMTP connection. A child answers the same offer
the same way until it is restarted with other settings, so once every child of
a session has answered an offer, the next session with the same offer answers
the MTA at once from those replies while its children connect and negotiate,
and the MTA's first command waits for them (ManagerSession.negotiate). A child
whose reply then differs from the one remembered takes part as long as what
the MTA was answered gives it all it asks for (merge.negotiation_covers), and
otherwise sits that session out with its fallback_status; either way its new
reply is the one remembered. A session in which some child did not start
forgets the offer, so the next one negotiates before it answers, as the first
does.
"""

# Distinct offers remembered at most: an MTA makes one, a few MTAs a few; a peer sending
# ever new ones must not grow the memory.
MAX_OFFERS = 16


def _key(offer):
    return offer.version, offer.actions, offer.protocol


class NegotiationMemory:
    """The children's replies by MTA offer, for the configuration they were given under."""

    def __init__(self):
        self._configuration = None
        # (version, actions, protocol): (child names, their replies, the MTA's answer from them)
        self._remembered = {}

    def _for(self, configuration):
        # A reload brings new children (or the same names elsewhere): start afresh.
        if configuration is not self._configuration:
            self._configuration, self._remembered = configuration, {}
        return self._remembered

    def recall(self, configuration, offer, names):
        """(replies, answer) remembered for offer from children named names (a tuple), or None."""
        entry = self._for(configuration).get(_key(offer))
        if entry is None or entry[0] != names:
            return None
        return entry[1], entry[2]

    def remember(self, configuration, offer, names, replies, answer):
        """What the children named names answered offer, in order, and the MTA's answer from it."""
        remembered = self._for(configuration)
        remembered.pop(_key(offer), None)
        if len(remembered) >= MAX_OFFERS:
            del remembered[next(iter(remembered))]  # the offer remembered longest ago
        remembered[_key(offer)] = (names, replies, answer)

    def forget(self, configuration, offer):
        """Forget offer: the next session negotiates with the children before it answers it."""
        self._for(configuration).pop(_key(offer), None)
