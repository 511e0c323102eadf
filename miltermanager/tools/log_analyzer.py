"""milter-manager-log-analyzer: a static HTML report with SVG graphs from statistics log lines.

    milter-manager-log-analyzer --output-directory /var/lib/milter-manager/report \\
        /var/log/mail.log /var/log/mail.log.1 /var/log/mail.log.2.gz

reads upstream milter manager's `[statistics]` lines (upstream's
tool/milter-manager-log-analyzer reads the same ones) from syslog files
(plain or gzip), `journalctl -o export` output and milter-manager's own log
file, and writes index.html plus one SVG per graph: sessions, the manager's
verdicts, spam/virus/DKIM/greylist counters from the headers children add,
and per child its statuses, latency and counters, for the last day, week
and month of the log, with a table per day. Upstream keeps RRD files between
runs; this tool keeps nothing and reads the logs it is given each time.
"""

import argparse
import bisect
import html
import io
import os
import re
import struct
import sys
import time
import zlib
from collections import Counter
from datetime import date, datetime, timedelta

PROGRAM_NAME = "milter-manager-log-analyzer"

# ---------------------------------------------------------------- statistics lines
# The content of a statistics line, without any "[statistics] " prefix.
_SESSION_END = re.compile(r"\[session\]\[end\]\[([\w-]+)\]\[([\w-]+)\]\[(\d+(?:\.\d*)?)\]"
                          r"\(([^()]*)\)$")
_SESSION_END_OLD = re.compile(r"\[session\]\[end\]\[(\d+(?:\.\d*)?)\]\(([^()]*)\)$")
_MILTER_END = re.compile(r"\[milter\]\[end\]\[([\w-]+)\]\[([\w-]+)\]\[(\d+(?:\.\d*)?)\]"
                         r"\(([^()]*)\): (.+)$")
_MILTER_END_OLD = re.compile(r"\[milter\]\[end\]\[(\d+(?:\.\d*)?)\]\(([^()]*)\): (.+)$")
_HEADER_ADD = re.compile(r"\[milter\]\[header\]\[add\]\(([^()]*)\): <(.+?)>=<(.*?)>: (.+)$")
_SESSION_HEADER = re.compile(r"\[session\]\[header\]\[add\]\(([^()]*)\): <.+?>=<.*>$")
_DISCONNECTED = re.compile(r"\[session\]\[disconnected\]\[(\d+(?:\.\d*)?)\]\(([^()]*)\)")
_FINISHED = re.compile(r"\[sessions\]\[finished\] (\d+)\(\+(\d+)\) (\d+)$")
_QUARANTINE = re.compile(r"\[reply\]\[end-of-message\]\[quarantine\]\(([^()]*)\)$")
_MEMORY = re.compile(r"\[maintain\]\[memory\] ")
# Lines of 2009 that upstream's analyzer still reads.
_LEGACY_REPLY = re.compile(r"\[reply\]\[([\w-]+)\]\[([\w-]+)\]$")
_LEGACY_ABORT = re.compile(r"\[abort\]\[([\w-]+)\]$")
_LEGACY_START = re.compile(r"\[(?:session|milter)\]\[start\]")
# A line of our own log file starting with one of these is meant as a statistics line:
# when it does not parse, it is counted as unreadable.
_STATISTICS_PREFIXES = ("[session][end]", "[milter][end]", "[milter][header][add]",
                        "[session][disconnected]", "[sessions][finished]",
                        "[reply][end-of-message][quarantine]", "[session][header][add]")

STATUSES = ("pass", "accept", "reject", "discard", "temporary-failure", "quarantine", "abort",
            "error")
CHILD_STATUSES = STATUSES + ("stop",)
# Upstream writes "pass" for these; older lines may carry them.
_PASS = frozenset({"default", "not-change", "continue", "pass"})
REPORTS = ("spam", "virus", "uribl", "greylisting-pass", "tarpitting-pass", "spf-pass",
           "spf-fail", "sender-id-pass", "sender-id-fail", "dkim-pass", "dkim-fail",
           "dkim-adsp-pass", "dkim-adsp-fail")
_AUTHENTICATION_TYPES = frozenset({"spf", "sender-id", "dkim", "dkim-adsp"})
_SPAM_HEADERS = frozenset({"x-spam-flag", "x-spam", "x-spam-status"})


