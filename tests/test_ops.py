"""Unit tests for the operations modules: reload, drain, TLS config, workers, sd_notify."""

from gateway.config import parse_config


def test_partial_sections_keep_their_defaults():
    # Defaults of attrs slotted classes must come from attrs.fields(), not
    # the class attribute (a member descriptor).
    config = parse_config(
        """
admin: {}
limits: {}
services:
  a: {backends: [{url: "http://127.0.0.1:1"}], timeouts: {response: 60s}}
routes: []
"""
    )
    assert config.services["a"].timeouts.connect == 2.0
    assert config.admin.listen == "tcp:9901:interface=127.0.0.1"
    assert config.limits.max_request_body == 10 * 1024 * 1024


# --- hot reload ---------------------------------------------------------------

import os
import signal as _signal
import socket

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet.task import Clock

from gateway.reload import ConfigWatcher
from gateway.state import Gateway


def _config_text(service="a", poll="1s", extra=""):
    return f"""
config_poll_interval: {poll}
services:
  a: {{backends: [{{url: "http://127.0.0.1:9001"}}, {{url: "http://127.0.0.1:9002"}}]}}
  b: {{backends: [{{url: "http://127.0.0.1:9003"}}]}}
routes:
  - {{name: r, match: {{path_prefix: /r}}, service: {service}}}
{extra}
"""


class _Reactor(Clock):
    """A clock that is also enough of a reactor for Gateway and the watcher."""

    def callFromThread(self, f, *args):
        f(*args)


