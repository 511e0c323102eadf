"""The process launcher: a root helper that starts child milters (milter.command) on demand.

With security.privilege_mode on and milter-manager started as root,
ManagerService forks this helper before it drops its privileges (upstream's
process launcher). The helper stays root and runs a fresh interpreter; the
manager, now unprivileged, talks to it over a socket pair in JSON lines:

    manager -> launcher  {"commands": {"m1": ["CMD ARGS", "nobody"], ...}}   first line only
                         {"id": 1, "launch": "m1", "command": "CMD ARGS", "user": "nobody"}
    launcher -> manager  {"id": 1, "pid": 4242}       started
                         {"id": 1, "running": 4242}   not again: an earlier launch still runs
                         {"id": 1, "error": "TEXT"}   refused, or could not start
                         {"exited": 4242, "status": 1}   a command it started ended
                                                      (status: exit status, or -signal)

The first line, the configuration's commands, is written by the manager
while still root, before anything from the network is read: the launcher
runs only those, as those users, and refuses any other request. A reload
cannot teach it new commands (the manager no longer has the rights to be
trusted with that): it says a restart is needed. The launcher exits when
the manager does (end of file on the socket); the commands it started keep
running, as services do.

In the manager, Launcher asks for a start when a session cannot connect to
a child (refused, or no such socket), once for all the sessions failing
meanwhile, and those sessions retry connecting until the child listens,
its command fails, or STARTUP_WAIT passes. A failed start is tried again
after manager.down_retry_interval, doubling like the health probes.
"""

import errno
import json
import os
import pwd
import select
import signal
import socket
import subprocess
import sys

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from .client import MilterConnectError

# Longest line either side sends; a request is a few hundred bytes.
MAX_LINE = 1 << 20
# Seconds the sessions wait for a started child to listen (less if its connection_timeout
# is shorter). Postfix's milter_connect_timeout (30 s) covers the negotiation too.
STARTUP_WAIT = 20.0
# Pause between connection attempts while a child starts: the first, and the longest.
FIRST_RETRY = 0.05
MAX_RETRY = 0.5
# Connection failures that starting the child can cure: nothing listens there yet.
_CURABLE = (errno.ECONNREFUSED, errno.ENOENT)
# How the launcher process is started after the fork: no current directory or PYTHONPATH
# on its path (it runs as root), only the directory this package was imported from.
_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
         "from miltermanager.launcher import main; main(int(sys.argv[2]))")

log = Logger()


# ------------------------------------------------------------ framing


class FramingError(ValueError):
    """Bytes on the launcher's socket that are not a JSON object on a line of its own."""


def encode(message):
    """message (a dict) as one line."""
    return json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"


def decode(line):
    """The dict a line holds; FramingError if it holds something else."""
    try:
        message = json.loads(line)
    except ValueError as problem:
        raise FramingError(f"not JSON: {problem}") from None
    if not isinstance(message, dict):
        raise FramingError(f"not a JSON object: {line[:80]!r}")
    return message


class LineBuffer:
    """Splits a byte stream into lines (without the newline), at most max_line bytes each."""

    def __init__(self, max_line=MAX_LINE):
        self.max_line = max_line
        self._pending = b""

    def feed(self, data):
        """The lines data completes. A line too long is dropped: FramingError."""
        *lines, self._pending = (self._pending + data).split(b"\n")
        if len(self._pending) > self.max_line:
            self._pending = b""
            raise FramingError(f"a line longer than {self.max_line} bytes")
        return lines


# ------------------------------------------------------------ what may run


class Refused(Exception):
    """A launch request the launcher does not carry out; the text says why."""


def command_line(milter):
    """The shell command line for milter, as upstream: command, a space, command_options."""
    if milter.command_options:
        return f"{milter.command} {milter.command_options}"
    return milter.command


def commands(configuration):
    """{milter name: [command line, user]} for every milter with a command: what may run."""
    return {milter.name: [command_line(milter), milter.user_name]
            for milter in configuration.milters if milter.command}


def check_request(table, request):
    """(command line, user) to run for a launch request, or Refused saying why.

    Only a milter of table with exactly its command line and user runs, so
    the manager's unprivileged side cannot make root run anything else.
    """
    name = request.get("launch")
    if not isinstance(name, str):
        raise Refused("not a launch request")
    entry = table.get(name)
    if entry is None:
        raise Refused(f'milter "{name}" has no command in the configuration milter-manager '
                      "started with: restart milter-manager to run it")
    if [request.get("command"), request.get("user")] != entry:
        raise Refused(f'milter "{name}": its command or user_name differs from the '
                      "configuration milter-manager started with: restart milter-manager "
                      "to run it")
    return entry[0], entry[1]


