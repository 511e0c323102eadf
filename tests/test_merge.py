"""Tables for miltermanager.merge: verdicts, reply codes, message edits, negotiation.

Every expected result is written out; nothing here recomputes the rules.
"""

from twisted.trial.unittest import SynchronousTestCase

from miltermanager.body import BodyChunks
from miltermanager.headers import HeaderList
from miltermanager.merge import (
    Changes, Status, apply, final_replies, merge_negotiation, merge_verdicts, negotiation_covers,
    reply_for, status_of,
)
from miltermanager.protocol import constants as c
from miltermanager.protocol.messages import (
    ACCEPT, CONTINUE, DISCARD, REJECT, SHUTDOWN, SKIP, TEMPFAIL, AddHeader, AddRecipient,
    AddRecipientPar, ChangeFrom, ChangeHeader, DeleteRecipient, InsertHeader, Negotiate,
    Quarantine, ReplaceBody, ReplyCode,
)

A, S, C, T, R, D, N = (Status.ACCEPT, Status.SKIP, Status.CONTINUE, Status.TEMPORARY_FAILURE,
                       Status.REJECT, Status.DISCARD, Status.NOT_CHANGE)
Y550 = ReplyCode(b"550 5.7.1 go away")
Y551 = ReplyCode(b"550 5.7.1 really go away")
Y451 = ReplyCode(b"451 4.7.1 later")


class StatusOfTests(SynchronousTestCase):
    """Which Status each final reply stands for."""

    TABLE = [
        (CONTINUE, C), (ACCEPT, A), (REJECT, R), (TEMPFAIL, T), (DISCARD, D), (SKIP, S),
        (SHUTDOWN, T), (Y550, R), (Y451, T),
    ]

    def test_table(self):
        """Each reply maps to the status written beside it."""
        self.assertEqual([(reply, status_of(reply)) for reply, _ in self.TABLE], self.TABLE)


class ReplyForTests(SynchronousTestCase):
    """What the MTA gets for a merged status, with or without a child's reply code."""

    TABLE = [
        # status, child's reply, what the MTA gets
        (N, None, CONTINUE),
        (C, None, CONTINUE),
        (A, None, ACCEPT),
        (S, None, SKIP),
        (T, None, TEMPFAIL),
        (R, None, REJECT),
        (D, None, DISCARD),
        (R, Y550, Y550),
        (T, Y451, Y451),
        (R, Y451, REJECT),  # a 4xx text never goes out with a reject
        (T, Y550, TEMPFAIL),  # nor a 5xx text with a temporary failure
        (D, Y550, DISCARD),
    ]

    def test_table(self):
        """Each status and reply code gives the reply written beside it."""
        self.assertEqual([(status, reply, reply_for(status, reply))
                          for status, reply, _ in self.TABLE], self.TABLE)


class MergeVerdictsTests(SynchronousTestCase):
    """The envelope merge: precedence, the deciding child, which reply code goes out."""

    TABLE = [
        # answers (status, reply, name) -> (status, reply, decided by)
        ([], (N, None, None)),
        ([(C, None, "one")], (C, None, "one")),
        ([(A, None, "one"), (C, None, "two")], (C, None, "two")),
        ([(C, None, "one"), (A, None, "two")], (C, None, "one")),
        ([(A, None, "one"), (A, None, "two")], (A, None, "one")),
        ([(S, None, "one"), (A, None, "two")], (S, None, "one")),
        ([(C, None, "one"), (S, None, "two")], (C, None, "one")),
        ([(T, None, "one"), (C, None, "two")], (T, None, "one")),
        ([(C, None, "one"), (R, None, "two")], (R, None, "two")),
        ([(R, None, "one"), (T, None, "two")], (R, None, "one")),
        ([(T, None, "one"), (R, None, "two")], (R, None, "two")),
        ([(R, None, "one"), (D, None, "two")], (D, None, "two")),
        ([(D, None, "one"), (R, Y550, "two")], (D, None, "one")),
        ([(R, Y550, "one"), (C, None, "two")], (R, Y550, "one")),
        # the reply code of the deciding status is kept, not the last one seen
        ([(R, Y550, "one"), (T, Y451, "two")], (R, Y550, "one")),
        ([(T, Y451, "one"), (R, Y550, "two")], (R, Y550, "two")),
        ([(T, Y451, "one"), (R, None, "two")], (R, None, "two")),
        # same status twice: the first child decides, the last reply code goes out
        ([(R, Y550, "one"), (R, Y551, "two")], (R, Y551, "one")),
        ([(R, Y550, "one"), (R, None, "two")], (R, Y550, "one")),
    ]

    def test_table(self):
        """Each set of answers merges to the verdict written beside it."""
        self.assertEqual([(answers, merge_verdicts(answers)) for answers, _ in self.TABLE],
                         self.TABLE)

    def test_carried_fallback_starts_the_merge(self):
        """A fallback carried over counts as an answer of the child it came from."""
        self.assertEqual(merge_verdicts([(C, None, "two")], T, None, "down"), (T, None, "down"))
        self.assertEqual(merge_verdicts([(R, Y550, "two")], T, None, "down"), (R, Y550, "two"))
        self.assertEqual(merge_verdicts([], A, None, "down"), (A, None, "down"))