def header_reports(name, value):
    """The report counters (REPORTS) one added header adds to, as upstream's analyzer reads it.

    X-Spam-Flag / X-Spam "yes" and X-Spam-Status "Yes, ..." are spam; an
    X-Spam-Status whose tests= list has URIBL_* is uribl; X-Virus-Status
    "Infected" is virus; X-Greylist "Delayed for" is greylisting-pass and
    "... whitelisted by tarpit" tarpitting-pass; each `TYPE=pass|fail` of
    Authentication-Results (spf, sender-id, dkim, dkim-adsp) is TYPE-pass or
    TYPE-fail.
    """
    name = name.lower()
    value = value.strip()
    keys = []
    if name in ("x-spam-flag", "x-spam"):
        if value.lower() == "yes":
            keys.append("spam")
    elif name == "x-spam-status":
        if re.match(r"yes\b", value, re.I):
            keys.append("spam")
        tests = re.search(r"\btests=(.*)", value, re.S)
        if tests:
            listed = re.split(r"\s+[\w-]+=", tests.group(1), maxsplit=1)[0]
            if any(re.match(r"URIBL_", test.strip(), re.I) for test in listed.split(",")):
                keys.append("uribl")
    elif name == "x-virus-status":
        if re.match(r"infected\b", value, re.I):
            keys.append("virus")
    elif name == "x-greylist":
        if re.match(r"delayed for\b", value, re.I):
            keys.append("greylisting-pass")
        elif re.search(r"whitelisted by tarpit", value, re.I):
            keys.append("tarpitting-pass")
    elif name == "authentication-results":
        for result in re.split(r";\s*", value)[1:]:
            match = re.match(r"([\w-]+)=(\w+)(?:\s|$)", result.strip())
            if match and match.group(1).lower() in _AUTHENTICATION_TYPES:
                verdict = match.group(2).lower()
                if verdict in ("pass", "fail"):
                    keys.append(f"{match.group(1).lower()}-{verdict}")
    return keys


class Statistics:
    """Counts per local hour, from the statistics lines fed to it.

    counts[hour_start][key] and maxima[hour_start][key], key a tuple:
    ("sessions", "smtp"|"child"|"disconnected"), ("status", STATUS),
    ("report", KEY), ("child-status", NAME, STATUS), ("child-report", NAME,
    KEY), ("child-elapsed", NAME) and ("child-n", NAME) (sum of seconds, and
    how many), ("session-elapsed",), ("child-elapsed-max", NAME) and
    ("concurrent",) in maxima.
    """

    def __init__(self):
        self.counts = {}
        self.maxima = {}
        self.children = []  # in order of appearance
        self.lines = 0  # statistics lines used
        self.first = self.last = None
        self._hour = (None, None)  # (start, end) of the last hour looked up
        self._spam_seen = {}  # (tag, child) -> spam header names of the message seen

    def _bucket(self, timestamp):
        start, end = self._hour
        if start is None or not start <= timestamp < end:
            local = time.localtime(int(timestamp))
            start = int(timestamp) - local.tm_min * 60 - local.tm_sec
            end = start + 3600
            self._hour = (start, end)
            self.counts.setdefault(start, Counter())
            self.maxima.setdefault(start, {})
        return start

    def _max(self, hour, key, value):
        maxima = self.maxima[hour]
        if value > maxima.get(key, -1):
            maxima[key] = value

    def _child(self, name):
        if name not in self.children:
            self.children.append(name)

    def feed(self, timestamp, content):
        """Count one statistics line; False when it is not one (malformed)."""
        handled = self._feed(timestamp, content)
        if handled:
            self.lines += 1
            if self.first is None or timestamp < self.first:
                self.first = timestamp
            if self.last is None or timestamp > self.last:
                self.last = timestamp
        return handled

    def _feed(self, timestamp, content):
        if content.startswith("[milter][end]"):
            match = _MILTER_END.match(content)
            if match:
                _, status, elapsed, _, name = match.groups()
            else:
                match = _MILTER_END_OLD.match(content)
                if not match:
                    return False
                elapsed, _, name = match.groups()
                status = None
            hour = self._bucket(timestamp)
            counts = self.counts[hour]
            self._child(name)
            counts[("sessions", "child")] += 1
            if status is not None:
                counts[("child-status", name, "pass" if status in _PASS else status)] += 1
            counts[("child-elapsed", name)] += float(elapsed)
            counts[("child-n", name)] += 1
            self._max(hour, ("child-elapsed-max", name), float(elapsed))
            return True
        if content.startswith("[milter][header][add]"):
            match = _HEADER_ADD.match(content)
            if not match:
                return False
            tag, name, value, child = match.groups()
            counts = self.counts[self._bucket(timestamp)]
            self._child(child)
            for key in header_reports(name, value):
                if key == "spam" and not self._new_spam(tag, child, name.lower()):
                    continue
                counts[("report", key)] += 1
                counts[("child-report", child, key)] += 1
            return True
        if content.startswith("[session][end]"):
            match = _SESSION_END.match(content)
            if match:
                _, status, elapsed, _ = match.groups()
            else:
                match = _SESSION_END_OLD.match(content)
                if not match:
                    return False
                elapsed, _ = match.groups()
                status = None
            counts = self.counts[self._bucket(timestamp)]
            counts[("sessions", "smtp")] += 1
            if status is not None:
                counts[("status", "pass" if status in _PASS else status)] += 1
            counts[("session-elapsed",)] += float(elapsed)
            return True
        if content.startswith("[session][disconnected]"):
            if not _DISCONNECTED.match(content):
                return False
            self.counts[self._bucket(timestamp)][("sessions", "disconnected")] += 1
            return True
        if content.startswith("[sessions][finished]"):
            match = _FINISHED.match(content)
            if not match:
                return False
            self._max(self._bucket(timestamp), ("concurrent",), int(match.group(3)))
            return True
        if _QUARANTINE.match(content):
            self.counts[self._bucket(timestamp)][("status", "quarantine")] += 1
            return True
        match = _LEGACY_REPLY.match(content)
        if match:
            stage, status = match.groups()
            if status == "continue" and stage != "end-of-message":
                return True
            status = "pass" if status in _PASS else status
            self.counts[self._bucket(timestamp)][("status", status)] += 1
            return True
        if _LEGACY_ABORT.match(content):
            self.counts[self._bucket(timestamp)][("status", "abort")] += 1
            return True
        if (_SESSION_HEADER.match(content) or _MEMORY.match(content)
                or _LEGACY_START.match(content)):
            return True
        return False

    def _new_spam(self, tag, child, header):
        """Whether a spam header starts a new message: X-Spam-Flag and X-Spam-Status of one
        message count once; the same header again is the next message's."""
        seen = self._spam_seen.get((tag, child))
        if seen is None or header in seen:
            self._spam_seen[(tag, child)] = {header}
            if len(self._spam_seen) > 10000:
                self._spam_seen = {(tag, child): {header}}
            return True
        seen.add(header)
        return False


