"""The greylisting milter: a 451 per unknown (network, sender, recipient), X-Greylist at the end.

It fails open: a database error, an odd address or a bug lets the recipient
pass with a log line, because greylisting only delays spam and must never
lose or block mail. A failing store (SQLite or Redis) is logged once when
it starts failing and once when it answers again (outage.StoreOutage).
"""

import email.utils

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from ..protocol import constants as c
from ..protocol import messages
from ..server import Milter, MilterServerFactory
from .metrics import BAD_INPUT, ERROR, NOT_IP, WHITELISTED
from .outage import StoreOutage
from .store import (
    STORE_ERRORS, BadInput, Reason, Triplet, normalize_address, normalize_recipient,
)

NAME = "milter-manager-greylist"
HEADER_NAME = b"X-Greylist"

# Events the milter never looks at: the MTA need not send them.
NO_EVENTS = (c.SMFIP_NOHELO | c.SMFIP_NODATA | c.SMFIP_NOHDRS | c.SMFIP_NOEOH
             | c.SMFIP_NOBODY | c.SMFIP_NOUNKNOWN)
# Connect and MAIL are always continued: the MTA need not wait for that.
NO_REPLIES = c.SMFIP_NR_CONN | c.SMFIP_NR_MAIL
# The MTA's host name for the header, asked for at connect (macro stage 0).
MACROS = {0: [b"j"]}


def reply_text(remaining):
    """The SMTP reply for a greylisted recipient."""
    return b"451 4.7.1 Greylisted, please try again in %d seconds" % remaining


def header_value(delayed, host, now):
    """The X-Greylist value: "delayed N seconds by milter-manager-greylist at HOST; DATE"."""
    date = email.utils.formatdate(now, localtime=True)
    return b"delayed %d seconds by %s at %s; %s" % (
        int(delayed), NAME.encode(), host, date.encode())


