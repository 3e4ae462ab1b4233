"""
Rate limiting: policies, their stores, the client key and the response headers.

Two policies, both decided from one small state per (policy, key) and the
current time, with no timer per bucket:

  - L{TokenBucket}: C{rate} tokens per second, at most C{burst} at once,
    implemented as GCRA (the "generic cell rate algorithm" of ATM, ITU-T
    I.371): the state is one float, the bucket's I{theoretical arrival time}.
    It decides exactly like a classic token bucket that starts full.
  - L{SlidingWindow}: at most C{limit} requests in any C{window} seconds,
    approximated by the I{sliding window counter}: two fixed windows, the
    previous one weighted by how much of it still overlaps the sliding
    window (the scheme Cloudflare described in "How we built rate limiting
    capable of scaling to millions of domains", 2017).  Its state is three
    integers.

Two stores keep those states:

  - L{MemoryStore}: a dict per policy, decided synchronously from
    C{clock.seconds()} (the hot path); idle keys are dropped by L{MemoryStore.gc}
    so memory stays bounded.
  - L{RedisStore}: one atomic Lua script per decision, run with EVALSHA,
    reading the time from Redis C{TIME} so that the gateways' clocks may
    disagree; keys carry a TTL so Redis memory stays bounded.  The same
    arithmetic as the memory store, so C{redis_failure: local} limits the same
    way, per process.

L{RateLimiter} puts a store behind the C{redis_failure} rule (C{open},
C{closed} or C{local}); L{rate_limit_headers} gives the C{RateLimit-Policy},
C{RateLimit} and C{Retry-After} fields; L{client_ip} finds the address to
limit behind trusted proxies.

Buckets are shared by I{equal} policies (same class, name and parameters) and
the same key: to keep two routes apart with the same policy, put the route in
the key.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import math
from typing import Callable, Iterator, Optional, Sequence, Union

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

_log = Logger()

#: Tolerance of the float comparisons, in seconds or requests: absorbs the
#: rounding of sums such as C{0.1 + 0.1 + 0.1}, and that of epoch times (a
#: float near 1.7e9 is only exact to 2.4e-7 s), so that edges are exact to
#: the microsecond.
_EPSILON = 1e-6

#: Tolerance of the sliding window's comparisons, in requests: absorbs the
#: rounding of the weighted sum.  It is far smaller than L{_EPSILON}, since
#: an error of e requests moves an edge by C{e * window / prev} seconds.
_COUNT_EPSILON = 1e-9

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


# --- decisions ----------------------------------------------------------------


@attrs.frozen
class Decision:
    """
    The outcome of one rate-limit check.

    @ivar allowed: whether the request may pass.
    @ivar limit: the policy's quota, in requests (the bucket size or the
        window's limit).
    @ivar remaining: requests still allowed right now, after this one;
        always 0 when not allowed.
    @ivar reset: seconds until the quota is fully restored (bucket full
        again, sliding window empty again); a float, 0 when already full.
    @ivar retry_after: seconds until a request would be allowed; a float,
        0.0 when C{allowed}.
    @ivar degraded: C{True} when the decision was not made by the configured
        store but by the C{redis_failure} rule (see L{RateLimiter}).
    """

    allowed: bool
    limit: int
    remaining: int
    reset: float
    retry_after: float
    degraded: bool = False


# --- policies -----------------------------------------------------------------


def _check_name(instance: object, attribute: attrs.Attribute, value: str) -> None:
    """
    Policy names go into an sf-string: printable ASCII only (RFC 8941 §3.3.3).
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty string")
    if any(not (0x20 <= ord(c) <= 0x7E) for c in value):
        raise ValueError(f"{attribute.name} must be printable ASCII: {value!r}")


