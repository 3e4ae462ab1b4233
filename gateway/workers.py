"""
Using every core: one master process, N worker processes, one address.

This is the pattern Twisted documents for multi-core servers
(U{https://docs.twisted.org/en/stable/core/howto/endpoints.html} and
C{IReactorSocket.adoptStreamPort}): the master opens the listening socket
(C{tcp:...}, or the C{systemd:...} socket it inherited), never accepts on
it, and starts N workers with C{reactor.spawnProcess}, passing the socket
as file descriptor 3. Each worker is the gateway itself
(C{python -m twisted gateway --config FILE --worker-fd 3}) and adopts the
socket with L{AdoptedStreamServerEndpoint}; the kernel hands each new
connection to one of the workers waiting in C{accept}. For a TCP listener
the master opens one socket per worker instead, all on the listener's
address with C{SO_REUSEPORT}, and the kernel spreads new connections over
them (L{WorkerSupervisor}).

The master:

  - serves the admin listener (C{/health}, C{/workers}, and C{/metrics}
    merged across workers); the workers have none;
  - replaces a worker that dies, at once the first times and then with a
    growing delay (a worker that crashes on start does not spin);
  - forwards C{SIGHUP} to the workers (each also polls the config file);
  - on C{SIGTERM}, closes its sockets, sends C{SIGTERM} to the workers,
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

import errno
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
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
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


def reuse_port_sockets(endpoint, count: int) -> Optional[list]:
    """
    For a TCP endpoint on Linux (3.9 or later): C{count} listening sockets
    bound to its address, in one C{SO_REUSEPORT} group, among which the
    kernel spreads new connections by a hash of their addresses (what
    nginx's C{listen ... reuseport} and Envoy's listeners do). Otherwise
    (an inherited C{systemd:} socket; another system, where
    C{SO_REUSEPORT} does not spread connections), None: the workers share
    one socket.

    Port 0 binds the first socket to a free port and the others to it.
    A process already listening on the address makes this fail, as it
    makes a single listener fail, rather than join the group (any process
    of the same user setting C{SO_REUSEPORT} could).

    @param endpoint: the listener's server endpoint; the interface, port
        and backlog of a C{TCP4ServerEndpoint} or C{TCP6ServerEndpoint}
        are read from it.
    @param count: how many sockets (workers), at least 1.
    @return: C{count} non-blocking listening C{socket.socket}s, or None.
    @raise OSError: if the address cannot be bound (in use, say).
    """
    from twisted.internet.abstract import isIPv6Address
    from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint

    if not sys.platform.startswith("linux") or not isinstance(
        endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)
    ):
        return None
    try:
        interface, port, backlog = endpoint._interface, endpoint._port, endpoint._backlog
    except AttributeError:
        _log.warn("this Twisted's TCP endpoints changed: the workers share one socket")
        return None
    if isinstance(endpoint, TCP6ServerEndpoint) and not interface:
        interface = "::"
    # As Twisted's tcp.Port chooses: by the interface's form.
    family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
    if port:
        # Nothing may listen there yet (bind without SO_REUSEPORT fails
        # on a port that a listener holds, with or without it).
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((interface, port))
        finally:
            probe.close()
    sockets: list = []
    try:
        for _ in range(count):
            sockets.append(reuse_port_socket(family, (interface, port), backlog))
            port = sockets[0].getsockname()[1]
    except OSError as e:
        for sock in sockets:
            sock.close()
        if e.errno in (errno.ENOPROTOOPT, errno.EOPNOTSUPP) and not sockets:
            _log.warn("SO_REUSEPORT is not available ({error}): the workers share one socket", error=e)
            return None
        raise
    return sockets


def reuse_port_socket(family: int, address: tuple, backlog: Optional[int]):
    """
    One non-blocking TCP socket bound to C{address}, with C{SO_REUSEADDR}
    and C{SO_REUSEPORT}, listening unless C{backlog} is None. A socket
    bound but not listening holds the address without taking any of the
    group's connections; C{listen} makes it a member.

    @param family: C{socket.AF_INET} or C{socket.AF_INET6}.
    @param address: C{(host, port)} as C{socket.bind} takes it.
    @param backlog: the length of its queue of connections not yet
        accepted, in connections; None: do not listen yet.
    @return: a C{socket.socket}.
    @raise OSError: if it cannot bind: the address is in use, or, on
        Linux, the group's sockets belong to another user (as they do
        once twistd has dropped its privileges), or the port is below 1024
        without the privilege.
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        if backlog is not None:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _listening(sock) -> bool:
    """Whether C{sock} listens (C{SO_ACCEPTCONN})."""
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def _inherited_descriptors() -> list:
    """
    The descriptors systemd passed this process (C{LISTEN_FDS}), in order.

    Twisted's C{systemd:} endpoint parser reads them once, when
    C{twisted.internet.endpoints} is imported, and removes C{LISTEN_FDS}
    and C{LISTEN_PID} from the environment, so they are asked of that
    parser (a private attribute, the same from Twisted 12 to 26); without
    it, none are found, and L{inherited_reuse_port_group} refuses a
    socket with C{SO_REUSEPORT} rather than guess.
    """
    from twisted.internet import endpoints

    found = getattr(getattr(endpoints, "_SystemdParser", None), "_sddaemon", None)
    return found.inheritedDescriptors() if found is not None else []


