"""Tests for the controller and /metrics with manager.n_workers: channel, merges, real workers."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter

from prometheus_client.parser import text_string_to_metric_families as text_families

from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from miltermanager import metrics, stages, workers
from miltermanager.controller import protocol as wire
from miltermanager.controller.channel import (
    CONTROL_FD, CONTROL_FD_ENV, MAX_PENDING, WorkerChannel, WorkerControl, WorkerUnreachable,
)
from miltermanager.controller.server import ControllerFactory, Refused
from miltermanager.controller.supervisor import (
    ANSWER_TIMEOUT, SupervisorController, WorkersScrape,
)
from miltermanager.events import (
    Cause, ChildFellBack, ChildReplied, MessageEnded, SessionStarted,
)
from miltermanager.merge import Status
from miltermanager.status import merge_snapshots
from miltermanager.tools.ctl import ask
from miltermanager.tools.log_analyzer import Reader, Statistics
from miltermanager.tools.log_analyzer import main as analyzer_main

from .peers.fixtures import (
    HOST, REPO, LibmilterMilter, MiltermanagerProcess, _alive, free_port,
)
from .test_ctl import run_tool
from .test_metrics import openmetrics_text, samples
from .test_workers import (
    _SESSION_END, RealWorkers, _Lines, _ProcessReactor, _report, _wait, configuration,
)


def _child(name, state="up", since="2026-12-03T10:00:00+0000", failures=0, messages=0,
           replies=None, stops=None, fallbacks=None, raw=()):
    """One child's entry of a worker's snapshot (samples=True)."""
    return {"name": name, "state": state, "since": since, "failures_in_row": failures,
            "connection_spec": f"inet:1@{name}", "configured": True, "messages": messages,
            "replies": replies or {}, "stops": stops or {}, "fallbacks": fallbacks or {},
            "latency_ms": {}, "latency_samples": len(raw), "latency_raw": list(raw)}


def _snapshot(started, finished, in_flight, verdicts, children):
    return {"sessions": {"started": started, "finished": finished, "in_flight": in_flight},
            "messages": {"total": sum(verdicts.values()), "verdicts": verdicts},
            "children": children}


class MergeSnapshotsTests(SynchronousTestCase):
    """merge_snapshots adds up the workers' status snapshots."""

    def test_counts_states_and_latency(self):
        """Counts are summed, down wins with its count, latency is over every worker's samples."""
        one = _snapshot(10, 9, 1, {"pass": 7, "reject": 2}, [
            _child("clamav", messages=9, replies={"connect": {"continue": 10}},
                   fallbacks={"timeout": 1}, raw=(0.001, 0.002, 0.003)),
            _child("spf", state="down", since="2026-12-03T10:05:00+0000", failures=3,
                   messages=4, stops={"S25R": 2}, raw=(0.010,)),
        ])
        two = _snapshot(5, 5, 0, {"pass": 4, "aborted": 1}, [
            _child("clamav", since="2026-12-03T10:01:00+0000", messages=5,
                   replies={"connect": {"continue": 5}, "helo": {"reject": 1}},
                   raw=(0.004,)),
            _child("spf", state="down", since="2026-12-03T10:02:00+0000", failures=5,
                   messages=1, stops={"S25R": 1}),
            _child("old", state="disabled", since=None),
        ])
        three = _snapshot(1, 1, 0, {}, [_child("clamav"), _child("spf")])
        merged = merge_snapshots([one, two, three])
        self.assertEqual(merged["sessions"], {"started": 16, "finished": 15, "in_flight": 1})
        self.assertEqual(merged["messages"],
                         {"total": 14, "verdicts": {"pass": 11, "reject": 2, "aborted": 1}})
        clamav, spf, old = merged["children"]
        self.assertEqual(clamav, {
            "name": "clamav", "state": "up", "since": "2026-12-03T10:01:00+0000",
            "down_in": 0, "failures_in_row": 0, "connection_spec": "inet:1@clamav",
            "configured": True, "messages": 14,
            "replies": {"connect": {"continue": 15}, "helo": {"reject": 1}},
            "stops": {}, "fallbacks": {"timeout": 1},
            "latency_ms": {"p50": 2.0, "p90": 4.0, "p99": 4.0, "max": 4.0},
            "latency_samples": 4})
        self.assertEqual((spf["state"], spf["down_in"], spf["since"], spf["failures_in_row"],
                          spf["messages"], spf["stops"]),
                         ("down", 2, "2026-12-03T10:02:00+0000", 5, 5, {"S25R": 3}))
        self.assertEqual((old["state"], old["since"], old["down_in"]), ("disabled", None, 0))

    def test_nothing(self):
        """No worker answered: zero counts and no child."""
        self.assertEqual(merge_snapshots([]), {
            "sessions": {"started": 0, "finished": 0, "in_flight": 0},
            "messages": {"total": 0, "verdicts": {}}, "children": []})