# ---------------------------------------------------------------- reading logs
_SYSLOG = re.compile(r"(?:<\d{1,3}>)?([A-Z][a-z]{2}) {1,2}(\d{1,2}) (\d\d):(\d\d):(\d\d) "
                     r"(\S+) ([^\s\[:]+)(?:\[\d+\])?: (.*)$", re.S)
_ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?"
_ISO_SYSLOG = re.compile(rf"({_ISO}) (\S+) ([^\s\[:]+)(?:\[\d+\])?: (.*)$", re.S)
_OWN_FILE = re.compile(rf"({_ISO}) \[[^\]]*\] (.*)$", re.S)
_SOLARIS_ID = re.compile(r"\[ID \d+ [\w.]+\] ")
_MONTHS = {name: number for number, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
PROGRAM = "milter-manager"


class Reader:
    """Reads log files line by line and feeds the statistics lines to a Statistics.

    Counts every line (`lines`), the lines it could not read at all or that
    look like statistics lines but are malformed (`unreadable`, with the
    first one's FILE:LINE in `first_unreadable`); other programs' lines and
    milter-manager's other lines are skipped silently.
    """

    def __init__(self, statistics, year=None, progress=None):
        self.statistics = statistics
        self.year = year
        self.progress = progress
        self.lines = 0
        self.unreadable = 0
        self.first_unreadable = None
        self._iso_cache = {}
        self._syslog_cache = {}

    def _bad(self, where):
        self.unreadable += 1
        if self.first_unreadable is None:
            self.first_unreadable = where

    def read(self, name, raw, reference_time):
        """Read one log from the binary file raw; syslog dates get their year from
        reference_time (the file's mtime) unless a year was given."""
        self._syslog_cache.clear()
        self._reference = reference_time
        stream = raw
        head = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
        gunzip = None
        if head == b"\x1f\x8b":
            gunzip = _Gunzip(raw)
            stream = io.BufferedReader(gunzip)
        first = stream.peek(32)[:32] if hasattr(stream, "peek") else b""
        if first.startswith((b"__CURSOR=", b"__REALTIME_TIMESTAMP=")):
            self._read_journal(name, stream)
        else:
            self._read_lines(name, stream)
        if gunzip is not None and gunzip.error is not None:
            # A truncated or corrupt gzip file: what could be read counts.
            self._bad(f"{name}: {gunzip.error}")

    def _read_lines(self, name, stream):
        number = 0
        progress = self.progress
        for line in stream:
            number += 1
            self.lines += 1
            if progress is not None and not number & 4095:
                progress.update(self.lines)
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if not text.strip():
                continue
            if not self._line(text):
                self._bad(f"{name}:{number}")

    def _line(self, text):
        """Handle one text line; False when it is unreadable."""
        if text[:1].isdigit():
            match = _OWN_FILE.match(text)
            if match:
                stamp, content = match.groups()
                timestamp = self._iso(stamp)
                if timestamp is None:
                    return False
                return self._own_content(timestamp, content)
            match = _ISO_SYSLOG.match(text)
            if match:
                stamp, _, program, content = match.groups()
                if program != PROGRAM:
                    return True
                timestamp = self._iso(stamp)
                return timestamp is not None and self._syslog_content(timestamp, content)
            return False
        match = _SYSLOG.match(text)
        if not match:
            return False
        month, day, hour, minute, second, _, program, content = match.groups()
        if program != PROGRAM:
            return True
        timestamp = self._syslog_time(month, day, hour, minute, second)
        return timestamp is not None and self._syslog_content(timestamp, content)

    def _syslog_content(self, timestamp, content):
        content = _SOLARIS_ID.sub("", content, count=1) if content.startswith("[ID ") else content
        if not content.startswith("[statistics] "):
            return True  # one of milter-manager's other lines
        return self.statistics.feed(timestamp, content[13:])

    def _own_content(self, timestamp, content):
        if content.startswith("[statistics] "):
            content = content[13:]
        elif not content.startswith(_STATISTICS_PREFIXES) and not content.startswith(
                ("[reply][", "[abort][", "[maintain][memory]")):
            return True  # one of the manager's other lines
        handled = self.statistics.feed(timestamp, content)
        # [reply][...] lines of ours that are not statistics are not unreadable.
        return handled or not content.startswith(_STATISTICS_PREFIXES)

    def _iso(self, stamp):
        timestamp = self._iso_cache.get(stamp)
        if timestamp is None:
            try:
                parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
            except ValueError:
                return None
            timestamp = parsed.timestamp()  # a stamp without offset is local time
            if len(self._iso_cache) > 100000:
                self._iso_cache.clear()
            self._iso_cache[stamp] = timestamp
        return timestamp

    def _syslog_time(self, month, day, hour, minute, second):
        key = (month, day, hour, minute)
        base = self._syslog_cache.get(key)
        if base is None:
            number = _MONTHS.get(month)
            if number is None:
                return None
            year = self.year or time.localtime(self._reference).tm_year
            try:
                base = _local(year, number, int(day), int(hour), int(minute))
                # No year in the line: a date after the file's last change is last year's.
                if self.year is None and base > self._reference + 2 * 86400:
                    base = _local(year - 1, number, int(day), int(hour), int(minute))
            except (ValueError, OverflowError):
                return None
            self._syslog_cache[key] = base
        return base + int(second)

    def _read_journal(self, name, stream):
        """`journalctl -o export`: FIELD=value lines, binary fields as FIELD, a 64-bit
        little-endian length, the bytes and a newline; a blank line ends an entry."""
        entry = {}
        number = 0
        progress = self.progress
        while True:
            line = stream.readline()
            if not line or line == b"\n":
                if entry:
                    number += 1
                    self.lines += 1
                    if progress is not None and not number & 4095:
                        progress.update(self.lines)
                    if not self._journal_entry(entry):
                        self._bad(f"{name}: entry {number}")
                    entry = {}
                if not line:
                    return
                continue
            field, equals, value = line.rstrip(b"\n").partition(b"=")
            if not equals:
                size = stream.read(8)
                if len(size) < 8:
                    self._bad(f"{name}: entry {number + 1}: truncated binary field")
                    return
                (length,) = struct.unpack("<Q", size)
                if length > 1 << 24:
                    self._bad(f"{name}: entry {number + 1}: binary field of {length} bytes")
                    return
                value = stream.read(length)
                if len(value) < length or stream.read(1) != b"\n":
                    self._bad(f"{name}: entry {number + 1}: truncated binary field")
                    return
            if field in (b"MESSAGE", b"SYSLOG_IDENTIFIER", b"__REALTIME_TIMESTAMP"):
                entry[field] = value

    def _journal_entry(self, entry):
        message = entry.get(b"MESSAGE")
        if message is None:
            return True
        # A multi-line message: statistics lines are single lines, the first.
        text = message.decode("utf-8", "replace").split("\n", 1)[0]
        if entry.get(b"SYSLOG_IDENTIFIER") == PROGRAM.encode() and text.startswith(
                ("[statistics] ", "[ID ")):
            try:
                timestamp = int(entry[b"__REALTIME_TIMESTAMP"]) / 1e6
            except (KeyError, ValueError):
                return False
            return self._syslog_content(timestamp, text)
        match = _OWN_FILE.match(text)  # the manager's standard output, in our format
        if match:
            timestamp = self._iso(match.group(1))
            return timestamp is not None and self._own_content(timestamp, match.group(2))
        return True


class _Gunzip(io.RawIOBase):
    """A gzip file's contents (several members too); a truncated or corrupt file ends
    where it breaks, with `error` saying why, keeping everything before."""

    def __init__(self, raw):
        self.raw = raw
        self.error = None
        self._decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._pending = b""

    def readable(self):
        return True

    def readinto(self, buffer):
        while not self._pending:
            if self.error is not None:
                return 0
            if self._decompressor.eof:
                rest = self._decompressor.unused_data
                if not rest:
                    rest = self.raw.read(65536)
                    if not rest:
                        return 0
                self._decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
            else:
                rest = self.raw.read(65536)
                if not rest:
                    self.error = "the gzip file is truncated"
                    return 0
            try:
                self._pending = self._decompressor.decompress(rest)
            except zlib.error as error:
                self.error = f"corrupt gzip data ({error})"
                return 0
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def _local(year, month, day, hour, minute):
    return int(time.mktime((year, month, day, hour, minute, 0, 0, 0, -1)))


class Progress:
    """Lines read, lines per second and the percent of the input's bytes done, on stderr,
    at most once a second; nothing for a log read within the first second."""

    def __init__(self, stream, total_bytes, position, clock=time.monotonic):
        self.stream = stream
        self.total = total_bytes
        self.position = position  # a callable: bytes of the input read so far
        self.clock = clock
        self.started = self._shown = clock()
        self.shown_any = False
        self.tty = stream.isatty() if hasattr(stream, "isatty") else False

    def update(self, lines):
        now = self.clock()
        if now - self._shown < 1:
            return
        self._shown = now
        rate = lines / max(now - self.started, 1e-6)
        text = f"{PROGRAM_NAME}: {lines} lines, {rate:.0f} lines/s"
        if self.total:
            text += f", {min(100.0, 100.0 * self.position() / self.total):.0f}%"
        self.stream.write(("\r" + text) if self.tty else text + "\n")
        self.stream.flush()
        self.shown_any = True

    def finish(self):
        if self.shown_any and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------- views
class View:
    """A time range of the report cut into buckets: (title, id, bucket starts, end)."""

    def __init__(self, title, ident, starts, end, label):
        self.title, self.id, self.starts, self.end, self.label = title, ident, starts, end, label


def _midnight_after(timestamp):
    day = date.fromtimestamp(timestamp) + timedelta(days=1)
    return _local(day.year, day.month, day.day, 0, 0)


def views(last):
    """The last day (hours), week (6 hours) and month (days) up to the last line's time."""
    hour_end = int(last) - int(last) % 60
    local = time.localtime(hour_end)
    hour_end = hour_end - local.tm_min * 60 + 3600
    day = View("Last day", "day", [hour_end - 3600 * (24 - i) for i in range(24)], hour_end,
               lambda t: time.strftime("%H:00", time.localtime(t)))
    midnight = _midnight_after(last)
    end_day = date.fromtimestamp(midnight - 1)
    week_days = [end_day - timedelta(days=6 - i) for i in range(7)]
    week_starts = [_local(d.year, d.month, d.day, h, 0) for d in week_days for h in (0, 6, 12, 18)]
    week = View("Last week", "week", week_starts, midnight,
                lambda t: time.strftime("%a %d", time.localtime(t)))
    month_days = [end_day - timedelta(days=30 - i) for i in range(31)]
    month = View("Last month", "month", [_local(d.year, d.month, d.day, 0, 0) for d in month_days],
                 midnight, lambda t: time.strftime("%m-%d", time.localtime(t)))
    return [day, week, month]


def aggregate(statistics, starts, end):
    """(counts, maxima) per bucket: lists of a Counter and a dict each."""
    counts = [Counter() for _ in starts]
    maxima = [{} for _ in starts]
    for hour, hour_counts in statistics.counts.items():
        if not starts[0] <= hour < end:
            continue
        index = bisect.bisect_right(starts, hour) - 1
        counts[index].update(hour_counts)
        bucket = maxima[index]
        for key, value in statistics.maxima[hour].items():
            if value > bucket.get(key, -1):
                bucket[key] = value
    return counts, maxima


# ---------------------------------------------------------------- SVG
PALETTE = {
    "smtp": "#1f5fbf", "child": "#2ca02c", "disconnected": "#ff7f0e",
    "pass": "#4a7fd6", "accept": "#2ca02c", "reject": "#d62728", "discard": "#e8c500",
    "temporary-failure": "#888888", "quarantine": "#8c564b", "abort": "#ff9999",
    "error": "#c400c4", "stop": "#17becf",
    "spam": "#d62728", "virus": "#bcbd22", "uribl": "#9467bd", "greylisting-pass": "#e377c2",
    "tarpitting-pass": "#7f7f7f", "spf-pass": "#2ca02c", "spf-fail": "#ff7f0e",
    "sender-id-pass": "#17becf", "sender-id-fail": "#8c564b", "dkim-pass": "#1f5fbf",
    "dkim-fail": "#c46a1d", "dkim-adsp-pass": "#3399cc", "dkim-adsp-fail": "#cc9933",
    "average": "#1f5fbf", "maximum": "#d62728",
}


def _nice_top(value):
    """A round axis maximum at or above value, and its tick step."""
    if value <= 0:
        return 1, 1
    magnitude = 10 ** len(str(int(value))) / 10 if value >= 1 else 1
    for factor in (0.1, 0.2, 0.25, 0.5, 1, 2, 2.5, 5, 10):
        step = magnitude * factor
        if step * 5 >= value:
            return step * 5, step
    return value, value / 5


def _number(value):
    return f"{value:g}" if value < 1e6 else f"{value:.3g}"


def svg_chart(title, unit, labels, series, stacked):
    """An SVG chart: series [(name, colour, values)], stacked bars or lines, with axes,
    tick labels, a title and a legend."""
    width, height = 520, 270
    left, right, top, bottom = 64, 16, 34, 70
    plot_w, plot_h = width - left - right, height - top - bottom
    n = len(labels)
    if stacked:
        peak = max([sum(values[i] for _, _, values in series) for i in range(n)] or [0])
    else:
        peak = max([max(values) for _, _, values in series if values] or [0])
    axis_top, step = _nice_top(peak)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14" '
           f'font-weight="bold">{html.escape(title)}</text>',
           f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" '
           f'transform="rotate(-90 14 {top + plot_h / 2})">{html.escape(unit)}</text>']

    def y_of(value):
        return top + plot_h - plot_h * value / axis_top

    tick = 0.0
    while tick <= axis_top + 1e-9:
        y = y_of(tick)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" '
                   f'stroke="#e0e0e0"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f'{_number(round(tick, 6))}</text>')
        tick += step
    slot = plot_w / max(n, 1)
    every = max(1, -(-n // 12))
    for i, label in enumerate(labels):
        if i % every == 0:
            x = left + slot * (i + 0.5)
            out.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
                       f'{html.escape(label)}</text>')
    if stacked:
        base = [0.0] * n
        for name, colour, values in series:
            for i, value in enumerate(values):
                if value:
                    y0, y1 = y_of(base[i]), y_of(base[i] + value)
                    out.append(f'<rect x="{left + slot * i + slot * 0.1:.1f}" y="{y1:.1f}" '
                               f'width="{slot * 0.8:.1f}" height="{y0 - y1:.1f}" '
                               f'fill="{colour}"/>')
                    base[i] += value
    else:
        for name, colour, values in series:
            points = " ".join(f"{left + slot * (i + 0.5):.1f},{y_of(v):.1f}"
                              for i, v in enumerate(values))
            out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" '
                       f'stroke-width="2"/>')
    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#000"/>')
    out.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" '
               f'y2="{top + plot_h}" stroke="#000"/>')
    x, y = left, height - 30
    for name, colour, values in series:
        text = f"{name} ({_number(round(sum(values), 3))})" if stacked else name
        advance = 24 + 6.5 * len(text)
        if x + advance > width - right:
            x, y = left, y + 16
        out.append(f'<rect x="{x}" y="{y - 9}" width="12" height="10" fill="{colour}"/>')
        out.append(f'<text x="{x + 16}" y="{y}">{html.escape(text)}</text>')
        x += advance
    out.append("</svg>\n")
    return "\n".join(out)


