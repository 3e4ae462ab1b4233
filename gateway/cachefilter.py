"""
The response cache in the request pipeline: the C{cache} route key, the
cache filter (pipeline order 60), its stores and its admin endpoint.

The rules (what is stored, for how long, what may be served) are all in
L{gateway.cache}; the stores in L{gateway.cachestore}. This module glues
them to the proxy::

    routes:
      - name: catalogue
        match: {path_prefix: /catalogue}
        service: catalogue
        cache:
          enabled: true
          default_ttl: 0s         # heuristic freshness; 0 = never guess
          max_object_size: 1MiB   # larger responses are streamed, not stored
          store: memory           # memory | redis
          memory_limit: 256MiB    # per route, LRU by bytes (memory store)
          allow_set_cookie: false # store responses with Set-Cookie (cookie removed)
          redis_prefix: "txgateway:cache:"  # Redis key prefix (redis store)

A top-level C{cache:} gives the default for routes without one. The Redis
store needs the top-level C{redis:} key (L{gateway.redisconf}).

Per request (GET or HEAD on a route with the cache on):

  1. C{on_request} reads the variants stored under L{cache_key} and asks
     L{lookup}. A hit is answered at once (C{Age} set, 304 for a matching
     C{If-None-Match} / C{If-Modified-Since}); a stale response within
     C{stale-while-revalidate} too, while a conditional request refreshes
     it in the background. On a miss or a needed revalidation, the client's
     conditional fields are replaced by the stored response's validators
     and the request goes on down the pipeline, collapsed: while one
     request for a key is at the backend, the others wait for its result
     and are answered from it if it serves them (L{Collapser}).
  2. C{on_upstream_response} (a proxy hook) sees the backend's answer
     before it is relayed: a 304 to the cache's conditional request
     freshens the stored response, which answers the client; a 500, 502,
     503 or 504 is replaced by a stale response if C{stale-if-error} allows;
     a storable response is relayed as it streams and, if its body fits in
     C{max_object_size}, stored once complete.
  3. C{on_upstream_failure} (a proxy hook) answers connection errors and
     timeouts with a stale response if C{stale-if-error} allows.
  4. C{on_response} sets C{X-Cache: HIT | MISS | STALE | BYPASS} on every
     response of a cached route (including the gateway's own errors), and
     deletes the stored responses of a URI that an unsafe method changed
     (RFC 9111 S{sect}4.4).

Requests with other methods, or that L{lookup} turns away (C{Range},
C{If-Match}, ...), are forwarded untouched (C{BYPASS}); so are all requests
when the store cannot be read (a Redis outage degrades to no cache).

Collapsing is per process: gateway processes sharing a Redis store share
entries but may each fetch the same miss once.
"""

from __future__ import annotations

import collections
import json
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web import server
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource

from gateway.cache import (
    CLIENT_CONDITIONAL_FIELDS,
    ERROR_STATUSES,
    CachedResponse,
    CacheDecision,
    CachePolicy,
    Collapser,
    Outcome,
    ServedResponse,
    add_variant,
    cache_key,
    freshen,
    headers_from_twisted,
    invalidates,
    is_storable,
    key_prefix,
    lookup,
    make_entry,
    respond,
    serve_stale_on_error,
    storage_ttl,
)
from gateway.cachestore import ICacheStore, MemoryCacheStore, RedisCacheStore
from gateway.config import (
    Extension,
    ParseContext,
    Section,
    Where,
    boolean,
    duration,
    one_of,
    register,
    size,
    string,
)
from gateway.forwarding import UpstreamError, copy_response_headers, upstream_headers
from gateway.pipeline import Answer, register_filter
from gateway.proxy import apply_upstream_headers, route_path
from gateway.redisconf import RedisConfig
from gateway.routing import normalise_path, split_target

_log = Logger()

HIT = b"HIT"
MISS = b"MISS"
STALE = b"STALE"
BYPASS = b"BYPASS"

#: The default C{memory_limit} of a route's memory store, in bytes.
DEFAULT_MEMORY_LIMIT = 256 * 1024 * 1024

#: The largest C{max_object_size}: Redis refuses values over 512 MB.
MAX_OBJECT_SIZE_LIMIT = 512 * 1024 * 1024


# --- configuration ----------------------------------------------------------


