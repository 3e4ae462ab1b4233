"""
The filters together: their documented order, and a filter that raises.
"""

import importlib

import pytest
from twisted.logger import globalLogPublisher

from gateway.config import FEATURE_MODULES
from gateway.pipeline import FILTERS
from tests import raising_filter
from tests.stubgateway import BASE, StubGateway


def test_documented_order():
    for module in FEATURE_MODULES:
        importlib.import_module(module)
    order = [spec.name for spec in sorted(FILTERS.values())]
    mine = ["security_headers", "ip_rules", "cors", "auth", "rewrite"]
    assert [name for name in order if name in mine] == mine
    assert {n: FILTERS[n].order for n in mine} == {
        "security_headers": 15, "ip_rules": 20, "cors": 30, "auth": 40, "rewrite": 55,
    }
    # the whole documented pipeline
    assert [n for n in order if n in ("observe", "auth", "rate_limit", "rewrite", "cache")] == [
        "observe", "auth", "rate_limit", "rewrite", "cache"
    ]


def test_ip_rules_come_before_cors_and_auth():
    gw = StubGateway(
        BASE
        + "consumers: [{name: c, api_keys: [k]}]\n"
        + "routes:\n  - {name: r, service: svc, ip_rules: {deny: [127.0.0.1]}, "
        + "cors: {allowed_origins: ['*']}, auth: {methods: [api_key]}}\n"
    )
    preflight = {"Origin": "https://a.test", "Access-Control-Request-Method": "GET"}
    assert gw.request("OPTIONS", "/x", headers=preflight).code == 403
    assert gw.request("GET", "/x").code == 403  # not 401


@pytest.fixture
def raising():
    raising_filter.register()
    yield
    raising_filter.unregister()


@pytest.fixture
def events():
    seen = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


@pytest.mark.parametrize("mode", ["request", "deferred"])
def test_a_raising_filter_gives_500_with_the_request_id_and_is_logged(raising, events, mode):
    gw = StubGateway(BASE + "routes: [{name: r, service: svc}]\n")
    r = gw.request("GET", "/x", headers={"X-Test-Raise": mode, "X-Request-Id": "trace-me-1"})
    assert r.code == 500
    assert r.json() == {"error": "internal gateway error", "request_id": "trace-me-1"}
    assert r.header("X-Request-Id") == "trace-me-1"
    assert r.header("X-Frame-Options") == "DENY"  # response filters still ran
    assert gw.backend.requests == []
    (failure_event,) = [e for e in events if e.get("log_failure") is not None]
    assert failure_event["request_id"] == "trace-me-1"
    assert failure_event["log_failure"].check(RuntimeError)
    assert "Traceback" in failure_event["log_failure"].getTraceback()
    # The gateway keeps serving.
    assert gw.request("GET", "/x").code == 200


def test_a_raising_response_filter_is_logged_and_the_response_goes_out(raising, events):
    gw = StubGateway(BASE + "routes: [{name: r, service: svc}]\n")
    r = gw.request("GET", "/x", headers={"X-Test-Raise": "response"})
    assert r.code == 200
    (failure_event,) = [e for e in events if e.get("log_failure") is not None]
    assert failure_event["request_id"] == r.header("X-Request-Id")


def test_an_unrouted_request_runs_on_unrouted_and_is_still_a_404(raising, events):
    gw = StubGateway(
        BASE
        + "routes: [{name: r, service: svc, match: {path_prefix: /api}}]\n"
        + "observability: {access_log: {headers: [User-Agent]}}\n"
    )
    r = gw.request("GET", "/elsewhere", headers={"X-Test-Raise": "unrouted", "User-Agent": "scanner/1"})
    assert r.code == 404 and gw.backend.requests == []
    (failure_event,) = [e for e in events if e.get("log_failure") is not None]
    assert failure_event["request_id"] == r.header("X-Request-Id")
    # The observe filter's on_unrouted ran although another filter's raised.
    (access,) = [e for e in events if e.get("log_namespace") == "gateway.access"]
    assert access["status"] == 404 and access["request_headers"] == {"user-agent": "scanner/1"}


def test_every_event_of_a_refused_request_carries_its_id(events):
    gw = StubGateway(
        BASE + "consumers: [{name: c, api_keys: [k]}]\n"
        + "routes: [{name: r, service: svc, auth: {methods: [api_key]}}]\n"
    )
    r = gw.request("GET", "/x", headers={"X-Request-Id": "refused-1"})
    assert r.code == 401
    mine = [e for e in events if e.get("log_namespace", "").startswith("gateway.")]
    assert mine and all(e.get("request_id") == "refused-1" for e in mine)
