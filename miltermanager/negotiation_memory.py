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
        self._replies = {}  # (version, actions, protocol): {child name: Negotiate}

    def _for(self, configuration):
        # A reload brings new children (or the same names elsewhere): start afresh.
        if configuration is not self._configuration:
            self._configuration, self._replies = configuration, {}
        return self._replies

    def recall(self, configuration, offer, names):
        """The replies remembered for offer, one for each child name in order; None unless all are."""
        known = self._for(configuration).get(_key(offer))
        if known is None:
            return None
        try:
            return [known[name] for name in names]
        except KeyError:
            return None

    def remember(self, configuration, offer, replies):
        """Remember replies ({child name: Negotiate}), what every child of a session answered offer."""
        remembered = self._for(configuration)
        remembered.pop(_key(offer), None)
        if len(remembered) >= MAX_OFFERS:
            del remembered[next(iter(remembered))]  # the offer remembered longest ago
        remembered[_key(offer)] = replies

    def forget(self, configuration, offer):
        """Forget offer: the next session negotiates with the children before it answers it."""
        self._for(configuration).pop(_key(offer), None)