def _positive(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{attribute.name} must be a positive number, not {value!r}")


def _positive_int(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be an integer >= 1, not {value!r}")


def _sf_string(value: str) -> str:
    """
    Serialize C{value} (printable ASCII) as an RFC 8941 sf-string.
    """
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _header_seconds(seconds: float) -> int:
    """
    Round a delay up to whole seconds (delay-seconds, RFC 9110 §10.2.3).
    """
    return max(0, math.ceil(seconds - _EPSILON))


@attrs.frozen(cache_hash=True)
class TokenBucket:
    """
    A token bucket: C{rate} tokens per second refill a bucket of C{burst}
    tokens, which starts full; each request takes one token or is refused.

    Implemented as GCRA: the state is the theoretical arrival time C{tat}
    (seconds, on the store's clock).  A request at C{now} is allowed iff
    C{max(tat, now) + 1/rate - now <= burst/rate}; then C{tat} moves on by
    C{1/rate}.  C{tat <= now} means a full bucket, so the state may be
    forgotten (L{expired}).

    @ivar rate: tokens per second, a positive float.
    @ivar burst: bucket size in tokens, an integer >= 1.
    @ivar name: the policy's name in the C{RateLimit} headers (printable
        ASCII).
    """

    rate: float = attrs.field(converter=float, validator=_positive)
    burst: int = attrs.field(validator=_positive_int)
    name: str = attrs.field(default="default", validator=_check_name)

    # Derived once: the hot path reads them as plain attributes.
    _interval: float = attrs.field(init=False, eq=False, repr=False)
    _tolerance: float = attrs.field(init=False, eq=False, repr=False)
    _redis_args: tuple = attrs.field(init=False, eq=False, repr=False)
    _header_name: bytes = attrs.field(init=False, eq=False, repr=False)
    _policy_header: bytes = attrs.field(init=False, eq=False, repr=False)
    storage_id: str = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_header_name", _sf_string(self.name).encode("ascii"))
        interval = 1.0 / self.rate
        object.__setattr__(self, "_interval", interval)
        object.__setattr__(self, "_tolerance", self.burst * interval)
        object.__setattr__(self, "_redis_args", (repr(interval), repr(self._tolerance)))
        window = max(1, math.ceil(self.burst / self.rate - _EPSILON))
        object.__setattr__(
            self,
            "_policy_header",
            f"{_sf_string(self.name)};q={self.burst};w={window}".encode("ascii"),
        )
        object.__setattr__(
            self, "storage_id", f"tb:{self.name}:{self.rate!r}:{self.burst}"
        )

    @property
    def quota(self) -> int:
        """
        The C{q} of C{RateLimit-Policy}: the bucket size, in requests.
        """
        return self.burst

    def decide(
        self, tat: Optional[float], now: float
    ) -> tuple[Optional[float], Decision]:
        """
        Decide one request.  Pure: no I/O, no clock.

        @param tat: the bucket's state, or L{None} for a new (full) bucket.
        @param now: the current time, in seconds.
        @return: the state to keep (the very C{tat} object when unchanged)
            and the L{Decision}.
        """
        start = now if tat is None or tat < now else tat
        new_tat = start + self._interval
        used = new_tat - now
        if used <= self._tolerance + _EPSILON:
            remaining = int((self._tolerance - used + _EPSILON) / self._interval)
            return new_tat, Decision(True, self.burst, remaining, used, 0.0)
        return tat, Decision(
            False, self.burst, 0, start - now, used - self._tolerance
        )

    def expired(self, tat: float, now: float) -> bool:
        """
        Whether the state C{tat} equals a new bucket at C{now} (the bucket is
        full again), so that it may be dropped.
        """
        return tat <= now

    def redis_args(self) -> tuple[str, str]:
        """
        The ARGV of L{TOKEN_BUCKET_LUA}: emission interval and burst
        tolerance, in seconds.
        """
        return self._redis_args


@attrs.frozen(cache_hash=True)
class SlidingWindow:
    """
    At most C{limit} requests in any C{window} seconds, by the sliding window
    counter.

    Time is cut into fixed windows C{[i*window, (i+1)*window)}.  At C{now},
    C{elapsed} seconds into window C{i}, the sliding window's count is
    estimated as C{prev * (window - elapsed) / window + curr}, where C{curr}
    and C{prev} count the requests allowed in windows C{i} and C{i-1}.  A
    request is allowed iff that estimate plus one is at most C{limit}.
    Refused requests are not counted.  The state is C{(i, curr, prev)}; it
    may be dropped once window C{i+1} is over (L{expired}).

    @ivar limit: requests per window, an integer >= 1.
    @ivar window: the window's length in seconds, a positive float.
    @ivar name: the policy's name in the C{RateLimit} headers (printable
        ASCII).
    """

    limit: int = attrs.field(validator=_positive_int)
    window: float = attrs.field(converter=float, validator=_positive)
    name: str = attrs.field(default="default", validator=_check_name)

    _redis_args: tuple = attrs.field(init=False, eq=False, repr=False)
    _header_name: bytes = attrs.field(init=False, eq=False, repr=False)
    _policy_header: bytes = attrs.field(init=False, eq=False, repr=False)
    storage_id: str = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_redis_args", (str(self.limit), repr(self.window)))
        object.__setattr__(self, "_header_name", _sf_string(self.name).encode("ascii"))
        window = max(1, math.ceil(self.window - _EPSILON))
        object.__setattr__(
            self,
            "_policy_header",
            f"{_sf_string(self.name)};q={self.limit};w={window}".encode("ascii"),
        )
        object.__setattr__(
            self, "storage_id", f"sw:{self.name}:{self.limit}:{self.window!r}"
        )

    @property
    def quota(self) -> int:
        """
        The C{q} of C{RateLimit-Policy}: the limit, in requests.
        """
        return self.limit

    def decide(
        self, state: Optional[tuple[int, int, int]], now: float
    ) -> tuple[Optional[tuple[int, int, int]], Decision]:
        """
        Decide one request.  Pure: no I/O, no clock.

        @param state: C{(window index, current count, previous count)}, or
            L{None} for a key never seen (or forgotten).
        @param now: the current time, in seconds.
        @return: the state to keep (the very C{state} object when unchanged)
            and the L{Decision}.
        """
        window = self.window
        limit = self.limit
        index = math.floor(now / window)
        curr = prev = 0
        if state is not None:
            if state[0] == index:
                curr, prev = state[1], state[2]
            elif state[0] == index - 1:
                prev = state[1]
        elapsed = now - index * window
        weight = (window - elapsed) / window
        if prev * weight + curr + 1 <= limit + _COUNT_EPSILON:
            curr += 1
            remaining = max(0, int(limit - (prev * weight + curr) + _COUNT_EPSILON))
            return (index, curr, prev), Decision(
                True, limit, remaining, 2 * window - elapsed, 0.0
            )
        if curr + 1 <= limit + _COUNT_EPSILON and prev > 0:
            # the weight of the previous window has to fall far enough
            wait = window * (1 - (limit - curr - 1) / prev) - elapsed
        else:
            # only the next window can help: this one becomes its "previous"
            wait = (window - elapsed) + window * max(0.0, 1 - (limit - 1) / curr)
        if curr > 0:
            reset = 2 * window - elapsed
        elif prev > 0:
            reset = window - elapsed
        else:
            reset = 0.0
        return state, Decision(False, limit, 0, reset, max(0.0, wait))

    def expired(self, state: tuple[int, int, int], now: float) -> bool:
        """
        Whether C{state} no longer counts at C{now} (both of its windows are
        over), so that it may be dropped.
        """
        return math.floor(now / self.window) >= state[0] + 2

    def redis_args(self) -> tuple[str, str]:
        """
        The ARGV of L{SLIDING_WINDOW_LUA}: limit (requests) and window
        (seconds).
        """
        return self._redis_args


Policy = Union[TokenBucket, SlidingWindow]


# --- headers ------------------------------------------------------------------


def rate_limit_headers(policy: Policy, decision: Decision) -> list[tuple[bytes, bytes]]:
    """
    The response header fields for one policy's decision, per
    draft-ietf-httpapi-ratelimit-headers-11 (May 2026), whose fields are
    RFC 8941 structured-field Lists of Items:

        RateLimit-Policy: "default";q=100;w=60
        RateLimit: "default";r=50;t=30
        Retry-After: 30                      (refused requests only)

    C{q} is the bucket size or the window's limit and C{w} the time to refill
    a whole bucket, or the window, in whole seconds (at least 1: the draft
    allows no sub-second window).  C{r} is L{Decision.remaining}.  C{t} is
    L{Decision.reset} rounded up when allowed; when refused it is the
    Retry-After value, since the draft (section 6) says Retry-After SHOULD NOT
    point earlier than the end of the effective window.  No C{pk} is sent, so
    that client addresses do not leak.  Retry-After is delay-seconds (RFC 9110
    §10.2.3), rounded up, at least 1.

    @param policy: the policy that made C{decision}.
    @type policy: L{TokenBucket} or L{SlidingWindow}
    @param decision: the decision to describe.
    @type decision: L{Decision}
    @return: C{(name, value)} pairs, to add to the response in order.
    @rtype: L{list} of L{tuple} of (L{bytes}, L{bytes})
    """
    name = policy._header_name
    if decision.allowed:
        t = _header_seconds(decision.reset)
        return [
            (b"RateLimit-Policy", policy._policy_header),
            (b"RateLimit", b"%s;r=%d;t=%d" % (name, decision.remaining, t)),
        ]
    retry = max(1, _header_seconds(decision.retry_after))
    return [
        (b"RateLimit-Policy", policy._policy_header),
        (b"RateLimit", b"%s;r=0;t=%d" % (name, retry)),
        (b"Retry-After", b"%d" % (retry,)),
    ]


# --- the memory store ---------------------------------------------------------


@attrs.define
class MemoryStore:
    """
    Buckets in this process's memory: exact, synchronous, the hot path.

    State is one dict per policy, from key to the policy's state; idle keys
    (whose state equals a new one) are dropped by L{gc}, run every few
    seconds by L{start_gc} or by the caller's own C{TimerService(interval,
    store.gc)}.

    @ivar gc_chunk: how many keys the periodic sweep of L{start_gc} examines
        per reactor turn, so that a million keys never block the reactor for
        long (a full L{gc} of 1,000,000 keys takes 0.2 to 0.5 s).
    @ivar release_after: after a sweep that dropped at least this many keys,
        hand the freed memory back to the operating system (L{release_memory}).
        glibc keeps freed heap memory for reuse: a table of a million keys
        is 30 MiB that the process would otherwise keep after its keys are
        gone.
    """

    _clock: IReactorTime
    gc_chunk: int = 20_000
    release_after: int = 10_000
    _tables: dict = attrs.field(factory=dict, init=False)
    _gc_loop: Optional[LoopingCall] = attrs.field(default=None, init=False)
    _sweep_call: Optional[IDelayedCall] = attrs.field(default=None, init=False)
    _sweep_done: Optional[Deferred] = attrs.field(default=None, init=False)

    def check(self, key: str, policy: Policy) -> Decision:
        """
        Count one request of C{key} against C{policy}, at C{clock.seconds()}.

        @param key: the limited client's key (an address, a header value, a
            consumer or route name...).
        @param policy: the policy to apply.
        @type policy: L{TokenBucket} or L{SlidingWindow}
        @rtype: L{Decision}
        """
        try:
            table = self._tables[policy]
        except KeyError:
            table = self._tables[policy] = {}
        state = table.get(key)
        new_state, decision = policy.decide(state, self._clock.seconds())
        if new_state is not state:
            table[key] = new_state
        return decision

    def __len__(self) -> int:
        """
        The number of keys held, over all policies.
        """
        return sum(len(table) for table in self._tables.values())

    def gc(self) -> int:
        """
        Drop every idle key now, in one go (blocks the reactor for 0.2 to
        0.5 µs per key held).

        @return: how many keys were dropped.
        @rtype: L{int}
        """
        counter = [0]
        for _ in self._sweep(counter, chunk=None):
            pass
        self._swept(counter[0])
        return counter[0]

    def _swept(self, dropped: int) -> None:
        if dropped >= self.release_after:
            release_memory()

    def start_gc(self, interval: float) -> None:
        """
        Sweep idle keys every C{interval} seconds on the store's clock, in
        chunks of L{gc_chunk} keys per reactor turn.  A sweep that fails is
        logged and the next one still runs.

        @param interval: seconds between the starts of two sweeps.
        """
        if self._gc_loop is not None:
            raise RuntimeError("garbage collection is already running")
        self._gc_loop = LoopingCall(self._periodic_gc)
        self._gc_loop.clock = self._clock
        self._gc_loop.start(interval, now=False).addErrback(
            lambda f: _log.failure("rate limit bucket GC stopped", f)
        )

    def stop_gc(self) -> None:
        """
        Stop the sweeps of L{start_gc}, including one in progress.
        """
        if self._gc_loop is not None:
            loop, self._gc_loop = self._gc_loop, None
            if loop.running:
                loop.stop()
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None
        done, self._sweep_done = self._sweep_done, None
        if done is not None and not done.called:
            done.callback(None)

    def _periodic_gc(self) -> Deferred:
        """
        One incremental sweep: a Deferred that fires when it is done, so that
        the LoopingCall never starts a second one over it.
        """
        done: Deferred = Deferred()
        self._sweep_done = done
        counter = [0]
        steps = self._sweep(counter, chunk=self.gc_chunk)

        def step() -> None:
            self._sweep_call = None
            try:
                next(steps)
            except StopIteration:
                self._sweep_done = None
                self._swept(counter[0])
                done.callback(counter[0])
            except BaseException:
                self._sweep_done = None
                done.errback()
            else:
                self._sweep_call = self._clock.callLater(0, step)

        step()
        return done.addErrback(lambda f: _log.failure("rate limit bucket GC failed", f))

    def _sweep(self, counter: list, chunk: Optional[int]) -> Iterator[None]:
        """
        Drop idle keys, yielding after every C{chunk} keys examined (never,
        if C{chunk} is L{None}); adds the number dropped to C{counter[0]}.

        Keys are read from a snapshot and looked up again, so requests may
        come and go between two chunks.  A table that lost most of its keys is
        copied, since a dict never shrinks its storage by itself.
        """
        for policy, table in list(self._tables.items()):
            keys = list(table)
            expired = policy.expired
            dropped = 0
            step = chunk or len(keys) or 1
            for start in range(0, len(keys), step):
                now = self._clock.seconds()
                for key in keys[start : start + step]:
                    state = table.get(key)
                    if state is not None and expired(state, now):
                        del table[key]
                        dropped += 1
                if chunk is not None:
                    yield
            counter[0] += dropped
            if self._tables.get(policy) is table:
                if not table:
                    del self._tables[policy]
                elif dropped > len(table):
                    self._tables[policy] = dict(table)
        return


_malloc_trim: Optional[Callable[[], object]] = None


def release_memory() -> bool:
    """
    Give the memory the C library holds free back to the operating system,
    with glibc's C{malloc_trim(0)} (about a millisecond for a heap of a few
    hundred MiB).  Python returns its own small-object arenas by itself once
    they are empty; large blocks such as big dict tables go through malloc,
    which keeps them for reuse after they are freed.

    @return: whether it could be done (C{False} with another C library).
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            trim = ctypes.CDLL(None).malloc_trim
            trim.argtypes = [ctypes.c_size_t]
            trim.restype = ctypes.c_int
            _malloc_trim = lambda: trim(0)  # noqa: E731
        except (OSError, AttributeError):
            _malloc_trim = lambda: None  # noqa: E731
    return _malloc_trim() is not None


# --- Redis --------------------------------------------------------------------


@attrs.frozen
class _Script:
    """
    A Lua script and its SHA-1, as SCRIPT LOAD returns it.
    """

    name: str
    text: str
    sha: str = attrs.field(init=False)

    @sha.default
    def _sha(self) -> str:
        return hashlib.sha1(self.text.encode("utf-8")).hexdigest()


_LUA_PREAMBLE = """\
-- Redis < 5 replicates scripts verbatim; TIME needs effects replication.
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local eps = 1e-6   -- seconds
local ceps = 1e-9  -- requests
local function f(x) return string.format('%.6f', x) end
"""

#: GCRA, as L{TokenBucket.decide}.  KEYS[1]: the bucket; ARGV: emission
#: interval and burst tolerance, seconds.  Returns {allowed, remaining, reset,
#: retry_after}, times as strings (Lua numbers would be truncated to integers).
TOKEN_BUCKET_LUA = _Script(
    "token_bucket",
    "-- txgateway token bucket (GCRA)\n"
    + _LUA_PREAMBLE
    + """\
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if (not tat) or tat < now then tat = now end
local new_tat = tat + interval
local used = new_tat - now
if used <= tolerance + eps then
  redis.call('SET', KEYS[1], f(new_tat), 'PX', math.max(1, math.ceil(used * 1000)))
  return {1, math.floor((tolerance - used + eps) / interval), f(used), '0'}
end
return {0, 0, f(tat - now), f(used - tolerance)}
""",
)

#: Sliding window counter, as L{SlidingWindow.decide}.  KEYS[1]: a hash
#: {i, c, p}; ARGV: limit (requests) and window (seconds).  Returns {allowed,
#: remaining, reset, retry_after}.
SLIDING_WINDOW_LUA = _Script(
    "sliding_window",
    "-- txgateway sliding window counter\n"
    + _LUA_PREAMBLE
    + """\
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local index = math.floor(now / window)
local h = redis.call('HMGET', KEYS[1], 'i', 'c', 'p')
local stored = tonumber(h[1])
local curr, prev = 0, 0
if stored == index then
  curr = tonumber(h[2]) or 0
  prev = tonumber(h[3]) or 0
elseif stored == index - 1 then
  prev = tonumber(h[2]) or 0
end
local elapsed = now - index * window
local weight = (window - elapsed) / window
if prev * weight + curr + 1 <= limit + ceps then
  curr = curr + 1
  redis.call('HSET', KEYS[1], 'i', string.format('%.0f', index), 'c', curr, 'p', prev)
  redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil(((index + 2) * window - now) * 1000)))
  local remaining = math.floor(limit - (prev * weight + curr) + ceps)
  if remaining < 0 then remaining = 0 end
  return {1, remaining, f(2 * window - elapsed), '0'}
