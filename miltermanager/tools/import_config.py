"""milter-manager-import-config: translate upstream's Ruby milter-manager.conf into our language.

    milter-manager-import-config /etc/milter-manager/milter-manager.conf -o /tmp/new

reads the Ruby file and every file it loads (relative to its directory, globs
too), and writes each one under OUTPUT_DIR with the same name, in the Python
configuration language of miltermanager.config. There is no Ruby interpreter
here: a small tokenizer splits the file into statements, and the DSL subset
that upstream's documentation uses (settings, define_milter blocks, load...,
remove_milter, defined_milters.each) is translated. Anything else is kept as a
comment under a `# TODO(milter-manager-import-config): FILE:LINE: why` line,
and the command exits 2 so that an administrator looks at it.

Which settings and helpers exist is asked of miltermanager.config itself (a
throwaway Loader), and every translated value is checked by the same checks a
file's assignment goes through, so the output loads; new names in the
language are picked up without a change here.
"""

import argparse
import fnmatch
import glob
import inspect
import keyword
import os
import re
import shutil
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field

PROGRAM_NAME = "milter-manager-import-config"
TODO = "# TODO(milter-manager-import-config):"
HEADER = "# Translated from Ruby by milter-manager-import-config."

# Upstream ships these in applicable-conditions/; they define its built-in
# conditions (S25R, Remote Network, ...) in Ruby. milter-manager ships its own
# files of the same names defining the same conditions (etc/applicable-conditions/
# in the source, /etc/milter-manager/applicable-conditions/ once installed), so
# upstream's are not translated: the translated load("applicable-conditions/*.conf")
# loads ours. The file each condition is defined in (ldap-policy.conf is ours
# only: upstream has no LDAP policy, but the same glob loads it):
BUILTIN_CONDITION_FILES = {
    "authentication.conf": ("Authenticated", "Unauthenticated"),
    "dnsbl.conf": ("DNSBL Listed", "Not DNSBL Listed"),
    "ldap-policy.conf": ("LDAP Policy",),
    "remote-network.conf": ("Remote Network",),
    "restrict-accounts.conf": (),  # the restrict_accounts_* helpers define theirs
    "s25r.conf": ("S25R",),
    "sendmail-compatible.conf": ("Sendmail Compatible",),
    "stress.conf": ("Stress Notify", "No Stress"),
    "trust.conf": ("Trust",),
}
CONDITIONS_DIRECTORY = "applicable-conditions"
# The main file's name: any other file (milter-manager.local.conf, the one upstream
# tells its users to edit) is loaded by the shipped main file after the built-in
# conditions, so it may name them without loading them.
MAIN_FILE = "milter-manager.conf"
BUILTIN_CONDITIONS = frozenset(
    name for names in BUILTIN_CONDITION_FILES.values() for name in names)
# Where milter-manager's own condition files are looked for, to check the
# output with: a source checkout's etc/ first (this module's ../../etc), then
# the load paths ($MILTER_MANAGER_CONFIG_DIR, /etc/milter-manager).
CHECKOUT_DIRECTORY = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "etc"))
PACKAGE_CONDITIONS = "/etc/milter-manager/applicable-conditions/"

EXIT_OK, EXIT_ERROR, EXIT_ATTENTION = 0, 1, 2


class Untranslatable(Exception):
    """A statement this tool does not translate; the text says why, for the admin.

    hint, if any, is Python the admin may start from (lines of a skeleton).
    """

    def __init__(self, reason, hint=()):
        super().__init__(reason)
        self.hint = hint


# ---------------------------------------------------------------------------
# Tokens

@dataclass
class Token:
    """One Ruby token; value is the decoded literal (None for an interpolated string)."""

    kind: str  # NAME LABEL IVAR NUMBER STRING SYMBOL WORDS REGEX OP NEWLINE COMMENT OTHER
    text: str
    line: int
    col: int
    start: int
    end: int
    value: object = None
    spaced: bool = False  # whitespace right before it
    depth: int = 0  # block and bracket nesting after this token, set by split()


# Statements and blocks that are Ruby logic, not configuration.
LOGIC_KEYWORDS = frozenset({
    "if", "unless", "case", "while", "until", "for", "begin", "def", "class", "module",
})
# After these a value (a regular expression, a symbol, %w[]) may start.
_BEFORE_VALUE = frozenset({
    "if", "unless", "elsif", "when", "while", "until", "and", "or", "not", "return", "then",
    "else", "do", "in", "puts", "p",
})
_OPERATORS = sorted("""
**= <=> === ... <<= >>= &&= ||= == != >= <= && || << >> =~ !~ .. :: -> => += -= *= /= %= |=
&= ^= ** &. + - * / % = < > ! & | ^ ~ ? : , . ; ( ) [ ] { }
""".split(), key=len, reverse=True)
_NUMBER = re.compile(
    r"0[xX][0-9a-fA-F_]+|0[bB][01_]+|0[oO][0-7_]+|0[dD][0-9_]+|0[0-7_]+(?![\d.])"
    r"|\d[\d_]*(?:\.\d[\d_]*)?(?:[eE][+-]?\d+)?")
_IDENTIFIER = re.compile(r"[^\W\d]\w*(?:[?!](?!=))?")
_PAIRS = {"(": ")", "[": "]", "{": "}", "<": ">"}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a", "b": "\b",
            "e": "\x1b", "s": " ", "0": "\0"}


def tokenize(source):
    """The tokens of a Ruby source text; odd input becomes OTHER tokens, never an exception."""
    return _Tokenizer(source).run()


