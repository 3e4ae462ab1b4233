"""
Real processes for end-to-end tests: demo backends and twistd gateways on
127.0.0.1, ephemeral ports, bounded waits, stopped by PID.
"""

from __future__ import annotations

import glob
import http.client
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
#: The longest any start-up wait may take, in seconds.
START_TIMEOUT = 20.0


def env() -> dict:
    """The environment for child processes: this checkout's code first."""
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e["PYTHONUNBUFFERED"] = "1"
    # PyPy's collector as etc/txgateway.service sets it (CPython ignores
    # these), unless the environment says otherwise: PyPy's own default
    # nursery follows the CPU's cache, 1 MB on one machine and 130 MB on
    # another, and the tests' memory bounds would follow it.  Its major
    # collections start at 64 MB instead of 8 nurseries (256 MB), so that
    # those bounds measure what a gateway keeps, not the collector's floor.
    e.setdefault("PYPY_GC_NURSERY", "32MB")
    e.setdefault("PYPY_GC_INCREMENT_STEP", "2MB")
    e.setdefault("PYPY_GC_MIN", "64MB")
    return e


def wait_for(predicate, timeout: float = START_TIMEOUT, interval: float = 0.02, what: str = "condition"):
    """Poll C{predicate} until it returns a true value; bounded by C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


#: Whether the tests (and the gateways they start) run on PyPy.
ON_PYPY = platform.python_implementation() == "PyPy"


def rss_bound_mib(mib: float) -> float:
    """
    A bound on a gateway's RSS growth, in MiB, for this interpreter: C{mib}
    on CPython, five times that on PyPy. PyPy's garbage collector lets the
    heap grow to about 1.8 times its size after the last major collection
    (C{PYPY_GC_MAJOR_COLLECT}) before collecting, and its JIT adds machine
    code as it warms up: 500 KiB responses through a 4 MiB cache grew a
    PyPy gateway by 90 MiB after 75 MiB had passed, 160 after 300, and
    levelled off near 200 after 900 (CPython: under 48 throughout). A test
    using it must pass enough data that keeping it all would still exceed
    the bound.
    """
    return mib * (5 if ON_PYPY else 1)


def rss_kib(pid: int) -> int:
    """Resident set size of process C{pid} in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Process:
    """A child process, stopped by PID."""

    def __init__(self, popen: subprocess.Popen, log_path: str) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.log_path = log_path

    def log(self) -> str:
        """
        The whole log, oldest first: twistd's log file rotates every 1 MB
        (to C{.1}, C{.2}, ...; the highest is the oldest), which a busy
        gateway's access events reach within seconds.
        """
        rotated = sorted(
            (p for p in glob.glob(glob.escape(self.log_path) + ".*") if p.rsplit(".", 1)[1].isdigit()),
            key=lambda p: int(p.rsplit(".", 1)[1]),
            reverse=True,
        )
        text = []
        for path in rotated + [self.log_path]:
            with open(path, errors="replace") as f:
                text.append(f.read())
        return "".join(text)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> Optional[int]:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