@attrs.frozen
class CacheConfig:
    """
    The C{cache} key of a route.

    @ivar enabled: whether the route is cached at all.
    @ivar policy: the rules' parameters (C{default_ttl} in seconds,
        C{max_object_size} in bytes, C{allow_set_cookie}).
    @ivar store: C{"memory"} or C{"redis"}.
    @ivar memory_limit: bytes the route's memory store may hold (LRU).
    @ivar redis: the top-level Redis settings, for the Redis store.
    @ivar redis_prefix: put before every key in Redis; gateways that share
        entries use the same prefix.
    """

    enabled: bool = True
    policy: CachePolicy = CachePolicy()
    store: str = "memory"
    memory_limit: int = DEFAULT_MEMORY_LIMIT
    redis: Optional[RedisConfig] = None
    redis_prefix: bytes = b"txgateway:cache:"


def parse_cache(where: Where, value: Any, context: ParseContext) -> CacheConfig:
    """
    Read a C{cache} section (of a route, or the top-level default).

    @raise gateway.config.ConfigError: an unknown key, a bad value,
        C{max_object_size} over C{memory_limit} (nothing could be stored),
        or C{store: redis} without a top-level C{redis} key.
    """
    section = Section(where, value)
    enabled = section.take("enabled", boolean, True)
    default_ttl = section.take("default_ttl", duration, 0.0)
    size_where = section.at("max_object_size")
    max_object_size = section.take("max_object_size", size, 1024 * 1024)
    store_where = section.at("store")
    store = section.take("store", one_of("memory", "redis"), "memory")
    memory_where = section.at("memory_limit")
    memory_limit = section.take("memory_limit", size, DEFAULT_MEMORY_LIMIT)
    allow_set_cookie = section.take("allow_set_cookie", boolean, False)
    prefix = section.take("redis_prefix", string, "txgateway:cache:")
    section.finish()
    if not 0 < max_object_size <= MAX_OBJECT_SIZE_LIMIT:
        raise size_where.error(f"must be between 1 byte and 512MiB, got {max_object_size}")
    if memory_limit <= 0:
        raise memory_where.error("must be larger than zero")
    if store == "memory" and max_object_size > memory_limit:
        raise size_where.error(
            f"max_object_size ({max_object_size}) is larger than memory_limit ({memory_limit})"
        )
    redis = context.top.get("redis")
    if store == "redis" and redis is None:
        raise store_where.error("store: redis needs a top-level redis: {url: ...} section")
    return CacheConfig(
        enabled=enabled,
        policy=CachePolicy(
            default_ttl=default_ttl,
            max_object_size=max_object_size,
            allow_set_cookie=allow_set_cookie,
        ),
        store=store,
        memory_limit=memory_limit,
        redis=redis if store == "redis" else None,
        redis_prefix=prefix.encode("utf-8"),
    )


CACHE = register("route", Extension("cache", parse_cache, default=None, top_default=True))


def route_cache(route) -> Optional[CacheConfig]:
    """
    The route's cache settings, or L{None} if it is not cached.

    @type route: L{gateway.config.Route} or L{None}
    """
    if route is None:
        return None
    conf = route.options.get("cache")
    return conf if conf is not None and conf.enabled else None


# --- counters -----------------------------------------------------------------


