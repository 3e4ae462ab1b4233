"""
The live request feed and the dashboard that shows it: a static page
(the files in C{gateway/dashboard/}) fed by server-sent events.

L{RequestFeed} is a request observer. For each finished request it queues
a small row and adds to the current second's counts (requests, errors,
rate limited, cached, a latency histogram). A timer then, every
L{FLUSH_INTERVAL} seconds, moves the queued rows into a ring of the latest
requests and sends them to every connected browser (C{event: requests}),
and every second a summary (C{event: tick}: request rate, p50 and p99
latency, counts, backend health and circuit states). Each event is
serialised once, whatever the number of browsers.

A browser that reads slowly or not at all must not slow the proxy or grow
memory: each L{EventStream} is a push producer of its connection, so
Twisted tells it when the socket's buffer is full; from then on events
wait in a queue bounded to C{client_buffer} bytes, and the oldest are
dropped (and counted) to make room. The socket's kernel send buffer is
capped at about the same size. The number of browsers is bounded too
(C{max_clients}; more get 503).
"""

from __future__ import annotations

import json
import math
import os
import socket
from array import array
from bisect import bisect_left
from collections import deque
from typing import Optional

from twisted.application.internet import TimerService
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import NoResource, Resource
from zope.interface import implementer

from gateway.metrics import backend_states

_log = Logger()

#: Seconds between two batches of request rows sent to browsers.
FLUSH_INTERVAL = 0.25
#: Flushes per summary tick (one tick a second).
_FLUSHES_PER_TICK = 4

#: Upper bounds (seconds) of the latency buckets used for percentiles:
#: 0.1 ms to about 60 s, each 10% wider than the last (at most 10% error).
LATENCY_BOUNDS = tuple(0.0001 * 1.1**i for i in range(141))

#: C{context.cache} values of responses served from the cache.
_CACHED = frozenset(["HIT", "STALE", "hit", "stale"])

#: The longest path shown, in characters (longer ones are cut).
MAX_PATH = 200

#: Bytes of one request row's JSON in the ring of recent rows (L{_Rows}).
#: An ASCII row with the longest path and request ID is about 600; rows
#: longer than this (non-ASCII paths, very long route or backend names)
#: have their longest strings cut.
ROW_BYTES = 1024

_STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard")
_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
}


def percentile(counts: list, total: int, q: float) -> Optional[float]:
    """
    The C{q} quantile (0..1), in seconds, of C{total} samples counted in
    L{LATENCY_BOUNDS} buckets (one more bucket for longer ones): the upper
    bound of the bucket where it falls. None with no samples.
    """
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= rank and count:
            return LATENCY_BOUNDS[index] if index < len(LATENCY_BOUNDS) else LATENCY_BOUNDS[-1]
    return LATENCY_BOUNDS[-1]


class _Window:
    """The counts of the current second."""

    __slots__ = ("requests", "errors", "rate_limited", "cached", "latency")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.rate_limited = 0
        self.cached = 0
        self.latency = [0] * (len(LATENCY_BOUNDS) + 1)


class _Ring:
    """
    The slot bookkeeping of a ring of C{size} slots: which slot the next
    item goes to, and which slots hold the latest items, oldest first.
    """

    def __init__(self, size: int) -> None:
        self.maxlen = size
        self._next = 0
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def _claim(self) -> int:
        """The slot for a new item, which replaces the oldest when full."""
        i = self._next
        self._next = (i + 1) % self.maxlen
        self._len = min(self._len + 1, self.maxlen)
        return i

    def _latest(self, n: int):
        """The slots of the last C{n} items (at most all), oldest first."""
        n = max(0, min(n, self._len))
        start = (self._next - n) % self.maxlen
        return ((start + k) % self.maxlen for k in range(n))


class _Series(_Ring):
    """
    The latest one-second summary points, in a ring of C{history} slots
    allocated once: one C{array} per field, written in place by L{append}.

    A C{deque} of point dicts would hold, at any time, the objects of the
    last C{history} ticks (a dict and four floats each): a few per second,
    each allocated wherever the heap had room then, which under load is
    among the objects of requests and rate-limit keys. Kept for minutes,
    they pin CPython's small-object pools and arenas, which are returned
    to the system only once wholly empty: after a million rate-limit keys
    were collected, those ticks kept tens of MiB resident. The arrays hold
    plain numbers, not objects; the dicts are built only for a browser
    that connects (L{__iter__}).
    """

    _FLOATS = ("t", "rps", "p50_ms", "p99_ms")  # None is stored as NaN
    _INTS = ("requests", "errors", "rate_limited", "cached")

    def __init__(self, history: int) -> None:
        super().__init__(history)
        self._floats = tuple(array("d", bytes(8 * history)) for _ in self._FLOATS)
        self._ints = tuple(array("q", bytes(8 * history)) for _ in self._INTS)

    def append(self, point: dict) -> None:
        """Keep C{point}'s values (the keys of L{_FLOATS} and L{_INTS}), dropping the oldest."""
        i = self._claim()
        for column, name in zip(self._floats, self._FLOATS):
            value = point[name]
            column[i] = math.nan if value is None else value
        for column, name in zip(self._ints, self._INTS):
            column[i] = point[name]

    def __iter__(self):
        """The points kept, oldest first, as new dicts."""
        for i in self._latest(self._len):
            point = {}
            for column, name in zip(self._floats, self._FLOATS):
                value = column[i]
                point[name] = None if math.isnan(value) else value
            for column, name in zip(self._ints, self._INTS):
                point[name] = column[i]
            yield point


