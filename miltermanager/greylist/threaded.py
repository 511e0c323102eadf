"""A greylist store run in a small dedicated thread pool, with a periodic purge.

Why threads: sqlite3 blocks. A decision alone is quick (30-40 µs
measured on a 2-core VM with WAL and synchronous=NORMAL, see
docs/greylist.md), but while another process holds the write lock a
connection waits up to its busy timeout (seconds), and a WAL checkpoint or a
slow disk can stall a commit for milliseconds. Run on the reactor thread, one
such wait would stall every MTA connection of this process. The pool is small
because SQLite admits one writer at a time anyway; the reactor never waits on
it, a pending RCPT simply gets its answer a little later. The Redis store
(redis_store.py) blocks on the network the same way; its keys expire by
themselves, so it runs without the purge (purge_interval=0).
"""

from twisted.internet import threads
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from .interfaces import IGreylist
from .store import STORE_ERRORS

DEFAULT_THREADS = 2
DEFAULT_PURGE_INTERVAL = 3600.0


@implementer(IGreylist)
class ThreadedGreylist:
    """A store.Greylist whose decide and purge run in a thread pool of their own.

    reactor runs the pool's results back (IReactorFromThreads) and the purge
    (IReactorTime); clock gives the time of each decision, read on the
    reactor thread (defaults to reactor). Call start() before use and stop()
    at shutdown.
    """

    log = Logger()

    def __init__(self, greylist, reactor, clock=None, threads=DEFAULT_THREADS,
                 purge_interval=DEFAULT_PURGE_INTERVAL, metrics=None):
        self.greylist = greylist
        self.metrics = metrics  # a metrics.GreylistMetrics told of purges, or None
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=threads, name="greylist-store")
        self.purge_interval = purge_interval
        self._purging = None

    def start(self):
        """Start the threads and the purge (first one now, then every purge_interval)."""
        self.pool.start()
        if self.purge_interval:
            self._purging = LoopingCall(self._purge_logged)
            self._purging.clock = self.reactor
            self._purging.start(self.purge_interval, now=True)

    def stop(self):
        """Stop the purge, wait for the threads' work to finish, close the store."""
        if self._purging is not None and self._purging.running:
            self._purging.stop()
        self._purging = None
        self.pool.stop()
        self.greylist.close()

    def is_whitelisted(self, address):
        return self.greylist.is_whitelisted(address)

    def client_network(self, address):
        return self.greylist.client_network(address)

    def decide(self, triplet):
        """Fire with the store's Verdict, decided in the pool at the clock's current time."""
        return threads.deferToThreadPool(self.reactor, self.pool, self.greylist.decide,
                                         triplet, self.clock.seconds())

    def purge(self):
        """Fire with the number of rows the store's purge deleted."""
        return threads.deferToThreadPool(self.reactor, self.pool, self.greylist.purge,
                                         self.clock.seconds())

    def counts(self):
        """Fire with the store's counts() (pending, passed, auto-whitelisted networks)."""
        return threads.deferToThreadPool(self.reactor, self.pool, self.greylist.counts)

    def _purge_logged(self):
        # A failed purge is logged and retried next time; it must not stop the LoopingCall.
        def purged(count):
            if self.metrics is not None:
                self.metrics.purged_rows(count)
            if count:
                self.log.info("[greylist][purge] {count} expired rows deleted", count=count)

        def failed(failure):
            if self.metrics is not None:
                self.metrics.failed("purge", "database" if failure.check(*STORE_ERRORS)
                                    else "internal")
            self.log.error("[greylist][purge][error] {error}",
                           error=failure.getErrorMessage())

        return self.purge().addCallbacks(purged, failed)
