"""Conditions: what stoppers are given and the built-in ones."""