# ---------------------------------------------------------------- HTML
_STYLE = """
body { font-family: sans-serif; margin: 1em 2em; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f0f0f0; }
td.name, th.name { text-align: left; }
nav a { margin-right: 1em; }
div.table { overflow-x: auto; }
"""


def _present(keys, counter, prefix):
    """The keys (in order) of which the counter holds something, plus any others seen."""
    seen = {key[-1] for key in counter if key[:len(prefix)] == prefix}
    return [key for key in keys if key in seen] + sorted(seen - set(keys))


class Report:
    """Writes index.html and the SVG files of a Statistics into a directory."""

    def __init__(self, statistics, reader, directory, sources):
        self.statistics = statistics
        self.reader = reader
        self.directory = directory
        self.sources = sources
        self.total = Counter()
        for counts in statistics.counts.values():
            self.total.update(counts)
        self._files = {}

    def _child_file(self, name):
        if name not in self._files:
            self._files[name] = f"child{len(self._files) + 1}"
        return self._files[name]

    def _write(self, name, text):
        with open(os.path.join(self.directory, name), "w", encoding="utf-8") as file:
            file.write(text)

    def _graph(self, view, base, title, unit, series, stacked):
        name = f"{base}.{view.id}.svg"
        labels = [view.label(start) for start in view.starts]
        self._write(name, svg_chart(f"{title} — {view.title.lower()}", unit, labels, series,
                                    stacked))
        return (f'<figure><img src="{html.escape(name)}" alt="{html.escape(title)}" '
                f'width="520" height="270"/></figure>')

    def _view(self, view):
        counts, maxima = aggregate(self.statistics, view.starts, view.end)
        total = self.total

        def values(key):
            return [bucket[key] for bucket in counts]

        parts = [f'<h2 id="{view.id}">{html.escape(view.title)}</h2>']
        sessions = [(name, PALETTE[name], values(("sessions", name)))
                    for name in ("smtp", "child", "disconnected")]
        parts.append(self._graph(view, "session", "Sessions", "sessions", sessions, False))
        statuses = _present(STATUSES, total, ("status",))
        if statuses:
            parts.append(self._graph(
                view, "milter-manager.status", "milter manager: status", "sessions",
                [(s, PALETTE.get(s, "#555555"), values(("status", s))) for s in statuses],
                True))
        reports = _present(REPORTS, total, ("report",))
        if reports:
            parts.append(self._graph(
                view, "milter-manager.report", "milter manager: report", "mails",
                [(r, PALETTE[r], values(("report", r))) for r in reports], False))
        for child in self.statistics.children:
            base = self._child_file(child)
            child_statuses = [key[2] for key in total if key[:2] == ("child-status", child)]
            ordered = [s for s in CHILD_STATUSES if s in child_statuses] + sorted(
                set(child_statuses) - set(CHILD_STATUSES))
            if ordered:
                parts.append(self._graph(
                    view, f"milter.status.{base}", f"milter: status: {child}", "sessions",
                    [(s, PALETTE.get(s, "#555555"), values(("child-status", child, s)))
                     for s in ordered], True))
            if total[("child-n", child)]:  # not for a child only seen adding headers
                average = [bucket[("child-elapsed", child)] * 1000 / bucket[("child-n", child)]
                           if bucket[("child-n", child)] else 0 for bucket in counts]
                peak = [bucket.get(("child-elapsed-max", child), 0) * 1000
                        for bucket in maxima]
                parts.append(self._graph(
                    view, f"milter.latency.{base}", f"milter: latency: {child}",
                    "milliseconds", [("average", PALETTE["average"], average),
                                     ("maximum", PALETTE["maximum"], peak)], False))
            child_reports = [key[2] for key in total if key[:2] == ("child-report", child)]
            if child_reports:
                parts.append(self._graph(
                    view, f"milter.report.{base}", f"milter: report: {child}", "mails",
                    [(r, PALETTE[r], values(("child-report", child, r)))
                     for r in REPORTS if r in child_reports], False))
        return "\n".join(parts)

    def _days_table(self):
        days = {}
        for hour, counts in self.statistics.counts.items():
            days.setdefault(date.fromtimestamp(hour), Counter()).update(counts)
        statuses = _present(STATUSES, self.total, ("status",))
        reports = _present(REPORTS, self.total, ("report",))
        columns = ([("sessions", "smtp", "SMTP sessions"), ("sessions", "child", "milter sessions"),
                    ("sessions", "disconnected", "disconnected")]
                   + [("status", s, s) for s in statuses] + [("report", r, r) for r in reports])
        rows = ['<table id="per-day"><tr><th class="name">day</th>'
                + "".join(f"<th>{html.escape(label)}</th>" for _, _, label in columns) + "</tr>"]
        for day in sorted(days):
            counts = days[day]
            cells = "".join(f'<td data-key="{html.escape(kind)}:{html.escape(key)}">'
                            f'{counts[(kind, key)]}</td>' for kind, key, _ in columns)
            rows.append(f'<tr data-day="{day.isoformat()}"><td class="name">{day.isoformat()}'
                        f'</td>{cells}</tr>')
        rows.append("</table>")
        return "\n".join(rows)

    def _children_table(self):
        total = self.total
        statuses = sorted({key[2] for key in total if key[0] == "child-status"},
                          key=lambda s: (CHILD_STATUSES.index(s) if s in CHILD_STATUSES
                                         else len(CHILD_STATUSES), s))
        reports = [r for r in REPORTS if any(key[0] == "child-report" and key[2] == r
                                             for key in total)]
        maxima = {}
        for hour_maxima in self.statistics.maxima.values():
            for key, value in hour_maxima.items():
                if key[0] == "child-elapsed-max" and value > maxima.get(key[1], -1):
                    maxima[key[1]] = value
        header = ('<table id="per-child"><tr><th class="name">milter</th><th>sessions</th>'
                  + "".join(f"<th>{html.escape(s)}</th>" for s in statuses)
                  + "<th>average ms</th><th>maximum ms</th>"
                  + "".join(f"<th>{html.escape(r)}</th>" for r in reports) + "</tr>")
        rows = [header]
        for child in self.statistics.children:
            n = total[("child-n", child)]
            average = total[("child-elapsed", child)] * 1000 / n if n else 0
            cells = [f'<td data-key="sessions">{n}</td>']
            cells += [f'<td data-key="status:{html.escape(s)}">'
                      f'{total[("child-status", child, s)]}</td>' for s in statuses]
            cells.append(f'<td data-key="average-ms">{average:.1f}</td>')
            cells.append(f'<td data-key="maximum-ms">{maxima.get(child, 0) * 1000:.1f}</td>')
            cells += [f'<td data-key="report:{html.escape(r)}">'
                      f'{total[("child-report", child, r)]}</td>' for r in reports]
            rows.append(f'<tr data-child="{html.escape(child)}"><td class="name">'
                        f'{html.escape(child)}</td>{"".join(cells)}</tr>')
        rows.append("</table>")
        return "\n".join(rows)

    def write(self):
        """Write the report; the path of index.html."""
        statistics = self.statistics
        reader = self.reader
        stamp = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))  # noqa: E731
        summary = (f'<p id="summary">Read <span data-key="lines">{reader.lines}</span> lines '
                   f'from {html.escape(", ".join(self.sources))}: '
                   f'<span data-key="statistics">{statistics.lines}</span> statistics lines, '
                   f'<span data-key="unreadable">{reader.unreadable}</span> unreadable lines '
                   f'skipped.')
        body = []
        if statistics.first is None:
            summary += " No statistics lines: nothing to draw.</p>"
        else:
            summary += (f" From {stamp(statistics.first)} to {stamp(statistics.last)}.</p>")
            all_views = views(statistics.last)
            body.append("<nav>" + "".join(f'<a href="#{v.id}">{html.escape(v.title)}</a>'
                                          for v in all_views)
                        + '<a href="#days">Per day</a><a href="#children">Per milter</a></nav>')
            body.extend(self._view(view) for view in all_views)
            body.append('<h2 id="days">Per day</h2>')
            body.append('<div class="table">' + self._days_table() + "</div>")
            body.append('<h2 id="children">Per milter</h2>')
            body.append('<div class="table">' + self._children_table() + "</div>")
        page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"/>"
                "<title>milter-manager statistics</title>"
                f"<style>{_STYLE}</style></head>\n<body>\n<h1>milter-manager statistics</h1>\n"
                + summary + "\n" + "\n".join(body) + "\n</body></html>\n")
        path = os.path.join(self.directory, "index.html")
        self._write("index.html", page)
        return path


