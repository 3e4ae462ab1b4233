"""
Unit tests of the cache filter's helpers: the body tee and the capped
collector the filter relies on to keep memory bounded, the counters, and
the backend target.
"""

from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH

from gateway.cache import CachedResponse
from gateway.cachefilter import HIT, MISS, CacheStats, TeeResponse, backend_target, collect_capped
from gateway.cachestore import MemoryCacheStore
from gateway.config import Route, RouteMatch
from tests.harness import BodyRecorder


class FakeTransport:
    stopped = False

    def stopProducing(self):
        self.stopped = True


class FakeResponse:
    """Delivers C{chunks}, then ends with C{reason}, as an IResponse does."""

    code = 200

    def __init__(self, chunks, reason=ResponseDone(), length=UNKNOWN_LENGTH):
        self.chunks = chunks
        self.reason = reason
        self.length = length
        self.transport = FakeTransport()

    def deliverBody(self, protocol):
        protocol.makeConnection(self.transport)
        for chunk in self.chunks:
            if self.transport.stopped:
                break
            protocol.dataReceived(chunk)
        protocol.connectionLost(Failure(self.reason))


Recorder = BodyRecorder


def tee(chunks, cap, reason=ResponseDone()):
    seen = []
    inner = Recorder()
    response = FakeResponse(chunks, reason)
    TeeResponse(response, cap, seen.append).deliverBody(inner)
    return seen, inner, response


def test_tee_relays_everything_and_keeps_a_body_within_the_cap():
    seen, inner, response = tee([b"abc", b"def"], cap=6)
    assert seen == [b"abcdef"]
    assert inner.data == [b"abc", b"def"] and inner.reason.check(ResponseDone)
    assert inner.transport is response.transport  # flow control still reaches the backend


def test_tee_keeps_nothing_over_the_cap_but_relays_all():
    seen, inner, _ = tee([b"abc", b"defg"], cap=6)
    assert seen == [None]
    assert b"".join(inner.data) == b"abcdefg"


def test_tee_keeps_nothing_from_a_cut_body():
    seen, inner, _ = tee([b"abc"], cap=100, reason=ConnectionLost())
    assert seen == [None] and inner.reason.check(ConnectionLost)


def test_tee_delegates_the_rest_of_the_response():
    response = FakeResponse([])
    wrapped = TeeResponse(response, 10, lambda body: None)
    assert wrapped.code == 200 and wrapped.length is UNKNOWN_LENGTH


def test_collect_capped():
    assert collect_capped(FakeResponse([b"ab", b"cd"]), 4).result == b"abcd"
    over = FakeResponse([b"ab", b"cde"])
    assert collect_capped(over, 4).result is None and over.transport.stopped
    announced = FakeResponse([b"ab"], length=5)
    assert collect_capped(announced, 4).result is None and announced.transport.stopped
    assert collect_capped(FakeResponse([b"ab"], reason=ConnectionLost()), 4).result is None


def test_stats_count_labels_per_route_and_read_memory_stores():
    clock = Clock()
    store = MemoryCacheStore(limit_bytes=400, clock=clock)
    stats = CacheStats(memory_stores=lambda: [store])
    stats.count("a", HIT)
    stats.count("a", MISS)
    stats.count("b", HIT)
    entry = CachedResponse(200, [(b"Date", b"x")], b"x" * 100, 0.0, 0.0)
    for key in (b"k1", b"k2", b"k3"):
        store.set(key, (entry,), 60)
    data = stats.as_dict()
    assert (data["hits"], data["misses"], data["stale"], data["bypass"]) == (2, 1, 0, 0)
    assert data["routes"] == {"a": {"hits": 1, "misses": 1}, "b": {"hits": 1}}
    assert data["bytes_stored"] == store.bytes_stored <= 400
    assert data["evictions"] == store.evictions >= 1


def _context(path, query=b"", upstream_path=None):
    from gateway.proxy import RequestContext

    context = RequestContext("id", b"GET", path, "127.0.0.1", 0.0)
    context.query = query
    context.upstream_path = upstream_path
    return context


def test_backend_target_strips_the_prefix_like_the_proxy():
    stripped = Route("r", RouteMatch(path_prefix="/api"), "s", strip_prefix=True)
    kept = Route("r", RouteMatch(path_prefix="/api"), "s")
    assert backend_target(stripped, _context(b"/api/items", b"?x=1")) == b"/items?x=1"
    assert backend_target(stripped, _context(b"/api")) == b"/"
    assert backend_target(kept, _context(b"/api/items")) == b"/api/items"


def test_backend_target_takes_a_rewritten_path():
    route = Route("r", RouteMatch(path_prefix="/api"), "s", strip_prefix=True)
    assert backend_target(route, _context(b"/api/items", b"?q", upstream_path=b"/v2/items")) == b"/v2/items?q"
