"""Option negotiation arithmetic for protocol versions 2, 3, 4 and 6.

The MTA offers a version, action flags and protocol flags; the milter answers
with what it wants out of that offer. Both sides then know which commands are
sent (the NO* flags and the version) and which get a reply (the NR_* flags).
"""

from dataclasses import dataclass, field

from . import constants as c
from .errors import NegotiationError
from .messages import Negotiate

# Flags a milter may ask for although the MTA did not offer them: libmilter
# drops NODATA and NOUNKNOWN silently when the MTA does not know those steps.
_DROPPED_WHEN_UNOFFERED = c.SMFIP_NODATA | c.SMFIP_NOUNKNOWN
# Bits that raise the largest packet (MDS): whoever echoes one must read packets
# that big. Asked for but not offered, they are dropped silently: the milter
# can read more than it will get, which harms nobody.
_MDS_FLAGS = c.SMFIP_MDS_256K | c.SMFIP_MDS_1M
# Commands that exist only from some protocol version on.
_COMMAND_VERSIONS = {c.UNKNOWN: 3, c.DATA: 4}


def protocol_for_version(version):
    """The step flags an MTA speaking this version knows (Postfix's table)."""
    known = [v for v in c.PROTOCOL_BY_VERSION if v <= version]
    if not known:
        raise NegotiationError(f"protocol version {version} is below 2")
    return c.PROTOCOL_BY_VERSION[max(known)]


def offer(version=c.MAX_VERSION, actions=c.SMFI_CURR_ACTS, protocol=None):
    """The MTA's opening packet, as Postfix and Sendmail send it for version."""
    if protocol is None:
        protocol = protocol_for_version(version)
    return Negotiate(version, actions, protocol, {})


def answer(mta_offer, actions, protocol, macros=None):
    """The milter's reply to an MTA offer, and the NR flags to fake.

    Returns (reply, faked_no_reply): reply holds only flags the MTA offered;
    faked_no_reply are NR_* flags the milter wanted but the MTA did not
    offer, so the milter side must send CONTINUE for those commands itself
    (libmilter does the same). An MDS bit is echoed only if the milter asked
    for it and the MTA offered it: the MTA then sends packets that big, and
    only the milter knows whether it can read them.
    """
    if mta_offer.version < 2:
        raise NegotiationError(f"MTA offers protocol version {mta_offer.version}; 2 is the oldest")
    offered_actions = mta_offer.actions or c.SMFI_V1_ACTS
    offered_protocol = mta_offer.protocol or c.SMFI_V1_PROT
    if actions & ~offered_actions:
        raise NegotiationError(
            f"milter wants actions 0x{actions:x}; the MTA offers only 0x{offered_actions:x}")
    faked_no_reply = protocol & c.NO_REPLY_FLAGS & ~offered_protocol
    protocol &= ~faked_no_reply
    protocol &= ~((_DROPPED_WHEN_UNOFFERED | _MDS_FLAGS) & ~offered_protocol)
    if protocol & ~offered_protocol:
        raise NegotiationError(
            f"milter wants protocol flags 0x{protocol:x}; "
            f"the MTA offers only 0x{offered_protocol:x}")
    if macros and not offered_actions & c.SMFIF_SETSYMLIST:
        macros = None
    elif macros:
        actions |= c.SMFIF_SETSYMLIST
    reply = Negotiate(min(c.MAX_VERSION, mta_offer.version), actions, protocol,
                      dict(macros or {}))
    return reply, faked_no_reply


def accept(mta_offer, reply):
    """Check a milter's reply against what the MTA offered; return the Options.

    Lenient like libmilter and Postfix where that is safe: a lower version is
    fine (newer commands are then not sent), step bits not offered are ignored.
    """
    if reply.version < 2 or reply.version > mta_offer.version:
        raise NegotiationError(
            f"milter answers protocol version {reply.version}; "
            f"offered {mta_offer.version}")
    if reply.actions & ~mta_offer.actions:
        raise NegotiationError(
            f"milter asks for actions 0x{reply.actions:x}; "
            f"offered 0x{mta_offer.actions:x}")
    # Mask by the offer, not by the reply's version: a v2-v4 milter may ask for
    # NR_HDR (NOHREPL, Sendmail 8.13) and Postfix honours it; Options.sends
    # already keeps back the commands a lower version lacks.
    offered = mta_offer.protocol or c.SMFI_V1_PROT
    return Options(reply.version, reply.actions, reply.protocol & offered, reply.macros)


@dataclass(slots=True)
class Options:
    """What a negotiation settled: which commands are sent, which are answered."""

    version: int = c.MAX_VERSION
    actions: int = c.SMFI_CURR_ACTS
    protocol: int = 0
    macros: dict = field(default_factory=dict)

    def sends(self, code):
        """Does the MTA send this command at all?"""
        if self.version < _COMMAND_VERSIONS.get(code, 0):
            return False
        return not self.protocol & c.NO_FLAG.get(code, 0)

    def replies(self, code):
        """Does the milter answer this command?"""
        if code in c.COMMANDS_WITHOUT_REPLY:
            return False
        return not self.protocol & c.NO_REPLY_FLAG.get(code, 0)

    def allows(self, action_flag):
        return bool(self.actions & action_flag)

    @property
    def max_data_size(self):
        """The largest packet data the peer agreed to take."""
        if self.protocol & c.SMFIP_MDS_1M:
            return 1048575
        if self.protocol & c.SMFIP_MDS_256K:
            return 262143
        return c.LIBMILTER_MAX_DATA_SIZE

    def macro_names(self, stage_code):
        """The macro names the milter asked for at a stage, or None for the MTA's default."""
        return self.macros.get(c.MACRO_STAGE_INDEXES.get(stage_code))