# ---------------------------------------------------------------- command line
def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROGRAM_NAME,
        description="Write an HTML report with graphs from milter-manager's statistics log "
                    "lines (syslog files, plain or gzip; journalctl -o export output; "
                    "milter-manager's own log file).")
    parser.add_argument("logs", nargs="*", metavar="LOG",
                        help="log files to read, in any order (default: standard input)")
    parser.add_argument("--log", action="append", default=[], metavar="FILE",
                        help="a log file to read, as upstream's option; may be repeated")
    parser.add_argument("--output-directory", default=".", metavar="DIR",
                        help="where index.html and the SVG graphs are written "
                             "(default: the current directory; made if missing)")
    parser.add_argument("--year", type=int, metavar="YEAR",
                        help="the year of syslog lines, which carry none (default: the year "
                             "of each file's last change; lines dated after it are the year "
                             "before)")
    parser.add_argument("--no-progress", action="store_true",
                        help="print no progress on standard error")
    return parser


def main(argv=None, stdin=None, stderr=None):
    """Run the analyzer; the exit status (0 written, 1 an input or output error)."""
    stderr = stderr if stderr is not None else sys.stderr
    parser = build_parser()
    options = parser.parse_args(argv)
    paths = options.log + options.logs
    if options.year is not None and not 1970 <= options.year <= 9999:
        parser.error(f"--year {options.year}: not a year")
    opened = []
    try:
        for path in paths:
            try:
                raw = open(path, "rb")
            except OSError as error:
                stderr.write(f"{PROGRAM_NAME}: cannot read {path}: {error.strerror}\n")
                return 1
            opened.append((path, raw))
        if not paths:
            stdin = stdin if stdin is not None else sys.stdin.buffer
            opened.append(("standard input", stdin))
        try:
            os.makedirs(options.output_directory, exist_ok=True)
        except OSError as error:
            stderr.write(f"{PROGRAM_NAME}: cannot make {options.output_directory}: "
                         f"{error.strerror}\n")
            return 1
        sizes = []
        for _, raw in opened:
            try:
                sizes.append(os.fstat(raw.fileno()).st_size)
            except (OSError, ValueError, io.UnsupportedOperation):
                sizes.append(0)
        done = [0]
        current = [None]

        def position():
            try:
                return done[0] + (current[0].tell() if current[0] is not None else 0)
            except (OSError, ValueError):
                return done[0]

        progress = None
        if not options.no_progress:
            progress = Progress(stderr, sum(sizes), position)
        statistics = Statistics()
        reader = Reader(statistics, year=options.year, progress=progress)
        started = time.monotonic()
        for (path, raw), size in zip(opened, sizes):
            current[0] = raw
            try:
                reference = os.fstat(raw.fileno()).st_mtime
            except (OSError, ValueError, io.UnsupportedOperation):
                reference = time.time()
            if not hasattr(raw, "peek"):
                raw = io.BufferedReader(raw)
            reader.read(path, raw, reference)
            done[0] += size
            current[0] = None
        if progress is not None:
            progress.finish()
        report = Report(statistics, reader, options.output_directory,
                        [path for path, _ in opened])
        try:
            index = report.write()
        except OSError as error:
            stderr.write(f"{PROGRAM_NAME}: cannot write the report: {error}\n")
            return 1
    finally:
        for path, raw in opened:
            if path != "standard input":
                raw.close()
    elapsed = time.monotonic() - started
    line = (f"{PROGRAM_NAME}: {reader.lines} lines, {statistics.lines} statistics lines in "
            f"{elapsed:.1f} s; wrote {index}")
    if reader.unreadable:
        line += (f"; skipped {reader.unreadable} unreadable lines (the first: "
                 f"{reader.first_unreadable})")
    stderr.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