class _Rows(_Ring):
    """
    The latest request rows, as their JSON, in a ring of C{size} slots of
    C{width} bytes allocated once (one C{bytearray}, and an C{array} of
    lengths), written in place by L{append}.

    Like L{_Series}, and for the same reason: a C{deque} of row tuples
    keeps each request's ID, path and floats alive until a hundred later
    requests push it out, which after a load has stopped is forever. Those
    objects, allocated among the requests' and the rate-limit keys', pin
    the small-object arenas around them. Here a row is bytes copied into
    the ring, and the dicts are built only for a browser that connects
    (L{__iter__}).
    """

    def __init__(self, size: int, width: int = ROW_BYTES) -> None:
        super().__init__(size)
        self.width = width
        self._slots = bytearray(size * width)
        self._lengths = array("l", bytes(array("l").itemsize * size))

    def append(self, data: bytes) -> None:
        """Keep C{data} (at most C{width} bytes), dropping the oldest row."""
        if len(data) > self.width:
            raise ValueError("row longer than %d bytes" % self.width)
        i = self._claim()
        start = i * self.width
        self._slots[start : start + len(data)] = data
        self._lengths[i] = len(data)

    def __iter__(self):
        """The rows kept, oldest first, as new dicts."""
        return self.latest(self._len)

    def latest(self, n: int):
        """The last C{n} rows kept (at most all), oldest first, as new dicts."""
        for i in self._latest(n):
            offset = i * self.width
            yield json.loads(self._slots[offset : offset + self._lengths[i]])


