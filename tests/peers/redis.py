"""A throwaway redis-server (and optionally a Sentinel watching it) on loopback.

Everything lives under tmpdir; nothing is persisted (--save "" --appendonly
no); it listens on 127.0.0.1 only, on a free port, and is stopped by PID::

    server = RedisServer(self.mktemp())
    self.addCleanup(server.stop)
    server.start()

stop() and start() again keep the port (the data is gone: no persistence);
kill() is a crash (SIGKILL). Sentinel runs `redis-server CONFIG --sentinel`
(Debian's redis-sentinel is the same binary) monitoring one RedisServer under
a master name. ReplicatedRedis is a master, a replica of it and a Sentinel
with short timings, for failovers.
"""

import os
import shutil
import signal
import subprocess
import time

from .fixtures import HOST, free_port, stop_pid, wait_for_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def available():
    """Is redis-server installed?"""
    return os.access(REDIS_SERVER, os.X_OK)


class _Process:
    name = "redis-server"

    def __init__(self, tmpdir):
        self.tmpdir = os.path.abspath(tmpdir)
        os.makedirs(self.tmpdir, exist_ok=True)
        self.port = free_port()
        self.log_path = os.path.join(self.tmpdir, f"{self.name}.log")
        self.process = None

    def command(self):
        raise NotImplementedError

    def start(self, timeout=30):
        """Start it on its port and wait until it listens."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"{self.name} is already running")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), cwd=self.tmpdir,
                                            stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port(self.port, timeout, self.process)
        except (RuntimeError, TimeoutError) as error:
            self.stop()
            raise RuntimeError(f"{self.name}: {error}; its log:\n{self.log()[-4000:]}") from None

    def stop(self):
        """SIGTERM it by PID and wait for it to exit. Safe to repeat."""
        if self.process is not None:
            if self.process.poll() is None:
                stop_pid(self.process.pid)
            self.process.wait()

    def kill(self):
        """SIGKILL it by PID (a crash: no goodbye to its clients) and reap it."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def restart(self, timeout=30):
        self.stop()
        self.start(timeout)

    def log(self):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                return log.read()
        except FileNotFoundError:
            return ""


class RedisServer(_Process):
    """A private redis-server on 127.0.0.1 (see the module's docstring).

    replica_of (a RedisServer) starts it as that server's read-only replica.
    """

    def __init__(self, tmpdir, replica_of=None):
        super().__init__(tmpdir)
        self.replica_of = replica_of

    @property
    def url(self):
        return f"redis://{HOST}:{self.port}/0"

    def command(self):
        return [REDIS_SERVER, "--bind", HOST, "--port", str(self.port), "--save", "",
                "--appendonly", "no", "--dir", self.tmpdir, "--daemonize", "no",
                "--protected-mode", "yes", "--unixsocket", "", "--loglevel", "notice",
                # A replica syncs at once, not after 5 s waiting for others to join.
                "--repl-diskless-sync-delay", "0",
                *(["--replicaof", HOST, str(self.replica_of.port)] if self.replica_of else [])]

    def client(self):
        """A redis-py client on it, closed by the caller."""
        import redis

        return redis.Redis(host=HOST, port=self.port, socket_timeout=5)


