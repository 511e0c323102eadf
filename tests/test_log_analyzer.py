# -*- test-case-name: tests.test_log_analyzer -*-
"""Tests for milter-manager-log-analyzer: a generated month of log in, the HTML report out."""

import atexit
import gzip
import io
import os
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from collections import Counter
from datetime import datetime
from html.parser import HTMLParser

from twisted.trial.unittest import SynchronousTestCase

from miltermanager.tools import log_analyzer

SESSION_STATUSES = ["pass", "accept", "reject", "temporary-failure", "discard"]
CHILDREN = ["clamav-milter", "spamass-milter", "opendkim", "greylist"]


def local(year, month, day, hour=0, minute=0, second=0):
    return time.mktime((year, month, day, hour, minute, second, 0, 0, -1))


def syslog_line(timestamp, program, text, pid=4242):
    stamp = time.strftime("%b %e %H:%M:%S", time.localtime(timestamp))
    return f"{stamp} mx1 {program}[{pid}]: {text}\n"


def own_line(timestamp, text, system="miltermanager.session#info"):
    stamp = datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%dT%H:%M:%S%z")
    return f"{stamp} [{system}] {text}\n"


class Month:
    """A month (November 2026) of statistics lines, and what they contain, written down
    as they are written: per day, sessions and their verdicts and the report counters;
    per child, its statuses and elapsed times."""

    def __init__(self):
        self.days = {}  # "2026-11-DD" -> Counter
        self.children = {name: Counter() for name in CHILDREN}
        self.elapsed = {name: [] for name in CHILDREN}
        self.lines = {}  # day -> [(timestamp, statistics text)]
        for day in range(1, 31):
            self._day(day)

    def _day(self, day):
        counts = self.days[f"2026-11-{day:02d}"] = Counter()
        lines = self.lines[day] = []
        for i in range(10 + (day % 7) * 3):
            start = local(2026, 11, day, (i * 5) % 24, i % 60, 7)
            tag = day * 1000 + i
            children = {}
            children["clamav-milter"] = ("end-of-message", ["accept", "pass", "reject"][i % 3],
                                         0.1 + (i % 3) * 0.1)
            children["spamass-milter"] = ("end-of-message", "pass", 0.25)
            children["opendkim"] = (("connect", "stop", 0.0) if i % 4 == 0
                                    else ("end-of-message", "pass", 0.05))
            children["greylist"] = ("envelope-recipient",
                                    "temporary-failure" if i % 5 == 0 else "pass", 0.002)
            headers = []
            if i % 3 == 0:
                headers.append(("spamass-milter", "X-Spam-Flag", "YES"))
                headers.append(("spamass-milter", "X-Spam-Status",
                                "Yes, score=8.1 required=5.0 tests=BAYES_99,URIBL_BLACK "
                                "autolearn=no version=3.4.6"))
                counts["report:spam"] += 1
                counts["report:uribl"] += 1
                self.children["spamass-milter"]["report:spam"] += 1
                self.children["spamass-milter"]["report:uribl"] += 1
            else:
                headers.append(("spamass-milter", "X-Spam-Status",
                                "No, score=0.1 required=5.0 tests=NONE autolearn=ham"))
            if i % 10 == 0:
                headers.append(("clamav-milter", "X-Virus-Status", "Infected (Eicar-Signature)"))
                counts["report:virus"] += 1
                self.children["clamav-milter"]["report:virus"] += 1
            else:
                headers.append(("clamav-milter", "X-Virus-Status", "Clean"))
            if i % 4:
                verdict = "pass" if i % 2 else "fail"
                headers.append(("opendkim", "Authentication-Results",
                                f"mx1.example.org; dkim={verdict} (2048-bit key) "
                                "header.d=example.com header.i=@example.com"))
                counts[f"report:dkim-{verdict}"] += 1
                self.children["opendkim"][f"report:dkim-{verdict}"] += 1
            if i % 5 == 0:
                headers.append(("greylist", "X-Greylist",
                                "Delayed for 00:05:00 by milter-greylist-4.6.4"))
                counts["report:greylisting-pass"] += 1
                self.children["greylist"]["report:greylisting-pass"] += 1
            for child, name, value in headers:
                lines.append((start + 1, f"[milter][header][add]({tag}): <{name}>=<{value}>: "
                                         f"{child}"))
            for child, (state, status, elapsed) in children.items():
                lines.append((start + 2, f"[milter][end][{state}][{status}][{elapsed:.3f}]"
                                         f"({tag}): {child}"))
                self.children[child][f"status:{status}"] += 1
                self.children[child]["sessions"] += 1
                self.elapsed[child].append(elapsed)
                counts["sessions:child"] += 1
            status = SESSION_STATUSES[(day + i) % 5]
            lines.append((start + 2, f"[session][end][end-of-message][{status}][0.400]({tag})"))
            counts["sessions:smtp"] += 1
            counts[f"status:{status}"] += 1
            lines.append((start + 2, f"[sessions][finished] {tag}(+1) 0"))
        if day % 3 == 0:
            lines.append((local(2026, 11, day, 23, 59, 0),
                          f"[session][disconnected][1.500]({day * 1000 + 999})"))
            counts["sessions:disconnected"] += 1

    def write(self, directory):
        """Days 1-10 as rotated gzip syslog, 11-20 as syslog, 21-30 as our log file;
        each file has other programs' lines, other manager lines and one unreadable line.
        The paths, in no particular order."""
        old = os.path.join(directory, "mail.log.1.gz")
        with gzip.open(old, "wt", encoding="utf-8") as file:
            for day in range(1, 11):
                file.write(syslog_line(local(2026, 11, day, 0, 0, 1), "postfix/smtpd",
                                       "connect from unknown[192.0.2.1]", pid=77))
                for timestamp, text in self.lines[day]:
                    file.write(syslog_line(timestamp, "milter-manager", f"[statistics] {text}"))
            file.write("\x00\x07 not a log line at all\n")
        os.utime(old, (local(2026, 11, 11, 6, 25), local(2026, 11, 11, 6, 25)))
        recent = os.path.join(directory, "mail.log")
        with open(recent, "w", encoding="utf-8") as file:
            for day in range(11, 21):
                file.write(syslog_line(local(2026, 11, day, 0, 0, 2), "milter-manager",
                                       "[manager][reload] configuration reloaded"))
                for timestamp, text in self.lines[day]:
                    file.write(syslog_line(timestamp, "milter-manager", f"[statistics] {text}"))
            file.write(syslog_line(local(2026, 11, 20, 23, 59, 59), "milter-manager",
                                   "[statistics] [session][end][end-of-mess"))
        os.utime(recent, (local(2026, 11, 21, 6, 25), local(2026, 11, 21, 6, 25)))
        own = os.path.join(directory, "milter-manager.log")
        with open(own, "w", encoding="utf-8") as file:
            for day in range(21, 31):
                file.write(own_line(local(2026, 11, day, 0, 0, 3),
                                    "[manager][listen] inet:10025@[127.0.0.1]", system="-"))
                for timestamp, text in self.lines[day]:
                    file.write(own_line(timestamp, text))
            file.write("[milter][end] half a line without a time\n")
        return [recent, own, old]