def _worker_metrics(sessions, replies, in_flight, up, verdicts):
    """A worker's Metrics fed with known events, as the data it sends."""
    counted = metrics.Metrics()
    for number in range(sessions):
        counted.session_started(SessionStarted(number, ("clamav",)))
    for stage, status, elapsed in replies:
        counted.child_replied(ChildReplied(1, "clamav", stage, None, status, status, elapsed))
    for verdict in verdicts:
        counted.message_ended(MessageEnded(1, stages.END_OF_MESSAGE, verdict, None, False,
                                           0.1, None))
    counted.child_fell_back(ChildFellBack(1, "clamav", stages.CONNECT, Status.ACCEPT,
                                          Cause.TIMEOUT, "no answer"))
    data = counted.as_data()
    data["in_flight"] = in_flight
    data["children_up"] = [["clamav", up]]
    return json.loads(json.dumps(data))  # as it crosses the channel


class MergedMetricsTests(SynchronousTestCase):
    """MergedMetrics adds up the workers' Metrics; WorkersCollector renders the sum."""

    def test_sums_render(self):
        """Counters and histograms are sums; child_up is 0 when any worker has the child down."""
        merged = metrics.MergedMetrics()
        merged.add(_worker_metrics(3, [(stages.CONNECT, Status.CONTINUE, 0.002),
                                       (stages.CONNECT, Status.CONTINUE, 0.2)], 1, True,
                                   [Status.CONTINUE, Status.REJECT]))
        merged.add(_worker_metrics(2, [(stages.CONNECT, Status.CONTINUE, 0.004),
                                       (stages.CONNECT, Status.REJECT, 3.0)], 2, False,
                                   [Status.CONTINUE, None]))
        merged.add(_worker_metrics(7, [], 5, True, []), live=False)  # a retired worker
        merged.workers = {"running": 2, "unreachable": 1}
        merged.restarts = 4
        found = samples(openmetrics_text(metrics.registry_of(metrics.WorkersCollector(merged))))
        p = "milter_manager_"
        self.assertEqual(found[(p + "sessions_total", ())], 12)
        self.assertEqual(found[(p + "sessions_in_flight", ())], 3)
        self.assertEqual(found[(p + "messages_total", (("verdict", "continue"),))], 2)
        self.assertEqual(found[(p + "messages_total", (("verdict", "reject"),))], 1)
        self.assertEqual(found[(p + "messages_total", (("verdict", "aborted"),))], 1)
        replies = (("child", "clamav"), ("stage", "connect"), ("status", "continue"))
        self.assertEqual(found[(p + "child_replies_total", replies)], 3)
        latency = (("child", "clamav"), ("stage", "connect"))
        self.assertEqual(found[(p + "child_reply_seconds_count", latency)], 4)
        self.assertAlmostEqual(found[(p + "child_reply_seconds_sum", latency)], 3.206)
        bucket = (("child", "clamav"), ("le", "0.005"), ("stage", "connect"))
        self.assertEqual(found[(p + "child_reply_seconds_bucket", bucket)], 2)
        fallbacks = (("cause", "timeout"), ("child", "clamav"), ("stage", "connect"))
        self.assertEqual(found[(p + "child_fallbacks_total", fallbacks)], 3)
        self.assertEqual(found[(p + "child_up", (("child", "clamav"),))], 0)
        self.assertEqual(found[(p + "workers", (("state", "running"),))], 2)
        self.assertEqual(found[(p + "workers", (("state", "unreachable"),))], 1)
        self.assertEqual(found[(p + "workers", (("state", "restarting"),))], 0)
        self.assertEqual(found[(p + "worker_restarts_total", ())], 4)

    def test_other_buckets_refused(self):
        """A histogram of another bucket count is an error, not a silent wrong sum."""
        data = _worker_metrics(1, [], 0, True, [])
        data["dnsbl_latency"] = [[1, 2], 0.5]
        self.assertRaises(ValueError, metrics.MergedMetrics().add, data)


