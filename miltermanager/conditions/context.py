"""What a stopper is given: the child's context (macros, siblings, shelf) and the client's address.

A stopper is a function an applicable condition registers
(`@condition.define_connect_stopper` ...). The session calls it for one
child, before it sends that child the command of the stage, as

    connect(context, host, socket_address)
    helo(context, fqdn)
    envelope_from(context, sender)
    envelope_recipient(context, recipient)     once per RCPT
    envelope(context, sender, recipients)      once at DATA, before the data stoppers
    data(context)
    header(context, name, value)               once per header
    end_of_header(context)
    body(context, chunk)                       chunk is bytes
    end_of_message(context)

where context is a ChildContext, socket_address a SocketAddress and the
other arguments str (UTF-8, undecodable bytes kept by surrogateescape).
A true result stops the child (see miltermanager.stoppers for what that
means at each stage); a Deferred (or a coroutine) is waited for.
"""

import ipaddress
from collections.abc import Mapping

from ..merge import Status
from ..protocol import constants as c


def text(value):
    """bytes from the wire as str: UTF-8, undecodable bytes kept as surrogates."""
    if value is None:
        return None
    return bytes(value).decode("utf-8", "surrogateescape")


def _wire(value):
    """str (or bytes) as the bytes that go on the wire."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"a macro value must be str or bytes, not {type(value).__name__}")


def macro_name(name):
    """A macro name as sent: b"j" for one letter, b"{daemon_name}" for longer names.

    "j", "{j}", "daemon_name" and "{daemon_name}" (str or bytes) are all accepted.
    """
    if isinstance(name, str):
        name = name.encode("utf-8", "surrogateescape")
    if name[:1] == b"{" and name[-1:] == b"}":
        name = name[1:-1]
    if not name:
        raise KeyError("empty macro name")
    return name if len(name) == 1 else b"{" + name + b"}"


# ---------------------------------------------------------------- the client's address

_FAMILIES = {
    c.FAMILY_INET: "inet",
    c.FAMILY_INET6: "inet6",
    c.FAMILY_UNIX: "unix",
    c.FAMILY_UNKNOWN: "unknown",
}
_PRIVATE_V4 = tuple(ipaddress.ip_network(net) for net in (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_LOCAL_V6 = tuple(ipaddress.ip_network(net) for net in (
    "::1/128", "fe80::/10", "fc00::/7"))


class SocketAddress:
    """The SMTP client's address as the MTA gave it at connect (upstream's SocketAddress).

    family is "inet", "inet6", "unix" or "unknown"; address (the IP as
    text) and port for inet and inet6, path for unix, else None.

    local: a loopback or private address. IPv4: 127/8 and RFC 1918 (10/8,
    172.16/12, 192.168/16), as upstream. IPv6: ::1, link-local fe80::/10 and
    also unique local fc00::/7, which upstream leaves out: ULAs are IPv6's
    private networks, and a site numbered with them is as "local" as one on
    192.168/16. An IPv4-mapped IPv6 address counts as its IPv4 address. A
    UNIX socket is local; an unknown address is not.
    """

    __slots__ = ("family", "address", "port", "path", "_ip")

    def __init__(self, family, address=None, port=None, path=None):
        self.family = family
        self.address = address
        self.port = port
        self.path = path
        self._ip = False  # not parsed yet

    @classmethod
    def from_connect(cls, command):
        """The address of a Connect command."""
        family = _FAMILIES.get(command.family, "unknown")
        if family == "unix":
            return cls("unix", path=text(command.address))
        if family == "unknown":
            return cls("unknown")
        address = text(command.address)
        if family == "inet6" and address[:5].lower() == "ipv6:":
            address = address[5:]  # Sendmail's form; libmilter strips it too
        return cls(family, address, command.port)

    @property
    def ipv4(self):
        return self.family == "inet"

    @property
    def ipv6(self):
        return self.family == "inet6"

    @property
    def unix(self):
        return self.family == "unix"

    @property
    def unknown(self):
        return self.family == "unknown"

    @property
    def ip_address(self):
        """An ipaddress.IPv4Address or IPv6Address; None for unix, unknown or unparsable."""
        if self._ip is False:
            ip = None
            if self.address is not None and self.family in ("inet", "inet6"):
                try:
                    ip = ipaddress.ip_address(self.address.split("%", 1)[0])
                except ValueError:
                    ip = None
            self._ip = ip
        return self._ip

    @property
    def local(self):
        if self.family == "unix":
            return True
        ip = self.ip_address
        if ip is None:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        networks = _PRIVATE_V4 if ip.version == 4 else _LOCAL_V6
        return any(ip in network for network in networks)

    def __str__(self):
        if self.family in ("inet", "inet6"):
            return f"{self.family}:{self.port}@[{self.address}]"
        if self.family == "unix":
            return f"unix:{self.path}"
        return "unknown"

    def __repr__(self):
        return f"<SocketAddress {self}>"

    def __eq__(self, other):
        if not isinstance(other, SocketAddress):
            return NotImplemented
        return (self.family, self.address, self.port, self.path) == (
            other.family, other.address, other.port, other.path)

    def __hash__(self):
        return hash((self.family, self.address, self.port, self.path))


# ---------------------------------------------------------------- siblings


class ChildStatus:
    """A read-only view of one child as other children's stoppers see it.

    reject, temporary_failure, accept, discard: its last verdict in this
    transaction is that (its real verdict, also in evaluation mode).
    stopped: a stopper stopped it in this transaction (or for the whole
    connection, at connect or HELO). quitted: it takes no further part in
    the SMTP connection (quit, failed, or never reached).
    """

    __slots__ = ("_child",)

    def __init__(self, child):
        self._child = child

    @property
    def name(self):
        return self._child.name

    @property
    def status(self):
        """Its last verdict as a miltermanager.merge.Status (NOT_CHANGE: none yet)."""
        return self._child.verdict

    @property
    def reject(self):
        return self._child.verdict is Status.REJECT

    @property
    def temporary_failure(self):
        return self._child.verdict is Status.TEMPORARY_FAILURE

    @property
    def accept(self):
        return self._child.verdict is Status.ACCEPT

    @property
    def discard(self):
        return self._child.verdict is Status.DISCARD

    @property
    def quitted(self):
        return not self._child.alive

    @property
    def stopped(self):
        return self._child.stopped_by is not None

    def __repr__(self):
        return (f"<ChildStatus {self.name} {self._child.verdict.label}"
                f"{' stopped' if self.stopped else ''}{' quitted' if self.quitted else ''}>")


class ChildStatuses(Mapping):
    """child name -> ChildStatus, in configuration order."""

    __slots__ = ("_children",)

    def __init__(self, children):
        self._children = children

    def __getitem__(self, name):
        return self._children[name].status_view

    def __iter__(self):
        return iter(self._children)

    def __len__(self):
        return len(self._children)


# ---------------------------------------------------------------- the context


class SessionFacts:
    """What the SMTP client said so far, and what the stoppers of one session share.

    The session keeps it up to date as commands arrive; every ChildContext
    of the session reads it. macros: the MTA's Macros as they stand.
    socket_address, host, helo, envelope_from, recipient: what the client
    said (None before it said it; recipient is the one of the RCPT being
    asked about). children: name -> ChildStatus of every configured child.
    policy: the session's PolicyGate (miltermanager.policy.gate), or None.
    processing_sessions(): MTA connections this process serves now.
    """

    __slots__ = ("macros", "children", "processing_sessions", "socket_address", "host",
                 "helo", "envelope_from", "recipient", "policy", "_shelf")

    def __init__(self, macros, children, processing_sessions):
        self.macros = macros
        self.children = children
        self.processing_sessions = processing_sessions
        self.socket_address = self.host = self.helo = None
        self.envelope_from = self.recipient = None
        self.policy = None  # the session's policy.gate.PolicyGate, when LDAP policies are used
        self._shelf = None

    @property
    def mail_transaction_shelf(self):
        """The dict the stoppers share in this transaction (made when first asked for)."""
        if self._shelf is None:
            self._shelf = {}
        return self._shelf

    def new_transaction(self):
        """A new MAIL, or the transaction was aborted: a new shelf."""
        self._shelf = None


class ChildContext:
    """What a stopper knows of the child it decides for, and of the SMTP session.

    context["j"], context["{daemon_name}"], context["daemon_name"]: a macro
    as str, or None. The braces are optional. This child's own macros (set
    below) come first, then the MTA's, newest stage first, as the session
    has them when the stopper runs.

    context["name"] = value (str or bytes; None removes it) sets a macro
    for this child only. It goes out with every command sent to this child
    from then on, merged into that command's macros: a connect stopper's
    macro already travels with the connect command, since the stopper runs
    before it is sent. One set by a connect or HELO stopper lasts the whole
    SMTP connection; one set later lasts the transaction (until the next
    MAIL or an abort), as the MTA's own macros of those stages do. A child
    that asked for a list of macros at a stage gets it there only if listed.

    children: name -> ChildStatus of every configured child.
    postfix: the MTA is Postfix (the v macro says so).
    authenticated: {auth_type} or {auth_authen} is set.
    n_processing_sessions: MTA connections this process is serving now.
    mail_transaction_shelf: a dict the stoppers of every child share for
    this transaction; a new one at each MAIL and after an abort.
    socket_address, host, helo, envelope_from: what the client said so far
    (None before it said it).
    evaluation_mode: the child's verdicts and changes are only logged. A
    stopper may set it for the transaction (the LDAP Policy condition does);
    a child configured with evaluation_mode stays in it whatever is set.
    policy: the session's LDAP policy gate, None without LDAP policies.
    """

    __slots__ = ("_child", "_facts", "_transaction")

    def __init__(self, child, facts):
        self._child = child
        self._facts = facts
        self._transaction = False  # whether a macro set now lasts only the transaction

    @property
    def name(self):
        return self._child.name

    # ------------------------------------------------------------ macros

    def get(self, name, default=None):
        """The macro name as str, or default."""
        key = macro_name(name)
        value = self._child.own_macro(key)
        if value is None:
            value = self._facts.macros.get(key)
        return default if value is None else text(value)

    def __getitem__(self, name):
        return self.get(name)

    def __contains__(self, name):
        return self.get(name) is not None

    def __setitem__(self, name, value):
        self._child.set_macro(macro_name(name), None if value is None else _wire(value),
                              self._transaction)

    def __delitem__(self, name):
        self._child.set_macro(macro_name(name), None, self._transaction)

    # ------------------------------------------------------------ the session

    @property
    def children(self):
        return self._facts.children

    @property
    def postfix(self):
        return "postfix" in (self.get("v") or "").lower()

    @property
    def authenticated(self):
        return self.get("auth_type") is not None or self.get("auth_authen") is not None

    @property
    def n_processing_sessions(self):
        return self._facts.processing_sessions()

    @property
    def mail_transaction_shelf(self):
        return self._facts.mail_transaction_shelf

    @property
    def socket_address(self):
        return self._facts.socket_address

    @property
    def host(self):
        return self._facts.host

    @property
    def helo(self):
        return self._facts.helo

    @property
    def envelope_from(self):
        return self._facts.envelope_from

    @property
    def policy(self):
        return self._facts.policy

    @property
    def evaluation_mode(self):
        return self._child.evaluation

    @evaluation_mode.setter
    def evaluation_mode(self, value):
        self._child.evaluation = self._child.config.evaluation_mode or bool(value)

    def __repr__(self):
        return f"<ChildContext {self.name}>"