class Sentinel(_Process):
    """A redis-server --sentinel on 127.0.0.1 monitoring master (a RedisServer) as name."""

    name = "redis-sentinel"

    def __init__(self, tmpdir, master, name="mymaster", down_after=1000, failover_timeout=None):
        super().__init__(tmpdir)
        self.master = master
        self.master_name = name
        self.down_after = down_after  # milliseconds without an answer: the master is down
        self.failover_timeout = failover_timeout  # milliseconds; None: Sentinel's 3 minutes
        self.config_path = os.path.join(self.tmpdir, "sentinel.conf")

    @property
    def url(self):
        return f"sentinel://{HOST}:{self.port}/{self.master_name}/0"

    def command(self):
        # Sentinel rewrites its configuration file: it must be its own and writable.
        with open(self.config_path, "w") as config:
            config.write(f"bind {HOST}\nport {self.port}\ndir {self.tmpdir}\n"
                         f"sentinel monitor {self.master_name} {HOST} {self.master.port} 1\n"
                         f"sentinel down-after-milliseconds {self.master_name} "
                         f"{self.down_after}\n")
            if self.failover_timeout is not None:
                config.write(f"sentinel failover-timeout {self.master_name} "
                             f"{self.failover_timeout}\n")
        return [REDIS_SERVER, self.config_path, "--sentinel"]

    def client(self):
        """A redis-py client on the Sentinel itself, closed by the caller."""
        import redis

        return redis.Redis(host=HOST, port=self.port, socket_timeout=5, decode_responses=True)

    def master_port(self):
        """The port of the master the Sentinel names now, or None while it names none.

        None also while the master it knows is down or being failed over: what a
        client asking it (redis-py's discover_master) gets then is no master.
        """
        with self.client() as client:
            state = client.execute_command("SENTINEL", "MASTER", self.master_name)
        state = dict(zip(state[::2], state[1::2])) if isinstance(state, list) else state
        flags = state["flags"].split(",")
        if "s_down" in flags or "o_down" in flags or "failover_in_progress" in flags:
            return None
        return int(state["port"])

    def replica_ports(self):
        """Ports of the replicas the Sentinel knows as linked to their master and up."""
        with self.client() as client:
            replicas = client.execute_command("SENTINEL", "REPLICAS", self.master_name)
        ports = []
        for state in replicas:
            state = dict(zip(state[::2], state[1::2])) if isinstance(state, list) else state
            flags = set(state["flags"].split(","))
            if state.get("master-link-status") == "ok" and not {"s_down", "disconnected"} & flags:
                ports.append(int(state["port"]))
        return sorted(ports)


def wait_until(predicate, timeout, what):
    """Poll predicate() every 20 ms until it is true; its value, or TimeoutError naming what."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout} s")
        time.sleep(0.02)


class ReplicatedRedis:
    """A master, one replica of it and one Sentinel (quorum 1), all on 127.0.0.1, for failovers.

    The Sentinel deems a silent master down after down_after ms and fails over
    at once (one Sentinel is its own majority). start() returns once the
    replica is in sync and the Sentinel knows it as a candidate, so that a
    failover can begin at any moment after it; stop() stops all three by PID.
    """

    def __init__(self, tmpdir, down_after=500, failover_timeout=2000):
        self.tmpdir = os.path.abspath(tmpdir)
        self.master = RedisServer(os.path.join(self.tmpdir, "master"))
        self.replica = RedisServer(os.path.join(self.tmpdir, "replica"), replica_of=self.master)
        self.sentinel = Sentinel(os.path.join(self.tmpdir, "sentinel"), self.master,
                                 down_after=down_after, failover_timeout=failover_timeout)

    @property
    def url(self):
        return self.sentinel.url

    def start(self, timeout=30):
        self.master.start(timeout)
        self.replica.start(timeout)
        wait_until(lambda: info(self.replica, "master_link_status") == "up", timeout,
                   "the replica in sync with the master")
        self.sentinel.start(timeout)
        wait_until(lambda: self.sentinel.replica_ports() == [self.replica.port], timeout,
                   "the Sentinel knowing the replica")

    def stop(self):
        for process in (self.sentinel, self.replica, self.master):
            process.stop()

    def replicated(self, timeout=5):
        """Wait until the replica has applied every write made so far on the master.

        By replication offsets: WAIT would only count the writes of the
        connection it is sent on, and this one has made none.
        """
        target = int(info(self.master, "master_repl_offset"))
        wait_until(lambda: int(info(self.replica, "master_repl_offset") or 0) >= target,
                   timeout, f"the replica at the master's replication offset {target}")

    def wait_master(self, server, timeout=15):
        """Wait until the Sentinel names server (a RedisServer) as the master and it is one."""
        wait_until(lambda: self.sentinel.master_port() == server.port
                   and info(server, "role") == "master", timeout,
                   f"the Sentinel naming {server.name} on port {server.port} as the master")


def info(server, field):
    """One field of a RedisServer's INFO replication, as text (None if it does not answer)."""
    import redis

    try:
        with server.client() as client:
            value = client.info("replication").get(field)
    except redis.RedisError:
        return None
    return value.decode() if isinstance(value, bytes) else value