class _Tokenizer:
    def __init__(self, source):
        self.source = source
        self.tokens = []
        self.i = 0
        self.line = 1
        self.line_start = 0

    def run(self):
        source = self.source
        while self.i < len(source):
            char = source[self.i]
            spaced = self.i > 0 and source[self.i - 1] in " \t\n"
            if char in " \t\r":
                self.i += 1
            elif char == "\\" and source.startswith("\n", self.i + 1):
                self._newline(self.i + 1)
                self.i += 2
            elif char == "\n":
                self._add("NEWLINE", self.i + 1)
                self._newline(self.i - 1)
            elif char == "#":
                self._add("COMMENT", self._line_end())
            elif self.i == self.line_start and source.startswith("=begin", self.i):
                self._block_comment()
            elif self.i == self.line_start and source.startswith("__END__", self.i) \
                    and source[self.i + 7:self.i + 8] in ("", "\n", "\r"):
                self._data_section()
            else:
                self._token(char, spaced)
        return self.tokens

    # Helpers

    def _add(self, kind, end, value=None, spaced=False):
        token = Token(kind, self.source[self.i:end], self.line, self.i - self.line_start,
                      self.i, end, value, spaced)
        self.tokens.append(token)
        if kind != "NEWLINE":
            self._advance_lines(self.i, end)  # a string or regex may span lines
        self.i = end
        return token

    def _newline(self, index):
        self.line += 1
        self.line_start = index + 1

    def _line_end(self, start=None):
        end = self.source.find("\n", self.i if start is None else start)
        return len(self.source) if end < 0 else end

    def _advance_lines(self, start, end):
        newlines = self.source.count("\n", start, end)
        if newlines:
            self.line += newlines
            self.line_start = self.source.rfind("\n", start, end) + 1

    def _block_comment(self):
        # =begin ... =end: each line becomes a comment token.
        while self.i < len(self.source):
            end = self._line_end()
            text = self.source[self.i:end]
            self.tokens.append(Token("COMMENT", "# " + text, self.line, 0, self.i, end))
            self.i = end
            if text.startswith("=end") or self.i >= len(self.source):
                return
            self._add("NEWLINE", self.i + 1)
            self._newline(self.i - 1)

    def _data_section(self):
        # After __END__ is data, not code: keep it as comments.
        while self.i < len(self.source):
            end = self._line_end()
            self.tokens.append(Token("COMMENT", "# " + self.source[self.i:end], self.line, 0,
                                     self.i, end))
            self.i = end
            if self.i < len(self.source):
                self._add("NEWLINE", self.i + 1)
                self._newline(self.i - 1)

    def _value_position(self, spaced):
        """Whether a value may start here: decides regex against divide, symbol against ':'."""
        previous = next((t for t in reversed(self.tokens) if t.kind != "COMMENT"), None)
        if previous is None or previous.kind in ("NEWLINE", "LABEL"):
            return True
        if previous.kind == "OP":
            return previous.text not in (")", "]", "}")
        if previous.kind == "NAME":
            if previous.text in _BEFORE_VALUE:
                return True
            following = self.source[self.i + 1:self.i + 2]
            return spaced and following not in (" ", "\t", "=")
        return False

    # Tokens

    def _token(self, char, spaced):
        source, i = self.source, self.i
        match = _NUMBER.match(source, i) if char.isdigit() else None
        if match:
            self._add("NUMBER", match.end(), spaced=spaced)
            return
        match = _IDENTIFIER.match(source, i)
        if match:
            end = match.end()
            if source[end:end + 1] == ":" and source[end + 1:end + 2] != ":":
                self._add("LABEL", end + 1, spaced=spaced)
            else:
                self._add("NAME", end, spaced=spaced)
            return
        if char in "@$":
            match = re.compile(r"[@$]@?\w+").match(source, i)
            if match:
                self._add("IVAR", match.end(), spaced=spaced)
                return
        if char == '"':
            self._string(i + 1, '"', None, True, spaced)
        elif char == "'":
            self._string(i + 1, "'", None, False, spaced)
        elif char == "`":
            end = self._scan(i + 1, "`", None, True)
            self._add("OTHER", end, spaced=spaced)
        elif char == ":" and source[i + 1:i + 2] in ('"', "'"):
            start = self.i
            self.i += 1
            token = self._string(i + 2, source[i + 1], None, source[i + 1] == '"', spaced)
            token.kind, token.start, token.col = "SYMBOL", start, token.col - 1
            token.text = source[start:token.end]
        elif char == ":" and _IDENTIFIER.match(source, i + 1) and (
                self._value_position(spaced) or spaced):
            end = _IDENTIFIER.match(source, i + 1).end()
            if source[end:end + 1] == "=" and source[end + 1:end + 2] not in ("=", "~", ">"):
                end += 1  # :name= is a setter's symbol
            self._add("SYMBOL", end, source[i + 1:end], spaced)
        elif char == "/" and self._value_position(spaced):
            end = self._scan(i + 1, "/", None, True)
            while end < len(source) and source[end] in "imxounse":
                end += 1
            self._add("REGEX", end, spaced=spaced)
        elif char == "%" and self._value_position(spaced) and self._percent_literal(spaced):
            pass
        else:
            operator = next((op for op in _OPERATORS if source.startswith(op, i)), None)
            if operator is None:
                self._add("OTHER", i + 1, spaced=spaced)
            else:
                self._add("OP", i + len(operator), spaced=spaced)

    def _scan(self, i, close, open_, interpolate):
        """Index just past the closing delimiter, skipping escapes, nesting and #{...}."""
        source, depth = self.source, 0
        while i < len(source):
            char = source[i]
            if char == "\\":
                i += 2
                continue
            if interpolate and source.startswith("#{", i):
                i = self._skip_interpolation(i + 2)
                continue
            if open_ is not None and char == open_:
                depth += 1
            elif char == close:
                if depth == 0:
                    return i + 1
                depth -= 1
            i += 1
        return len(source)  # unterminated: the rest of the file

    def _skip_interpolation(self, i):
        source, depth = self.source, 0
        while i < len(source):
            char = source[i]
            if char in "\"'":
                i = self._scan(i + 1, char, None, char == '"')
                continue
            if char == "{":
                depth += 1
            elif char == "}":
                if depth == 0:
                    return i + 1
                depth -= 1
            i += 1
        return len(source)

    def _string(self, body_start, close, open_, double, spaced):
        end = self._scan(body_start, close, open_, double)
        body = self.source[body_start:end - 1]
        value = _double_quoted(body) if double else _single_quoted(body, close, open_)
        return self._add("STRING", end, value, spaced)

    def _percent_literal(self, spaced):
        source, i = self.source, self.i
        letter = source[i + 1:i + 2]
        if letter and letter in "wWiIqQrxs" and not source[i + 2:i + 3].isalnum():
            delimiter_at = i + 2
        elif letter and not letter.isalnum() and letter not in " \t\n=":
            letter, delimiter_at = "Q", i + 1
        else:
            return False
        open_ = source[delimiter_at:delimiter_at + 1]
        if not open_:
            return False
        close = _PAIRS.get(open_, open_)
        nested = open_ if close != open_ else None
        end = self._scan(delimiter_at + 1, close, nested, letter in "WIQrx")
        body = source[delimiter_at + 1:end - 1]
        if letter in "wWiI":
            words = [word.replace("\\ ", " ") for word in re.split(r"(?<!\\)\s+", body.strip())]
            words = [word for word in words if word]
            if letter in "WI" and any(_double_quoted(word) is None for word in words):
                words = None
            self._add("WORDS", end, words, spaced)
        elif letter == "q":
            self._add("STRING", end, _single_quoted(body, close, nested), spaced)
        elif letter == "Q":
            self._add("STRING", end, _double_quoted(body), spaced)
        elif letter == "s":
            self._add("SYMBOL", end, _single_quoted(body, close, nested), spaced)
        else:  # %r (a regular expression), %x (a command)
            self._add("REGEX" if letter == "r" else "OTHER", end, spaced=spaced)
        return True


def _single_quoted(body, close="'", open_=None):
    """'...': only backslash and the delimiter are escaped."""
    escapable = {"\\", close} | ({open_} if open_ else set())
    return re.sub(r"\\(.)", lambda m: m.group(1) if m.group(1) in escapable else m.group(0),
                  body, flags=re.S)