class RequestFeed:
    """
    The latest requests and per-second summaries, pushed to browsers.

    @param gateway: the L{gateway.state.Gateway} (for backend states).
    @param clock: provides C{IReactorTime}.
    @param recent: how many of the latest requests are kept (and shown to
        a browser that connects).
    @param history: how many one-second summaries are kept.
    @param client_buffer: the most bytes queued for one browser that is
        not reading.
    @param max_clients: the most browsers connected at once.
    """

    def __init__(
        self,
        gateway,
        clock,
        recent: int = 100,
        history: int = 300,
        client_buffer: int = 256 * 1024,
        max_clients: int = 16,
    ) -> None:
        self._gateway = gateway
        self._clock = clock
        #: The latest rows, kept in place (see L{_Rows}).
        self.recent = _Rows(recent)
        #: Rows observed since the last flush, as tuples (cheap to make);
        #: L{flush} encodes them into L{recent} and lets them go.
        self._pending: deque = deque(maxlen=recent)
        #: The one-second summaries, kept in place (see L{_Series}).
        self.series = _Series(history)
        self.client_buffer = client_buffer
        self.max_clients = max_clients
        self.clients: set = set()
        self._window = _Window()
        self._flushes = 0
        self._last_tick = clock.seconds()
        self.totals = {"requests": 0, "errors": 0, "rate_limited": 0, "cached": 0}
        #: Events dropped for browsers that did not keep up, in total.
        self.dropped = 0
        #: Sends the batches and ticks while running; on stop, ends every
        #: browser's stream.
        self.service = _FeedService(self)

    # -- the hot path ------------------------------------------------------

    def observe(self, context) -> None:
        """Record one finished request (a L{gateway.proxy.RequestContext})."""
        route = context.route
        backend = context.backend
        duration = context.ended - context.started
        status = context.status
        self._pending.append(
            (
                context.ended,
                context.request_id,
                context.method,
                context.path,
                route.name if route is not None else None,
                backend.url if backend is not None else None,
                status,
                duration,
                context.cache,
            )
        )
        window = self._window
        window.requests += 1
        window.latency[bisect_left(LATENCY_BOUNDS, duration)] += 1
        if status >= 500:
            window.errors += 1
        if context.notes.get("rate_limited") or (status == 429 and backend is None):
            window.rate_limited += 1
        if context.cache in _CACHED:
            window.cached += 1

    # -- timers ------------------------------------------------------------

    def flush(self) -> None:
        """
        Move the rows observed since the last flush into the ring and send
        them; every fourth call, close the second and send a tick.
        """
        try:
            pending = self._pending
            if pending:
                rows = list(pending)
                pending.clear()
                width = self.recent.width
                encoded = [_encode_row(_row(r), width) for r in rows]
                del rows
                for data in encoded:
                    self.recent.append(data)
                if self.clients:
                    self._send(_frame_event("requests", b"[%s]" % b",".join(encoded)))
            self._flushes += 1
            if self._flushes >= _FLUSHES_PER_TICK:
                self._flushes = 0
                self.tick()
        except Exception:
            _log.failure("dashboard feed flush failed")

    def tick(self) -> dict:
        """Close the current second's window into a summary point and send it."""
        now = self._clock.seconds()
        elapsed = max(now - self._last_tick, 1e-3)
        self._last_tick = now
        window, self._window = self._window, _Window()
        p50 = percentile(window.latency, window.requests, 0.5)
        p99 = percentile(window.latency, window.requests, 0.99)
        totals = self.totals
        totals["requests"] += window.requests
        totals["errors"] += window.errors
        totals["rate_limited"] += window.rate_limited
        totals["cached"] += window.cached
        point = {
            "t": round(now, 3),
            "rps": round(window.requests / elapsed, 2),
            "p50_ms": round(p50 * 1000, 3) if p50 is not None else None,
            "p99_ms": round(p99 * 1000, 3) if p99 is not None else None,
            "requests": window.requests,
            "errors": window.errors,
            "rate_limited": window.rate_limited,
            "cached": window.cached,
        }
        self.series.append(point)
        if self.clients:
            self.broadcast(
                "tick",
                {
                    "point": point,
                    "totals": totals,
                    "backends": _backends(self._gateway),
                    "dropped": self.dropped,
                    "clients": len(self.clients),
                },
            )
        return point

    # -- browsers ----------------------------------------------------------

    def hello(self) -> dict:
        """
        What a browser gets on connecting: the recent rows (oldest first,
        with those not flushed yet) and history.
        """
        requests = list(self.recent.latest(self.recent.maxlen - len(self._pending)))
        requests.extend(_row(r) for r in self._pending)
        return {
            "requests": requests,
            "series": list(self.series),
            "totals": self.totals,
            "backends": _backends(self._gateway),
            "dropped": self.dropped,
            "interval": FLUSH_INTERVAL,
        }

    def broadcast(self, event: str, payload) -> None:
        """Send one event, serialised once, to every connected browser."""
        self._send(encode_event(event, payload))

    def _send(self, data: bytes) -> None:
        """Send one encoded event to every connected browser."""
        for client in list(self.clients):
            client.send(data)

    def subscribe(self, request: server.Request) -> Optional["EventStream"]:
        """
        Start an event stream on C{request}.

        @return: the L{EventStream}, or None when C{max_clients} are
            already connected.
        """
        if len(self.clients) >= self.max_clients:
            return None
        stream = EventStream(request, self, self.client_buffer)
        self.clients.add(stream)
        return stream

    def unsubscribe(self, stream: "EventStream") -> None:
        self.clients.discard(stream)


class _FeedService(TimerService):
    def __init__(self, feed: RequestFeed) -> None:
        super().__init__(FLUSH_INTERVAL, feed.flush)
        self.clock = feed._clock
        self.feed = feed
        self.setName("dashboard-feed")

    def stopService(self):
        for client in list(self.feed.clients):
            client.close()
        return super().stopService()


def _row(row: tuple) -> dict:
    ended, request_id, method, path, route, backend, status, duration, cache = row
    text = path.decode("utf-8", "replace")
    if len(text) > MAX_PATH:
        text = text[:MAX_PATH] + "\u2026"
    return {
        "t": round(ended, 3),
        "id": request_id,
        "method": method.decode("ascii", "replace"),
        "path": text,
        "route": route,
        "backend": backend,
        "status": status,
        "ms": round(duration * 1000, 3),
        "cache": cache,
    }