@attrs.define
class CacheStats:
    """
    The cache's counters since the gateway started, for the metrics
    exporter and C{GET /cache} on the admin listener.

    One of C{hits}, C{misses}, C{stale}, C{bypass} counts each response of
    a cached route, as its C{X-Cache} says:

    @ivar hits: served from the cache (C{HIT}): fresh stored responses,
        responses revalidated with the backend (304), and requests answered
        from another request's fetch (collapsed).
    @ivar misses: served from the backend (C{MISS}), stored or not; also
        C{only-if-cached} requests answered 504.
    @ivar stale: stale responses served (C{STALE}), under
        C{stale-while-revalidate} or C{stale-if-error}.
    @ivar bypass: responses the cache took no part in (C{BYPASS}): unsafe
        methods, C{Range} and precondition requests, unreadable store,
        requests another filter answered first.
    @ivar revalidated: backend 304s that refreshed a stored response
        (in the foreground or the background).
    @ivar collapsed: requests answered from another request's backend
        fetch (counted in C{hits} too).
    @ivar stored: responses written to a store.
    @ivar store_errors: store reads and writes that failed (the request was
        then served without the cache).
    @ivar by_route: route name -> label (C{"hits"}, ...) -> count.

    C{bytes_stored} and C{evictions} are read from the memory stores: the
    bytes they hold now, and the entries their LRU evicted since start (a
    Redis store's memory is Redis's to report).
    """

    hits: int = 0
    misses: int = 0
    stale: int = 0
    bypass: int = 0
    revalidated: int = 0
    collapsed: int = 0
    stored: int = 0
    store_errors: int = 0
    by_route: Dict[str, collections.Counter] = attrs.Factory(
        lambda: collections.defaultdict(collections.Counter)
    )
    _memory_stores: Callable[[], Iterable[MemoryCacheStore]] = lambda: ()
    _retired_evictions: int = 0

    @property
    def bytes_stored(self) -> int:
        """Bytes held by the memory stores now."""
        return sum(s.bytes_stored for s in self._memory_stores())

    @property
    def evictions(self) -> int:
        """Entries evicted by the memory stores' LRU since start."""
        return self._retired_evictions + sum(s.evictions for s in self._memory_stores())

    _FIELDS = {HIT: "hits", MISS: "misses", STALE: "stale", BYPASS: "bypass"}

    def count(self, route: str, label: bytes) -> None:
        """Count one response of C{route} served with C{X-Cache: label}."""
        field = self._FIELDS[label]
        setattr(self, field, getattr(self, field) + 1)
        self.by_route[route][field] += 1

    def as_dict(self) -> dict:
        """The counters as JSON-ready data."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "stale": self.stale,
            "bypass": self.bypass,
            "revalidated": self.revalidated,
            "collapsed": self.collapsed,
            "stored": self.stored,
            "store_errors": self.store_errors,
            "bytes_stored": self.bytes_stored,
            "evictions": self.evictions,
            "routes": {name: dict(counts) for name, counts in self.by_route.items()},
        }


# --- bodies -------------------------------------------------------------------


class TeeResponse:
    """
    A backend response whose body is also kept, up to C{cap} bytes, while
    it is relayed; everything else is the wrapped response's.

    @param on_body: called once the body has ended, with the whole body
        (L{bytes}), or L{None} if it was larger than C{cap} or did not end
        cleanly (C{ResponseDone}). Called before the relay learns the body
        ended.
    """

    def __init__(self, response, cap: int, on_body: Callable[[Optional[bytes]], None]) -> None:
        self._response = response
        self._cap = cap
        self._on_body = on_body

    def __getattr__(self, name: str):
        return getattr(self._response, name)

    def deliverBody(self, protocol) -> None:
        self._response.deliverBody(_Tee(protocol, self._cap, self._on_body))


class _Tee(Protocol):
    def __init__(self, inner, cap: int, on_body) -> None:
        self._inner = inner
        self._cap = cap
        self._on_body = on_body
        self._chunks: Optional[list] = []
        self._size = 0

    def makeConnection(self, transport) -> None:
        self.transport = transport
        self._inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if self._chunks is not None:
            self._size += len(data)
            if self._size > self._cap:
                self._chunks = None  # too large to store: relay only
            else:
                self._chunks.append(data)
        self._inner.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        body = None
        if self._chunks is not None and reason.check(ResponseDone):
            body = b"".join(self._chunks)
        self._chunks = None
        try:
            self._on_body(body)
        except Exception:
            _log.failure("storing a cached response failed")
        self._inner.connectionLost(reason)


class _CappedBody(Protocol):
    """Collects a body of at most C{cap} bytes; stops reading past it."""

    def __init__(self, cap: int, expected) -> None:
        self.cap = cap
        self.expected = expected
        self.done: Deferred = Deferred()
        self._chunks: list = []
        self._size = 0
        self._too_large = False

    def connectionMade(self) -> None:
        if self.expected is not UNKNOWN_LENGTH and self.expected > self.cap:
            self._too_large = True
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._too_large:
            return
        self._size += len(data)
        if self._size > self.cap:
            self._too_large = True
            self._chunks = []
            self.transport.stopProducing()
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure) -> None:
        complete = not self._too_large and reason.check(ResponseDone) is not None
        self.done.callback(b"".join(self._chunks) if complete else None)


def collect_capped(response, cap: int) -> "Deferred[Optional[bytes]]":
    """
    Read a backend response's whole body, if it is at most C{cap} bytes.

    Like C{treq.collect}, with a size cap: a body announced or found to be
    larger is not read further (the connection is dropped).

    @return: fires with the body, or with L{None} when it was too large or
        did not end cleanly; never fails.
    """
    collector = _CappedBody(cap, response.length)
    response.deliverBody(collector)
    return collector.done


def response_fields(response) -> list:
    """
    The header fields of a backend response as the cache keeps them: those
    the proxy relays (hop-by-hop fields removed, C{Content-Length} restored,
    C{Via} added), less C{X-Request-Id}, which belongs to one request.
    """
    headers = Headers()
    copy_response_headers(response, headers, b"GET")
    headers.removeHeader(b"x-request-id")
    return headers_from_twisted(headers)


def backend_target(route, context) -> bytes:
    """
    The path and query the request of C{context} is sent to the backend
    with: a rewrite filter's path if one set it, else the route's
    C{strip_prefix} applied, as L{gateway.proxy.ProxyResource} does.
    """
    path = context.upstream_path
    if path is None:
        path = route_path(route, context.path)
    return path + context.query


def _entry_of(fetched: "Fetched", x: "_Exchange") -> Optional[CachedResponse]:
    """The storable entry of a response the cache fetched itself, or None."""
    return make_entry(
        b"GET",
        x.request_headers,
        fetched.status,
        fetched.headers,
        fetched.body,
        fetched.request_time,
        fetched.response_time,
        x.conf.policy,
    )


def _replace_conditionals(headers: Headers, conditional: Iterable[Tuple[bytes, bytes]]) -> None:
    for name in CLIENT_CONDITIONAL_FIELDS:
        headers.removeHeader(name)
    for name, value in conditional:
        headers.addRawHeader(name, value)


@attrs.frozen
class Fetched:
    """
    A response the cache fetched itself (background revalidation, refetch).

    @ivar body: the whole body, or L{None} if larger than the cap or cut.
    @ivar request_time: when the request was sent, POSIX seconds.
    @ivar response_time: when the response headers arrived.
    """

    status: int
    headers: tuple
    body: Optional[bytes]
    request_time: float
    response_time: float


# --- the filter -----------------------------------------------------------------

_FORWARD = object()  # a collapsed follower's own "fetch": forward it yourself


@attrs.define(eq=False)
class _Exchange:
    """
    The cache's state for one request, in C{context.notes["cache"]}.

    @ivar request_headers: the client's fields as received (before the
        conditional fields were replaced).
    @ivar leader: for the request that fetches for a collapsed key, fired
        with the stored entry (or None) once its response is known.
    """

    conf: CacheConfig
    store: Optional[ICacheStore]
    route: str
    label: bytes = BYPASS
    key: Optional[bytes] = None
    request_headers: tuple = ()
    decision: Optional[CacheDecision] = None
    variants: Optional[tuple] = None
    leader: Optional[Deferred] = None
    invalidate: Optional[bytes] = None
    collapsed: bool = False

    def settle(self, entry: Optional[CachedResponse]) -> None:
        """Release the requests waiting on this one's fetch, once."""
        if self.leader is not None and not self.leader.called:
            self.leader.callback(entry)


