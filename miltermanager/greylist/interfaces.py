"""The seam between the greylisting milter and whatever keeps the greylisting state."""

from zope.interface import Interface


class IGreylist(Interface):
    """Greylisting decisions, as the milter asks for them.

    is_whitelisted and client_network are cheap and synchronous (no
    database); decide may block (store.Greylist) or return a Deferred
    (threaded.ThreadedGreylist).
    """

    def is_whitelisted(address):
        """Is the connect address (bytes or str) in a whitelisted network?

        Raises store.BadInput for something that is not an IP address.
        """

    def client_network(address):
        """The network string the client at address is greylisted as ("192.0.2.0/24").

        Raises store.BadInput for something that is not an IP address.
        """

    def decide(triplet):
        """Decide on a store.Triplet and record the attempt.

        Returns a store.Verdict, or a Deferred that fires with one; a
        store failure raises or fails the Deferred with one of
        store.STORE_ERRORS (sqlite3.Error, store.StoreError).
        """
