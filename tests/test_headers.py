"""Tests for miltermanager.headers: chained header edits and the one diff sent to the MTA."""

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from miltermanager.headers import HeaderList, apply_all
from miltermanager.protocol.messages import AddHeader, ChangeHeader, InsertHeader, Quarantine

ORIGINAL = [
    (b"From", b"a@example.org"),
    (b"To", b"b@example.org"),
    (b"Subject", b"hello"),
]
RECEIVED = (b"Received", b"from client by mta")


def edited(original, *children):
    """Apply each child's edits in turn to a fresh list built from original."""
    headers = HeaderList(original)
    for edits in children:
        for edit in edits:
            headers.apply(edit)
    return headers


class HeaderListBasicsTests(SynchronousTestCase):
    def test_iter_and_len(self):
        """Iteration yields the (name, value) pairs in order; len counts the visible headers."""
        headers = HeaderList(ORIGINAL)
        self.assertEqual(list(headers), ORIGINAL)
        self.assertEqual(len(headers), 3)
        self.assertEqual(headers.received_index, 0)
        self.assertEqual(headers.diff(), [])

    def test_append(self):
        """Headers appended as the MTA sends them count as original: no diff."""
        headers = HeaderList()
        for name, value in ORIGINAL:
            headers.append(name, value)
        self.assertEqual(list(headers), ORIGINAL)
        self.assertEqual(headers.diff(), [])
        headers.apply(ChangeHeader(1, b"To", b""))
        self.assertEqual(headers.diff(), [ChangeHeader(1, b"To", b"")])

    def test_copy_is_independent(self):
        """Editing a copy leaves the original list and its diff alone."""
        headers = HeaderList(ORIGINAL)
        other = headers.copy()
        other.apply(InsertHeader(0, b"X-Top", b"1"))
        other.append(b"X-Late", b"2")
        self.assertEqual(list(headers), ORIGINAL)
        self.assertEqual(headers.diff(), [])
        self.assertEqual(other.received_index, 1)
        self.assertEqual(headers.received_index, 0)

    def test_not_a_header_edit(self):
        """Anything but the three header edits is a TypeError."""
        self.assertRaises(TypeError, HeaderList(ORIGINAL).apply, Quarantine(b"why"))
        self.assertRaises(TypeError, apply_all, ORIGINAL, [Quarantine(b"why")])


class AddTests(SynchronousTestCase):
    def test_two_children_add_in_order(self):
        """Adds from child 1 then child 2 land at the end in child order, sent as AddHeaders."""
        headers = edited(
            ORIGINAL,
            [AddHeader(b"X-One", b"1"), AddHeader(b"X-Two", b"2")],
            [AddHeader(b"X-Three", b"3")],
        )
        self.assertEqual(list(headers)[3:], [
            (b"X-One", b"1"), (b"X-Two", b"2"), (b"X-Three", b"3")])
        self.assertEqual(headers.diff(), [
            AddHeader(b"X-One", b"1"), AddHeader(b"X-Two", b"2"), AddHeader(b"X-Three", b"3")])

    def test_add_after_same_name(self):
        """An added header goes after an existing header of the same name, not before it."""
        headers = edited([(b"Subject", b"a"), (b"To", b"b")], [AddHeader(b"Subject", b"c")])
        self.assertEqual(list(headers), [(b"Subject", b"a"), (b"To", b"b"), (b"Subject", b"c")])
        self.assertEqual(headers.diff(), [AddHeader(b"Subject", b"c")])


