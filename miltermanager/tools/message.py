"""The message milter-test-server sends: mail-file parsing, milter edits, upstream's report.

Pure functions over plain values, no I/O. Text is str throughout; bytes from a
mail file or a milter are decoded as UTF-8 with surrogateescape, so any 8-bit
byte survives the round trip to the wire and to the terminal unchanged.
"""

import codecs
import difflib
import email.utils
import re
from dataclasses import dataclass, field, replace

from ..protocol import messages as m

MAX_CHUNK_SIZE = 65535
DEFAULT_BODY = ("La de da de da 1.\n"
                "La de da de da 2.\n"
                "La de da de da 3.\n"
                "La de da de da 4.")
# upstream's section rulers (print_message in tool/milter-test-server.c)
ENVELOPE_RULER = "Envelope:------------------------------"
HEADER_RULER = "Header:--------------------------------"
BODY_RULER = "Body:----------------------------------"
COLORS = {"+": "\033[01;32m", "-": "\033[01;31m"}
NORMAL_COLOR = "\033[00m"

_EXTENDED_CODE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")
_CHARSET = re.compile(r"""charset\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s;]+))""", re.IGNORECASE)


class MailFileError(ValueError):
    """A mail file milter-test-server cannot read as RFC 822."""


def text(data):
    """Bytes from a file or the wire as str; 8-bit bytes survive as surrogates."""
    return data.decode("utf-8", "surrogateescape")


def wire(value):
    """The bytes of a str made by text()."""
    return value.encode("utf-8", "surrogateescape")


def normalize_address(address):
    """Put an address in angle brackets unless it already is (upstream's rule)."""
    if address.startswith("<") and address.endswith(">"):
        return address
    return f"<{address}>"


def extract_paths(value):
    """The addresses of a From:/To: header value, each as <addr>.

    Upstream takes the first <...> or else the first word; that turns
    "a@example.com, b@example.com" into "<a@example.com,>". Parse the
    address list instead, and fall back to upstream's rule when that finds
    nothing.
    """
    paths = [f"<{address}>" for _, address in email.utils.getaddresses([value]) if address]
    if paths:
        return paths
    start = value.find("<")
    if start >= 0:
        end = value.find(">", start)
        if end < 0:
            raise MailFileError(f"invalid mail address: <{value}>")
        return [value[start:end + 1]]
    words = value.split()
    return [f"<{words[0]}>"] if words else []


def to_crlf(data):
    """Body bytes with CRLF line ends, as MTAs send them to milters."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def split_body(body, size=MAX_CHUNK_SIZE):
    """Body chunks of at most size bytes, as MTAs cut them; none for an empty body."""
    return [body[start:start + size] for start in range(0, len(body), size)]


@dataclass
class MailFile:
    """What a mail file gives: headers, body (CRLF) and the envelope its From:/To: imply."""

    headers: list
    body: bytes
    sender: str | None = None
    recipients: list = field(default_factory=list)


def parse_mail(data):
    """Parse an RFC 822 message (bytes): headers, body with CRLF, From:/To: addresses.

    As upstream: an mbox "From " line is skipped; a header line starts with
    a letter or digit and has a colon; continuation lines are joined with a
    bare LF (the milter wire form of a folded header); the value loses its
    leading white space. The body is everything after the first empty line.
    """
    lines = data.split(b"\n")
    if lines and lines[0].startswith(b"From "):
        del lines[0]
    headers = []
    body_start = len(lines)
    for index, raw in enumerate(lines):
        line = text(raw[:-1] if raw.endswith(b"\r") else raw)
        if not line:
            body_start = index + 1
            break
        if line[0].isascii() and line[0].isalnum() and ":" in line:
            name, _, value = line.partition(":")
            headers.append([name.rstrip(" \t"), value.lstrip(" \t")])
        elif line[0] in " \t" and headers:
            headers[-1][1] += "\n" + line
        else:
            raise MailFileError(f"invalid header: <{line}>")
    body = to_crlf(b"\n".join(lines[body_start:]))
    mail = MailFile([tuple(header) for header in headers], body)
    for name, value in mail.headers:
        lowered = name.lower()
        if lowered == "from" and mail.sender is None:
            paths = extract_paths(value)
            if paths:
                mail.sender = paths[0]
        elif lowered == "to":
            mail.recipients.extend(extract_paths(value))
    return mail


@dataclass
class Message:
    """One message as the MTA sees it: envelope, headers (name, value), body (CRLF bytes)."""

    sender: str
    recipients: list
    headers: list
    body: bytes

    def copy(self):
        return replace(self, recipients=list(self.recipients), headers=list(self.headers))


def _header_value(value, leading_space):
    value = text(value)
    if leading_space and value.startswith(" "):
        # With SMFIP_HDR_LEADSPC the milter supplies the space after the colon itself.
        return value[1:]
    return value


def _remove_address(addresses, address):
    if address in addresses:
        addresses.remove(address)
        return
    folded = address.lower()
    for index, candidate in enumerate(addresses):
        if candidate.lower() == folded:
            del addresses[index]
            return


def apply_modifications(message, modifications, leading_space=False):
    """Return (new message, body replaced?) after a milter's end-of-message edits.

    Edits apply in order, as Postfix applies them: AddHeader appends;
    InsertHeader puts the header at a 0-based position among all headers;
    ChangeHeader changes the index-th (1-based, 0 taken as 1) header of that
    name, deletes it for an empty value and appends when there is no such
    header; ReplaceBody packets together replace the body. Quarantine and
    anything unknown leave the message alone.
    """
    result = message.copy()
    headers = result.headers
    body = []
    for modification in modifications:
        kind = type(modification)
        if kind is m.AddHeader:
            headers.append((text(modification.name),
                            _header_value(modification.value, leading_space)))
        elif kind is m.InsertHeader:
            position = min(modification.index, len(headers))
            headers.insert(position, (text(modification.name),
                                      _header_value(modification.value, leading_space)))
        elif kind is m.ChangeHeader:
            name = text(modification.name)
            value = _header_value(modification.value, leading_space)
            folded = name.lower()
            positions = [i for i, (n, _) in enumerate(headers) if n.lower() == folded]
            index = max(modification.index, 1)
            if index <= len(positions):
                if value:
                    headers[positions[index - 1]] = (name, value)
                else:
                    del headers[positions[index - 1]]
            elif value:
                headers.append((name, value))
        elif kind is m.ChangeFrom:
            result.sender = normalize_address(text(modification.address))
        elif kind in (m.AddRecipient, m.AddRecipientPar):
            address = modification.recipient if kind is m.AddRecipient else modification.address
            result.recipients.append(normalize_address(text(address)))
        elif kind is m.DeleteRecipient:
            _remove_address(result.recipients, normalize_address(text(modification.recipient)))
        elif kind is m.ReplaceBody:
            body.append(modification.chunk)
    replaced = any(type(mod) is m.ReplaceBody for mod in modifications)
    if replaced:
        result.body = b"".join(body)
    return result, replaced


# ------------------------------------------------------------------ the report


def parse_reply_code(reply_text):
    """Split an SMTP reply ("550 5.7.1 Go away", multi-line too) into (code, extended, message).

    Upstream takes the word after the code as the extended code whatever it
    is ("550 Go away" gives <Go>(away)); here it is one only if it looks like
    x.y.z. Lines of a multi-line reply are joined with a space.
    """
    lines = reply_text.replace("\r\n", "\n").split("\n")
    code = lines[0][:3]
    extended = None
    texts = []
    for line in lines:
        rest = line[4:] if len(line) > 3 and line[3] in " -" else line[3:]
        word, _, after = rest.partition(" ")
        if _EXTENDED_CODE.match(word):
            if extended is None:
                extended = word
            rest = after
        texts.append(rest)
    message = " ".join(part for part in texts if part)
    return int(code) if code.isdigit() else 0, extended, message


def status_line(status, reply_code=None):
    """upstream's first line: "status: NAME" plus " [CODE]<EXTENDED>(MESSAGE)" after a ReplyCode."""
    line = f"status: {status}"
    if reply_code is not None:
        code, extended, message = reply_code
        line += f" [{code}]<{extended or ''}>({message or ''})"
    return line


