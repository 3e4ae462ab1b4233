"""Header rules (RFC 9110 §7.6) and the per-backend connection limit."""

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from gateway.config import Backend
from gateway.forwarding import ConnectionLimit, connection_tokens, upstream_headers

BACKEND = Backend.from_url("http://10.0.0.1:9000")


def forwarded(raw, **kw):
    options = dict(client_ip="192.0.2.1", proto=b"http", host=b"api.test", preserve_host=False, backend=BACKEND)
    options.update(kw)
    return upstream_headers(Headers(raw), **options)


def test_hop_by_hop_and_connection_named_headers_dropped():
    out = forwarded({
        b"Connection": [b"keep-alive, X-Private"], b"X-Private": [b"1"], b"Keep-Alive": [b"timeout=1"],
        b"TE": [b"trailers"], b"Trailer": [b"x"], b"Upgrade": [b"h2c"], b"Proxy-Authorization": [b"a"],
        b"Transfer-Encoding": [b"chunked"], b"Content-Length": [b"3"], b"Expect": [b"100-continue"],
        b"X-Kept": [b"a", b"b"],
    })
    names = {name.lower() for name, _ in out.getAllRawHeaders()}
    assert names == {b"x-kept", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via", b"host"}
    assert out.getRawHeaders(b"x-kept") == [b"a", b"b"]


def test_forwarded_headers_appended():
    out = forwarded({b"X-Forwarded-For": [b"203.0.113.1", b"198.51.100.2"], b"Via": [b"1.0 edge"]})
    assert out.getRawHeaders(b"x-forwarded-for") == [b"203.0.113.1, 198.51.100.2, 192.0.2.1"]
    assert out.getRawHeaders(b"via") == [b"1.0 edge, 1.1 txgateway"]
    assert out.getRawHeaders(b"x-forwarded-proto") == [b"http"]
    assert out.getRawHeaders(b"x-forwarded-host") == [b"api.test"]


def test_host_header():
    assert forwarded({}).getRawHeaders(b"host") == [b"10.0.0.1:9000"]
    assert forwarded({}, preserve_host=True).getRawHeaders(b"host") == [b"api.test"]


def test_connection_tokens():
    assert connection_tokens(Headers({b"Connection": [b"Keep-Alive , X-A", b"x-b"]})) == {b"keep-alive", b"x-a", b"x-b"}
    assert connection_tokens(Headers()) == frozenset()


def test_connection_limit_queues_in_order_and_hands_over_slots():
    limit = ConnectionLimit(2)
    assert limit.acquire(BACKEND) is None and limit.acquire(BACKEND) is None
    assert limit.active(BACKEND) == 2
    first, second = limit.acquire(BACKEND), limit.acquire(BACKEND)
    fired = []
    first.addCallback(lambda _: fired.append("first"))
    second.addCallback(lambda _: fired.append("second"))
    limit.release(BACKEND)
    assert fired == ["first"] and limit.active(BACKEND) == 2
    second.cancel()
    failures = []
    second.addErrback(lambda f: failures.append(f.check(CancelledError)))
    assert failures == [CancelledError]
    limit.release(BACKEND)
    limit.release(BACKEND)
    assert limit.active(BACKEND) == 0


def test_body_relay_ends_quietly_when_the_client_has_gone():
    """
    A client that goes away mid-body takes its channel with it; the relay's
    end (the backend connection aborted in turn) must still call its
    C{ended} rather than raise from C{unregisterProducer} on the missing channel.
    """
    from twisted.web.test.requesthelper import DummyChannel, DummyRequest

    from gateway.forwarding import BodyRelay

    import types

    from twisted.web.http import Request

    request = DummyRequest([b""])
    # twisted.web's own: it unregisters from the channel
    request.unregisterProducer = types.MethodType(Request.unregisterProducer, request)
    request.channel = None  # what Request.connectionLost leaves behind
    ended = []
    relay = BodyRelay(request, lambda r: ended.append(r.reason))
    relay.connectionLost(Failure(ConnectionDone()))
    assert len(ended) == 1 and ended[0].check(ConnectionDone) and relay.reason is ended[0]

    request = DummyRequest([b""])
    request.channel = DummyChannel()
    unregistered = []
    request.unregisterProducer = lambda: unregistered.append(True)
    relay = BodyRelay(request, lambda r: None)
    relay.connectionLost(Failure(ConnectionDone()))
    assert unregistered == [True]


def test_body_relay_logs_what_its_end_handler_raises():
    """
    C{ended} is called straight from C{connectionLost}, which the backend's
    connection calls: what it raises is logged, not raised into that
    connection.
    """
    from twisted.logger import globalLogPublisher
    from twisted.web.test.requesthelper import DummyChannel, DummyRequest

    from gateway.forwarding import BodyRelay

    request = DummyRequest([b""])
    request.channel = DummyChannel()
    request.unregisterProducer = lambda: None

    def ended(relay):
        raise RuntimeError("broken end")

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        BodyRelay(request, ended).connectionLost(Failure(ConnectionDone()))
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = [e for e in events if "log_failure" in e]
    assert event["log_failure"].check(RuntimeError)
    assert "end of a backend response body" in event["log_format"]


@pytest.mark.cpython_only  # (reference counting; PyPy's collector finds everything alike)
@pytest.mark.parametrize("path", ["/x", "/status/503"])
def test_a_proxied_request_leaves_no_reference_cycle_through_the_forwarder(path):
    """
    Nothing of a proxied request is left for the cycle collector: the body
    relay lets go of its end handler (which holds the request's state,
    which holds the relay), and the forwarder's per-request object is let
    go of by its result once fired (Twisted drops the canceller) and by
    its timer once cancelled.  A cycle would keep each request, its
    headers and body until a collection of its generation, which on
    CPython, whose gateway raises the generation-0 threshold, comes late.
    """
    from gateway.forwarding import BodyRelay, _Sending
    from tests.stubgateway import BASE, StubGateway

    gw = StubGateway(BASE + "routes: [{name: r, service: svc, match: {path_prefix: /}}]")
    gw.request("GET", "/warm")

    def proxied():
        assert gw.request("POST", path, body=b"b" * 1000).code in (200, 503)
        gw.contexts.clear()

    assert _left_for_the_cycle_collector((_Sending, BodyRelay), proxied) == []


def _left_for_the_cycle_collector(kinds, run) -> list:
    """
    Call C{run} with the cycle collector off, then the objects of the
    classes C{kinds} that only it would have freed (CPython).
    """
    import gc

    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        run()
        gc.collect()
        return [o for o in gc.garbage if isinstance(o, kinds)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


class _Agent:
    """An agent whose responses the test gives: C{sent} holds a Deferred per request."""

    def __init__(self) -> None:
        self.sent: list = []
        self.cancelled: list = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        from twisted.internet.defer import Deferred

        d = Deferred(lambda d: self.cancelled.append(uri))
        self.sent.append((uri, d))
        return d


def _forwarder(limit=1):
    from twisted.internet.task import Clock

    from gateway.config import parse_config
    from gateway.forwarding import ServiceForwarder

    config = parse_config(
        "services:\n  svc:\n    backends: [{url: 'http://10.0.0.1:9000'}]\n"
        f"    max_connections_per_backend: {limit}\nroutes: []\n"
    )
    service = config.services["svc"]
    clock, agent = Clock(), _Agent()
    return clock, agent, ServiceForwarder(clock, service, agent=agent), service.backends[0]


def _outcome(d):
    got = []
    d.addBoth(got.append)
    return got


def test_forwarder_sends_at_once_with_a_free_slot_and_answers_with_the_response():
    clock, agent, forwarder, backend = _forwarder()
    got = _outcome(forwarder.request(b"GET", backend, b"/a", Headers(), None, 5.0))
    [(uri, d)] = agent.sent
    assert uri == b"http://10.0.0.1:9000/a"
    response = object()
    d.callback(response)
    assert got == [response]
    assert forwarder.limits.active(backend) == 1  # the caller gives the slot back
    assert clock.getDelayedCalls() == []  # the timeout was stopped


@pytest.mark.parametrize(
    "how, status, kind",
    [("timeout", 504, "timeout"), ("refused", 502, "connect_failure"), ("cancelled", 502, "reset")],
)
def test_forwarder_failures_become_upstream_errors_and_free_the_slot(how, status, kind):
    from twisted.internet.error import ConnectionRefusedError

    from gateway.forwarding import UpstreamError

    clock, agent, forwarder, backend = _forwarder()
    sent = forwarder.request(b"GET", backend, b"/a", Headers(), None, 5.0)
    got = _outcome(sent)
    [(_, d)] = agent.sent
    if how == "timeout":
        clock.advance(5)
        assert agent.cancelled == [b"http://10.0.0.1:9000/a"]
    elif how == "refused":
        d.errback(ConnectionRefusedError())
    else:
        sent.cancel()
    [failure] = got
    assert failure.check(UpstreamError)
    assert (failure.value.status, failure.value.kind) == (status, kind)
    assert forwarder.limits.active(backend) == 0


def test_forwarder_waits_for_a_slot_then_sends():
    clock, agent, forwarder, backend = _forwarder(limit=1)
    first = _outcome(forwarder.request(b"GET", backend, b"/1", Headers(), None, 5.0))
    second = _outcome(forwarder.request(b"GET", backend, b"/2", Headers(), None, 5.0))
    assert [uri for uri, _ in agent.sent] == [b"http://10.0.0.1:9000/1"]  # the second waits
    response = object()
    agent.sent[0][1].callback(response)
    assert first == [response] and second == []
    forwarder.limits.release(backend)  # the first one's body ended: the slot passes on
    assert [uri for uri, _ in agent.sent][1:] == [b"http://10.0.0.1:9000/2"]
    agent.sent[1][1].callback(response)
    assert second == [response]
    assert clock.getDelayedCalls() == []  # both timeouts stopped


@pytest.mark.parametrize("how", ["timeout", "cancelled", "fails after the slot"])
def test_forwarder_waiting_for_a_slot_can_time_out_be_cancelled_or_fail(how):
    from gateway.forwarding import UpstreamError

    clock, agent, forwarder, backend = _forwarder(limit=1)
    forwarder.request(b"GET", backend, b"/1", Headers(), None, 60.0)
    waiting = forwarder.request(b"GET", backend, b"/2", Headers(), None, 5.0)
    got = _outcome(waiting)
    if how == "timeout":
        clock.advance(5)
        [failure] = got
        assert (failure.value.status, failure.value.kind) == (503, "overload")
    elif how == "cancelled":
        waiting.cancel()
        [failure] = got
        assert failure.check(UpstreamError) and failure.value.kind == "overload"
    else:
        forwarder.limits.release(backend)  # the slot passes on; then the request fails
        agent.sent[1][1].errback(ConnectionDone())
        [failure] = got
        assert (failure.value.status, failure.value.kind) == (502, "reset")
    # The first request's slot only (the failed one gave its slot back;
    # one that never had a slot took none).
    assert forwarder.limits.active(backend) == (1 if how != "fails after the slot" else 0)
    assert [c.getTime() for c in clock.getDelayedCalls()] == [60.0]  # the first one's timeout


@pytest.mark.cpython_only  # (reference counting, as above)
@pytest.mark.parametrize("waiting", [False, True])
def test_a_timed_out_request_leaves_no_reference_cycle(waiting):
    """
    A DelayedCall that has run keeps its function: the forwarder's timer,
    whose function is its per-request object's method, must be let go of
    when it fires, or every timed-out request's headers and body wait for
    the cycle collector.
    """
    from gateway.forwarding import _Sending

    clock, agent, forwarder, backend = _forwarder(limit=1)
    if waiting:
        forwarder.request(b"GET", backend, b"/0", Headers(), None, 60.0).addErrback(lambda f: None)

    def timed_out():
        got = _outcome(forwarder.request(b"POST", backend, b"/a", Headers(), b"x" * 1000, 5.0))
        clock.advance(5)
        assert got[0].value.kind == ("overload" if waiting else "timeout")

    assert _left_for_the_cycle_collector(_Sending, timed_out) == []
