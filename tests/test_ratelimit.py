"""
Tests for L{gateway.ratelimit}.

The algorithms, the memory store, its GC, the headers, L{client_ip} and the
C{redis_failure} rule run on a L{Clock} and are exact.  The Redis store runs
against the real server on 127.0.0.1:6379 (DB 0, keys under a fresh uuid
prefix, deleted afterwards); those tests fail, not skip, when Redis is
absent, since CI has it.
"""

import ipaddress
import re
import socket
import time
import uuid

import attrs
import pytest
import pytest_twisted
import redis
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.protocols import portforward
from zope.interface.verify import verifyObject

from gateway.ratelimit import (
    SLIDING_WINDOW_LUA,
    TOKEN_BUCKET_LUA,
    Decision,
    IRateLimitStore,
    MemoryStore,
    RateLimiter,
    RedisStore,
    SlidingWindow,
    StoreUnavailable,
    TokenBucket,
    client_ip,
    rate_limit_headers,
)

T0 = 1_700_000_000.0  # an epoch-sized time, where float rounding bites


def at(clock, when):
    clock.advance(when - clock.seconds())


@pytest.fixture
def clock():
    c = Clock()
    c.advance(T0)
    return c


@pytest.fixture
def captured_logs():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def by_level(events, level):
    return [e for e in events if e.get("log_level") is not None and e["log_level"].name == level
            and e.get("log_namespace") == "gateway.ratelimit"]


# --- policies -----------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: TokenBucket(rate=0, burst=1),
        lambda: TokenBucket(rate=-1, burst=1),
        lambda: TokenBucket(rate=float("inf"), burst=1),
        lambda: TokenBucket(rate=1, burst=0),
        lambda: TokenBucket(rate=1, burst=1.5),
        lambda: TokenBucket(rate=1, burst=1, name=""),
        lambda: TokenBucket(rate=1, burst=1, name="caf\u00e9"),
        lambda: SlidingWindow(limit=0, window=1),
        lambda: SlidingWindow(limit=1, window=0),
        lambda: SlidingWindow(limit=1, window=1, name="a\nb"),
    ],
)
def test_bad_policies_refused(make):
    with pytest.raises(ValueError):
        make()


def test_policies_are_values():
    assert TokenBucket(10, 20) == TokenBucket(10.0, 20)
    assert hash(TokenBucket(10, 20)) == hash(TokenBucket(10.0, 20))
    assert TokenBucket(10, 20) != TokenBucket(10, 20, name="other")
    assert SlidingWindow(5, 60) == SlidingWindow(5, 60.0)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        TokenBucket(10, 20).rate = 1


# --- token bucket -------------------------------------------------------------


def test_token_bucket_burst_then_refused(clock):
    store = MemoryStore(clock)
    policy = TokenBucket(rate=2, burst=3)
    decisions = [store.check("a", policy) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert all(d.limit == 3 for d in decisions)
    assert decisions[0].reset == pytest.approx(0.5)
    assert decisions[2].reset == pytest.approx(1.5)  # three tokens at 2/s
    refused = decisions[3]
    assert refused.retry_after == pytest.approx(0.5)
    assert refused.reset == pytest.approx(1.5)


def test_token_bucket_refills_exactly(clock):
    store = MemoryStore(clock)
    policy = TokenBucket(rate=10, burst=1)
    assert store.check("a", policy).allowed
    for _ in range(5):
        refused = store.check("a", policy)
        assert not refused.allowed
        # just before the token is back: still refused, and told how long
        clock.advance(refused.retry_after - 1e-5)
        assert not store.check("a", policy).allowed
        clock.advance(1e-5)
        assert store.check("a", policy).allowed


def test_token_bucket_exact_edges_at_small_times():
    """
    From time 0, sums such as 0.1 + 0.1 + 0.1 are not 0.3: the edges hold.
    """
    clock = Clock()
    store = MemoryStore(clock)
    policy = TokenBucket(rate=10, burst=1)
    for step in range(30):
        allowed = [store.check("a", policy).allowed for _ in range(2)]
        assert allowed == [True, False], step
        clock.advance(0.1)


def test_token_bucket_remaining_at_epoch_times(clock):
    store = MemoryStore(clock)
    policy = TokenBucket(rate=1000, burst=10)
    for _ in range(3):
        clock.advance(0.0123)  # full again
        decisions = [store.check("a", policy) for _ in range(11)]
        assert [d.remaining for d in decisions] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0]
        assert [d.allowed for d in decisions] == [True] * 10 + [False]


