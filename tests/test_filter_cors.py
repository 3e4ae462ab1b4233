"""CORS through the resource tree: preflights answered, response headers replaced."""

import pytest

from gateway.config import ConfigError, parse_config
from tests.stubgateway import BASE, StubGateway

ROUTES = """
cors:
  allowed_origins: ["https://app.test", "https://*.example.test"]
  allowed_methods: [GET, POST, PUT]
  allowed_headers: [Content-Type, Authorization]
  exposed_headers: [X-Request-Id]
  allow_credentials: true
  max_age: 10m
routes:
  - {name: r, service: svc, match: {path_prefix: /r}}
  - {name: put-only, service: svc, match: {path_prefix: /p, methods: [PUT]}}
  - {name: plain, service: svc, match: {path_prefix: /plain, methods: [GET]}, cors: false}
  - {name: star, service: svc, match: {path_prefix: /star}, cors: {allowed_origins: ["*"]}}
  - {name: auth, service: svc, match: {path_prefix: /auth}, auth: {methods: [api_key]}}
consumers:
  - {name: c, api_keys: [dev-key]}
"""


def preflight(origin="https://app.test", method="PUT", headers=None):
    h = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        h["Access-Control-Request-Headers"] = headers
    return h


def test_allowed_preflight_answered_by_the_gateway():
    gw = StubGateway(BASE + ROUTES)
    r = gw.request("OPTIONS", "/r/x", headers=preflight(headers="content-type, authorization"))
    assert r.code == 204 and r.body == b""
    assert r.header("Access-Control-Allow-Origin") == "https://app.test"
    assert r.header("Access-Control-Allow-Credentials") == "true"
    assert r.header("Access-Control-Allow-Methods") == "GET, POST, PUT"
    assert r.header("Access-Control-Allow-Headers") == "content-type, authorization"
    assert r.header("Access-Control-Max-Age") == "600"
    assert r.header("X-Request-Id")
    assert gw.backend.requests == []


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(origin="https://evil.test"), "origin not allowed"),
        (dict(origin="https://example.test"), "origin not allowed"),  # not a subdomain
        (dict(method="DELETE"), "method DELETE not allowed"),
        (dict(headers="x-secret"), "header x-secret not allowed"),
    ],
)
def test_refused_preflight_is_403_without_grant(kwargs, reason):
    gw = StubGateway(BASE + ROUTES)
    r = gw.request("OPTIONS", "/r/x", headers=preflight(**kwargs))
    assert r.code == 403
    assert r.json() == {"error": f"CORS preflight refused: {reason}", "request_id": r.header("X-Request-Id")}
    assert r.header("Access-Control-Allow-Origin") is None
    assert gw.backend.requests == []


def test_wildcard_subdomain_origin():
    gw = StubGateway(BASE + ROUTES)
    r = gw.request("OPTIONS", "/r/x", headers=preflight(origin="https://a.b.example.test"))
    assert r.code == 204 and r.header("Access-Control-Allow-Origin") == "https://a.b.example.test"


def test_preflight_reaches_a_route_that_takes_only_the_asked_method():
    gw = StubGateway(BASE + ROUTES)
    assert gw.request("OPTIONS", "/p/x", headers=preflight(method="PUT")).code == 204
    # ... but not one without a CORS policy: the same 404 as without CORS.
    assert gw.request("OPTIONS", "/plain/x", headers=preflight(method="GET")).code == 404
    assert gw.request("OPTIONS", "/plain/x").code == 404  # plain OPTIONS
    assert gw.backend.requests == []


def test_preflight_comes_before_auth():
    gw = StubGateway(BASE + ROUTES)
    assert gw.request("OPTIONS", "/auth/x", headers=preflight()).code == 204
    r = gw.request("GET", "/auth/x", headers={"Origin": "https://app.test"})
    assert r.code == 401
    # The browser may read the 401: it carries the grant.
    assert r.header("Access-Control-Allow-Origin") == "https://app.test"


def test_actual_request_gets_the_grant_and_backend_cors_headers_are_replaced():
    gw = StubGateway(BASE + ROUTES)
    gw.backend.response_headers = [
        (b"Access-Control-Allow-Origin", b"*"),
        (b"Access-Control-Allow-Methods", b"DELETE"),
        (b"Vary", b"Accept-Encoding"),
    ]
    r = gw.request("GET", "/r/x", headers={"Origin": "https://app.test"})
    assert r.code == 200
    assert r.all("Access-Control-Allow-Origin") == ["https://app.test"]
    assert r.header("Access-Control-Allow-Methods") is None
    assert r.header("Access-Control-Expose-Headers") == "X-Request-Id"
    assert r.all("Vary") == ["Accept-Encoding", "Origin"]
    r = gw.request("GET", "/r/x", headers={"Origin": "https://evil.test"})
    assert r.header("Access-Control-Allow-Origin") is None
    assert "Origin" in r.all("Vary")


def test_star_without_credentials_and_routes_without_cors():
    gw = StubGateway(BASE + ROUTES)
    r = gw.request("GET", "/star/x", headers={"Origin": "https://any.test"})
    assert r.header("Access-Control-Allow-Origin") == "*"
    gw.backend.response_headers = [(b"Access-Control-Allow-Origin", b"https://backend-says.test")]
    r = gw.request("GET", "/plain/x", headers={"Origin": "https://any.test"})
    assert r.header("Access-Control-Allow-Origin") == "https://backend-says.test"  # not ours to judge


@pytest.mark.parametrize(
    "value, line, reason",
    [
        ("{allowed_methods: [GET]}", 7, "missing required key 'allowed_origins'"),
        ("{allowed_origins: [app.test]}", 7, "is not *, null, scheme://host"),
        ("{allowed_origins: ['*'], allowed_headers: ['a b']}", 7, "not a header name"),
        ("{allowed_origins: ['*'], exposed_headers: ['*'], allow_credentials: true}", 7, "cannot be used with credentials"),
        ("{allowed_origins: ['*'], max_age: forever}", 7, "expected a duration"),
    ],
)
def test_bad_config(value, line, reason):
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + f"cors: {value}\nroutes: []\n", "gw.yaml")
    assert info.value.line == line and reason in str(info.value), str(info.value)
