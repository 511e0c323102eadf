"""Recipient policies kept for a while: a found policy for ldap.cache_ttl, "no entry" for less.

Time comes from the clock given (the reactor, or a task.Clock in tests).
An expired policy is not served, but kept until it is stale_for seconds
past its expiry, for ldap.on_error = "stale N". The cache holds at most
max_size addresses; the least recently used goes first. A configuration
has its own cache: a reload starts empty.
"""

from collections import OrderedDict

MAX_SIZE = 100_000


class PolicyCache:
    """address text -> RecipientPolicy, with expiry."""

    def __init__(self, clock, ttl, negative_ttl, stale_for=0.0, max_size=MAX_SIZE):
        self._clock = clock
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.stale_for = stale_for
        self.max_size = max_size
        self._items = OrderedDict()  # address -> (expires, policy)

    def __len__(self):
        return len(self._items)

    def get(self, address):
        """The policy cached for address while it has not expired, else None."""
        item = self._items.get(address)
        if item is None:
            return None
        expires, policy = item
        if self._clock.seconds() >= expires:
            if self._clock.seconds() >= expires + self.stale_for:
                del self._items[address]
            return None
        self._items.move_to_end(address)
        return policy

    def stale(self, address):
        """The policy cached for address, expired at most stale_for seconds ago, else None."""
        item = self._items.get(address)
        if item is None:
            return None
        expires, policy = item
        return policy if self._clock.seconds() < expires + self.stale_for else None

    def put(self, address, policy):
        """Keep policy for address: ttl if entries made it, negative_ttl if none did."""
        ttl = self.ttl if policy.entries else self.negative_ttl
        if ttl <= 0 and self.stale_for <= 0:
            return
        self._items[address] = (self._clock.seconds() + ttl, policy)
        self._items.move_to_end(address)
        while len(self._items) > self.max_size:
            self._items.popitem(last=False)

    def clear(self):
        self._items.clear()
