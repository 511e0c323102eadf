"""A scriptable libmilter child milter (Debian's python3-milter) that logs every callback as JSON.

Run with Debian's interpreter, which is the one that can ``import Milter``::

    /usr/bin/python3 tests/peers/libmilter_milter.py --socket inet:PORT@127.0.0.1 \
        --name NAME --log FILE [behaviour flags]

Each callback appends one JSON object to FILE, e.g.
``{"event": "envrcpt", "conn": 1, "recipient": "<bob@example.com>", "params": [],
"macros": {"i": "4BC5D2125D2", "{rcpt_addr}": "bob@example.com"}}``.
"""

import argparse
import json
import os
import signal
import sys
import threading
import time

import Milter

MACROS = ("j", "{daemon_name}", "i", "{mail_addr}", "{rcpt_addr}", "_", "v", "{auth_authen}")


def text(value):
    """Return value as str; bytes are decoded with surrogateescape."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value


class EventLog:
    """Appends one JSON object per line to a file, flushed at once, from any libmilter thread."""

    def __init__(self, path):
        self._file = open(path, "a", encoding="utf-8", errors="surrogateescape")
        self._lock = threading.Lock()

    def write(self, record):
        """Write one record as a JSON line."""
        line = json.dumps(record, ensure_ascii=False)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()


class LoggingMilter(Milter.Base):
    """Logs each callback; rejects or tempfails recipients by local part; edits the message at EOM."""

    options = None  # argparse namespace, set by main()
    events = None  # EventLog, set by main()

    def __init__(self):
        self.conn = Milter.uniqueID()
        self.subject = None

    def log_event(self, event, with_macros=True, **fields):
        """Log one callback with its arguments and the macros present now."""
        record = {"event": event, "conn": self.conn}
        record.update(fields)
        if with_macros:
            macros = {}
            for name in MACROS:
                value = self.getsymval(name)
                if value is not None:
                    macros[name] = text(value)
            record["macros"] = macros
        self.events.write(record)

    def negotiate(self, opts):
        """Log the MTA's offer (actions, protocol steps) before pymilter's default negotiation."""
        self.log_event("negotiate", with_macros=False, actions=opts[0], protocol=opts[1])
        return super().negotiate(opts)

    def connect(self, hostname, family, hostaddr):
        """Log the client's host name and address."""
        if isinstance(hostaddr, tuple):
            hostaddr = [text(part) for part in hostaddr]
        self.log_event("connect", hostname=text(hostname), family=family, hostaddr=hostaddr)
        return Milter.CONTINUE

    def hello(self, hostname):
        """Log HELO/EHLO."""
        self.log_event("helo", hostname=text(hostname))
        return Milter.CONTINUE

    def envfrom(self, sender, *params):
        """Log MAIL FROM; start a new message."""
        self.subject = None
        self.log_event("envfrom", sender=text(sender), params=[text(p) for p in params])
        return Milter.CONTINUE

    def envrcpt(self, recipient, *params):
        """Log RCPT TO; local part ``reject`` gets 550, ``tempfail`` gets 451."""
        self.log_event("envrcpt", recipient=text(recipient), params=[text(p) for p in params])
        if self.options.no_rcpt_rules:
            return Milter.CONTINUE
        local_part = text(recipient).strip("<>").rsplit("@", 1)[0].lower()
        name = self.options.name
        if local_part == "reject":
            self.setreply("550", "5.7.1", f"{name} rejected recipient")
            return Milter.REJECT
        if local_part == "tempfail":
            self.setreply("451", "4.7.1", f"{name} tempfail recipient")
            return Milter.TEMPFAIL
        return Milter.CONTINUE

    def data(self):
        """Log DATA."""
        self.log_event("data")
        return Milter.CONTINUE

    def header(self, name, value):
        """Log one header; remember the first Subject."""
        value = text(value)
        if self.subject is None and name.lower() == "subject":
            self.subject = value
        self.log_event("header", name=text(name), value=value)
        opts = self.options
        if opts.reject_header is not None and text(name).lower() == opts.reject_header.lower():
            self.setreply("554", "5.7.1", f"{opts.name} rejected header {text(name)}")
            return Milter.REJECT
        return Milter.CONTINUE

    def eoh(self):
        """Log the end of the header block."""
        self.log_event("eoh")
        return Milter.CONTINUE

    def body(self, chunk):
        """Log one body chunk."""
        self.log_event("body", chunk=text(chunk))
        return Milter.CONTINUE

    def unknown(self, command):
        """Log an SMTP command the MTA did not know."""
        self.log_event("unknown", command=text(command))
        return Milter.CONTINUE

    def eom(self):
        """Log end of message; reject by subject, or add/change headers and the body."""
        self.log_event("eom")
        opts = self.options
        if opts.eom_delay:
            time.sleep(opts.eom_delay)  # a slow scanner: libmilter runs each connection in a thread
            self.log_event("eom-done", with_macros=False)
        subject = self.subject or ""
        if opts.reject_subject is not None and opts.reject_subject in subject:
            self.setreply("554", "5.7.1", f"{opts.name} rejected subject")
            return Milter.REJECT
        if not opts.no_add_header:
            queue_id = text(self.getsymval("i"))
            self.addheader("X-Libmilter", f"{opts.name} saw {queue_id}")
        if opts.change_subject and self.subject is not None:
            self.chgheader("Subject", 1, f"[{opts.name}] {self.subject}")
        if opts.replace_body is not None:
            self.replacebody(opts.replace_body.encode("utf-8"))
        return Milter.CONTINUE

    def abort(self):
        """Log an aborted transaction."""
        self.log_event("abort")
        return Milter.CONTINUE

    def close(self):
        """Log the end of the connection."""
        self.log_event("close", with_macros=False)
        return Milter.CONTINUE


