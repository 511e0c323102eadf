"""The helper objects of the built-in conditions as a configuration holds them.

`s25r`, `remote_network`, `stress`, `trust`, `dnsbl` and `ldap` in a configuration
file are these records (through the loader's proxies): the pure logic of
miltermanager.conditions plus settings checked like any other, and the
verbs called (`calls`), kept with their FILE:LINE so that `dump` writes
them back. Each Configuration has its own, so a reload starts afresh.
"""

import ipaddress
import re
from dataclasses import dataclass, field
from typing import ClassVar

from twisted.internet.defer import succeed

from miltermanager.conditions.dnsbl import DNSBL, DNSBLService, default_services
from miltermanager.conditions.network import RemoteNetwork
from miltermanager.conditions.s25r import DEFAULT_BLACKLIST, DEFAULT_WHITELIST, S25R
from miltermanager.conditions.stress import Stress
from miltermanager.conditions.trust import DEFAULT_DOMAINS, Trust

from .ldap import LDAPConfig
from .model import InvalidValue, _boolean, _positive_seconds, setting


@dataclass
class Call:
    """A verb a file called on a helper (`s25r.add_whitelist(...)`), as dump writes it back.

    arguments is the argument list as source text; source, when the
    argument is a function the file defined, is its `def`, written before
    the call. None arguments: the value cannot be written back.
    """

    verb: str
    arguments: str | None
    origin: str | None = field(default=None, compare=False)
    source: str | None = None


def _origins():
    return field(default_factory=dict, repr=False, compare=False)


def _calls():
    return field(default_factory=list, repr=False, compare=False)


@dataclass
class S25RConfig(S25R):
    """`s25r`: the S25R condition's lists (whitelist wins, then blacklist) and scope."""

    SECTION: ClassVar[str] = "s25r"
    VERBS: ClassVar[tuple] = ("add_whitelist", "add_blacklist")
    # The lists in effect, shown by dump: (attribute, its defaults, what it means).
    EFFECTIVE: ClassVar[tuple] = (
        ("whitelist", DEFAULT_WHITELIST, "host names never counted as dynamic, checked first"),
        ("blacklist", DEFAULT_BLACKLIST, "host names counted as dynamic: S25R's rules"),
    )
    check_only_ipv4: bool = setting(
        True, check=_boolean,
        doc="apply S25R to IPv4 clients only (others never look dynamic); "
            "only_check_ipv4 is the same")
    calls: list = _calls()
    origins: dict = _origins()


@dataclass
class RemoteNetworkConfig(RemoteNetwork):
    """`remote_network`: networks counted as local, and exceptions counted as remote."""

    SECTION: ClassVar[str] = "remote_network"
    VERBS: ClassVar[tuple] = ("add_local_address", "add_remote_address")
    EFFECTIVE: ClassVar[tuple] = (
        ("local_networks", (), "local besides loopback, private and link-local addresses "
                               "and UNIX sockets"),
        ("remote_networks", (), "remote even inside the local ones"),
    )
    calls: list = _calls()
    origins: dict = _origins()


def _threshold(value):
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise InvalidValue(
            "must be an integer, 0 or more (0: never stressed), or None (detect from Postfix)")
    return value


@dataclass
class StressConfig(Stress):
    """`stress`: when the Stress Notify and No Stress conditions call the manager stressed."""

    SECTION: ClassVar[str] = "stress"
    VERBS: ClassVar[tuple] = ()
    EFFECTIVE: ClassVar[tuple] = ()
    threshold_n_connections: int | None = setting(
        None, check=_threshold,
        doc="stressed from this many MTA connections; 0: never; None: 0.75 × Postfix's "
            "smtpd process limit")
    calls: list = _calls()
    origins: dict = _origins()