def headers(*pairs):
    return HeaderList(pairs)


ORIGINAL = ((b"From", b"a@example.net"), (b"Subject", b"hi"))


class ApplyTests(SynchronousTestCase):
    """One child's edits applied to what the children before it changed."""

    def test_no_edits_is_the_same_changes(self):
        """A child that changed nothing leaves the very same Changes."""
        changes = Changes(headers(*ORIGINAL))
        self.assertIs(apply(changes, []), changes)

    def test_header_edits_leave_the_input_alone(self):
        """Header edits apply to a copy: the Changes given are not modified."""
        changes = Changes(headers(*ORIGINAL))
        after = apply(changes, [AddHeader(b"X-Spam", b"no")])
        self.assertEqual(list(changes.headers), list(ORIGINAL))
        self.assertEqual(list(after.headers), [*ORIGINAL, (b"X-Spam", b"no")])

    def test_table(self):
        """Each sequence of edits gives the changes written beside it."""
        table = [
            # edits -> (headers, body bytes or None, change_from, quarantine, recipients)
            ([AddHeader(b"X-A", b"1")],
             ([*ORIGINAL, (b"X-A", b"1")], None, None, None, ())),
            ([ChangeHeader(1, b"Subject", b"bye")],
             ([(b"From", b"a@example.net"), (b"Subject", b"bye")], None, None, None, ())),
            ([ChangeHeader(1, b"Subject", b"")],
             ([(b"From", b"a@example.net")], None, None, None, ())),
            ([InsertHeader(0, b"X-First", b"1")],
             ([(b"X-First", b"1"), *ORIGINAL], None, None, None, ())),
            ([ReplaceBody(b"new "), ReplaceBody(b"body")],
             (list(ORIGINAL), b"new body", None, None, ())),
            ([ChangeFrom(b"<b@example.net>", None), ChangeFrom(b"<c@example.net>", None)],
             (list(ORIGINAL), None, ChangeFrom(b"<c@example.net>", None), None, ())),
            ([Quarantine(b"first"), Quarantine(b"second")],
             (list(ORIGINAL), None, None, Quarantine(b"second"), ())),
            ([AddRecipient(b"<x@example.org>"), DeleteRecipient(b"<y@example.org>"),
              AddRecipientPar(b"<z@example.org>", b"NOTIFY=NEVER")],
             (list(ORIGINAL), None, None, None,
              (AddRecipient(b"<x@example.org>"), DeleteRecipient(b"<y@example.org>"),
               AddRecipientPar(b"<z@example.org>", b"NOTIFY=NEVER")))),
        ]
        got = []
        for edits, _ in table:
            after = apply(Changes(headers(*ORIGINAL)), edits)
            body = None if after.body is None else b"".join(after.body.chunks(65535))
            got.append((edits, (list(after.headers), body, after.change_from, after.quarantine,
                                after.recipients)))
        self.assertEqual(got, table)

    def test_second_child_builds_on_the_first(self):
        """Edits chain: recipients accumulate, a new body replaces the last, headers stack."""
        first = apply(Changes(headers(*ORIGINAL)), [
            AddHeader(b"X-A", b"1"), ReplaceBody(b"one"), AddRecipient(b"<x@example.org>")])
        second = apply(first, [
            ChangeHeader(1, b"X-A", b"2"), ReplaceBody(b"two"),
            DeleteRecipient(b"<y@example.org>")])
        self.assertEqual(list(second.headers), [*ORIGINAL, (b"X-A", b"2")])
        self.assertEqual(b"".join(second.body.chunks(10)), b"two")
        self.assertEqual(second.recipients, (AddRecipient(b"<x@example.org>"),
                                             DeleteRecipient(b"<y@example.org>")))
        self.assertEqual(b"".join(first.body.chunks(10)), b"one")

    def test_a_later_child_without_body_keeps_the_replaced_one(self):
        """A child that does not replace the body keeps the body replaced before it."""
        first = apply(Changes(headers(*ORIGINAL)), [ReplaceBody(b"one")])
        second = apply(first, [AddHeader(b"X-B", b"1")])
        self.assertIs(second.body, first.body)


