"""The supervisor's controller and /metrics (manager.n_workers): answers gathered from the workers.

SupervisorController answers the admin's controller commands by asking
every running worker over its channel (controller.channel) and merging the
answers (status.merge_snapshots); WorkersScrape does the same for
/metrics (metrics.MergedMetrics). A worker that does not answer within
ANSWER_TIMEOUT (a reload: RELOAD_TIMEOUT) is reported as unreachable; no
command waits longer than that.
"""

import json

from twisted.internet import defer
from twisted.logger import Logger

from .server import ConfigurationCommands, Refused
from ..status import iso_time, merge_snapshots

ANSWER_TIMEOUT = 2.0
# A worker's reload loads the files and may start LDAP connections.
RELOAD_TIMEOUT = 60.0

log = Logger(namespace="miltermanager.workers")


def ask_workers(supervisor, name, content=b"", timeout=ANSWER_TIMEOUT, numbers=None):
    """Ask every running worker (or those numbered numbers) command name at once.

    Fires with [(number, worker, answer, reason)] in number order: answer is
    (reply name, text) and reason None, or answer None and reason the text
    saying why the worker did not answer (logged once).
    """
    asked = []
    for number in sorted(supervisor.workers):
        if numbers is not None and number not in numbers:
            continue
        worker = supervisor.workers[number]
        if worker.channel is None:
            from .channel import WorkerUnreachable

            asking = defer.fail(WorkerUnreachable("it has no channel"))
        else:
            asking = worker.channel.ask(name, content, timeout)
        asked.append((number, worker, asking))

    def gathered(results):
        answers = []
        for (number, worker, _), (ok, value) in zip(asked, results):
            if ok:
                answers.append((number, worker, value, None))
                continue
            reason = value.getErrorMessage()
            log.warn("[workers][control][error] worker {number} (pid {pid}) did not answer "
                     "{command}: {reason}", number=number, pid=worker.pid, command=name,
                     reason=reason)
            answers.append((number, worker, None, reason))
        return answers

    return defer.DeferredList([asking for _, _, asking in asked],
                              consumeErrors=True).addCallback(gathered)


def _json(answer, reason, expected):
    """(data, None) when answer is the JSON reply expected, else (None, why not)."""
    if answer is None:
        return None, reason
    name, text = answer
    if name != expected:
        return None, text if name == "error" else f"it answered {name}"
    try:
        return json.loads(text), None
    except ValueError:
        return None, f"its {name} answer is not JSON"


