"""Tests for gateway.health."""

import pytest
import pytest_twisted
from twisted.internet import defer, error, task
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.util import Redirect

from gateway.config import Backend
from gateway.health import (
    ActiveHealthChecker,
    HealthCheck,
    HealthState,
    OutlierDetector,
    treq_probe,
)


def backends(n):
    return [Backend.from_url(f"http://127.0.0.1:{9001 + i}") for i in range(n)]


# --- HealthState ----------------------------------------------------------------


def test_health_state_thresholds():
    state = HealthState(healthy_threshold=2, unhealthy_threshold=3)
    assert state.healthy
    assert not state.record(False)
    assert not state.record(False)
    assert not state.record(True)  # breaks the run
    assert not state.record(False)
    assert not state.record(False)
    assert state.healthy
    assert state.record(False)  # the third in a row
    assert not state.healthy
    assert not state.record(False)
    assert not state.record(True)
    assert not state.record(False)  # breaks the run
    assert not state.record(True)
    assert state.record(True)
    assert state.healthy


def test_health_state_threshold_of_one():
    state = HealthState(healthy_threshold=1, unhealthy_threshold=1)
    assert state.record(False) and not state.healthy
    assert state.record(True) and state.healthy


def test_health_state_validates():
    with pytest.raises(ValueError):
        HealthState(healthy_threshold=0)


# --- OutlierDetector ------------------------------------------------------------


def detector(n=10, **kw):
    clock = Clock()
    pool = backends(n)
    kw.setdefault("max_ejection_percent", 100)
    return OutlierDetector(clock, pool, **kw), clock, pool


def fail(det, backend, n):
    return [det.record_failure(backend) for _ in range(n)]


def test_consecutive_failures_eject():
    det, clock, pool = detector(consecutive_failures=3, ejection_time=30)
    b = pool[0]
    assert fail(det, b, 2) == [False, False]
    det.record_success(b)
    assert fail(det, b, 2) == [False, False]
    assert not det.is_ejected(b)
    assert det.record_failure(b)
    assert det.is_ejected(b) and not det.is_ejected(pool[1])
    assert det.ejected_count() == 1
    clock.advance(29.9)
    assert det.is_ejected(b)
    clock.advance(0.1)
    assert not det.is_ejected(b)
    assert det.ejected_count() == 0
    assert clock.getDelayedCalls() == []


def test_failures_while_ejected_are_ignored():
    det, clock, pool = detector(consecutive_failures=2, ejection_time=10)
    fail(det, pool[0], 2)
    assert fail(det, pool[0], 5) == [False] * 5
    clock.advance(10)
    # The count starts again from zero after the ejection.
    assert fail(det, pool[0], 2) == [False, True]


def test_ejection_time_grows_and_is_capped():
    det, clock, pool = detector(consecutive_failures=1, ejection_time=10, max_ejection_time=35)
    b = pool[0]
    for expected in (10, 20, 30, 35, 35):
        assert det.record_failure(b)  # as soon as the last ejection ends
        clock.advance(expected - 1)
        assert det.is_ejected(b), expected
        clock.advance(1)
        assert not det.is_ejected(b), expected


def test_ejection_multiplier_decays_while_in_service():
    det, clock, pool = detector(consecutive_failures=1, ejection_time=10)
    b = pool[0]
    for duration in (10, 20, 30):  # back to back: nothing forgiven
        det.record_failure(b)
        clock.advance(duration)
    assert not det.is_ejected(b)
    clock.advance(29)  # 29 s in service after the third: two steps forgiven
    det.record_failure(b)  # so the multiplier is 3 - 2 + 1 = 2
    clock.advance(19)
    assert det.is_ejected(b)
    clock.advance(1)
    assert not det.is_ejected(b)
    clock.advance(1000)  # long recovered: back to the base time
    det.record_failure(b)
    clock.advance(9)
    assert det.is_ejected(b)
    clock.advance(1)
    assert not det.is_ejected(b)


