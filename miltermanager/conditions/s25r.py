"""S25R (Selective SMTP Rejection): whether an SMTP client's host name looks like an end-user host.

A host whose reverse DNS name looks dynamic (``p1234-ipad01tokyo.example.jp``,
``dhcp-192-0-2-1.example.net``), has no name (``[192.0.2.1]``) or could not
be resolved (``unknown``) is more likely a bot than a mail server. The
`S25R` condition applies its children only to such clients.
"""

import re
from dataclasses import dataclass, field

# The six S25R rules (www.gabacho-net.jp/en/anti-spam/), then upstream's two
# name-less forms. Matched against the whole host name, case-insensitively.
RULES = (
    r"\A[^.]*[0-9][^0-9.]+[0-9]",
    r"\A[^.]*[0-9]{5}",
    r"\A(?:[^.]+\.)?[0-9][^.]*\.[^.]+\..+\.[a-z]",
    r"\A[^.]*[0-9]\.[^.]*[0-9]-[0-9]",
    r"\A[^.]*[0-9]\.[^.]*[0-9]\.[^.]+\..+\.",
    r"\A(?:dhcp|dialup|ppp|[achrsvx]?dsl)[^.]*[0-9]",
)
DEFAULT_WHITELIST = (
    ".google.com", ".obsmtp.com", ".smtp-out.amazonses.com", ".slack.com", ".mg.gitlab.com",
    ".sendgrid.net",
)
DEFAULT_BLACKLIST = (
    "unknown",
    re.compile(r"\A\[.+\]\Z"),
    *(re.compile(rule, re.IGNORECASE) for rule in RULES),
)


def matches(entry, host):
    """Whether a list entry matches host.

    A string starting with "." matches a host ending with it; another
    string matches that host exactly (both case-insensitively); a compiled
    regular expression is searched; a callable is called with the host.
    """
    if isinstance(entry, str):
        entry, host = entry.lower(), host.lower()
        return host.endswith(entry) if entry.startswith(".") else host == entry
    if isinstance(entry, re.Pattern):
        return entry.search(host) is not None
    return bool(entry(host))


def check_entry(entry):
    """entry if it can be a whitelist or blacklist entry; TypeError otherwise."""
    if isinstance(entry, str) and entry or isinstance(entry, re.Pattern) or callable(entry):
        return entry
    raise TypeError("must be a non-empty string, a compiled regular expression "
                    "(re.compile(...)) or a function of the host name")


@dataclass
class S25R:
    """The lists and the decision of the `S25R` condition.

    check_only_ipv4: clients that are not IPv4 (IPv6, UNIX sockets) are
    whitelisted, as upstream, since the rules were written for IPv4 names.
    """

    whitelist: list = field(default_factory=lambda: list(DEFAULT_WHITELIST))
    blacklist: list = field(default_factory=lambda: list(DEFAULT_BLACKLIST))
    check_only_ipv4: bool = True

    def add_whitelist(self, entry):
        self.whitelist.append(check_entry(entry))

    def add_blacklist(self, entry):
        self.blacklist.append(check_entry(entry))

    def whitelisted(self, host):
        return any(matches(entry, host) for entry in self.whitelist)

    def blacklisted(self, host):
        return any(matches(entry, host) for entry in self.blacklist)

    def dynamic(self, host, socket_address=None):
        """Whether the client looks like an end-user host: the condition applies to it."""
        if (self.check_only_ipv4 and socket_address is not None
                and not socket_address.ipv4):
            return False
        if host is None or self.whitelisted(host):
            return False
        return self.blacklisted(host)

    def stop(self, host, socket_address=None):
        """The connect stopper: stop unless the client looks dynamic."""
        return not self.dynamic(host, socket_address)
