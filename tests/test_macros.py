"""Tests for miltermanager.macros: per-stage storage, lookup order, name forms, clearing."""

from twisted.trial.unittest import SynchronousTestCase

from miltermanager.macros import STAGES, Macros


class MacrosTests(SynchronousTestCase):
    def test_empty(self):
        """A new store finds nothing and returns the default."""
        macros = Macros()
        self.assertIsNone(macros.get(b"j"))
        self.assertEqual(macros.get(b"j", b"none"), b"none")
        self.assertEqual(macros.stage(b"C"), {})

    def test_stage_returns_dict_as_sent(self):
        """stage() returns the very dict that was stored."""
        macros = Macros()
        sent = {b"j": b"mx.example.org", b"{daemon_name}": b"smtpd"}
        macros.set_stage(b"C", sent)
        self.assertIs(macros.stage(b"C"), sent)
        self.assertEqual(macros.stage(b"H"), {})

    def test_newest_stage_wins(self):
        """get() searches from the newest stage back to connect."""
        macros = Macros()
        macros.set_stage(b"C", {b"i": b"conn", b"j": b"mx"})
        macros.set_stage(b"M", {b"i": b"mail"})
        macros.set_stage(b"R", {b"{rcpt_addr}": b"a@b"})
        self.assertEqual(macros.get(b"i"), b"mail")
        self.assertEqual(macros.get(b"j"), b"mx")
        self.assertEqual(macros.get(b"{rcpt_addr}"), b"a@b")

    def test_order_is_libmilters(self):
        """The stage order is C H U M R T L N B E (U after HELO)."""
        self.assertEqual(STAGES, (b"C", b"H", b"U", b"M", b"R", b"T", b"L", b"N", b"B", b"E"))
        macros = Macros()
        for stage in reversed(STAGES):
            macros.set_stage(stage, {b"x": stage})
            self.assertEqual(macros.get(b"x"), b"E")

    def test_brace_forms(self):
        """b"i" finds {i} and {i} finds i, at the same stage."""
        macros = Macros()
        macros.set_stage(b"M", {b"{i}": b"QUEUEID", b"j": b"mx"})
        self.assertEqual(macros.get(b"i"), b"QUEUEID")
        self.assertEqual(macros.get(b"{j}"), b"mx")
        self.assertEqual(macros.get(b"{daemon_name}"), None)

    def test_exact_form_first(self):
        """At one stage the exact name is preferred over its other form."""
        macros = Macros()
        macros.set_stage(b"C", {b"{i}": b"braced", b"i": b"plain"})
        self.assertEqual(macros.get(b"i"), b"plain")
        self.assertEqual(macros.get(b"{i}"), b"braced")

    def test_newer_stage_other_form_wins(self):
        """A newer stage's other form beats an older stage's exact name."""
        macros = Macros()
        macros.set_stage(b"C", {b"i": b"old"})
        macros.set_stage(b"E", {b"{i}": b"new"})
        self.assertEqual(macros.get(b"i"), b"new")

    def test_str_names(self):
        """A str name is looked up as UTF-8 bytes."""
        macros = Macros()
        macros.set_stage(b"C", {b"{daemon_name}": b"smtpd"})
        self.assertEqual(macros.get("daemon_name"), b"smtpd")
        self.assertEqual(macros["{daemon_name}"], b"smtpd")
        self.assertIn("daemon_name", macros)

    def test_getitem_missing(self):
        """Indexing a missing macro raises KeyError."""
        self.assertRaises(KeyError, Macros().__getitem__, b"j")
        self.assertNotIn(b"j", Macros())

    def test_empty_value_is_found(self):
        """An empty value is a value, not a miss."""
        macros = Macros()
        macros.set_stage(b"C", {b"i": b"old"})
        macros.set_stage(b"M", {b"i": b""})
        self.assertEqual(macros.get(b"i"), b"")

    def test_clear_from(self):
        """clear_from(M) forgets M and later stages and keeps C, H and U."""
        macros = Macros()
        for stage in STAGES:
            macros.set_stage(stage, {stage: b"v"})
        macros.clear_from(b"M")
        for stage in STAGES:
            expected = {stage: b"v"} if stage in (b"C", b"H", b"U") else {}
            self.assertEqual(macros.stage(stage), expected, stage)

    def test_clear(self):
        """clear() forgets every stage."""
        macros = Macros()
        macros.set_stage(b"C", {b"j": b"mx"})
        macros.clear()
        self.assertIsNone(macros.get(b"j"))

    def test_set_stage_replaces(self):
        """A second D for a stage replaces the first one's macros."""
        macros = Macros()
        macros.set_stage(b"R", {b"{rcpt_addr}": b"a"})
        macros.set_stage(b"R", {b"{rcpt_host}": b"b"})
        self.assertIsNone(macros.get(b"{rcpt_addr}"))

    def test_unknown_stage(self):
        """An unknown stage code is a ValueError."""
        macros = Macros()
        self.assertRaises(ValueError, macros.set_stage, b"Z", {})
        self.assertRaises(ValueError, macros.stage, b"Z")
        self.assertRaises(ValueError, macros.clear_from, b"Z")

    def test_repr(self):
        """repr shows the stages that hold macros."""
        macros = Macros()
        macros.set_stage(b"C", {b"j": b"mx"})
        self.assertEqual(repr(macros), "Macros({b'C': {b'j': b'mx'}})")