class InsertTests(SynchronousTestCase):
    def test_insert_zero_goes_above_hidden_received(self):
        """InsertHeader(0) lands above the MTA's Received: and is passed through as index 0."""
        headers = edited(ORIGINAL, [InsertHeader(0, b"X-Top", b"1")])
        self.assertEqual(list(headers), [(b"X-Top", b"1")] + ORIGINAL)
        self.assertEqual(headers.received_index, 1)
        self.assertEqual(headers.diff(), [InsertHeader(0, b"X-Top", b"1")])
        self.assertEqual(apply_all(ORIGINAL, headers.diff(), RECEIVED),
                         [(b"X-Top", b"1"), RECEIVED] + ORIGINAL)

    def test_insert_one_goes_below_hidden_received(self):
        """InsertHeader(1) lands just below the MTA's Received:, above the first visible header."""
        headers = edited(ORIGINAL, [InsertHeader(1, b"X-Top", b"1")])
        self.assertEqual(list(headers), [(b"X-Top", b"1")] + ORIGINAL)
        self.assertEqual(headers.received_index, 0)
        self.assertEqual(headers.diff(), [InsertHeader(1, b"X-Top", b"1")])
        self.assertEqual(apply_all(ORIGINAL, headers.diff(), RECEIVED),
                         [RECEIVED, (b"X-Top", b"1")] + ORIGINAL)

    def test_insert_middle(self):
        """InsertHeader(2) goes between the first and second visible headers."""
        headers = edited(ORIGINAL, [InsertHeader(2, b"X-Mid", b"1")])
        self.assertEqual(list(headers), [ORIGINAL[0], (b"X-Mid", b"1")] + ORIGINAL[1:])
        self.assertEqual(headers.diff(), [InsertHeader(2, b"X-Mid", b"1")])

    def test_insert_at_and_beyond_end_appends(self):
        """An insert at or past the end appends, and is sent as an AddHeader."""
        headers = edited(ORIGINAL, [InsertHeader(4, b"X-End", b"1"),
                                    InsertHeader(99, b"X-Far", b"2")])
        self.assertEqual(list(headers)[3:], [(b"X-End", b"1"), (b"X-Far", b"2")])
        self.assertEqual(headers.diff(), [AddHeader(b"X-End", b"1"), AddHeader(b"X-Far", b"2")])

    def test_inserts_from_two_children(self):
        """Child 2's insert indexes count child 1's headers and the hidden Received: where it now is."""
        headers = edited(
            ORIGINAL,
            [InsertHeader(0, b"X-A", b"1")],     # [A, R, From, To, Subject]
            [InsertHeader(3, b"X-B", b"2")],     # [A, R, From, B, To, Subject]
        )
        self.assertEqual(list(headers), [
            (b"X-A", b"1"), ORIGINAL[0], (b"X-B", b"2"), ORIGINAL[1], ORIGINAL[2]])
        self.assertEqual(headers.diff(), [
            InsertHeader(0, b"X-A", b"1"), InsertHeader(3, b"X-B", b"2")])

    def test_insert_into_empty_list(self):
        """With no visible header, index 0 goes above Received: and index 1 is an append."""
        headers = edited([], [InsertHeader(0, b"X-A", b"1"), InsertHeader(2, b"X-B", b"2")])
        self.assertEqual(list(headers), [(b"X-A", b"1"), (b"X-B", b"2")])
        self.assertEqual(headers.diff(), [InsertHeader(0, b"X-A", b"1"), AddHeader(b"X-B", b"2")])
        self.assertEqual(apply_all([], headers.diff(), RECEIVED),
                         [(b"X-A", b"1"), RECEIVED, (b"X-B", b"2")])


class ChangeTests(SynchronousTestCase):
    def test_change_by_index(self):
        """ChangeHeader picks the index-th header of that name, case-insensitively."""
        original = [(b"X-A", b"1"), (b"To", b"t"), (b"x-a", b"2")]
        headers = edited(original, [ChangeHeader(2, b"X-A", b"two")])
        self.assertEqual(list(headers), [(b"X-A", b"1"), (b"To", b"t"), (b"X-A", b"two")])
        self.assertEqual(headers.diff(), [ChangeHeader(2, b"X-A", b"two")])

    def test_change_index_zero_is_one(self):
        """Index 0 changes the first header of that name."""
        headers = edited(ORIGINAL, [ChangeHeader(0, b"subject", b"bye")])
        self.assertEqual(list(headers)[2], (b"subject", b"bye"))
        self.assertEqual(headers.diff(), [ChangeHeader(1, b"subject", b"bye")])

    def test_change_beyond_count_appends(self):
        """A change past the last header of that name appends a new one."""
        headers = edited(ORIGINAL, [ChangeHeader(2, b"Subject", b"second")])
        self.assertEqual(list(headers), ORIGINAL + [(b"Subject", b"second")])
        self.assertEqual(headers.diff(), [AddHeader(b"Subject", b"second")])

    def test_changed_back(self):
        """A value changed and then changed back produces no edit."""
        headers = edited(ORIGINAL, [ChangeHeader(1, b"Subject", b"bye")],
                         [ChangeHeader(1, b"Subject", b"hello")])
        self.assertEqual(list(headers), ORIGINAL)
        self.assertEqual(headers.diff(), [])

    def test_child2_changes_child1s_header(self):
        """Child 2 changing a header child 1 added gives one AddHeader with the final value."""
        headers = edited(ORIGINAL, [AddHeader(b"X-Spam", b"no")],
                         [ChangeHeader(1, b"X-Spam", b"yes")])
        self.assertEqual(list(headers)[3:], [(b"X-Spam", b"yes")])
        self.assertEqual(headers.diff(), [AddHeader(b"X-Spam", b"yes")])