class FinalRepliesTests(SynchronousTestCase):
    """The MTA's answer to end of message: the edits in upstream's order, then the verdict."""

    def test_nothing_changed(self):
        """No edit: only the verdict; skip and no verdict end the message as continue."""
        unchanged = Changes(headers(*ORIGINAL))
        self.assertEqual(
            [(status, final_replies(status, unchanged)) for status in (N, A, S, C)],
            [(N, [CONTINUE]), (A, [ACCEPT]), (S, [CONTINUE]), (C, [CONTINUE])])

    def test_every_kind_of_edit_in_order(self):
        """Body, header diff, sender, recipients, quarantine, verdict: in that order."""
        changes = Changes(
            headers(*ORIGINAL), body=BodyChunks([b"new body"]),
            change_from=ChangeFrom(b"<b@example.net>", None),
            quarantine=Quarantine(b"held"),
            recipients=(AddRecipient(b"<x@example.org>"), DeleteRecipient(b"<y@example.org>")))
        changes = apply(changes, [AddHeader(b"X-A", b"1"), ChangeHeader(1, b"Subject", b"bye")])
        self.assertEqual(final_replies(C, changes), [
            ReplaceBody(b"new body"),
            ChangeHeader(1, b"Subject", b"bye"),
            AddHeader(b"X-A", b"1"),
            ChangeFrom(b"<b@example.net>", None),
            AddRecipient(b"<x@example.org>"),
            DeleteRecipient(b"<y@example.org>"),
            Quarantine(b"held"),
            CONTINUE,
        ])

    def test_a_final_verdict_carries_no_edits(self):
        """Temporary failure, reject and discard go out alone."""
        changes = apply(Changes(headers(*ORIGINAL)), [AddHeader(b"X-A", b"1")])
        self.assertEqual([final_replies(status, changes) for status in (T, R, D)],
                         [[TEMPFAIL], [REJECT], [DISCARD]])

    def test_long_body_in_packets_of_65535(self):
        """A replaced body goes to the MTA in packets of at most 65535 bytes."""
        changes = Changes(headers(*ORIGINAL), body=BodyChunks([b"x" * 70000, b"y" * 70000]))
        replies = final_replies(A, changes)
        self.assertEqual([len(reply.chunk) for reply in replies[:-1]], [65535, 65535, 8930])
        self.assertEqual(b"".join(reply.chunk for reply in replies[:-1]),
                         b"x" * 70000 + b"y" * 70000)
        self.assertEqual(replies[-1], ACCEPT)


OFFER = Negotiate(6, 0x1FF, 0x1FFFFF, {})
NR_ALL = (c.SMFIP_NR_CONN | c.SMFIP_NR_HELO | c.SMFIP_NR_MAIL | c.SMFIP_NR_RCPT
          | c.SMFIP_NR_DATA | c.SMFIP_NR_UNKN | c.SMFIP_NR_EOH | c.SMFIP_NR_BODY
          | c.SMFIP_NR_HDR)


