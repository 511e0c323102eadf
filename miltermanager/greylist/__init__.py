"""Greylisting shipped with milter-manager: an SQLite store and a milter built on it.

store.Greylist keeps the state and decides (blocking); threaded.ThreadedGreylist
runs it in a small thread pool; milter.GreylistMilter answers the MTA;
main is the milter-manager-greylist program.
"""

from .interfaces import IGreylist
from .milter import GreylistMilter, milter_factory, server_factory
from .store import BadInput, Greylist, Reason, Triplet, Verdict
from .threaded import ThreadedGreylist

__all__ = [
    "BadInput", "Greylist", "GreylistMilter", "IGreylist", "Reason", "ThreadedGreylist",
    "Triplet", "Verdict", "milter_factory", "server_factory",
]