class WorkerChannelTests(SynchronousTestCase):
    """The supervisor's end of a channel: answers in order, timeouts, a worker gone."""

    def setUp(self):
        self.clock = task.Clock()
        self.channel = WorkerChannel(self.clock)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def test_answers_in_order(self):
        """Two commands get the two answers in the order they were sent."""
        first = self.channel.ask("get-worker-status")
        second = self.channel.ask("get-trace", b"7")
        self.assertEqual(self.transport.value(),
                         wire.encode("get-worker-status") + wire.encode("get-trace", "7"))
        data = wire.encode("status", "{}") + wire.encode("error", "no session 7")
        self.channel.dataReceived(data[:5])
        self.assertNoResult(first)
        self.channel.dataReceived(data[5:])
        self.assertEqual(self.successResultOf(first), ("status", "{}"))
        self.assertEqual(self.successResultOf(second), ("error", "no session 7"))

    def test_timeout_then_late_answer(self):
        """A command unanswered in time fails; its late answer is dropped, the next one matches."""
        slow = self.channel.ask("get-metrics", timeout=2.0)
        self.clock.advance(2.0)
        failure = self.failureResultOf(slow, WorkerUnreachable)
        self.assertEqual(failure.getErrorMessage(), "no answer to get-metrics within 2 s")
        following = self.channel.ask("get-worker-status")
        self.channel.dataReceived(wire.encode("metrics", "late") + wire.encode("status", "now"))
        self.assertEqual(self.successResultOf(following), ("status", "now"))

    def test_worker_gone(self):
        """The channel closing fails what is pending; later commands fail at once."""
        pending = self.channel.ask("reload", timeout=60)
        self.channel.connectionLost(None)
        self.assertEqual(self.failureResultOf(pending, WorkerUnreachable).getErrorMessage(),
                         "its channel closed")
        self.assertEqual(self.failureResultOf(self.channel.ask("get-metrics"),
                                              WorkerUnreachable).getErrorMessage(),
                         "its channel is closed")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_too_many_unanswered(self):
        """A worker that stopped answering is not sent more than MAX_PENDING commands."""
        for _ in range(MAX_PENDING):
            self.channel.ask("get-metrics")
        self.failureResultOf(self.channel.ask("get-metrics"), WorkerUnreachable)
        self.assertEqual(self.transport.value().count(b"get-metrics"), MAX_PENDING)

    def test_bad_packet(self):
        """A bad length from the worker fails what is pending and closes the channel."""
        pending = self.channel.ask("get-metrics")
        self.channel.dataReceived(b"\0\0\0\0")
        self.failureResultOf(pending, WorkerUnreachable)
        self.assertTrue(self.transport.disconnecting)


class _Service:
    """What WorkerControl and the controller read of a worker's service."""

    def __init__(self, controller=None):
        self.controller = controller
        self.reload_errors = ["x.conf:3: no such thing"]

    def reload(self):
        return defer.succeed(False)