class TableReader(HTMLParser):
    """The report's numbers: rows of tables per-day and per-child, the summary's spans."""

    def __init__(self):
        super().__init__()
        self.rows = {}  # ("day"|"child", name) -> {key: text}
        self.summary = {}
        self.images = []
        self._row = None
        self._key = None

    def handle_starttag(self, tag, attributes):
        attributes = dict(attributes)
        if tag == "tr" and ("data-day" in attributes or "data-child" in attributes):
            kind = "day" if "data-day" in attributes else "child"
            self._row = self.rows.setdefault((kind, attributes[f"data-{kind}"]), {})
        elif tag in ("td", "span") and "data-key" in attributes:
            self._key = (tag, attributes["data-key"])
        elif tag == "img":
            self.images.append(attributes["src"])

    def handle_data(self, data):
        if self._key is not None:
            tag, key = self._key
            if tag == "td":
                self._row[key] = data
            else:
                self.summary[key] = data
            self._key = None


_report = {}


def month_report():
    """(Month, report directory, stderr text, exit status): made once per process."""
    if not _report:
        directory = tempfile.mkdtemp(prefix="milter-manager-test-analyzer.")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        month = Month()
        paths = month.write(directory)
        stderr = io.StringIO()
        status = log_analyzer.main(["--output-directory", os.path.join(directory, "report"),
                                    *paths], stderr=stderr)
        _report.update(month=month, directory=os.path.join(directory, "report"),
                       stderr=stderr.getvalue(), status=status)
    return _report