def _encode_row(row: dict, width: int) -> bytes:
    """
    C{row}'s JSON as sent to browsers, at most C{width} bytes: while longer,
    the longest string in it is cut to half (ending in an ellipsis). Paths
    are already cut to L{MAX_PATH} characters, so this is for rare rows.
    """
    data = _dumps(row)
    while len(data) > width:
        name = max(
            (k for k, v in row.items() if isinstance(v, str) and len(v) > 2),
            key=lambda k: len(_dumps(row[k])),
            default=None,
        )
        if name is None:
            raise ValueError("request row longer than %d bytes" % width)
        text = row[name]
        row[name] = text[: len(text) // 2] + "\u2026"
        data = _dumps(row)
    return data


def _dumps(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("ascii")


def _backends(gateway) -> list:
    try:
        return [
            {
                "service": s["service"],
                "backend": s["backend"],
                "healthy": bool(s.get("healthy", True)) and not s.get("ejected", False),
                "circuit": s.get("circuit", "closed"),
                "active": s.get("active", 0),
            }
            for s in backend_states(gateway)
        ]
    except Exception:
        _log.failure("reading backend states failed")
        return []


def encode_event(event: str, payload) -> bytes:
    """One server-sent event: C{event:} and one C{data:} line of JSON."""
    return _frame_event(event, _dumps(payload))


def _frame_event(event: str, data: bytes) -> bytes:
    """One server-sent event carrying C{data}, one line of JSON already encoded."""
    return b"event: %s\ndata: %s\n\n" % (event.encode("ascii"), data)


@implementer(IPushProducer)
class EventStream:
    """
    One browser's event stream, and the push producer of its connection.

    Writes go straight to the connection while it keeps up. Once Twisted
    pauses this producer (the socket's buffer is full), events wait in a
    queue of at most C{limit} bytes; the oldest are dropped to make room,
    and counted in C{dropped} (and the feed's). On resume the queue is
    written until the connection pauses again.
    """

    def __init__(self, request: server.Request, feed: RequestFeed, limit: int) -> None:
        self.request = request
        self.feed = feed
        self.limit = limit
        self.paused = False
        self.queue: deque = deque()
        self.queued = 0
        self.dropped = 0
        self.closed = False
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(self._gone)

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.paused and not self.queue:
            self.request.write(data)
            return
        if len(data) > self.limit:
            self._drop(1)
            return
        self.queue.append(data)
        self.queued += len(data)
        while self.queued > self.limit:
            self.queued -= len(self.queue.popleft())
            self._drop(1)

    def _drop(self, n: int) -> None:
        self.dropped += n
        self.feed.dropped += n

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while self.queue and not self.paused and not self.closed:
            data = self.queue.popleft()
            self.queued -= len(data)
            self.request.write(data)

    def stopProducing(self) -> None:
        self._gone(None)

    def close(self) -> None:
        """End the stream (at shutdown)."""
        if not self.closed:
            self._gone(None)
            self.request.unregisterProducer()
            self.request.finish()

    def _gone(self, _) -> None:
        self.closed = True
        self.queue.clear()
        self.queued = 0
        self.feed.unsubscribe(self)


class EventsResource(Resource):
    """C{GET /dashboard/events}: the feed as C{text/event-stream}."""

    isLeaf = True

    def __init__(self, feed: RequestFeed) -> None:
        super().__init__()
        self._feed = feed

    def render_GET(self, request: server.Request):
        request.setHeader(b"Cache-Control", b"no-store")
        stream = self._feed.subscribe(request)
        if stream is None:
            request.setResponseCode(503)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            request.setHeader(b"Retry-After", b"5")
            return b"too many dashboard clients\n"
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"X-Accel-Buffering", b"no")
        _small_send_buffer(request, self._feed.client_buffer)
        stream.send(b"retry: 2000\n\n" + encode_event("hello", self._feed.hello()))
        return server.NOT_DONE_YET


def _small_send_buffer(request: server.Request, size: int) -> None:
    """
    Cap the kernel's send buffer of an event stream's socket at about
    C{size} bytes (Linux doubles it), instead of letting it grow to
    megabytes: a stalled browser then holds little kernel memory, and its
    stream's own bounded queue takes over sooner. Events are small, so a
    browser that reads keeps up. Does nothing for transports without a
    socket (TLS, tests).
    """
    try:
        request.channel.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    except (AttributeError, OSError):
        pass


class _StaticFile(Resource):
    isLeaf = True

    def __init__(self, body: bytes, content_type: bytes) -> None:
        super().__init__()
        self._body = body
        self._type = content_type

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", self._type)
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(
            b"Content-Security-Policy",
            b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        )
        return self._body


class DashboardResource(Resource):
    """
    C{/dashboard/}: the page and its assets, read once from the package
    at start-up, and C{/dashboard/events}.
    """

    def __init__(self, feed: RequestFeed, static_dir: str = _STATIC) -> None:
        super().__init__()
        for name in sorted(os.listdir(static_dir)):
            extension = os.path.splitext(name)[1]
            if extension not in _TYPES:
                continue
            with open(os.path.join(static_dir, name), "rb") as f:
                body = f.read()
            child = _StaticFile(body, _TYPES[extension])
            self.putChild(name.encode("utf-8"), child)
            if name == "index.html":
                self.putChild(b"", child)
        self.putChild(b"events", EventsResource(feed))

    def getChild(self, path: bytes, request: server.Request):
        return NoResource()

    def render_GET(self, request: server.Request) -> bytes:
        # /dashboard without the slash: the page's relative URLs need it.
        request.redirect(b"dashboard/")
        return b""
