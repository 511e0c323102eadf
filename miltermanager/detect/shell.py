"""Reading a system's files under a root: shell assignments, variable expansion, option flags.

Service files are shell (init scripts, /etc/default, /etc/sysconfig,
rc.conf) or systemd's environment syntax; detection reads them without
running them, as upstream did: `VAR=value` lines are taken in order, and
`$VAR`, `${VAR}`, `${VAR:-default}` are expanded from what was read. A
reference to something never set stays as written, so that a socket that
needs it is reported with the unexpanded text instead of a guess.

Unlike upstream, an `if`/`elif` whose condition is a file test (`[ -x PATH ]`,
`test -f PATH`, `!`, `&&`, `||`) is decided against the tree, so that only
the branch that runs is read: Debian's spamass-milter script sets its socket
in `if [ -x /usr/sbin/postfix ]`. A condition that cannot be decided here (a
command, a string test) leaves its branches read, as before.

Symbolic links under a root other than / are followed inside that root, as
a chroot would: an absolute link never leads to this host's files.
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

    def real(self, path, follow_last=True):
        """Where path is under the root, its symbolic links followed inside the root."""
        if self.root == "/":
            return os.path.join("/", path.lstrip("/"))
        parts, done, links = [part for part in path.split("/") if part], [], 0
        while parts:
            part = parts.pop(0)
            if part in (".", ".."):
                if part == ".." and done:
                    done.pop()
                continue
            here = os.path.join(self.root, *done, part)
            if (parts or follow_last) and os.path.islink(here):
                links += 1
                if links > 40:  # a loop: the system says ELOOP; never let the OS follow it
                    raise Skip(path, "too many levels of symbolic links")
                try:
                    target = os.readlink(here)
                except OSError:
                    target = part
                if target.startswith("/"):
                    done = []
                parts[:0] = [piece for piece in target.split("/") if piece]
                continue
            done.append(part)
        return os.path.join(self.root, *done)

    def exists(self, path):
        return self._holds(os.path.exists, path)

    def lexists(self, path):
        """path exists, or is a symbolic link (whose target may be outside a test's root)."""
        return self._holds(os.path.lexists, path, follow_last=False)

    def isfile(self, path):
        return self._holds(os.path.isfile, path)

    def _holds(self, test, path, follow_last=True):
        """test(the real path); False for a path that loops (see real)."""
        try:
            return test(self.real(path, follow_last))
        except Skip:
            return False

    def link_target(self, path):
        """The target of the symbolic link at path, or None."""
        try:
            return os.readlink(self.real(path, follow_last=False))
        except (OSError, Skip):
            return None

    def glob(self, pattern):
        """Paths (as on the real system) matching pattern, sorted."""
        prefix = len(self.root.rstrip("/"))
        try:
            real = self.real(pattern)
        except Skip:
            return []
        return sorted(match[prefix:] or "/" for match in glob.glob(real))

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

    def read_assignments(self, text, origin, accept=None, tree=None):
        """Take every VAR=value line of the shell text, in order (accept(name) filters).

        With tree, lines in an `if` branch that does not run there are passed over.
        """
        lines = logical_lines(text) if tree is None else running_lines(text, tree, self)
        for line in lines:
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


_BRANCH = re.compile(r"\s*(if|elif|else|fi|then)(?=$|[\s;])\s*(.*?)\s*$")
_THEN = re.compile(r"(.*?)(?:^|;|\s)\s*then(?:$|[\s;])\s*(.*)$")
_FILE_TESTS = {"-e", "-f", "-d", "-x", "-r", "-s", "-L", "-h"}


def running_lines(text, tree, variables):
    """The logical lines of shell text that run, or may run, under tree.

    `if`/`elif`/`else`/`fi` are followed; a branch is passed over only when
    its condition is decided false (or an earlier branch decided true).
    Conditions are expanded with variables as read up to that line.
    """
    frames = []  # per open `if`: [an earlier branch ran (True/False/None), this one runs]
    for line in logical_lines(text):
        match = _BRANCH.match(line)
        live = all(frame[1] is not False for frame in frames)
        if match is None:
            if live:
                yield line
            continue
        keyword, rest = match.groups()
        body = ""
        if keyword in ("if", "elif"):
            then = _THEN.match(rest)
            condition, body = (then.group(1), then.group(2)) if then else (rest, "")
            enclosing = frames if keyword == "if" else frames[:-1]
            decided = condition_holds(condition.rstrip(" ;"), tree, variables) \
                if all(frame[1] is not False for frame in enclosing) else False
            if keyword == "if":
                frames.append([decided, decided])
            elif frames:
                earlier = frames[-1][0]
                runs = False if earlier is True or decided is False else (
                    decided if earlier is False else None)
                frames[-1] = [_either(earlier, decided), runs]
        elif keyword == "else" and frames:
            earlier = frames[-1][0]
            frames[-1] = [True, None if earlier is None else not earlier]
            body = rest.lstrip(";").strip()
        elif keyword == "fi" and frames:
            frames.pop()
        elif keyword == "then":
            body = rest
        fi = re.search(r"(?:^|;)\s*fi\s*;?\s*$", body)
        if fi:
            body = body[:fi.start()]
        if body.strip() and all(frame[1] is not False for frame in frames):
            yield body
        if fi and frames:
            frames.pop()


def condition_holds(text, tree, variables):
    """True or False for a condition of file tests decided under tree; None when unknown.

    `A && B` and `A || B` are taken left to right, as the shell does.
    """
    try:
        lexer = shlex.shlex(variables.expand(text), posix=True, punctuation_chars="&|;")
        lexer.whitespace_split = True
        tokens = list(lexer)
    except ValueError:
        return None
    result, operator, command = True, "&&", []
    for token in tokens + ["&&"]:
        if token not in ("&&", "||"):
            if token == ";" or token.startswith(("&", "|")):
                return None  # a list or a pipeline: not a simple test
            command.append(token)
            continue
        value = _test(command, tree)
        if operator == "&&":
            result = False if result is False or value is False else (
                None if result is None or value is None else True)
        else:
            result = _either(result, value)
        operator, command = token, []
    return result


def _either(first, second):
    """`first || second` where None is unknown."""
    if first is True or second is True:
        return True
    return False if first is False and second is False else None


def _test(words, tree):
    """True/False for `[ -x PATH ]`, `test -f PATH`, with `!`; None for anything else."""
    negate = False
    while words and words[0] == "!":
        negate, words = not negate, words[1:]
    if words[:1] == ["["] and words[-1:] == ["]"]:
        words = words[1:-1]
    elif words[:1] == ["test"]:
        words = words[1:]
    else:
        return None
    if words[:1] == ["!"]:
        negate, words = not negate, words[1:]
    if len(words) != 2 or words[0] not in _FILE_TESTS or not words[1].startswith("/") \
            or "$" in words[1] or "`" in words[1]:
        return None
    test, path = words
    try:
        real = tree.real(path, follow_last=test not in ("-L", "-h"))
    except Skip:
        return negate  # a looping path: no file test holds for it
    if test in ("-L", "-h"):
        holds = os.path.islink(real)
    elif test == "-f":
        holds = os.path.isfile(real)
    elif test == "-d":
        holds = os.path.isdir(real)
    elif test == "-s":
        holds = os.path.exists(real) and os.path.getsize(real) > 0
    else:
        holds = os.path.exists(real) and (
            test == "-e" or os.access(real, os.X_OK if test == "-x" else os.R_OK))
    return holds != negate


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