@dataclass
class TrustConfig(Trust):
    """`trust`: the envelope-from domains the Trust condition marks {trusted_domain}=yes."""

    SECTION: ClassVar[str] = "trust"
    VERBS: ClassVar[tuple] = ("add_envelope_from_domain", "clear", "load_envelope_from_domains")
    EFFECTIVE: ClassVar[tuple] = (
        ("domains", DEFAULT_DOMAINS, "envelope-from domains marked {trusted_domain}=yes"),
    )
    calls: list = _calls()
    origins: dict = _origins()


def name_server(value):
    """("ADDRESS", port) of "ADDRESS", "ADDRESS:PORT", "[V6]:PORT" or a bare IPv6 address."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidValue(
            f'must be a list of name server addresses ("127.0.0.1:53", "[::1]:53"); '
            f"got {value!r}", as_is=True)
    text = value.strip()
    host, port = text, "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                host = None
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise InvalidValue(
            f"must name each name server by its IP address, as it is asked without the "
            f"system's resolver; got {value!r} (use \"192.0.2.53:53\", not a host name)",
            as_is=True) from None
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise InvalidValue(f"has no port from 1 to 65535 in {value!r}", as_is=True)
    return str(address), int(port)


def _name_servers(value):
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise InvalidValue('must be a non-empty list of "ADDRESS:PORT" strings '
                           '(e.g. ["127.0.0.1:53"])')
    for item in value:
        name_server(item)
    return list(value)


@dataclass
class DNSBLConfig:
    """`dnsbl`: the DNSBL services and name servers of the DNSBL Listed conditions.

    The resolver is made on first use, with the running reactor, once per
    configuration: its cache lives as long as the configuration.
    """

    SECTION: ClassVar[str] = "dnsbl"
    VERBS: ClassVar[tuple] = ("add_service", "clear_services")
    EFFECTIVE: ClassVar[tuple] = (
        ("services", tuple(default_services()),
         "zones asked about each client, through dnsbl.name_servers only"),
    )
    services: list = field(default_factory=default_services)
    name_servers: list = setting(
        check=_name_servers, factory=lambda: ["127.0.0.1:53"],
        doc="name servers asked, \"ADDRESS:PORT\" (IP addresses only); name_server = one")
    timeout: float = setting(5.0, check=_positive_seconds, doc="seconds a lookup may take")
    calls: list = _calls()
    origins: dict = _origins()
    _resolver: object = field(default=None, init=False, repr=False, compare=False)

    def add_service(self, domain, expected_answer_cidr=None):
        if isinstance(expected_answer_cidr, str):
            expected_answer_cidr = [expected_answer_cidr]
        self.services.append(DNSBLService(domain, expected_answer_cidr))

    def clear_services(self):
        self.services.clear()

    def resolver(self, reactor=None):
        """The DNSBL resolver of this configuration, made the first time."""
        if self._resolver is None:
            if reactor is None:
                from twisted.internet import reactor
            self._resolver = DNSBL(self.services, [name_server(each) for each in self.name_servers],
                                   self.timeout, reactor)
        return self._resolver

    def lookup(self, socket_address):
        """Deferred firing with the ListedResult for the client, or None (also for no IP)."""
        ip = getattr(socket_address, "ip_address", None)
        if ip is None or not self.services:
            return succeed(None)
        return self.resolver().lookup(str(ip))

    def listed(self, socket_address):
        """Deferred[bool]: some service lists the client."""
        return self.lookup(socket_address).addCallback(lambda result: result is not None)

    def not_listed(self, socket_address):
        """Deferred[bool]: no service lists the client."""
        return self.lookup(socket_address).addCallback(lambda result: result is None)


HELPERS = {
    "s25r": S25RConfig,
    "remote_network": RemoteNetworkConfig,
    "stress": StressConfig,
    "trust": TrustConfig,
    "dnsbl": DNSBLConfig,
    "ldap": LDAPConfig,
}


def literal(value):
    """Source text for a verb's argument, or None when it cannot be written back."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, re.Pattern):
        return repr(value)
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network,
                          ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return repr(str(value))
    if isinstance(value, (list, tuple)):
        items = [literal(item) for item in value]
        if None in items:
            return None
        return f"[{', '.join(items)}]"
    return None