def _reuse_port_listener(fd: int) -> Optional[tuple]:
    """
    C{(family, address)} of descriptor C{fd} if it is a listening
    C{SOCK_STREAM} socket with C{SO_REUSEPORT}, else None. The descriptor
    is left open, and blocking or not as it was.
    """
    try:
        blocking = os.get_blocking(fd)
        sock = socket.socket(fileno=fd)
    except OSError:
        return None  # closed, or not a socket
    try:
        if (
            sock.type != socket.SOCK_STREAM
            or not _listening(sock)
            or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        ):
            return None
        return sock.family, sock.getsockname()
    except OSError:
        return None
    finally:
        sock.detach()
        # PyPy's socket(fileno=...) clears O_NONBLOCK (adopted_endpoint),
        # a flag the workers serving the socket share.
        os.set_blocking(fd, blocking)


def inherited_reuse_port_group(endpoint, inherited: Optional[list] = None) -> Optional[list]:
    """
    The listening sockets that systemd passed for the address of an
    inherited C{systemd:} socket, when its socket unit has
    C{ReusePort=yes} and one C{ListenStream=} line per worker for that
    address: systemd binds each with C{SO_REUSEPORT}, the kernel spreads
    new connections over them, and L{WorkerSupervisor} gives each worker
    one (as it does with the sockets it binds itself for C{tcp:},
    L{reuse_port_sockets}).

    Each inherited descriptor is looked at and left as it was (open, and
    blocking or not as it was): those kept are C{SOCK_STREAM} sockets of
    the endpoint's family, listening, with C{SO_REUSEPORT}, bound to the
    endpoint's address.

    @param endpoint: the listener's server endpoint; anything but an
        C{AdoptedStreamServerEndpoint} gives None.
    @param inherited: the inherited descriptors, in systemd's order
        (default: L{_inherited_descriptors}).
    @return: the group's descriptors (C{list} of C{int}, the endpoint's
        among them), in the order systemd passed them; None when the
        endpoint's socket has no C{SO_REUSEPORT} or is alone at its
        address (one shared socket, as before).
    @raise ValueError: the endpoint's socket has C{SO_REUSEPORT} but the
        others cannot be looked at (it is not among C{inherited}), or its
        family is not the endpoint's C{domain}: sharing it could leave
        sockets of its group that nobody serves.
    """
    if not isinstance(endpoint, AdoptedStreamServerEndpoint) or not hasattr(socket, "SO_REUSEPORT"):
        return None
    if inherited is None:
        inherited = _inherited_descriptors()

    own = _reuse_port_listener(endpoint.fileno)
    if own is None:
        return None
    if own[0] != endpoint.addressFamily:
        raise ValueError(
            f"the inherited socket is {own[0].name}, not {socket.AddressFamily(endpoint.addressFamily).name} "
            f"as the systemd: listener's domain says"
        )
    if endpoint.fileno not in inherited:
        raise ValueError(
            f"the inherited socket {endpoint.fileno} has SO_REUSEPORT (ReusePort=yes), but "
            f"the descriptors systemd passed cannot be listed to find the others of its group"
        )
    group = [fd for fd in inherited if fd == endpoint.fileno or _reuse_port_listener(fd) == own]
    return group if len(group) > 1 else None


