"""A store outage logged once when it starts and once when it ends, not once per message."""

from twisted.logger import Logger


class StoreOutage:
    """Whether the greylist's store is failing, told by each decision's outcome.

    clock (IReactorTime) dates the outage; log (a Logger) writes its lines.
    The milter calls failed() for every decision the store could not take
    (it passed, failing open) and answered() for every one it took. Only
    reactor-thread use: no lock.
    """

    def __init__(self, clock, log=None):
        self.clock = clock
        self.log = log if log is not None else Logger()
        self.since = None  # when the current outage started, or None
        self.failures = 0  # decisions that failed open in it

    @property
    def ongoing(self):
        return self.since is not None

    def failed(self, error, triplet=None):
        """A decision failed with a store error (raised or a Failure's value): passed.

        The first failure of an outage logs an error naming it and the
        triplet; later ones are only counted.
        """
        self.failures += 1
        if self.since is not None:
            return
        self.since = self.clock.seconds()
        if triplet is None:
            self.log.error("[greylist][error] database: {error}; passing mail (fail open) "
                           "until it answers", error=error)
        else:
            self.log.error("[greylist][error] database: {error}; passing {network} <{sender}> "
                           "-> <{recipient}> (fail open), and the mail of further failures "
                           "until it answers", error=error, network=triplet.network,
                           sender=triplet.sender, recipient=triplet.recipient)

    def answered(self):
        """A decision was taken: an ongoing outage ends, with one line."""
        if self.since is None:
            return
        duration = max(0.0, self.clock.seconds() - self.since)
        failures, self.since, self.failures = self.failures, None, 0
        self.log.warn("[greylist][recovered] the store answers again after {duration:.1f} s; "
                      "{failures} decisions failed open meanwhile",
                      duration=duration, failures=failures)