@pytest.fixture
def watched(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(_config_text())
    reactor = _Reactor()
    gateway = Gateway(reactor, parse_config(path.read_text(), str(path)))
    watcher = ConfigWatcher(
        gateway, str(path), 1.0, reactor, run=lambda f, *a: defer.maybeDeferred(f, *a),
        install_signal=False,
    )
    watcher.startService()
    yield path, reactor, gateway, watcher
    watcher.stopService()


def _rewrite(path, text):
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a visibly new mtime


def test_poll_applies_a_changed_file_within_one_interval(watched):
    path, reactor, gateway, watcher = watched
    old = gateway.snapshot
    _rewrite(path, _config_text(service="b"))
    reactor.advance(0.5)
    assert gateway.snapshot is old
    reactor.advance(0.5)
    assert gateway.snapshot is not old
    assert gateway.snapshot.config.routes[0].service == "b"
    assert gateway.reloads == {"ok": 1, "error": 0}
    # unchanged services keep their runtime (pools, balancer state)
    assert gateway.snapshot.services["a"] is old.services["a"]


def test_same_content_or_touch_does_not_reload(watched):
    path, reactor, gateway, watcher = watched
    old = gateway.snapshot
    _rewrite(path, _config_text())  # same bytes, new mtime
    reactor.pump([1.0] * 3)
    assert gateway.snapshot is old
    assert gateway.reloads == {"ok": 0, "error": 0}


def test_bad_file_changes_nothing_and_is_counted(watched):
    path, reactor, gateway, watcher = watched
    old = gateway.snapshot
    _rewrite(path, _config_text(service="nope"))
    reactor.pump([1.0] * 3)  # checked three times, refused (and counted) once
    assert gateway.snapshot is old
    assert gateway.reloads == {"ok": 0, "error": 1}
    error = watcher.last_error
    assert error.path == str(path) and error.line == 7 and "no service named 'nope'" in error.reason
    _rewrite(path, _config_text(service="b"))
    reactor.advance(1.0)
    assert gateway.snapshot.config.routes[0].service == "b"
    assert watcher.last_error is None
    assert gateway.reloads == {"ok": 1, "error": 1}


def test_unreadable_file_is_an_error(watched):
    path, reactor, gateway, watcher = watched
    old = gateway.snapshot
    path.unlink()
    reactor.advance(1.0)
    assert gateway.snapshot is old
    assert gateway.reloads["error"] == 1
    assert "cannot read the file" in watcher.last_error.reason


def test_forced_reload_reparses_an_unchanged_file(watched):
    path, reactor, gateway, watcher = watched
    old = gateway.snapshot
    watcher.reload()
    assert gateway.snapshot is not old
    assert gateway.reloads == {"ok": 1, "error": 0}


def test_changed_service_inherits_state_of_remaining_backends(watched):
    path, reactor, gateway, watcher = watched
    runtime = gateway.snapshot.services["a"]
    runtime.backend_state["http://127.0.0.1:9001"] = "kept"
    runtime.backend_state["http://127.0.0.1:9002"] = "dropped"
    _rewrite(path, _config_text().replace(', {url: "http://127.0.0.1:9002"}', ""))
    reactor.advance(1.0)
    new = gateway.snapshot.services["a"]
    assert new is not runtime
    assert new.backend_state == {"http://127.0.0.1:9001": "kept"}


def test_filters_are_kept_and_reconfigured(watched):
    path, reactor, gateway, watcher = watched
    seen = []

    class Filter:
        name = "probe"

        def reconfigure(self, snapshot):
            seen.append(snapshot)

    probe = Filter()
    gateway.filters = (probe,)
    _rewrite(path, _config_text(service="b"))
    reactor.advance(1.0)
    assert gateway.filters == (probe,)  # the same objects: bucket levels kept
    assert seen == [gateway.snapshot]


def test_sighup_reloads(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(_config_text(poll="0"))
    reactor = _Reactor()
    gateway = Gateway(reactor, parse_config(path.read_text(), str(path)))
    watcher = ConfigWatcher(gateway, str(path), 0, reactor, run=lambda f, *a: defer.maybeDeferred(f, *a))
    forwarded = []
    watcher.signal_observers.append(lambda: forwarded.append(True))
    watcher.startService()
    try:
        assert reactor.getDelayedCalls() == []  # no polling with interval 0
        path.write_text(_config_text(service="b", poll="0"))
        os.kill(os.getpid(), _signal.SIGHUP)
        assert gateway.snapshot.config.routes[0].service == "b"
        assert forwarded == [True]
    finally:
        watcher.stopService()
    assert _signal.getsignal(_signal.SIGHUP) in (_signal.SIG_DFL, _signal.default_int_handler) or \
        _signal.getsignal(_signal.SIGHUP) is not watcher._on_sighup


def test_restart_only_changes_are_reported():
    from gateway.reload import restart_only_changes

    old = parse_config(_config_text())
    new = parse_config("listen: tcp:9999\nadmin: {listen: 'tcp:9998'}\n" + _config_text())
    assert restart_only_changes(old, new) == ["listen", "admin.listen"]


# --- graceful drain -------------------------------------------------------------

from twisted.internet.testing import StringTransportWithDisconnection
from twisted.web import server
from twisted.web.resource import Resource

from gateway.drain import Drainer


class _Held(Resource):
    """Holds every request until the test finishes it."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.held = []

    def render_GET(self, request):
        self.held.append(request)
        return server.NOT_DONE_YET


def _connect(site):
    protocol = site.buildProtocol(None)
    transport = StringTransportWithDisconnection()
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return protocol, transport


def _drain_setup():
    clock = Clock()
    resource = _Held()
    site = server.Site(resource, reactor=clock)
    drainer = Drainer(clock)
    drainer.install(site)
    return clock, resource, site, drainer


def test_drain_closes_idle_connections_and_lets_requests_finish():
    clock, resource, site, drainer = _drain_setup()
    idle, idle_transport = _connect(site)
    idle.dataReceived(b"GET /quick HTTP/1.1\r\nHost: x\r\n\r\n")
    resource.held.pop().finish()  # served once: now an idle keep-alive connection
    busy, busy_transport = _connect(site)
    busy.dataReceived(b"GET /long HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(drainer.connections) == 2
    done = drainer.drain(30)
    assert not idle_transport.connected  # closed at once
    assert busy_transport.connected
    clock.pump([1.0] * 5)
    assert busy_transport.connected and not done.called
    request = resource.held[0]
    request.write(b"done")
    request.finish()
    response = busy_transport.value()
    assert b"HTTP/1.1 200" in response and b"Connection: close" in response
    assert not busy_transport.connected  # closed after its response
    clock.advance(0.1)
    assert done.result == 0
    assert drainer.connections == set()
    assert clock.getDelayedCalls() == []


def test_drain_gives_a_new_connection_time_for_its_first_request():
    clock, resource, site, drainer = _drain_setup()
    late, late_transport = _connect(site)  # accepted just before the stop
    silent, silent_transport = _connect(site)
    done = drainer.drain(30)
    clock.pump([0.05] * 4)
    assert late_transport.connected and silent_transport.connected
    late.dataReceived(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    resource.held.pop().finish()
    assert b"Connection: close" in late_transport.value()
    assert not late_transport.connected
    clock.pump([0.05] * 20)  # the grace is over: the silent one is closed
    assert not silent_transport.connected
    clock.advance(0.05)
    assert done.result == 0


def test_drain_aborts_what_is_left_at_the_timeout():
    clock, resource, site, drainer = _drain_setup()
    busy, transport = _connect(site)
    busy.dataReceived(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
    done = drainer.drain(2)
    clock.pump([0.5] * 3)
    assert transport.connected and not done.called
    clock.pump([0.5] * 2)
    assert transport.disconnected  # aborted
    clock.pump([0.05] * 3)
    assert done.result == 1
    assert clock.getDelayedCalls() == []


def test_drain_with_no_connections_is_immediate():
    clock, resource, site, drainer = _drain_setup()
    assert drainer.drain(30).result == 0


# --- sd_notify -----------------------------------------------------------------

from gateway.sdnotify import notify


def test_notify_sends_one_datagram(tmp_path):
    path = str(tmp_path / "notify")
    server_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server_socket.bind(path)
    try:
        assert notify("READY=1", {"NOTIFY_SOCKET": path})
        assert server_socket.recv(100) == b"READY=1"
    finally:
        server_socket.close()


def test_notify_abstract_socket():
    server_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"txgateway-test-{os.getpid()}"
    server_socket.bind("\0" + name)
    try:
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert server_socket.recv(100) == b"STOPPING=1"
    finally:
        server_socket.close()


def test_notify_without_systemd_does_nothing(tmp_path):
    assert not notify("READY=1", {})
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "absent")})


def test_ready_waits_for_the_listeners_and_the_running_reactor():
    """
    twistd starts services before it installs its SIGTERM handler: READY=1
    only once the reactor runs, or a manager stopping the gateway on READY
    would kill it with the default handler.
    """
    from types import SimpleNamespace

    from twisted.internet.testing import MemoryReactorClock

    from gateway.tap import GatewayService

    reactor = MemoryReactorClock()
    sent = []
    service = GatewayService(SimpleNamespace(reactor=reactor), notify=sent.append)
    listening = defer.Deferred()
    service.readiness.append(lambda: listening)
    service.startService()
    listening.callback(None)
    assert sent == []
    reactor.run()  # runs the when-running hooks
    assert sent == ["READY=1"]


def test_filter_services_stop_after_the_drain():
    """
    The listeners stop, requests in flight drain, and only then the
    filters' services (the access-log file, Redis clients), which those
    requests still use.
    """
    from types import SimpleNamespace

    from twisted.application.service import Service
    from twisted.internet.testing import MemoryReactorClock

    from gateway.tap import GatewayService

    order = []

    class Recorded(Service):
        def stopService(self):
            order.append(self.name)
            return super().stopService()

    class Drainer:
        def drain(self, timeout):
            order.append(f"drain {timeout}")
            return defer.succeed(None)

    gateway = SimpleNamespace(reactor=MemoryReactorClock(), close=lambda: order.append("close"))
    service = GatewayService(gateway, Drainer(), 5.0)
    for name in ("health", "access-log-file", "redis", "listener"):
        child = Recorded()
        child.setName(name)
        child.setServiceParent(service)
        if name in ("access-log-file", "redis"):
            service.after_drain.append(child)
    service.startService()
    d = service.stopService()
    assert order == ["listener", "health", "drain 5.0", "redis", "access-log-file", "close"]
    assert d.called and not service.running


# --- TLS config -------------------------------------------------------------------

from gateway.config import ConfigError
from gateway.tls import BackendTLSPolicy, _matches, backend_policy
from twisted.web.client import BrowserLikePolicyForHTTPS


def test_sni_name_matching():
    assert _matches("api.test", "api.test")
    assert _matches("*.admin.test", "x.admin.test")
    assert not _matches("*.admin.test", "admin.test")
    assert not _matches("*.admin.test", "a.b.admin.test")
    assert not _matches("api.test", "www.api.test")


def test_tls_config_errors_name_the_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_config("tls: {cert: /nonexistent.pem, key: /nonexistent.key}\nservices: {}\nroutes: []\n", "g.yaml")
    assert e.value.line == 1 and "tls.cert: cannot read /nonexistent.pem" in e.value.reason
    with pytest.raises(ConfigError, match="needs cert and key"):
        parse_config("tls: {http2: true}\nservices: {}\nroutes: []\n", "g.yaml")
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        parse_config(
            f"services:\n  a:\n    backends: [{{url: 'https://x'}}]\n    tls: {{ca: {bad}}}\nroutes: []\n",
            "g.yaml",
        )


def test_backend_policy_defaults_to_browser_like_verification(tmp_path):
    from tests.certs import CA

    config = parse_config(
        f"""
services:
  plain: {{backends: [{{url: "https://example.com"}}]}}
  ours:
    backends: [{{url: "https://example.com"}}]
    tls: {{ca: {CA().write(str(tmp_path))}}}
routes: []
"""
    )
    assert isinstance(backend_policy(config.services["plain"]), BrowserLikePolicyForHTTPS)
    policy = backend_policy(config.services["ours"])
    assert isinstance(policy, BackendTLSPolicy)
    # one connection creator per backend, reused
    assert policy.creatorForNetloc(b"example.com", 443) is policy.creatorForNetloc(b"example.com", 443)


def test_top_level_tls_is_not_a_service_default(tmp_path):
    from tests.certs import CA

    ca = CA()
    cert, key = ca.write_issued(str(tmp_path), "s", names=["a.test"])
    config = parse_config(
        f"tls: {{cert: {cert}, key: {key}}}\nservices: {{a: {{backends: [{{url: 'https://x'}}]}}}}\nroutes: []\n"
    )
    assert config.options["tls"].certificates[0].names == ("a.test",)
    assert config.services["a"].options["tls"] is None


# --- workers -------------------------------------------------------------------

from twisted.internet.error import ProcessTerminated
from twisted.python.failure import Failure

from gateway.workers import (
    FAMILY_VARIABLE,
    SHARED_VARIABLE,
    _listening,
    BackendGauges,
    WorkerSupervisor,
    adopted_endpoint,
    log_format_argument,
    parse_workers,
    reactor_arguments,
    worker_command,
)


class _FakeProcessReactor(Clock):
    def __init__(self):
        super().__init__()
        self.spawned = []
        self._next_pid = 1000

    def spawnProcess(self, protocol, executable, args, env=None, childFDs=None):
        self._next_pid += 1
        transport = _FakeProcess(self._next_pid)
        protocol.makeConnection(transport)
        self.spawned.append((protocol, args, env, childFDs))
        return transport


class _FakeProcess:
    def __init__(self, pid):
        self.pid = pid
        self.signals = []

    def closeStdin(self):
        pass

    def signalProcess(self, name):
        self.signals.append(name)


class _FakePort:
    def __init__(self):
        self.reading = True
        self.closed = False
        self.socket = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        self.socket.close()  # (only its family is read)

    def stopReading(self):
        self.reading = False

    def fileno(self):
        return 42

    def getHost(self):
        return "fake:0"

    def stopListening(self):
        self.closed = True
        return defer.succeed(None)


class _FakeEndpoint:
    def __init__(self):
        self.port = _FakePort()

    def listen(self, factory):
        return defer.succeed(self.port)


@pytest.fixture
def supervised(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    reactor = _FakeProcessReactor()
    endpoint = _FakeEndpoint()
    supervisor = WorkerSupervisor(reactor, endpoint, 2, lambda i: ["worker", str(i)], 5.0, executable="py")
    supervisor.privilegedStartService()
    supervisor.startService()
    return reactor, endpoint, supervisor


def _die(protocol, code=1):
    protocol.processEnded(Failure(ProcessTerminated(exitCode=code)))


def test_supervisor_spawns_workers_on_the_shared_socket(supervised):
    reactor, endpoint, supervisor = supervised
    assert not endpoint.port.reading  # the master never accepts
    assert len(reactor.spawned) == 2
    protocol, args, env, fds = reactor.spawned[1]
    assert args == ["py", "worker", "1"]
    assert fds[3] == 42
    assert env["TXGATEWAY_WORKER"] == "1" and "NOTIFY_SOCKET" not in env
    assert env["PROMETHEUS_MULTIPROC_DIR"] == supervisor.metrics_dir
    assert env[FAMILY_VARIABLE] == str(int(socket.AF_INET6))
    assert env[SHARED_VARIABLE] == "1"  # (a fake endpoint: one shared socket)
    assert supervisor.ready.called


def _nonblocking(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)


@pytest.fixture
def listening():
    """A non-blocking listening socket and a second descriptor of it (as a worker inherits)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(5)
    s.setblocking(False)
    shared = os.dup(s.fileno())
    yield s, shared
    s.close()


def test_worker_adopts_the_socket_without_touching_its_blocking_mode(listening, monkeypatch):
    """
    The family comes from the master: no socket object is made of the
    shared descriptor (on PyPy that clears O_NONBLOCK for every process).
    """
    from twisted.internet import reactor

    s, shared = listening
    monkeypatch.setenv(FAMILY_VARIABLE, str(int(socket.AF_INET)))

    def refuse(*args, **kwargs):
        raise AssertionError("a socket object was made of the shared descriptor")

    monkeypatch.setattr("gateway.workers.socket.socket", refuse)
    endpoint = adopted_endpoint(reactor, shared)
    assert endpoint.addressFamily == socket.AF_INET and endpoint.fileno == shared
    assert _nonblocking(s.fileno())
    os.close(shared)


def test_worker_started_by_hand_probes_the_family_and_stays_nonblocking(listening, monkeypatch):
    from twisted.internet import reactor

    s, shared = listening
    monkeypatch.delenv(FAMILY_VARIABLE, raising=False)
    endpoint = adopted_endpoint(reactor, shared)
    assert endpoint.addressFamily == socket.AF_INET
    assert _nonblocking(s.fileno())  # cleared and not put back by the probe on PyPy before
    os.close(shared)


class _Counting(protocol.Factory):
    """Counts the connections it is asked to serve; each is closed at once."""

    def __init__(self):
        self.built = 0

    def buildProtocol(self, addr):
        self.built += 1
        return None  # the port closes the accepted socket


def _queued_port(listening_socket, endpoint, clients):
    """Listen on C{endpoint}, not read by the reactor, with C{clients} connections queued."""
    factory = _Counting()
    ports = []
    endpoint.listen(factory).addCallback(ports.append)
    port = ports[0]
    port.stopReading()  # only the test calls doRead
    address = listening_socket.getsockname()
    # A blocking connect returns once the handshake is done: queued for accept.
    opened = [socket.create_connection(address, timeout=5) for _ in range(clients)]
    return port, factory, opened


@pytest_twisted.inlineCallbacks
def test_worker_port_accepts_one_connection_per_wake_up(listening, monkeypatch):
    """
    Several workers wait on one socket: each wake-up takes one connection,
    so one worker does not take a whole burst while the others sleep.
    """
    from twisted.internet import reactor

    s, shared = listening
    monkeypatch.setenv(FAMILY_VARIABLE, str(int(socket.AF_INET)))
    monkeypatch.setenv(SHARED_VARIABLE, "1")
    port, factory, opened = _queued_port(s, adopted_endpoint(reactor, shared), 5)
    try:
        for expected in range(1, 6):
            port.doRead()
            assert factory.built == expected
    finally:
        yield port.stopListening()
        for c in opened:
            c.close()

    # A worker's own socket keeps Twisted's port, which takes the whole
    # queue at once.
    monkeypatch.setenv(SHARED_VARIABLE, "0")
    twisted_port, factory, opened = _queued_port(s, adopted_endpoint(reactor, os.dup(s.fileno())), 5)
    try:
        twisted_port.doRead()
        assert factory.built == 5
    finally:
        yield twisted_port.stopListening()
        for c in opened:
            c.close()


def _accept_all(sock) -> int:
    """Accept (and close) every connection queued on C{sock}; how many."""
    accepted = 0
    while True:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, OSError):  # OSError: not listening
            return accepted
        conn.close()
        accepted += 1


def _burst(address, count, *sockets) -> list:
    """
    Open C{count} connections to C{address} (each queued for accept once
    its connect returns), then accept what each of C{sockets} holds.

    @return: how many each of C{sockets} accepted, in order.
    """
    opened = [socket.create_connection(address, timeout=5) for _ in range(count)]
    try:
        return [_accept_all(sock) for sock in sockets]
    finally:
        for c in opened:
            c.close()


def _crash_loop(reactor, supervisor, index: int = 0) -> None:
    """Kill worker C{index} until its restart is delayed (a crash loop)."""
    for _ in range(4):
        _die(supervisor.workers[index])
        if supervisor._pending[index].getTime() > reactor.seconds():
            return
        reactor.advance(0)
    raise AssertionError("no delayed restart after four crashes")


@pytest.fixture
def reuse_port_supervised(tmp_path, monkeypatch):
    from twisted.internet.endpoints import TCP4ServerEndpoint

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    reactor = _FakeProcessReactor()
    endpoint = TCP4ServerEndpoint(reactor, 0, backlog=128, interface="127.0.0.1")
    supervisor = WorkerSupervisor(reactor, endpoint, 2, lambda i: ["worker", str(i)], 5.0, executable="py")
    supervisor.privilegedStartService()
    supervisor.startService()
    yield reactor, supervisor
    if supervisor.running:
        supervisor.stopService()


def test_supervisor_gives_each_worker_its_own_reuse_port_socket(reuse_port_supervised):
    """
    A TCP listener: one socket per worker on the same address, and the
    kernel spreads a burst of connections over them.
    """
    reactor, supervisor = reuse_port_supervised
    first, second = supervisor._sockets
    assert first.getsockname() == second.getsockname()
    fds = [childFDs[3] for _, _, _, childFDs in reactor.spawned]
    assert fds == [first.fileno(), second.fileno()]
    assert [env[SHARED_VARIABLE] for _, _, env, _ in reactor.spawned] == ["0", "0"]
    counts = _burst(first.getsockname(), 64, first, second)
    # (a hash of the client ports: all 64 on one socket has odds of 2**-63)
    assert sum(counts) == 64 and min(counts) > 0, counts


def test_dead_workers_socket_leaves_the_group_until_replaced(reuse_port_supervised):
    reactor, supervisor = reuse_port_supervised
    first, second = supervisor._sockets
    address = first.getsockname()
    _crash_loop(reactor, supervisor)
    assert first.fileno() == -1  # closed: out of the group
    successor = supervisor._sockets[0]
    assert successor.getsockname() == address and not _listening(successor)  # holds the address
    assert _burst(address, 16, second) == [16]
    reactor.advance(supervisor._pending[0].getTime() - reactor.seconds())  # the replacement
    assert _listening(successor)
    assert supervisor.workers[0].pid == reactor.spawned[-1][0].pid
    assert reactor.spawned[-1][3][3] == successor.fileno()
    assert reactor.spawned[-1][2][SHARED_VARIABLE] == "0"
    counts = _burst(address, 64, successor, second)
    assert sum(counts) == 64 and min(counts) > 0, counts
    supervisor.stopService()
    assert successor.fileno() == -1 and second.fileno() == -1  # closed


def test_the_last_listening_socket_is_kept(reuse_port_supervised):
    """
    With every worker dead the last socket keeps listening: new
    connections wait in its queue for a replacement, not refused.
    """
    reactor, supervisor = reuse_port_supervised
    first, second = supervisor._sockets
    address = first.getsockname()
    _crash_loop(reactor, supervisor)  # worker 0: its restart waits
    _die(supervisor.workers[1])
    assert supervisor._sockets[1] is second and _listening(second)
    assert _burst(address, 8, second) == [8]  # queued, not refused


def test_after_a_change_of_user_a_dead_workers_socket_is_kept(reuse_port_supervised, monkeypatch):
    """
    No new socket can be bound once twistd dropped its privileges (the
    group's sockets belong to another user): the dead worker's socket is
    kept for its replacement, not closed.
    """
    reactor, supervisor = reuse_port_supervised
    first = supervisor._sockets[0]

    def refuse(*args):
        raise OSError(98, "Address already in use")  # (what Linux answers then)

    monkeypatch.setattr("gateway.workers.reuse_port_socket", refuse)
    _die(supervisor.workers[0])
    assert supervisor._sockets[0] is first and _listening(first)
    reactor.advance(0)
    assert reactor.spawned[-1][3][3] == first.fileno()
    assert reactor.spawned[-1][2][SHARED_VARIABLE] == "0"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize(
    "description",
    ["tcp6:0:interface=\\:\\:1", "tcp:0:interface=\\:\\:1", "tcp6:0", "tcp:0:interface=127.0.0.1"],
)
def test_reuse_port_sockets_take_the_family_of_the_interface(description):
    """As Twisted's own TCP port: an IPv6 interface, even on tcp:, is AF_INET6."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from gateway.workers import reuse_port_sockets

    sockets = reuse_port_sockets(serverFromString(reactor, description), 2)
    try:
        expected = socket.AF_INET if "127.0.0.1" in description else socket.AF_INET6
        assert [s.family for s in sockets] == [expected, expected]
        assert sockets[0].getsockname()[1] == sockets[1].getsockname()[1] != 0
    finally:
        for sock in sockets:
            sock.close()


def test_reuse_port_sockets_refuse_an_address_already_listened_on():
    """A second gateway on the same port fails to start, as before, rather than join."""
    from twisted.internet.endpoints import TCP4ServerEndpoint

    from gateway.workers import reuse_port_socket, reuse_port_sockets

    for taken in (socket.create_server(("127.0.0.1", 0)), reuse_port_socket(socket.AF_INET, ("127.0.0.1", 0), 5)):
        try:
            endpoint = TCP4ServerEndpoint(None, taken.getsockname()[1], interface="127.0.0.1")
            with pytest.raises(OSError):
                reuse_port_sockets(endpoint, 2)
        finally:
            taken.close()


def test_reuse_port_sockets_bind_over_the_last_runs_closed_connections():
    """
    A restart: the old listener's connections linger (TIME_WAIT, closed by
    the server first) and the address is taken again, as Twisted's own
    port takes it (SO_REUSEADDR).
    """
    from twisted.internet.endpoints import TCP4ServerEndpoint

    from gateway.workers import reuse_port_sockets

    old = socket.create_server(("127.0.0.1", 0))
    port = old.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    served, _ = old.accept()
    served.close()  # the server side closes first: it is the one in TIME_WAIT
    client.close()
    old.close()
    sockets = reuse_port_sockets(TCP4ServerEndpoint(None, port, interface="127.0.0.1"), 2)
    try:
        assert [s.getsockname()[1] for s in sockets] == [port, port]
    finally:
        for sock in sockets:
            sock.close()


def test_reuse_port_sockets_only_on_linux(monkeypatch):
    """Elsewhere SO_REUSEPORT need not spread connections: one shared socket."""
    from twisted.internet.endpoints import TCP4ServerEndpoint

    from gateway.workers import reuse_port_sockets

    monkeypatch.setattr("gateway.workers.sys.platform", "darwin")
    assert reuse_port_sockets(TCP4ServerEndpoint(None, 0, interface="127.0.0.1"), 2) is None


@pytest.fixture
def systemd_group():
    """
    What a socket unit with C{ReusePort=yes} and two C{ListenStream=} lines
    for one address passes, plus what else a unit may pass: a
    C{SO_REUSEPORT} socket on another port, a plain listener, a socket
    not listening, a pipe.
    """
    from gateway.workers import reuse_port_socket

    first = reuse_port_socket(socket.AF_INET, ("127.0.0.1", 0), 16)
    second = reuse_port_socket(socket.AF_INET, first.getsockname(), 16)
    elsewhere = reuse_port_socket(socket.AF_INET, ("127.0.0.1", 0), 16)
    plain = socket.create_server(("127.0.0.1", 0))
    idle = reuse_port_socket(socket.AF_INET, first.getsockname(), None)
    read, write = os.pipe()
    os.set_blocking(second.fileno(), True)  # left as it is found
    others = [elsewhere, plain, idle]
    inherited = [elsewhere.fileno(), first.fileno(), plain.fileno(), read,
                 idle.fileno(), second.fileno()]
    yield first, second, inherited
    for sock in [first, second, *others]:
        sock.close()
    os.close(read)
    os.close(write)


def _adopted(sock):
    from twisted.internet.endpoints import AdoptedStreamServerEndpoint

    return AdoptedStreamServerEndpoint(None, sock.fileno(), sock.family)


@pytest.fixture
def pypy_sockets(monkeypatch):
    """socket.socket(fileno=...) clearing the descriptor's O_NONBLOCK, as PyPy's does."""
    real = socket.socket

    def like_pypy(*args, **kwargs):
        sock = real(*args, **kwargs)
        if kwargs.get("fileno") is not None:
            os.set_blocking(kwargs["fileno"], True)
        return sock

    monkeypatch.setattr(socket, "socket", like_pypy)


def test_inherited_reuse_port_group_is_the_sockets_of_one_address(systemd_group, pypy_sockets):
    from gateway.workers import inherited_reuse_port_group

    first, second, inherited = systemd_group
    assert inherited_reuse_port_group(_adopted(second), inherited) == [first.fileno(), second.fileno()]
    # each descriptor blocking or not as it was (the workers share the flag)
    assert os.get_blocking(second.fileno()) and not os.get_blocking(first.fileno())
    assert _listening(first) and _listening(second)  # and left open


def test_an_inherited_reuse_port_socket_whose_group_cannot_be_found_is_refused(systemd_group):
    """Not shared as if alone: the others of its group would hold their connections."""
    from gateway.workers import inherited_reuse_port_group

    first, second, inherited = systemd_group
    with pytest.raises(ValueError, match="descriptors systemd passed cannot be listed"):
        inherited_reuse_port_group(_adopted(first), [])
    with pytest.raises(ValueError, match="the inherited socket is AF_INET, not AF_INET6"):
        from twisted.internet.endpoints import AdoptedStreamServerEndpoint

        inherited_reuse_port_group(AdoptedStreamServerEndpoint(None, first.fileno(), socket.AF_INET6), inherited)


def test_inherited_socket_without_reuse_port_or_alone_is_shared(systemd_group):
    from twisted.internet.endpoints import TCP4ServerEndpoint

    from gateway.workers import inherited_reuse_port_group, reuse_port_socket

    first, second, inherited = systemd_group
    plain = socket.create_server(("127.0.0.1", 0))
    alone = reuse_port_socket(socket.AF_INET, ("127.0.0.1", 0), 16)
    try:
        assert inherited_reuse_port_group(_adopted(plain), inherited + [plain.fileno()]) is None
        assert inherited_reuse_port_group(_adopted(alone), inherited + [alone.fileno()]) is None
        assert inherited_reuse_port_group(TCP4ServerEndpoint(None, 0), inherited) is None
    finally:
        plain.close()
        alone.close()


def test_inherited_group_of_another_size_than_the_workers_is_refused(systemd_group):
    from gateway.workers import check_inherited_group

    first, second, inherited = systemd_group
    check_inherited_group(_adopted(first), 2, inherited)
    for workers in (1, 3):
        with pytest.raises(ValueError) as raised:
            check_inherited_group(_adopted(first), workers, inherited)
        message = str(raised.value)
        assert "2 listening sockets for 127.0.0.1:%d" % first.getsockname()[1] in message
        assert f"but {workers} worker(s)" in message and "ListenStream=" in message


def test_supervisor_gives_each_worker_a_socket_systemd_passed(systemd_group, tmp_path, monkeypatch, pypy_sockets):
    """
    ReusePort=yes with a ListenStream= line per worker: worker i serves
    socket i, and a dead worker's socket is kept for its replacement
    (systemd holds it too: closing the master's copy would not take it
    out of the group).
    """
    first, second, inherited = systemd_group
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    monkeypatch.setattr("gateway.workers._inherited_descriptors", lambda: inherited)
    reactor = _FakeProcessReactor()
    endpoint = _adopted(first)
    # the master's objects own the descriptors now (as systemd's are the master's)
    fds = [os.dup(first.fileno()), os.dup(second.fileno())]
    inherited[inherited.index(first.fileno())] = endpoint.fileno = fds[0]
    inherited[inherited.index(second.fileno())] = fds[1]
    supervisor = WorkerSupervisor(reactor, endpoint, 2, lambda i: ["worker", str(i)], 5.0, executable="py")
    supervisor.privilegedStartService()
    supervisor.startService()
    try:
        assert [s.fileno() for s in supervisor._sockets] == fds
        assert [spawned[3][3] for spawned in reactor.spawned] == fds
        assert [spawned[2][SHARED_VARIABLE] for spawned in reactor.spawned] == ["0", "0"]
        assert not os.get_blocking(fds[1])  # (the fixture made it blocking)
        _crash_loop(reactor, supervisor)
        assert supervisor._sockets[0].fileno() == fds[0] and _listening(supervisor._sockets[0])
        reactor.advance(supervisor._pending[0].getTime() - reactor.seconds())
        assert reactor.spawned[-1][3][3] == fds[0]
    finally:
        supervisor.stopService()
    assert [s.fileno() for s in supervisor._sockets] == [-1, -1]  # the master's copies closed
    assert _listening(first) and _listening(second)  # "systemd's" stay


def test_supervisor_replaces_dead_workers_with_growing_delays(supervised):
    reactor, endpoint, supervisor = supervised
    delays = []
    for _ in range(7):
        worker = supervisor.workers[0]
        _die(worker)
        call = supervisor._pending[0]
        delays.append(call.getTime() - reactor.seconds())
        reactor.advance(call.getTime() - reactor.seconds())
        assert supervisor.workers[0] is not worker
        reactor.advance(1.0)  # each crash a second after the start
    assert delays[:3] == [0.0, 0.0, 0.0]
    assert delays[3:] == sorted(delays[3:]) and delays[3] > 0 and delays[-1] <= 30
    assert supervisor.restarts_total == 7
    # after a quiet spell, restarts are immediate again
    reactor.advance(60)
    _die(supervisor.workers[0])
    assert supervisor._pending[0].getTime() == reactor.seconds()


def test_supervisor_stop_terminates_then_kills(supervised):
    reactor, endpoint, supervisor = supervised
    workers = list(supervisor.workers.values())
    stopped = supervisor.stopService()
    assert endpoint.port.closed
    assert all(w.transport.signals == ["TERM"] for w in workers)
    _die(workers[0], 0)
    assert not stopped.called
    assert supervisor._pending == {}  # no replacement while stopping
    reactor.advance(5.0 + 10)
    assert workers[1].transport.signals == ["TERM", "KILL"]
    _die(workers[1], None)
    assert stopped.called
    assert len(reactor.spawned) == 2


def test_supervisor_forwards_signals(supervised):
    reactor, endpoint, supervisor = supervised
    supervisor.signal_workers("HUP")
    assert [w.transport.signals for w in supervisor.workers.values()] == [["HUP"], ["HUP"]]


def test_parse_workers():
    assert parse_workers(3) == 3
    assert parse_workers("2") == 2
    assert parse_workers("auto") >= 1
    for bad in (0, -1, "many", True, 1.5):
        with pytest.raises(ValueError):
            parse_workers(bad)
    with pytest.raises(ConfigError, match="expected a positive integer or auto"):
        parse_config("workers: 0\nservices: {}\nroutes: []\n")


def test_workers_log_like_the_master():
    assert log_format_argument(["twist", "--log-format=json", "gateway"]) == "json"
    assert log_format_argument(["twist", "--log-format", "json", "gateway"]) == "json"
    assert log_format_argument(["twistd", "-n", "gateway"]) == "text"


def test_workers_run_on_the_masters_reactor():
    """
    A worker gets the master's C{--reactor}, in any of its spellings; with
    none, it passes none either and both install the gateway's own.
    """
    for argv in (
        ["twistd", "--reactor=epoll", "-n", "gateway"],
        ["twistd", "--reactor", "epoll", "-n", "gateway"],
        ["twistd", "-r", "epoll", "-n", "gateway"],
        ["twistd", "-repoll", "-n", "gateway"],
    ):
        assert reactor_arguments(argv) == ["--reactor", "epoll"], argv
    assert reactor_arguments(["twist", "--log-format=json", "gateway"]) == []
    options = {"config": "gateway.yaml"}
    command = worker_command(options, 1, ["twist", "--reactor=poll", "gateway"])
    assert command[command.index("--reactor") + 1] == "poll"
    assert command.index("--reactor") < command.index("gateway")
    assert "--reactor" not in worker_command(options, 1, ["twistd", "-n", "gateway"])


def test_check_summary_shows_workers_and_tls(tmp_path):
    from gateway.tap import summary
    from tests.certs import CA

    cert, key = CA().write_issued(str(tmp_path), "s", names=["api.test"])
    config = parse_config(
        f"workers: auto\ntls: {{cert: {cert}, key: {key}}}\nservices: {{}}\nroutes: []\n", "g.yaml"
    )
    text = summary(config)
    assert "workers: auto" in text and "tls: api.test (h2 offered)" in text


class _StatesGateway:
    def __init__(self, states):
        self.states = states

    def backend_states(self):
        return self.states


def _gauge_values(gauge) -> dict:
    return {labels: child._value.get() for labels, child in gauge._metrics.items()}


def test_worker_writes_its_backend_gauges_every_interval():
    clock = Clock()
    a = {"service": "svc", "backend": "http://a", "healthy": True, "ejected": False,
         "circuit": "closed", "circuit_value": 0, "active": 2}
    b = dict(a, backend="http://b", active=0)
    gateway = _StatesGateway([a, b])
    gauges = BackendGauges(gateway, clock, interval=1.0)
    gauges.startService()
    assert _gauge_values(gauges.healthy) == {("svc", "http://a"): 1.0, ("svc", "http://b"): 1.0}
    assert _gauge_values(gauges.active) == {("svc", "http://a"): 2.0, ("svc", "http://b"): 0.0}
    gateway.states = [dict(a, ejected=True, circuit="open", circuit_value=1, active=0)]  # b left the config
    clock.advance(0.9)
    assert _gauge_values(gauges.circuit)[("svc", "http://a")] == 0.0  # not yet
    clock.advance(0.1)
    assert _gauge_values(gauges.healthy) == {("svc", "http://a"): 0.0}
    assert _gauge_values(gauges.circuit) == {("svc", "http://a"): 1.0}
    assert _gauge_values(gauges.active) == {("svc", "http://a"): 0.0}
    gauges.stopService()
    assert not clock.getDelayedCalls()