def _double_quoted(body):
    """"...": Ruby's escapes; None if it interpolates (#{...}, #@var), which is code."""
    out, i = [], 0
    while i < len(body):
        char = body[i]
        if char == "#" and body[i + 1:i + 2] in ("{", "@", "$"):
            return None
        if char != "\\":
            out.append(char)
            i += 1
            continue
        escape = body[i + 1:i + 2]
        i += 2
        if escape in _ESCAPES and not (escape == "0" and body[i:i + 1] in "01234567"
                                       and body[i:i + 1]):
            out.append(_ESCAPES[escape])
        elif escape in "01234567" and escape:
            digits = re.match(r"[0-7]{1,3}", body[i - 1:]).group()
            out.append(chr(int(digits, 8)))
            i += len(digits) - 1
        elif escape == "x":
            digits = re.match(r"[0-9a-fA-F]{1,2}", body[i:])
            if not digits:
                return None
            out.append(chr(int(digits.group(), 16)))
            i += len(digits.group())
        elif escape == "u":
            braced = re.match(r"\{([0-9a-fA-F ]+)\}", body[i:])
            plain = re.match(r"[0-9a-fA-F]{4}", body[i:])
            if braced:
                out.extend(chr(int(code, 16)) for code in braced.group(1).split())
                i += len(braced.group())
            elif plain:
                out.append(chr(int(plain.group(), 16)))
                i += 4
            else:
                return None
        elif escape == "\n":
            pass  # a backslash-newline joins the lines
        elif escape in ("c", "C", "M"):
            return None  # control and meta characters: too rare to guess
        else:
            out.append(escape)
    return "".join(out)


# ---------------------------------------------------------------------------
# Statements

@dataclass
class Statement:
    """One logical Ruby line (or a block with its body); tokens keep inner newlines and comments."""

    kind: str  # "code", "comment" or "blank"
    tokens: list = field(default_factory=list)
    comment: Token = None  # the comment ending its last line
    problem: str = None  # why it cannot even be delimited

    @property
    def line(self):
        return self.tokens[0].line if self.tokens else self.comment.line

    @property
    def code(self):
        return [token for token in self.tokens if token.kind not in ("NEWLINE", "COMMENT")]


_CONTINUING = frozenset({
    ",", ".", "&.", "=", "+", "-", "*", "/", "||", "&&", "==", "=>", "<<", "+=", "-=", "||=",
    "&&=", "?", ":", "::", "(", "[", "{", "|", "and", "or", "not",
})
_STATEMENT_START = frozenset({
    "(", "[", "{", ",", "=", "||", "&&", "||=", "&&=", "+=", "-=", "!", ";", "|", "and", "or",
    "not", "then", "else", "do", "begin",
})


def split(tokens):
    """The statements of a token list (a file, or a block's body), in order."""
    statements, current, stack = [], [], []
    prev = None  # the previous non-comment token, NEWLINE included
    loop_awaits_do = False  # `while x do`: that do opens nothing
    line_empty = True

    def finish(problem=None):
        nonlocal current
        statement = Statement("code", current, problem=problem)
        if current and current[-1].kind == "COMMENT":
            statement.comment = current.pop()
        statements.append(statement)
        current = []

    for index, token in enumerate(tokens):
        if token.kind == "NEWLINE":
            if not current:
                if line_empty:
                    statements.append(Statement("blank"))
            elif stack or _continues(current, tokens, index):
                current.append(token)
            else:
                finish()
            line_empty = True
            loop_awaits_do = False
            prev = token
            continue
        line_empty = False
        if token.kind == "COMMENT":
            token.depth = len(stack)
            if current:
                current.append(token)
            else:
                statements.append(Statement("comment", comment=token))
            continue
        if token.kind == "OP" and token.text == ";" and not stack:
            if current:
                finish()
            prev = token
            continue
        method_name = prev is not None and prev.kind == "OP" and prev.text in (".", "&.", "::")
        at_start = prev is None or prev.kind == "NEWLINE" or (
            prev.text in _STATEMENT_START and prev.kind in ("OP", "NAME"))
        if token.kind == "OP" and token.text in "([{":
            stack.append(token.text)
        elif token.kind == "OP" and token.text in ")]}" or (
                token.kind == "NAME" and token.text == "end" and not method_name):
            if not stack:
                current.append(token)
                token.depth = 0
                finish(f"`{token.text}` closes nothing")
                prev = token
                continue
            stack.pop()
        elif token.kind == "NAME" and not method_name:
            word = token.text
            if word == "do" and loop_awaits_do:
                loop_awaits_do = False
            elif word in ("do", "begin", "def", "class", "module", "case", "for") or (
                    word in ("if", "unless", "while", "until") and at_start):
                stack.append(word)
                loop_awaits_do = word in ("while", "until", "for")
        token.depth = len(stack)
        current.append(token)
        prev = token
    if current:
        finish("the file ends before this Ruby construct does" if stack else None)
    return statements


def _continues(current, tokens, index):
    """Whether the statement goes on after the newline at tokens[index]."""
    last = next((t for t in reversed(current) if t.kind not in ("COMMENT", "NEWLINE")), None)
    if last is not None and last.kind in ("OP", "NAME") and last.text in _CONTINUING:
        return True
    following = next((t for t in tokens[index + 1:] if t.kind not in ("COMMENT", "NEWLINE")),
                     None)
    # A method chain may go on with a leading dot on the next line.
    return following is not None and following.kind == "OP" and following.text in (".", "&.")


# ---------------------------------------------------------------------------
# Values: Ruby literals to Python literals

class _Cursor:
    """Walks a statement's tokens; newlines and comments inside it are stepped over."""

    def __init__(self, tokens):
        self.tokens = tokens
        self.i = 0
        self.comments = []

    def _skip(self):
        while self.i < len(self.tokens) and self.tokens[self.i].kind in ("NEWLINE", "COMMENT"):
            if self.tokens[self.i].kind == "COMMENT":
                self.comments.append(self.tokens[self.i])
            self.i += 1

    def peek(self):
        self._skip()
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def next(self):
        token = self.peek()
        if token is not None:
            self.i += 1
        return token

    def at(self, kind, text=None):
        token = self.peek()
        return token is not None and token.kind == kind and (text is None or token.text == text)

    def accept(self, kind, text=None):
        return self.next() if self.at(kind, text) else None

    def at_end(self):
        return self.peek() is None


@dataclass
class Value:
    """A translated value: what the probe is given, and the Python source written."""

    python: object
    source: str


def python_string(text):
    """A Python string literal in double quotes, as the shipped files write them."""
    out = []
    for char in text:
        if char == "\\":
            out.append("\\\\")
        elif char == '"':
            out.append('\\"')
        elif char in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[char])
        elif not char.isprintable():
            out.append(ascii(char)[1:-1])
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _number(text):
    try:
        return _radix(text)
    except ValueError:
        raise Untranslatable(f"{text} is no number Python reads") from None


def _radix(text):
    digits = text.replace("_", "")
    lower = digits.lower()
    if lower.startswith(("0x", "0b")):
        return Value(int(lower, 0), text)
    if lower.startswith("0o"):
        return Value(int(lower, 0), "0o" + digits[2:])
    if lower.startswith("0d"):
        return Value(int(digits[2:]), str(int(digits[2:])))
    if len(digits) > 1 and digits.startswith("0") and digits.isdigit():
        # Ruby's 0660 is octal; Python writes it 0o660.
        return Value(int(digits, 8), "0o" + (digits.lstrip("0") or "0"))
    if any(char in lower for char in ".e"):
        return Value(float(digits), text)
    return Value(int(digits), text)


