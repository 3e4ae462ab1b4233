"""
Rate limiting in the request pipeline (order 50, after auth, before the
cache): the C{rate_limit} key of routes, services and the top level, the
top-level C{trusted_proxies} list, and the filter that answers 429.

    trusted_proxies: [10.0.0.0/8]      # peers whose X-Forwarded-For is believed
    redis: {url: "redis://127.0.0.1:6379/0", timeout: 50ms}
    rate_limit:                        # top level: one limit for all routes
      algorithm: token_bucket          # token_bucket | sliding_window
      rate: 10                         # token_bucket: tokens per second
      burst: 20                        # token_bucket: bucket size (default: rate, rounded up)
      # limit: 100                     # sliding_window: requests per window
      # window: 60s                    # sliding_window: window length
      key: client_ip                   # client_ip | header:NAME | consumer | route | global
      store: memory                    # memory | redis
      redis_failure: local             # open | closed | local (redis store only)
      redis_prefix: "txgateway:rl:"    # Redis key prefix (redis store only)
      name: default                    # the policy's name in the RateLimit headers

The most specific C{rate_limit} applies: the route's, else its service's,
else the top-level one; C{rate_limit: false} turns an inherited one off.
Where a policy is written decides which requests share its buckets (the
I{scope}): a route's policy counts that route's requests only, a service's
the requests of all its routes together, a top-level policy those of every
route that inherits it. The C{key} then gives one bucket per client address,
header value, consumer, route or one for the whole scope (C{global}). A
missing header or an unauthenticated request is limited by its client
address, as Kong does.

Every limited response carries C{RateLimit-Policy} and C{RateLimit}
(replacing a backend's); refused requests get 429 with a JSON body and
C{Retry-After}. With C{store: redis} while Redis fails: C{open} lets
everything through (no RateLimit headers: nothing was counted), C{closed}
answers 429 with C{Retry-After} of the probe interval, C{local} limits each
gateway process on its own with the same policy. See docs/ratelimit.rst.

The counters for metrics are attributes of L{RateLimitFilter}; C{GET
/ratelimit} on the admin listener shows them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
from typing import Any, Callable, Optional, Union
from urllib.parse import quote

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from gateway.config import (
    Extension,
    ParseContext,
    Section,
    Where,
    integer,
    one_of,
    positive_duration,
    register,
    sequence,
    string,
)
from gateway.pipeline import Answer, register_filter
from gateway.ratelimit import (
    FAILURE_MODES,
    Decision,
    MemoryStore,
    RateLimiter,
    RedisStore,
    SlidingWindow,
    TokenBucket,
    client_ip,
    rate_limit_headers,
)
from gateway.redisconf import RedisConfig

NAME = "rate_limit"
TRUSTED_PROXIES = "trusted_proxies"
ORDER = 50

#: C{context.notes} key set to C{True} on a request refused with 429.
RATE_LIMITED = "rate_limited"

ALGORITHMS = ("token_bucket", "sliding_window")
KEYS = ("client_ip", "header:NAME", "consumer", "route", "global")
DEFAULT_PREFIX = "txgateway:rl:"
DEFAULT_FAILURE_MODE = "local"

#: Seconds between two sweeps of idle buckets of the memory store.
GC_INTERVAL = 10.0

#: Seconds between two attempts on a failing Redis (L{RateLimiter}): while
#: it is down, one request per interval tries it, the others follow
#: C{redis_failure} at once; also the C{Retry-After} of C{closed}.
PROBE_INTERVAL = 1.0

#: Key values (header values, consumers) longer than this many characters
#: are replaced by a hash, so that a client cannot make the gateway hold
#: kilobytes per bucket.
MAX_KEY_VALUE = 64

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")

_log = Logger()

Policy = Union[TokenBucket, SlidingWindow]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


# --- configuration ------------------------------------------------------------


@attrs.frozen
class KeySpec:
    """
    What a policy counts requests by.

    @ivar kind: C{"client_ip"}, C{"header"}, C{"consumer"}, C{"route"} or
        C{"global"}.
    @ivar header: the header's name (lower-case bytes) for C{"header"}.
    """

    kind: str = "client_ip"
    header: Optional[bytes] = None


@attrs.frozen
class RateLimitConfig:
    """
    One C{rate_limit} section.

    @ivar policy: the L{TokenBucket} or L{SlidingWindow}; L{None} for
        C{rate_limit: false}.
    @ivar level: where it is written, which is its scope: C{"route"},
        C{"service"} or C{"top"}.
    @ivar key: what requests are counted by.
    @ivar store: C{"memory"} (per process) or C{"redis"} (shared).
    @ivar redis_failure: C{"open"}, C{"closed"} or C{"local"}: what a
        request gets while Redis fails.
    @ivar redis: the top-level Redis settings, for the Redis store.
    @ivar redis_prefix: put before every Redis key; gateways that share
        limits use the same prefix.
    """

    policy: Optional[Policy]
    level: str
    key: KeySpec = KeySpec()
    store: str = "memory"
    redis_failure: str = DEFAULT_FAILURE_MODE
    redis: Optional[RedisConfig] = None
    redis_prefix: str = DEFAULT_PREFIX


def _level(where: Where) -> str:
    """The level a C{rate_limit} section is written at, from its place."""
    if where.path.startswith("routes["):
        return "route"
    if where.path.startswith("services."):
        return "service"
    return "top"


def _positive_number(where: Where, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(f"expected a number, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise where.error(f"must be a positive number, got {value!r}")
    return float(value)


def _key(where: Where, value: Any) -> KeySpec:
    text = string(where, value)
    if text.startswith("header:"):
        header = text[len("header:"):]
        if not _TOKEN.match(header):
            raise where.error(f"not a header name: {header!r}")
        return KeySpec("header", header.lower().encode("ascii"))
    if text not in ("client_ip", "consumer", "route", "global"):
        raise where.error(f"expected one of {', '.join(KEYS)}, got {text!r}")
    return KeySpec(text)


def _only_for(section: Section, keys: tuple, condition: str) -> None:
    for key in keys:
        if section.has(key):
            raise section.at(key).error(f"only applies {condition}")


def parse_rate_limit(where: Where, value: Any, context: ParseContext) -> RateLimitConfig:
    """
    A C{rate_limit} section (of a route, a service or the top level), or
    C{false} to turn an inherited one off.

    @raise gateway.config.ConfigError: an unknown key, a key of the other
        algorithm, a missing or non-positive rate, limit or window, a bad
        key, C{redis_failure} or C{redis_prefix} without C{store: redis}, or
        C{store: redis} without a top-level C{redis} section.
    """
    level = _level(where)
    if value is False:
        return RateLimitConfig(policy=None, level=level)
    section = Section(where, value)
    algorithm = section.take("algorithm", one_of(*ALGORITHMS), "token_bucket")
    name_where = section.at("name")
    name = section.take("name", string, "default")
    try:
        if algorithm == "token_bucket":
            _only_for(section, ("limit", "window"), "to algorithm: sliding_window")
            rate = section.take("rate", _positive_number)
            burst = section.take("burst", integer(1, 1_000_000_000), None)
            if burst is None:
                burst = max(1, math.ceil(rate))
            policy: Policy = TokenBucket(rate=rate, burst=burst, name=name)
        else:
            _only_for(section, ("rate", "burst"), "to algorithm: token_bucket")
            limit = section.take("limit", integer(1, 1_000_000_000))
            window = section.take("window", positive_duration)
            policy = SlidingWindow(limit=limit, window=window, name=name)
    except ValueError as e:  # the policy's own checks: the name
        raise name_where.error(str(e)) from None
    key = section.take("key", _key, KeySpec())
    store_where = section.at("store")
    store = section.take("store", one_of("memory", "redis"), "memory")
    if store == "memory":
        _only_for(section, ("redis_failure", "redis_prefix"), "with store: redis")
    failure = section.take("redis_failure", one_of(*FAILURE_MODES), DEFAULT_FAILURE_MODE)
    prefix = section.take("redis_prefix", string, DEFAULT_PREFIX)
    section.finish()
    redis = context.top.get("redis")
    if store == "redis" and redis is None:
        raise store_where.error("store: redis needs a top-level redis: {url: ...} section")
    return RateLimitConfig(
        policy=policy,
        level=level,
        key=key,
        store=store,
        redis_failure=failure,
        redis=redis if store == "redis" else None,
        redis_prefix=prefix,
    )


def parse_trusted_proxies(where: Where, value: Any, context: ParseContext) -> tuple:
    """
    The top-level C{trusted_proxies}: networks (or single addresses) of the
    proxies and load balancers in front of the gateway.

    @rtype: L{tuple} of L{ipaddress.IPv4Network} or L{ipaddress.IPv6Network}
    @raise gateway.config.ConfigError: an entry that is not a network, or
        has host bits set (C{10.0.0.1/8}).
    """
    networks = []
    for item_where, item in sequence(where, value):
        text = string(item_where, item)
        try:
            networks.append(ipaddress.ip_network(text, strict=True))
        except ValueError as e:
            raise item_where.error(f"not a CIDR network or address: {e}") from None
    return tuple(networks)


def forwarded_client(request, context) -> str:
    """
    The client's address (L{gateway.ratelimit.client_ip}): the TCP peer's,
    or behind the top-level C{trusted_proxies} the first address right to
    left in C{X-Forwarded-For} that is not a trusted proxy. Normalized
    (IPv4-mapped IPv6 as IPv4); the peer as given if it is not an address.
    """
    trusted = context.snapshot.config.options.get(TRUSTED_PROXIES) or ()
    forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for") if trusted else None
    return client_ip(context.client_ip, forwarded, trusted)


RATE_LIMIT = Extension(NAME, parse_rate_limit, default=None, top_default=True)
register("top", Extension(TRUSTED_PROXIES, parse_trusted_proxies, default=()))
register("service", RATE_LIMIT)
register("route", RATE_LIMIT)


def effective_config(route, config) -> Optional[RateLimitConfig]:
    """
    The C{rate_limit} that applies to C{route}: its own, else its service's,
    else the top-level one; L{None} if none, or if it was turned off.

    @type route: L{gateway.config.Route}
    @type config: L{gateway.config.Config}
    """
    conf = route.options.get(NAME)
    if conf is None or conf.level != "route":
        service = config.services.get(route.service)
        if service is not None:
            conf = service.options.get(NAME)
    if conf is None or conf.policy is None:
        return None
    return conf


# --- the filter ---------------------------------------------------------------


def _bounded(text: str) -> str:
    """C{text}, or a fixed-size hash of it when it is long."""
    if len(text) <= MAX_KEY_VALUE:
        return text
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16)
    return "#" + digest.hexdigest()


def redis_store(reactor, redis: RedisConfig, prefix: str) -> RedisStore:
    """The shared store for one Redis server and key prefix."""
    return RedisStore.from_url(reactor, redis.url, timeout=redis.timeout, prefix=prefix)


class _GcService(Service):
    """
    Sweeps idle buckets while the gateway runs; on stop, closes the Redis
    connections too.
    """

    def __init__(self, rate_limit_filter: "RateLimitFilter") -> None:
        self._filter = rate_limit_filter

    def startService(self) -> None:
        super().startService()
        self._filter.memory.start_gc(GC_INTERVAL)

    def stopService(self) -> Deferred:
        super().stopService()
        self._filter.memory.stop_gc()
        return self._filter.close()


class RateLimitFilter:
    """
    Counts each request of a limited route against its policy and answers
    429 when it is over.

    @param gateway: the L{gateway.state.Gateway}; its reactor is the clock.
    @param redis_store: called with C{(reactor, RedisConfig, prefix)},
        returns the L{gateway.ratelimit.IRateLimitStore} for that server (to
        inject fakes in tests); L{redis_store} by default.

    Counters, for the metrics exporter (C{gateway_rate_limited_total}):

    @ivar rejected: route name -> requests answered 429 (C{redis_failure:
        closed} refusals included).
    @ivar degraded: decisions not made by Redis but by C{redis_failure}.
    @ivar redis_failures: Redis calls that failed (refused, timed out,
        errors); while Redis is down only one call per L{PROBE_INTERVAL} is
        made, so this counts attempts, not requests.

    @ivar memory: the L{MemoryStore} of C{store: memory} and of the
        C{local} fallback.
    @ivar service: sweeps idle buckets every L{GC_INTERVAL} seconds and
        closes Redis connections at shutdown.
    @ivar admin_children: C{{b"ratelimit": ...}}: the counters as JSON.
    """

    name = NAME

    def __init__(self, gateway, redis_store: Callable = redis_store) -> None:
        self._clock = gateway.reactor
        self._make_redis_store = redis_store
        self.memory = MemoryStore(self._clock)
        self._limiters: dict[tuple, RateLimiter] = {}
        self._scopes: dict[tuple, str] = {}
        self.rejected: dict[str, int] = {}
        self.degraded = 0
        self.redis_failures = 0
        self.service = _GcService(self)
        self.admin_children = {b"ratelimit": RateLimitAdminResource(self)}
        self.reconfigure(gateway.snapshot)

    # -- stores ------------------------------------------------------------------

    @staticmethod
    def _limiter_id(conf: RateLimitConfig) -> tuple:
        return (conf.redis.url, conf.redis.timeout, conf.redis_prefix)

    def _limiter(self, conf: RateLimitConfig) -> RateLimiter:
        ident = self._limiter_id(conf)
        limiter = self._limiters.get(ident)
        if limiter is None:
            limiter = self._limiters[ident] = RateLimiter(
                self._make_redis_store(self._clock, conf.redis, conf.redis_prefix),
                self._clock,
                DEFAULT_FAILURE_MODE,
                fallback=self.memory,
                probe_interval=PROBE_INTERVAL,
                on_failure=self._redis_failed,
            )
        return limiter

    def _redis_failed(self, failure: Failure) -> None:
        self.redis_failures += 1

    def reconfigure(self, snapshot) -> None:
        """
        Make the Redis limiters the new config needs; close those it no
        longer uses. Buckets are kept: they are keyed by policy and scope,
        so a route, service or top-level policy that did not change goes on
        counting where it was; a changed policy starts with full buckets.
        """
        config = snapshot.config
        confs = [config.options.get(NAME)]
        confs += [s.options.get(NAME) for s in config.services.values()]
        confs += [r.options.get(NAME) for r in config.routes]
        old, self._limiters = self._limiters, {}
        for conf in confs:
            if conf is not None and conf.policy is not None and conf.store == "redis":
                ident = self._limiter_id(conf)
                if ident in old:
                    self._limiters[ident] = old[ident]
                else:
                    self._limiter(conf)
        for ident, limiter in old.items():
            if ident not in self._limiters:
                _close(limiter)
        self._scopes = {}

    def close(self) -> Deferred:
        """
        Close every Redis connection.

        @return: fires when they are closed (at most 1 s).
        """
        return gatherResults(
            [_close(limiter) for limiter in self._limiters.values()], consumeErrors=True
        )

    # -- requests ----------------------------------------------------------------

    def _scope(self, conf: RateLimitConfig, route) -> str:
        level = conf.level
        name = "" if level == "top" else route.name if level == "route" else route.service
        scope = self._scopes.get((level, name))
        if scope is None:
            scope = "g|" if level == "top" else f"{level[0]}:{quote(name, safe='')}|"
            self._scopes[(level, name)] = scope
        return scope

    def key(self, conf: RateLimitConfig, request, context) -> str:
        """
        The bucket key of a request: its scope (the route, the service or
        all, by where C{conf} is written), then what C{conf.key} selects.
        """
        kind = conf.key.kind
        part = None
        if kind == "global":
            part = "*"
        elif kind == "route":
            part = "route:" + quote(context.route.name, safe="")
        elif kind == "header":
            values = request.requestHeaders.getRawHeaders(conf.key.header)
            if values:
                part = "h:" + _bounded(b",".join(values).decode("latin-1"))
        elif kind == "consumer" and context.consumer:
            part = "c:" + _bounded(context.consumer)
        if part is None:
            part = "ip:" + forwarded_client(request, context)
        return self._scope(conf, context.route) + part

    def on_request(self, request, context):
        conf = effective_config(context.route, context.snapshot.config)
        if conf is None:
            return None
        key = self.key(conf, request, context)
        if conf.store == "memory":
            return self._decided(self.memory.check(key, conf.policy), conf, context)
        d = self._limiter(conf).check(key, conf.policy, conf.redis_failure)
        return d.addCallback(self._decided, conf, context)

    def _decided(self, decision: Decision, conf: RateLimitConfig, context) -> Optional[Answer]:
        if decision.degraded:
            self.degraded += 1
        if decision.allowed:
            if not (decision.degraded and conf.redis_failure == "open"):
                context.notes[NAME] = rate_limit_headers(conf.policy, decision)
            return None
        context.notes[RATE_LIMITED] = True
        context.error = "rate limited"
        route = context.route.name
        self.rejected[route] = self.rejected.get(route, 0) + 1
        message = "rate limit store unavailable" if decision.degraded else "rate limit exceeded"
        return Answer.error_(429, message, tuple(rate_limit_headers(conf.policy, decision)))

    def on_response(self, request, context) -> None:
        headers = context.notes.get(NAME)
        if headers:
            for name, value in headers:
                request.responseHeaders.setRawHeaders(name, [value])

    # -- observing ---------------------------------------------------------------

    def stats(self) -> dict:
        """The counters and the state of each Redis store, JSON-ready."""
        return {
            "rejected": dict(self.rejected),
            "degraded": self.degraded,
            "redis_failures": self.redis_failures,
            "memory_keys": len(self.memory),
            "redis": [
                {"store": str(limiter.store), "failing": limiter.failing}
                for limiter in self._limiters.values()
            ],
        }


def _close(limiter: RateLimiter) -> Deferred:
    """Close a limiter's store within a second, logging (not raising) errors."""
    from twisted.internet.defer import maybeDeferred

    store = limiter.store
    d = maybeDeferred(getattr(store, "close", lambda: None))
    d.addTimeout(1.0, limiter.clock)
    return d.addErrback(lambda f: _log.failure("closing rate limit store {store} failed", f, store=str(store)))


class RateLimitAdminResource(Resource):
    """
    C{GET /ratelimit} on the admin listener: C{{"rejected": {route: n},
    "degraded": n, "redis_failures": n, "memory_keys": n, "redis": [...]}}.
    """

    isLeaf = True

    def __init__(self, rate_limit_filter: RateLimitFilter) -> None:
        super().__init__()
        self._filter = rate_limit_filter

    def render_GET(self, request) -> bytes:
        from gateway.admin import json_response

        return json_response(request, 200, self._filter.stats())


register_filter(ORDER, NAME, RateLimitFilter)