def test_token_bucket_partial_refill_and_full_reset(clock):
    store = MemoryStore(clock)
    policy = TokenBucket(rate=1, burst=5)
    for _ in range(5):
        store.check("a", policy)
    clock.advance(2.5)  # two and a half tokens back
    d = store.check("a", policy)
    assert d.allowed and d.remaining == 1
    assert d.reset == pytest.approx(3.5)
    assert store.check("a", policy).allowed
    assert not store.check("a", policy).allowed
    clock.advance(100)  # a full bucket holds no more than burst
    assert [store.check("a", policy).allowed for _ in range(6)] == [True] * 5 + [False]


def test_refused_requests_take_no_token(clock):
    store = MemoryStore(clock)
    policy = TokenBucket(rate=1, burst=1)
    store.check("a", policy)
    for _ in range(100):
        assert not store.check("a", policy).allowed
    clock.advance(1)
    assert store.check("a", policy).allowed


def test_keys_and_policies_are_separate(clock):
    store = MemoryStore(clock)
    one = TokenBucket(rate=1, burst=1)
    other = TokenBucket(rate=1, burst=1, name="other")
    assert store.check("a", one).allowed
    assert store.check("b", one).allowed
    assert store.check("a", other).allowed
    assert not store.check("a", one).allowed
    # equal policies share their buckets
    assert not store.check("a", TokenBucket(rate=1.0, burst=1)).allowed


# --- sliding window -----------------------------------------------------------


