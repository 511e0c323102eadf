"""Merging children's answers into one: status precedence, reply codes, negotiation.

Pure functions over protocol messages; the session calls them, tests table them.
"""

import enum

from .protocol import constants as c
from .protocol import messages


class Status(enum.IntEnum):
    """A child's verdict; a larger value wins when verdicts are merged.

    Upstream's order: discard > reject > temporary failure > continue >
    skip > accept > (no verdict yet).
    """

    NOT_CHANGE = 0
    ACCEPT = 1
    SKIP = 2
    CONTINUE = 3
    TEMPORARY_FAILURE = 4
    REJECT = 5
    DISCARD = 6

    @property
    def label(self):
        """The name used in configuration files and logs: "temporary-failure", ..."""
        return self.name.lower().replace("_", "-")


_STATUS_OF_CODE = {
    c.CONTINUE: Status.CONTINUE,
    c.ACCEPT: Status.ACCEPT,
    c.REJECT: Status.REJECT,
    c.TEMPFAIL: Status.TEMPORARY_FAILURE,
    c.DISCARD: Status.DISCARD,
    c.SKIP: Status.SKIP,
    c.SHUTDOWN: Status.TEMPORARY_FAILURE,
}

_REPLY_OF_STATUS = {
    Status.NOT_CHANGE: messages.CONTINUE,
    Status.CONTINUE: messages.CONTINUE,
    Status.ACCEPT: messages.ACCEPT,
    Status.REJECT: messages.REJECT,
    Status.TEMPORARY_FAILURE: messages.TEMPFAIL,
    Status.DISCARD: messages.DISCARD,
    Status.SKIP: messages.SKIP,
}

FALLBACK_STATUSES = {
    status.label: status
    for status in (Status.ACCEPT, Status.TEMPORARY_FAILURE, Status.REJECT, Status.DISCARD)
}


def parse_status(name):
    """A fallback status from its name: case-insensitive, "_" for "-", as upstream."""
    try:
        return FALLBACK_STATUSES[name.lower().replace("_", "-")]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown status {name!r}: expected one of {', '.join(FALLBACK_STATUSES)}"
        ) from None


def status_of(reply):
    """The Status a final reply stands for; a reply code counts by its class."""
    code = reply.code
    if code == c.REPLY_CODE:
        return Status.TEMPORARY_FAILURE if reply.text[:1] == b"4" else Status.REJECT
    return _STATUS_OF_CODE[code]


def reply_for(status, reply=None):
    """The reply that tells the MTA status.

    reply is the one a child gave for it (a ReplyCode or a Shutdown): it is
    forwarded only when it says the same thing as status, so a child's 550
    text never goes out with a merged temporary failure.
    """
    if reply is not None and status_of(reply) is status:
        return reply
    return _REPLY_OF_STATUS[status]


# Step flags the manager itself takes care of and never asks the MTA for.
_MANAGER_OWN_STEPS = c.NO_FLAGS | c.SMFIP_SKIP | c.SMFIP_RCPT_REJ


def merge_negotiation(mta_offer, replies):
    """The manager's reply to the MTA from its children's negotiation replies.

    Actions are ORed. A "no reply" step is kept only if every child has it.
    The manager asks for every event (conditions and later children may need
    what one child skips), takes on SKIP and RCPT_REJ itself, and asks for
    leading spaces when any child does. Symbol lists are unioned per stage,
    but a stage is left to the MTA's default as soon as one child did not
    list it, since that child wants the default macros. With no child, it
    asks for every event and no "no reply" step.
    """
    version = min(c.MAX_VERSION, mta_offer.version)
    offered_actions = mta_offer.actions or c.SMFI_V1_ACTS
    offered_protocol = mta_offer.protocol or c.SMFI_V1_PROT
    if not replies:
        return messages.Negotiate(version, 0, 0, {})
    actions = 0
    no_reply = c.NO_REPLY_FLAGS
    leading_space = 0
    for reply in replies:
        actions |= reply.actions
        no_reply &= reply.protocol
        leading_space |= reply.protocol & c.SMFIP_HDR_LEADSPC
    protocol = (no_reply | leading_space) & offered_protocol & ~_MANAGER_OWN_STEPS
    macros = {}
    if offered_actions & c.SMFIF_SETSYMLIST:
        stages = set.intersection(*(set(reply.macros) for reply in replies))
        for stage in sorted(stages):
            names = []
            for reply in replies:
                names.extend(name for name in reply.macros[stage] if name not in names)
            macros[stage] = names
    actions &= offered_actions & ~c.SMFIF_SETSYMLIST
    if macros:
        actions |= c.SMFIF_SETSYMLIST
    return messages.Negotiate(version, actions, protocol, macros)