class CommandSetsTests(SynchronousTestCase):
    """The admin's socket refuses the internal commands; a worker's channel refuses the admin's."""

    def answer(self, factory, *packets):
        connection = factory.buildProtocol(None)
        transport = StringTransport()
        connection.makeConnection(transport)
        connection.dataReceived(b"".join(packets))
        return [wire.split(payload) for payload in wire.Decoder().feed(transport.value())]

    def test_public_refuses_internal(self):
        """get-metrics and get-worker-status on the controller socket are unknown commands."""
        replies = self.answer(ControllerFactory(object()), wire.encode("get-metrics"),
                              wire.encode("get-worker-status"))
        self.assertEqual(replies, [
            ("error", b"unexpected command was received: <get-metrics>"),
            ("error", b"unexpected command was received: <get-worker-status>")])

    def test_channel_refuses_admin_commands(self):
        """A worker's channel answers no get-status nor set-configuration, and says why not."""
        factory = ControllerFactory(WorkerControl(_Service()), wire.INTERNAL)
        replies = self.answer(factory, wire.encode("set-configuration", "x = 1"),
                              wire.encode("get-metrics"), wire.encode("reload"))
        self.assertEqual(replies, [
            ("error", b"unexpected command was received: <set-configuration>"),
            ("error", b"this worker keeps no metrics: web.connection_spec is not set"),
            ("failure", b"reload failed; the running configuration is kept: "
                        b"x.conf:3: no such thing")])


class _Worker:
    def __init__(self, number, pid, clock):
        self.number = number
        self.pid = pid
        self.started = 0
        self.channel = WorkerChannel(clock)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def asked(self):
        return [wire.split(payload) for payload in wire.Decoder().feed(self.transport.value())]

    def answer(self, name, text):
        self.channel.dataReceived(wire.encode(name, text))


class _Supervisor:
    """The parts of a SupervisorService the controller reads: workers, restarts, reload_own."""

    def __init__(self, clock, n_workers=3, **sections):
        self.configuration = configuration(n_workers, **sections)
        self.n_workers = n_workers
        self.workers = {}
        self.restart_counts = {}
        self.problems = []
        for number in range(1, n_workers + 1):
            self.workers[number] = _Worker(number, 100 + number, clock)

    def reload_own(self, log_errors=False):
        return self.problems