def check_inherited_group(endpoint, workers: int, inherited: Optional[list] = None) -> Optional[list]:
    """
    Refuse an inherited C{SO_REUSEPORT} group (L{inherited_reuse_port_group})
    of another size than the number of workers: a socket of the group that
    no process accepts from would hold its share of new connections
    forever.

    @param workers: how many processes serve the listener (1 without
        C{--workers}).
    @param inherited: as for L{inherited_reuse_port_group}.
    @return: the group, or None (L{inherited_reuse_port_group}).
    @raise ValueError: with the address, the counts, and the remedy; or
        from L{inherited_reuse_port_group}.
    """
    group = inherited_reuse_port_group(endpoint, inherited)
    if group is not None and len(group) != workers:
        host, port = _reuse_port_listener(group[0])[1][:2]
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise ValueError(
            f"systemd passed {len(group)} listening sockets for {where} "
            f"with SO_REUSEPORT (ReusePort=yes), and the kernel spreads new connections over "
            f"all of them, but {workers} worker(s) would serve them: give the socket unit "
            f"one ListenStream= line for that address per worker, or run {len(group)} workers "
            f"(--workers or workers:)"
        )
    return group


class WorkerSupervisor(Service):
    """
    Opens the listening sockets and keeps C{count} workers serving them.

    For a TCP listener on Linux the master opens one socket per worker,
    in one C{SO_REUSEPORT} group (L{reuse_port_sockets}), and worker I{i}
    serves socket I{i}: the kernel spreads connections over the workers
    by a hash of their addresses. One shared socket, which the worker
    that wakes first drains of every queued connection, gave a client's
    64 new connections all to one worker in some runs.

    When worker I{i} dies, the master binds a new socket to the address
    without listening (it holds the address, and takes no connection),
    then closes the dead worker's socket, which leaves the group (the
    connections queued on it, not yet accepted, are reset): new
    connections go to the live workers. The new socket listens, joining
    the group, when the replacement is started. The dead worker's socket
    is kept instead, its new connections waiting for the replacement,
    when it is the last socket listening (all workers dead: connections
    queue rather than being refused) or when no new socket can be bound
    (once twistd has dropped its privileges, C{--uid}, none can join: the
    group's sockets belong to the user that bound them).

    An inherited C{systemd:} socket is shared by all workers; a worker
    serving a shared socket takes one connection per wake-up
    (L{accept_one_at_a_time}). When systemd passes one socket per worker
    for the address (C{ReusePort=yes} and one C{ListenStream=} line per
    worker: L{inherited_reuse_port_group}), worker I{i} serves socket I{i}
    instead; a dead worker's socket is kept, since systemd holds it too.

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
        #: One socket per worker (L{reuse_port_sockets}), or None; a dead
        #: worker's may be a successor not listening yet (L{_leave_group}).
        self._sockets: Optional[list] = None
        #: Whether L{_sockets} came from systemd (L{inherited_reuse_port_group}).
        self._inherited = False
        self._backlog = 50
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
        group = check_inherited_group(self._endpoint, self.count)
        if group is not None:
            self._sockets = []
            for fd in group:
                sock = socket.socket(fileno=fd)
                sock.setblocking(False)  # (PyPy's socket(fileno=...) cleared it)
                self._sockets.append(sock)
            self._inherited = True
            _log.info(
                "master serving {address} with the {count} sockets systemd passed "
                "(ReusePort=yes), one per worker",
                address=self._sockets[0].getsockname(),
                count=self.count,
            )
            return
        self._sockets = reuse_port_sockets(self._endpoint, self.count)
        if self._sockets is not None:
            self._backlog = self._endpoint._backlog
            _log.info(
                "master listening on {address} with {count} sockets (SO_REUSEPORT), one per worker",
                address=self._sockets[0].getsockname(),
                count=self.count,
            )
            return
        d = self._endpoint.listen(_MasterSocket())
        failures: list = []
        d.addCallbacks(self._listening, failures.append)
        if failures:  # fail the start-up, as twistd's listeners do
            failures[0].raiseException()

    def startService(self) -> None:
        super().startService()
        if self._port is None and self._sockets is None:
            self.privilegedStartService()
        for index in range(self.count):
            self._spawn(index)
        self.ready.callback(self._port or self._sockets)

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
        if self._sockets is not None:
            shared = False
            try:
                sock = self._slot_socket(index)
            except OSError:
                _log.failure("worker {index}'s socket cannot listen: trying again later", index=index)
                self._pending[index] = self._reactor.callLater(MAX_RESTART_DELAY, self._spawn, index)
                return
            family, fd = sock.family, sock.fileno()
        else:
            family, fd, shared = self._port.socket.family, self._fd, True
        env[FAMILY_VARIABLE] = str(int(family))
        env[SHARED_VARIABLE] = "1" if shared else "0"
        worker = _Worker(self, index)
        args = [self._executable, *self._worker_args(index)]
        self._reactor.spawnProcess(
            worker,
            self._executable,
            args,
            env=env,
            childFDs={0: "w", 1: 1, 2: 2, 3: fd},
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
        self._leave_group(worker.index)
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

    def _leave_group(self, index: int) -> None:
        """
        Take dead worker C{index}'s socket out of the C{SO_REUSEPORT}
        group, so that new connections go to the live workers: bind its
        successor first (not listening), then close it. Kept when it is
        the last socket listening, or when no successor can be bound.
        """
        if self._sockets is None or self._inherited:
            # systemd holds its own copy of an inherited socket, which stays
            # in the group whatever the master closes: it waits for the
            # replacement, as when no successor can be bound.
            return
        old = self._sockets[index]
        if not any(_listening(s) for i, s in enumerate(self._sockets) if i != index):
            return  # the last one: connections wait in its queue
        try:
            successor = reuse_port_socket(old.family, old.getsockname(), None)
        except OSError as e:
            _log.info(
                "worker {index}'s socket stays in the group until its replacement "
                "serves it: no new socket can be bound on {address} ({error})",
                index=index, address=old.getsockname(), error=e,
            )
            return
        old.close()
        self._sockets[index] = successor

    def _slot_socket(self, index: int):
        """
        The socket for a new worker C{index}, listening: a successor bound
        by L{_leave_group} listens (joins the group) now.

        @rtype: C{socket.socket}
        """
        sock = self._sockets[index]
        if not _listening(sock):
            sock.listen(self._backlog)
        return sock

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
        for sock in self._sockets or ():
            sock.close()  # each worker closes its copy when it stops listening
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

#: The environment variable in which the master tells a worker whether
#: other workers serve its socket too (C{"1"}) or not (C{"0"}).
SHARED_VARIABLE = "TXGATEWAY_LISTEN_SHARED"


def accept_one_at_a_time(port):
    """
    Make a listening port accept one connection each time it is readable.

    Twisted's C{tcp.Port.doRead} accepts in a loop, up to C{numberAccepts}
    connections (100 at first, adapted to the traffic). On a socket that
    several workers share (an inherited C{systemd:} socket, or a TCP
    listener elsewhere than Linux), every worker waiting in
    C{epoll_wait} is woken by a new connection, and the first to run takes
    every connection queued by then: a client's 64 new connections went
    64/0 and 63/1 to two workers in C{bench/workers.py}. Taking one per
    wake-up, each worker goes back to its loop between two accepts, so
    idle workers take turns and a busy one leaves new connections to the
    others; it narrows the imbalance without removing it (64/0 was still
    seen), which is why TCP listeners give each worker a socket of its
    own (L{reuse_port_sockets}).

    @param port: a listening C{twisted.internet.tcp.Port}.
    @return: C{port}, its C{doRead} replaced on the instance.
    """
    do_read = port.doRead

    def doRead() -> None:
        port.numberAccepts = 1
        do_read()

    port.doRead = doRead
    return port


class _SharedSocketEndpoint(AdoptedStreamServerEndpoint):
    """An adopted listening socket shared with other workers: one accept per wake-up."""

    def listen(self, factory) -> Deferred:
        return super().listen(factory).addCallback(accept_one_at_a_time)


def adopted_endpoint(reactor, fd: int):
    """
    The server endpoint for the listening socket inherited as C{fd}. A
    socket other workers serve too (L{SHARED_VARIABLE} not C{"0"}) is
    accepted from one connection per wake-up (L{accept_one_at_a_time}); a
    worker's own socket keeps Twisted's batches of accepts.

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

    @param reactor: C{IReactorSocket}.
    @param fd: the inherited listening socket's file descriptor; the
        endpoint closes it once it has adopted (duplicated) it.
    @return: an C{AdoptedStreamServerEndpoint}.
    @raise ValueError: if L{FAMILY_VARIABLE} holds no address family.
    """
    endpoint_type = AdoptedStreamServerEndpoint
    if os.environ.get(SHARED_VARIABLE) != "0":
        endpoint_type = _SharedSocketEndpoint
    family = os.environ.get(FAMILY_VARIABLE)
    if family:
        return endpoint_type(reactor, fd, socket.AddressFamily(int(family)))
    probe = socket.socket(fileno=fd)
    family = probe.family
    probe.setblocking(False)
    probe.detach()
    return endpoint_type(reactor, fd, family)


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