def read_report(directory):
    parser = TableReader()
    with open(os.path.join(directory, "index.html"), encoding="utf-8") as file:
        parser.feed(file.read())
    return parser


def png_pixels(path, max_rows=900):
    """The set of (r, g, b) colours in the first max_rows rows of an 8-bit RGB(A) PNG."""
    with open(path, "rb") as file:
        data = file.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    offset, idat, header = 8, [], None
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind = data[offset + 4:offset + 8]
        body = data[offset + 8:offset + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        offset += 12 + length
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and not interlace, header
    channels = 3 if colour_type == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = width * channels
    previous = bytearray(stride)
    colours = set()
    for y in range(min(height, max_rows)):
        start = y * (stride + 1)
        kind, row = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        if kind == 1:
            for i in range(channels, stride):
                row[i] = (row[i] + row[i - channels]) & 255
        elif kind == 2:
            row = bytearray((a + b) & 255 for a, b in zip(row, previous))
        elif kind == 3:
            for i in range(stride):
                left = row[i - channels] if i >= channels else 0
                row[i] = (row[i] + ((left + previous[i]) >> 1)) & 255
        elif kind == 4:
            for i in range(stride):
                a = row[i - channels] if i >= channels else 0
                b = previous[i]
                c = previous[i - channels] if i >= channels else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        for x in range(0, stride, channels):
            colours.add(bytes(row[x:x + 3]))
        previous = row
    return colours


class MonthReportTests(SynchronousTestCase):
    """A generated month: syslog (plain and gzip) and our log file."""

    def test_written(self):
        """The analyzer exits 0, writes index.html and every graph it links, and says on
        stderr how many lines it could not read and where the first was."""
        report = month_report()
        self.assertEqual(report["status"], 0)
        page = read_report(report["directory"])
        self.assertGreater(len(page.images), 20)
        for image in page.images:
            with open(os.path.join(report["directory"], image), encoding="utf-8") as file:
                self.assertIn("<svg", file.read(200))
        self.assertIn("skipped 3 unreadable lines", report["stderr"])
        self.assertNotIn("Traceback", report["stderr"])
        self.assertEqual(page.summary["unreadable"], "3")

    def test_per_day_counts(self):
        """Each day's sessions, verdicts and report counters are the ones written."""
        report = month_report()
        page = read_report(report["directory"])
        days = {name: row for (kind, name), row in page.rows.items() if kind == "day"}
        self.assertEqual(sorted(days), [f"2026-11-{day:02d}" for day in range(1, 31)])
        for day, expected in report["month"].days.items():
            shown = {key: int(value) for key, value in days[day].items()}
            self.assertEqual({k: v for k, v in shown.items() if v},
                             {k: v for k, v in expected.items() if v}, day)

    def test_month_totals(self):
        """The month's totals, written out: 561 SMTP sessions, 2244 milter sessions."""
        page = read_report(month_report()["directory"])
        total = Counter()
        for (kind, _), row in page.rows.items():
            if kind == "day":
                total.update({key: int(value) for key, value in row.items()})
        self.assertEqual(total["sessions:smtp"], 561)
        self.assertEqual(total["sessions:child"], 561 * 4)
        self.assertEqual(total["sessions:disconnected"], 10)
        # i = 0 on 30 days, i = 10 on the 26 days with 13 or more sessions, i = 20 on the 12
        # with 22 or more.
        self.assertEqual(total["report:virus"], 30 + 26 + 12)

    def test_per_child(self):
        """Each child's statuses, report counters and average and maximum latency."""
        report = month_report()
        page = read_report(report["directory"])
        children = {name: row for (kind, name), row in page.rows.items() if kind == "child"}
        self.assertEqual(sorted(children), sorted(CHILDREN))
        for child, expected in report["month"].children.items():
            shown = {key: value for key, value in children[child].items()
                     if not key.endswith("-ms") and value != "0"}
            self.assertEqual(shown, {k: str(v) for k, v in expected.items() if v}, child)
            elapsed = report["month"].elapsed[child]
            self.assertEqual(children[child]["average-ms"],
                             f"{sum(elapsed) / len(elapsed) * 1000:.1f}")
            self.assertEqual(children[child]["maximum-ms"], f"{max(elapsed) * 1000:.1f}")
        self.assertEqual(children["clamav-milter"]["maximum-ms"], "300.0")
        self.assertEqual(children["opendkim"]["status:stop"], "152")  # i % 4 == 0

    def test_renders_in_chromium(self):
        """Headless Chromium draws the report: the screenshot has many colours, among them
        the verdict chart's reject red and pass blue."""
        report = month_report()
        chromium = shutil.which("chromium")
        self.assertIsNotNone(chromium, "no chromium: scripts/install-test-deps installs it")
        shot = os.path.join(os.path.dirname(report["directory"]), "report.png")
        profile = tempfile.mkdtemp(prefix="milter-manager-test-chromium.")
        self.addCleanup(shutil.rmtree, profile, ignore_errors=True)
        result = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu",
             f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,2000",
             "file://" + os.path.join(report["directory"], "index.html")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout)
        colours = png_pixels(shot)
        self.assertGreater(len(colours), 10)
        self.assertIn(bytes.fromhex("d62728"), colours)  # reject
        self.assertIn(bytes.fromhex("4a7fd6"), colours)  # pass