class SupervisorControllerTests(SynchronousTestCase):
    """SupervisorController asks every worker and merges; one that does not answer is named."""

    def setUp(self):
        self.clock = task.Clock()
        self.supervisor = _Supervisor(self.clock, controller={"trace_sessions": 10})
        self.controller = SupervisorController(self.supervisor, self.clock)

    def test_status_with_an_unreachable_and_a_restarting_worker(self):
        """Workers 1 and 2 answer, 3 does not in time; worker 4 of 4 is waiting to restart."""
        self.supervisor.n_workers = 4
        self.supervisor.restart_counts = {3: 1, 4: 2}
        status = self.controller.get_status()
        one, two, three = (self.supervisor.workers[n] for n in (1, 2, 3))
        self.assertEqual(one.asked(), [("get-worker-status", b"")])
        one.answer("status", json.dumps(_snapshot(4, 4, 0, {"pass": 4}, [_child("c")])))
        two.answer("status", json.dumps(_snapshot(6, 5, 1, {"pass": 5}, [_child("c")])))
        self.assertNoResult(status)
        self.clock.advance(ANSWER_TIMEOUT)
        data = json.loads(self.successResultOf(status))
        self.assertEqual(data["sessions"], {"started": 10, "finished": 9, "in_flight": 1})
        self.assertEqual(data["messages"], {"total": 9, "verdicts": {"pass": 9}})
        self.assertEqual(data["trace_sessions"], 10)
        self.assertEqual(data["pid"], os.getpid())
        shares = [(w["number"], w["state"], w.get("sessions", {}).get("started"), w["restarts"])
                  for w in data["workers"]]
        self.assertEqual(shares, [(1, "running", 4, 0), (2, "running", 6, 0),
                                  (3, "unreachable", None, 1), (4, "restarting", None, 2)])
        self.assertEqual(data["workers"][2]["reason"], "no answer to get-worker-status within 2 s")

    def test_trace_from_the_worker_that_has_it(self):
        """get-trace answers with the first worker's trace, tagged with its number."""
        trace = self.controller.get_trace(b"QID7")
        one, two, three = (self.supervisor.workers[n] for n in (1, 2, 3))
        self.assertEqual(two.asked(), [("get-trace", b"QID7")])
        one.answer("error", "no session or queue id 'QID7' among ...")
        two.answer("trace", json.dumps({"session": 3}))
        three.answer("error", "no session or queue id 'QID7' among ...")
        self.assertEqual(json.loads(self.successResultOf(trace)), {"worker": 2, "session": 3})

    def test_trace_of_one_worker(self):
        """A query "3:17" asks worker 3 alone for its session 17."""
        trace = self.controller.get_trace(b"3:17")
        self.assertEqual(self.supervisor.workers[1].asked(), [])
        self.assertEqual(self.supervisor.workers[3].asked(), [("get-trace", b"17")])
        self.supervisor.workers[3].answer("trace", json.dumps({"session": 17}))
        self.assertEqual(json.loads(self.successResultOf(trace))["worker"], 3)

    def test_trace_found_nowhere(self):
        """No worker has it: refused, with what each worker said."""
        trace = self.controller.get_trace(b"QID9")
        for number in (1, 2):
            self.supervisor.workers[number].answer("error", "not kept")
        self.supervisor.workers[3].channel.connectionLost(None)
        failure = self.failureResultOf(trace, Refused)
        self.assertEqual(failure.getErrorMessage(),
                         "no worker has session or queue id 'QID9': worker 1: not kept; "
                         "worker 2: not kept; worker 3: its channel closed")

    def test_reload_reaches_every_worker(self):
        """reload succeeds only when every worker adopted the configuration."""
        reloading = self.controller.reload()
        for worker in self.supervisor.workers.values():
            self.assertEqual(worker.asked(), [("reload", b"")])
            worker.answer("success", "")
        self.assertIsNone(self.successResultOf(reloading))
        self.assertEqual(self.controller.generation, 2)

    def test_reload_failure_names_each_failing_worker(self):
        """A worker that kept its configuration, or did not answer, makes the reload a failure."""
        reloading = self.controller.reload()
        workers_ = self.supervisor.workers
        workers_[1].answer("success", "")
        workers_[2].answer("failure", "reload failed; the running configuration is kept: x")
        workers_[3].channel.connectionLost(None)
        self.assertEqual(self.successResultOf(reloading),
                         "reload failed in 2 of 3 workers (the others and the supervisor use "
                         "the new configuration): worker 2: reload failed; the running "
                         "configuration is kept: x; worker 3: its channel closed")

    def test_reload_refused_by_the_supervisor(self):
        """Files the supervisor cannot load are not sent to any worker."""
        self.supervisor.problems = ["x.conf:1: bad"]
        self.assertEqual(self.successResultOf(self.controller.reload()),
                         "reload failed; the running configuration is kept: x.conf:1: bad")
        self.assertEqual(self.supervisor.workers[1].asked(), [])


class WorkersScrapeTests(SynchronousTestCase):
    """WorkersScrape merges the workers' metrics at each scrape and keeps a dead worker's."""

    def scrape(self, scrape, answers):
        refreshing = scrape.refresh()
        for number, data in answers.items():
            self.supervisor.workers[number].answer("metrics", json.dumps(data))
        self.clock.advance(ANSWER_TIMEOUT)
        self.successResultOf(refreshing)
        return scrape.collector.metrics

    def test_restarted_worker_keeps_its_counts(self):
        """A replaced worker's last counts stay in the sums; a silent one counts its last answer."""
        self.clock = task.Clock()
        self.supervisor = _Supervisor(self.clock, 2)
        scrape = WorkersScrape(self.supervisor)
        merged = self.scrape(scrape, {1: _worker_metrics(5, [], 1, True, []),
                                      2: _worker_metrics(7, [], 2, True, [])})
        self.assertEqual((merged.sessions, merged.in_flight(), merged.workers["running"]),
                         (12, 3, 2))
        self.supervisor.workers[2] = _Worker(2, 999, self.clock)  # restarted: a new pid
        self.supervisor.restart_counts = {2: 1}
        merged = self.scrape(scrape, {2: _worker_metrics(1, [], 0, True, [])})
        # Worker 1 did not answer: its last 5; worker 2's old pid retired with 7; new one 1.
        self.assertEqual((merged.sessions, merged.in_flight()), (13, 0))
        self.assertEqual(merged.workers, {"running": 1, "unreachable": 1, "restarting": 0})
        self.assertEqual(merged.restarts, 1)