def test_sliding_window_limit_within_window():
    clock = Clock()
    store = MemoryStore(clock)
    policy = SlidingWindow(limit=3, window=10)
    decisions = [store.check("a", policy) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert decisions[0].reset == 20  # until the next window is over too
    clock.advance(9.999)
    assert not store.check("a", policy).allowed


def test_sliding_window_exact_edges():
    clock = Clock()
    store = MemoryStore(clock)
    policy = SlidingWindow(limit=3, window=10)
    for _ in range(3):
        store.check("a", policy)
    refused = store.check("a", policy)
    # at the window's edge the previous window still weighs fully
    at(clock, 10)
    assert not store.check("a", policy).allowed
    # three in [0, 10) weigh 3 * (20 - t) / 10: one more fits once that is 2
    assert refused.retry_after == pytest.approx(40 / 3)
    at(clock, 40 / 3 - 1e-5)
    assert not store.check("a", policy).allowed
    at(clock, 40 / 3)
    d = store.check("a", policy)
    assert d.allowed and d.remaining == 0
    assert not store.check("a", policy).allowed
    # two windows later nothing counts any more
    at(clock, 30)
    assert [store.check("a", policy).allowed for _ in range(4)] == [True] * 3 + [False]


def test_sliding_window_weighs_the_previous_window():
    clock = Clock()
    store = MemoryStore(clock)
    policy = SlidingWindow(limit=10, window=10)
    for _ in range(10):
        assert store.check("a", policy).allowed
    at(clock, 15)  # half of the previous window overlaps: 5 count
    decisions = [store.check("a", policy) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions[:5]] == [4, 3, 2, 1, 0]
    # the refusal waits for the previous window's weight to drop by one
    assert decisions[5].retry_after == pytest.approx(1.0)
    at(clock, 16)
    assert store.check("a", policy).allowed


def test_sliding_window_retry_after_when_this_window_is_full():
    clock = Clock()
    store = MemoryStore(clock)
    policy = SlidingWindow(limit=1, window=10)
    at(clock, 4)
    assert store.check("a", policy).allowed
    refused = store.check("a", policy)
    # with a limit of 1, the request of [0, 10) must weigh nothing: t = 20
    assert refused.retry_after == pytest.approx(16)
    at(clock, 20 - 1e-5)
    assert not store.check("a", policy).allowed
    at(clock, 20)
    assert store.check("a", policy).allowed


def test_sliding_window_at_epoch_times(clock):
    store = MemoryStore(clock)
    policy = SlidingWindow(limit=5, window=60)
    allowed = sum(store.check("a", policy).allowed for _ in range(10))
    assert allowed == 5


# --- memory GC ----------------------------------------------------------------


def test_gc_drops_idle_keys_and_keeps_active_ones(clock):
    store = MemoryStore(clock)
    bucket = TokenBucket(rate=1, burst=10)
    window = SlidingWindow(limit=10, window=10)
    for key in ("idle-1", "idle-2", "busy"):
        store.check(key, bucket)
        store.check(key, window)
    assert len(store) == 6
    clock.advance(0.5)
    assert store.gc() == 0  # nothing idle yet
    clock.advance(19.5)
    store.check("busy", bucket)
    store.check("busy", window)
    assert store.gc() == 4
    assert len(store) == 2
    # the survivors keep their state (the window's first request is over)
    assert store.check("busy", bucket).remaining == 8
    assert store.check("busy", window).remaining == 8


def test_gc_forgets_only_what_a_new_bucket_equals(clock):
    store = MemoryStore(clock)
    policy = TokenBucket(rate=1, burst=2)
    store.check("a", policy)
    clock.advance(0.999)
    store.gc()
    assert len(store) == 1  # not full yet
    clock.advance(0.001)
    store.gc()
    assert len(store) == 0
    assert store.check("a", policy).remaining == 1  # as a new bucket


def test_gc_drops_empty_tables_and_compacts(clock):
    store = MemoryStore(clock)
    policy = TokenBucket(rate=1, burst=1)
    for i in range(1000):
        store.check(str(i), policy)
    clock.advance(5)
    store.check("0", policy)
    table = store._tables[policy]
    assert store.gc() == 999
    assert store._tables[policy] is not table  # copied to shrink its storage
    assert list(store._tables[policy]) == ["0"]
    clock.advance(5)
    store.gc()
    assert store._tables == {}


class TurnClock(Clock):
    """
    A Clock on which C{callLater(0, ...)} waits for the next C{turn()}, as it
    waits for the next reactor iteration (C{Clock.advance} would run it at
    once).
    """

    TURN = 1e-3

    def callLater(self, delay, f, *args, **kwargs):
        return super().callLater(delay or self.TURN, f, *args, **kwargs)

    def turn(self):
        self.advance(self.TURN)


def test_start_gc_sweeps_periodically_in_chunks():
    clock = TurnClock()
    store = MemoryStore(clock, gc_chunk=2)
    policy = TokenBucket(rate=0.1, burst=1)
    store.start_gc(10)
    for i in range(5):
        store.check(str(i), policy)
    clock.advance(5)
    assert len(store) == 5  # the first sweep is 10 s after the start
    store.check("busy", policy)  # full again at 15 s
    clock.advance(5)  # first sweep, first chunk of two keys
    assert len(store) == 4
    clock.turn()  # the next chunks, one per reactor turn
    assert len(store) == 2
    clock.turn()
    assert len(store) == 1
    clock.turn()  # the sweep of the last key, then it is over
    clock.turn()
    assert clock.getDelayedCalls()[0].getTime() == pytest.approx(20)
    clock.advance(20 - clock.seconds())  # the next sweep
    assert len(store) == 0
    store.stop_gc()
    assert clock.getDelayedCalls() == []


def test_stop_gc_in_the_middle_of_a_sweep():
    clock = TurnClock()
    store = MemoryStore(clock, gc_chunk=1)
    policy = TokenBucket(rate=1, burst=1)
    for i in range(5):
        store.check(str(i), policy)
    store.start_gc(10)
    clock.advance(10)
    assert len(store) == 4
    loop = store._gc_loop
    store.stop_gc()
    assert clock.getDelayedCalls() == []
    assert len(store) == 4
    assert not loop.running and store._sweep_done is None
    store.start_gc(10)  # and it can start again
    with pytest.raises(RuntimeError):
        store.start_gc(10)
    store.stop_gc()


def test_memory_is_released_after_large_sweeps(clock, monkeypatch):
    """
    After a sweep that dropped at least release_after keys, the C library
    is asked to give freed memory back (glibc keeps it otherwise).
    """
    import gateway.ratelimit as ratelimit

    calls = []
    monkeypatch.setattr(ratelimit, "release_memory", lambda: calls.append(clock.seconds()))
    store = MemoryStore(clock, release_after=3)
    policy = TokenBucket(rate=1, burst=1)
    for i in range(2):
        store.check(str(i), policy)
    clock.advance(1)
    assert store.gc() == 2 and calls == []  # too few to bother
    for i in range(3):
        store.check(str(i), policy)
    store.start_gc(10)
    clock.advance(10)
    assert len(store) == 0 and len(calls) == 1
    store.stop_gc()


def test_release_memory_works_or_says_it_cannot():
    from gateway.ratelimit import release_memory

    assert release_memory() in (True, False)


def test_periodic_gc_survives_an_error(clock, captured_logs):
    store = MemoryStore(clock)
    policy = TokenBucket(rate=1, burst=1)
    store.check("good", policy)
    store._tables[policy]["bad"] = "not a time"
    store.start_gc(10)
    clock.advance(10)
    assert [e for e in captured_logs if "log_failure" in e]
    del store._tables[policy]["bad"]
    store.check("new", policy)
    clock.advance(10)
    assert len(store) == 0
    store.stop_gc()
    assert clock.getDelayedCalls() == []


# --- headers ------------------------------------------------------------------

_ITEM = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*"(?:;[a-z*][a-z0-9_.*-]*=\d+)+'


def test_headers_of_an_allowed_request():
    store = MemoryStore(Clock())
    policy = SlidingWindow(limit=100, window=60)
    decision = store.check("a", policy)
    assert rate_limit_headers(policy, decision) == [
        (b"RateLimit-Policy", b'"default";q=100;w=60'),
        (b"RateLimit", b'"default";r=99;t=120'),
    ]


def test_headers_of_a_refused_request(clock):
    store = MemoryStore(clock)
    policy = TokenBucket(rate=0.1, burst=2, name="per-client")
    store.check("a", policy)
    store.check("a", policy)
    refused = store.check("a", policy)
    headers = rate_limit_headers(policy, refused)
    assert headers == [
        (b"RateLimit-Policy", b'"per-client";q=2;w=20'),
        (b"RateLimit", b'"per-client";r=0;t=10'),
        (b"Retry-After", b"10"),
    ]


def test_header_values_are_structured_fields():
    policy = TokenBucket(rate=3, burst=1, name='odd "name" \\ here')
    for decision in (
        Decision(True, 1, 0, 0.3333333, 0.0),
        Decision(False, 1, 0, 0.3333333, 0.0001),
    ):
        headers = dict(rate_limit_headers(policy, decision))
        assert re.fullmatch(_ITEM, headers[b"RateLimit-Policy"].decode())
        assert re.fullmatch(_ITEM, headers[b"RateLimit"].decode())
        assert headers[b"RateLimit-Policy"].startswith(b'"odd \\"name\\" \\\\ here";q=1;w=1')
    # Retry-After is at least 1 and never earlier than t
    assert headers[b"Retry-After"] == b"1"
    assert headers[b"RateLimit"].endswith(b";r=0;t=1")


def test_sub_second_windows_advertise_one_second():
    policy = SlidingWindow(limit=5, window=0.25)
    assert rate_limit_headers(policy, Decision(True, 5, 4, 0.5, 0.0))[0] == (
        b"RateLimit-Policy",
        b'"default";q=5;w=1',
    )


def test_exact_seconds_are_not_rounded_up():
    policy = TokenBucket(rate=10, burst=30)  # 30 tokens in 0.1 * 30 = 3.0000000000000004 s
    assert rate_limit_headers(policy, Decision(True, 30, 0, 0.1 * 30, 0.0)) == [
        (b"RateLimit-Policy", b'"default";q=30;w=3'),
        (b"RateLimit", b'"default";r=0;t=3'),
    ]


# --- client_ip ----------------------------------------------------------------

TRUSTED = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


@pytest.mark.parametrize(
    "peer, xff, expected",
    [
        # an untrusted peer is the client, whatever it claims
        ("203.0.113.7", [b"198.51.100.1"], "203.0.113.7"),
        ("203.0.113.7", None, "203.0.113.7"),
        # a trusted peer: the right-most untrusted address
        ("10.0.0.1", [b"198.51.100.1"], "198.51.100.1"),
        ("10.0.0.1", [b"1.1.1.1, 198.51.100.1, 10.0.0.2"], "198.51.100.1"),
        ("10.0.0.1", [b"1.1.1.1, 198.51.100.1", b"10.0.0.3,10.0.0.2"], "198.51.100.1"),
        # every hop trusted: the left-most
        ("10.0.0.1", [b"10.1.1.1, 10.0.0.2"], "10.1.1.1"),
        # no or empty header: the peer
        ("10.0.0.1", None, "10.0.0.1"),
        ("10.0.0.1", [], "10.0.0.1"),
        ("10.0.0.1", [b""], "10.0.0.1"),
        # a malformed hop ends the walk at the last good one
        ("10.0.0.1", [b"1.1.1.1, unknown, 10.0.0.2"], "10.0.0.2"),
        ("10.0.0.1", [b"1.1.1.1, garbage"], "10.0.0.1"),
        # ports, brackets, IPv6, IPv4-mapped peers
        ("10.0.0.1", [b"198.51.100.1:4711"], "198.51.100.1"),
        ("10.0.0.1", [b"[2001:db8::1]:4711"], "2001:db8::1"),
        ("fd00::1", [b"2001:DB8:0:0::1"], "2001:db8::1"),
        ("::ffff:10.0.0.1", [b"198.51.100.1"], "198.51.100.1"),
        ("::ffff:203.0.113.7", [b"198.51.100.1"], "203.0.113.7"),
        ("10.0.0.1", [b"::ffff:198.51.100.1"], "198.51.100.1"),
        # not an IP peer (a UNIX socket): as it is
        ("unix", [b"198.51.100.1"], "unix"),
    ],
)
def test_client_ip(peer, xff, expected):
    assert client_ip(peer, xff, TRUSTED) == expected


def test_client_ip_trusts_nobody_by_default():
    assert client_ip("10.0.0.1", [b"198.51.100.1"], []) == "10.0.0.1"


# --- the redis_failure rule, with a fake store --------------------------------


@attrs.define
class FakeStore:
    """A store whose answers the test gives, one Deferred per call."""

    calls: list = attrs.field(factory=list)

    def check(self, key, policy):
        d = defer.Deferred()
        self.calls.append(d)
        return d

    def __str__(self):
        return "fake://"


ALLOWED = Decision(True, 5, 4, 1.0, 0.0)


def fail_with(d):
    d.errback(StoreUnavailable("fake://: down"))


@pytest.mark.parametrize("mode", ["open", "closed", "local"])
def test_limiter_passes_store_decisions_through(clock, mode):
    store = FakeStore()
    limiter = RateLimiter(store, clock, mode)
    d = limiter.check("a", TokenBucket(1, 5))
    store.calls[0].callback(ALLOWED)
    assert d.result is ALLOWED
    assert limiter.failures == 0 and not limiter.failing


def test_limiter_open(clock):
    store = FakeStore()
    limiter = RateLimiter(store, clock, "open")
    d = limiter.check("a", TokenBucket(1, 5))
    fail_with(store.calls[0])
    assert d.result == Decision(True, 5, 5, 0.0, 0.0, degraded=True)


def test_limiter_closed(clock):
    store = FakeStore()
    limiter = RateLimiter(store, clock, "closed", probe_interval=2.5)
    policy = SlidingWindow(3, 60)
    d = limiter.check("a", policy)
    fail_with(store.calls[0])
    assert d.result == Decision(False, 3, 0, 2.5, 2.5, degraded=True)
    assert rate_limit_headers(policy, d.result)[-1] == (b"Retry-After", b"3")


def test_limiter_local_falls_back_to_memory(clock):
    store = FakeStore()
    limiter = RateLimiter(store, clock, "local", probe_interval=1000)
    policy = TokenBucket(rate=1, burst=2)
    results = []
    for _ in range(3):
        limiter.check("a", policy).addCallback(results.append)
        if store.calls and not store.calls[-1].called:
            fail_with(store.calls[-1])
    assert [r.allowed for r in results] == [True, True, False]
    assert all(r.degraded for r in results)
    assert len(store.calls) == 1  # then the store is left alone
    assert len(limiter.fallback) == 1


def test_limiter_counts_failures_logs_once_and_probes(clock, captured_logs):
    store = FakeStore()
    seen = []
    limiter = RateLimiter(store, clock, "open", probe_interval=1.0, on_failure=seen.append)
    policy = TokenBucket(1, 5)

    # two requests in flight when Redis goes away
    first, second = limiter.check("a", policy), limiter.check("b", policy)
    fail_with(store.calls[0])
    fail_with(store.calls[1])
    assert first.result.degraded and second.result.degraded
    assert limiter.failing and limiter.failures == 2 and len(seen) == 2
    assert seen[0].check(StoreUnavailable)

    # for a probe interval, the store is not asked
    for _ in range(10):
        assert limiter.check("a", policy).result.degraded
    assert len(store.calls) == 2

    # then one request probes it, the others do not wait for it
    clock.advance(1.0)
    probe = limiter.check("a", policy)
    assert len(store.calls) == 3
    assert limiter.check("a", policy).result.degraded
    assert len(store.calls) == 3
    fail_with(store.calls[2])
    assert probe.result.degraded and limiter.failures == 3

    clock.advance(1.0)
    recovered = limiter.check("a", policy)
    store.calls[3].callback(ALLOWED)
    assert recovered.result is ALLOWED and not limiter.failing
    after = limiter.check("a", policy)
    assert len(store.calls) == 5
    store.calls[4].callback(ALLOWED)
    assert after.result is ALLOWED

    warnings = by_level(captured_logs, "warn")
    infos = by_level(captured_logs, "info")
    assert len(warnings) == 1 and "fake://" in warnings[0]["store"]
    assert len(infos) == 1 and infos[0]["failures"] == 3

    # a second outage is logged again
    limiter.check("a", policy)
    fail_with(store.calls[5])
    assert len(by_level(captured_logs, "warn")) == 2
    assert limiter.failures == 4


def test_limiter_survives_a_broken_metrics_callback(clock, captured_logs):
    store = FakeStore()

    def broken(failure):
        raise RuntimeError("metrics are down too")

    limiter = RateLimiter(store, clock, "open", on_failure=broken)
    d = limiter.check("a", TokenBucket(1, 5))
    fail_with(store.calls[0])
    assert d.result.allowed and d.result.degraded
    assert [e for e in captured_logs if "log_failure" in e]


def test_limiter_failure_mode_per_call(clock, captured_logs):
    """
    One limiter serves policies with different redis_failure rules: each
    request gets its own rule, the outage is logged once.
    """
    store = FakeStore()
    limiter = RateLimiter(store, clock, "open", probe_interval=60)
    policy = TokenBucket(rate=1, burst=1)
    first = limiter.check("a", policy, "closed")
    fail_with(store.calls[0])
    assert not first.result.allowed and first.result.degraded
    assert limiter.check("a", policy).result.allowed  # the limiter's own: open
    local = [limiter.check("a", policy, "local").result for _ in range(2)]
    assert [d.allowed for d in local] == [True, False]
    assert len(store.calls) == 1
    assert len(by_level(captured_logs, "warn")) == 1
    with pytest.raises(ValueError):
        limiter.check("a", policy, "maybe")


def test_limiter_refuses_unknown_modes(clock):
    with pytest.raises(ValueError):
        RateLimiter(FakeStore(), clock, "maybe")


# --- Redis --------------------------------------------------------------------


def test_redis_store_from_url():
    store = RedisStore.from_url(reactor, "redis://user:s%40cret@redis.example:6380/3", timeout=0.2)
    assert (store.host, store.port, store.db, store.username, store.password, store.tls) == (
        "redis.example", 6380, 3, "user", "s@cret", False)
    assert store.timeout == 0.2 and store.connect_timeout == 0.2
    assert str(store) == "redis://redis.example:6380/3"
    tls = RedisStore.from_url(reactor, "rediss://:pw@h")
    assert (tls.host, tls.port, tls.db, tls.password, tls.tls) == ("h", 6379, 0, "pw", True)
    unix = RedisStore.from_url(reactor, "unix:///run/redis.sock?db=2&password=pw-xyz")
    assert (unix.unix_path, unix.db, unix.password) == ("/run/redis.sock", 2, "pw-xyz")
    assert "pw-xyz" not in repr(unix)
    assert str(unix) == "unix:///run/redis.sock?db=2"
    with pytest.raises(ValueError):
        RedisStore.from_url(reactor, "http://h")


def test_scripts_are_named_by_their_sha():
    import hashlib

    for script in (TOKEN_BUCKET_LUA, SLIDING_WINDOW_LUA):
        assert script.sha == hashlib.sha1(script.text.encode()).hexdigest()


@pytest.fixture
def redis_client():
    client = redis.Redis(host="127.0.0.1", port=6379, db=0, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.fail(f"these tests need Redis on 127.0.0.1:6379: {e}")
    yield client
    client.close()


@pytest.fixture
def prefix(redis_client):
    value = f"test:ratelimit:{uuid.uuid4().hex}:"
    yield value
    keys = list(redis_client.scan_iter(match=value + "*", count=1000))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def no_leftover_calls():
    baseline = set(reactor.getDelayedCalls())
    yield
    # txredisapi hands a new connection over on the next reactor turn
    leftovers = [c for c in reactor.getDelayedCalls() if c not in baseline and c.active()]
    assert leftovers == []


def redis_store(prefix, **kwargs):
    kwargs.setdefault("timeout", 2.0)
    return RedisStore(reactor, prefix=prefix, **kwargs)


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.inlineCallbacks
def test_redis_store_provides_the_interface(prefix):
    store = redis_store(prefix)
    assert verifyObject(IRateLimitStore, store)
    yield store.close()


@pytest_twisted.inlineCallbacks
def test_redis_token_bucket(redis_client, prefix, no_leftover_calls):
    store = redis_store(prefix)
    policy = TokenBucket(rate=0.5, burst=3)
    try:
        decisions = []
        for _ in range(4):
            decisions.append((yield store.check("a", policy)))
        assert [d.allowed for d in decisions] == [True, True, True, False]
        assert [d.remaining for d in decisions] == [2, 1, 0, 0]
        assert all(d.limit == 3 for d in decisions)
        assert 1.5 < decisions[3].retry_after <= 2.0
        assert 5.5 < decisions[3].reset <= 6.0
        # another key, its own bucket
        assert (yield store.check("b", policy)).remaining == 2
        # the key lives as long as the bucket takes to fill up again
        key = prefix + policy.storage_id + ":a"
        assert 5500 < redis_client.pttl(key) <= 6000
    finally:
        yield store.close()


@pytest_twisted.inlineCallbacks
def test_redis_token_bucket_refills(prefix, no_leftover_calls):
    store = redis_store(prefix)
    policy = TokenBucket(rate=20, burst=1)
    try:
        assert (yield store.check("a", policy)).allowed
        refused = yield store.check("a", policy)
        assert not refused.allowed and 0 < refused.retry_after <= 0.05
        yield sleep(refused.retry_after + 0.01)
        assert (yield store.check("a", policy)).allowed
    finally:
        yield store.close()


@pytest_twisted.inlineCallbacks
def test_redis_sliding_window(redis_client, prefix, no_leftover_calls):
    store = redis_store(prefix)
    policy = SlidingWindow(limit=3, window=100_000)  # no window edge during the test
    try:
        decisions = []
        for _ in range(4):
            decisions.append((yield store.check("a", policy)))
        assert [d.allowed for d in decisions] == [True, True, True, False]
        assert [d.remaining for d in decisions] == [2, 1, 0, 0]
        # the same arithmetic as the memory store, at Redis's time
        seconds, micros = redis_client.time()
        now = seconds + micros / 1e6
        clock = Clock()
        clock.advance(now)
        memory = MemoryStore(clock)
        expected = [memory.check("a", policy) for _ in range(4)][3]
        assert decisions[3].retry_after == pytest.approx(expected.retry_after, abs=1.0)
        assert decisions[3].reset == pytest.approx(expected.reset, abs=1.0)
        key = prefix + policy.storage_id + ":a"
        assert redis_client.hgetall(key)[b"c"] == b"3"
        assert 0 < redis_client.pttl(key) <= 200_000_000
    finally:
        yield store.close()


@pytest_twisted.inlineCallbacks
def test_redis_sliding_window_moves_on(prefix, no_leftover_calls):
    store = redis_store(prefix)
    policy = SlidingWindow(limit=2, window=0.2)
    try:
        allowed = 0
        refused = None
        while refused is None:
            d = yield store.check("a", policy)
            if d.allowed:
                allowed += 1
            else:
                refused = d
        assert allowed >= 2 and 0 < refused.retry_after <= 0.4
        yield sleep(refused.retry_after + 0.02)
        assert (yield store.check("a", policy)).allowed
    finally:
        yield store.close()


@pytest_twisted.inlineCallbacks
def test_redis_decisions_are_atomic_and_shared(prefix, no_leftover_calls):
    """
    Two gateways, 60 requests at once: exactly the limit passes.
    """
    first, second = redis_store(prefix), redis_store(prefix)
    policy = SlidingWindow(limit=25, window=100_000)
    try:
        decisions = yield defer.gatherResults(
            [store.check("a", policy) for _ in range(30) for store in (first, second)]
        )
        assert sum(d.allowed for d in decisions) == 25
    finally:
        yield first.close()
        yield second.close()


@pytest_twisted.inlineCallbacks
def test_redis_noscript_reloads(redis_client, prefix, no_leftover_calls):
    store = redis_store(prefix)
    policy = TokenBucket(rate=1, burst=2)
    try:
        # as after a Redis restart or SCRIPT FLUSH: the server knows no such sha
        unknown = "0" * 40
        assert redis_client.script_exists(unknown) == [False]
        store._shas[TOKEN_BUCKET_LUA.name] = unknown
        both = yield defer.gatherResults([store.check("a", policy), store.check("a", policy)])
        assert [d.allowed for d in both] == [True, True]
        assert store._shas[TOKEN_BUCKET_LUA.name] == TOKEN_BUCKET_LUA.sha
        assert not (yield store.check("a", policy)).allowed
    finally:
        yield store.close()


def closed_port():
    """A local port nobody listens on (bound, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Silent(protocol.Protocol):
    """Accepts the connection and never answers."""


@pytest_twisted.inlineCallbacks
def test_redis_down_fails_within_the_timeout(prefix, no_leftover_calls):
    store = RedisStore(reactor, port=closed_port(), prefix=prefix, timeout=0.2)
    try:
        for _ in range(2):
            start = time.monotonic()
            with pytest.raises(StoreUnavailable, match="no answer within 0.2 s"):
                yield store.check("a", TokenBucket(1, 1))
            assert time.monotonic() - start < 1.0
    finally:
        yield store.close()


@pytest_twisted.inlineCallbacks
def test_redis_down_fails_at_once_once_started(prefix, no_leftover_calls):
    store = RedisStore(
        reactor, port=closed_port(), prefix=prefix, timeout=0.3, connect_timeout=0.1
    )
    try:
        with pytest.raises(StoreUnavailable, match="no answer"):
            yield store.check("a", TokenBucket(1, 1))
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match="not connected"):
            yield store.check("a", TokenBucket(1, 1))
        assert time.monotonic() - start < 0.1
    finally:
        yield store.close()


@pytest_twisted.inlineCallbacks
def test_redis_not_answering_fails_within_the_timeout(prefix, no_leftover_calls):
    factory = protocol.Factory.forProtocol(Silent)
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
    store = RedisStore(
        reactor, port=listening.getHost().port, prefix=prefix, timeout=0.2
    )
    try:
        for _ in range(2):
            start = time.monotonic()
            with pytest.raises(StoreUnavailable):
                yield store.check("a", SlidingWindow(1, 1))
            assert time.monotonic() - start < 1.0
    finally:
        yield store.close()
        yield listening.stopListening()
        yield sleep(0.05)  # let the aborted server-side connections go


@pytest_twisted.inlineCallbacks
@pytest.mark.parametrize("mode, allowed", [("open", True), ("closed", False), ("local", True)])
def test_limiter_over_a_dead_redis(prefix, captured_logs, no_leftover_calls, mode, allowed):
    store = RedisStore(reactor, port=closed_port(), prefix=prefix, timeout=0.1)
    limiter = RateLimiter(store, reactor, mode, probe_interval=60)
    try:
        decisions = []
        for _ in range(5):
            decisions.append((yield limiter.check("a", TokenBucket(1, 10))))
        assert all(d.degraded and d.allowed is allowed for d in decisions)
        assert limiter.failures == 1  # then it waits for the probe interval
        assert len(by_level(captured_logs, "warn")) == 1
    finally:
        yield store.close()


@pytest_twisted.inlineCallbacks
def test_redis_store_reconnects_after_a_restart(prefix, captured_logs, no_leftover_calls):
    """
    Redis "restarts" (a TCP forwarder in front of it stops, then starts again
    on the same port): the same store decides again, by itself.
    """
    forwarder = portforward.ProxyFactory("127.0.0.1", 6379)
    listening = reactor.listenTCP(0, forwarder, interface="127.0.0.1")
    port = listening.getHost().port
    store = RedisStore(
        reactor, port=port, prefix=prefix, timeout=0.2, max_reconnect_delay=0.3
    )
    limiter = RateLimiter(store, reactor, "closed", probe_interval=0.1)
    policy = TokenBucket(rate=1, burst=100)
    try:
        first = yield limiter.check("a", policy)
        assert first.allowed and not first.degraded

        # down: stop listening and cut the open connections
        yield listening.stopListening()
        for connection in list(reactor.getWriters()) + list(reactor.getReaders()):
            if isinstance(getattr(connection, "protocol", None), portforward.Proxy):
                connection.abortConnection()
        yield sleep(0.05)
        down = yield limiter.check("a", policy)
        assert down.degraded and not down.allowed and limiter.failing

        # up again on the same port
        listening = reactor.listenTCP(port, forwarder, interface="127.0.0.1")
        deadline = time.monotonic() + 5
        while True:
            yield sleep(0.1)
            decision = yield limiter.check("a", policy)
            if not decision.degraded or time.monotonic() > deadline:
                break
        assert not decision.degraded and decision.allowed
        assert decision.remaining == 98 - 0  # the bucket survived in Redis
        assert not limiter.failing
        assert len(by_level(captured_logs, "warn")) == 1
        assert len(by_level(captured_logs, "info")) == 1
    finally:
        yield store.close()
        yield listening.stopListening()
        yield sleep(0.05)