def configuration_problems(configuration):
    """(errors, warnings) about the launcher's settings, as ConfigurationErrors and texts.

    Errors: a user_name that does not exist, where the command would run.
    Warnings ("FILE:LINE: text"): a command that never runs because
    privilege mode is off; command_options or user_name without a command.
    """
    from .config import ConfigurationError
    from .config.model import located

    errors, warnings = [], []
    privileged = configuration.security.privilege_mode
    if privileged and not _wanted(configuration):
        warnings.append(located(
            configuration.security.origins.get("privilege_mode"),
            "security.privilege_mode = True: no enabled milter has a command: nothing is "
            "ever started"))
    for milter in configuration.milters:
        if not milter.command:
            for name in ("command_options", "user_name"):
                if getattr(milter, name) is not None:
                    warnings.append(located(
                        milter.origins.get(name), f'milter "{milter.name}": {name} has no '
                        "effect without milter.command"))
            continue
        if not milter.enabled:
            continue
        if not privileged:
            warnings.append(located(
                milter.origins.get("command"), f'milter "{milter.name}": command is never run: '
                "security.privilege_mode is False (True starts it when it cannot be reached)"))
        elif milter.user_name is not None:
            try:
                pwd.getpwnam(milter.user_name)
            except KeyError:
                errors.append(ConfigurationError(
                    f'milter "{milter.name}": user_name: no such user {milter.user_name!r}',
                    milter.origins.get("user_name")))
    return errors, warnings


# ------------------------------------------------------------ the launcher process


def spawn(table):
    """Fork the launcher process with table (see commands); (the manager's socket, its pid).

    The child execs a fresh interpreter at once: nothing of the manager's
    state (its reactor, its open files) lives on as root.
    """
    ours, theirs = socket.socketpair()
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pid = os.fork()
    if pid == 0:
        try:
            descriptor = theirs.fileno()
            os.closerange(3, descriptor)
            os.closerange(descriptor + 1, os.sysconf("SC_OPEN_MAX"))
            os.set_inheritable(descriptor, True)
            os.execv(sys.executable,
                     [sys.executable, "-I", "-c", _BOOT, package_root, str(descriptor)])
        finally:
            os._exit(127)
    theirs.close()
    ours.sendall(encode({"commands": table}))
    return ours, pid


def main(descriptor):
    """The launcher process: serve the manager on descriptor until it goes away.

    The manager going away mid-write is the end too; anything else is one
    line on stderr (the manager then logs that the launcher ended).
    """
    try:
        serve(socket.socket(fileno=descriptor))
    except ConnectionError:
        pass
    except Exception as problem:
        sys.stderr.write(f"milter-manager process launcher: {problem!r}\n")
        sys.exit(1)


def _ignore(number, frame):
    pass


def serve(sock, start=None):
    """Answer launch requests on sock and report launched commands' ends, until end of file.

    Stopping signals are caught and ignored (systemd and terminals send them
    to the whole group; the manager going away is the sign to go). A
    handler, unlike SIG_IGN, is not inherited by the commands.
    """
    start = start or run_command
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                   signal.SIGUSR2, signal.SIGCHLD):
        signal.signal(number, _ignore)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)  # SIGCHLD wakes select()
    lines = LineBuffer()
    table = None
    running = {}  # pid -> ((command line, user), Popen)
    while True:
        readable = select.select([sock, wake_read], [], [])[0]
        if wake_read in readable:
            while True:
                try:
                    if not os.read(wake_read, 512):
                        break
                except BlockingIOError:
                    break
        for pid, (_, process) in list(running.items()):
            status = process.poll()
            if status is not None:
                del running[pid]
                sock.sendall(encode({"exited": pid, "status": status}))
        if sock not in readable:
            continue
        data = sock.recv(65536)
        if not data:
            return
        try:
            received = lines.feed(data)
        except FramingError as problem:
            sock.sendall(encode({"id": None, "error": str(problem)}))
            continue
        for line in received:
            if table is None:
                table = _table(line)
                continue
            sock.sendall(encode(_answer(line, table, running, start)))


