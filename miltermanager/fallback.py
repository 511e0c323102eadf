"""What the manager answers when no child milter can: the fallback status."""

from zope.interface import implementer

from miltermanager.merge import parse_status, reply_for
from miltermanager.protocol import messages
from miltermanager.server import IMilter


def fallback_reply(status):
    """The reply for a fallback status name ("accept", "temporary-failure", ...)."""
    return reply_for(parse_status(status))


@implementer(IMilter)
class FallbackMilter:
    """Answer every command once with the fallback status.

    It asks the MTA for every event and never negotiates "no reply", so each
    command really gets its one answer (upstream announced no-reply steps
    and then replied anyway).
    """

    def __init__(self, status):
        self.reply = fallback_reply(status)

    def negotiate(self, offer):
        return messages.Negotiate(offer.version, 0, 0, {})

    def _answer(self, command, macros):
        return self.reply

    connect = helo = mail = rcpt = data = header = end_of_headers = body = _answer
    end_of_message = unknown = _answer

    def abort(self, macros):
        pass

    def close(self):
        pass