def _quoted(names):
    return ", ".join(f'"{name}"' for name in names)


def _describe(token):
    """How a TODO names the Ruby that stopped the translation."""
    if token.kind == "REGEX":
        return (f"the regular expression {token.text} is Ruby; Python's re differs "
                "(\\A, \\z, flags): rewrite it")
    if token.kind == "STRING" and token.value is None:
        return f"the string {token.text} interpolates Ruby code (#{{...}})"
    if token.kind == "NAME" and token.text in LOGIC_KEYWORDS:
        return f"`{token.text}` is Ruby logic: rewrite it in Python"
    if token.kind == "NAME" and token.text[:1].isupper():
        return f"`{token.text}` is a Ruby class or constant: rewrite it in Python"
    if token.kind == "IVAR":
        return f"`{token.text}` is a Ruby variable"
    if token.kind == "OP":
        return f"`{token.text}` makes an expression; only literal values are translated"
    return f"`{token.text}` is Ruby code this tool does not translate"


# ---------------------------------------------------------------------------
# What our configuration language knows

class _Target:
    """miltermanager.config as a file sees it, asked through a throwaway Loader.

    Assignments are tried on it with the translated value, so a setting the
    language lacks, or a value its checks refuse, is found here rather than
    when the output is loaded.
    """

    def __init__(self):
        from miltermanager import config
        from miltermanager.config import model

        self.error = config.ConfigurationError
        self.refused = getattr(model, "REFUSED", {})
        self.stoppers = getattr(model, "STOPPERS", {})
        self.loader = config.Loader()
        # The names a configuration file runs with; the loader has no public
        # accessor for them.
        self.names = self.loader._namespace(os.path.join(os.getcwd(), "probe.conf"))

    def conditions(self):
        """The conditions the language defines before any file is loaded (built-ins)."""
        return set(getattr(self.loader.configuration, "conditions", ()))

    def refusal(self, names):
        """Why the language refuses this upstream name (database.*, ...), or None."""
        for length in (2, 1):
            reason = self.refused.get(".".join(names[:length]))
            if reason:
                return f"{'.'.join(names)}: {reason}"
        return None

    def section(self, name):
        """manager, security, log, ...: None if the language has no such section."""
        value = self.names.get(name)
        return value if value is not None and not inspect.isroutine(value) else None

    def function(self, name):
        value = self.names.get(name)
        return value if inspect.isroutine(value) else None

    def define(self, function, name):
        """A probe milter or condition: what the block variable stands for."""
        value = self.names[function](name)
        return value.__enter__() if hasattr(value, "__enter__") else value

    def assign(self, owner, label, name, value):
        if name not in dir(owner):
            raise Untranslatable(f"our configuration language has no {label}.{name}")
        try:
            setattr(owner, name, value.python)
        except self.error as error:
            raise Untranslatable(error.reason) from None

    def has_method(self, owner, name):
        try:
            return inspect.isroutine(getattr(owner, name, None))
        except self.error:
            return False


@dataclass
class _Binding:
    """A Ruby block variable: kind "milter", "condition" or "name" (a loop's string)."""

    kind: str
    python: str
    probe: object = None


# ---------------------------------------------------------------------------
# Translating

@dataclass
class Issue:
    """Something the administrator must look at: FILE:LINE and why."""

    location: str
    reason: str

    def __str__(self):
        return f"{self.location}: {self.reason}"


@dataclass
class _Out:
    """Translated lines, with how many items were translated and what needs attention."""

    lines: list = field(default_factory=list)
    translated: int = 0
    issues: list = field(default_factory=list)
    has_code: bool = False

    def add(self, other):
        self.lines.extend(other.lines)
        self.translated += other.translated
        self.issues.extend(other.issues)
        self.has_code = self.has_code or other.has_code


@dataclass
class FileResult:
    """One translated file."""

    source: str  # absolute path of the Ruby file
    name: str  # its path relative to the configuration directory
    text: str
    translated: int
    issues: list


@dataclass
class Result:
    """A whole translation: the files in load order, skipped files, and verification."""

    files: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (name, why)
    issues: list = field(default_factory=list)  # found after writing (loading the output)
    # milter-manager's condition files the output loads ("applicable-conditions/s25r.conf"),
    # and the built-in conditions its milters name that only those files define.
    builtin_files: set = field(default_factory=set)
    builtin_conditions: set = field(default_factory=set)

    @property
    def all_issues(self):
        return [issue for result in self.files for issue in result.issues] + self.issues