def _table(line):
    """The first line: the commands that may run. Anything else: nothing may."""
    try:
        table = decode(line).get("commands")
    except FramingError:
        return {}
    return table if isinstance(table, dict) else {}


def _answer(line, table, running, start):
    try:
        request = decode(line)
    except FramingError as problem:
        return {"id": None, "error": str(problem)}
    ident = request.get("id")
    try:
        command, user = check_request(table, request)
    except Refused as problem:
        return {"id": ident, "error": str(problem)}
    for pid, (key, _) in running.items():
        if key == (command, user):
            return {"id": ident, "running": pid}
    try:
        process = start(command, user)
    except KeyError:
        return {"id": ident, "error": f"no such user {user!r}"}
    except OSError as problem:
        return {"id": ident, "error": f"cannot run /bin/sh: {problem.strerror or problem}"}
    except (ValueError, subprocess.SubprocessError) as problem:  # a NUL in it, for one
        return {"id": ident, "error": f"cannot run {command!r}: {problem}"}
    running[process.pid] = ((command, user), process)
    return {"id": ident, "pid": process.pid}


def run_command(command, user):
    """Start command with /bin/sh -c as user (None: as we are), in a session of its own.

    As upstream: setgid to the user's group, initgroups, setuid. KeyError
    for a user that does not exist.
    """
    identity = {}
    if user is not None:
        entry = pwd.getpwnam(user)
        identity = {"user": entry.pw_uid, "group": entry.pw_gid,
                    "extra_groups": os.getgrouplist(entry.pw_name, entry.pw_gid)}
    return subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL,
                            close_fds=True, start_new_session=True, **identity)


# ------------------------------------------------------------ the manager's side


class LaunchError(MilterConnectError):
    """A child could not be reached, and starting its command did not help."""

    def __init__(self, first, cause):
        super().__init__(first.spec, f"{first.reason}; {cause}")


def status_text(status):
    """What a command's exit status (or -signal) means, in words."""
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    meaning = {126: " (not executable)", 127: " (command not found)"}.get(status, "")
    return f"exited with status {status}{meaning}"


def start_launcher(configuration, reactor, clock=None):
    """Fork the launcher if the configuration wants one and we may: a Launcher, or None.

    Called as root before privileges drop. Privilege mode without root is
    said once here (upstream turns it off without a word).
    """
    wanted = _wanted(configuration)
    if not configuration.security.privilege_mode or not wanted:
        return None
    if os.geteuid() != 0:
        log.warn("[launcher][disabled] security.privilege_mode is True but milter-manager "
                 "did not start as root: {names} will not be started when they cannot be "
                 "reached", names=", ".join(wanted))
        return None
    launcher = Launcher(configuration, reactor, clock)
    try:
        ours, pid = spawn(launcher.commands)
        launcher.attach(ours, pid)
    except OSError as problem:
        log.error("[launcher][error] cannot start the process launcher: {problem}; {names} "
                  "will not be started", problem=problem, names=", ".join(wanted))
        return None
    log.info("[launcher][start] process launcher running as pid {pid} for {names}",
             pid=pid, names=", ".join(wanted))
    return launcher


def reconfigured(launcher, configuration):
    """A reload adopted configuration: say what the launcher cannot do for it."""
    if launcher is not None:
        launcher.reconfigure(configuration)
        return
    wanted = _wanted(configuration)
    if configuration.security.privilege_mode and wanted:
        log.warn("[reload][restart-needed] security.privilege_mode: the process launcher "
                 "is forked only at start, as root, and is not running: {names} will not "
                 "be started", names=", ".join(wanted))


def _wanted(configuration):
    """The names of the children the launcher is for: enabled, with a command."""
    return [milter.name for milter in configuration.enabled_milters if milter.command]


class _Connection(Protocol):
    """The manager's end of the launcher's socket."""

    def __init__(self, launcher):
        self.launcher = launcher
        self.lines = LineBuffer()

    def connectionMade(self):
        self.launcher.connection = self

    def dataReceived(self, data):
        try:
            received = self.lines.feed(data)
        except FramingError as problem:
            log.error("[launcher][error] from the launcher: {problem}", problem=problem)
            return
        for line in received:
            try:
                message = decode(line)
            except FramingError as problem:
                log.error("[launcher][error] from the launcher: {problem}", problem=problem)
                continue
            self.launcher.received(message)

    def send(self, message):
        self.transport.write(encode(message))

    def connectionLost(self, reason):
        self.launcher.lost()