class NoReplyConnectHeloMilter(LoggingMilter):
    """Negotiates the libmilter NR flags for connect and helo (no reply is sent for them)."""

    @Milter.noreply
    def connect(self, hostname, family, hostaddr):
        """Log the client without replying."""
        return super().connect(hostname, family, hostaddr)

    @Milter.noreply
    def hello(self, hostname):
        """Log HELO without replying."""
        return super().hello(hostname)


def parse_args(argv):
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="libmilter socket, e.g. inet:10025@127.0.0.1")
    parser.add_argument("--name", required=True, help="milter name used in headers and replies")
    parser.add_argument("--log", required=True, help="JSON-lines event log file")
    parser.add_argument("--change-subject", action="store_true", help="prefix the first Subject with [NAME]")
    parser.add_argument("--replace-body", metavar="TEXT", help="replace the body with TEXT at EOM")
    parser.add_argument("--reject-subject", metavar="WORD", help="554 5.7.1 at EOM if Subject contains WORD")
    parser.add_argument("--reject-header", metavar="NAME", help="554 5.7.1 at the header NAME")
    parser.add_argument("--noreply-connect-helo", action="store_true", help="negotiate NR for connect and helo")
    parser.add_argument("--no-add-header", action="store_true", help="do not add X-Libmilter at EOM")
    parser.add_argument("--no-rcpt-rules", action="store_true", help="accept reject@ and tempfail@ recipients")
    parser.add_argument("--eom-delay", type=float, default=0.0, metavar="SECONDS",
                        help="work SECONDS at end of message before answering")
    return parser.parse_args(argv)


def main(argv=None):
    """Run the milter until SIGTERM or SIGINT."""
    options = parse_args(sys.argv[1:] if argv is None else argv)
    klass = NoReplyConnectHeloMilter if options.noreply_connect_helo else LoggingMilter
    klass.options = options
    klass.events = EventLog(options.log)
    Milter.factory = klass
    Milter.set_flags(
        Milter.ADDHDRS | Milter.CHGHDRS | Milter.CHGBODY | Milter.ADDRCPT
        | Milter.DELRCPT | Milter.QUARANTINE | Milter.CHGFROM
    )

    # libmilter only checks its stop flag every 5 s. Running it in a worker thread leaves the
    # main thread, which the kernel prefers for a process-directed signal, free to exit at once.
    def stop(signum, frame):
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failure = []

    def run():
        try:
            Milter.runmilter(options.name, options.socket, timeout=600)
        except Exception as error:
            failure.append(error)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(1)
    if failure:
        print(f"libmilter_milter {options.name}: {failure[0]!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
