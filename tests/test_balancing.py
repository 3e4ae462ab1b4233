"""Tests for gateway.balancing."""

import collections
import random

import pytest
from zope.interface.verify import verifyObject

from gateway.balancing import (
    BALANCERS,
    ConsistentHash,
    LeastConnections,
    LeastRequest,
    RoundRobin,
    WeightedRandom,
    WeightedRoundRobin,
    hash_key,
    make_balancer,
    parse_hash_on,
)
from gateway.config import Backend
from gateway.interfaces import IBalancer


def backends(*weights):
    return [Backend.from_url(f"http://127.0.0.1:{9001 + i}", weight=w) for i, w in enumerate(weights)]


def no_load(backend):
    return 0


def build(cls, pool, load=no_load, seed=1):
    return cls(pool, load, random.Random(seed))


def names(pool, picks):
    return "".join("abcdefghijklmnopqrstuvwxyz"[pool.index(p)] for p in picks)


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_every_balancer_provides_the_interface(name):
    assert verifyObject(IBalancer, build(BALANCERS[name], backends(1, 1)))


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_empty_gives_none(name):
    balancer = build(BALANCERS[name], backends(1, 2))
    assert balancer.pick([], b"key") is None
    assert balancer.pick([]) is None


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_unavailable_backends_are_skipped(name):
    pool = backends(1, 5, 1, 2)
    balancer = build(BALANCERS[name], pool)
    available = [pool[0], pool[2]]
    picks = [balancer.pick(available, f"k{i}".encode()) for i in range(300)]
    assert set(picks) == set(available)
    assert balancer.pick([pool[3]], b"k") is pool[3]


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_every_available_backend_is_used(name):
    pool = backends(1, 1, 1)
    balancer = build(BALANCERS[name], pool)
    picks = {balancer.pick(pool, f"k{i}".encode()) for i in range(300)}
    assert picks == set(pool)


def test_round_robin_order_and_skipping():
    pool = backends(1, 5, 1)  # weights are ignored
    rr = build(RoundRobin, pool)
    assert names(pool, [rr.pick(pool) for _ in range(7)]) == "abcabca"
    # b is down: the rotation goes on in config order without it.
    assert names(pool, [rr.pick([pool[0], pool[2]]) for _ in range(4)]) == "caca"
    assert names(pool, [rr.pick(pool) for _ in range(3)]) == "bca"


def test_smooth_wrr_5_1_1_as_nginx():
    pool = backends(5, 1, 1)
    wrr = build(WeightedRoundRobin, pool)
    assert names(pool, [wrr.pick(pool) for _ in range(14)]) == "aabacaa" * 2


def test_smooth_wrr_3_1():
    pool = backends(3, 1)
    wrr = build(WeightedRoundRobin, pool)
    assert names(pool, [wrr.pick(pool) for _ in range(8)]) == "aaba" * 2


def test_smooth_wrr_skips_unavailable_as_nginx():
    pool = backends(5, 1, 1)
    wrr = build(WeightedRoundRobin, pool)
    assert wrr.pick(pool) is pool[0]  # current weights now a -2, b 1, c 1
    # a is down: b and c share; a's current weight stays at -2 (neither
    # grown nor reset), so when a is back b wins the second pick.
    assert names(pool, [wrr.pick(pool[1:]) for _ in range(2)]) == "bc"
    assert names(pool, [wrr.pick(pool) for _ in range(3)]) == "aba"


def test_smooth_wrr_weighted_distribution():
    pool = backends(4, 2, 1)
    wrr = build(WeightedRoundRobin, pool)
    counts = collections.Counter(wrr.pick(pool) for _ in range(700))
    assert [counts[b] for b in pool] == [400, 200, 100]


def test_random_weighted_distribution():
    pool = backends(3, 1)
    balancer = build(WeightedRandom, pool)
    counts = collections.Counter(balancer.pick(pool) for _ in range(10_000))
    assert 0.72 < counts[pool[0]] / 10_000 < 0.78


def test_least_connections_picks_least_loaded():
    pool = backends(1, 1, 1)
    loads = {pool[0]: 5, pool[1]: 2, pool[2]: 7}
    lc = build(LeastConnections, pool, loads.__getitem__)
    assert {lc.pick(pool) for _ in range(20)} == {pool[1]}
    assert lc.pick([pool[0], pool[2]]) is pool[0]


def test_least_connections_respects_weights():
    pool = backends(4, 1)
    # 6/4 = 1.5 per unit of weight beats 2/1.
    loads = {pool[0]: 6, pool[1]: 2}
    lc = build(LeastConnections, pool, loads.__getitem__)
    assert lc.pick(pool) is pool[0]
    loads[pool[0]] = 9  # 2.25 > 2
    assert lc.pick(pool) is pool[1]


def test_least_connections_breaks_ties_at_random():
    pool = backends(1, 2, 1)
    loads = {pool[0]: 1, pool[1]: 2, pool[2]: 3}  # a and b tie at 1 per weight
    lc = build(LeastConnections, pool, loads.__getitem__)
    counts = collections.Counter(lc.pick(pool) for _ in range(1000))
    assert set(counts) == {pool[0], pool[1]}
    assert 400 < counts[pool[0]] < 600


