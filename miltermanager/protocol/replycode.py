"""The text of an SMFIR_REPLYCODE: checked against what both MTAs accept, '%' made literal.

New Postfix takes an invalid reply text as its own configuration error: it
answers 451 4.3.5 and bypasses the milter for the rest of the SMTP session.
Sendmail uses the text as a printf format and replaces a reply with a lone
'%' by its default one. So a text must have the strictest common form of
what libmilter's smfi_setreply/smfi_setmlreply build and both MTAs accept.
"""

import re

from .errors import ReplyCodeError
from .messages import REJECT, TEMPFAIL

# smfi_setmlreply's limit; neither MTA has one, but no libmilter milter sends more.
MAX_LINES = 32

_LEADING_DIGITS = re.compile(rb"\d*")
_ENHANCED_STATUS = re.compile(rb"\d\.\d{1,3}\.\d{1,3}")
# A '%%' stays as it is (both MTAs make it '%'); a lone '%' becomes '%%'.
_PERCENT = re.compile(rb"%%?")


def normalize(text):
    """Return a reply text (bytes, no trailing NUL) as it is safe to send to the MTA.

    The text must be one line "ddd text" or several joined by CRLF, each
    "ddd-text" but the last "ddd text", all with the same ddd in 4xx or 5xx
    (a reply code from a milter rejects or tempfails); an enhanced status
    code after ddd must be of ddd's class ("550 4.7.1" is invalid). A lone
    '%' is doubled so that both MTAs show a '%'. Raises ReplyCodeError
    saying what is wrong otherwise.
    """
    if not text:
        raise ReplyCodeError(text, "it is empty")
    if b"\0" in text:
        raise ReplyCodeError(text, "it contains a NUL byte")
    lines = text.split(b"\r\n")
    count = len(lines)
    if count > 1 and not lines[-1]:
        raise ReplyCodeError(text, "it ends with CRLF")
    if count > MAX_LINES:
        raise ReplyCodeError(text, f"it has {count} lines; libmilter sends at most {MAX_LINES}")
    code = None
    for number, line in enumerate(lines, 1):
        where = f"line {number}: " if count > 1 else ""
        line_code = _check_line(text, line, where, number == count)
        if code is None:
            code = line_code
        elif line_code != code:
            raise ReplyCodeError(
                text, f"{where}reply code {line_code.decode()} differs from line 1's "
                      f"{code.decode()}")
    if b"%" in text:
        text = _PERCENT.sub(b"%%", text)
    return text


def _check_line(text, line, where, last):
    """Check one line of text; return its reply code."""
    for bare in (b"\r", b"\n"):
        if bare in line:
            name = "CR" if bare == b"\r" else "LF"
            raise ReplyCodeError(
                text, f"{where}a bare {name}; lines must be separated by CRLF")
    digits = _LEADING_DIGITS.match(line).group()
    if len(digits) != 3:
        if not digits:
            reason = "it does not start with a 3-digit reply code"
        else:
            reason = f"reply code {digits.decode()} does not have 3 digits"
        raise ReplyCodeError(text, where + reason)
    code = digits.decode()
    if code[0] not in "45":
        raise ReplyCodeError(
            text, f"{where}reply code {code} is neither 4xx nor 5xx: "
                  "a milter's reply code rejects or tempfails")
    separator = line[3:4]
    if separator == b"-":
        if last:
            raise ReplyCodeError(
                text, f"{where}the last line has '-' after the reply code, not a space")
    elif separator == b" ":
        if not last:
            raise ReplyCodeError(
                text, f"{where}a space after the reply code, but more lines follow "
                      "('-' continues a reply)")
    else:
        raise ReplyCodeError(text, f"{where}reply code {code} is not followed by a space or '-'")
    # New Postfix takes any digit here as the class of an enhanced status code.
    first = line[4:5]
    if first.isdigit() and first != digits[:1]:
        enhanced = _ENHANCED_STATUS.match(line, 4)
        if enhanced:
            reason = (f"enhanced status code {enhanced.group().decode()} is not of "
                      f"reply code {code}'s class {code[0]}")
        else:
            reason = (f"the text after reply code {code} starts with {first.decode()}; "
                      f"Postfix takes a digit there as an enhanced status class, "
                      f"which must be {code[0]}")
        raise ReplyCodeError(text, where + reason)
    return digits


def status(text):
    """The plain reply a reply text's code stands for: TEMPFAIL (4xx), REJECT (5xx) or None.

    Looks at the first byte only, so a caller can still fall back to the
    code's class when normalize() refused the text.
    """
    first = text[:1]
    if first == b"5":
        return REJECT
    if first == b"4":
        return TEMPFAIL
    return None
