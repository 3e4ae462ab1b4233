"""Tests for gateway.metrics: labels, counts, bounded series, /stats."""

import random

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from gateway import __version__
from gateway.metrics import (
    DURATION_BUCKETS,
    GatewayMetrics,
    backend_states,
    percentile_from_buckets,
    stats,
)
from gateway.state import Gateway
from tests.contexts import config, finished


def families(metrics):
    return {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}


def value(metrics, name, **labels):
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def test_buckets_fit_a_proxy():
    assert DURATION_BUCKETS[0] == 0.001 and DURATION_BUCKETS[-1] == 30.0
    assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)


def test_counts_a_request():
    c = config()
    m = GatewayMetrics()
    m.observe(finished(c, duration=0.012, upstream=0.010))
    m.observe(finished(c, backend=1, status=503))
    m.observe(finished(c, route="orders-api", method=b"POST", status=201))
    assert value(m, "gateway_requests_total", route="users-api", service="users", method="GET", status="200") == 1
    assert value(m, "gateway_requests_total", route="users-api", service="users", method="GET", status="503") == 1
    assert value(m, "gateway_requests_total", route="orders-api", service="orders", method="POST", status="201") == 1
    assert value(m, "gateway_request_duration_seconds_count", route="users-api", service="users") == 2
    assert value(m, "gateway_request_duration_seconds_bucket", route="users-api", service="users", le="0.01") == 0
    assert value(m, "gateway_request_duration_seconds_bucket", route="users-api", service="users", le="0.025") == 2
    assert value(m, "gateway_upstream_duration_seconds_count", service="users", backend="http://127.0.0.1:9001") == 1
    assert value(m, "gateway_upstream_duration_seconds_count", service="users", backend="http://127.0.0.1:9002") == 1
    assert value(m, "gateway_upstream_duration_seconds_sum", service="users", backend="http://127.0.0.1:9001") == (
        pytest.approx(0.010)
    )


def test_unrouted_and_backendless_requests():
    c = config()
    m = GatewayMetrics()
    m.observe(finished(c, route=None, path=b"/nowhere", status=404))
    m.observe(finished(c, backend=None, status=503))
    assert value(m, "gateway_requests_total", route="", service="", method="GET", status="404") == 1
    assert value(m, "gateway_requests_total", route="users-api", service="users", method="GET", status="503") == 1
    upstream = families(m)["gateway_upstream_duration_seconds"]
    assert upstream.samples == []


def test_labels_are_bounded_whatever_clients_send():
    """Methods, paths, client addresses and odd statuses never become label values."""
    c = config()
    m = GatewayMetrics()
    rng = random.Random(7)
    for i in range(5000):
        m.observe(
            finished(
                c,
                route=rng.choice(["users-api", "orders-api", None]),
                method=b"M%d" % rng.randrange(10**6) if i % 2 else rng.choice([b"GET", b"POST", b"get"]),
                path=b"/users/%d?x=%d" % (i, i),
                client_ip=f"198.51.{i // 256 % 256}.{i % 256}",
                status=rng.choice([200, 404, 0, 700, 99, 599]),
                request_id=f"r{i}",
            )
        )
    text = m.render().decode()
    assert "/users/" not in text and "198.51." not in text
    assert 'method="M' not in text and 'method="get"' not in text
    requests = families(m)["gateway_requests"]
    methods = {s.labels["method"] for s in requests.samples}
    statuses = {s.labels["status"] for s in requests.samples}
    assert methods <= {"GET", "POST", "OTHER"}
    assert statuses == {"200", "404", "599", "other"}
    # 3 routes x 3 methods x 4 statuses at most, whatever the traffic.
    assert len([s for s in requests.samples if s.name == "gateway_requests_total"]) <= 36
    assert len(m._request_children) <= 3 * 3 * 6


def test_cache_results_and_rate_limited():
    c = config()
    m = GatewayMetrics()
    for result in ("HIT", "hit", "MISS", "stale", "BYPASS", "WEIRD"):
        m.observe(finished(c, cache=result))
    m.observe(finished(c, backend=None, status=429))  # answered by the gateway
    m.observe(finished(c, status=429))  # the backend's own 429: not ours
    m.observe(finished(c, backend=None, status=403, notes={"rate_limited": True}))
    assert value(m, "gateway_cache_requests_total", route="users-api", result="hit") == 2
    for result in ("miss", "stale", "bypass", "other"):
        assert value(m, "gateway_cache_requests_total", route="users-api", result=result) == 1
    assert value(m, "gateway_rate_limited_total", route="users-api") == 2


def test_config_reloads_and_build_info():
    m = GatewayMetrics()
    assert value(m, "gateway_config_reloads_total", result="ok") == 0
    m.config_reloaded(True)
    m.config_reloaded(True)
    m.config_reloaded(False)
    assert value(m, "gateway_config_reloads_total", result="ok") == 2
    assert value(m, "gateway_config_reloads_total", result="failed") == 1
    assert value(m, "gateway_build_info", version=__version__) == 1