def test_default_max_ejection_time_is_300():
    det, clock, pool = detector(consecutive_failures=1, ejection_time=100)
    b = pool[0]
    for expected in (100, 200, 300, 300):
        det.record_failure(b)
        clock.advance(expected - 1)
        assert det.is_ejected(b)
        clock.advance(1)
        assert not det.is_ejected(b)


def test_max_ejection_percent_caps_ejections():
    det, clock, pool = detector(10, consecutive_failures=1, ejection_time=10, max_ejection_percent=25)
    assert det.max_ejected == 2  # floor(2.5)
    assert det.record_failure(pool[0])
    clock.advance(5)
    assert det.record_failure(pool[1])
    assert not det.record_failure(pool[2])
    assert not det.is_ejected(pool[2])
    clock.advance(5)  # pool[0] is back: room for one more
    assert det.record_failure(pool[2])
    assert [det.is_ejected(b) for b in pool[:3]] == [False, True, True]


@pytest.mark.parametrize("count,percent,expected", [
    (10, 10, 1), (10, 19, 1), (10, 20, 2), (3, 10, 1), (2, 1, 1), (1, 100, 0), (5, 0, 0),
    (4, 100, 4),
])
def test_max_ejected(count, percent, expected):
    det, _, _ = detector(count, max_ejection_percent=percent)
    assert det.max_ejected == expected


def test_single_backend_is_never_ejected():
    det, _, pool = detector(1, consecutive_failures=1)
    assert fail(det, pool[0], 10) == [False] * 10
    assert not det.is_ejected(pool[0])


def test_unknown_backends():
    det, _, _ = detector(3, consecutive_failures=1)
    stranger = Backend.from_url("http://192.0.2.1")
    assert not det.record_failure(stranger)
    det.record_success(stranger)
    assert not det.is_ejected(stranger)


@pytest.mark.parametrize("kw", [
    dict(consecutive_failures=0), dict(ejection_time=0), dict(max_ejection_percent=101),
    dict(ejection_time=60, max_ejection_time=30),
])
def test_outlier_detector_validates(kw):
    with pytest.raises(ValueError):
        OutlierDetector(Clock(), backends(2), **kw)


# --- ActiveHealthChecker with a fake probe ---------------------------------------


class FakeProbe:
    """Answers each backend as scripted: an int, an exception, or "hang"."""

    def __init__(self, clock):
        self.clock = clock
        self.script = {}
        self.calls = []
        self.pending = []

    def __call__(self, backend, path, timeout):
        self.calls.append((self.clock.seconds(), backend, path, timeout))
        answer = self.script.get(backend, 200)
        if answer == "hang":
            d = defer.Deferred()
            self.pending.append(d)
            return d
        if answer == "fail":
            return defer.fail(ConnectionRefusedError())
        if isinstance(answer, Exception):
            raise answer
        return defer.succeed(answer)


def checker(n=2, **kw):
    clock = Clock()
    pool = backends(n)
    probe = FakeProbe(clock)
    changes = []
    params = dict(path="/ping", interval=10, timeout=2, healthy_threshold=2, unhealthy_threshold=3)
    check = HealthCheck(**{**params, **kw})
    hc = ActiveHealthChecker(clock, pool, check, probe, lambda b, ok: changes.append((b, ok)))
    return hc, clock, pool, probe, changes


@pytest.fixture
def events():
    captured = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