class SupervisorChannelTests(SynchronousTestCase):
    """The supervisor gives each worker a channel when a controller or /metrics needs one."""

    def test_channel_fd_only_when_needed(self):
        """With a controller each worker gets fd 4 and the env; without, neither."""
        reactor = _ProcessReactor()
        supervisor = workers.SupervisorService(
            reactor, configuration(2, controller={"connection_spec": "inet:1@[127.0.0.1]"}),
            command=["python3", "-c", "worker"])
        supervisor.listen_fd = 7
        supervisor._start_all()
        _, _, env, fds = reactor.spawned[0]
        self.assertEqual(env[CONTROL_FD_ENV], str(CONTROL_FD))
        self.assertEqual(sorted(fds), [0, 1, 2, 3, CONTROL_FD])
        self.assertEqual(len(reactor.adoptedStreamConnections), 2)
        self.assertIsInstance(supervisor.controller, SupervisorController)
        self.assertIsInstance(supervisor.workers[1].channel, WorkerChannel)
        plain = _ProcessReactor()
        alone = workers.SupervisorService(plain, configuration(2),
                                          command=["python3", "-c", "worker"])
        alone.listen_fd = 7
        alone._start_all()
        self.assertNotIn(CONTROL_FD_ENV, plain.spawned[0][2])
        self.assertEqual(plain.adoptedStreamConnections, [])


# ------------------------------------------------------------------ real processes

CONFIG = """\
manager.connection_spec = "{{spec}}"
manager.n_workers = {n_workers}
log.level = "default"
controller.connection_spec = "inet:{controller}@[127.0.0.1]"
controller.trace_sessions = 1000
web.connection_spec = "inet:{web}@[127.0.0.1]"
web.metrics_without_login = True
with define_milter("child") as milter:
    milter.connection_spec = "{child}"
"""


def _load(spec, n_sessions, concurrency=6):
    """milter-test-server --n-sessions against spec; the Popen."""
    return subprocess.Popen(
        [sys.executable, "-m", "miltermanager.tools.test_server", "-s", spec,
         "--n-sessions", str(n_sessions), "--concurrency", str(concurrency),
         "--reading-timeout", "20"],
        env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL, start_new_session=True)


def _one_session(spec, queue_id):
    """One session of milter-test-server whose message has queue id queue_id."""
    done = subprocess.run(
        [sys.executable, "-m", "miltermanager.tools.test_server", "-s", spec,
         "--envelope-from-macro", f"i:{queue_id}", "--end-of-message-macro", f"i:{queue_id}"],
        env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=60)
    assert done.stdout.startswith("status: pass"), done.stdout + done.stderr


