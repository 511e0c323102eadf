"""milter-manager-ctl against a real manager process with libmilter children after known traffic."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from tests.peers.fixtures import LibmilterMilter, MiltermanagerProcess, REPO

CONFIG = """\
load("applicable-conditions/*.conf")
manager.connection_spec = "{spec}"
controller.connection_spec = "unix:{dir}/ctl.sock"
controller.trace_sessions = 10

with define_milter("rcpt") as milter:
    milter.connection_spec = "%(rcpt)s"

with define_milter("dynamic-only") as milter:
    milter.connection_spec = "%(dynamic)s"
    milter.applicable_conditions = ["S25R"]

with define_milter("slow") as milter:
    milter.connection_spec = "%(slow)s"
    milter.end_of_message_timeout = 1
"""


def run_tool(module, *args, check=True):
    """Run one of this checkout's console scripts; return the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=REPO)
    code = f"import sys; from {module} import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=60, env=env, check=check)


class CtlTests(SynchronousTestCase):
    """Two SMTP sessions through the manager, then milter-manager-ctl."""

    def setUp(self):
        cls = self
        cls.dir = tempfile.mkdtemp(prefix="mm-ctl-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        cls.children = [LibmilterMilter(cls.dir, "rcpt", "--no-add-header"),
                        LibmilterMilter(cls.dir, "dynamic-only", "--no-add-header"),
                        LibmilterMilter(cls.dir, "slow", "--no-add-header", "--eom-delay", "3")]
        for child in cls.children:
            child.start()
            self.addCleanup(child.stop)
        rcpt, dynamic, slow = (child.spec for child in cls.children)
        cls.manager = MiltermanagerProcess(
            cls.dir, CONFIG % {"rcpt": rcpt, "dynamic": dynamic, "slow": slow})
        cls.manager.start()
        self.addCleanup(self.manager.stop)
        cls.sessions = [
            run_tool("miltermanager.tools.test_server", "-s", cls.manager.spec,
                     "--connect-host", "mx.example.net", "-f", "alice@example.com",
                     "-r", "bob@example.org", "--envelope-from-macro", "i:QID1",
                     "--end-of-message-macro", "i:QID1",
                     check=False),
            run_tool("miltermanager.tools.test_server", "-s", cls.manager.spec,
                     "--connect-host", "mx.example.net",
                     "-f", "carol@example.com", "-r", "reject@example.org",
                     "--envelope-from-macro", "i:QID2", check=False),
        ]


    def ctl(self, *args, check=True):
        return run_tool("miltermanager.tools.ctl", "-s", f"unix:{self.dir}/ctl.sock", *args,
                        check=check)

    def test_status_counters(self):
        """status --json after two sessions: exact session, verdict, reply, stop and fallback counts."""
        data = json.loads(self.ctl("status", "--json").stdout)
        self.assertEqual(data["sessions"], {"started": 2, "finished": 2, "in_flight": 0})
        # The first message passed; the second lost its only recipient and the MTA aborted it.
        self.assertEqual(data["messages"], {"total": 2, "verdicts": {"pass": 1, "aborted": 1}})
        children = {child["name"]: child for child in data["children"]}
        self.assertEqual(list(children), ["rcpt", "dynamic-only", "slow"])
        self.assertEqual(children["rcpt"]["replies"], {
            "connect": {"continue": 2}, "helo": {"continue": 2},
            "envelope-from": {"continue": 2},
            "envelope-recipient": {"continue": 1, "reject": 1},
            "data": {"continue": 1}, "header": {"continue": 2}, "end-of-header": {"continue": 1},
            "body": {"continue": 1}, "end-of-message": {"continue": 1}})
        self.assertEqual([(name, child["state"], child["failures_in_row"], child["messages"],
                           child["stops"], child["fallbacks"], child["latency_samples"])
                          for name, child in children.items()], [
            ("rcpt", "up", 0, 2, {}, {}, 14),
            ("dynamic-only", "up", 0, 0, {"S25R": 2}, {}, 0),
            ("slow", "up", 0, 2, {}, {"timeout": 1}, 13)])
        self.assertEqual(sorted(children["rcpt"]["latency_ms"]), ["max", "p50", "p90", "p99"])

    def test_trace_stopped_by_s25r(self):
        """trace QUEUE-ID shows the child S25R stopped at connect, with its stopper's FILE:LINE."""
        data = json.loads(self.ctl("trace", "QID2", "--json").stdout)
        stopped = [entry for entry in data["connection"] if entry["decision"] == "stopped"]
        self.assertEqual(stopped, [{
            "stage": "connect", "child": "dynamic-only", "decision": "stopped",
            "condition": "S25R", "stopper": "not_dynamic",
            "origin": f"{REPO}/etc/applicable-conditions/s25r.conf:12"}])
        [message] = data["messages"]
        self.assertEqual((message["queue_id"], message["verdict"], message["stage"]),
                         ("QID2", "aborted", "envelope-recipient"))
        self.assertEqual(sorted((entry["child"], entry["status"], entry["reply"])
                                for entry in message["decisions"]
                                if entry["stage"] == "envelope-recipient"),
                         [("rcpt", "reject", "550 5.7.1 rcpt rejected recipient"),
                          ("slow", "reject", "550 5.7.1 slow rejected recipient")])
        human = self.ctl("trace", "QID2").stdout
        self.assertIn("    connect  dynamic-only  stopped by condition S25R (stopper "
                      f"not_dynamic at {REPO}/etc/applicable-conditions/s25r.conf:12)", human)

    def test_trace_timed_out(self):
        """trace QUEUE-ID shows the child that timed out at end of message and its fallback."""
        data = json.loads(self.ctl("trace", "QID1", "--json").stdout)
        [message] = data["messages"]
        self.assertEqual((message["queue_id"], message["verdict"], message["decided_by"]),
                         ("QID1", "pass", None))
        self.assertEqual(message["decisions"][-1], {
            "stage": "end-of-message", "child": "slow", "decision": "fell-back",
            "status": "accept", "cause": "timeout",
            "reason": "end-of-message timeout (1.0 s) waiting for the reply to END_OF_MESSAGE"})
        human = self.ctl("trace", "QID1").stdout
        self.assertIn("end-of-message      slow   fell back to accept: timeout (end-of-message "
                      "timeout (1.0 s) waiting for the reply to END_OF_MESSAGE)", human)

    def test_trace_unknown_queue_id(self):
        """trace of a queue id not kept exits 1 with the manager's reason on stderr."""
        result = self.ctl("trace", "NOSUCHID", check=False)
        self.assertEqual((result.returncode, result.stdout), (1, ""))
        self.assertEqual(result.stderr, "milter-manager-ctl: no session or queue id 'NOSUCHID' "
                                        "among the 0 sessions in flight and the last 2 finished "
                                        "(controller.trace_sessions = 10)\n")

    def test_unreachable_controller(self):
        """A controller socket nobody listens on exits 2 with one line."""
        result = run_tool("miltermanager.tools.ctl", "-s", f"unix:{self.dir}/none.sock",
                          "status", check=False)
        self.assertEqual((result.returncode, result.stdout), (2, ""))
        self.assertEqual(result.stderr, "milter-manager-ctl: cannot connect to the controller "
                                        f"at unix:{self.dir}/none.sock: No such file or "
                                        "directory\n")