def _marked(prefix, line, color):
    if color and prefix in COLORS:
        return f"{COLORS[prefix]}{prefix} {line}{NORMAL_COLOR}"
    return f"{prefix} {line}"


def _diff(original, result):
    """(prefix, item) pairs: " " kept, "-" removed, "+" added; a changed item is - then +."""
    matcher = difflib.SequenceMatcher(None, original, result, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            for item in original[i1:i2]:
                yield " ", item
            continue
        for item in original[i1:i2]:
            yield "-", item
        for item in result[j1:j2]:
            yield "+", item


def _header_lines(prefix, name, value, color):
    """upstream's print_header: "NAME: first line", then each further line as it is."""
    lines = value.split("\n") if value else []
    if not lines:
        return [_marked(prefix, f"{name}:", color)]
    out = [_marked(prefix, f"{name}: {lines[0]}", color)]
    out.extend(_marked(prefix, line, color) for line in lines[1:])
    return out


def message_charset(headers):
    """The charset parameter of the last Content-Type header, or None."""
    for name, value in reversed(headers):
        if name.lower() == "content-type":
            found = _CHARSET.search(value)
            if found:
                return next(group for group in found.groups() if group is not None)
            return None
    return None


def body_text(body, headers):
    """The body for the terminal: decoded with the message's charset, LF line ends.

    Returns (text, error): error is upstream's conversion error message, or None.
    """
    body = body.replace(b"\r\n", b"\n")
    charset = message_charset(headers)
    if charset:
        try:
            codecs.lookup(charset)
            return body.decode(charset), None
        except (LookupError, UnicodeDecodeError) as problem:
            return text(body), f"{charset}: {problem}"
    return text(body), None


def render_message(original, result, body_replaced=False, color=False):
    """The --output-message block: Envelope, Header and Body sections, as upstream prints them."""
    lines = [ENVELOPE_RULER]
    if original.sender == result.sender:
        lines.append(_marked(" ", f"MAIL FROM:{original.sender}", color))
    else:
        lines.append(_marked("-", f"MAIL FROM:{original.sender}", color))
        lines.append(_marked("+", f"MAIL FROM:{result.sender}", color))
    for prefix, recipient in _diff(original.recipients, result.recipients):
        lines.append(_marked(prefix, f"RCPT TO:{recipient}", color))
    lines.append(HEADER_RULER)
    for prefix, (name, value) in _diff(original.headers, result.headers):
        lines.extend(_header_lines(prefix, name, value, color))
    lines.append(BODY_RULER)
    body = result.body if body_replaced else original.body
    shown, problem = body_text(body, result.headers)
    if problem:
        lines.append("Error:---------------------------------")
        lines.append(problem)
        lines.append("---------------------------------------")
    lines.append(shown)
    return "\n".join(lines) + "\n"


def render_result(result, output_message=False, color=False):
    """upstream's print_result for one finished session (result: a SessionResult)."""
    lines = [status_line(result.status, result.reply_code),
             "elapsed-time: %g seconds" % result.elapsed]
    if result.quarantine_reason is not None:
        lines.append(f"Quarantine reason: <{result.quarantine_reason}>")
    out = "\n".join(lines) + "\n"
    if output_message:
        out += "\n" + render_message(result.original, result.message,
                                     result.body_replaced, color)
    return out
