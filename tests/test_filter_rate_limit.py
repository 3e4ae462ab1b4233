"""
Rate limiting through the resource tree (L{tests.stubgateway}): 429 answers
and their headers, keys, scopes, reloads, the GC service and the
C{redis_failure} rules with a fake Redis store. Time is the stub gateway's
L{MemoryReactorClock}, so refills and window edges are exact.

The stub client's address is 127.0.0.1.
"""

from __future__ import annotations

import json

import attrs
import pytest
from twisted.internet import defer
from twisted.logger import globalLogPublisher
from twisted.web.test.requesthelper import DummyRequest

from gateway.auth import hash_api_key
from gateway.filters.rate_limit import RATE_LIMITED, RateLimitFilter
from gateway.ratelimit import Decision, StoreUnavailable
from tests.stubgateway import BASE, StubGateway

REDIS = 'redis: {url: "redis://127.0.0.1:1/0", timeout: 50ms}\n'


def gateway(routes: str, top: str = "", **kwargs) -> StubGateway:
    gw = StubGateway(top + BASE + "routes:\n" + routes, **kwargs)
    gw.reactor.advance(1_700_000_000)  # epoch-sized times, as in production
    return gw


def statuses(gw: StubGateway, path: str, n: int, headers=None) -> list:
    return [gw.request("GET", path, headers=headers).code for _ in range(n)]


# --- answers and headers ---------------------------------------------------------


def test_token_bucket_429_json_retry_after_and_headers():
    gw = gateway("  - {name: r, service: svc, rate_limit: {rate: 1, burst: 3}}\n")
    passed = [gw.request("GET", "/x") for _ in range(3)]
    assert [r.code for r in passed] == [200, 200, 200]
    assert [r.all("RateLimit") for r in passed] == [
        ['"default";r=2;t=1'],
        ['"default";r=1;t=2'],
        ['"default";r=0;t=3'],
    ]
    assert all(r.all("RateLimit-Policy") == ['"default";q=3;w=3'] for r in passed)
    assert all(r.header("Retry-After") is None for r in passed)

    refused = gw.request("GET", "/x")
    assert refused.code == 429
    assert refused.header("Content-Type") == "application/json"
    assert refused.json() == {
        "error": "rate limit exceeded",
        "request_id": refused.header("X-Request-Id"),
    }
    assert refused.all("Retry-After") == ["1"]
    assert refused.all("RateLimit-Policy") == ['"default";q=3;w=3']
    assert refused.all("RateLimit") == ['"default";r=0;t=1']
    assert len(gw.backend.requests) == 3  # the refused request never reached it

    context = gw.contexts[-1]
    assert context.notes[RATE_LIMITED] is True and context.error == "rate limited"
    assert gw.filter("rate_limit").rejected == {"r": 1}

    gw.reactor.advance(1)  # one token back
    assert statuses(gw, "/x", 2) == [200, 429]


