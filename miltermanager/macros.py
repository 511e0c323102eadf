"""Macro values an MTA sent, kept per stage and looked up like libmilter's getsymval."""

from .protocol.messages import Macro

# Stages in session order. U has no place in libmilter; it comes after HELO
# because an MTA may send it any time after the greeting.
STAGES = (b"C", b"H", b"U", b"M", b"R", b"T", b"L", b"N", b"B", b"E")
_INDEX = {stage: index for index, stage in enumerate(STAGES)}
_COUNT = len(STAGES)
_NONE = (None,) * _COUNT


def _other_form(name):
    """b"i" for b"{i}" and b"{i}" for b"i": MTAs send either, milters ask for either."""
    if name[:1] == b"{" and name[-1:] == b"}":
        return name[1:-1]
    return b"{" + name + b"}"


def _index(stage):
    try:
        return _INDEX[stage]
    except KeyError:
        raise ValueError(f"unknown macro stage {stage!r}") from None


class Macros:
    """The macros of one MTA connection, per stage (the command code they came with).

    Values are stored exactly as sent: bytes names and values, no copies;
    a Macro packet the MTA sent is kept too, to be relayed as it came.
    """

    __slots__ = ("_stages", "_messages")

    def __init__(self):
        self._stages = [None] * _COUNT
        self._messages = [None] * _COUNT

    def set_stage(self, stage, macros):
        """Replace the macros of stage (a command code such as b"M") with a dict."""
        index = _index(stage)
        self._stages[index] = macros
        self._messages[index] = None

    def set_message(self, macro):
        """Replace the macros of macro.stage with those of a Macro the MTA sent."""
        index = _index(macro.stage)
        self._stages[index] = macro.macros
        self._messages[index] = macro

    def message(self, stage):
        """The macros of stage as a Macro (the one the MTA sent if any); None if there are none."""
        index = _index(stage)
        macros = self._stages[index]
        if not macros:
            return None
        macro = self._messages[index]
        if macro is None:
            macro = self._messages[index] = Macro(stage, macros)
        return macro

    def stage(self, stage):
        """The macros sent for stage, as a dict (empty if none were sent)."""
        macros = self._stages[_index(stage)]
        return {} if macros is None else macros

    def get(self, name, default=None):
        """The value of macro name, from the newest stage back to connect.

        b"i" also finds b"{i}" and the other way round; a str name is
        encoded as UTF-8.
        """
        if isinstance(name, str):
            name = name.encode()
        other = None
        for macros in reversed(self._stages):
            if macros:
                value = macros.get(name)
                if value is not None:
                    return value
                if other is None:
                    other = _other_form(name)
                value = macros.get(other)
                if value is not None:
                    return value
        return default

    def __getitem__(self, name):
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name):
        return self.get(name) is not None

    def clear_from(self, stage):
        """Forget the macros of stage and of every stage after it."""
        index = _index(stage)
        self._stages[index:] = self._messages[index:] = _NONE[index:]

    def clear(self):
        """Forget every macro (a new SMTP session follows)."""
        self._stages = [None] * _COUNT
        self._messages = [None] * _COUNT

    def __repr__(self):
        sent = {stage: macros for stage, macros in zip(STAGES, self._stages) if macros}
        return f"Macros({sent!r})"
