"""ServiceRuntime and Gateway: which backends are usable, verdicts, state export, reloads."""

import random

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from zope.interface.verify import verifyObject

import pytest

from gateway.config import parse_config
from gateway.interfaces import IBalancer
from gateway.state import Gateway

BACKENDS = """\
    backends:
      - url: http://127.0.0.1:9001
      - url: http://127.0.0.1:9002
      - url: http://127.0.0.1:9003
"""


def config(service: str = "", extra_services: str = ""):
    return parse_config(
        f"""\
services:
  s:
{BACKENDS}{service}
{extra_services}
routes:
  - {{name: r, service: s}}
"""
    )


class Probe:
    """A health probe answering from C{status} by port (200 if absent)."""

    def __init__(self):
        self.status = {}
        self.calls = 0

    def __call__(self, backend, path, timeout):
        self.calls += 1
        answer = self.status.get(backend.port, 200)
        if answer == "refused":
            return defer.fail(ConnectionRefusedError())
        return defer.succeed(answer)


def gateway(service: str = "", extra_services: str = ""):
    reactor = MemoryReactorClock()
    probe = Probe()
    gw = Gateway(reactor, config(service, extra_services), random.Random(1), probe)
    return gw, reactor, probe


@pytest.fixture
def events():
    captured = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


def ports(backends):
    return [b.port for b in backends]


def test_without_resilience_config_every_backend_is_available():
    gw, reactor, probe = gateway()
    runtime = gw.snapshot.services["s"]
    assert ports(runtime.available()) == [9001, 9002, 9003]
    assert runtime.checker is None and runtime.detector is None and runtime.breakers == {}
    for b in runtime.service.backends:
        assert runtime.acquire(b)
        runtime.record(b, ok=False)
    assert ports(runtime.available()) == [9001, 9002, 9003]
    gw.start()
    assert probe.calls == 0 and reactor.getDelayedCalls() == []
    gw.stop()


@pytest.mark.parametrize(
    "name", ["round_robin", "weighted_round_robin", "least_connections", "random", "least_request"]
)
def test_every_balancer_is_built_from_config(name):
    gw, _, _ = gateway(f"    balancer: {name}")
    runtime = gw.snapshot.services["s"]
    verifyObject(IBalancer, runtime.balancer)
    assert runtime.hash_key("10.0.0.1", None, None, b"/x") is None
    assert runtime.balancer.pick(runtime.available()) in runtime.service.backends


def test_consistent_hash_key_comes_from_the_configured_source():
    gw, _, _ = gateway("    balancer: consistent_hash\n    hash_on: header:X-User")
    runtime = gw.snapshot.services["s"]
    headers = {b"x-user": b"alice"}.get
    assert runtime.hash_key("10.0.0.1", headers, None, b"/x") == b"alice"
    picks = {runtime.balancer.pick(runtime.available(), b"alice") for _ in range(20)}
    assert len(picks) == 1


def test_active_health_checks_take_backends_out_and_back(events):
    gw, reactor, probe = gateway(
        "    health_check: {path: /h, interval: 1s, healthy_threshold: 2, unhealthy_threshold: 2}"
    )
    runtime = gw.snapshot.services["s"]
    probe.status[9002] = "refused"
    gw.start()
    assert probe.calls == 3
    reactor.pump([1])
    assert ports(runtime.available()) == [9001, 9003]
    probe.status[9002] = 200
    reactor.pump([1])
    assert ports(runtime.available()) == [9001, 9003]
    reactor.pump([1])
    assert ports(runtime.available()) == [9001, 9002, 9003]
    changes = [(e["backend"], e["state"]) for e in events if e.get("event") == "backend_health"]
    assert changes == [("http://127.0.0.1:9002", "unhealthy"), ("http://127.0.0.1:9002", "healthy")]
    gw.stop()
    assert reactor.getDelayedCalls() == []


def test_all_unhealthy_leaves_nothing_and_suggests_a_retry_after():
    gw, reactor, probe = gateway(
        "    health_check: {path: /h, interval: 2s, healthy_threshold: 2, unhealthy_threshold: 1}"
    )
    runtime = gw.snapshot.services["s"]
    probe.status.update({9001: 500, 9002: 500, 9003: 503})
    gw.start()
    assert runtime.available() == []
    assert runtime.retry_after() == 4  # two passing probes, 2 s apart
    gw.stop()


def test_consecutive_failures_eject_until_the_ejection_ends(events):
    gw, reactor, _ = gateway(
        "    passive_health: {consecutive_failures: 2, ejection_time: 5s, max_ejection_percent: 34}"
    )
    runtime = gw.snapshot.services["s"]
    a, b, c = runtime.service.backends
    runtime.record(a, ok=False)
    runtime.record(a, ok=True)
    runtime.record(a, ok=False)
    assert runtime.available() == [a, b, c]
    runtime.record(a, ok=False)
    assert runtime.available() == [b, c]
    # 34% of three: one backend at most.
    runtime.record(b, ok=False)
    runtime.record(b, ok=False)
    assert runtime.available() == [b, c]
    assert runtime.retry_after() == 1  # b and c are usable now
    reactor.advance(5)
    assert runtime.available() == [a, b, c]
    [event] = [e for e in events if e.get("event") == "backend_ejected"]
    assert (event["service"], event["backend"]) == ("s", a.url)