def test_prepare_creates_route_series_and_forgets_removed_ones():
    c = config()
    m = GatewayMetrics()
    m.prepare(c, 10.0)
    assert m.config_generation == 1 and m.config_loaded_at == 10.0
    assert value(m, "gateway_rate_limited_total", route="orders-api") == 0
    assert value(m, "gateway_request_duration_seconds_count", route="orders-api", service="orders") == 0
    m.observe(finished(c, route="orders-api", backend=0, cache="HIT"))
    m.observe(finished(c, route=None, status=404))
    m.prepare(c, 11.0)
    assert m.config_generation == 1  # the same config: nothing new
    smaller = config(
        """
listen: tcp:0
services:
  users: {backends: [{url: "http://127.0.0.1:9001"}]}
routes:
  - {name: users-api, match: {path_prefix: /users}, service: users}
"""
    )
    m.prepare(smaller, 12.0)
    assert m.config_generation == 2
    text = m.render().decode()
    # (the backend by its address: a bare "9003" may be digits of a
    # sample's value, such as a timestamp)
    assert "orders" not in text and "127.0.0.1:9003" not in text
    assert value(m, "gateway_requests_total", route="", service="", method="GET", status="404") == 1
    m.observe(finished(c, route="orders-api", backend=0))  # in flight on the old config
    assert value(m, "gateway_requests_total", route="orders-api", service="orders", method="GET", status="200") == 1


def test_backend_gauges_default_to_healthy_and_closed():
    gateway = Gateway(Clock(), config())
    runtime = gateway.snapshot.services["users"]
    backend = runtime.service.backends[0]
    assert runtime.forwarder.limits.acquire(backend) is None
    m = gateway.metrics
    labels = {"service": "users", "backend": "http://127.0.0.1:9001"}
    assert value(m, "gateway_backend_healthy", **labels) == 1
    assert value(m, "gateway_circuit_state", **labels) == 0
    assert value(m, "gateway_active_connections", **labels) == 1
    assert value(m, "gateway_active_connections", service="orders", backend="http://127.0.0.1:9003") == 0


def test_backend_gauges_from_backend_states():
    class WithStates:
        def backend_states(self):
            return [
                {"service": "s", "backend": "http://b1", "healthy": False, "ejected": False,
                 "circuit": "open", "circuit_value": 1, "active": 3},
                {"service": "s", "backend": "http://b2", "healthy": True, "ejected": True,
                 "circuit": "half_open", "active": 0},
            ]

    m = GatewayMetrics(WithStates())
    assert value(m, "gateway_backend_healthy", service="s", backend="http://b1") == 0
    assert value(m, "gateway_backend_healthy", service="s", backend="http://b2") == 0  # ejected
    assert value(m, "gateway_circuit_state", service="s", backend="http://b1") == 1
    assert value(m, "gateway_circuit_state", service="s", backend="http://b2") == 2
    assert value(m, "gateway_active_connections", service="s", backend="http://b1") == 3
    assert backend_states(WithStates())[0]["backend"] == "http://b1"


def test_own_registries_do_not_collide():
    a, b = GatewayMetrics(), GatewayMetrics()
    a.config_reloaded(True)
    assert value(b, "gateway_config_reloads_total", result="ok") == 0


def test_percentile_from_buckets():
    buckets = [(0.01, 0.0), (0.1, 50.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert percentile_from_buckets(buckets, 0.5) == pytest.approx(0.1)
    assert percentile_from_buckets(buckets, 0.25) == pytest.approx(0.055)
    assert percentile_from_buckets(buckets, 0.99) == pytest.approx(0.982)
    assert percentile_from_buckets([(1.0, 0.0), (float("inf"), 0.0)], 0.5) is None
    assert percentile_from_buckets([(1.0, 0.0), (float("inf"), 4.0)], 0.5) == 1.0


def test_stats_document():
    clock = Clock()
    clock.advance(1700000000)
    gateway = Gateway(clock, config())
    c = gateway.snapshot.config
    m = gateway.metrics
    m.prepare(c, clock.seconds())
    for _ in range(9):
        m.observe(finished(c, duration=0.02))
    m.observe(finished(c, status=502, duration=2.0))
    m.observe(finished(c, route=None, status=404))
    m.observe(finished(c, route="orders-api", backend=None, status=429))
    m.config_reloaded(False)
    doc = stats(m, gateway, {"extra": 1})
    users = doc["routes"]["users-api"]
    assert users["service"] == "users" and users["requests"] == 10
    assert users["status"] == {"2xx": 9, "5xx": 1}
    assert 10 <= users["latency_ms"]["p50"] <= 25 and users["latency_ms"]["p99"] > 1000
    assert doc["routes"]["orders-api"]["rate_limited"] == 1
    assert doc["routes"][""]["status"] == {"4xx": 1}
    by_url = {b["backend"]: b for b in doc["backends"]}
    assert by_url["http://127.0.0.1:9001"]["requests"] == 10
    assert by_url["http://127.0.0.1:9001"]["healthy"] is True
    assert by_url["http://127.0.0.1:9001"]["upstream_mean_ms"] == pytest.approx(10.0)
    assert by_url["http://127.0.0.1:9003"]["requests"] == 0
    assert doc["config"]["reloads"] == {"ok": 0, "failed": 1}
    assert doc["config"]["generation"] == 1 and doc["config"]["source"] == "test.yaml"
    assert doc["extra"] == 1 and doc["version"] == __version__
