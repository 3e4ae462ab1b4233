"""
Load balancers: the policies that choose a service's backend for a request.

Every balancer implements L{IBalancer} and is built the same way::

    balancer = Cls(backends, load, rng)

with the service's backends in config order, C{load(backend)} returning the
number of requests in flight to that backend right now (an L{int}), and a
L{random.Random} for every random decision (seed it in tests). L{BALANCERS}
maps each policy's config name to its class; L{make_balancer} builds one by
name. Balancers decide nothing about health: C{pick(available, key)} is
given the backends usable right now (a subsequence of C{backends}, in config
order) and returns one of them, or L{None} when C{available} is empty.

Balancers keep plain Python state and are meant to be used from the reactor
thread only.

Sources: nginx's smooth weighted round robin (commit 52327e0 "Upstream:
smooth weighted round-robin balancing", C{ngx_http_upstream_get_peer} in
C{src/http/ngx_http_upstream_round_robin.c}); Karger et al., "Consistent
Hashing and Random Trees" (STOC 1997) and libketama's 160 points per server;
Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing" (IEEE
TPDS, 2001) and Envoy's LEAST_REQUEST load balancer
(U{https://www.envoyproxy.io/docs/envoy/latest/intro/arch_overview/upstream/load_balancing/load_balancers}).
"""

from __future__ import annotations

import bisect
import hashlib
import random
from typing import Callable, Mapping, Optional, Sequence, Union

import attrs
from zope.interface import implementer

from gateway.config import Backend
from gateway.interfaces import IBalancer

Load = Callable[[Backend], int]


def _weighted_random(available: Sequence[Backend], rng: random.Random) -> Backend:
    """One of C{available} (non-empty) drawn with probability proportional to its weight."""
    if len(available) == 1:
        return available[0]
    return rng.choices(available, weights=[b.weight for b in available])[0]


@implementer(IBalancer)
@attrs.define
class RoundRobin:
    """
    Plain round robin in config order, ignoring weights.

    The cursor walks the full backend list, skipping backends that are not
    available, so the rotation keeps its order when backends come and go.
    """

    _backends: Sequence[Backend]
    _load: Load
    _rng: random.Random
    _next: int = 0

    def pick(self, available: Sequence[Backend], key: Optional[bytes] = None) -> Optional[Backend]:
        if not available:
            return None
        usable = set(available)
        count = len(self._backends)
        for step in range(count):
            index = (self._next + step) % count
            if self._backends[index] in usable:
                self._next = index + 1
                return self._backends[index]
        # Only backends we were not built with: still serve the request.
        return available[0]


@implementer(IBalancer)
@attrs.define
class WeightedRoundRobin:
    """
    Smooth weighted round robin, as nginx's C{ngx_http_upstream_get_peer}.

    On each pick every available backend's current weight grows by its
    weight; the backend with the greatest current weight (the first in
    config order on a tie) is chosen and its current weight lowered by the
    sum of the available weights. Weights 5:1:1 give C{a a b a c a a}, 3:1
    give C{a a b a}. Unavailable backends are skipped exactly as nginx skips
    down or failed peers: their current weight is left untouched.
    """

    _backends: Sequence[Backend]
    _load: Load
    _rng: random.Random
    _current: dict = attrs.field(factory=dict)

    def pick(self, available: Sequence[Backend], key: Optional[bytes] = None) -> Optional[Backend]:
        best: Optional[Backend] = None
        best_weight = 0
        total = 0
        current = self._current
        for backend in available:
            weight = current.get(backend, 0) + backend.weight
            current[backend] = weight
            total += backend.weight
            if best is None or weight > best_weight:
                best, best_weight = backend, weight
        if best is not None:
            current[best] -= total
        return best


