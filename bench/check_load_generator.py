"""Check that bench/load_generator.c sends and reports what milter-test-server --n-sessions does.

    python3 bench/check_load_generator.py

Builds the generator into a temporary directory and runs it and milter-test-server, one after
the other, against a milter on 127.0.0.1 that records every byte it receives. The milter
answers the offer with one of several negotiation replies (no flags; every no-reply flag with
SMFIP_HDR_LEADSPC; commands negotiated away; symbol lists; protocol version 2) and CONTINUE to
every command, or a final reply at one command (REJECT at RCPT, SKIP at BODY, ACCEPT at DATA,
TEMPFAIL at CONNECT, a 4xx reply code at END_OF_MESSAGE). Each case must give the same bytes
on every connection and the same messages, status and error lines. Then one case per error
the generator must report: a modification before END_OF_MESSAGE, an unknown reply code, a
connection closed before the reply, no reply at all (the error's wording differs between the
two; its count must not).

The open-loop mode (--rate) must send the same bytes: every case runs a third time with the
generator at --rate. Then its schedule: sessions start on time whatever the milter does, a
session that waited for a free slot is timed from when it was due (a milter that holds its
first CONNECT reply shows in the latency of the sessions queued behind it, and in CONNECT's
command time), a rate is kept and not exceeded, and a bad --rate is a usage error. Exits 0 if
everything matched, 1 if not.
"""

import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from miltermanager.protocol import constants as c  # noqa: E402  (needs the repo root on sys.path)
from miltermanager.protocol import messages as m  # noqa: E402
from miltermanager.protocol import negotiation  # noqa: E402

SESSIONS, MESSAGES = 2, 3
REPLIES = {
    "no flags": m.Negotiate(6, 0, 0, {}),
    "no replies, leading space": m.Negotiate(6, 1, c.NO_REPLY_FLAGS | c.SMFIP_HDR_LEADSPC, {}),
    "no HELO, no headers, no RCPT reply": m.Negotiate(
        6, 0, c.SMFIP_NOHELO | c.SMFIP_NOHDRS | c.SMFIP_NR_RCPT, {}),
    "no CONNECT and HELO replies": m.Negotiate(6, 0, c.SMFIP_NR_CONN | c.SMFIP_NR_HELO, {}),
    "symbol lists": m.Negotiate(6, c.SMFIF_SETSYMLIST, 0, {
        0: [b"j", b"daemon_name"], 2: [b"{mail_addr}"], 3: [], 5: [b"nothing"]}),
    "version 2": m.Negotiate(2, 0, 0, {}),
}
FINALS = [  # (reply packet, the command it answers; None: CONTINUE everywhere)
    (None, None),
    (m.Reject().encode(), c.RCPT),
    (m.Skip().encode(), c.BODY),
    (m.Accept().encode(), c.DATA),
    (m.Tempfail().encode(), c.CONNECT),
    (m.ReplyCode(b"451 4.7.1 later").encode(), c.END_OF_MESSAGE),
]
ERRORS = {  # what the milter does on RCPT instead of answering it
    "a modification": struct.pack("!I", 5) + b"hA\0b\0",
    "an unknown reply code": struct.pack("!I", 1) + b"Z",
    "closing the connection": "close",
    "no reply": "silent",
}
CONTINUE = m.Continue().encode()
RATE = 500  # messages/s for the rate-mode run of every case: 2 sessions of 3 messages, 6 ms apart
# (one slot, as the other two runs: the recording milter serves one connection at a time)


class RecordingMilter:
    """Accepts connections on 127.0.0.1 in a thread and keeps what each one sent."""

    def __init__(self, reply, final=None, at=None, on_rcpt=None, hold=None):
        """hold: (command, seconds) to wait before answering that command on the first connection."""
        self.options = negotiation.accept(negotiation.offer(6), reply)
        self.reply, self.final, self.at, self.on_rcpt = reply.encode(), final, at, on_rcpt
        self.hold = hold
        self.received = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection:
                self.received.append(self._session(connection))

    def _answer(self, code):
        if code == c.NEGOTIATE:
            return self.reply
        if code == c.RCPT and self.on_rcpt is not None:
            return self.on_rcpt
        if not (self.options.sends(code) and self.options.replies(code)):
            return None
        return self.final if code == self.at else CONTINUE

    def _session(self, connection):
        received, pending = bytearray(), b""
        while True:
            try:
                data = connection.recv(65536)
            except OSError:
                data = b""
            if not data:
                return bytes(received)
            received += data
            pending += data
            while len(pending) >= 5:
                (length,) = struct.unpack("!I", pending[:4])
                if len(pending) < 4 + length:
                    break
                code, pending = pending[4:5], pending[4 + length:]
                answer = self._answer(code)
                if self.hold and code == self.hold[0] and not self.received:
                    time.sleep(self.hold[1])  # a slow first session; this thread serves one at a time
                if answer == "close":
                    return bytes(received)
                if answer not in (None, "silent"):
                    connection.sendall(answer)

    def close(self):
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
        except OSError:
            pass
        self.listener.close()
        self.thread.join(5)


def report_lines(output):
    """The messages, status and error lines; errors by count only (the wording differs)."""
    return sorted(line.partition("\u00d7")[0].strip() if line.startswith("error:") else line
                  for line in output.splitlines()
                  if line.startswith(("messages:", "status ", "error:")))