class SupervisorController(ConfigurationCommands):
    """The controller of the supervisor: status, trace and reload gathered from its workers.

    get-configuration and set-configuration act on the supervisor's
    configuration, as a single manager's do.
    """

    def __init__(self, supervisor, clock):
        super().__init__(supervisor)
        self.clock = clock
        self.started = clock.seconds()
        self.generation = 1
        self.loaded_at = None

    def get_status(self):
        return ask_workers(self.service, "get-worker-status").addCallback(self._status)

    def _status(self, answers):
        supervisor = self.service
        snapshots, workers = [], {}
        for number, worker, answer, reason in answers:
            snapshot, reason = _json(answer, reason, "status")
            entry = {"number": number, "state": "running", "pid": worker.pid,
                     "started": iso_time(worker.started),
                     "restarts": supervisor.restart_counts.get(number, 0)}
            if snapshot is None:
                entry.update(state="unreachable", reason=reason)
            else:
                snapshots.append(snapshot)
                entry["sessions"] = snapshot["sessions"]
                entry["messages"] = snapshot["messages"]["total"]
            workers[number] = entry
        for number in range(1, supervisor.n_workers + 1):
            workers.setdefault(number, {"number": number, "state": "restarting", "pid": None,
                                        "started": None,
                                        "restarts": supervisor.restart_counts.get(number, 0)})
        configuration = supervisor.configuration
        merged = merge_snapshots(snapshots)
        data = {
            "pid": _pid(),
            "started": iso_time(self.started),
            "uptime": round(self.clock.seconds() - self.started, 3),
            "configuration": {
                "generation": self.generation,
                "loaded": iso_time(self.started if self.loaded_at is None else self.loaded_at),
                "files": list(configuration.files),
            },
            **merged,
            "trace_sessions": configuration.controller.trace_sessions,
            "workers": [workers[number] for number in sorted(workers)],
        }
        return json.dumps(data, indent=1)

    def get_trace(self, query):
        """The trace from the first worker that has it; "W:QUERY" asks worker W only.

        Each worker numbers its sessions from 1, so a session number alone
        picks the lowest-numbered worker that kept one by that number.
        """
        if not self.service.configuration.controller.trace_sessions:
            raise Refused("no trace is kept: controller.trace_sessions is 0")
        try:
            text = query.decode("utf-8")
        except UnicodeDecodeError:
            raise Refused("a queue id or session number is ASCII text") from None
        numbers = None
        worker, colon, rest = text.partition(":")
        if colon and worker.strip().isdigit():
            numbers, text = {int(worker)}, rest
        asking = ask_workers(self.service, "get-trace", text.encode("utf-8"),
                             numbers=numbers)

        def found(answers):
            reasons = []
            for number, _, answer, reason in answers:
                data, reason = _json(answer, reason, "trace")
                if data is not None:
                    return json.dumps({"worker": number, **data}, indent=1)
                reasons.append(f"worker {number}: {reason}")
            if not reasons:
                raise Refused(f"worker {worker} is not running" if numbers
                              else "no worker is running")
            raise Refused(f"no worker has session or queue id {text.strip()!r}: "
                          + "; ".join(reasons))

        return asking.addCallback(found)

    def reload(self):
        """The supervisor reloads, then every worker: None when all adopted it, else why not."""
        problems = self.service.reload_own(log_errors=True)
        if problems:
            return defer.succeed("reload failed; the running configuration is kept: "
                                 + "; ".join(problems))
        self.generation += 1
        self.loaded_at = self.clock.seconds()
        log.info("[workers][reload] asking {n} workers to reload over their channels",
                 n=len(self.service.workers))
        asking = ask_workers(self.service, "reload", timeout=RELOAD_TIMEOUT)

        def outcome(answers):
            failures = []
            for number, _, answer, reason in answers:
                if answer is None:
                    failures.append(f"worker {number}: {reason}")
                elif answer[0] != "success":
                    failures.append(f"worker {number}: {answer[1] or answer[0]}")
            if not failures:
                return None
            return (f"reload failed in {len(failures)} of {len(answers)} workers (the "
                    "others and the supervisor use the new configuration): "
                    + "; ".join(failures))

        return asking.addCallback(outcome)


class WorkersScrape:
    """/metrics of the supervisor: each scrape asks every worker for its counts and adds them.

    The last counts of a worker that has exited are kept (retired), so the
    sums never go down when a worker is restarted; what it counted after
    the scrape before its end is lost. A worker that does not answer in time
    counts with its last answer.
    """

    def __init__(self, supervisor):
        from ..metrics import MergedMetrics, WorkersCollector, registry_of

        self.supervisor = supervisor
        self.collector = WorkersCollector(MergedMetrics())
        self.registry = registry_of(self.collector)
        self.last = {}  # pid -> the worker's last answer (Metrics.as_data())
        self.retired = MergedMetrics()

    def refresh(self):
        """Ask the workers and merge; fires once done (never fails: errors are logged)."""
        asking = ask_workers(self.supervisor, "get-metrics").addCallback(self._merge)
        return asking.addErrback(
            lambda failure: log.failure("[workers][metrics][error] cannot merge the "
                                        "workers' metrics", failure))

    def _merge(self, answers):
        from ..metrics import MergedMetrics

        answered = set()
        for _, worker, answer, reason in answers:
            data, _ = _json(answer, reason, "metrics")
            if data is not None:
                self.last[worker.pid] = data
                answered.add(worker.pid)
        running = {worker.pid for worker in self.supervisor.workers.values()}
        for pid in [pid for pid in self.last if pid not in running]:
            self.retired.add(self.last.pop(pid), live=False)
        merged = MergedMetrics()
        merged.add(self.retired.as_data(), live=False)
        for pid, data in self.last.items():
            merged.add(data, live=pid in answered)
        merged.workers = {
            "running": len(answered), "unreachable": len(answers) - len(answered),
            "restarting": max(0, self.supervisor.n_workers - len(self.supervisor.workers))}
        merged.restarts = sum(self.supervisor.restart_counts.values())
        self.collector.metrics = merged


def _pid():
    import os

    return os.getpid()