class Translator:
    """Translates a Ruby milter-manager.conf and the files it loads."""

    def __init__(self, main_path, conditions=None, builtin_conditions=()):
        self.main = os.path.abspath(main_path)
        self.directory = os.path.dirname(self.main)  # upstream resolves loads against it
        self.target = _Target()
        # The conditions the output defines, the translated files' and the
        # built-ins of milter-manager's files it loads; None: not known yet
        # (the first pass).
        self.translated_conditions = set(conditions or ()) | self.target.conditions()
        self.conditions = None if conditions is None else (
            self.translated_conditions | set(builtin_conditions))
        self.defined_conditions = set()
        # The built-in conditions defined by the files the output loads from
        # milter-manager's applicable-conditions/ (as installed).
        self.loaded_builtin_conditions = set()
        self.result = Result()
        self._queue = [self.main]
        self._seen = {self.main}

    def run(self):
        """Translate every reachable file; return the Result (nothing is written)."""
        while self._queue:
            path = self._queue.pop(0)
            self.result.files.append(self._file(path))
        return self.result

    # Files

    def _file(self, path):
        self.path = path
        self.name = os.path.relpath(path, self.directory)
        with open(path, "rb") as file:
            data = file.read()
        try:
            self.source = data.decode("utf-8").replace("\r\n", "\n")
        except UnicodeDecodeError as error:
            raise ValueError(f"{path} is not UTF-8 ({error.reason} at byte {error.start}); "
                             "convert it first, e.g. with iconv") from None
        statements = split(tokenize(self.source))
        out = _Out()
        if statements and statements[0].kind == "comment" and re.search(
                r"-\*-.*ruby.*-\*-", statements[0].comment.text, re.I):
            modeline = statements.pop(0).comment.text
            out.lines.append(re.sub(r"ruby", "python", modeline, flags=re.I))
        out.lines.append(HEADER)
        out.add(self._block(statements, 0, {}))
        text = "\n".join(out.lines).rstrip("\n") + "\n"
        return FileResult(path, self.name, text, out.translated, out.issues)

    def _location(self, line):
        return f"{self.name}:{line}"

    # Statements

    def _block(self, statements, level, scope):
        out = _Out()
        for statement in statements:
            if statement.kind == "blank":
                out.lines.append("")
            elif statement.kind == "comment":
                out.lines.append("    " * level + statement.comment.text.strip())
            else:
                try:
                    if statement.problem:
                        raise Untranslatable(statement.problem)
                    out.add(self._code(statement, level, scope))
                except Untranslatable as why:
                    out.add(self._todo(statement, level, str(why), why.hint))
        return out

    def _todo(self, statement, level, reason, hint=()):
        pad = "    " * level
        location = self._location(statement.line)
        out = _Out(issues=[Issue(location, reason)])
        out.lines.append(f"{pad}{TODO} {location}: {reason}")
        for line in hint:
            out.lines.append(f"{pad}#     {line}".rstrip())
        if hint:
            out.lines.append(f"{pad}# Ruby:")
        for line in self._ruby_text(statement):
            out.lines.append(f"{pad}#   {line}".rstrip())
        return out

    def _ruby_text(self, statement):
        """The statement as written, dedented: what a TODO keeps."""
        first = statement.tokens[0]
        last = statement.comment or [t for t in statement.tokens if t.kind != "NEWLINE"][-1]
        text = " " * first.col + self.source[first.start:last.end]
        return textwrap.dedent(text).split("\n")

    def _code(self, statement, level, scope):
        cursor = _Cursor(statement.tokens)
        first = cursor.peek()
        if first.kind != "NAME" or first.text in LOGIC_KEYWORDS:
            raise Untranslatable(_describe(first))
        path = [cursor.next()]
        while cursor.at("OP", ".") and len(path) < 3:
            cursor.next()
            name = cursor.accept("NAME")
            if name is None:
                raise Untranslatable(_describe(cursor.peek() or path[-1]))
            path.append(name)
        names = [token.text for token in path]
        self._check_names(names, scope)
        if cursor.accept("OP", "="):
            if len(names) != 2:
                raise Untranslatable(f"`{' '.join(names)}` is a Ruby variable: write its value "
                                     "where it is used")
            value = self._value(cursor, scope)
            self._end(cursor)
            return self._assignment(statement, level, scope, names, value, cursor.comments)
        args = self._arguments(cursor, scope)
        block = self._block_parts(cursor, statement)
        self._end(cursor)
        return self._call(statement, level, scope, names, args, block, cursor.comments)

    def _end(self, cursor):
        token = cursor.peek()
        if token is not None:
            raise Untranslatable(_describe(token))

    def _line(self, statement, level, code, comments=()):
        """Output lines for one translated statement, keeping its comments."""
        pad = "    " * level
        lines = [pad + comment.text.strip() for comment in comments]
        line = pad + code
        if statement.comment is not None:
            first = statement.tokens[0]
            column = statement.comment.col - first.col  # where the comment stood, relative
            single_line = statement.comment.line == first.line
            width = len(code)
            gap = column - width if single_line and column - width >= 2 else 2
            line += " " * gap + statement.comment.text
        lines.append(line)
        return lines

    def _assignment(self, statement, level, scope, names, value, comments):
        owner_name, setting = names
        if owner_name in scope:
            binding = scope[owner_name]
            if binding.probe is None:
                raise Untranslatable(f"`{owner_name}` is a name, not a configuration object")
            owner, python_owner = binding.probe, binding.python
            owner_name = binding.kind
        else:
            self._check_known(names)
            owner = self.target.section(owner_name)
            if owner is None:
                raise Untranslatable(f"`{owner_name}` is not part of the configuration language")
            python_owner = owner_name
        out = _Out()
        if owner_name == "milter" and setting == "applicable_conditions" and isinstance(
                value.python, list):
            missing = self._missing_conditions(value.python)
            if missing:
                out.add(self._todo(statement, level, self._missing_reason(missing)))
                kept = [name for name in value.python if name not in missing]
                value = Value(kept, "[" + ", ".join(python_string(name) for name in kept) + "]")
        self.target.assign(owner, owner_name, setting, value)
        code = f"{python_owner}.{setting} = {value.source}"
        out.lines.extend(self._line(statement, level, code, comments))
        out.translated += 1
        out.has_code = True
        return out

    def _check_names(self, names, scope):
        """Before the arguments: refused names, upstream helpers, settings the language lacks."""
        if names[0] not in scope:
            self._check_known(names)
        if len(names) != 2 or names[-1].endswith(("?", "!")) or names[0] == "defined_milters":
            return
        binding = scope.get(names[0])
        owner = binding.probe if binding is not None else self.target.section(names[0])
        label = binding.kind if binding is not None else names[0]
        if owner is not None and names[1] not in dir(owner):
            raise Untranslatable(f"our configuration language has no {label}.{names[1]}")

    def _check_known(self, names):
        """Raise the reason for an upstream name the language refuses or lacks on purpose."""
        refusal = self.target.refusal(names)
        if refusal:
            raise Untranslatable(refusal)

    def _missing_conditions(self, names):
        """The condition names the translated configuration will not define.

        The built-in ones it keeps (defined by milter-manager's own files,
        which it loads) are noted for verify.
        """
        if self.conditions is None:
            return []
        self.result.builtin_conditions.update(
            name for name in names if name in self.conditions
            and name in BUILTIN_CONDITIONS and name not in self.translated_conditions)
        return [name for name in names if name not in self.conditions]

    @staticmethod
    def _missing_reason(missing):
        builtin = [name for name in missing if name in BUILTIN_CONDITIONS]
        other = [name for name in missing if name not in BUILTIN_CONDITIONS]
        reasons = []
        if builtin:
            reasons.append(
                f"{_quoted(builtin)}: milter-manager's built-in, but the translated files do "
                f'not load({python_string(CONDITIONS_DIRECTORY + "/*.conf")}), which defines '
                f"{'them' if len(builtin) > 1 else 'it'}")
        if other:
            reasons.append(f"{_quoted(other)}: not defined by the translated files")
        several = len(missing) > 1
        return (f"applicable condition{'s' if several else ''} left out ({'; '.join(reasons)}): "
                f"the milter runs without {'them' if several else 'it'}")

    def _arguments(self, cursor, scope):
        """Literal arguments, with or without parentheses; [] if none."""
        args = []
        if cursor.accept("OP", "("):
            while not cursor.at("OP", ")"):
                args.append(self._value(cursor, scope))
                if not cursor.accept("OP", ","):
                    break
            if not cursor.accept("OP", ")"):
                raise Untranslatable(_describe(cursor.peek()))
            return args
        while True:
            token = cursor.peek()
            if token is None or (token.kind == "NAME" and token.text == "do") or (
                    token.kind == "OP" and token.text == "{" and args) or (
                    token.kind == "OP" and token.text == "{" and token.spaced):
                return args
            args.append(self._value(cursor, scope))
            if not cursor.accept("OP", ","):
                return args

    def _block_parts(self, cursor, statement):
        """(variables, body statements, comment on the `do` line) of a do/{ block, or None."""
        opener = cursor.accept("NAME", "do") or cursor.accept("OP", "{")
        if opener is None:
            return None
        params = []
        tokens = statement.tokens
        first = cursor.i
        while first < len(tokens) and tokens[first].kind == "NEWLINE":
            first += 1  # `{` may end its line, with the |variables| on the next
        if first < len(tokens) and tokens[first].kind == "OP" and tokens[first].text in (
                "|", "||"):
            cursor.i = first
            bar = cursor.next()
            while bar.text == "|" and not cursor.at("OP", "|"):
                param = cursor.accept("NAME")
                if param is None:
                    raise Untranslatable("only plain block variables (|milter|) are translated")
                params.append(param.text)
                if not cursor.accept("OP", ","):
                    break
            if bar.text == "|" and not cursor.accept("OP", "|"):
                raise Untranslatable("only plain block variables (|milter|) are translated")
        body_start = cursor.i
        close = next((i for i in range(body_start, len(tokens))
                      if tokens[i].kind not in ("NEWLINE", "COMMENT")
                      and tokens[i].depth == opener.depth - 1), None)
        if close is None:
            raise Untranslatable("cannot find the end of this block")
        body = tokens[body_start:close]
        cursor.i = close + 1
        header_comment = None
        if body and body[0].kind == "COMMENT" and body[0].line == opener.line:
            header_comment, body = body[0], body[1:]
        if body and body[0].kind == "NEWLINE":
            body = body[1:]  # the newline ending the header line
        return params, split(body), header_comment

    def _call(self, statement, level, scope, names, args, block, comments):
        head = names[0]
        if head in scope and len(names) == 1:
            raise Untranslatable(f"`{head}` alone does nothing")
        if names == ["define_milter"]:
            return self._define(statement, level, scope, "define_milter", "milter", args, block)
        if names == ["define_applicable_condition"]:
            if self.target.function("define_applicable_condition") is None:
                raise Untranslatable(
                    "our configuration language cannot define applicable conditions yet: "
                    "keep this Ruby until it can, and check the milters that use it")
            return self._define(statement, level, scope, "define_applicable_condition",
                                "condition", args, block)
        if names == ["defined_milters", "each"]:
            return self._each(statement, level, scope, args, block)
        if names[0] in ("load", "load_if_exist") and len(names) == 1 and block is None:
            return self._load(statement, level, names[0], args, comments)
        try:
            python_names = self._callable(names, scope)
        except Untranslatable:
            if block is None:
                raise
            raise Untranslatable(f"{'.'.join(names)} with a Ruby block is code: rewrite it in "
                                 "Python") from None
        if block is not None:
            raise self._hook(python_names, args, block[0])
        if names[-1] == "add_applicable_condition" and head in scope and len(args) == 1:
            missing = self._missing_conditions([args[0].python])
            if missing:
                raise Untranslatable(self._missing_reason(missing))
        code = f"{'.'.join(python_names)}({', '.join(arg.source for arg in args)})"
        return _Out(self._line(statement, level, code, comments), translated=1, has_code=True)

    def _callable(self, names, scope):
        """The Python names of a call the language has; Untranslatable otherwise."""
        dotted = ".".join(names)
        if any(name.endswith(("?", "!")) for name in names):
            raise Untranslatable(f"`{dotted}` is Ruby: rewrite it in Python")
        if names[0] not in scope:
            self._check_known(names)
        if len(names) == 1:
            if names[0] in ("defined_milters",) or self.target.function(names[0]) is None:
                raise Untranslatable(f"`{dotted}` is not part of the configuration language")
            return names
        if len(names) == 2:
            owner_name, method = names
            if owner_name in scope and scope[owner_name].probe is not None:
                binding = scope[owner_name]
                if self.target.has_method(binding.probe, method):
                    return [binding.python, method]
            elif owner_name not in scope:
                owner = self.target.section(owner_name)
                if owner is not None and self.target.has_method(owner, method):
                    return names
        raise Untranslatable(f"our configuration language has no {dotted}")

    def _define(self, statement, level, scope, function, default_name, args, block):
        if block is None:
            raise Untranslatable(f"{function} without a block does nothing")
        if len(args) != 1:
            raise Untranslatable(f"{function} takes one name")
        params, body, header_comment = block
        name = args[0]
        if len(params) > 1:
            raise Untranslatable(f"{function}'s block takes one variable")
        variable = params[0] if params else default_name
        python = variable if not keyword.iskeyword(variable) else default_name
        probe_name = name.python if isinstance(name.python, str) and name.python else "probe"
        probe = self.target.define(function, probe_name)
        if function == "define_applicable_condition":
            self.defined_conditions.add(name.python)
        inner = {**scope, variable: _Binding(default_name, python, probe)}
        return self._compound(statement, level, f"with {function}({name.source}) as {python}:",
                              header_comment, self._body(body, level + 1, inner))

    def _each(self, statement, level, scope, args, block):
        if block is None or args or len(block[0]) != 1:
            raise Untranslatable("only `defined_milters.each do |name| ... end` is translated")
        params, body, header_comment = block
        variable = params[0]
        if keyword.iskeyword(variable):
            raise Untranslatable(f"`{variable}` cannot be a Python variable")
        body = self._body(body, level + 1, {**scope, variable: _Binding("name", variable)})
        return self._compound(statement, level, f"for {variable} in defined_milters:",
                              header_comment, body)

    def _compound(self, statement, level, header, header_comment, body):
        """A `with` or `for` line and its body; the block's comments stay on their lines."""
        comment = header_comment
        closing = statement.comment
        if closing is not None and closing.line == statement.tokens[0].line and comment is None:
            comment, closing = closing, None  # a one-line block: its comment goes on the header
        if comment is not None:
            header += "  " + comment.text
        out = _Out(["    " * level + header], translated=1, has_code=True)
        out.add(body)
        if closing is not None:
            out.lines.append("    " * (level + 1) + closing.text)
        return out

    def _body(self, statements, level, scope):
        out = self._block(statements, level, scope)
        while out.lines and out.lines[-1] == "":
            out.lines.pop()
        if not out.has_code:
            out.lines.append("    " * level + "pass")
        return out

    def _hook(self, python_names, args, params):
        """A block given to a verb of the language (a stopper, a hook): a TODO with a skeleton."""
        method = python_names[-1]
        stopper = re.fullmatch(r"define_(\w+)_stopper", method)
        if stopper and stopper.group(1) in self.target.stoppers:
            params = list(self.target.stoppers[stopper.group(1)])
            body, what = "    return ...  # True stops the child milter", "a stopper"
        else:
            body, what = "    ...", f"the block given to {'.'.join(python_names)}"
        arguments = f"({', '.join(arg.source for arg in args)})" if args else ""
        hint = [f"@{'.'.join(python_names)}{arguments}",
                f"def {method.removeprefix('define_')}({', '.join(params)}):", body]
        return Untranslatable(f"{what} is Ruby code: rewrite it in Python, starting from",
                              hint)

    def _load(self, statement, level, function, args, comments):
        if len(args) != 1 or not isinstance(args[0].python, str) or \
                args[0].source != python_string(args[0].python):
            raise Untranslatable(f"{function} takes one path, a string")
        pattern = args[0].python
        resolved = os.path.normpath(os.path.join(self.directory, pattern))
        inside = resolved == self.directory or resolved.startswith(self.directory + os.sep)
        if not inside:
            raise Untranslatable(
                f"{pattern} is outside {self.directory}: translate it on its own and load "
                "the result")
        if os.path.isdir(resolved):
            # Upstream loads every file in it; its files are *.conf, and ours beside them
            # (a README in applicable-conditions/) are no configuration.
            resolved = os.path.join(resolved, "*.conf")
        wildcards = any(char in resolved for char in "*?[")
        matches = sorted(path for path in glob.glob(resolved) if os.path.isfile(path)) \
            if wildcards else [resolved] if os.path.isfile(resolved) else []
        if not matches and not wildcards and function == "load":
            raise Untranslatable(f"{pattern} does not exist")
        for match in matches:
            self._follow(match)
        self._note_builtin_files(os.path.relpath(resolved, self.directory))
        # Our load() is relative to the including file, upstream's to the directory.
        relative = os.path.relpath(resolved, os.path.dirname(self.path))
        argument = pattern if relative == os.path.normpath(pattern) else relative
        code = f"{function}({python_string(argument)})"
        return _Out(self._line(statement, level, code, comments), translated=1, has_code=True)

    def _note_builtin_files(self, pattern):
        """Note milter-manager's condition files that pattern (relative to the
        configuration directory) loads once installed beside them."""
        parts = pattern.split(os.sep)
        for name, conditions in BUILTIN_CONDITION_FILES.items():
            candidate = [CONDITIONS_DIRECTORY, name]
            if len(parts) == len(candidate) and all(
                    fnmatch.fnmatchcase(part, glob_) for part, glob_ in zip(candidate, parts)):
                self.result.builtin_files.add(os.path.join(CONDITIONS_DIRECTORY, name))
                self.loaded_builtin_conditions.update(conditions)

    def _follow(self, path):
        path = os.path.abspath(path)
        if path in self._seen:
            return
        self._seen.add(path)
        name = os.path.relpath(path, self.directory)
        if os.path.dirname(name) == CONDITIONS_DIRECTORY and \
                os.path.basename(name) in BUILTIN_CONDITION_FILES:
            self.result.skipped.append(
                (name, "upstream's built-in applicable conditions, not translated: "
                       "milter-manager ships its own"))
            return
        self._queue.append(path)

    # Values

    def _value(self, cursor, scope):
        token = cursor.next()
        if token is None:
            raise Untranslatable("a value is missing")
        value = self._literal(token, cursor, scope)
        following = cursor.peek()
        if following is None or (following.kind == "NAME" and following.text == "do") or (
                following.kind == "OP" and following.text in (",", ")", "]", "}", "=>")) or (
                following.kind == "OP" and following.text == "{" and following.spaced):
            return value
        raise Untranslatable(_describe(following))

    def _literal(self, token, cursor, scope):
        kind, text = token.kind, token.text
        if kind == "STRING":
            if token.value is None:
                raise Untranslatable(_describe(token))
            value = token.value
            while cursor.at("STRING"):  # "a" "b" is one string in Ruby
                more = cursor.next()
                if more.value is None:
                    raise Untranslatable(_describe(more))
                value += more.value
            return Value(value, python_string(value))
        if kind == "SYMBOL":
            if token.value is None:
                raise Untranslatable(_describe(token))
            return Value(token.value, python_string(token.value))
        if kind == "WORDS":
            if token.value is None:
                raise Untranslatable(f"{text} interpolates Ruby code")
            return Value(list(token.value),
                         "[" + ", ".join(python_string(word) for word in token.value) + "]")
        if kind == "NUMBER":
            return _number(text)
        if kind == "OP" and text == "-" and cursor.at("NUMBER"):
            number = _number(cursor.next().text)
            return Value(-number.python, "-" + number.source)
        if kind == "NAME" and text in ("true", "false", "nil"):
            return {"true": Value(True, "True"), "false": Value(False, "False"),
                    "nil": Value(None, "None")}[text]
        if kind == "NAME" and text in scope and scope[text].kind == "name":
            return Value(scope[text].python, scope[text].python)
        if kind == "OP" and text == "[":
            return self._array(cursor, scope)
        if kind == "OP" and text == "{":
            return self._hash(cursor, scope)
        raise Untranslatable(_describe(token))

    def _array(self, cursor, scope):
        items = []
        while not cursor.at("OP", "]"):
            items.append(self._value(cursor, scope))
            if not cursor.accept("OP", ","):
                break
        if not cursor.accept("OP", "]"):
            raise Untranslatable("this array is not a literal")
        return Value([item.python for item in items],
                     "[" + ", ".join(item.source for item in items) + "]")

    def _hash(self, cursor, scope):
        pairs = []
        while not cursor.at("OP", "}"):
            label = cursor.accept("LABEL")
            if label is not None:
                key = Value(label.text[:-1], python_string(label.text[:-1]))
            else:
                key = self._value(cursor, scope)
                if not cursor.accept("OP", "=>"):
                    raise Untranslatable("this hash is not a literal")
            pairs.append((key, self._value(cursor, scope)))
            if not cursor.accept("OP", ","):
                break
        if not cursor.accept("OP", "}"):
            raise Untranslatable("this hash is not a literal")
        return Value({key.python: value.python for key, value in pairs},
                     "{" + ", ".join(f"{k.source}: {v.source}" for k, v in pairs) + "}")