def test_probes_every_backend_each_interval():
    hc, clock, pool, probe, _ = checker()
    hc.start()
    assert [(t, b) for t, b, _, _ in probe.calls] == [(0, pool[0]), (0, pool[1])]
    assert probe.calls[0][2:] == ("/ping", 2)
    clock.pump([1] * 30)
    assert [t for t, _, _, _ in probe.calls] == [0, 0, 10, 10, 20, 20, 30, 30]
    hc.stop()
    clock.pump([10] * 3)
    assert len(probe.calls) == 8
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("bad", [503, "fail", RuntimeError("boom"), "hang"])
def test_failing_probes_turn_unhealthy_and_back(bad, events):
    hc, clock, pool, probe, changes = checker()
    probe.script[pool[0]] = bad
    hc.start()
    clock.pump([1] * 19)  # rounds at 0 and 10, each over by 12 at the latest
    assert hc.is_healthy(pool[0]) and changes == []
    clock.pump([1] * 3)  # the third failure, at 20 (or its timeout, at 22)
    assert not hc.is_healthy(pool[0])
    assert hc.is_healthy(pool[1])
    assert changes == [(pool[0], False)]
    logged = [e for e in events if e.get("log_format") == "backend {backend} is now {state}"]
    assert [(e["backend"], e["state"]) for e in logged] == [(pool[0].url, "unhealthy")]

    probe.script[pool[0]] = 200
    clock.pump([1] * 8)  # one pass, at 30
    assert not hc.is_healthy(pool[0])
    clock.pump([1] * 10)  # the second, at 40
    assert hc.is_healthy(pool[0])
    assert changes == [(pool[0], False), (pool[0], True)]
    # The loop never stopped: a round every 10 s, two probes each.
    assert [t for t, _, _, _ in probe.calls] == [0, 0, 10, 10, 20, 20, 30, 30, 40, 40]
    hc.stop()
    assert clock.getDelayedCalls() == []


def test_hanging_probe_is_timed_out_and_cancelled():
    hc, clock, pool, probe, _ = checker(1)
    probe.script[pool[0]] = "hang"
    hc.start()
    clock.advance(1.9)
    assert not probe.pending[0].called
    clock.advance(0.1)  # the 2 s timeout
    assert probe.pending[0].called
    clock.pump([1] * 8)
    assert len(probe.calls) == 2  # the next round ran on time, at 10


def test_unexpected_status_fails():
    hc, clock, pool, probe, changes = checker(1, expected_status=frozenset({204}))
    hc.start()
    clock.pump([10] * 2)
    assert not hc.is_healthy(pool[0])
    probe.script[pool[0]] = 204
    clock.pump([10] * 2)
    assert hc.is_healthy(pool[0])


def test_redirect_passes_with_the_default_range():
    hc, clock, pool, probe, _ = checker(1)
    probe.script[pool[0]] = 302
    hc.start()
    clock.pump([10] * 5)
    assert hc.is_healthy(pool[0])
    probe.script[pool[0]] = 400
    clock.pump([10] * 3)
    assert not hc.is_healthy(pool[0])
    hc.stop()


def test_a_raising_callback_does_not_stop_the_loop(events):
    clock = Clock()
    pool = backends(1)
    probe = FakeProbe(clock)
    probe.script[pool[0]] = 500

    def on_change(backend, healthy):
        raise RuntimeError("bad observer")

    check = HealthCheck(interval=10, timeout=2, unhealthy_threshold=1)
    hc = ActiveHealthChecker(clock, pool, check, probe, on_change)
    hc.start()
    clock.pump([10] * 3)
    assert len(probe.calls) == 4 and hc.running
    assert not hc.is_healthy(pool[0])
    assert any(e.get("log_failure") is not None for e in events)
    hc.stop()


def test_stop_cancels_probes_in_flight_without_verdict():
    hc, clock, pool, probe, changes = checker(1, timeout=5, unhealthy_threshold=1)
    probe.script[pool[0]] = "hang"
    hc.start()
    clock.advance(1)
    hc.stop()
    assert probe.pending[0].called
    assert hc.is_healthy(pool[0]) and changes == []
    assert not hc.running
    assert clock.getDelayedCalls() == []
    # It can be started again.
    hc.start()
    clock.advance(5)
    assert not hc.is_healthy(pool[0])
    hc.stop()
    assert clock.getDelayedCalls() == []


def test_start_and_stop_are_idempotent():
    hc, clock, _, probe, _ = checker(1)
    hc.start()
    hc.start()
    assert len(probe.calls) == 1
    hc.stop()
    hc.stop()
    assert clock.getDelayedCalls() == []


def test_unknown_backend_is_healthy():
    hc, _, _, _, _ = checker(1)
    assert hc.is_healthy(Backend.from_url("http://192.0.2.1"))