class DeleteTests(SynchronousTestCase):
    def test_delete_existing(self):
        """An empty value deletes; the diff deletes by the original per-name index."""
        headers = edited(ORIGINAL, [ChangeHeader(1, b"To", b"")])
        self.assertEqual(list(headers), [ORIGINAL[0], ORIGINAL[2]])
        self.assertEqual(headers.diff(), [ChangeHeader(1, b"To", b"")])

    def test_delete_missing(self):
        """Deleting a header that is not there does nothing."""
        headers = edited(ORIGINAL, [ChangeHeader(1, b"Cc", b""), ChangeHeader(2, b"To", b"")])
        self.assertEqual(list(headers), ORIGINAL)
        self.assertEqual(headers.diff(), [])

    def test_deletes_highest_index_first(self):
        """Several deletions of one name are sent from the highest index down."""
        original = [(b"X-A", b"1"), (b"X-A", b"2"), (b"X-A", b"3")]
        headers = edited(original, [ChangeHeader(1, b"X-A", b""), ChangeHeader(2, b"X-A", b"")])
        self.assertEqual(list(headers), [(b"X-A", b"2")])
        self.assertEqual(headers.diff(), [ChangeHeader(3, b"X-A", b""), ChangeHeader(1, b"X-A", b"")])
        self.assertEqual(apply_all(original, headers.diff()), [(b"X-A", b"2")])

    def test_child2_deletes_child1s_header(self):
        """Child 2 deleting a header child 1 added leaves no edit at all."""
        headers = edited(ORIGINAL, [InsertHeader(1, b"X-Spam", b"no")],
                         [ChangeHeader(1, b"X-Spam", b"")])
        self.assertEqual(list(headers), ORIGINAL)
        self.assertEqual(headers.diff(), [])

    def test_delete_header_above_received(self):
        """Deleting a header a child inserted above Received: moves Received: back to the top."""
        headers = edited(ORIGINAL, [InsertHeader(0, b"X-A", b"1")], [ChangeHeader(1, b"X-A", b"")])
        self.assertEqual(headers.received_index, 0)
        self.assertEqual(headers.diff(), [])


class SameNameTests(SynchronousTestCase):
    def test_new_header_above_changed_original(self):
        """A new Subject inserted above the original does not shift the index of the change."""
        original = [(b"Subject", b"old"), (b"To", b"t")]
        headers = edited(
            original,
            [InsertHeader(1, b"Subject", b"new")],       # now Subject #1 is the new one
            [ChangeHeader(2, b"Subject", b"changed"), ChangeHeader(1, b"To", b"")],
        )
        self.assertEqual(list(headers), [(b"Subject", b"new"), (b"Subject", b"changed")])
        self.assertEqual(headers.diff(), [
            ChangeHeader(1, b"Subject", b"changed"),
            ChangeHeader(1, b"To", b""),
            InsertHeader(1, b"Subject", b"new"),
        ])
        self.assertEqual(apply_all(original, headers.diff()), list(headers))

    def test_delete_original_keep_new_same_name(self):
        """Deleting the original Subject while a new Subject exists deletes the original one."""
        original = [(b"Subject", b"old"), (b"To", b"t")]
        headers = edited(original, [AddHeader(b"Subject", b"new")],
                         [ChangeHeader(1, b"Subject", b"")])
        self.assertEqual(list(headers), [(b"To", b"t"), (b"Subject", b"new")])
        self.assertEqual(headers.diff(), [
            ChangeHeader(1, b"Subject", b""), AddHeader(b"Subject", b"new")])

    def test_name_case_change_is_an_edit(self):
        """Changing only the spelling of a name is sent, so the MTA's list matches exactly."""
        headers = edited(ORIGINAL, [ChangeHeader(1, b"SUBJECT", b"hello")])
        self.assertEqual(headers.diff(), [ChangeHeader(1, b"SUBJECT", b"hello")])


