"""Tests for gateway.feed: the dashboard's request feed and event streams."""

import json
import sys

import pytest

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from gateway import feed as feed_module
from gateway.feed import FLUSH_INTERVAL, LATENCY_BOUNDS, EventStream, RequestFeed, encode_event, percentile
from gateway.state import Gateway
from tests.contexts import config, finished


class FakeRequest:
    """Just what an L{EventStream} uses of a request."""

    def __init__(self):
        self.written = []
        self.producer = None
        self.finished = False
        self._finish = Deferred()

    def registerProducer(self, producer, streaming):
        assert streaming
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def write(self, data):
        self.written.append(data)

    def finish(self):
        self.finished = True

    def notifyFinish(self):
        return self._finish

    def events(self):
        out = []
        for chunk in self.written:
            for block in chunk.split(b"\n\n"):
                lines = dict(line.split(b": ", 1) for line in block.split(b"\n") if b": " in line)
                if b"event" in lines:
                    out.append((lines[b"event"].decode(), json.loads(lines[b"data"])))
        return out


def make_feed(**kwargs):
    clock = Clock()
    clock.advance(1000)
    gateway = Gateway(clock, config())
    return clock, gateway, RequestFeed(gateway, clock, **kwargs)


def test_percentile_estimate():
    counts = [0] * (len(LATENCY_BOUNDS) + 1)
    assert percentile(counts, 0, 0.5) is None
    from bisect import bisect_left

    for ms in range(1, 101):
        counts[bisect_left(LATENCY_BOUNDS, ms / 1000)] += 1
    p50 = percentile(counts, 100, 0.5)
    p99 = percentile(counts, 100, 0.99)
    assert 0.050 <= p50 <= 0.050 * 1.1
    assert 0.099 <= p99 <= 0.099 * 1.1


def test_rows_batched_to_clients_within_a_flush():
    clock, gateway, feed = make_feed()
    request = FakeRequest()
    stream = feed.subscribe(request)
    assert request.producer is stream
    c = gateway.snapshot.config
    for i in range(3):
        feed.observe(finished(c, request_id=f"r{i}", path=b"/users/%d" % i))
    assert request.written == []  # nothing on the request path
    feed.flush()
    ((event, rows),) = request.events()
    assert event == "requests"
    assert [r["id"] for r in rows] == ["r0", "r1", "r2"]
    assert rows[0] == {
        "t": 1000.012, "id": "r0", "method": "GET", "path": "/users/0", "route": "users-api",
        "backend": "http://127.0.0.1:9001", "status": 200, "ms": 12.0, "cache": None,
    }
    feed.flush()
    assert len(request.events()) == 1  # nothing new, nothing sent


def test_tick_summarises_each_second():
    clock, gateway, feed = make_feed()
    request = FakeRequest()
    feed.subscribe(request)
    c = gateway.snapshot.config
    for i in range(98):
        feed.observe(finished(c, duration=0.010))
    feed.observe(finished(c, duration=2.0, status=502))
    feed.observe(finished(c, backend=None, status=429, cache="HIT"))
    clock.advance(1)
    for _ in range(4):
        feed.flush()
    ticks = [payload for event, payload in request.events() if event == "tick"]
    (tick,) = ticks
    point = tick["point"]
    assert point["requests"] == 100 and point["rps"] == 100.0
    assert point["errors"] == 1 and point["rate_limited"] == 1 and point["cached"] == 1
    assert 10 <= point["p50_ms"] <= 11 and point["p99_ms"] >= 10
    assert tick["totals"]["requests"] == 100
    assert {b["backend"] for b in tick["backends"]} == {
        "http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003",
    }
    assert all(b["healthy"] and b["circuit"] == "closed" for b in tick["backends"])
    assert list(feed.series) == [point]