end
local wait
if curr + 1 <= limit + ceps and prev > 0 then
  wait = window * (1 - (limit - curr - 1) / prev) - elapsed
else
  wait = (window - elapsed) + window * math.max(0, 1 - (limit - 1) / math.max(curr, 1))
end
if wait < 0 then wait = 0 end
local reset = 0
if curr > 0 then reset = 2 * window - elapsed elseif prev > 0 then reset = window - elapsed end
return {0, 0, f(reset), f(wait)}
""",
)

_SCRIPTS = {TokenBucket: TOKEN_BUCKET_LUA, SlidingWindow: SLIDING_WINDOW_LUA}


class StoreUnavailable(Exception):
    """
    A store could not decide: Redis refused the connection, did not answer
    in time, or answered with an error.  The message says which.
    """


class IRateLimitStore(Interface):
    """
    A store that decides asynchronously (L{RedisStore}, or a fake given
    to L{gateway.filters.rate_limit.RateLimitFilter} in tests).
    """

    def check(key, policy):
        """
        Count one request of C{key} against C{policy}.

        @type key: L{str}
        @type policy: L{TokenBucket} or L{SlidingWindow}
        @return: a L{Deferred} firing with a L{Decision}, or failing with
            L{StoreUnavailable} in bounded time.
        """


@implementer(IRateLimitStore)
@attrs.define
class RedisStore:
    """
    Buckets in Redis, shared by every gateway using the same server and
    prefix: one EVALSHA of an atomic Lua script per decision.

    The connection (txredisapi, one pipelined TCP connection) is made on the
    first L{check} and re-made by itself after Redis restarts, backing off
    from 0.2 s up to C{max_reconnect_delay}.  While there is no connection
    (after the first C{connect_timeout}), L{check} fails at once rather than
    waiting for its timeout.  Scripts are loaded with SCRIPT LOAD the first
    time EVALSHA answers NOSCRIPT (first use, Redis restart, SCRIPT FLUSH),
    and the call retried once.  Keys expire when their state
    equals a new bucket, so Redis memory is bounded by the active keys.

    Keys are C{prefix + policy.storage_id + ":" + key}, e.g.
    C{txgateway:rl:tb:default:10.0:20:203.0.113.7}.

    Build it from the shared C{redis:} config with L{from_url}.

    @ivar host: Redis host name or address.
    @ivar port: Redis TCP port.
    @ivar db: database number (SELECT is only sent when not 0).
    @ivar prefix: prepended to every key.
    @ivar timeout: seconds a decision may take, including waiting for a
        connection; past it L{check} fails with L{StoreUnavailable} and a
        stuck connection is aborted (then re-made).
    @ivar connect_timeout: seconds a TCP connection attempt may take.
    @ivar max_reconnect_delay: the longest wait between two connection
        attempts while Redis is down, in seconds.
    @ivar username: for AUTH (Redis 6 ACL), or L{None}.
    @ivar password: for AUTH, or L{None}.
    @ivar tls: connect with TLS (C{rediss://}), checking the server's
        certificate against C{host}.
    @ivar unix_path: connect to this UNIX socket instead of C{host:port}.
    """

    _reactor: IReactorTime
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    prefix: str = "txgateway:rl:"
    timeout: float = 0.05
    connect_timeout: float = 1.0
    max_reconnect_delay: float = 2.0
    username: Optional[str] = None
    password: Optional[str] = attrs.field(default=None, repr=False)
    tls: bool = False
    unix_path: Optional[str] = None
    _handler: object = attrs.field(default=None, init=False, repr=False)
    _factory: object = attrs.field(default=None, init=False, repr=False)
    _started: float = attrs.field(default=0.0, init=False, repr=False)
    _shas: dict = attrs.field(init=False, repr=False)
    _loading: dict = attrs.field(factory=dict, init=False, repr=False)

    @_shas.default
    def _default_shas(self) -> dict:
        return {script.name: script.sha for script in _SCRIPTS.values()}

    @classmethod
    def from_url(
        cls,
        reactor: IReactorTime,
        url: str,
        timeout: float = 0.05,
        prefix: str = "txgateway:rl:",
    ) -> "RedisStore":
        """
        A store for a redis-py style URL, as in the C{redis:} config:
        C{redis://[[user]:password@]host[:port][/db]}, C{rediss://...} (TLS)
        or C{unix:///path[?db=N][&password=...]}.

        @param timeout: seconds allowed per decision and per connection
            attempt.
        @raise ValueError: a URL of another scheme, or a bad port or db.
        """
        from urllib.parse import parse_qs, unquote, urlsplit

        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else query.get("password")
        common = dict(
            timeout=timeout,
            connect_timeout=timeout,
            prefix=prefix,
            username=username,
            password=password,
        )
        if parts.scheme == "unix":
            return cls(
                reactor, unix_path=unquote(parts.path), db=int(query.get("db", 0)), **common
            )
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"not a redis://, rediss:// or unix:// URL: {url!r}")
        path = parts.path.strip("/")
        return cls(
            reactor,
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=int(path or query.get("db", 0)),
            tls=parts.scheme == "rediss",
            **common,
        )

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix://{self.unix_path}?db={self.db}"
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"

    def check(self, key: str, policy: Policy) -> Deferred:
        """
        Count one request of C{key} against C{policy}, at Redis's time.

        @type key: L{str}
        @type policy: L{TokenBucket} or L{SlidingWindow}
        @return: a L{Deferred} firing with a L{Decision}, or failing with
            L{StoreUnavailable} within C{timeout} seconds.
        """
        try:
            script = _SCRIPTS[type(policy)]
            args = policy.redis_args()
            redis_key = self.prefix + policy.storage_id + ":" + key
            d = self._run(script, redis_key, args)
        except Exception:
            d = fail()
        d.addTimeout(self.timeout, self._reactor)
        d.addCallback(_decision_from_reply, policy)
        d.addErrback(self._unavailable)
        return d

    def close(self) -> Deferred:
        """
        Close the connection and stop reconnecting.

        @return: a L{Deferred} firing when the connection is closed.
        """
        handler, self._handler, self._factory = self._handler, None, None
        if handler is None:
            return succeed(None)
        return handler.disconnect()

    def _connection(self) -> object:
        """
        The txredisapi connection handler, created on first use.

        txredisapi is imported here, not at the top: it imports the global
        reactor, which must not be installed by importing this module.
        """
        if self._handler is None:
            import txredisapi

            factory = txredisapi.RedisFactory(
                str(self),
                self.db or None,
                1,
                isLazy=True,
                handler=txredisapi.ConnectionHandler,
                password=self.password,
                username=self.username,
                replyTimeout=self.timeout,
                convertNumbers=False,
            )
            factory.initialDelay = 0.2
            factory.maxDelay = self.max_reconnect_delay
            factory.startConnecting(self._endpoint())
            self._handler = factory.handler
            self._factory = factory
            self._started = self._reactor.seconds()
        return self._handler

    def _endpoint(self) -> object:
        """
        The client endpoint to Redis, on the store's reactor.
        """
        from twisted.internet import endpoints

        if self.unix_path is not None:
            return endpoints.UNIXClientEndpoint(
                self._reactor, self.unix_path, timeout=self.connect_timeout
            )
        endpoint = endpoints.HostnameEndpoint(
            self._reactor, self.host, self.port, timeout=self.connect_timeout
        )
        if self.tls:
            from twisted.internet.ssl import optionsForClientTLS

            endpoint = endpoints.wrapClientTLS(optionsForClientTLS(self.host), endpoint)
        return endpoint

    def _run(self, script: _Script, redis_key: str, args: Sequence[str]) -> Deferred:
        """
        EVALSHA the script; on NOSCRIPT, SCRIPT LOAD it and try once more.
        """
        connection = self._connection()
        if (
            self._factory.size == 0
            and self._reactor.seconds() - self._started > self.connect_timeout
        ):
            # Down (not just starting): fail now rather than queue behind the
            # reconnection for the whole timeout.
            raise StoreUnavailable(f"{self}: not connected")
        d = connection.evalsha(self._shas[script.name], (redis_key,), args)
        return d.addErrback(self._reload, script, redis_key, args)

    def _reload(
        self, failure: Failure, script: _Script, redis_key: str, args: Sequence[str]
    ) -> Deferred:
        """
        After NOSCRIPT: load the script, then EVALSHA again (once).
        """
        import txredisapi

        failure.trap(txredisapi.ScriptDoesNotExist)
        loaded = self._load(script)
        loaded.addCallback(
            lambda sha: self._connection().evalsha(sha, (redis_key,), args)
        )
        return loaded

    def _load(self, script: _Script) -> Deferred:
        """
        SCRIPT LOAD C{script}, once for all concurrent callers.

        @return: a L{Deferred} firing with the script's SHA-1.
        """
        waiter: Deferred = Deferred()
        waiters = self._loading.get(script.name)
        if waiters is None:
            waiters = self._loading[script.name] = []

            def loaded(result: object) -> None:
                del self._loading[script.name]
                if not isinstance(result, Failure):
                    result = _text(result)
                    self._shas[script.name] = result
                for each in waiters:
                    if not each.called:
                        if isinstance(result, Failure):
                            each.errback(result)
                        else:
                            each.callback(result)

            load = self._connection().script_load(script.text)
            load.addTimeout(self.timeout, self._reactor)
            load.addBoth(loaded)
        waiters.append(waiter)
        return waiter

    def _unavailable(self, failure: Failure) -> None:
        from twisted.internet.defer import TimeoutError

        if failure.check(StoreUnavailable):
            failure.raiseException()
        if failure.check(TimeoutError):
            reason = f"no answer within {self.timeout} s (down, or not answering)"
        else:
            reason = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        raise StoreUnavailable(f"{self}: {reason}") from failure.value


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _decision_from_reply(reply: list, policy: Policy) -> Decision:
    """
    Read the Lua scripts' C{{allowed, remaining, reset, retry_after}}.
    """
    allowed, remaining, reset, retry_after = reply
    return Decision(
        bool(int(allowed)),
        policy.quota,
        int(remaining),
        float(_text(reset)),
        float(_text(retry_after)),
    )


# --- the redis_failure rule ---------------------------------------------------

FAILURE_MODES = ("open", "closed", "local")


@attrs.define
class RateLimiter:
    """
    Decides with C{store} and applies C{failure_mode} (the C{redis_failure}
    setting) while the store fails:

      - C{open}: every request is allowed; the headers show the full quota.
      - C{closed}: every request is refused as over the limit (the filter
        answers 429 with C{Retry-After: probe_interval}, rounded up).  The
        decision is marked L{Decision.degraded}, should the filter prefer 503.
      - C{local}: C{fallback}, a L{MemoryStore}, decides with the same policy,
        so each gateway process allows the whole quota on its own.

    When a decision fails the limiter counts it (L{failures}, C{on_failure}),
    logs once that the store is failing, and for the next C{probe_interval}
    seconds does not ask the store at all; then one request at a time probes
    it, the others being decided by C{failure_mode}, until a probe succeeds
    and the recovery is logged.  So an outage costs one warning, one info
    and one timeout per C{probe_interval}, not one per request.

    @ivar store: the shared store; its Deferreds must fire or fail in bounded
        time (L{RedisStore} fails after its C{timeout}).
    @type store: L{IRateLimitStore}
    @ivar clock: for the probe interval.
    @ivar failure_mode: C{"open"}, C{"closed"} or C{"local"}.
    @ivar fallback: the L{MemoryStore} of C{local}; made on C{clock} when
        not given (at the first C{local} decision if C{failure_mode} is
        another).  Its GC is the caller's to start.
    @ivar probe_interval: seconds between two attempts on a failing store.
    @ivar on_failure: called with the L{Failure} of every failed store call,
        e.g. to increment a metric.
    @ivar failures: how many store calls failed since start.
    @ivar failing: whether the store is considered down.
    """

    store: IRateLimitStore
    clock: IReactorTime
    failure_mode: str = attrs.field(validator=attrs.validators.in_(FAILURE_MODES))
    fallback: Optional[MemoryStore] = None
    probe_interval: float = 1.0
    on_failure: Optional[Callable[[Failure], object]] = None
    failures: int = attrs.field(default=0, init=False)
    failing: bool = attrs.field(default=False, init=False)
    _next_probe: float = attrs.field(default=0.0, init=False, repr=False)
    _probing: bool = attrs.field(default=False, init=False, repr=False)
    _failing_since: float = attrs.field(default=0.0, init=False, repr=False)
    _failures_at_start: int = attrs.field(default=0, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.failure_mode == "local" and self.fallback is None:
            self.fallback = MemoryStore(self.clock)

    def check(
        self, key: str, policy: Policy, failure_mode: Optional[str] = None
    ) -> Deferred:
        """
        Count one request of C{key} against C{policy}.

        @type key: L{str}
        @type policy: L{TokenBucket} or L{SlidingWindow}
        @param failure_mode: the C{redis_failure} rule of this request's
            policy, if not the limiter's own L{failure_mode}: one limiter per
            store serves policies with different rules, so that an outage is
            detected, probed and logged once.
        @return: a L{Deferred} that always fires with a L{Decision}, never
            fails (a store failure yields the C{failure_mode} decision).
        @raise ValueError: an unknown C{failure_mode}.
        """
        mode = self.failure_mode if failure_mode is None else failure_mode
        if mode not in FAILURE_MODES:
            raise ValueError(f"unknown failure mode {mode!r}")
        if self.failing:
            if self._probing or self.clock.seconds() < self._next_probe:
                return succeed(self._degraded(key, policy, mode))
            self._probing = True
        d = self.store.check(key, policy)
        d.addCallbacks(self._succeeded, self._failed, errbackArgs=(key, policy, mode))
        return d

    def _succeeded(self, decision: Decision) -> Decision:
        if self.failing:
            self.failing = False
            self._probing = False
            _log.info(
                "rate limit store {store} recovered after {seconds:.1f} s"
                " and {failures} failed calls",
                store=str(self.store),
                seconds=self.clock.seconds() - self._failing_since,
                failures=self.failures - self._failures_at_start,
            )
        return decision

    def _failed(
        self, failure: Failure, key: str, policy: Policy, mode: str
    ) -> Decision:
        self.failures += 1
        now = self.clock.seconds()
        if not self.failing:
            self.failing = True
            self._failing_since = now
            self._failures_at_start = self.failures - 1
            _log.warn(
                "rate limit store {store} failing ({reason});"
                " redis_failure={mode} applies until it recovers",
                store=str(self.store),
                reason=failure.getErrorMessage(),
                mode=mode,
            )
        self._probing = False
        self._next_probe = now + self.probe_interval
        if self.on_failure is not None:
            try:
                self.on_failure(failure)
            except Exception:
                _log.failure("rate limit on_failure callback failed")
        return self._degraded(key, policy, mode)

    def _degraded(self, key: str, policy: Policy, mode: str) -> Decision:
        """
        The C{mode} decision for a request the store cannot decide.
        """
        if mode == "local":
            if self.fallback is None:
                self.fallback = MemoryStore(self.clock)
            return attrs.evolve(self.fallback.check(key, policy), degraded=True)
        quota = policy.quota
        if mode == "open":
            return Decision(True, quota, quota, 0.0, 0.0, degraded=True)
        wait = self.probe_interval
        return Decision(False, quota, 0, wait, wait, degraded=True)


# --- the client's address -----------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _parse_ip(text: str) -> Optional[IPAddress]:
    """
    An address from C{text}: C{1.2.3.4}, C{1.2.3.4:80}, C{::1}, C{[::1]:80};
    IPv4-mapped IPv6 addresses (C{::ffff:1.2.3.4}, as a dual-stack listener
    reports IPv4 peers) become IPv4.  L{None} if C{text} is none of those.

    Remembered for the 4,096 texts seen last: the same peers and proxies
    come back request after request, and L{ipaddress} parses in Python.
    """
    text = text.strip()
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        if text.startswith("["):
            host = text[1:].partition("]")[0]
        elif text.count(":") == 1:
            host = text.partition(":")[0]
        else:
            return None
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=4096)
def _normalized(peer: str) -> str:
    # The address as client_ip returns it: normalized text, or the peer as
    # given if it is not an address.
    address = _parse_ip(peer)
    return peer if address is None else str(address)


def _is_trusted(address: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    for network in trusted:
        if address in network:
            return True
    return False


def client_ip(
    peer: str,
    xff_header_values: Optional[Sequence[bytes]],
    trusted_proxies: Sequence[IPNetwork],
) -> str:
    """
    The address to rate-limit a request by.

    If the TCP peer is not a trusted proxy, it is the peer: X-Forwarded-For
    is then ignored, since anybody can send one.  If the peer is trusted, the
    X-Forwarded-For values (all fields, in order, joined as one list) are read
    from right to left, skipping trusted proxies; the first untrusted address
    is the client.  If every address is trusted, the left-most is returned.
    A malformed entry stops the walk and the last good address (a trusted
    one) is returned: what lies left of it was not written by our proxies.

    Addresses are returned normalized (C{str} of L{ipaddress}), IPv4-mapped
    IPv6 as IPv4, ports dropped.

    @param peer: the TCP peer's address, e.g. C{request.getClientAddress().host};
        returned as it is if it is not an IP address (a UNIX socket).
    @param xff_header_values: the raw C{X-Forwarded-For} field values, e.g.
        C{request.requestHeaders.getRawHeaders(b"x-forwarded-for")}, or
        L{None}.
    @param trusted_proxies: the networks of our own proxies and load
        balancers.
    @type trusted_proxies: sequence of L{ipaddress.IPv4Network} or
        L{ipaddress.IPv6Network}
    @rtype: L{str}
    """
    if not xff_header_values:
        return _normalized(peer)
    address = _parse_ip(peer)
    if address is None:
        return peer
    if not _is_trusted(address, trusted_proxies):
        return _normalized(peer)
    entries = b",".join(xff_header_values).decode("latin-1").split(",")
    for entry in reversed(entries):
        hop = _parse_ip(entry)
        if hop is None:
            break
        address = hop
        if not _is_trusted(address, trusted_proxies):
            break
    return str(address)