class Launcher:
    """The manager's side of the launcher process.

    commands: what the process took at its start (see commands()).
    configuration: the current one (reconfigure); its privilege_mode says
    whether starting children is still wanted.
    """

    def __init__(self, configuration, reactor, clock=None):
        self.configuration = configuration
        self.commands = commands(configuration)
        self.reactor = reactor
        self.clock = clock or reactor
        self.pid = None
        self.connection = None  # a _Connection while the process runs
        self.stopping = False  # the manager is stopping
        self._next_id = 0
        self._requests = {}  # request id -> _Launch
        self._launches = {}  # milter name -> its last _Launch

    def attach(self, sock, pid):
        """Talk to the launcher process pid over sock (a connected socket, which is adopted)."""
        self.pid = pid
        factory = Factory.forProtocol(lambda: _Connection(self))
        self.reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, factory)
        sock.close()
        # The reactor closes every connection as it stops: that loss is no news.
        self.reactor.addSystemEventTrigger("before", "shutdown", self._stopping)

    def _stopping(self):
        self.stopping = True

    def reconfigure(self, configuration):
        """Sessions from now on run on configuration; say which commands need a restart."""
        self.configuration = configuration
        if not configuration.security.privilege_mode:
            return
        for milter in configuration.enabled_milters:
            if milter.command and self.commands.get(milter.name) != [
                    command_line(milter), milter.user_name]:
                log.warn("[reload][restart-needed] milter {name}: the process launcher runs "
                         "the commands of the configuration milter-manager started with; "
                         "restart it to run {command!r}", name=milter.name,
                         command=command_line(milter))

    def can_launch(self, milter, failure):
        """Whether starting milter's command may cure failure (a failed connect)."""
        if self.connection is None or not milter.command:
            return False
        if not self.configuration.security.privilege_mode:
            return False
        value = failure.value
        return isinstance(value, MilterConnectError) and value.os_error in _CURABLE

    def connect_after_launch(self, milter, failure, attempt):
        """Start milter's command (unless one start is under way) and retry attempt.

        failure: the connect that failed; attempt() connects and negotiates
        again. Fires as attempt does once the child listens, or with a
        LaunchError naming the command and why it did not help. After a
        failed start, sessions fail at once until the next start is due.
        """
        now = self.clock.seconds()
        launch = self._launches.get(milter.name)
        interval = self.configuration.manager.down_retry_interval
        if launch is not None and launch.cause is not None:
            if now < launch.retry_at:
                return defer.fail(LaunchError(failure.value, (
                    f"the start of {launch.what} {now - launch.asked:.0f} s ago did not help; "
                    f"the next one in {launch.retry_at - now:.0f} s")))
            interval = min(launch.interval * 2, self.configuration.manager.down_retry_limit)
            launch = None
        if launch is None:
            launch = self._launches[milter.name] = _Launch(self, milter, interval, now)
            self._next_id += 1
            self._requests[self._next_id] = launch
            self.connection.send({"id": self._next_id, "launch": milter.name,
                                  "command": launch.command, "user": launch.user})
        return launch.wait(failure.value, attempt, now + milter.connection_timeout)

    def received(self, message):
        """A line from the launcher process."""
        if "exited" in message:
            for launch in list(self._launches.values()):
                if launch.pid == message["exited"]:
                    launch.exited(message.get("status"))
            return
        launch = self._requests.pop(message.get("id"), None)
        if launch is None:
            log.error("[launcher][error] {message}", message=message.get("error", message))
        elif "pid" in message:
            launch.started(message["pid"], earlier=False)
        elif "running" in message:
            launch.started(message["running"], earlier=True)
        else:
            launch.failed(f"cannot start {launch.what}: {message.get('error')}")

    def reached(self, launch):
        """A session connected after launch: the next failure starts afresh."""
        if self._launches.get(launch.name) is launch:
            del self._launches[launch.name]

    def lost(self):
        """The launcher process ended: no more starts; sessions waiting give up."""
        self.connection = None
        if not self.stopping:
            log.error("[launcher][error] the process launcher (pid {pid}) ended: child "
                      "milters are no longer started when they cannot be reached", pid=self.pid)
        for launch in list(self._launches.values()):
            launch.failed(f"cannot start {launch.what}: the process launcher ended")
        self._requests.clear()
        self._reap()

    def _reap(self, tries=50):
        """Collect the launcher's exit status, which may come a moment after its end of file."""
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0 and tries:
            self.clock.callLater(0.1, self._reap, tries - 1)