class WorkersControlProcessTests(RealWorkers, TestCase):
    """A real supervisor of three workers with its controller and /metrics, a real child."""

    timeout = 240
    n_workers = 3

    def setUp(self):
        self.child = LibmilterMilter(self.mktemp(), "child")
        self.child.start()
        self.addCleanup(self.child.stop)
        self.controller_port, self.web_port = free_port(), free_port()
        self.manager = MiltermanagerProcess(self.mktemp(), CONFIG.format(
            n_workers=self.n_workers, controller=self.controller_port, web=self.web_port,
            child=self.child.spec))
        self.manager.start()
        self.addCleanup(self._stop_all)
        self.spec = f"inet:{self.manager.port}@{HOST}"
        _wait(lambda: self.manager.log().count("[worker][start]") == self.n_workers, 30,
              "every worker serving")

    def ask(self, name, content=b""):
        return ask(f"inet:{self.controller_port}@{HOST}", name, content)

    def status(self):
        reply, text = self.ask("get-status")
        self.assertEqual(reply, "status", text)
        return json.loads(text)

    def scrape(self):
        with urllib.request.urlopen(f"http://{HOST}:{self.web_port}/metrics", timeout=30) as page:
            return samples(page.read().decode("utf-8"), text_families)

    def send(self, n_sessions):
        ended = sum(self.served().values())
        sessions, messages, errors, out = _report(_load(self.spec, n_sessions))
        self.assertEqual((sessions, messages, errors), (n_sessions, n_sessions, 0), out)
        _wait(lambda: sum(self.served().values()) == ended + n_sessions, 20, "session ends")

    def test_status_metrics_trace_reload_restart(self):
        """get-status and /metrics add up every worker; trace, reload and a restart reach them."""
        self.send(120)
        status = self.status()
        served = self.served()
        self.assertEqual(status["sessions"], {"started": 120, "finished": 120, "in_flight": 0})
        self.assertEqual(status["messages"], {"total": 120, "verdicts": {"pass": 120}})
        self.assertEqual(status["pid"], self.manager.process.pid)
        shares = {w["number"]: w["sessions"]["started"] for w in status["workers"]}
        self.assertEqual(shares, {n: served.get(n, 0) for n in range(1, 4)})
        self.assertGreaterEqual(len([n for n in shares.values() if n]), 2, shares)
        self.assertEqual({w["pid"] for w in status["workers"]}, set(self.pids().values()))
        child, = status["children"]
        self.assertEqual((child["name"], child["state"], child["messages"]), ("child", "up", 120))
        # milter-manager-ctl status shows the workers as a table: one row each.
        shown = run_tool("miltermanager.tools.ctl", "-s", f"inet:{self.controller_port}@{HOST}",
                         "status").stdout.splitlines()
        header = shown.index(next(line for line in shown if line.startswith("WORKER")))
        rows = [line.split() for line in shown[header + 1:]]
        self.assertEqual(shown[header].split(), ["WORKER", "PID", "STATE", "SESSIONS", "IN",
                                                 "FLIGHT", "MESSAGES", "RESTARTS"])
        self.assertEqual(rows, [[str(n), str(self.pids()[n]), "running", str(shares[n]), "0",
                                 str(shares[n]), "0"] for n in (1, 2, 3)])
        self.assertEqual(child["replies"]["end-of-message"], {"continue": 120})
        # Ten replies a session (two headers), up to 1024 kept per worker.
        self.assertEqual(child["latency_samples"], sum(min(1024, 10 * n) for n in shares.values()))
        found = self.scrape()
        p = "milter_manager_"
        self.assertEqual(found[(p + "sessions_total", ())], 120)
        self.assertEqual(found[(p + "messages_total", (("verdict", "continue"),))], 120)
        self.assertEqual(found[(p + "child_replies_total", (
            ("child", "child"), ("stage", "end_of_message"), ("status", "continue")))], 120)
        self.assertEqual(found[(p + "workers", (("state", "running"),))], 3)
        self.assertEqual(found[(p + "child_up", (("child", "child"),))], 1)
        # get-trace finds a message a worker other than the first served.
        for attempt in range(40):
            queue_id = f"QW{attempt}"
            _one_session(self.spec, queue_id)
            _wait(lambda: f" {queue_id}: client=" in self.manager.log(), 20, queue_id)
            worker = int(re.search(rf"\[worker (\d) [^\]]*\] \[message\]\[end\]\(\d+\) "
                                   rf"{queue_id}:", self.manager.log()).group(1))
            if worker != 1:
                break
        self.assertNotEqual(worker, 1, "40 sessions all went to worker 1")
        reply, text = self.ask("get-trace", queue_id.encode())
        self.assertEqual(reply, "trace", text)
        trace = json.loads(text)
        self.assertEqual((trace["worker"], trace["messages"][0]["queue_id"]), (worker, queue_id))
        sessions = 120 + attempt + 1
        # reload over the controller: the supervisor and every worker, and no SIGHUP.
        self.assertEqual(self.ask("reload"), ("success", ""))
        reloaded = re.compile(r"\[worker (\d) [^\]]*\] \[reload\]\[success\]")
        self.assertEqual(set(reloaded.findall(self.manager.log())), {"1", "2", "3"})
        self.assertIn("[workers][reload] asking 3 workers to reload over their channels",
                      self.manager.log())
        self.assertNotIn("asking 3 workers to reload\n", self.manager.log())  # SIGHUP's
        self.assertEqual(self.status()["configuration"]["generation"], 2)
        # A stopped worker (SIGSTOP) is reported unreachable within the timeout; once it
        # runs again, its late answers are dropped and it answers the next command.
        before = self.pids()
        self.assertEqual(self.scrape()[(p + "sessions_total", ())], sessions)
        os.kill(before[3], signal.SIGSTOP)
        self.addCleanup(lambda: _alive(before[3]) and os.kill(before[3], signal.SIGCONT))
        asked = time.monotonic()
        status = self.status()
        self.assertLess(time.monotonic() - asked, ANSWER_TIMEOUT + 2)
        three = status["workers"][2]
        self.assertEqual((three["state"], three["reason"]),
                         ("unreachable", "no answer to get-worker-status within 2 s"))
        found = self.scrape()
        self.assertEqual(found[(p + "workers", (("state", "unreachable"),))], 1)
        self.assertEqual(found[(p + "sessions_total", ())], sessions)  # its last counts
        os.kill(before[3], signal.SIGCONT)
        self.assertEqual([w["state"] for w in self.status()["workers"]], ["running"] * 3)
        # A killed worker is restarted; its counts start again in get-status, but /metrics
        # keeps its last scraped counts.
        self.assertEqual(self.scrape()[(p + "sessions_total", ())], sessions)
        os.kill(before[2], signal.SIGKILL)
        _wait(lambda: self.pids()[2] != before[2], 30, "worker 2 restarted")
        _wait(lambda: self.manager.log().count("[worker][start]") == 4, 30, "worker 2 serving")
        status = self.status()
        two = status["workers"][1]
        self.assertEqual((two["pid"], two["restarts"], two["state"], two["sessions"]["started"]),
                         (self.pids()[2], 1, "running", 0))
        self.assertEqual(status["sessions"]["started"], sessions - served.get(2, 0)
                         - (1 if worker == 2 else 0))
        found = self.scrape()
        self.assertEqual(found[(p + "sessions_total", ())], sessions)
        self.assertEqual(found[(p + "worker_restarts_total", ())], 1)
        self.assertEqual(found[(p + "workers", (("state", "running"),))], 3)