class Backend(Process):
    """A demo backend: C{python -m gateway.demo_backend}."""

    def __init__(self, name: str, port: int = 0) -> None:
        fd, log_path = tempfile.mkstemp(prefix=f"backend-{name}-", suffix=".log")
        os.close(fd)
        popen = subprocess.Popen(
            [sys.executable, "-m", "gateway.demo_backend", "--port", str(port), "--name", name],
            stdout=subprocess.PIPE,
            stderr=open(log_path, "w"),
            env=env(),
            text=True,
        )
        super().__init__(popen, log_path)
        self.name = name
        line = popen.stdout.readline()  # blocks until the port is bound
        match = re.match(r"listening on (\d+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"backend {name} did not start: {line!r} {self.log()}")
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict:
        return json.loads(get(self.port, "/_stats").body)


#: Run as C{python -c _ACTIVATE N FD... PROGRAM ARGS...}: put the N
#: descriptors at 3, 4, ... (inheritable), set C{LISTEN_PID} to this
#: process's pid and exec the program, which keeps that pid: as systemd
#: starts a socket-activated service.
_ACTIVATE = """
import fcntl, os, sys
count = int(sys.argv[1])
fds = [int(fd) for fd in sys.argv[2:2 + count]]
program = sys.argv[2 + count:]
# first above every target, so that placing one clobbers no other
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3 + count + 64) for fd in fds]
for fd in fds:
    if fd >= 3 + count:
        os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(program[0], program)
"""


class Gateway(Process):
    """
    A real C{twistd -n gateway} process on ephemeral ports.

    @param config_text: the YAML config, written to a temporary file
        (L{write_config} replaces it, as an operator would).
    @param extra_args: more arguments for the gateway plugin.
    @param env_extra: more environment variables.
    @param inherit: sockets to pass as systemd passes a socket unit's
        (descriptors 3, 4, ... with C{LISTEN_FDS}, C{LISTEN_FDNAMES} and
        C{LISTEN_PID}), for C{--listen systemd:...}.
    """

    def __init__(self, config_text: str, extra_args=(), env_extra=None, inherit=()) -> None:
        fd, self.config_path = tempfile.mkstemp(prefix="gateway-", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            f.write(config_text)
        fd, log_path = tempfile.mkstemp(prefix="gateway-", suffix=".log")
        os.close(fd)
        # Worker processes write their logs to the master's stdout.
        self.stdout_path = log_path + ".out"
        self._stdout = open(self.stdout_path, "wb")
        argv = [TWISTD, "-n", "--pidfile=", "--logfile", log_path, "gateway",
                "--config", self.config_path, *extra_args]
        activation: dict = {}
        passed = [sock.fileno() for sock in inherit]
        if passed:
            argv = [sys.executable, "-c", _ACTIVATE, str(len(passed)), *map(str, passed), *argv]
            activation = {"LISTEN_FDS": str(len(passed)), "LISTEN_FDNAMES": ":".join(["http"] * len(passed))}
        popen = subprocess.Popen(
            argv,
            stdout=self._stdout,
            stderr=subprocess.STDOUT,
            env={**env(), **(env_extra or {}), **activation},
            cwd=ROOT,
            pass_fds=passed,
        )
        super().__init__(popen, log_path)

        def started():
            if popen.poll() is not None:
                raise RuntimeError(f"gateway exited with {popen.returncode}:\n{self.log()}")
            return re.search(r"GatewaySite(?: \(TLS\))? starting on (\d+)", self.log())

        try:
            self.port = int(wait_for(started, what="the gateway's listener").group(1))
        except BaseException:
            super().stop(signal.SIGKILL)  # never leave a gateway behind
            raise
        admin = re.search(r"AdminSite starting on (\d+)", self.log())
        self.admin_port = int(admin.group(1)) if admin else None

    def log(self) -> str:
        text = super().log()
        try:
            with open(self.stdout_path, errors="replace") as f:
                text += f.read()
        except OSError:
            pass
        return text

    def write_config(self, config_text: str) -> None:
        """Replace the config file atomically (write, then rename)."""
        tmp = self.config_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(config_text)
        os.replace(tmp, self.config_path)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> Optional[int]:
        code = super().stop(sig, timeout)
        self._stdout.close()
        for path in (self.config_path,):
            try:
                os.unlink(path)
            except OSError:
                pass
        return code


class Response:
    def __init__(self, status: int, headers: list, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> Optional[str]:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self):
        return json.loads(self.body)


def request(port: int, method: str, path: str, headers=None, body: Optional[bytes] = None,
            timeout: float = 10.0, chunked: bool = False) -> Response:
    """One HTTP/1.1 request to 127.0.0.1:C{port}, on a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        r = conn.getresponse()
        data = r.read()
        return Response(r.status, r.getheaders(), data)
    finally:
        conn.close()


def get(port: int, path: str, headers=None, timeout: float = 10.0) -> Response:
    return request(port, "GET", path, headers=headers, timeout=timeout)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def redis_key_prefix(scope: str):
    """
    A generator for a pytest fixture: yields a Redis key prefix unique to
    this run (C{txgateway-test:SCOPE:...:}), then deletes every key under it
    on 127.0.0.1:6379, so tests that share the Redis never collide.
    """
    import uuid

    import redis

    prefix = f"txgateway-test:{scope}{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis(host="127.0.0.1", port=6379)
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


class BodyRecorder:
    """A response-body protocol that keeps what it is given."""

    def __init__(self) -> None:
        self.data: list = []
        self.reason = None
        self.transport = None

    def makeConnection(self, transport) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason) -> None:
        self.reason = reason
