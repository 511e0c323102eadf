"""A throwaway redis-server (and optionally a Sentinel watching it) on loopback.

Everything lives under tmpdir; nothing is persisted (--save "" --appendonly
no); it listens on 127.0.0.1 only, on a free port, and is stopped by PID::

    server = RedisServer(self.mktemp())
    self.addCleanup(server.stop)
    server.start()

stop() and start() again keep the port (the data is gone: no persistence).
Sentinel runs `redis-server CONFIG --sentinel` (Debian's redis-sentinel is
the same binary) monitoring one RedisServer under a master name.
"""

import os
import shutil
import subprocess

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
    """A private redis-server on 127.0.0.1 (see the module's docstring)."""

    @property
    def url(self):
        return f"redis://{HOST}:{self.port}/0"

    def command(self):
        return [REDIS_SERVER, "--bind", HOST, "--port", str(self.port), "--save", "",
                "--appendonly", "no", "--dir", self.tmpdir, "--daemonize", "no",
                "--protected-mode", "yes", "--unixsocket", "", "--loglevel", "notice"]

    def client(self):
        """A redis-py client on it, closed by the caller."""
        import redis

        return redis.Redis(host=HOST, port=self.port, socket_timeout=5)


class Sentinel(_Process):
    """A redis-server --sentinel on 127.0.0.1 monitoring master (a RedisServer) as name."""

    name = "redis-sentinel"

    def __init__(self, tmpdir, master, name="mymaster"):
        super().__init__(tmpdir)
        self.master = master
        self.master_name = name
        self.config_path = os.path.join(self.tmpdir, "sentinel.conf")

    @property
    def url(self):
        return f"sentinel://{HOST}:{self.port}/{self.master_name}/0"

    def command(self):
        # Sentinel rewrites its configuration file: it must be its own and writable.
        with open(self.config_path, "w") as config:
            config.write(f"bind {HOST}\nport {self.port}\ndir {self.tmpdir}\n"
                         f"sentinel monitor {self.master_name} {HOST} {self.master.port} 1\n"
                         f"sentinel down-after-milliseconds {self.master_name} 1000\n")
        return [REDIS_SERVER, self.config_path, "--sentinel"]