def test_recent_rows_bounded_and_in_hello():
    clock, gateway, feed = make_feed(recent=5)
    c = gateway.snapshot.config
    for i in range(50):
        feed.observe(finished(c, request_id=f"r{i}"))
    hello = feed.hello()
    assert [r["id"] for r in hello["requests"]] == [f"r{i}" for i in range(45, 50)]
    request = FakeRequest()
    feed.subscribe(request)
    feed.flush()  # 50 new rows, only the 5 kept are sent
    ((_, rows),) = request.events()
    assert len(rows) == 5


def test_series_bounded_and_in_hello_oldest_first():
    clock, gateway, feed = make_feed(history=10)
    c = gateway.snapshot.config
    for second in range(25):
        for _ in range(second):
            feed.observe(finished(c, duration=0.010))
        clock.advance(1)
        feed.tick()
    series = feed.hello()["series"]
    assert [p["requests"] for p in series] == list(range(15, 25))
    assert [p["t"] for p in series] == [1000.0 + s for s in range(16, 26)]
    assert series[0]["p50_ms"] is not None and series[-1]["rps"] == 24.0
    clock.advance(1)
    assert feed.tick()["p50_ms"] is None  # no request in that second
    assert list(feed.series)[-1]["p50_ms"] is None and len(feed.series) == 10


@pytest.mark.cpython_only
def test_series_keeps_no_objects_of_past_ticks():
    """
    The history holds numbers in place, not each tick's objects: those,
    kept for minutes and allocated among the requests', would pin the
    interpreter's memory arenas after a load is gone (docs/ratelimit.rst,
    "Memory").
    """
    clock, gateway, feed = make_feed(history=50)
    for _ in range(50):
        clock.advance(1)
        feed.tick()
    import tracemalloc

    tracemalloc.start()
    try:
        for _ in range(100):
            clock.advance(1.5)
            feed.tick()
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    kept = snapshot.filter_traces([tracemalloc.Filter(True, feed_module.__file__)])
    # the current second's window and its latency counts: nothing per tick
    assert sum(s.count for s in kept.statistics("filename")) <= 5
    assert len(feed.series) == 50


@pytest.mark.cpython_only
def test_recent_rows_keep_no_objects_of_past_requests():
    """
    After a flush, the latest rows are held as bytes in place, not as each
    request's tuple, ID, path and floats: those, kept until a hundred later
    requests push them out (forever once a load has stopped), would pin the
    interpreter's memory arenas around them (docs/ratelimit.rst, "Memory").
    """
    clock, gateway, feed = make_feed(recent=100)
    c = gateway.snapshot.config
    contexts = __file__, feed_module.__file__, finished.__code__.co_filename

    def load(batches, prefix):
        for batch in range(batches):
            for i in range(60):
                path = b"/users/%d/%d" % (batch, i)
                feed.observe(finished(c, request_id=f"{prefix}-{batch}-{i}", path=path))
            clock.advance(FLUSH_INTERVAL)
            feed.flush()

    load(10, "warm")  # the ring and the pending deque's blocks, once
    import tracemalloc

    tracemalloc.start()
    try:
        load(20, "traced")
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    kept = snapshot.filter_traces([tracemalloc.Filter(True, name) for name in contexts])
    # Freed floats go to CPython's float free list (up to 100), still
    # traced, to be reused: not kept by the feed, so not counted.
    kept = [t for t in kept.traces if t.size != sys.getsizeof(0.0)]
    # the current second's window and counts: nothing per request
    assert len(kept) <= 10, kept
    rows = feed.hello()["requests"]
    assert [r["id"] for r in rows] == [f"traced-{b}-{i}" for b in (18, 19) for i in range(60)][-100:]
    assert rows[-1]["path"] == "/users/19/59"


