"""Reading a system's files under a root: shell assignments, variable expansion, option flags.

Service files are shell (init scripts, /etc/default, /etc/sysconfig,
rc.conf) or systemd's environment syntax; detection reads them without
running them, as upstream did: `VAR=value` lines are taken in order, and
`$VAR`, `${VAR}`, `${VAR:-default}` are expanded from what was read. A
reference to something never set stays as written, so that a socket that
needs it is reported with the unexpanded text instead of a guess.
"""

import glob
import os
import re
import shlex

from .report import Skip

ASSIGNMENT = re.compile(r"\s*(?:export\s+|readonly\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)")
# $NAME, ${NAME}, ${NAME:-default} (also -, :=, =); a backslash before $ escapes it.
_REFERENCE = re.compile(
    r"(?<!\\)\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-=])((?:[^{}]|\{[^{}]*\})*))?\}"
    r"|([A-Za-z_][A-Za-z0-9_]*))")
_POSITIONAL = re.compile(r"\$\{?[0-9@*#?]")


class Tree:
    """The file system seen from root: paths are given as on the real system."""

    def __init__(self, root="/"):
        self.root = os.path.abspath(root)

    def real(self, path):
        """Where path is under the root."""
        return os.path.join(self.root, path.lstrip("/"))

    def exists(self, path):
        return os.path.exists(self.real(path))

    def lexists(self, path):
        """path exists, or is a symbolic link (whose target may be outside a test's root)."""
        return os.path.lexists(self.real(path))

    def isfile(self, path):
        return os.path.isfile(self.real(path))

    def link_target(self, path):
        """The target of the symbolic link at path, or None."""
        try:
            return os.readlink(self.real(path))
        except OSError:
            return None

    def glob(self, pattern):
        """Paths (as on the real system) matching pattern, sorted."""
        prefix = len(self.root.rstrip("/"))
        return sorted(match[prefix:] or "/" for match in glob.glob(self.real(pattern)))

    def read(self, path):
        """The text of path; Skip when it cannot be read (missing, unreadable, a directory)."""
        try:
            with open(self.real(path), "rb") as file:
                data = file.read()
        except FileNotFoundError:
            raise Skip(path, "missing") from None
        except OSError as error:
            raise Skip(path, f"cannot read it: {error.strerror or error}") from None
        return data.decode("utf-8", "replace")


class Variables:
    """Shell variables read so far, each with the file that set it."""

    def __init__(self):
        self.values = {}
        self.origins = {}

    def get(self, name, default=None):
        return self.values.get(name, default)

    def origin(self, name):
        return self.origins.get(name)

    def set(self, name, value, origin):
        self.values[name] = value
        self.origins[name] = origin

    def __contains__(self, name):
        return name in self.values

    def expand(self, text):
        """text with $VAR, ${VAR}, ${VAR:-default}, ${VAR:=default} replaced where known."""

        def replace(match):
            name = match.group(1) or match.group(4)
            operator, default = match.group(2), match.group(3)
            value = self.values.get(name)
            if operator is None:
                return match.group(0) if value is None else value
            if value is None or (value == "" and operator.startswith(":")):
                expanded = self.expand(unquote(default))
                if operator.endswith("="):
                    self.values[name] = expanded
                return expanded
            return value

        return _REFERENCE.sub(replace, text).replace("\\$", "$")

    def referenced(self, text):
        """The names of the variables text refers to, in order."""
        return [match.group(1) or match.group(4) for match in _REFERENCE.finditer(text)]

    def read_assignments(self, text, origin, accept=None):
        """Take every VAR=value line of the shell text, in order (accept(name) filters)."""
        for line in logical_lines(text):
            match = ASSIGNMENT.fullmatch(line)
            if match is None or (accept is not None and not accept(match.group(1))):
                continue
            word = shell_word(match.group(2))
            if _POSITIONAL.search(word):
                continue  # a function's argument (CONF="$1"): unknown here, as upstream
            self.set(match.group(1), self.expand(word), origin)


def logical_lines(text):
    """The lines of a shell or configuration text, backslash continuations joined."""
    lines, pending = [], ""
    for line in text.splitlines():
        if line.endswith("\\") and not line.lstrip().startswith("#"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    if pending:
        lines.append(pending)
    return lines


def shell_word(text):
    """The first shell word of text, quotes removed ("a b" c -> a b); what an assignment gets.

    Variable references are kept for Variables.expand; text in single
    quotes loses its `$` meaning, so such `$` are escaped away from it.
    """
    out, index, length = [], 0, len(text)
    while index < length:
        char = text[index]
        if char in " \t;&|)" or (char == "#" and not out):
            break
        if char == "'":
            end = text.find("'", index + 1)
            end = length if end < 0 else end
            out.append(text[index + 1:end].replace("$", "\\$"))
            index = end + 1
        elif char == '"':
            end = index + 1
            while end < length and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            out.append(text[index + 1:end].replace('\\"', '"'))
            index = end + 1
        elif char == "\\" and index + 1 < length:
            out.append(text[index + 1])
            index += 2
        else:
            out.append(char)
            index += 1
    return "".join(out)


def unquote(text):
    """text without one pair of surrounding quotes."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def split(text):
    """Shell words of text; an unbalanced quote gives the whitespace-separated words."""
    try:
        return shlex.split(text, comments=False)
    except ValueError:
        return text.split()


def option_value(words, options):
    """The value of the last of options in words (`-p X`, `-pX`, `--opt=X`), or None."""
    value = None
    for index, word in enumerate(words):
        for option in options:
            if word == option and index + 1 < len(words):
                value = words[index + 1]
            elif option.startswith("--") and word.startswith(option + "="):
                value = word[len(option) + 1:]
            elif not option.startswith("--") and word.startswith(option) and word != option:
                value = word[len(option):]
    return value


def find_option(command, variables, options, origin):
    """(value, file) of options in a command line, following the variables it uses.

    command is the line as written ("/usr/sbin/opendkim $OPTIONS"); the
    option is looked for in its own words first, then in each variable it
    refers to, so that the file named is the one that set the option.
    """
    if not command:
        return None
    value = option_value(split(command), options)
    if value is not None:
        names = variables.referenced(value)
        where = variables.origin(names[0]) if names and names[0] in variables else origin
        return variables.expand(value), where
    for name in variables.referenced(command):
        if name in variables:
            value = option_value(split(variables.get(name)), options)
            if value is not None:
                return variables.expand(value), variables.origin(name)
    return None