# --- the real probe, on real sockets ------------------------------------------------


class Root(Resource):
    def getChild(self, path, request):
        return Status(404)


class Status(Resource):
    isLeaf = True

    def __init__(self, code):
        super().__init__()
        self.code = code

    def render_GET(self, request):
        request.setResponseCode(self.code)
        return b"status"


@pytest_twisted.inlineCallbacks
def test_treq_probe_against_a_real_server():
    from twisted.internet import reactor

    root = Root()
    root.putChild(b"health", Status(200))
    root.putChild(b"down", Status(503))
    root.putChild(b"moved", Redirect(b"/health"))
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    closed = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    closed_port = closed.getHost().port
    yield closed.stopListening()
    try:
        backend = Backend.from_url(f"http://127.0.0.1:{port.getHost().port}")
        probe = treq_probe(reactor)
        assert (yield probe(backend, "/health", 5)) == 200
        assert (yield probe(backend, "/down", 5)) == 503
        assert (yield probe(backend, "/moved", 5)) == 302  # not followed
        assert (yield probe(backend, "/nowhere", 5)) == 404
        with pytest.raises(error.ConnectionRefusedError):
            yield probe(Backend.from_url(f"http://127.0.0.1:{closed_port}"), "/health", 5)
    finally:
        yield port.stopListening()
    yield wait_for_no_delayed_calls(reactor)
    assert reactor.getDelayedCalls() == []


@pytest_twisted.inlineCallbacks
def test_checker_with_treq_probe_on_the_reactor():
    from twisted.internet import reactor

    root = Root()
    root.putChild(b"health", Status(200))
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    try:
        pool = [Backend.from_url(f"http://127.0.0.1:{port.getHost().port}"),
                Backend.from_url("http://127.0.0.1:1")]  # nothing listens there
        changes = []
        check = HealthCheck(path="/health", interval=0.05, timeout=1, unhealthy_threshold=2)
        hc = ActiveHealthChecker(reactor, pool, check, treq_probe(reactor),
                                 lambda b, ok: changes.append((b, ok)))
        hc.start()
        for _ in range(200):
            if changes:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        hc.stop()
        assert changes == [(pool[1], False)]
        assert hc.is_healthy(pool[0]) and not hc.is_healthy(pool[1])
    finally:
        yield port.stopListening()
    yield wait_for_no_delayed_calls(reactor)
    assert reactor.getDelayedCalls() == []


@defer.inlineCallbacks
def wait_for_no_delayed_calls(reactor, limit=2.0):
    """Let closing connections finish their teardown, for at most C{limit} s."""
    for _ in range(int(limit / 0.01)):
        if not reactor.getDelayedCalls():
            return
        yield task.deferLater(reactor, 0.01, lambda: None)


def test_ejected_for_counts_down():
    det, clock, pool = detector(consecutive_failures=1, ejection_time=10)
    assert det.ejected_for(pool[0]) == 0
    det.record_failure(pool[0])
    clock.advance(3)
    assert det.ejected_for(pool[0]) == 7 and det.ejected_for(pool[1]) == 0
    clock.advance(7)
    assert det.ejected_for(pool[0]) == 0
    assert det.ejected_for(backends(20)[15]) == 0  # unknown


def test_state_changes_are_structured_events(events):
    clock = Clock()
    pool = backends(2)
    probe = FakeProbe(clock)
    check = HealthCheck(path="/ping", interval=10, timeout=2, unhealthy_threshold=1)
    hc = ActiveHealthChecker(clock, pool, check, probe, service="users")
    probe.script[pool[0]] = 500
    hc.start()
    [event] = [e for e in events if e.get("event") == "backend_health"]
    assert (event["service"], event["backend"], event["state"]) == ("users", pool[0].url, "unhealthy")
    hc.stop()
    det = OutlierDetector(clock, pool, consecutive_failures=1, service="users")
    det.record_failure(pool[1])
    [event] = [e for e in events if e.get("event") == "backend_ejected"]
    assert (event["service"], event["backend"]) == ("users", pool[1].url)