def run(command, milter, sessions=SESSIONS, messages=MESSAGES):
    argv = [arg.replace("PORT", str(milter.port)) for arg in command]
    argv += ["--n-sessions", str(sessions), "--n-messages-per-session", str(messages),
             "--all-timeouts", "1"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    return done.stdout


def figures(output):
    """{'elapsed': s, 'latency': [p50, p90, p99, max] ms, 'lag': [p50, p99, max] ms, 'CONNECT': max ms, ...}."""
    found = {}
    for line in output.splitlines():
        key, _, value = line.partition(": ")
        if key == "elapsed-time":
            found["elapsed"] = float(value.split()[0])
        elif key == "throughput":
            found["throughput"] = float(value.split()[0])
        elif key == "latency p50/p90/p99/max":
            found["latency"] = [float(v) for v in value.split()[0].split("/")]
        elif key == "start-lag p50/p99/max":
            found["lag"] = [float(v) for v in value.split()[0].split("/")]
        elif key.startswith("command ") and key.endswith(" p50/p90/p99/p99.9/max"):
            found[key.split()[1]] = float(value.split()[0].split("/")[-1])
        elif key.startswith("status "):
            found[key] = int(value)
    return found


def check_schedule(generator):
    """The open-loop cases; print each and return how many failed."""
    failures = 0

    def verdict(name, ok, output):
        print(f"{'ok' if ok else 'WRONG':9} rate: {name}")
        if not ok:
            print("          " + output.replace("\n", "\n          "))
        return not ok

    # 4 one-message sessions due 100 ms apart, one slot; the first CONNECT is held 300 ms.
    # Due at 0, 0.1, 0.2, 0.3 s, they end at about 0.3 s, then at once: latencies about 300,
    # 200, 100 and 0 ms (timed from when each was due), start lags about 0, 200, 100, 0 ms.
    milter = RecordingMilter(REPLIES["no flags"], hold=(c.CONNECT, 0.3))
    try:
        output = run([*generator, "--rate", "10", "--concurrency", "1"], milter, sessions=4, messages=1)
    finally:
        milter.close()
    got = figures(output)
    ok = (got.get("status pass") == 4 and len(milter.received) == 4
          and got["latency"][3] >= 290 and got["latency"][0] >= 90 and 190 <= got["lag"][2] < 290
          and got["CONNECT"] >= 290 and got["MAIL"] < 250)
    failures += verdict("a session queued behind a slow one is timed from when it was due", ok, output)
    # 10 sessions of 2 messages at 100 messages/s: due every 20 ms, the last at 180 ms.
    milter = RecordingMilter(REPLIES["no flags"])
    try:
        started = time.monotonic()
        output = run([*generator, "--rate", "100", "--concurrency", "50"], milter, sessions=10, messages=2)
        took = time.monotonic() - started
    finally:
        milter.close()
    got = figures(output)
    ok = got.get("status pass") == 20 and 0.18 <= got["elapsed"] < 2 and took >= 0.18 and got["throughput"] <= 111
    failures += verdict("the rate is kept, not exceeded", ok, output)
    for bad in ("0", "-5", "abc", ""):
        done = subprocess.run([*generator, "--rate", bad, "--n-sessions", "1"], capture_output=True, text=True,
                              timeout=10)
        ok = done.returncode == 2 and "--rate" in done.stderr and not done.stdout
        failures += verdict(f"--rate {bad!r} is a usage error", ok, done.stderr.strip())
    return failures


def main():
    workdir = tempfile.mkdtemp(prefix="mm-check-generator-")
    try:
        binary = os.path.join(workdir, "load_generator")
        subprocess.run(["cc", "-O2", "-Wall", "-o", binary, os.path.join(REPO, "bench", "load_generator.c")],
                       check=True)
        script = os.path.join(workdir, "script")
        with open(script, "w") as output:
            subprocess.run([sys.executable, os.path.join(REPO, "bench", "load_script.py")],
                           stdout=output, check=True)
        spec = "inet:PORT@127.0.0.1"
        python = [sys.executable, "-m", "miltermanager.tools.test_server", "-s", spec]
        generator = [binary, "--script", script, "-s", spec]
        at_rate = [*generator, "--rate", str(RATE), "--concurrency", "1"]
        failures = 0
        cases = [(name, reply, final, at, None) for name, reply in REPLIES.items() for final, at in FINALS]
        cases += [(f"error: {what}", REPLIES["no flags"], None, None, action)
                  for what, action in ERRORS.items()]
        for name, reply, final, at, on_rcpt in cases:
            seen = []
            for command in (python, generator, at_rate):
                milter = RecordingMilter(reply, final, at, on_rcpt)
                try:
                    output = run(command, milter)
                finally:
                    milter.close()
                seen.append((sorted(milter.received), report_lines(output)))
            (python_bytes, python_report), (c_bytes, c_report), rate_seen = seen
            same = (python_bytes == c_bytes and len(c_bytes) == SESSIONS and python_report == c_report
                    and rate_seen == (c_bytes, c_report))
            failures += not same
            answer = "CONTINUE" if at is None else f"{final[4:5].decode()} at {at.decode()}"
            print(f"{'same' if same else 'DIFFERENT':9} {name}, {answer}: {'; '.join(c_report)}")
            if not same:
                print(f"          milter-test-server: {python_report}, {[len(b) for b in python_bytes]} bytes")
                print(f"          load_generator:     {c_report}, {[len(b) for b in c_bytes]} bytes")
                print(f"          ... --rate {RATE}:      {rate_seen[1]}, {[len(b) for b in rate_seen[0]]} bytes")
        failures += check_schedule([binary, "--script", script, "-s", spec])
        print("all cases matched" if not failures else f"{failures} case(s) differ")
        return 1 if failures else 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