class ReaderTests(SynchronousTestCase):
    """Reading the formats line by line."""

    def analyze(self, data, *arguments, mtime=None, name="log"):
        directory = tempfile.mkdtemp(prefix="milter-manager-test-analyzer.")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        path = os.path.join(directory, name)
        with open(path, "wb") as file:
            file.write(data)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        stderr = io.StringIO()
        status = log_analyzer.main(["--output-directory", os.path.join(directory, "out"),
                                    "--no-progress", *arguments, path], stderr=stderr)
        self.assertEqual(status, 0, stderr.getvalue())
        page = read_report(os.path.join(directory, "out"))
        return page, stderr.getvalue()

    def test_year_from_mtime(self):
        """Syslog dates after the file's last change are last year's: Dec 31 in a file
        changed on Jan 2 2027 is 2026-12-31."""
        data = (b"Dec 31 23:00:00 mx milter-manager[1]: [statistics] "
                b"[session][end][quit][reject][0.1](1)\n"
                b"Jan  1 01:00:00 mx milter-manager[1]: [statistics] "
                b"[session][end][quit][accept][0.1](2)\n")
        page, _ = self.analyze(data, mtime=local(2027, 1, 2, 12))
        self.assertEqual(page.rows[("day", "2026-12-31")]["status:reject"], "1")
        self.assertEqual(page.rows[("day", "2027-01-01")]["status:accept"], "1")

    def test_year_option(self):
        """--year sets the year of syslog dates, whatever the file's time."""
        data = (b"Mar  4 10:00:00 mx milter-manager[1]: [statistics] "
                b"[session][end][quit][pass][0.1](1)\n")
        page, _ = self.analyze(data, "--year", "2019", mtime=local(2027, 1, 2, 12))
        self.assertEqual(page.rows[("day", "2019-03-04")]["sessions:smtp"], "1")

    def test_journal_export(self):
        """`journalctl -o export` entries: syslog-identified MESSAGE fields, a binary field
        among them, other programs' entries skipped."""
        def entry(fields, binary=None):
            out = b""
            for key, value in fields:
                out += key + b"=" + value + b"\n"
            if binary is not None:
                out += binary[0] + b"\n" + struct.pack("<Q", len(binary[1])) + binary[1] + b"\n"
            return out + b"\n"
        stamp = str(int(local(2026, 10, 5, 9, 30) * 1e6)).encode()
        data = entry([(b"__CURSOR", b"s=1"), (b"__REALTIME_TIMESTAMP", stamp),
                      (b"SYSLOG_IDENTIFIER", b"milter-manager"),
                      (b"MESSAGE", b"[statistics] [session][end][quit][discard][0.2](7)")])
        data += entry([(b"__CURSOR", b"s=2"), (b"__REALTIME_TIMESTAMP", stamp),
                       (b"SYSLOG_IDENTIFIER", b"milter-manager")],
                      binary=(b"MESSAGE", b"[statistics] [milter][end][quit][reject][0.2](7): "
                                          b"clamav\nsecond line"))
        data += entry([(b"__CURSOR", b"s=3"), (b"__REALTIME_TIMESTAMP", stamp),
                       (b"SYSLOG_IDENTIFIER", b"postfix/smtpd"),
                       (b"MESSAGE", b"[statistics] [session][end][quit][reject][0.2](8)")])
        page, stderr = self.analyze(data)
        self.assertEqual(page.rows[("day", "2026-10-05")]["status:discard"], "1")
        self.assertEqual(page.rows[("day", "2026-10-05")]["sessions:smtp"], "1")
        self.assertEqual(page.summary["lines"], "3")
        self.assertNotIn("unreadable", stderr)

    def test_header_counters(self):
        """Spam once per message (X-Spam-Flag and X-Spam-Status together), URIBL from
        tests=, DKIM and SPF from Authentication-Results, virus, greylist and tarpit."""
        self.assertEqual(log_analyzer.header_reports("X-Spam-Status",
                                                     "Yes, score=9 tests=URIBL_DBL_SPAM,X "
                                                     "autolearn=no"), ["spam", "uribl"])
        self.assertEqual(log_analyzer.header_reports("X-Spam-Status",
                                                     "No, score=0 tests=A autolearn=URIBL_X"), [])
        self.assertEqual(log_analyzer.header_reports(
            "Authentication-Results", "mx; spf=pass smtp.mailfrom=a; dkim=fail (bad) "
                                      "header.d=b; dmarc=pass"), ["spf-pass", "dkim-fail"])
        self.assertEqual(log_analyzer.header_reports("x-virus-status", "Infected (Eicar)"),
                         ["virus"])
        self.assertEqual(log_analyzer.header_reports("X-Greylist", "Sender IP whitelisted by "
                                                     "tarpit, not delayed"), ["tarpitting-pass"])
        data = b"".join(
            b"Jun  1 10:00:0%d mx milter-manager[1]: [statistics] [milter][header][add](%d): "
            b"<%s>=<%s>: spamd\n" % (i, tag, name, value)
            for i, (tag, name, value) in enumerate([
                (1, b"X-Spam-Flag", b"YES"), (1, b"X-Spam-Status", b"Yes, score=7"),
                (1, b"X-Spam-Flag", b"YES"), (1, b"X-Spam-Status", b"Yes, score=8"),
                (2, b"X-Spam-Status", b"Yes, score=9")]))
        page, _ = self.analyze(data, "--year", "2026")
        self.assertEqual(page.rows[("child", "spamd")]["report:spam"], "3")

    def test_garbage(self):
        """Binary junk, malformed statistics lines and a truncated gzip member are counted as
        unreadable and named once on stderr; the good lines still count."""
        good = (b"Jun  1 10:00:00 mx milter-manager[1]: [statistics] "
                b"[session][end][quit][pass][0.1](1)\n")
        data = (good + b"\xff\xfe\x00garbage\n"
                + b"Jun  1 10:00:01 mx milter-manager[1]: [statistics] [milter][end][x](\n"
                + good) * 50
        # A second gzip member cut off after its header, as a crash while rotating leaves it.
        compressed = gzip.compress(data) + gzip.compress(good * 5)[:10]
        page, stderr = self.analyze(compressed, "--year", "2026", name="log.gz")
        self.assertEqual(page.rows[("day", "2026-06-01")]["sessions:smtp"], "100")
        self.assertIn("; skipped 101 unreadable lines (the first: ", stderr)
        self.assertTrue(stderr.endswith("log.gz:2)\n"), stderr)
        self.assertNotIn("Traceback", stderr)

    def test_missing_file(self):
        """A log that cannot be read is one line on stderr and exit status 1."""
        stderr = io.StringIO()
        directory = tempfile.mkdtemp(prefix="milter-manager-test-analyzer.")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        status = log_analyzer.main(["--output-directory", directory,
                                    os.path.join(directory, "nope")], stderr=stderr)
        self.assertEqual(status, 1)
        self.assertEqual(stderr.getvalue(),
                         f"milter-manager-log-analyzer: cannot read "
                         f"{os.path.join(directory, 'nope')}: No such file or directory\n")


class ProgressTests(SynchronousTestCase):
    """Progress on stderr for long logs."""

    def test_lines_per_second_and_percent(self):
        """After a second: lines, lines per second and the percent of bytes read;
        nothing more within the same second."""
        now = [100.0]
        stream = io.StringIO()
        progress = log_analyzer.Progress(stream, 1000, lambda: 250, clock=lambda: now[0])
        progress.update(4096)
        self.assertEqual(stream.getvalue(), "")
        now[0] = 102.0
        progress.update(8192)
        now[0] = 102.5
        progress.update(12288)
        self.assertEqual(stream.getvalue(),
                         "milter-manager-log-analyzer: 8192 lines, 4096 lines/s, 25%\n")