# ---------------------------------------------------------------------------
# Writing, checking, reporting

def write(result, output_directory, force=False):
    """Write the translated files under output_directory; refuse to overwrite unless force."""
    targets = [(os.path.join(output_directory, item.name), item) for item in result.files]
    if not force:
        existing = [path for path, _ in targets if os.path.exists(path)]
        if existing:
            raise FileExistsError(
                f"{existing[0]} exists; choose another -o directory or give --force")
    for path, item in targets:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as file:
            file.write(item.text)
    return [path for path, _ in targets]


def builtin_directories():
    """The directories milter-manager's own applicable-conditions/ may be in, in order."""
    from miltermanager import config

    return list(dict.fromkeys([CHECKOUT_DIRECTORY, *config.load_paths()]))


def find_builtin_directory(directories=None):
    """The first configuration directory holding milter-manager's own condition files, or None.

    Its applicable-conditions/ must hold every file of BUILTIN_CONDITION_FILES,
    which must load (trusted, as the daemon loads them) and define their
    conditions: a directory still holding upstream's Ruby files is not it.
    """
    from miltermanager import config

    for directory in builtin_directories() if directories is None else directories:
        paths = [os.path.join(directory, CONDITIONS_DIRECTORY, name)
                 for name in BUILTIN_CONDITION_FILES]
        if not all(os.path.isfile(path) for path in paths):
            continue
        loader = config.Loader()
        for path in paths:
            loader.load_file(path)
        if not loader.errors and BUILTIN_CONDITIONS <= set(loader.configuration.conditions):
            return os.path.abspath(directory)
    return None