class _Launch:
    """One start of a milter's command and the sessions waiting for the child to listen."""

    def __init__(self, launcher, milter, interval, now):
        self.launcher = launcher
        self.clock = launcher.clock
        self.name = milter.name
        self.command = command_line(milter)
        self.user = milter.user_name
        self.what = f'"{self.command}" as {self.user or "root"}'
        self.interval = interval  # how long after a failure the next start may go
        self.asked = now
        self.pid = None
        self.earlier = False  # the launcher said an earlier start of it still runs
        self.status = None  # its exit status, once it exited
        self.cause = None  # why it did not help, once it did not
        self.retry_at = None
        self.waiters = []
        wait = min(STARTUP_WAIT, milter.connection_timeout)
        self._timer = self.clock.callLater(wait, self._too_late, wait)

    def wait(self, first, attempt, deadline):
        waiter = _Waiter(self, first, attempt, min(deadline, self._timer.getTime()))
        self.waiters.append(waiter)
        waiter.schedule()
        return waiter.deferred

    def started(self, pid, earlier):
        self.pid, self.earlier = pid, earlier

    def exited(self, status):
        self.status = status
        if status != 0:
            self.failed(f"started {self.what} (pid {self.pid}): it {status_text(status)}")

    def _too_late(self, wait):
        self._timer = None
        if self.pid is None:
            state = "the launcher did not answer"
        elif self.status is None:
            state = f"{self.what} still runs as pid {self.pid}"
        else:
            state = f"{self.what} (pid {self.pid}) {status_text(self.status)}"
        self.failed(f"nothing listens there {wait:g} s after the start: {state}")

    def failed(self, cause):
        if self.cause is not None:
            return
        self.cause = cause
        self.retry_at = self.clock.seconds() + self.interval
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for waiter in self.waiters or ():
            waiter.launch_failed()
        self.waiters = []

    def reached(self, waiter):
        if self.waiters is not None and self.cause is None:
            log.info("[launcher][started] {name}: {what}, pid {pid}{earlier}: reachable "
                     "after {seconds:.2f} s", name=self.name, what=self.what, pid=self.pid,
                     earlier=" (started earlier)" if self.earlier else "",
                     seconds=self.clock.seconds() - self.asked)
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            self.waiters = None
            self.launcher.reached(self)

    def forget(self, waiter):
        if self.waiters and waiter in self.waiters:
            self.waiters.remove(waiter)


class _Waiter:
    """One session retrying its connection while the child starts."""

    def __init__(self, launch, first, attempt, deadline):
        self.launch = launch
        self.clock = launch.clock
        self.first = first
        self.attempt = attempt
        self.deadline = deadline
        self.delay = FIRST_RETRY
        self.timer = None
        self.pending = None  # the attempt under way
        self.cancelled = False
        self.deferred = defer.Deferred(self._cancel)

    def schedule(self):
        delay = max(0.0, min(self.delay, self.deadline - self.clock.seconds()))
        self.delay = min(self.delay * 2, MAX_RETRY)
        self.timer = self.clock.callLater(delay, self._try)

    def _try(self):
        self.timer = None
        self.pending = self.attempt()
        self.pending.addCallbacks(self._connected, self._not_yet)

    def _connected(self, result):
        self.pending = None
        self.launch.reached(self)
        self.deferred.callback(result)

    def _not_yet(self, failure):
        self.pending = None
        if self.cancelled:
            return None
        if not failure.check(MilterConnectError):
            # Something listens now; what went wrong after connecting is the child's own.
            self.launch.reached(self)
            self.deferred.errback(failure)
        elif self.launch.cause is not None:
            self._give_up(self.launch.cause)
        elif self.clock.seconds() >= self.deadline:
            self.launch.forget(self)
            self._give_up(f"started {self.launch.what}: nothing listens there within its "
                          "connection_timeout")
        else:
            self.schedule()
        return None

    def launch_failed(self):
        """The start did not help: give up now, unless an attempt is under way (it will)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self._give_up(self.launch.cause)

    def _give_up(self, cause):
        self.deferred.errback(LaunchError(self.first, cause))

    def _cancel(self, deferred):
        self.cancelled = True
        self.launch.forget(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.pending is not None:
            self.pending.cancel()
