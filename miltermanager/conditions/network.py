"""Remote Network: whether an SMTP client is outside the networks we call local."""

import ipaddress
from dataclasses import dataclass, field


def network(value):
    """An IP address or CIDR (str, or an ipaddress object) as an ip_network; ValueError if not."""
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return ipaddress.ip_network(value)
    if not isinstance(value, str):
        raise ValueError("must be an IP address or CIDR as a string (\"192.168.0.0/16\")")
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"must be an IPv4 or IPv6 address or CIDR (\"192.168.0.0/16\", \"2001:db8::/32\"); "
            f"got {value!r}") from None


def _contains(networks, ip):
    return any(ip.version == net.version and ip in net for net in networks)


@dataclass
class RemoteNetwork:
    """The lists and the decision of the `Remote Network` condition.

    A client is local when its address is (SocketAddress.local: loopback,
    private, link-local, a UNIX socket) or falls in local_networks, unless
    it falls in remote_networks, which wins. An unknown address is not
    remote.
    """

    local_networks: list = field(default_factory=list)
    remote_networks: list = field(default_factory=list)

    def add_local_address(self, value):
        self.local_networks.append(network(value))

    def add_remote_address(self, value):
        self.remote_networks.append(network(value))

    def remote(self, socket_address):
        """Whether socket_address (a SocketAddress) is a remote client."""
        if socket_address is None or socket_address.unknown:
            return False
        if socket_address.unix:
            return False
        ip = socket_address.ip_address
        if ip is None:
            return False
        candidates = [ip]
        if ip.version == 6 and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        if any(_contains(self.remote_networks, each) for each in candidates):
            return True
        if socket_address.local or any(_contains(self.local_networks, each)
                                       for each in candidates):
            return False
        return True

    def stop(self, socket_address):
        """The connect stopper: stop unless the client is remote."""
        return not self.remote(socket_address)