def verify(result, output_directory, builtin_directory=None, search=True):
    """Load the written main file with miltermanager.config; a failure needs attention.

    The output is loaded as it will be installed: in a scratch copy of the
    configuration directory, beside milter-manager's own applicable-conditions
    files (builtin_directory, else found by find_builtin_directory when search),
    which is also the load path. Without them, conditions of the same names
    stand in, so the rest is checked, and one item says the files are needed.
    """
    from miltermanager import config

    if builtin_directory is None and search:
        builtin_directory = find_builtin_directory()
    output = os.path.abspath(output_directory)
    main = os.path.join(output_directory, result.files[0].name)
    scratch = tempfile.mkdtemp(prefix="milter-manager-import-config-")
    try:
        originals = _stage(result, output, scratch, builtin_directory)
        loaded = result.files[0].name
        if loaded != MAIN_FILE:
            # As the shipped main file loads it: after the built-in conditions.
            loaded = os.path.join(scratch, MAIN_FILE)
            with open(loaded, "w", encoding="utf-8") as file:
                file.write(f'load("{CONDITIONS_DIRECTORY}/*.conf")\n'
                           f"load({python_string(result.files[0].name)})\n")
        try:
            # Not strict: the files' owners and modes are for the admin who installs them.
            config.load(os.path.join(scratch, loaded),
                        load_paths=(builtin_directory,) if builtin_directory else (),
                        strict=False)
        except config.ConfigurationError as failure:
            for error in failure.errors:
                # FILE:LINE of the output, named as the "wrote" lines name it.
                location = _unstaged(error.location, scratch, originals) or main
                reason = f"the translated configuration does not load: {error.reason}"
                if "connection_spec is required" in error.reason:
                    reason += ("; upstream may have found this milter by detection "
                               "(load_default): give it milter.connection_spec")
                result.issues.append(Issue(location, reason))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if builtin_directory is None and result.builtin_conditions:
        looked = ", ".join(os.path.join(directory, CONDITIONS_DIRECTORY)
                           for directory in builtin_directories())
        result.issues.append(Issue(main, (
            f"its milters name milter-manager's built-in conditions "
            f"{_quoted(sorted(result.builtin_conditions))}: the translated configuration "
            f"needs milter-manager's applicable-conditions files (installed by the package in "
            f"{PACKAGE_CONDITIONS}) to load; none found in {looked}")))


