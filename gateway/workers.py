"""
Using every core: one master process, N worker processes, one socket.

This is the pattern Twisted documents for multi-core servers
(U{https://docs.twisted.org/en/stable/core/howto/endpoints.html} and
C{IReactorSocket.adoptStreamPort}): the master opens the listening socket
(C{tcp:...}, or the C{systemd:...} socket it inherited), never accepts on
it, and starts N workers with C{reactor.spawnProcess}, passing the socket
as file descriptor 3. Each worker is the gateway itself
(C{python -m twisted gateway --config FILE --worker-fd 3}) and adopts the
socket with L{AdoptedStreamServerEndpoint}; the kernel hands each new
connection to one of the workers waiting in C{accept}.

The master:

  - serves the admin listener (C{/health}, C{/workers}, and C{/metrics}
    merged across workers); the workers have none;
  - replaces a worker that dies, at once the first times and then with a
    growing delay (a worker that crashes on start does not spin);
  - forwards C{SIGHUP} to the workers (each also polls the config file);
  - on C{SIGTERM}, closes its socket, sends C{SIGTERM} to the workers,
    which drain (L{gateway.drain}), and waits for them, killing those
    still alive C{drain_timeout} + 10 seconds later;
  - sends the systemd readiness notifications; workers do not.

Workers exit when the master is gone (they check their parent every
second).

Metrics: the master runs the workers in prometheus-client's multiprocess
mode: C{PROMETHEUS_MULTIPROC_DIR} is set to a fresh directory (or the one
the master was given), each worker's metrics are written there, and the
master's C{/metrics} merges them with C{MultiProcessCollector}. Gauges must
say how to merge (C{multiprocess_mode}); see the prometheus-client docs.
The backend gauges, which one process reads from its state at each scrape,
are written by each worker every second (L{BackendGauges}).

Per-process state stays per worker: in-memory rate-limit buckets, the
in-memory response cache, health and breaker state. With N workers a
memory rate limit of R lets through up to N x R; use the Redis store to
share limits and cache entries across workers.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import sys
import tempfile
from typing import Any, Callable, Optional

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from gateway.config import Extension, Where, register

_log = Logger()


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def parse_workers(value: Any) -> int:
    """
    C{value} (a positive integer, or C{"auto"} for one per CPU) as a number.

    @raise ValueError: any other value.
    """
    if value == "auto":
        return cpu_count()
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a positive integer or auto, got {value!r}")
    return value


def _workers_key(where: Where, value: Any, context) -> Any:
    try:
        parse_workers(value)
    except ValueError as e:
        raise where.error(str(e)) from None
    return value  # "auto" is resolved at start-up


register("top", Extension("workers", _workers_key, 1))

#: Restarts of one worker within this many seconds count as a crash loop.
CRASH_WINDOW = 10.0
#: Restarts in the window after which restarts are delayed.
CRASH_RESTARTS = 3
#: The longest delay before restarting a crash-looping worker, seconds.
MAX_RESTART_DELAY = 30.0

#: Environment variables a worker must not inherit from the master.
_MASTER_ONLY = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC")


def _option(argv: list[str], name: str, short: Optional[str] = None) -> Optional[str]:
    """
    The value of option C{--name} (or C{-short}) in C{argv}, in any of the
    forms C{--name=V}, C{--name V}, C{-sV}, C{-s V}; L{None} if absent.
    """
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if (arg == name or arg == short) and i + 1 < len(argv):
            return argv[i + 1]
        if short is not None and arg.startswith(short) and len(arg) > len(short):
            return arg[len(short):]
    return None


def log_format_argument(argv: list[str]) -> str:
    """The C{--log-format} the master was run with (C{text} if none)."""
    return _option(argv, "--log-format") or "text"


def reactor_arguments(argv: list[str]) -> list[str]:
    """
    The C{--reactor} the master was run with, as arguments for a worker:
    C{[]} if none (each then installs the gateway's own,
    L{gateway.reactor.install_unless_chosen}).
    """
    name = _option(argv, "--reactor", "-r")
    return [] if name is None else ["--reactor", name]


class _MasterSocket(protocol.Factory):
    """The master's listening socket's factory: it never accepts."""

    noisy = False
    protocol = protocol.Protocol


class _Worker(protocol.ProcessProtocol):
    def __init__(self, supervisor: "WorkerSupervisor", index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid: Optional[int] = None
        self.ended: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.closeStdin()

    def processEnded(self, reason: Failure) -> None:
        self.supervisor._ended(self, reason)
        self.ended.callback(None)


class WorkerSupervisor(Service):
    """
    Opens the listening socket and keeps C{count} workers serving it.

    @param reactor: C{IReactorProcess}, C{IReactorTime}.
    @param endpoint: the listener's server endpoint: a TCP one, or the
        adopted socket of C{systemd:...}.
    @param count: the number of workers.
    @param worker_args: C{worker_args(index)} -> the worker's argv after
        the Python executable.
    @param drain_timeout: seconds the workers get to drain on stop.
    """

    name = "workers"

    def __init__(
        self,
        reactor,
        endpoint,
        count: int,
        worker_args: Callable[[int], list[str]],
        drain_timeout: float,
        executable: str = sys.executable,
    ) -> None:
        self._reactor = reactor
        self._endpoint = endpoint
        self.count = count
        self._worker_args = worker_args
        self._drain_timeout = drain_timeout
        self._executable = executable
        self._port = None
        self._fd: Optional[int] = None
        self.workers: dict[int, _Worker] = {}
        self.restarts: dict[int, list[float]] = {}
        self.restarts_total = 0
        self._pending: dict[int, Any] = {}
        self.metrics_dir: Optional[str] = None
        self._own_metrics_dir = False
        #: Fires once the socket listens and the workers are started.
        self.ready: Deferred = Deferred()

    # -- start ---------------------------------------------------------------

    def privilegedStartService(self) -> None:
        # Bind before twistd drops privileges (a port below 1024).
        super().privilegedStartService()
        self._setup_metrics_dir()
        d = self._endpoint.listen(_MasterSocket())
        failures: list = []
        d.addCallbacks(self._listening, failures.append)
        if failures:  # fail the start-up, as twistd's listeners do
            failures[0].raiseException()

    def startService(self) -> None:
        super().startService()
        if self._port is None:
            self.privilegedStartService()
        for index in range(self.count):
            self._spawn(index)
        self.ready.callback(self._port)

    def _listening(self, port) -> None:
        # The master never accepts: the workers do.
        port.stopReading()
        self._port = port
        self._fd = port.fileno()
        _log.info(
            "master listening on {address}, starting {count} workers",
            address=str(port.getHost()),
            count=self.count,
        )

    def _setup_metrics_dir(self) -> None:
        path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if path:
            os.makedirs(path, exist_ok=True)
            for stale in glob.glob(os.path.join(path, "*.db")):
                os.remove(stale)  # from an earlier run: their pids are gone
        else:
            path = tempfile.mkdtemp(prefix="txgateway-metrics-")
            self._own_metrics_dir = True
        self.metrics_dir = path

    def _spawn(self, index: int) -> None:
        self._pending.pop(index, None)
        if not self.running:
            return
        env = {k: v for k, v in os.environ.items() if k not in _MASTER_ONLY}
        env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        env["TXGATEWAY_WORKER"] = str(index)
        env["TXGATEWAY_MASTER_PID"] = str(os.getpid())
        # The socket's address family, so that the worker need not make a
        # socket object of the shared descriptor to learn it (adopted_endpoint).
        env[FAMILY_VARIABLE] = str(int(self._port.socket.family))
        worker = _Worker(self, index)
        args = [self._executable, *self._worker_args(index)]
        self._reactor.spawnProcess(
            worker,
            self._executable,
            args,
            env=env,
            childFDs={0: "w", 1: 1, 2: 2, 3: self._fd},
        )
        self.workers[index] = worker
        _log.info("worker {index} started, pid {pid}", index=index, pid=worker.pid)

    # -- supervision -------------------------------------------------------------

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.metrics_dir is not None and worker.pid is not None:
            try:
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(worker.pid, self.metrics_dir)
            except Exception:
                _log.failure("cleaning up the metrics of worker {pid} failed", pid=worker.pid)
        status = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        if not self.running:
            _log.info(
                "worker {index} (pid {pid}) exited: code {code}, signal {signal}",
                index=worker.index, pid=worker.pid, code=status, signal=sig,
            )
            return
        now = self._reactor.seconds()
        recent = [t for t in self.restarts.get(worker.index, []) if now - t < CRASH_WINDOW]
        recent.append(now)
        self.restarts[worker.index] = recent
        self.restarts_total += 1
        delay = 0.0
        if len(recent) > CRASH_RESTARTS:
            delay = min(MAX_RESTART_DELAY, 0.5 * 2 ** (len(recent) - CRASH_RESTARTS - 1))
        _log.error(
            "worker {index} (pid {pid}) died: code {code}, signal {signal}; "
            "restarting in {delay}s",
            index=worker.index, pid=worker.pid, code=status, signal=sig, delay=delay,
        )
        self._pending[worker.index] = self._reactor.callLater(delay, self._spawn, worker.index)

    def signal_workers(self, name: str = "HUP") -> None:
        """Send signal C{name} (C{"HUP"}, C{"TERM"}, ...) to every worker."""
        for worker in list(self.workers.values()):
            try:
                worker.transport.signalProcess(name)
            except Exception:  # exited meanwhile
                pass

    def describe(self) -> list[dict]:
        """The workers, for the admin C{/workers} endpoint."""
        return [
            {
                "index": index,
                "pid": self.workers[index].pid if index in self.workers else None,
                "restarts": len(self.restarts.get(index, [])),
            }
            for index in range(self.count)
        ]

    # -- stop ----------------------------------------------------------------

    def stopService(self) -> Deferred:
        super().stopService()
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        closing = self._port.stopListening() if self._port is not None else succeed(None)
        workers = list(self.workers.values())
        _log.info("stopping {count} workers", count=len(workers))
        self.signal_workers("TERM")
        kill = self._reactor.callLater(self._drain_timeout + 10, self._kill, workers)
        done = DeferredList([closing] + [w.ended for w in workers])

        def finished(_):
            if kill.active():
                kill.cancel()
            if self._own_metrics_dir and self.metrics_dir:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)

        done.addCallback(finished)
        return done

    def _kill(self, workers) -> None:
        for worker in workers:
            if not worker.ended.called:
                _log.warn("worker {index} did not stop in time: killing it", index=worker.index)
                try:
                    worker.transport.signalProcess("KILL")
                except Exception:
                    pass


class ParentWatch(Service):
    """
    Stops the reactor of a worker whose master has gone (its parent
    process changed).
    """

    def __init__(self, reactor, interval: float = 1.0, parent: Optional[int] = None) -> None:
        self._reactor = reactor
        if parent is None:
            # (the master's pid, from the environment: the master may have
            # died before this worker got here)
            parent = int(os.environ.get("TXGATEWAY_MASTER_PID") or os.getppid())
        self._parent = parent
        self._loop = LoopingCall(self._check)
        self._loop.clock = reactor
        self._interval = interval

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=False).addErrback(
            lambda f: _log.failure("parent watch failed", f)
        )

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def _check(self) -> None:
        if os.getppid() != self._parent:
            _log.error("the master process is gone: stopping this worker")
            self._loop.stop()
            self._reactor.stop()


#: The environment variable in which the master tells its workers the
#: listening socket's address family (a C{socket.AF_*} number).
FAMILY_VARIABLE = "TXGATEWAY_LISTEN_FAMILY"


def adopted_endpoint(reactor, fd: int):
    """
    The server endpoint for the listening socket inherited as C{fd}.

    The socket's family comes from the master (L{FAMILY_VARIABLE}). Making
    a socket object of C{fd} to ask it would, on PyPy, switch the socket
    to blocking mode: PyPy's C{socket.socket(fileno=...)} (and
    C{socket.fromfd}) clears C{O_NONBLOCK}, a flag of the open file
    description that the master and every worker share. A worker already
    serving then blocks in C{accept()} inside its reactor until another
    client connects, while the connections it accepted wait: the
    15-second stalls seen when a PyPy worker started beside another.
    Without the variable (a worker started by hand) the family is probed
    and the flag put back at once.
    """
    from twisted.internet.endpoints import AdoptedStreamServerEndpoint

    family = os.environ.get(FAMILY_VARIABLE)
    if family:
        return AdoptedStreamServerEndpoint(reactor, fd, socket.AddressFamily(int(family)))
    probe = socket.socket(fileno=fd)
    family = probe.family
    probe.setblocking(False)
    probe.detach()
    return AdoptedStreamServerEndpoint(reactor, fd, family)


def count_requests(gateway, index: int) -> None:
    """
    Count the requests this worker serves in
    C{txgateway_worker_requests_total{worker="N"}} (merged by the master).
    """
    from prometheus_client import Counter

    counter = Counter(
        "txgateway_worker_requests",
        "Requests served, by worker process.",
        ["worker"],
        registry=None,  # written to PROMETHEUS_MULTIPROC_DIR, read by the master
    ).labels(str(index))
    gateway.request_observers.append(lambda context: counter.inc())


#: Seconds between two writes of a worker's backend gauges (L{BackendGauges}).
BACKEND_GAUGE_INTERVAL = 1.0


class BackendGauges(TimerService):
    """
    A worker's backend gauges, for the master's merged C{/metrics}.

    In one process, the L{gateway.metrics.BACKEND_GAUGES} are read from
    the gateway's state at each scrape (L{gateway.metrics.backend_states});
    the master has no such state, its workers do. So every C{interval}
    seconds each worker writes its view into multiprocess gauges
    (prometheus-client's files in C{PROMETHEUS_MULTIPROC_DIR}), merged by
    the master as each gauge's C{multiprocess_mode} says:

      - C{gateway_backend_healthy}: C{livemin}, 0 when any live worker has
        the backend down (unhealthy or ejected);
      - C{gateway_circuit_state}: C{livemax}, the most open breaker of the
        live workers (0 closed, 1 open, 2 half-open);
      - C{gateway_active_connections}: C{livesum}, the requests in flight
        from all live workers.

    Values are up to C{interval} seconds old; a backend that left the
    config leaves the gauges at the next write.

    @param gateway: the worker's L{gateway.state.Gateway}.
    @param reactor: C{IReactorTime}.
    @param interval: seconds between writes.
    """

    _MODES = ("livemin", "livemax", "livesum")  # in the order of BACKEND_GAUGES

    def __init__(self, gateway, reactor, interval: float = BACKEND_GAUGE_INTERVAL) -> None:
        from prometheus_client import Gauge

        from gateway.metrics import BACKEND_GAUGES

        super().__init__(interval, self.write)
        self.clock = reactor
        self.setName("backend-gauges")
        self._gateway = gateway
        self.healthy, self.circuit, self.active = self._gauges = tuple(
            Gauge(name, text, ["service", "backend"], registry=None, multiprocess_mode=mode)
            for (name, text), mode in zip(BACKEND_GAUGES, self._MODES)
        )
        self._written: set = set()

    def write(self) -> None:
        """Write every backend's current state (and drop backends gone)."""
        from gateway.metrics import backend_gauge_values, backend_states

        seen = set()
        for state in backend_states(self._gateway):
            key = (state["service"], state["backend"])
            seen.add(key)
            for gauge, value in zip(self._gauges, backend_gauge_values(state)):
                gauge.labels(*key).set(value)
        for key in self._written - seen:
            for gauge in self._gauges:
                try:
                    gauge.remove(*key)
                except KeyError:
                    pass
        self._written = seen


# --- the master's admin endpoints -------------------------------------------------


class WorkersResource(Resource):
    """C{GET /workers}: the workers' indexes, pids and recent restarts."""

    isLeaf = True

    def __init__(self, supervisor: WorkerSupervisor) -> None:
        super().__init__()
        self._supervisor = supervisor

    def render_GET(self, request) -> bytes:
        from gateway.admin import json_response

        return json_response(
            request,
            200,
            {
                "workers": self._supervisor.describe(),
                "restarts_total": self._supervisor.restarts_total,
            },
        )


class _SupervisorCollector:
    def __init__(self, supervisor: WorkerSupervisor) -> None:
        self._supervisor = supervisor

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily(
            "txgateway_workers", "Worker processes alive.", value=len(self._supervisor.workers)
        )
        yield CounterMetricFamily(
            "txgateway_worker_restarts",
            "Worker processes replaced after dying.",
            value=self._supervisor.restarts_total,
        )


class MergedMetricsResource(Resource):
    """
    C{GET /metrics} on the master: every worker's metrics, merged by
    prometheus-client's C{MultiProcessCollector}, and the master's worker
    counts. (The files are small and read on the reactor thread.)
    """

    isLeaf = True

    def __init__(self, supervisor: WorkerSupervisor) -> None:
        super().__init__()
        self._supervisor = supervisor
        self._registry = None

    def render_GET(self, request) -> bytes:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        if self._registry is None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self._supervisor.metrics_dir)
            registry.register(_SupervisorCollector(self._supervisor))
            self._registry = registry
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._registry)


def worker_command(options, index: int, argv: Optional[list[str]] = None) -> list[str]:
    """
    The argv (after the Python executable) of worker C{index}: the
    gateway under C{twist}, with the master's log format and reactor.
    """
    argv = sys.argv if argv is None else argv
    args = [
        "-m", "twisted",
        "--log-format", log_format_argument(argv),
        *reactor_arguments(argv),
        "gateway",
        "--config", os.path.abspath(options["config"]),
        "--worker-fd", "3",
        "--worker-index", str(index),
    ]
    return args