def test_hello_includes_rows_not_flushed_yet_oldest_first():
    clock, gateway, feed = make_feed(recent=5)
    c = gateway.snapshot.config
    for i in range(3):
        feed.observe(finished(c, request_id=f"a{i}"))
    feed.flush()
    for i in range(3):
        feed.observe(finished(c, request_id=f"b{i}"))
    assert [r["id"] for r in feed.hello()["requests"]] == ["a1", "a2", "b0", "b1", "b2"]
    feed.flush()
    hello = feed.hello()["requests"]
    assert [r["id"] for r in hello] == ["a1", "a2", "b0", "b1", "b2"]
    assert hello[-1] == {
        "t": 1000.012, "id": "b2", "method": "GET", "path": "/users/7", "route": "users-api",
        "backend": "http://127.0.0.1:9001", "status": 200, "ms": 12.0, "cache": None,
    }


def test_rows_too_long_for_a_slot_are_cut_not_lost():
    clock, gateway, feed = make_feed()
    request = FakeRequest()
    feed.subscribe(request)
    c = gateway.snapshot.config
    # 200 characters of four-byte UTF-8: 2,400 bytes of JSON escapes
    path = ("/" + "\U0001F600" * 199).encode("utf-8")
    feed.observe(finished(c, request_id="x" * 128, path=path))
    feed.observe(finished(c, request_id="short"))
    feed.flush()
    ((_, sent),) = request.events()
    kept = feed.hello()["requests"]
    assert sent == kept and [r["id"] for r in kept] == ["x" * 128, "short"]
    long = kept[0]
    assert len(json.dumps(long, separators=(",", ":"))) <= feed_module.ROW_BYTES
    assert long["path"].startswith("/\U0001F600") and long["path"].endswith("\u2026")
    assert long["method"] == "GET" and long["status"] == 200


def test_paused_client_queue_is_bounded_and_drops_oldest():
    clock, gateway, feed = make_feed(client_buffer=4096)
    request = FakeRequest()
    stream = feed.subscribe(request)
    stream.pauseProducing()
    events = [encode_event("requests", [{"n": i, "pad": "x" * 500}]) for i in range(100)]
    for data in events:
        stream.send(data)
    assert request.written == []
    assert stream.queued <= 4096
    assert stream.dropped == feed.dropped > 0
    assert stream.dropped + len(stream.queue) == 100
    stream.resumeProducing()
    assert request.written == events[-len(request.written):]  # the newest were kept, in order
    assert stream.queue == type(stream.queue)() and stream.queued == 0
    stream.send(b"next")
    assert request.written[-1] == b"next"


def test_resume_stops_when_paused_again():
    clock, gateway, feed = make_feed(client_buffer=1 << 20)
    request = FakeRequest()
    stream = feed.subscribe(request)
    stream.pauseProducing()
    for i in range(10):
        stream.send(b"%d" % i)
    original = request.write

    def write(data):
        original(data)
        if len(request.written) == 3:
            stream.pauseProducing()  # the transport's buffer filled again

    request.write = write
    stream.resumeProducing()
    assert request.written == [b"0", b"1", b"2"]
    assert len(stream.queue) == 7


def test_max_clients_and_goodbye():
    clock, gateway, feed = make_feed(max_clients=2)
    first, second = FakeRequest(), FakeRequest()
    s1 = feed.subscribe(first)
    feed.subscribe(second)
    assert feed.subscribe(FakeRequest()) is None
    first._finish.errback(Exception("connection lost"))
    first._finish.addErrback(lambda _: None)
    assert s1 not in feed.clients and s1.closed
    s1.send(b"ignored")
    assert first.written == []
    assert feed.subscribe(FakeRequest()) is not None


def test_service_ends_streams_on_stop():
    clock, gateway, feed = make_feed()
    request = FakeRequest()
    feed.subscribe(request)
    feed.service.startService()
    clock.pump([FLUSH_INTERVAL] * 4)
    assert any(event == "tick" for event, _ in request.events())
    feed.service.stopService()
    assert request.finished and request.producer is None
    assert not feed.clients
    assert not clock.getDelayedCalls()
