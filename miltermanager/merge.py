"""Merging children's answers into one: verdicts, reply codes, message edits, negotiation.

Pure functions over protocol messages; the session calls them, tests table them.
"""

import enum
from dataclasses import dataclass, replace

from .body import BodyChunks
from .headers import HeaderList
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


def merge_verdicts(answers, status=None, reply=None, decided_by=None):
    """The verdict for one envelope command from every child's answer.

    answers: (status, reply, child name) per child, reply being the child's
    own ReplyCode when it said what status says, else None. status, reply
    and decided_by start the merge (a fallback carried over from before).
    Returns (status, reply, decided_by): the strongest status (the first
    child to reach it decides it) and the reply code of the last child that
    gave one for that status; reply_for(status, reply) is what the MTA gets.
    """
    if status is None:
        status = Status.NOT_CHANGE
    for child_status, child_reply, name in answers:
        if child_status > status:
            status, decided_by = child_status, name
            reply = None
        if child_reply is not None and child_status is status:
            reply = child_reply
    return status, reply, decided_by


@dataclass(slots=True)
class Changes:
    """What the children changed in one message so far: what the MTA will be told at its end.

    apply() makes a new one and never modifies the one it is given (not
    frozen only because a frozen dataclass is slow to make, once per message).

    headers: the working HeaderList (original headers with every edit
    applied). body: the replaced body (a BodyChunks, or anything with
    chunks(size)), None while unchanged. change_from and quarantine: the
    last ones. recipients: AddRecipient, AddRecipientPar and DeleteRecipient
    in the order they came.
    """

    headers: HeaderList
    body: object = None
    change_from: messages.ChangeFrom | None = None
    quarantine: messages.Quarantine | None = None
    recipients: tuple = ()


_RECIPIENT_EDITS = (messages.AddRecipient, messages.AddRecipientPar, messages.DeleteRecipient)
_HEADER_EDITS = (messages.AddHeader, messages.InsertHeader, messages.ChangeHeader)


def apply(changes, edits):
    """changes after one child's edits (already allowed for it), in their order.

    changes itself is left as it was. A child's ReplaceBody packets form its
    new body, which replaces any earlier child's; ChangeFrom and Quarantine
    replace earlier ones; recipient edits accumulate; header edits apply to
    a copy of the header list as Postfix would apply them.
    """
    if not edits:
        return changes
    headers = changes.headers
    copied = False
    body_chunks = None
    change_from = changes.change_from
    quarantine = changes.quarantine
    recipients = list(changes.recipients)
    for edit in edits:
        kind = type(edit)
        if kind is messages.ReplaceBody:
            if body_chunks is None:
                body_chunks = []
            body_chunks.append(bytes(edit.chunk))
        elif kind is messages.ChangeFrom:
            change_from = edit
        elif kind is messages.Quarantine:
            quarantine = edit
        elif kind in _RECIPIENT_EDITS:
            recipients.append(edit)
        elif kind in _HEADER_EDITS:
            if not copied:
                headers = headers.copy()
                copied = True
            headers.apply(edit)
        else:
            raise TypeError(f"not a message edit: {edit!r}")
    body = changes.body if body_chunks is None else BodyChunks(body_chunks)
    return replace(changes, headers=headers, body=body, change_from=change_from,
                   quarantine=quarantine, recipients=tuple(recipients))


def final_replies(status, changes):
    """The MTA's answer to end of message: every change as one set of edits, then the verdict.

    Upstream's order: the replaced body, the header diff, the sender, the
    recipients, the quarantine, the final reply. A temporary failure,
    reject or discard carries no edits; a skip ends the message as continue.
    """
    if status is Status.SKIP or status is Status.NOT_CHANGE:
        status = Status.CONTINUE
    final = reply_for(status)
    if status >= Status.TEMPORARY_FAILURE:
        return [final]
    replies = []
    if changes.body is not None:
        replies.extend(messages.ReplaceBody(chunk)
                       for chunk in changes.body.chunks(c.MAX_CHUNK_SIZE))
    replies.extend(changes.headers.diff())
    if changes.change_from is not None:
        replies.append(changes.change_from)
    replies.extend(changes.recipients)
    if changes.quarantine is not None:
        replies.append(changes.quarantine)
    replies.append(final)
    return replies


# Step flags the manager itself takes care of and never asks the MTA for.
_MANAGER_OWN_STEPS = c.NO_FLAGS | c.SMFIP_SKIP | c.SMFIP_RCPT_REJ
# "No reply" steps the manager asks the MTA for whatever its children said: a verdict
# reached at a header or the end of headers goes with the next reply the MTA reads
# (Session._hold). Not the body: its replies pace the MTA to the children's speed.
MANAGER_NO_REPLY = c.SMFIP_NR_HDR | c.SMFIP_NR_EOH
_MDS_FLAGS = c.SMFIP_MDS_256K | c.SMFIP_MDS_1M


def merge_negotiation(mta_offer, replies):
    """The manager's reply to the MTA from its children's negotiation replies.

    Actions are ORed. A "no reply" step is kept only if every child has it,
    and so is a larger packet size (MDS): the manager never promises the MTA
    what one child could not take. Headers and the end of headers are the
    exception (MANAGER_NO_REPLY): the MTA need not wait for them, whatever
    the children answer, when it offers that. The manager asks for every event
    (conditions and later children may need what one child skips), takes on
    SKIP and RCPT_REJ itself, and asks for leading spaces when any child
    does. Symbol lists are unioned per stage,
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
    every_child = c.NO_REPLY_FLAGS | _MDS_FLAGS  # kept only if every child has them
    leading_space = 0
    for reply in replies:
        actions |= reply.actions
        every_child &= reply.protocol
        leading_space |= reply.protocol & c.SMFIP_HDR_LEADSPC
    protocol = ((every_child | leading_space | MANAGER_NO_REPLY) & offered_protocol
                & ~_MANAGER_OWN_STEPS)
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


def negotiation_covers(wanted, reply):
    """Whether an MTA asked for wanted gives a child that negotiated reply all it asked for.

    The manager takes care of a child's own steps and "no reply" flags
    whatever the MTA was asked, and of its packet size; what it cannot make
    up for is an action, a leading space or a macro the MTA was not asked
    for. A stage's macros count as asked for only if the MTA was given a
    list for that stage holding every name the child lists.
    """
    if reply.actions & ~wanted.actions & ~c.SMFIF_SETSYMLIST:
        return False
    if reply.protocol & c.SMFIP_HDR_LEADSPC and not wanted.protocol & c.SMFIP_HDR_LEADSPC:
        return False
    for stage, names in reply.macros.items():
        listed = wanted.macros.get(stage)
        if listed is None or not set(names) <= set(listed):
            return False
    return True