def test_least_request_prefers_less_loaded():
    pool = backends(1, 1, 1, 1)
    loads = {pool[0]: 0, pool[1]: 10, pool[2]: 10, pool[3]: 10}
    lr = build(LeastRequest, pool, loads.__getitem__)
    counts = collections.Counter(lr.pick(pool) for _ in range(4000))
    # a wins whenever drawn as one of the two distinct candidates: 1/2.
    assert 0.45 < counts[pool[0]] / 4000 < 0.55
    # The most loaded backend never wins against a less loaded one.
    loads.update({pool[1]: 1, pool[2]: 2, pool[3]: 3})
    counts = collections.Counter(lr.pick(pool) for _ in range(4000))
    assert counts[pool[3]] == 0
    assert counts[pool[0]] > counts[pool[1]] > counts[pool[2]] > 0


def test_least_request_weighs_load_by_weight():
    pool = backends(3, 1)
    loads = {pool[0]: 5, pool[1]: 2}  # 5/3 < 2/1
    lr = build(LeastRequest, pool, loads.__getitem__)
    assert {lr.pick(pool) for _ in range(50)} == {pool[0]}


# --- consistent hashing ---------------------------------------------------------

KEYS = [f"user-{i}".encode() for i in range(10_000)]


def assignment(balancer, available):
    return {key: balancer.pick(available, key) for key in KEYS}


def test_consistent_hash_same_key_same_backend():
    pool = backends(*[1] * 5)
    ring = build(ConsistentHash, pool)
    first = assignment(ring, pool)
    assert assignment(ring, pool) == first
    # A new balancer, another seed: the hash does not depend on the process.
    assert assignment(build(ConsistentHash, pool, seed=99), pool) == first
    counts = collections.Counter(first.values())
    assert all(1400 < counts[b] < 2600 for b in pool)


def test_consistent_hash_removal_moves_only_the_removed_backends_keys():
    pool = backends(*[1] * 10)
    ring = build(ConsistentHash, pool)
    before = assignment(ring, pool)
    gone = pool[3]
    rest = [b for b in pool if b is not gone]
    unavailable = assignment(ring, rest)
    removed = assignment(build(ConsistentHash, rest, seed=99), pool)
    # An unavailable backend's keys walk clockwise to the next point, just
    # where they land when the backend is removed from the ring.
    assert unavailable == removed
    for after in (unavailable, removed):
        moved = [k for k in KEYS if after[k] != before[k]]
        assert all(before[k] is gone for k in moved)
        assert all(after[k] is not gone for k in KEYS)
        assert 0.5 / 10 < len(moved) / len(KEYS) < 1.6 / 10


def test_consistent_hash_adding_moves_about_one_nth_to_the_new_backend():
    pool = backends(*[1] * 11)
    before = assignment(build(ConsistentHash, pool[:10]), pool[:10])
    after = assignment(build(ConsistentHash, pool), pool)
    moved = [k for k in KEYS if after[k] != before[k]]
    assert all(after[k] is pool[10] for k in moved)
    assert 0.5 / 11 < len(moved) / len(KEYS) < 1.6 / 11


def test_consistent_hash_respects_weights():
    pool = backends(3, 1)
    counts = collections.Counter(assignment(build(ConsistentHash, pool), pool).values())
    assert 0.68 < counts[pool[0]] / len(KEYS) < 0.82


def test_consistent_hash_without_key_is_weighted_random():
    pool = backends(1, 1)
    ring = build(ConsistentHash, pool)
    counts = collections.Counter(ring.pick(pool, None) for _ in range(1000))
    assert 400 < counts[pool[0]] < 600


# --- make_balancer and hash keys ------------------------------------------------


def test_make_balancer():
    pool = backends(1, 1)
    assert isinstance(make_balancer("weighted_round_robin", pool, no_load, random.Random(1)),
                      WeightedRoundRobin)
    ring = make_balancer("consistent_hash", pool, no_load, random.Random(1), hash_on="header:X-User")
    assert isinstance(ring, ConsistentHash)
    with pytest.raises(ValueError, match="unknown balancer"):
        make_balancer("fastest", pool, no_load, random.Random(1))
    with pytest.raises(ValueError, match="needs hash_on"):
        make_balancer("consistent_hash", pool, no_load, random.Random(1))
    with pytest.raises(ValueError, match="bad hash_on"):
        make_balancer("consistent_hash", pool, no_load, random.Random(1), hash_on="query:x")
    with pytest.raises(ValueError, match="only applies"):
        make_balancer("round_robin", pool, no_load, random.Random(1), hash_on="path")


@pytest.mark.parametrize("spec", ["", "ip", "header:", "cookie", "header: x", "query:a", "header:é"])
def test_parse_hash_on_refuses(spec):
    with pytest.raises(ValueError):
        parse_hash_on(spec)


def test_hash_key():
    headers = {b"x-user": b"alice"}
    cookies = {b"Session": b"s1"}
    kw = dict(client_ip="192.0.2.7", headers=headers, cookies=cookies, path=b"/a/b")
    assert hash_key("client_ip", **kw) == b"192.0.2.7"
    assert hash_key("path", **kw) == b"/a/b"
    assert hash_key("header:X-User", **kw) == b"alice"
    assert hash_key("header:X-Other", **kw) is None
    assert hash_key("cookie:Session", **kw) == b"s1"
    assert hash_key("cookie:session", **kw) is None
    assert hash_key("client_ip") is None
    # Callables, such as request.getHeader, get the lower-cased header name.
    seen = []
    assert hash_key("header:X-User", headers=lambda n: seen.append(n) or b"bob") == b"bob"
    assert seen == [b"x-user"]
    assert hash_key("cookie:c", cookies=lambda n: "text") == b"text"