def test_breaker_opens_half_opens_with_one_trial_and_closes(events):
    gw, reactor, _ = gateway("    circuit_breaker: {failure_threshold: 2, cooldown: 10s}")
    runtime = gw.snapshot.services["s"]
    a, b, c = runtime.service.backends
    for _ in range(2):
        assert runtime.acquire(a)
        runtime.record(a, ok=False)
    assert runtime.available() == [b, c]
    assert not runtime.acquire(a)
    reactor.advance(10)
    assert runtime.available() == [a, b, c]  # half-open: a trial may go
    assert runtime.acquire(a)
    assert runtime.available() == [b, c]  # the trial is taken
    runtime.release(a)  # the client went away: no verdict
    assert runtime.acquire(a)
    runtime.record(a, ok=True)
    assert runtime.available() == [a, b, c]
    states = [(e["backend"], e["previous"], e["state"]) for e in events if e.get("event") == "circuit_state"]
    assert states == [(a.url, "closed", "open"), (a.url, "open", "half_open"), (a.url, "half_open", "closed")]


def test_everything_out_gives_the_soonest_return_as_retry_after():
    gw, reactor, _ = gateway(
        "    circuit_breaker: {failure_threshold: 1, cooldown: 30s}\n"
        "    passive_health: {consecutive_failures: 1, ejection_time: 7s, max_ejection_percent: 100}"
    )
    runtime = gw.snapshot.services["s"]
    a, b, c = runtime.service.backends
    for backend in (a, b, c):
        if backend is not a:
            reactor.advance(10)
        runtime.acquire(backend)
        runtime.record(backend, ok=False)
    # a's breaker opened 20 s ago, b's 10 s ago, c's now; their ejections are over but c's.
    assert runtime.available() == []
    assert runtime.retry_after() == 10


def test_backend_states_for_metrics():
    gw, reactor, probe = gateway(
        "    health_check: {path: /h, interval: 1s, unhealthy_threshold: 1}\n"
        "    passive_health: {consecutive_failures: 1, max_ejection_percent: 50}\n"
        "    circuit_breaker: {failure_threshold: 1}",
        extra_services="  plain:\n    backends: [{url: 'http://127.0.0.1:9009'}]",
    )
    runtime = gw.snapshot.services["s"]
    a, b, c = runtime.service.backends
    probe.status[9003] = 500
    gw.start()
    runtime.acquire(a)
    runtime.record(a, ok=False)
    assert runtime.forwarder.limits.acquire(b) is None
    assert gw.backend_states() == [
        {"service": "s", "backend": a.url, "healthy": True, "ejected": True,
         "circuit": "open", "circuit_value": 1, "active": 0},
        {"service": "s", "backend": b.url, "healthy": True, "ejected": False,
         "circuit": "closed", "circuit_value": 0, "active": 1},
        {"service": "s", "backend": c.url, "healthy": False, "ejected": False,
         "circuit": "closed", "circuit_value": 0, "active": 0},
        {"service": "plain", "backend": "http://127.0.0.1:9009", "healthy": True,
         "ejected": False, "circuit": "closed", "circuit_value": 0, "active": 0},
    ]
    gw.stop()


def test_reload_keeps_state_of_unchanged_services_and_moves_health_checks():
    check = "    health_check: {path: /h, interval: 1s, unhealthy_threshold: 1}"
    gw, reactor, probe = gateway(check)
    old = gw.snapshot.services["s"]
    probe.status[9001] = 500
    gw.start()
    assert [b.port for b in old.available()] == [9002, 9003]

    # The same config: the same runtime, still checking, still down.
    gw.apply(config(check))
    assert gw.snapshot.services["s"] is old and old.checker.running

    # A changed service: the old checks stop, the new ones start.
    gw.apply(config(check.replace("1s", "2s")))
    new = gw.snapshot.services["s"]
    assert new is not old
    assert not old.checker.running and new.checker.running
    assert [b.port for b in new.available()] == [9002, 9003]  # probed at once

    gw.stop()
    assert not new.checker.running
    assert reactor.getDelayedCalls() == []
    # Applied while stopped: nothing starts.
    gw.apply(config(check.replace("1s", "3s")))
    assert not gw.snapshot.services["s"].checker.running
    assert reactor.getDelayedCalls() == []


def test_make_service_runs_health_checks_before_the_listeners(tmp_path):
    from gateway.tap import Options, makeService, summary

    path = tmp_path / "gw.yaml"
    path.write_text(
        f"""\
listen: tcp:0:interface=127.0.0.1
admin: {{listen: "tcp:0:interface=127.0.0.1"}}
services:
  s:
{BACKENDS}    health_check: {{path: /h, interval: 5s}}
    passive_health: {{}}
    circuit_breaker: {{}}
routes:
  - {{name: r, service: s}}
"""
    )
    options = Options()
    options.parseOptions(["--config", str(path)])
    reactor = MemoryReactorClock()
    root = makeService(options, reactor)
    names = [s.name for s in root]
    assert names[-2:] == ["admin-listener", "listener"]  # listeners last: they stop first
    assert "health-checks" in names[:-2]
    runtime = root.gateway.snapshot.services["s"]
    assert not runtime.checker.running
    root.startService()
    assert runtime.checker.running
    root.stopService()
    assert not runtime.checker.running
    assert reactor.getDelayedCalls() == []  # probes in flight were cancelled
    assert "service s: round_robin, health check /h every 5s, ejection after 5 failures, " \
        "circuit breaker: http://127.0.0.1:9001" in summary(options.config)
