"""
The proxy's hooks for request filters, through the resource tree without
sockets: upstream header changes, a rewritten path.
"""

from __future__ import annotations

import pytest
from twisted.web.http_headers import Headers

from gateway import pipeline
from gateway.proxy import apply_upstream_headers
from tests.stubgateway import BASE, StubGateway


@pytest.fixture
def register():
    """Register filters for one test only."""
    added = []

    def add(order, name, factory):
        pipeline.register_filter(order, name, factory)
        added.append(name)

    yield add
    for name in added:
        del pipeline.FILTERS[name]


class Hooks:
    name = "test_hooks"

    def __init__(self, gateway):
        pass

    def on_request(self, request, context):
        context.upstream_remove.add(b"x-secret")
        context.upstream_headers.append((b"X-Added", b"1"))
        context.upstream_headers.append((b"X-Added", b"2"))
        context.upstream_headers.append((b"X-Replaced", b"new"))
        context.upstream_headers.append((b"Host", b"chosen.test"))
        context.upstream_path = b"/elsewhere"
        context.query = b"?q=2"


def test_apply_upstream_headers_removes_then_sets_then_adds():
    headers = Headers({b"X-A": [b"client"], b"X-B": [b"client"], b"X-C": [b"client"]})
    apply_upstream_headers(headers, {b"x-a", b"x-c"}, [(b"X-C", b"1"), (b"X-B", b"2"), (b"X-C", b"3")])
    assert headers.getRawHeaders(b"x-a") is None
    assert headers.getRawHeaders(b"x-b") == [b"2"]
    assert headers.getRawHeaders(b"x-c") == [b"1", b"3"]


def test_filters_change_what_is_forwarded_not_the_client_request(register):
    register(45, "test_hooks", Hooks)
    gw = StubGateway(BASE + "routes: [{name: r, service: svc, match: {path_prefix: /api}, strip_prefix: true}]")
    r = gw.request("GET", "/api/x?q=1", headers={"X-Secret": "s", "X-Replaced": "old"})
    assert r.code == 200
    assert r.json()["uri"] == "/elsewhere?q=2"
    assert r.upstream_header("X-Secret") == []
    assert r.upstream_header("X-Added") == ["1", "2"]
    assert r.upstream_header("X-Replaced") == ["new"]
    assert r.upstream_header("Host") == ["chosen.test"]
    # The client's request itself is untouched, for the filters that follow.
    backend_request = gw.backend.requests[-1]
    assert backend_request.requestHeaders.getRawHeaders(b"x-request-id") == [r.header("X-Request-Id").encode()]


def test_route_path_by_default():
    gw = StubGateway(BASE + "routes: [{name: r, service: svc, match: {path_prefix: /api}, strip_prefix: true}]")
    assert gw.request("GET", "/api/users/7?x=1").json()["uri"] == "/users/7?x=1"
    assert gw.request("GET", "/api").json()["uri"] == "/"



@pytest.mark.parametrize(
    "sent, kept",
    [
        (["abc-123.x:y_z"], True),
        (["no spaces"], False),
        (["x" * 129], False),
        (["a", "b"], False),  # which one was meant is unknowable
    ],
)
def test_request_id_kept_when_valid_else_made_and_sent_both_ways(sent, kept):
    from twisted.web.http_headers import Headers as H

    gw = StubGateway(BASE + "routes: [{name: r, service: svc, match: {path_prefix: /x}}]")
    headers = H()
    for value in sent:
        headers.addRawHeader(b"X-Request-Id", value.encode())
    r = gw.request("GET", "/x", headers=headers)
    request_id = r.header("X-Request-Id")
    assert (request_id == sent[0]) is kept
    if not kept:
        assert len(request_id) == 32 and int(request_id, 16) >= 0
    assert r.upstream_header("X-Request-Id") == [request_id]
    assert gw.contexts[-1].request_id == request_id
    answer = gw.request("GET", "/nowhere", headers=headers)
    assert answer.code == 404
    assert answer.json()["request_id"] == answer.header("X-Request-Id")
    assert (answer.header("X-Request-Id") == sent[0]) is kept


def test_http_date_is_formatted_once_a_second():
    """gateway.proxy.http_date: IMF-fixdate (RFC 9110, 5.6.7), one value per second."""
    from gateway.proxy import http_date

    assert http_date(784111777.0) == b"Sun, 06 Nov 1994 08:49:37 GMT"  # RFC 9110's example
    first = http_date(784111777.9)
    assert first == b"Sun, 06 Nov 1994 08:49:37 GMT"
    assert http_date(784111777.5) is first  # the same second: not formatted again
    assert http_date(784111778.0) == b"Sun, 06 Nov 1994 08:49:38 GMT"