class WorkersStatisticsTests(TestCase):
    """The log analyzer reads the statistics lines of every worker from their shared log."""

    timeout = 120

    def test_analyzer_counts_every_worker(self):
        """milter-manager-log-analyzer counts the sessions of all workers from one real log."""
        child = LibmilterMilter(self.mktemp(), "child")
        child.start()
        self.addCleanup(child.stop)
        manager = MiltermanagerProcess(self.mktemp(), (
            'manager.connection_spec = "{spec}"\nmanager.n_workers = 2\n'
            'log.level = "default"\n'
            'with define_milter("child") as milter:\n'
            f'    milter.connection_spec = "{child.spec}"\n'))
        manager.start()
        self.addCleanup(manager.stop)
        _wait(lambda: manager.log().count("[worker][start]") == 2, 30, "two workers serving")
        sessions, messages, errors, out = _report(_load(f"inet:{manager.port}@{HOST}", 80))
        self.assertEqual((sessions, errors), (80, 0), out)
        _wait(lambda: len(_SESSION_END.findall(manager.log())) == 80, 20, "80 session ends")
        workers_seen = set(_SESSION_END.findall(manager.log()))
        self.assertEqual(workers_seen, {"1", "2"})
        directory = self.mktemp()
        stderr = _Lines()
        status = analyzer_main(["--no-progress", "--output-directory", directory,
                                manager.log_path], stderr=stderr)
        self.assertEqual(status, 0, stderr.text)
        statistics = Statistics()
        with open(manager.log_path, "rb") as raw:
            reader = Reader(statistics)
            reader.read(manager.log_path, raw, time.time())
        total = Counter()
        for counts in statistics.counts.values():
            total.update(counts)
        self.assertEqual((total[("sessions", "smtp")], total[("sessions", "child")],
                          total[("status", "pass")]), (80, 80, 80))
        self.assertEqual(reader.unreadable, 0)
        self.assertTrue(os.path.exists(os.path.join(directory, "index.html")))
