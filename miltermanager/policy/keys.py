"""A recipient address as amavisd-new looks it up: normalised, and its keys, most specific first.

`user+ext@sub.example.com` is looked up under `user+ext@sub.example.com`,
`user@sub.example.com`, `@sub.example.com`, `@.sub.example.com`,
`@.example.com`, `@.com` and `@.`: the entry of the first key found is the
most specific. `@.example.com` covers example.com and every domain under
it, as in amavisd-new. Keys are lower-cased, the domain in its IDNA A-label
form without a trailing dot; the null address is `<>`.
"""

from dataclasses import dataclass

NULL = "<>"
GLOBAL = "@."


@dataclass(frozen=True)
class Address:
    """A normalised address: local part (extension kept), domain (None: none given), keys.

    mailbox is the local part without its extension (`user` of
    `user+ext`). keys are the lookup keys, most specific first; text is
    the normalised address (the cache key).
    """

    text: str
    local: str
    mailbox: str
    domain: str | None
    keys: tuple

    def rank_of(self, key):
        """The position of key among the keys (0: most specific), or None."""
        try:
            return self.keys.index(key)
        except ValueError:
            return None

    @property
    def domain_rank(self):
        """The rank of an entry found by its domain (`@domain`)."""
        return self.rank_of("@" + self.domain) if self.domain else None

    @property
    def mailbox_rank(self):
        """The rank of an entry found by its mailbox (`user@domain`)."""
        key = f"{self.mailbox}@{self.domain}" if self.domain else self.mailbox
        return self.rank_of(key)


def bare(address):
    """address without surrounding space and angle brackets, as the [ldap] log lines write it."""
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    return text


def normalise_domain(domain):
    """domain lower-cased, IDNA A-labels, no trailing dot; unencodable labels as they are."""
    domain = domain.strip().rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def parse(address, delimiter="+"):
    """The Address of a recipient as the MTA gave it (angle brackets optional).

    delimiter: the characters that start the extension of a local part
    (Postfix's recipient_delimiter, each character one); "" or None: none.
    """
    text = bare(address)
    if not text:
        return Address(NULL, "", "", None, (NULL, GLOBAL))
    local, at, domain = text.rpartition("@")
    if not at:
        local, domain = text, ""
    local = local.lower()
    domain = normalise_domain(domain) if domain else None
    mailbox = local
    if delimiter:
        # Each character starts an extension, as in Postfix's recipient_delimiter.
        cut = next((index for index, char in enumerate(local) if char in delimiter), None)
        if cut:
            mailbox = local[:cut]
    keys = []
    if domain is None:
        keys.append(local)
        if mailbox != local:
            keys.append(mailbox)
    else:
        keys.append(f"{local}@{domain}")
        if mailbox != local:
            keys.append(f"{mailbox}@{domain}")
        keys.append(f"@{domain}")
        labels = domain.split(".")
        keys.extend("@." + ".".join(labels[index:]) for index in range(len(labels)))
    keys.append(GLOBAL)
    normalised = f"{local}@{domain}" if domain is not None else local
    return Address(normalised, local, mailbox, domain, tuple(dict.fromkeys(keys)))