class UpstreamVerdicts:
    """An on_upstream_response hook whose verdict each test sets."""

    name = "test_verdicts"

    def __init__(self, gateway):
        self.verdict = None
        self.asked = []

    def on_upstream_response(self, request, context, response):
        self.asked.append(response.code)
        verdict = self.verdict
        if isinstance(verdict, Exception):
            raise verdict
        return verdict


class SecondOpinion(UpstreamVerdicts):
    name = "test_second_opinion"


def _verdicts_gateway(register):
    register(44, "test_verdicts", UpstreamVerdicts)
    register(46, "test_second_opinion", SecondOpinion)
    gw = StubGateway(BASE + "routes: [{name: r, service: svc, match: {path_prefix: /x}}]")
    # Count the backend slot's releases: each request must give it back once.
    limits = gw.gateway.snapshot.services["svc"].forwarder.limits
    gw.released = []
    release = limits.release
    limits.release = lambda backend: (gw.released.append(backend.url), release(backend))[1]
    return gw, gw.filter("test_verdicts"), gw.filter("test_second_opinion")


def test_upstream_response_relayed_when_no_filter_decides(register):
    gw, first, second = _verdicts_gateway(register)
    r = gw.request("GET", "/x")
    assert r.code == 200 and r.json()["uri"] == "/x"
    assert first.asked == [200] and second.asked == [200]
    assert len(gw.released) == 1


def test_upstream_response_replaced_by_the_first_filter_that_answers(register):
    gw, first, second = _verdicts_gateway(register)
    first.verdict = pipeline.Answer(status=203, headers=[(b"X-From", b"filter")], body=b"mine")
    r = gw.request("GET", "/x")
    assert (r.code, r.header("X-From"), r.body) == (203, "filter", b"mine")
    assert second.asked == []  # the first filter decided
    assert len(gw.released) == 1


def test_upstream_response_filter_deciding_later(register):
    from twisted.internet.defer import Deferred

    gw, first, second = _verdicts_gateway(register)
    first.verdict = later = Deferred()
    results = []
    gw.client.request("GET", "http://gateway.test/x").addBoth(results.append)
    gw.pump()
    assert results == []  # waits for the filter
    later.callback(None)  # carry on
    gw.pump()
    assert results and results[0].code == 200
    assert second.asked == []  # a Deferred is the first filter's decision
    assert len(gw.released) == 1


def test_upstream_response_filter_answering_later(register):
    from twisted.internet.defer import succeed

    gw, first, _ = _verdicts_gateway(register)
    first.verdict = succeed(pipeline.Answer(status=203, headers=[], body=b"later"))
    r = gw.request("GET", "/x")
    assert (r.code, r.body) == (203, b"later")
    assert len(gw.released) == 1


@pytest.mark.parametrize("how", ["raises", "fails later"])
def test_upstream_response_filter_that_fails_gives_500(register, how):
    from twisted.internet.defer import fail

    gw, first, second = _verdicts_gateway(register)
    error = RuntimeError("broken filter")
    first.verdict = error if how == "raises" else fail(error)
    r = gw.request("GET", "/x")
    assert r.code == 500 and r.json()["error"] == "internal gateway error"
    assert gw.contexts[-1].error == "internal error"
    assert len(gw.released) == 1


@pytest.mark.parametrize("when", ["now", "later"])
def test_gateway_error_after_a_filter_answered_is_a_500(register, when):
    """
    An answer the gateway fails to write (a header name that is no token)
    is the gateway's own error, not the filter's: a 500 (not a hang), and
    the backend's slot, already given back, is not given back again.  The
    500 carries none of the fields set for the answer it replaces, but
    keeps the request's ID and Date.
    """
    from twisted.internet.defer import succeed

    gw, first, _ = _verdicts_gateway(register)
    answer = pipeline.Answer(
        status=203, headers=[(b"X-From", b"filter"), (b"Bad Name", b"x")], body=b"mine"
    )
    first.verdict = answer if when == "now" else succeed(answer)
    r = gw.request("GET", "/x", headers={"X-Request-Id": "err-500"})
    assert r.code == 500
    assert r.json() == {"error": "internal gateway error", "request_id": "err-500"}
    assert r.header("X-From") is None
    assert r.header("X-Request-Id") == "err-500" and r.header("Date")
    assert len(gw.released) == 1