class _ThreadPoolService(Service):
    """Starts and stops the thread pool the Redis stores run in."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class CacheFilter:
    """
    The response cache's request filter (pipeline order 60).

    @param gateway: the L{gateway.state.Gateway}; its reactor is the clock.

    @ivar stats: the L{CacheStats}.
    @ivar collapser: the L{Collapser} for this process's backend fetches.
    @ivar service: starts and stops the Redis thread pool with the gateway.
    @ivar admin_children: C{{b"cache": ...}}, put on the admin listener.
    """

    name = "cache"

    def __init__(self, gateway) -> None:
        self._gateway = gateway
        self._clock = gateway.reactor
        self.collapser = Collapser()
        self._stores: Dict[tuple, ICacheStore] = {}
        self._redis_clients: Dict[Tuple[str, float], Any] = {}
        self.stats = CacheStats(memory_stores=self._memory_stores)
        self._threads = ThreadPool(minthreads=0, maxthreads=8, name="txgateway-cache-redis")
        self.service = _ThreadPoolService(self._threads)
        self.admin_children = {b"cache": CacheAdminResource(self)}
        self.reconfigure(gateway.snapshot)

    # -- stores ----------------------------------------------------------------

    @staticmethod
    def _store_id(route_name: str, conf: CacheConfig) -> tuple:
        if conf.store == "redis":
            return ("redis", conf.redis.url, conf.redis.timeout, conf.redis_prefix)
        return ("memory", route_name, conf.memory_limit)

    def _memory_stores(self) -> Iterable[MemoryCacheStore]:
        return [s for s in self._stores.values() if isinstance(s, MemoryCacheStore)]

    def reconfigure(self, snapshot) -> None:
        """
        Build the stores the routes of C{snapshot} need; keep those that are
        unchanged (a memory store keeps its entries while its route's name
        and C{memory_limit} stay), drop the others.
        """
        wanted: Dict[tuple, ICacheStore] = {}
        for route in snapshot.config.routes:
            conf = route_cache(route)
            if conf is None:
                continue
            sid = self._store_id(route.name, conf)
            if sid in wanted:
                continue
            store = self._stores.get(sid)
            if store is None:
                store = self._make_store(conf)
            wanted[sid] = store
        for sid, store in self._stores.items():
            if sid not in wanted and isinstance(store, MemoryCacheStore):
                self.stats._retired_evictions += store.evictions
        clients = {(sid[1], sid[2]) for sid in wanted if sid[0] == "redis"}
        self._redis_clients = {k: v for k, v in self._redis_clients.items() if k in clients}
        self._stores = wanted

    def _make_store(self, conf: CacheConfig) -> ICacheStore:
        if conf.store == "redis":
            ident = (conf.redis.url, conf.redis.timeout)
            client = self._redis_clients.get(ident)
            if client is None:
                client = self._redis_clients[ident] = conf.redis.client()
            return RedisCacheStore(
                client=client,
                reactor=self._clock,
                threadpool=self._threads,
                prefix=conf.redis_prefix,
            )
        return MemoryCacheStore(limit_bytes=conf.memory_limit, clock=self._clock)

    def store_for(self, route) -> Optional[ICacheStore]:
        """
        The store of a cached route, or L{None} (not cached, or a route of
        a config that has since been replaced).
        """
        conf = route_cache(route)
        if conf is None:
            return None
        return self._stores.get(self._store_id(route.name, conf))

    def purge(self, route_name: str, path: bytes = b"") -> "Deferred[int]":
        """
        Delete the stored responses of a route whose path and query start
        with C{path} (normalised as requests are; C{b""} for all).

        @return: fires with the number of keys deleted.
        @raise KeyError: no cached route has that name.
        """
        route = next(
            (r for r in self._gateway.snapshot.config.routes if r.name == route_name), None
        )
        store = self.store_for(route)
        if store is None:
            raise KeyError(route_name)
        if path:
            target, query = split_target(path)
            path = normalise_path(target) + query
        return store.purge(key_prefix(route.name.encode("utf-8"), path))

    def _store_failed(self, failure: Failure, what: str) -> None:
        self.stats.store_errors += 1
        _log.warn(
            "cache store {what} failed: {error}", what=what, error=failure.getErrorMessage()
        )

    def _keep(self, x: _Exchange, entry: CachedResponse, now: float) -> None:
        """Store C{entry} among the variants of its key."""
        policy = x.conf.policy
        variants = add_variant(x.variants, entry, x.request_headers, now, policy)
        x.variants = variants
        self.stats.stored += 1
        x.store.set(x.key, variants, storage_ttl(variants, now, policy)).addErrback(
            self._store_failed, "write"
        )

    # -- request ---------------------------------------------------------------

    def on_request(self, request, context):
        conf = route_cache(context.route)
        if conf is None:
            return None
        route = context.route
        x = context.notes[self.name] = _Exchange(
            conf=conf, store=self.store_for(route), route=route.name
        )
        if x.store is None:
            return None
        method = request.method
        target = context.path + context.query
        if method not in (b"GET", b"HEAD"):
            x.invalidate = cache_key(b"GET", context.host, target, route.name.encode("utf-8"))
            return None
        x.key = cache_key(method, context.host, target, route.name.encode("utf-8"))
        x.request_headers = tuple(headers_from_twisted(request.requestHeaders))
        d = x.store.get(x.key)
        if conf.redis is not None:
            # Bound the wait for a busy thread pool too, not only the socket.
            d.addTimeout(conf.redis.timeout * 2, self._clock)
        d.addCallbacks(
            self._decide,
            self._read_failed,
            callbackArgs=(request, context, x),
            errbackArgs=(x,),
        )
        return d

    def _read_failed(self, failure: Failure, x: _Exchange) -> None:
        self._store_failed(failure, "read")
        return None  # forward without the cache (label stays BYPASS)

    def _decide(self, variants, request, context, x: _Exchange):
        now = self._clock.seconds()
        policy = x.conf.policy
        method = request.method
        x.variants = variants
        decision = x.decision = lookup(variants, method, x.request_headers, now, policy)
        outcome = decision.outcome
        if outcome is Outcome.BYPASS:
            return None
        if outcome is Outcome.HIT:
            x.label = HIT
            return self._serve(request, decision.response, decision.entry)
        if outcome is Outcome.GATEWAY_TIMEOUT:
            x.label = MISS
            return Answer.error_(504, "not in the cache (only-if-cached)")
        if outcome is Outcome.STALE_SERVABLE:
            x.label = STALE
            self._revalidate_in_background(request, context, x)
            return self._serve(request, decision.response, decision.entry)
        # MISS or STALE_REVALIDATE: go to the backend for a full response,
        # or to validate ours; the client's own conditionals are answered
        # from the result.
        x.label = MISS
        _replace_conditionals(request.requestHeaders, decision.conditional_headers)
        if not decision.collapse:
            return None
        if not self.collapser.in_flight(x.key):
            x.leader = Deferred()
            self.collapser.collapse(x.key, lambda: x.leader).addErrback(lambda _: None)
            request.notifyFinish().addBoth(lambda _: x.settle(None))
            return None

        def accept(entry) -> bool:
            if entry is None:
                return False
            seen = lookup((entry,), method, x.request_headers, self._clock.seconds(), policy)
            return seen.outcome is Outcome.HIT

        waiting = self.collapser.collapse(x.key, lambda: succeed(_FORWARD), accept)
        request.notifyFinish().addErrback(lambda _: waiting.cancel())
        waiting.addCallbacks(
            self._followed,
            self._follow_failed,
            callbackArgs=(request, x),
            errbackArgs=(x,),
        )
        return waiting

    def _followed(self, result, request, x: _Exchange):
        if result is _FORWARD:
            return None  # the leader's result does not serve this request
        x.label = HIT
        x.collapsed = True
        return self._serve(
            request, respond(result, request.method, x.request_headers, self._clock.seconds()), result
        )

    def _follow_failed(self, failure: Failure, x: _Exchange) -> None:
        if not failure.check(CancelledError):
            _log.info(
                "collapsed cache fetch failed, forwarding: {error}",
                error=failure.getErrorMessage(),
            )
        return None

    def _serve(self, request, served: ServedResponse, entry: CachedResponse) -> Answer:
        """
        The answer for a response from the cache. Fields it carries replace
        those the gateway set already (C{Date}).
        """
        for name, _ in served.headers:
            request.responseHeaders.removeHeader(name)
        body = served.body
        if request.method == b"HEAD" and served.status != 304:
            body = entry.body  # for Content-Length; Twisted sends no body for HEAD
        return Answer(status=served.status, headers=served.headers, body=body)

    # -- backend responses -------------------------------------------------------

    def on_upstream_response(self, request, context, response):
        x = context.notes.get(self.name)
        if x is None or x.decision is None:
            return None
        decision = x.decision
        policy = x.conf.policy
        now = self._clock.seconds()
        if decision.outcome is Outcome.STALE_REVALIDATE and response.code == 304:
            entry = freshen(
                decision.entry,
                response_fields(response),
                context.upstream_started,
                context.upstream_ended,
            )
            if entry is None:  # a 304 for something else: ask again, plainly
                return self._refetch(request, context, x)
            self.stats.revalidated += 1
            self._keep(x, entry, now)
            x.settle(entry)
            x.label = HIT
            return self._serve(request, respond(entry, request.method, x.request_headers, now), entry)
        if response.code in ERROR_STATUSES and decision.entry is not None:
            served = serve_stale_on_error(
                decision.entry, now, policy, request.method, x.request_headers
            )
            if served is not None:
                x.settle(None)
                x.label = STALE
                return self._serve(request, served, decision.entry)
        if decision.may_store and request.method == b"GET":
            fields = response_fields(response)
            length = response.length
            if is_storable(b"GET", x.request_headers, response.code, fields, policy) and (
                length is UNKNOWN_LENGTH or length <= policy.max_object_size
            ):
                return TeeResponse(
                    response,
                    policy.max_object_size,
                    lambda body: self._body_received(context, x, response.code, fields, body),
                )
        x.settle(None)
        return None

    def _body_received(self, context, x: _Exchange, status: int, fields, body) -> None:
        entry = None
        if body is not None:
            entry = make_entry(
                b"GET",
                x.request_headers,
                status,
                fields,
                body,
                context.upstream_started,
                context.upstream_ended,
                x.conf.policy,
            )
        if entry is not None:
            self._keep(x, entry, self._clock.seconds())
        x.settle(entry)

    def on_upstream_failure(self, request, context, failure):
        x = context.notes.get(self.name)
        if x is None:
            return None
        x.settle(None)
        if x.decision is None or x.decision.entry is None:
            return None
        served = serve_stale_on_error(
            x.decision.entry,
            self._clock.seconds(),
            x.conf.policy,
            request.method,
            x.request_headers,
        )
        if served is None:
            return None
        x.label = STALE
        return self._serve(request, served, x.decision.entry)

    # -- the cache's own fetches ----------------------------------------------

    def _fetch(self, context, headers: Headers, proto: bytes) -> "Deferred[Fetched]":
        """
        Send a C{GET} for the request of C{context} with C{headers} to a
        backend of its route's service and read the body up to the route's
        C{max_object_size}.

        @return: fires with a L{Fetched}, or fails with L{UpstreamError}.
        """
        route = context.route
        runtime = context.snapshot.services[route.service]
        backend = runtime.balancer.pick(
            runtime.available(), context.client_ip.encode("ascii", "replace")
        )
        if backend is None:
            return fail(UpstreamError(503, "no healthy backend", "overload"))
        forwarded = upstream_headers(
            headers,
            client_ip=context.client_ip,
            proto=proto,
            host=context.host,
            preserve_host=route.preserve_host,
            backend=backend,
        )
        forwarded.setRawHeaders(b"X-Request-Id", [context.request_id.encode("ascii")])
        # What earlier filters decided for the upstream request: auth's
        # credential stripping and claim headers, trace context, rewrites.
        apply_upstream_headers(forwarded, context.upstream_remove, context.upstream_headers)
        cap = route_cache(route).policy.max_object_size
        sent = self._clock.seconds()
        d = runtime.forwarder.request(
            b"GET",
            backend,
            backend_target(route, context),
            forwarded,
            None,
            runtime.service.timeouts.response,
        )

        def got(response):
            received = self._clock.seconds()
            fields = tuple(response_fields(response))

            def read(body):
                runtime.forwarder.limits.release(backend)
                return Fetched(response.code, fields, body, sent, received)

            return collect_capped(response, cap).addCallback(read)

        return d.addCallback(got)

    def _revalidate_in_background(self, request, context, x: _Exchange) -> None:
        """
        Refresh a stale entry served under C{stale-while-revalidate}
        (RFC 5861 S{sect}3), unless a fetch for its key is running.
        """
        decision = x.decision
        if not decision.may_store or self.collapser.in_flight(x.key):
            return
        headers = request.requestHeaders.copy()
        _replace_conditionals(headers, decision.conditional_headers)
        proto = b"https" if request.isSecure() else b"http"

        def fetch():
            return self._fetch(context, headers, proto).addCallback(self._revalidated, x)

        done = self.collapser.collapse(x.key, fetch)
        done.addErrback(
            lambda f: _log.info(
                "background revalidation of {route} failed: {error}",
                route=x.route,
                error=f.getErrorMessage(),
            )
        )

    def _revalidated(self, fetched: Fetched, x: _Exchange) -> Optional[CachedResponse]:
        now = self._clock.seconds()
        entry = None
        if fetched.status == 304:
            entry = freshen(
                x.decision.entry, fetched.headers, fetched.request_time, fetched.response_time
            )
            if entry is not None:
                self.stats.revalidated += 1
        elif fetched.body is not None:
            entry = _entry_of(fetched, x)
        if entry is not None:
            self._keep(x, entry, now)
        elif fetched.status < 500 and fetched.status != 304:
            # The backend's current answer may not be stored: what is
            # stored is outdated, stop serving it.
            x.store.delete(x.key).addErrback(self._store_failed, "delete")
        return entry

    def _refetch(self, request, context, x: _Exchange) -> Deferred:
        """
        Fetch the request again without conditions, after a 304 that did
        not match the stored response (RFC 9111 S{sect}4.3.4). The body is
        read up to C{max_object_size}; a larger one is answered 502.
        """
        headers = request.requestHeaders.copy()
        _replace_conditionals(headers, ())
        proto = b"https" if request.isSecure() else b"http"
        x.label = MISS

        def answer(fetched: Fetched):
            if fetched.body is None:
                x.settle(None)
                return Answer.error_(502, "backend sent a mismatched 304 and a body too large to buffer")
            entry = _entry_of(fetched, x)
            if entry is not None:
                self._keep(x, entry, self._clock.seconds())
            x.settle(entry)
            for name, _ in fetched.headers:
                request.responseHeaders.removeHeader(name)
            return Answer(status=fetched.status, headers=fetched.headers, body=fetched.body)

        def failed(failure: Failure):
            x.settle(None)
            failure.trap(UpstreamError)
            return Answer.error_(failure.value.status, failure.value.reason)

        return self._fetch(context, headers, proto).addCallbacks(answer, failed)

    # -- response ------------------------------------------------------------------

    def on_response(self, request, context) -> None:
        conf = route_cache(context.route)
        if conf is None:
            return
        x = context.notes.get(self.name)
        label = x.label if x is not None else BYPASS
        request.responseHeaders.setRawHeaders(b"X-Cache", [label])
        context.cache = label.decode("ascii").lower()
        self.stats.count(context.route.name, label)
        if x is None:
            return
        if x.collapsed:
            self.stats.collapsed += 1
        if x.invalidate is not None and x.store is not None and invalidates(request.method, request.code):
            x.store.delete(x.invalidate).addErrback(self._store_failed, "delete")


register_filter(60, "cache", CacheFilter)


# --- admin ----------------------------------------------------------------------


def _json(request, status: int, payload) -> bytes:
    body = json.dumps(payload, sort_keys=True).encode("utf-8") + b"\n"
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return body


class CacheAdminResource(Resource):
    """
    C{/cache} on the admin listener.

      - C{GET /cache}: the L{CacheStats} as JSON.
      - C{DELETE /cache?route=NAME[&path=PREFIX]}: delete the stored
        responses of route C{NAME} whose path (and query) starts with
        C{PREFIX}, the path as clients request it (before C{strip_prefix});
        all of the route's without C{path}. Answers
        C{{"purged": N, "route": ..., "path": ...}}; 404 for a route that
        is not cached; 502 if the store failed.
    """

    isLeaf = True

    def __init__(self, cache: CacheFilter) -> None:
        super().__init__()
        self._cache = cache

    def render_GET(self, request) -> bytes:
        return _json(request, 200, self._cache.stats.as_dict())

    def render_DELETE(self, request):
        route = (request.args.get(b"route") or [b""])[0].decode("utf-8", "replace")
        path = (request.args.get(b"path") or [b""])[0]
        if not route:
            return _json(request, 400, {"error": "route=NAME is required"})
        if path and not path.startswith(b"/"):
            return _json(request, 400, {"error": "path must start with /"})
        try:
            d = self._cache.purge(route, path)
        except KeyError:
            return _json(request, 404, {"error": f"no cached route named {route!r}"})

        def done(count: int) -> None:
            if not request._disconnected:
                request.write(
                    _json(request, 200, {"purged": count, "route": route, "path": path.decode("latin-1")})
                )
                request.finish()

        def failed(failure: Failure) -> None:
            _log.failure("cache purge failed", failure)
            if not request._disconnected:
                request.write(_json(request, 502, {"error": "the cache store failed"}))
                request.finish()

        d.addCallbacks(done, failed)
        return server.NOT_DONE_YET
