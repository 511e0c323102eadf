"""Greylisting shipped with milter-manager: SQLite and Redis stores and a milter built on them.

store.GreylistRules decides; store.Greylist keeps the state in SQLite,
redis_store.RedisGreylist in Redis (both blocking); threaded.ThreadedGreylist
runs it in a small thread pool; milter.GreylistMilter answers the MTA;
main is the milter-manager-greylist program.
"""

from .interfaces import IGreylist
from .milter import GreylistMilter, milter_factory, server_factory
from .outage import StoreOutage
from .redis_store import RedisGreylist
from .store import BadInput, Greylist, GreylistRules, Reason, StoreError, Triplet, Verdict
from .threaded import ThreadedGreylist

__all__ = [
    "BadInput", "Greylist", "GreylistMilter", "GreylistRules", "IGreylist", "Reason",
    "RedisGreylist", "StoreError", "StoreOutage", "ThreadedGreylist", "Triplet", "Verdict",
    "milter_factory", "server_factory",
]