def test_sliding_window_edges():
    gw = gateway(
        "  - {name: r, service: svc,"
        " rate_limit: {algorithm: sliding_window, limit: 4, window: 10s, name: w}}\n"
    )
    at = gw.reactor.seconds()
    start = (at // 10 + 1) * 10
    gw.reactor.advance(start - at)  # the start of a fixed window
    assert statuses(gw, "/x", 5) == [200, 200, 200, 200, 429]
    refused = gw.request("GET", "/x")
    # all four counted in this window: wait until the next one's previous
    # weight lets one more in (10 s + 10 * (1 - 3/4) s)
    assert refused.all("Retry-After") == ["13"] and refused.all("RateLimit") == ['"w";r=0;t=13']
    gw.reactor.advance(12.4)
    assert statuses(gw, "/x", 1) == [429]
    gw.reactor.advance(0.1)
    assert statuses(gw, "/x", 2) == [200, 429]


def test_backend_ratelimit_headers_are_replaced():
    gw = gateway("  - {name: r, service: svc, rate_limit: {rate: 1, burst: 2}}\n")
    gw.backend.response_headers = [(b"RateLimit", b'"backend";r=99;t=1'), (b"Retry-After", b"7")]
    r = gw.request("GET", "/x")
    assert r.all("RateLimit") == ['"default";r=1;t=1']
    assert r.all("Retry-After") == ["7"]  # a passed response keeps the backend's


def test_routes_without_a_limit_have_no_headers():
    gw = gateway(
        "  - {name: limited, service: svc, match: {path_prefix: /l}, rate_limit: {rate: 1}}\n"
        "  - {name: free, service: svc, match: {path_prefix: /f}}\n"
    )
    r = gw.request("GET", "/f")
    assert r.code == 200 and r.header("RateLimit") is None and r.header("RateLimit-Policy") is None
    assert statuses(gw, "/f", 5) == [200] * 5


# --- keys --------------------------------------------------------------------------


def test_key_by_header_falls_back_to_the_client_address():
    gw = gateway("  - {name: r, service: svc, rate_limit: {rate: 0.1, burst: 1, key: 'header:X-Client'}}\n")
    assert statuses(gw, "/x", 2, {"X-Client": "alice"}) == [200, 429]
    assert statuses(gw, "/x", 2, {"X-Client": "bob"}) == [200, 429]
    assert statuses(gw, "/x", 2) == [200, 429]  # no header: by 127.0.0.1
    assert statuses(gw, "/x", 1, {"X-Client": "127.0.0.1"}) == [200]  # not the address's bucket


def test_long_header_values_are_hashed():
    gw = gateway("  - {name: r, service: svc, rate_limit: {rate: 0.1, burst: 1, key: 'header:X-Client'}}\n")
    long_a, long_b = "a" * 5000, "a" * 4999 + "b"
    assert statuses(gw, "/x", 2, {"X-Client": long_a}) == [200, 429]
    assert statuses(gw, "/x", 1, {"X-Client": long_b}) == [200]
    limiter = gw.filter("rate_limit")
    keys = [k for table in limiter.memory._tables.values() for k in table]
    assert max(len(k) for k in keys) < 64 + 40


def test_key_by_consumer_after_auth():
    gw = gateway(
        "  - name: r\n    service: svc\n    auth: {methods: [api_key]}\n"
        "    rate_limit: {rate: 0.1, burst: 2, key: consumer}\n",
        top=f"consumers:\n  - {{name: alice, api_keys: ['{hash_api_key('k1')}', k2]}}\n"
        "  - {name: bob, api_keys: [k3]}\n",
    )
    # two keys, one consumer, one bucket
    assert statuses(gw, "/x", 1, {"X-API-Key": "k1"}) == [200]
    assert statuses(gw, "/x", 2, {"X-API-Key": "k2"}) == [200, 429]
    assert statuses(gw, "/x", 2, {"X-API-Key": "k3"}) == [200, 200]
    assert statuses(gw, "/x", 1) == [401]  # auth runs first; nothing counted
    assert gw.filter("rate_limit").rejected == {"r": 1}


def test_key_by_consumer_without_auth_is_by_client_address():
    gw = gateway("  - {name: r, service: svc, rate_limit: {rate: 0.1, burst: 1, key: consumer}}\n")
    assert statuses(gw, "/x", 2) == [200, 429]


@pytest.mark.parametrize(
    "trusted, xff, same_bucket_as_peer",
    [
        ("[]", "203.0.113.9", True),  # nobody trusted: X-Forwarded-For ignored
        ("[127.0.0.0/8]", "203.0.113.9", False),
        ("[127.0.0.0/8]", "203.0.113.9, 127.0.0.5", False),  # our own hop skipped
        ("[10.0.0.0/8]", "203.0.113.9", True),  # the peer is not a trusted proxy
    ],
)
def test_key_by_client_ip_behind_trusted_proxies(trusted, xff, same_bucket_as_peer):
    gw = gateway(
        "  - {name: r, service: svc, rate_limit: {rate: 0.1, burst: 1}}\n",
        top=f"trusted_proxies: {trusted}\n",
    )
    assert statuses(gw, "/x", 1) == [200]  # the peer's bucket, now empty
    expected = 429 if same_bucket_as_peer else 200
    assert statuses(gw, "/x", 1, {"X-Forwarded-For": xff}) == [expected]


def test_right_most_untrusted_address_is_the_client():
    gw = gateway(
        "  - {name: r, service: svc, rate_limit: {rate: 0.1, burst: 1}}\n",
        top="trusted_proxies: [127.0.0.0/8, 10.0.0.0/8]\n",
    )
    # a client cannot escape its bucket by prepending addresses
    assert statuses(gw, "/x", 1, {"X-Forwarded-For": "198.51.100.1, 10.1.2.3"}) == [200]
    assert statuses(gw, "/x", 1, {"X-Forwarded-For": "1.1.1.1, 198.51.100.1, 10.1.2.3"}) == [429]
    assert statuses(gw, "/x", 1, {"X-Forwarded-For": "198.51.100.2"}) == [200]


# --- scopes ------------------------------------------------------------------------


ROUTES = (
    "  - {name: a, service: svc, match: {path_prefix: /a}}\n"
    "  - {name: b, service: svc, match: {path_prefix: /b}}\n"
)


def test_route_policies_limit_each_route_apart():
    """Equal policies on two routes: each route has its own buckets."""
    gw = gateway(
        "  - {name: a, service: svc, match: {path_prefix: /a}, rate_limit: {rate: 0.1, burst: 1, key: global}}\n"
        "  - {name: b, service: svc, match: {path_prefix: /b}, rate_limit: {rate: 0.1, burst: 1, key: global}}\n"
    )
    assert statuses(gw, "/a", 2) == [200, 429]
    assert statuses(gw, "/b", 2) == [200, 429]


def test_top_level_global_key_is_one_bucket_for_all_routes():
    gw = gateway(ROUTES, top="rate_limit: {rate: 0.1, burst: 3, key: global}\n")
    assert statuses(gw, "/a", 2) + statuses(gw, "/b", 2) == [200, 200, 200, 429]
    assert gw.filter("rate_limit").rejected == {"b": 1}


def test_top_level_client_ip_key_counts_a_client_over_all_routes():
    gw = gateway(ROUTES, top="rate_limit: {rate: 0.1, burst: 2}\n")
    assert statuses(gw, "/a", 1) + statuses(gw, "/b", 2) == [200, 200, 429]


def test_top_level_route_key_is_one_bucket_per_route():
    gw = gateway(ROUTES, top="rate_limit: {rate: 0.1, burst: 1, key: route}\n")
    assert statuses(gw, "/a", 2) + statuses(gw, "/b", 2) == [200, 429, 200, 429]


def test_service_policy_is_shared_by_its_routes():
    gw = StubGateway(
        "listen: tcp:0\nadmin: {listen: null}\nservices:\n"
        "  svc:\n    backends: [{url: 'http://backend.test:9001'}]\n"
        "    rate_limit: {rate: 0.1, burst: 2, key: global}\n"
        "  other:\n    backends: [{url: 'http://backend.test:9001'}]\n"
        "    rate_limit: {rate: 0.1, burst: 2, key: global}\n"
        "routes:\n" + ROUTES + "  - {name: c, service: other, match: {path_prefix: /c}}\n"
    )
    assert statuses(gw, "/a", 1) + statuses(gw, "/b", 2) == [200, 200, 429]
    assert statuses(gw, "/c", 2) == [200, 200]


def test_route_can_turn_the_default_off():
    gw = gateway(
        "  - {name: a, service: svc, match: {path_prefix: /a}, rate_limit: false}\n"
        "  - {name: b, service: svc, match: {path_prefix: /b}}\n",
        top="rate_limit: {rate: 0.1, burst: 1}\n",
    )
    assert statuses(gw, "/a", 3) == [200, 200, 200]
    assert statuses(gw, "/b", 2) == [200, 429]


# --- reloads -----------------------------------------------------------------------


def test_reload_keeps_buckets_of_unchanged_policies():
    route = "  - {name: r, service: svc, match: {path_prefix: /r}, rate_limit: {rate: 0.1, burst: 2}}\n"
    other = "  - {name: s, service: svc, match: {path_prefix: /s}, rate_limit: {rate: 0.1, burst: 2}}\n"
    gw = gateway(route + other)
    assert statuses(gw, "/r", 2) == [200, 200]
    assert statuses(gw, "/s", 2) == [200, 200]
    gw.reload(BASE + "routes:\n" + route + other.replace("burst: 2", "burst: 3"))
    assert statuses(gw, "/r", 1) == [429]  # still empty
    assert statuses(gw, "/s", 4) == [200, 200, 200, 429]  # a new policy: a full bucket


# --- counters and the admin page ----------------------------------------------------


def test_admin_stats():
    gw = gateway("  - {name: r, service: svc, rate_limit: {rate: 0.1, burst: 1}}\n")
    statuses(gw, "/x", 3)
    limiter = gw.filter("rate_limit")
    request = DummyRequest([b""])
    body = limiter.admin_children[b"ratelimit"].render_GET(request)
    assert json.loads(body) == {
        "rejected": {"r": 2},
        "degraded": 0,
        "redis_failures": 0,
        "memory_keys": 1,
        "redis": [],
    }


def test_gc_service_drops_idle_buckets_and_leaves_no_timers():
    gw = gateway("  - {name: r, service: svc, rate_limit: {rate: 1, burst: 2, key: 'header:X-Client'}}\n")
    limiter = gw.filter("rate_limit")
    limiter.service.startService()
    for i in range(50):
        gw.request("GET", "/x", headers={"X-Client": str(i)})
    assert len(limiter.memory) == 50
    gw.reactor.pump([5.0] * 2)  # one sweep, 2 s after the buckets filled again
    assert len(limiter.memory) == 0
    d = limiter.service.stopService()
    assert d.called
    assert gw.reactor.getDelayedCalls() == []


# --- Redis failures, with a fake store ------------------------------------------------


@attrs.define
class FakeStore:
    """A Redis store whose answers the test gives, one Deferred per call."""

    calls: list = attrs.field(factory=list)
    closed: bool = False

    def check(self, key, policy):
        d = defer.Deferred()
        self.calls.append((key, policy, d))
        return d

    def close(self):
        self.closed = True
        return defer.succeed(None)

    def __str__(self):
        return "fake://"


def redis_gateway(redis_failure: str, store: FakeStore, extra: str = "") -> StubGateway:
    def factory(gw):
        return RateLimitFilter(gw, redis_store=lambda reactor, redis, prefix: store)

    return gateway(
        "  - {name: r, service: svc, rate_limit: {rate: 1, burst: 2, store: redis,"
        f" redis_failure: {redis_failure}, redis_prefix: 'p:'}}}}\n" + extra,
        top=REDIS,
        filter_factories={"rate_limit": factory},
    )


def answer(store: FakeStore, decision=None) -> None:
    """Settle the oldest pending call with C{decision}, or fail it."""
    pending = [d for _, _, d in store.calls if not d.called]
    if decision is None:
        pending[0].errback(StoreUnavailable("fake://: down"))
    else:
        pending[0].callback(decision)


def start(gw: StubGateway, path: str = "/x"):
    d = gw.client.get(f"http://gateway.test{path}")
    results = []
    d.addBoth(results.append)
    return results


def finish(gw: StubGateway, results) -> object:
    for _ in range(10):
        gw.pump()
    assert results, "no response"
    return results[0]


def test_redis_decisions_are_used():
    store = FakeStore()
    gw = redis_gateway("closed", store)
    pending = start(gw)
    gw.pump()
    key, policy, _ = store.calls[0]
    assert key == "r:r|ip:127.0.0.1" and policy.burst == 2
    answer(store, Decision(True, 2, 1, 1.0, 0.0))
    response = finish(gw, pending)
    assert response.code == 200
    assert response.headers.getRawHeaders(b"RateLimit") == [b'"default";r=1;t=1']
    pending = start(gw)
    gw.pump()
    answer(store, Decision(False, 2, 0, 0.5, 0.5))
    assert finish(gw, pending).code == 429


@pytest.mark.parametrize(
    "mode, codes, rate_limit_header",
    [
        ("open", [200, 200, 200], None),
        ("closed", [429, 429, 429], [b'"default";r=0;t=1']),
        ("local", [200, 200, 429], [b'"default";r=1;t=1']),
    ],
)
def test_redis_failure_modes(mode, codes, rate_limit_header):
    store = FakeStore()
    gw = redis_gateway(mode, store)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        first = start(gw)
        gw.pump()
        answer(store, None)  # Redis fails: the rule applies from now on
        responses = [finish(gw, first)] + [finish(gw, start(gw)) for _ in range(2)]
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [r.code for r in responses] == codes
    assert responses[0].headers.getRawHeaders(b"RateLimit") == rate_limit_header
    if mode == "closed":
        assert responses[0].headers.getRawHeaders(b"Retry-After") == [b"1"]
    assert len(store.calls) == 1  # then Redis is left alone for a probe interval
    limiter = gw.filter("rate_limit")
    assert limiter.redis_failures == 1 and limiter.degraded == 3
    assert limiter.stats()["redis"] == [{"store": "fake://", "failing": True}]
    warnings = [e for e in events if e.get("log_level") and e["log_level"].name == "warn"]
    assert len(warnings) == 1 and warnings[0]["mode"] == mode

    # a probe interval later one request tries Redis again; it is back
    gw.reactor.advance(1.0)
    probe = start(gw)
    gw.pump()
    answer(store, Decision(True, 2, 1, 1.0, 0.0))
    assert finish(gw, probe).code == 200
    assert not limiter.stats()["redis"][0]["failing"]


def test_no_500_when_redis_hangs():
    """A store that never answers: the limiter's own timeout is the store's
    (RedisStore.timeout); here the fake fails it as a timeout would."""
    store = FakeStore()
    gw = redis_gateway("closed", store)
    pending = start(gw)
    gw.pump()
    assert not pending
    answer(store, None)
    assert finish(gw, pending).code == 429


def test_one_limiter_per_redis_server_and_prefix_closed_on_reload():
    store = FakeStore()
    gw = redis_gateway(
        "open", store,
        extra="  - {name: q, service: svc, match: {path_prefix: /q}, rate_limit: {rate: 5,"
        " store: redis, redis_failure: closed, redis_prefix: 'p:'}}\n",
    )
    limiter = gw.filter("rate_limit")
    assert len(limiter._limiters) == 1
    gw.reload(BASE + "routes:\n  - {name: r, service: svc, rate_limit: {rate: 1}}\n")
    assert limiter._limiters == {} and store.closed


def test_cache_hits_count_and_refusals_are_not_cached():
    """Rate limiting runs before the cache: a hit still takes a token."""
    gw = gateway("  - {name: r, service: svc, cache: {}, rate_limit: {rate: 0.1, burst: 2}}\n")
    gw.backend.response_headers = [(b"Cache-Control", b"max-age=60")]
    first, second, third = (gw.request("GET", "/c") for _ in range(3))
    assert (first.code, first.header("X-Cache")) == (200, "MISS")
    assert (second.code, second.header("X-Cache")) == (200, "HIT")
    assert second.all("RateLimit") == ['"default";r=0;t=20']  # not the stored response's
    assert third.code == 429
    assert len(gw.backend.requests) == 1
