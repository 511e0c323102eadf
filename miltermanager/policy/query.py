"""The LDAP search for one address: `ldap.filter` and `ldap.base` filled in, and how to rank entries.

In the filter, `(ATTR=%m)` becomes `(|(ATTR=KEY1)(ATTR=KEY2)...)` over the
address's lookup keys (amavisd-new's one-query form), `%d` the domain and
`%u` the mailbox (the local part without its extension); `%%` is a `%`.
In the base, `%d` is the domain as a DN value. Every value is escaped
(RFC 4515 in the filter, RFC 4514 in the base): an address cannot change
the search's shape. An entry's rank (0: most specific) is the position of
the key it was found by: the value of a `%m` attribute among the keys, a
`%d` attribute's value as `@domain`, a `%u` attribute's as `user@domain`.
"""

import re

_ITEM = re.compile(r"\(([A-Za-z0-9][A-Za-z0-9;.-]*)=%([mdu])\)")
_PLACEHOLDER = re.compile(r"%(.)", re.DOTALL)
# An item or a lone placeholder of a checked template, filled in one pass.
_FILLED = re.compile(_ITEM.pattern + r"|%([du%])")
# Bytes a filter value carries as \XX: RFC 4515's specials, and everything outside printable ASCII.
_PLAIN = frozenset(range(0x20, 0x7F)) - set(b"*()\\")
SAMPLE = "user+ext@sub.example.com"


class QueryError(ValueError):
    """A filter or base template that cannot be used; the text says why."""


def escape_value(text):
    """text as an RFC 4515 assertion value: specials, NUL and non-ASCII bytes as \\XX."""
    data = text.encode("utf-8", "surrogateescape")
    return "".join(chr(byte) if byte in _PLAIN else f"\\{byte:02x}" for byte in data)


def _escape_dn_value(text):
    from ldap3.utils.dn import escape_rdn

    return escape_rdn(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))


class Query:
    """A checked filter and base template; for_address() gives (base, filter) for an Address.

    Raises QueryError when the template is not a valid LDAP filter or DN
    once filled in, uses a placeholder other than %m, %d, %u and %%, or
    uses %m other than as a whole equality value.
    """

    def __init__(self, filter_template, base_template):
        self.filter_template = filter_template
        self.base_template = base_template
        self.by_key = []  # attributes whose values are lookup keys (%m)
        self.by_domain = []  # %d
        self.by_mailbox = []  # %u
        for attribute, placeholder in _ITEM.findall(filter_template):
            {"m": self.by_key, "d": self.by_domain, "u": self.by_mailbox}[placeholder].append(
                attribute.lower())
        rest = _ITEM.sub("", filter_template)
        for match in _PLACEHOLDER.finditer(rest):
            if match.group(1) in "du%":
                continue
            if match.group(1) == "m":
                raise QueryError("%m must be a whole equality value, as in (mail=%m)")
            raise QueryError(f"has no placeholder %{match.group(1)}: the placeholders are "
                             f"%m (the lookup keys), %d (the domain), %u (the mailbox) and %%")
        for match in _PLACEHOLDER.finditer(base_template):
            if match.group(1) not in "d%":
                raise QueryError(f"base has no placeholder %{match.group(1)}: only %d (the "
                                 f"domain) and %%")
        # ldap3 is imported only where LDAP is configured (it costs a manager without it 4 MiB).
        from ldap3.core.exceptions import LDAPException
        from ldap3.operation.search import parse_filter
        from ldap3.utils.dn import parse_dn

        from .keys import parse
        base, text = self.for_address(parse(SAMPLE))
        try:
            parse_filter(text, None, False, False, None, False)
        except LDAPException as error:
            raise QueryError(f"is not a valid LDAP filter once filled in ({error}): "
                             f"{text}") from None
        try:
            parse_dn(base)
        except LDAPException as error:
            raise QueryError(f"base is not a valid DN once filled in ({error}): {base}") from None

    @property
    def ranking_attributes(self):
        """The attributes an entry is ranked by, to be asked for in the search."""
        return list(dict.fromkeys(self.by_key + self.by_domain + self.by_mailbox))

    def for_address(self, address):
        """(base, filter) for an Address."""
        domain = address.domain or ""

        def item(match):
            attribute, placeholder, alone = match.groups()
            if alone is not None:
                return {"d": escape_value(domain), "u": escape_value(address.mailbox),
                        "%": "%"}[alone]
            if placeholder == "m":
                alternatives = "".join(f"({attribute}={escape_value(key)})"
                                       for key in address.keys)
                return f"(|{alternatives})"
            value = domain if placeholder == "d" else address.mailbox
            return f"({attribute}={escape_value(value)})"

        # One pass: a value put in must never be read again as a template (% is valid
        # in a local part).
        text = _FILLED.sub(item, self.filter_template)
        base = _PLACEHOLDER.sub(
            lambda match: _escape_dn_value(domain) if match.group(1) == "d" else "%",
            self.base_template)
        return base, text

    def rank(self, attributes, address):
        """The rank of an entry (its attributes, names lower-cased) for address; None if unknown.

        The most specific key the entry carries decides.
        """
        ranks = []
        for name in self.by_key:
            for value in attributes.get(name, ()):
                rank = address.rank_of(value.strip().lower())
                if rank is not None:
                    ranks.append(rank)
        if address.domain:
            for name in self.by_domain:
                if any(value.strip().lower() == address.domain
                       for value in attributes.get(name, ())):
                    ranks.append(address.domain_rank)
        for name in self.by_mailbox:
            if any(value.strip().lower() == address.mailbox
                   for value in attributes.get(name, ())):
                ranks.append(address.mailbox_rank)
        ranks = [rank for rank in ranks if rank is not None]
        return min(ranks) if ranks else None