@implementer(IBalancer)
@attrs.define
class LeastConnections:
    """
    The backend with the fewest requests in flight per unit of weight
    (smallest C{load(b) / b.weight}), ties broken at random.
    """

    _backends: Sequence[Backend]
    _load: Load
    _rng: random.Random

    def pick(self, available: Sequence[Backend], key: Optional[bytes] = None) -> Optional[Backend]:
        best: list[Backend] = []
        best_load, best_weight = 0, 1
        for backend in available:
            load = self._load(backend)
            # load / weight < best_load / best_weight, without floats.
            if not best or load * best_weight < best_load * backend.weight:
                best, best_load, best_weight = [backend], load, backend.weight
            elif load * best_weight == best_load * backend.weight:
                best.append(backend)
        if not best:
            return None
        return best[0] if len(best) == 1 else self._rng.choice(best)


def _ring_hash(data: bytes) -> int:
    """A stable 64-bit hash: the first 8 bytes of BLAKE2b, big-endian."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@implementer(IBalancer)
@attrs.define
class ConsistentHash:
    """
    Consistent hashing on a ring with virtual nodes (Karger et al., 1997).

    Each backend owns C{replicas * weight} points on a 64-bit ring, at
    C{blake2b("<url>#<i>")}; a key is served by the owner of the first point
    at or after C{blake2b(key)}, walking clockwise past points of
    unavailable backends. Removing one backend of N (from the config or from
    C{available}) therefore moves only the keys it owned, about 1/N of them;
    adding one moves about 1/(N+1), all to the new backend. The hash is
    stable across processes and restarts (unlike L{hash}).

    A request without a key (L{None}) goes to a backend chosen at random in
    proportion to its weight.

    @ivar replicas: points per unit of weight (160, as libketama).
    """

    _backends: Sequence[Backend]
    _load: Load
    _rng: random.Random
    replicas: int = 160
    _points: list = attrs.field(init=False, repr=False)
    _owners: list = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        ring = sorted(
            (_ring_hash(f"{b.url}#{i}".encode("utf-8")), index)
            for index, b in enumerate(self._backends)
            for i in range(self.replicas * b.weight)
        )
        self._points = [point for point, _ in ring]
        self._owners = [self._backends[index] for _, index in ring]

    def pick(self, available: Sequence[Backend], key: Optional[bytes] = None) -> Optional[Backend]:
        if not available:
            return None
        if key is None or not self._points:
            return _weighted_random(available, self._rng)
        usable = set(available)
        start = bisect.bisect_left(self._points, _ring_hash(key))
        count = len(self._owners)
        for step in range(count):
            owner = self._owners[(start + step) % count]
            if owner in usable:
                return owner
        # Only backends we were not built with: still serve the request.
        return _weighted_random(available, self._rng)


@implementer(IBalancer)
@attrs.define
class WeightedRandom:
    """A backend drawn at random, with probability proportional to its weight."""

    _backends: Sequence[Backend]
    _load: Load
    _rng: random.Random

    def pick(self, available: Sequence[Backend], key: Optional[bytes] = None) -> Optional[Backend]:
        if not available:
            return None
        return _weighted_random(available, self._rng)


@implementer(IBalancer)
@attrs.define
class LeastRequest:
    """
    The power of two random choices (Mitzenmacher, 2001), as Envoy's
    C{LEAST_REQUEST} with C{choice_count: 2}.

    Two distinct candidates are drawn at random in proportion to their
    weights; the one with fewer requests in flight per unit of weight
    (C{load(b) / b.weight}) wins, the first drawn on a tie. This avoids
    both the herd behaviour of a global least-connections pick under stale
    counts and the blindness of pure random. (Envoy handles unequal weights
    with a scheduler over C{weight / (active + 1)}; weighted sampling plus
    the per-weight comparison gives the same preference here.)
    """

    _backends: Sequence[Backend]
    _load: Load
    _rng: random.Random

    def pick(self, available: Sequence[Backend], key: Optional[bytes] = None) -> Optional[Backend]:
        if len(available) <= 1:
            return available[0] if available else None
        first = _weighted_random(available, self._rng)
        second = _weighted_random([b for b in available if b is not first], self._rng)
        if self._load(second) * first.weight < self._load(first) * second.weight:
            return second
        return first


BALANCERS: dict[str, type] = {
    "round_robin": RoundRobin,
    "weighted_round_robin": WeightedRoundRobin,
    "least_connections": LeastConnections,
    "consistent_hash": ConsistentHash,
    "random": WeightedRandom,
    "least_request": LeastRequest,
}
"""The balancing policies by their config name."""


def make_balancer(
    name: str,
    backends: Sequence[Backend],
    load: Load,
    rng: random.Random,
    hash_on: Optional[str] = None,
) -> IBalancer:
    """
    Build the balancer called C{name} for C{backends}.

    @param name: a key of L{BALANCERS}.
    @param hash_on: what C{consistent_hash} hashes (see L{hash_key}); it
        is required for C{consistent_hash} and refused for other policies.
    @raise ValueError: unknown C{name}, malformed C{hash_on}, C{hash_on}
        missing for C{consistent_hash} or given for another policy.
    """
    try:
        cls = BALANCERS[name]
    except KeyError:
        raise ValueError(
            f"unknown balancer {name!r}; expected one of {', '.join(BALANCERS)}"
        ) from None
    if name == "consistent_hash":
        if hash_on is None:
            raise ValueError("consistent_hash needs hash_on")
        parse_hash_on(hash_on)
    elif hash_on is not None:
        raise ValueError(f"hash_on only applies to consistent_hash, not {name}")
    return cls(backends, load, rng)


# --- hash keys -----------------------------------------------------------------

Lookup = Union[Callable[[bytes], Optional[bytes]], Mapping[bytes, bytes]]


def parse_hash_on(spec: str) -> tuple[str, Optional[bytes]]:
    """
    Split a C{hash_on} setting into its kind and name.

    C{"client_ip"} -> C{("client_ip", None)}, C{"path"} -> C{("path", None)},
    C{"header:X-User"} -> C{("header", b"x-user")} (header names are
    lower-cased: they are case-insensitive), C{"cookie:session"} ->
    C{("cookie", b"session")} (cookie names are case-sensitive).

    @raise ValueError: any other form, or an empty or non-ASCII name.
    """
    if spec in ("client_ip", "path"):
        return spec, None
    kind, sep, name = spec.partition(":")
    if sep and kind in ("header", "cookie") and name and name.isascii() and name.strip() == name:
        raw = name.encode("ascii")
        return kind, raw.lower() if kind == "header" else raw
    raise ValueError(
        f"bad hash_on {spec!r}; expected client_ip, path, header:NAME or cookie:NAME"
    )


def _lookup(source: Optional[Lookup], name: bytes) -> Optional[bytes]:
    if source is None:
        return None
    if callable(source):
        return source(name)
    return source.get(name)


def hash_key(
    hash_on: str,
    client_ip: Optional[str] = None,
    headers: Optional[Lookup] = None,
    cookies: Optional[Lookup] = None,
    path: Optional[bytes] = None,
) -> Optional[bytes]:
    """
    The consistent-hash key of a request, from plain inputs.

    With a Twisted request::

        hash_key(spec, client_ip=request.getClientAddress().host,
                 headers=request.getHeader, cookies=request.getCookie,
                 path=request.path)

    @param hash_on: C{client_ip}, C{header:NAME}, C{cookie:NAME} or C{path}.
    @param client_ip: the client's address as text, e.g. C{"192.0.2.7"}.
    @param headers: a callable C{name -> value or None} (such as
        C{request.getHeader}, which ignores case) or a mapping keyed by
        lower-case header names as L{bytes}.
    @param cookies: the same for cookies, names as configured.
    @param path: the request path as L{bytes}, without the query.
    @return: the key as L{bytes}, or L{None} when the request has no such
        value (the balancer then picks at random).
    @raise ValueError: C{hash_on} is malformed (see L{parse_hash_on}).
    """
    kind, name = parse_hash_on(hash_on)
    if kind == "client_ip":
        return client_ip.encode("utf-8") if client_ip else None
    if kind == "path":
        return path
    assert name is not None
    value = _lookup(headers if kind == "header" else cookies, name)
    if isinstance(value, str):
        value = value.encode("utf-8")
    return value