def _stage(result, output, scratch, builtin_directory):
    """Lay out scratch as the installed directory; return {scratch path: path to report}."""
    originals = {}
    conditions = os.path.join(scratch, CONDITIONS_DIRECTORY)
    os.makedirs(conditions)
    if builtin_directory is not None:
        shipped = os.path.join(builtin_directory, CONDITIONS_DIRECTORY)
        for name in sorted(os.listdir(shipped)):
            if os.path.isfile(os.path.join(shipped, name)):
                shutil.copyfile(os.path.join(shipped, name), os.path.join(conditions, name))
                originals[os.path.join(conditions, name)] = os.path.join(shipped, name)
    else:
        # Stand-ins of the built-ins the output loads or names, so that the rest is checked.
        stand_ins = {name: BUILTIN_CONDITION_FILES[os.path.basename(name)]
                     for name in result.builtin_files}
        if result.files[0].name != MAIN_FILE:
            stand_ins[os.path.join(CONDITIONS_DIRECTORY, "stand-ins.conf")] = sorted(
                result.builtin_conditions)
        for name, defined in stand_ins.items():
            with open(os.path.join(scratch, name), "w", encoding="utf-8") as file:
                file.writelines(f"define_applicable_condition({python_string(condition)})\n"
                                for condition in defined)
    for item in result.files:
        staged = os.path.join(scratch, item.name)
        os.makedirs(os.path.dirname(staged), exist_ok=True)
        shutil.copyfile(os.path.join(output, item.name), staged)
        originals[staged] = os.path.join(output, item.name)
    return originals


def _unstaged(location, scratch, originals):
    """A FILE:LINE in scratch as the file it was copied from; None stays None."""
    if location is None or not location.startswith(scratch + os.sep):
        return location
    path, separator, line = location.rpartition(":")
    if not separator or not line.isdigit():
        path, separator, line = location, "", ""
    return originals.get(path, path) + separator + line


def summary(result, written):
    """The lines printed at the end: what was written, skipped and needs attention."""
    lines = []
    for path, item in zip(written, result.files):
        attention = len(item.issues)
        needs = f", {attention} {'needs' if attention == 1 else 'need'} attention" \
            if attention else ""
        lines.append(f"wrote {path}: {_items(item.translated)} translated{needs}")
    for name, why in result.skipped:
        lines.append(f"skipped {name}: {why}")
    issues = result.all_issues
    if issues:
        lines.append("needs attention:")
        lines.extend(f"  {issue}" for issue in issues)
    translated = sum(item.translated for item in result.files)
    lines.append(f"{len(written)} {'file' if len(written) == 1 else 'files'} written, "
                 f"{_items(translated)} translated, {len(issues)} "
                 f"{'needs' if len(issues) == 1 else 'need'} attention")
    return lines


def _items(count):
    return f"{count} {'item' if count == 1 else 'items'}"


def translate(path):
    """Translate path and the files it loads into a Result; nothing is written.

    Twice: a milter may name a condition defined in a file translated after
    it, and the names the output will not define must be known to keep them
    out of the milter (where they would stop the output from loading).
    """
    builtin = BUILTIN_CONDITIONS if os.path.basename(path) != MAIN_FILE else frozenset()
    first = Translator(path)
    first.run()
    return Translator(path, first.defined_conditions,
                      first.loaded_builtin_conditions | builtin).run()


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # Exit status 2 means "translated, but look at the TODOs"; usage errors are 1.
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def build_parser():
    """The command's parser (also read by scripts/make-manpages for the manual page)."""
    parser = _Parser(
        prog=PROGRAM_NAME,
        description="Translate upstream milter manager's Ruby milter-manager.conf, and the "
                    "files it loads, into milter-manager's Python configuration language.")
    parser.add_argument("path", metavar="PATH", help="the Ruby milter-manager.conf")
    parser.add_argument("-o", "--output-dir", metavar="OUTPUT_DIR", default=".",
                        help="where to write the translated files (default: the current "
                             "directory; never PATH's own directory)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite files that exist in OUTPUT_DIR")
    return parser


def parse_options(argv):
    return build_parser().parse_args(argv)


def run(argv=None, stdout=None, stderr=None):
    """The command; returns its exit status (0 done, 2 needs attention, 1 failed)."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    options = parse_options(argv)
    source_directory = os.path.dirname(os.path.abspath(options.path))
    if os.path.realpath(options.output_dir) == os.path.realpath(source_directory):
        stderr.write(f"{PROGRAM_NAME}: the output directory is the input's: the Ruby files "
                     "would be overwritten; give -o OUTPUT_DIR\n")
        return EXIT_ERROR
    try:
        result = translate(options.path)
        written = write(result, options.output_dir, options.force)
    except (OSError, ValueError) as error:
        stderr.write(f"{PROGRAM_NAME}: {error}\n")
        return EXIT_ERROR
    verify(result, options.output_dir)
    for line in summary(result, written):
        stdout.write(line + "\n")
    return EXIT_ATTENTION if result.all_issues else EXIT_OK


def main(argv=None):
    """The milter-manager-import-config console script."""
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