class MergeNegotiationTests(SynchronousTestCase):
    """The manager's negotiation reply to the MTA from its children's replies."""

    def test_table(self):
        """Each set of children's replies gives the reply written beside it."""
        mds_offer = Negotiate(6, 0x1FF, 0x1FFFFF | c.SMFIP_MDS_256K, {})
        # Asked of the MTA whenever it offers them, whatever the children said.
        held = c.SMFIP_NR_HDR | c.SMFIP_NR_EOH
        table = [
            # (offer, children's replies) -> the manager's reply
            ((OFFER, []), Negotiate(6, 0, 0, {})),
            ((OFFER, [Negotiate(6, 0x01, 0, {})]), Negotiate(6, 0x01, held, {})),
            # actions ORed; no-event flags dropped (the manager asks for every event)
            ((OFFER, [Negotiate(6, 0x01, c.SMFIP_NOCONNECT | c.SMFIP_NOBODY, {}),
                      Negotiate(6, 0x10, c.SMFIP_NOCONNECT, {})]),
             Negotiate(6, 0x11, held, {})),
            # no-reply flags ANDed
            ((OFFER, [Negotiate(6, 0, c.SMFIP_NR_CONN | c.SMFIP_NR_HELO, {}),
                      Negotiate(6, 0, c.SMFIP_NR_CONN, {})]),
             Negotiate(6, 0, c.SMFIP_NR_CONN | held, {})),
            ((OFFER, [Negotiate(6, 0, NR_ALL, {})]), Negotiate(6, 0, NR_ALL, {})),
            # SKIP and RCPT_REJ are the manager's own; leading space if any child asks
            ((OFFER, [Negotiate(6, 0, c.SMFIP_SKIP | c.SMFIP_RCPT_REJ, {}),
                      Negotiate(6, 0, c.SMFIP_HDR_LEADSPC, {})]),
             Negotiate(6, 0, c.SMFIP_HDR_LEADSPC | held, {})),
            # MDS only when every child took it
            ((mds_offer, [Negotiate(6, 0, c.SMFIP_MDS_256K, {}), Negotiate(6, 0, 0, {})]),
             Negotiate(6, 0, held, {})),
            ((mds_offer, [Negotiate(6, 0, c.SMFIP_MDS_256K, {}),
                          Negotiate(6, 0, c.SMFIP_MDS_256K, {})]),
             Negotiate(6, 0, c.SMFIP_MDS_256K | held, {})),
            # never a flag the MTA did not offer (0x7F: the no-event flags, no NR_HDR)
            ((Negotiate(2, 0x0F, 0x7F, {}), [Negotiate(2, 0x1FF, c.SMFIP_NR_CONN, {})]),
             Negotiate(2, 0x0F, 0, {})),
            # an MTA offering only no reply to the end of headers gets asked only that
            ((Negotiate(6, 0x1FF, c.SMFIP_NR_EOH, {}), [Negotiate(6, 0, 0, {})]),
             Negotiate(6, 0, c.SMFIP_NR_EOH, {})),
            # symbol lists unioned where every child has one for the stage
            ((OFFER, [Negotiate(6, 0, 0, {0: [b"j"], 2: [b"i"]}),
                      Negotiate(6, 0, 0, {0: [b"{daemon_name}", b"j"]})]),
             Negotiate(6, c.SMFIF_SETSYMLIST, held, {0: [b"j", b"{daemon_name}"]})),
        ]
        self.assertEqual([(case, merge_negotiation(*case)) for case, _ in table], table)


class NegotiationCoversTests(SynchronousTestCase):
    """Whether what the MTA was asked for gives a child all that its negotiation asks for."""

    WANTED = Negotiate(6, c.SMFIF_ADDHDRS | c.SMFIF_CHGHDRS | c.SMFIF_SETSYMLIST,
                       c.SMFIP_NR_HDR, {2: [b"{auth_authen}", b"i"]})

    def covers(self, actions=0, protocol=0, macros=None):
        return negotiation_covers(self.WANTED, Negotiate(6, actions, protocol, macros or {}))

    def test_fewer_actions(self):
        self.assertTrue(self.covers(c.SMFIF_ADDHDRS))

    def test_an_action_not_asked_for(self):
        self.assertFalse(self.covers(c.SMFIF_ADDHDRS | c.SMFIF_CHGBODY))

    def test_steps_and_no_reply_flags_are_the_managers_business(self):
        self.assertTrue(self.covers(0, c.SMFIP_NOHELO | c.SMFIP_NR_CONN | c.SMFIP_NR_RCPT))

    def test_leading_space_not_asked_for(self):
        self.assertFalse(self.covers(0, c.SMFIP_HDR_LEADSPC))

    def test_macros_asked_for(self):
        self.assertTrue(self.covers(c.SMFIF_SETSYMLIST, 0, {2: [b"i"]}))

    def test_a_macro_not_asked_for(self):
        self.assertFalse(self.covers(c.SMFIF_SETSYMLIST, 0, {2: [b"{mail_addr}"]}))

    def test_a_stage_left_to_the_mtas_default(self):
        self.assertFalse(self.covers(c.SMFIF_SETSYMLIST, 0, {3: [b"{rcpt_addr}"]}))