class EightBitTests(SynchronousTestCase):
    def test_bytes_pass_through(self):
        """8-bit names and values are kept and compared as bytes, case-folding ASCII only."""
        original = [(b"Subject", b"caf\xc3\xa9"), (b"X-\xc3\x89t\xc3\xa9", b"\xff")]
        headers = edited(original, [
            ChangeHeader(1, b"x-\xc3\xa9T\xc3\xa9", b"\xfe"),   # \xc9 vs \xe9 differ: appended
            ChangeHeader(1, b"x-\xc3\x89T\xc3\xa9", b"\xfd"),   # ASCII case differs: changed
            ChangeHeader(1, b"SUBJECT", b"\xe2\x82\xac\r\n\tmore"),
        ])
        self.assertEqual(list(headers), [
            (b"SUBJECT", b"\xe2\x82\xac\r\n\tmore"), (b"x-\xc3\x89T\xc3\xa9", b"\xfd"),
            (b"x-\xc3\xa9T\xc3\xa9", b"\xfe")])
        self.assertEqual(headers.diff(), [
            ChangeHeader(1, b"SUBJECT", b"\xe2\x82\xac\r\n\tmore"),
            ChangeHeader(1, b"x-\xc3\x89T\xc3\xa9", b"\xfd"),
            AddHeader(b"x-\xc3\xa9T\xc3\xa9", b"\xfe"),
        ])
        self.assertEqual(apply_all(original, headers.diff()), list(headers))


class ApplyAllTests(SynchronousTestCase):
    def test_change_skips_first_physical_header(self):
        """After an insert at 0, Postfix's change lookup skips that header and sees its own Received:."""
        original = [(b"Received", b"from outside")]
        edits = [InsertHeader(0, b"Received", b"top"), ChangeHeader(1, b"Received", b"x")]
        self.assertEqual(apply_all(original, edits, RECEIVED), [
            (b"Received", b"top"), (b"Received", b"x"), (b"Received", b"from outside")])

    def test_diff_is_safe_from_that_quirk(self):
        """Children's change indexes count the headers they saw, and the diff keeps that meaning."""
        original = [(b"Received", b"from outside")]
        headers = edited(original, [InsertHeader(0, b"Received", b"top")],
                         [ChangeHeader(1, b"Received", b"x")])
        self.assertEqual(list(headers), [(b"Received", b"x"), (b"Received", b"from outside")])
        self.assertEqual(headers.diff(), [InsertHeader(0, b"Received", b"x")])
        self.assertEqual(apply_all(original, headers.diff(), RECEIVED),
                         [(b"Received", b"x"), RECEIVED, (b"Received", b"from outside")])


# Few names and many empty values, so that same-name headers and deletions are common.
_names = st.sampled_from([b"Subject", b"subject", b"X-A", b"Received", b"X-\xe9"])
_values = st.sampled_from([b"", b"", b"1", b"2", b"\xff"])
_headers = st.lists(st.tuples(_names, _values.filter(bool)), max_size=6)
_edits = st.lists(st.one_of(
    st.builds(AddHeader, _names, _values),
    st.builds(InsertHeader, st.integers(0, 7), _names, _values),
    st.builds(ChangeHeader, st.integers(0, 3), _names, _values),
), max_size=12)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=600, derandomize=True, deadline=None)
    @given(_headers, _edits, st.integers(0, 12))
    def test_diff_reproduces_list(self, original, edits, split):
        """For any edits by two children, the MTA applying diff() gets exactly the working list."""
        headers = HeaderList(original)
        for edit in edits[:split]:
            headers.apply(edit)
        headers = headers.copy()
        for edit in edits[split:]:
            headers.apply(edit)
        diff = headers.diff()
        self.assertEqual(apply_all(original, diff), list(headers))
        expected = list(headers)
        expected.insert(headers.received_index, RECEIVED)
        self.assertEqual(apply_all(original, diff, RECEIVED), expected)

    @settings(max_examples=200, derandomize=True, deadline=None)
    @given(_headers, _edits)
    def test_lone_child_means_what_postfix_does(self, original, edits):
        """While the MTA's Received: is on top, a child's edits mean the same here and in Postfix."""
        headers = HeaderList(original)
        for count, edit in enumerate(edits):
            if isinstance(edit, ChangeHeader) and headers.received_index:
                edits = edits[:count]
                break
            headers.apply(edit)
        expected = list(headers)
        expected.insert(headers.received_index, RECEIVED)
        self.assertEqual(apply_all(original, edits, RECEIVED), expected)