class GreylistMilter(Milter):
    """One MTA connection: greylist each RCPT on an IGreylist, add X-Greylist at the end.

    greylist provides IGreylist; clock (IReactorTime) dates the header;
    hostname (bytes) names this host in it when the MTA sends no j macro;
    metrics (a metrics.GreylistMetrics, or None) is told of each recipient's
    decision; outage (an outage.StoreOutage, shared by the process's milters)
    of each store failure and answer.
    """

    log = Logger()
    actions = c.SMFIF_ADDHDRS

    def __init__(self, greylist, clock, hostname=b"localhost", server=None, metrics=None,
                 outage=None):
        super().__init__(server)
        self.greylist = greylist
        self.clock = clock
        self.hostname = hostname
        self.metrics = metrics
        self.outage = outage if outage is not None else StoreOutage(clock, self.log)
        self.may_add_header = True
        self.network = None  # None: this client is not greylisted
        self.not_greylisted = NOT_IP  # why, for the metrics, when network is None
        self.client = None  # its address, for log lines
        self._reset_message()

    def _reset_message(self):
        self.mail_seen = False
        self.sender = None
        self.greylisting = False  # does this message go through greylisting at all?
        self.delayed = None  # the longest delay of a recipient that passed by retrying

    def negotiate(self, offer):
        offered_actions = offer.actions or c.SMFI_V1_ACTS
        offered_steps = offer.protocol or c.SMFI_V1_PROT
        self.may_add_header = bool(offered_actions & c.SMFIF_ADDHDRS)
        # NR_* the MTA lacks are answered by the server for us; NO* must be offered.
        return messages.Negotiate(offer.version, self.actions & offered_actions,
                                  (NO_EVENTS & offered_steps) | NO_REPLIES, dict(MACROS))

    def connect(self, command, macros):
        self.network = None
        self.client = None
        self.not_greylisted = NOT_IP
        if command.family not in (c.FAMILY_INET, c.FAMILY_INET6):
            self.log.debug("[greylist][pass] client {host} is not on IP: not greylisted",
                           host=command.hostname)
            return messages.CONTINUE
        self.client = command.address.decode("ascii", "replace")
        try:
            if self.greylist.is_whitelisted(command.address):
                self.not_greylisted = WHITELISTED
                self.log.debug("[greylist][pass] client {client} is whitelisted",
                               client=self.client)
                return messages.CONTINUE
            self.network = self.greylist.client_network(command.address)
        except BadInput as error:
            self.not_greylisted = BAD_INPUT
            self.log.warn("[greylist][pass] odd client address, not greylisted: {error}",
                          error=error)
        return messages.CONTINUE

    def mail(self, command, macros):
        self._reset_message()
        self.mail_seen = True
        if self.network is None:
            return messages.CONTINUE
        try:
            self.sender = normalize_address(command.sender)
        except BadInput as error:
            self.log.warn("[greylist][pass] odd sender from {client}, not greylisted: {error}",
                          client=self.client, error=error)
            return messages.CONTINUE
        self.greylisting = True
        return messages.CONTINUE

    def rcpt(self, command, macros):
        if not self.greylisting:
            if self.metrics is not None:
                # With a network, only an odd sender or a missing MAIL stop greylisting.
                self.metrics.decided(True, self.not_greylisted if self.network is None
                                     else BAD_INPUT)
            if self.network is not None and not self.mail_seen:
                self.log.warn("[greylist][pass] recipient {recipient!r} from {client} without "
                              "a sender: not greylisted",
                              recipient=command.recipient, client=self.client)
            return messages.CONTINUE
        try:
            triplet = Triplet(self.network, self.sender, normalize_recipient(command.recipient))
        except BadInput as error:
            if self.metrics is not None:
                self.metrics.decided(True, BAD_INPUT)
            self.log.warn("[greylist][pass] odd recipient from {client}, not greylisted: "
                          "{error}", client=self.client, error=error)
            return messages.CONTINUE
        asked = self.clock.seconds()
        try:
            verdict = self.greylist.decide(triplet)
        except Exception as error:
            return self._failed_now(error, triplet, asked)
        if isinstance(verdict, Deferred):
            return verdict.addCallback(self._decided, triplet, asked).addErrback(
                self._failed, triplet, asked)
        return self._decided(verdict, triplet, asked)

    def _count(self, asked, passed, reason):
        if self.metrics is not None:
            self.metrics.store_answered(max(0.0, self.clock.seconds() - asked))
            self.metrics.decided(passed, reason)

    def _decided(self, verdict, triplet, asked):
        self.outage.answered()
        self._count(asked, verdict.passed, verdict.reason.value)
        if verdict.passed:
            if verdict.reason is Reason.RETRIED:
                self.log.info(
                    "[greylist][pass] {network} <{sender}> -> <{recipient}> retried after "
                    "{delayed} s", network=triplet.network, sender=triplet.sender,
                    recipient=triplet.recipient, delayed=int(verdict.delayed))
                self.delayed = max(self.delayed or 0.0, verdict.delayed)
            else:
                self.log.debug(
                    "[greylist][pass] {network} <{sender}> -> <{recipient}>: {reason}",
                    network=triplet.network, sender=triplet.sender,
                    recipient=triplet.recipient, reason=verdict.reason.value)
            return messages.CONTINUE
        self.log.info(
            "[greylist][greylisted] {network} <{sender}> -> <{recipient}> ({reason}): retry "
            "in {remaining} s", network=triplet.network, sender=triplet.sender,
            recipient=triplet.recipient, reason=verdict.reason.value,
            remaining=verdict.remaining)
        return messages.ReplyCode(reply_text(verdict.remaining))

    def _failed_now(self, error, triplet, asked):
        self._count_error(asked, isinstance(error, STORE_ERRORS))
        if isinstance(error, STORE_ERRORS):
            self.outage.failed(error, triplet)
        else:
            self.log.failure("[greylist][error] deciding on {triplet} failed; passing "
                             "(fail open)", triplet=triplet)
        return messages.CONTINUE

    def _failed(self, failure, triplet, asked):
        if failure.check(CancelledError):
            return None  # the MTA went away; nobody reads the answer
        self._count_error(asked, bool(failure.check(*STORE_ERRORS)))
        if failure.check(*STORE_ERRORS):
            self.outage.failed(failure.value, triplet)
        else:
            self.log.failure("[greylist][error] deciding on {triplet} failed; passing "
                             "(fail open)", failure, triplet=triplet)
        return messages.CONTINUE

    def _count_error(self, asked, database):
        self._count(asked, True, ERROR)
        if self.metrics is not None:
            self.metrics.failed("decide", "database" if database else "internal")

    def end_of_message(self, command, macros):
        delayed = self.delayed
        self._reset_message()
        if delayed is None or not self.may_add_header:
            return messages.CONTINUE
        host = macros.get(b"j") or self.hostname
        return [messages.AddHeader(HEADER_NAME, header_value(delayed, host, self.clock.seconds())),
                messages.CONTINUE]

    def abort(self, macros):
        self._reset_message()


def milter_factory(greylist, clock, hostname=b"localhost", metrics=None, outage=None):
    """The milter_factory for MilterServerFactory: one GreylistMilter per MTA connection.

    They share outage (a new outage.StoreOutage by default), so that a store
    outage is logged once for all connections.
    """
    if outage is None:
        outage = StoreOutage(clock, GreylistMilter.log)

    def build(server):
        return GreylistMilter(greylist, clock, hostname, server, metrics, outage)
    return build


def server_factory(greylist, clock, hostname=b"localhost", metrics=None, outage=None):
    """A MilterServerFactory serving GreylistMilters that fails open on a bug too.

    Listen with it (connection_spec.parse(spec).server_endpoint(reactor).listen)
    to run the greylisting milter in process, as the program does.
    """
    factory = MilterServerFactory(milter_factory(greylist, clock, hostname, metrics, outage),
                                  clock=clock)
    factory.error_reply = messages.CONTINUE
    factory.noisy = False
    return factory
