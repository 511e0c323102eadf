"""Where policies are searched: the IPolicySource seam and its ldap3 implementation.

ldap3 blocks, so searches run in a dedicated, bounded thread pool (the
reactor's own pool also resolves host names: LDAP must not starve it).
Each pool thread keeps its own connection (ldap3's SYNC strategy is not
thread-safe), opened on first use through a ServerPool over ldap.uris: the
first server that answers serves, one that fails is left out for a while.
A search that fails drops its thread's connection; the next one connects
again. The thread side only searches and returns plain data; ranking,
merging and caching happen on the reactor thread (miltermanager.policy.lookup).
"""

import math
import ssl
import threading

from twisted.internet import threads
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

# Seconds a server that failed is left out of the pool, while others are tried first.
DEAD_SERVER_SECONDS = 10
# ldap3's result code for a search base that does not exist: no entry, not an error.
_NO_SUCH_OBJECT = 32
_SCOPES = {"sub": "SUBTREE", "one": "LEVEL", "base": "BASE"}


class IPolicySource(Interface):
    """Something policies are searched in."""

    def search(base, filter, attributes):
        """Search base for filter (an RFC 4515 string, values escaped already).

        Returns a Deferred firing with a list of (dn, {attribute name
        lower-cased: [str values]}) for the entries found ([] when the base
        does not exist), or failing when the directory cannot be asked.
        """


class SourceError(Exception):
    """The directory could not be asked; the text says why (never a password)."""


@implementer(IPolicySource)
class LDAPSource:
    """ldap3 over a ServerPool, in a thread pool of at most `threads` threads.

    settings: the `ldap` configuration (uris, bind_dn, password, ca_data,
    start_tls, timeout, scope, threads). start() before the first search,
    stop() at the end (joins the threads, closes the connections).
    """

    def __init__(self, settings, reactor):
        self._reactor = reactor
        self._uris = list(settings.uris)
        self._bind_dn = settings.bind_dn
        self._password = settings.password
        self._ca_data = settings.ca_data
        self._start_tls = settings.start_tls
        self._timeout = settings.timeout
        self._scope = _SCOPES[settings.scope]
        self._pool = ThreadPool(0, settings.threads, name="milter-manager-ldap")
        self._local = threading.local()
        self._connections = set()
        self._lock = threading.Lock()
        self._servers = None
        self._shutdown = None  # the reactor's shutdown trigger while started

    def start(self):
        self._servers = self._server_pool()
        self._pool.start()
        # Stopped with the reactor at the latest, as twisted.enterprise.adbapi's pools are.
        self._shutdown = self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def stop(self):
        """Stop the threads (waiting for searches in progress), then close every connection."""
        if self._shutdown is None:
            return
        trigger, self._shutdown = self._shutdown, None
        try:
            self._reactor.removeSystemEventTrigger(trigger)
        except ValueError:
            pass  # it is the trigger running now
        self._pool.stop()
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            _close(connection)

    def search(self, base, filter, attributes):
        return threads.deferToThreadPool(self._reactor, self._pool, self._search, base, filter,
                                         list(attributes))

    # ------------------------------------------------------------ in a pool thread

    def _search(self, base, filter, attributes):
        from ldap3.core.exceptions import LDAPException

        connection = self._connection()
        try:
            connection.search(base, filter, search_scope=self._scope, attributes=attributes,
                              time_limit=max(1, math.ceil(self._timeout)), size_limit=100)
        except LDAPException as error:
            if getattr(error, "result", None) == _NO_SUCH_OBJECT:
                return []
            self._drop(connection)
            raise SourceError(_describe(error)) from None
        except Exception:
            self._drop(connection)
            raise
        found = []
        for entry in connection.response or ():
            if entry.get("type") != "searchResEntry":
                continue  # a referral
            found.append((entry["dn"], plain_attributes(entry.get("raw_attributes", {}))))
        return found

    def _connection(self):
        connection = getattr(self._local, "connection", None)
        if connection is not None and not connection.closed:
            return connection
        from ldap3 import AUTO_BIND_NO_TLS, AUTO_BIND_TLS_BEFORE_BIND, SYNC, Connection
        from ldap3.core.exceptions import LDAPException

        try:
            connection = Connection(
                self._servers, user=self._bind_dn, password=self._password,
                auto_bind=AUTO_BIND_TLS_BEFORE_BIND if self._start_tls else AUTO_BIND_NO_TLS,
                client_strategy=SYNC, read_only=True, raise_exceptions=True,
                # ldap3 packs it into SO_RCVTIMEO as whole seconds.
                receive_timeout=max(1, math.ceil(self._timeout)), check_names=False,
                auto_escape=False,
                auto_encode=True, return_empty_attributes=False)
        except LDAPException as error:
            raise SourceError(_describe(error)) from None
        self._local.connection = connection
        with self._lock:
            self._connections.add(connection)
        return connection

    def _server_pool(self):
        """ldap.uris in order: the first that answers serves (made once, on the reactor thread)."""
        from ldap3 import FIRST, NONE, Server, ServerPool, Tls
        from ldap3.utils.config import set_config_parameter

        # ldap3 sleeps this long after a round in which no server answered: a pool
        # thread must never sleep, the caller's timeout decides.
        set_config_parameter("POOLING_LOOP_TIMEOUT", 0)
        tls = None
        if self._ca_data is not None or self._start_tls or any(
                uri.lower().startswith("ldaps://") for uri in self._uris):
            # The CA file was read at load: the process may not be able to read it later.
            tls = Tls(validate=ssl.CERT_REQUIRED, ca_certs_data=self._ca_data)
        servers = [Server(uri, get_info=NONE, connect_timeout=self._timeout, tls=tls)
                   for uri in self._uris]
        # A lone server is tried at every connection: leaving it out gains nothing.
        exhaust = DEAD_SERVER_SECONDS if len(servers) > 1 else False
        return ServerPool(servers, FIRST, active=1, exhaust=exhaust)

    def _drop(self, connection):
        if getattr(self._local, "connection", None) is connection:
            self._local.connection = None
        with self._lock:
            self._connections.discard(connection)
        _close(connection)


def _close(connection):
    try:
        connection.unbind()
    except Exception:
        pass  # closing a broken connection: nothing more to do


def plain_attributes(raw):
    """ldap3's raw attributes as {name lower-cased: [str]}, attributes without values left out."""
    return {name.lower(): [_text(value) for value in values]
            for name, values in raw.items() if values}


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _describe(error):
    """An ldap3 error as one line, without the bind password ldap3 may echo."""
    text = str(error) or type(error).__name__
    return " ".join(text.split())[:300]
