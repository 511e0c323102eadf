"""Trust: marking mail whose envelope-from domain we trust with the {trusted_domain} macro."""

import re
from dataclasses import dataclass, field

DEFAULT_DOMAINS = (
    "gmail.com", "hotmail.com", "msn.com", "yahoo.co.jp", "softbank.ne.jp", "ezweb.ne.jp",
    "docomo.ne.jp", "clear-code.com",
)


def sender_domain(sender):
    """The lower-cased domain of an envelope-from ("<a@Example.COM>" -> "example.com"), or None."""
    if sender is None:
        return None
    address = sender.strip()
    if address.startswith("<"):
        address = address[1:].split(">", 1)[0]
    if "@" not in address:
        return None
    return address.rsplit("@", 1)[1].strip().rstrip(".").lower() or None


def check_domain(entry):
    """entry if it can name trusted domains; TypeError otherwise."""
    if isinstance(entry, str) and entry.strip():
        return entry.strip().lower()
    if isinstance(entry, re.Pattern) or callable(entry):
        return entry
    raise TypeError("must be a domain (a non-empty string), a compiled regular expression "
                    "or a function of the domain")


def parse_domains(text, where="domains"):
    """The entries of a domains file: one a line, /RE/ a case-insensitive regex, # comments.

    Raises ValueError naming where:LINE for a bad regular expression.
    """
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if len(line) >= 2 and line.startswith("/") and line.endswith("/"):
            try:
                entries.append(re.compile(line[1:-1], re.IGNORECASE))
            except re.error as error:
                raise ValueError(f"{where}:{number}: bad regular expression {line}: {error}")
        else:
            entries.append(line.lower())
    return entries


@dataclass
class Trust:
    """The envelope-from domains the `Trust` condition marks as trusted."""

    domains: list = field(default_factory=lambda: list(DEFAULT_DOMAINS))

    def add_envelope_from_domain(self, entry):
        self.domains.append(check_domain(entry))

    def clear(self):
        self.domains.clear()

    def load_envelope_from_domains(self, path):
        with open(path, encoding="utf-8") as file:
            self.domains.extend(parse_domains(file.read(), path))

    def trusted(self, sender):
        """Whether the envelope-from sender's domain is trusted."""
        domain = sender_domain(sender)
        if domain is None:
            return False
        for entry in self.domains:
            if isinstance(entry, str):
                if domain == entry:
                    return True
            elif isinstance(entry, re.Pattern):
                if entry.search(domain):
                    return True
            elif entry(domain):
                return True
        return False
