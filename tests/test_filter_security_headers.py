"""Security response headers through the resource tree."""

import pytest

from gateway.config import ConfigError, parse_config
from tests.stubgateway import BASE, StubGateway

ROUTES = """
routes:
  - {name: r, service: svc, match: {path_prefix: /r}}
  - {name: own, service: svc, match: {path_prefix: /own}, security_headers: {headers: {X-Frame-Options: SAMEORIGIN, Referrer-Policy: null, Content-Security-Policy: "default-src 'none'"}, strip: [X-Powered-By]}}
  - {name: none, service: svc, match: {path_prefix: /none}, security_headers: false}
  - {name: win, service: svc, match: {path_prefix: /win}, security_headers: {replace_existing: true}}
"""


def test_defaults_on_backend_responses_and_gateway_answers():
    gw = StubGateway(BASE + ROUTES)
    for r in (gw.request("GET", "/r/x"), gw.request("GET", "/nowhere")):
        assert r.header("X-Content-Type-Options") == "nosniff"
        assert r.header("X-Frame-Options") == "DENY"
        assert r.header("Referrer-Policy") == "no-referrer"
        assert r.header("Strict-Transport-Security") is None  # not TLS


def test_hsts_only_over_tls(monkeypatch):
    from twisted.web.server import Request

    monkeypatch.setattr(Request, "isSecure", lambda self: True)
    gw = StubGateway(BASE + ROUTES)
    assert gw.request("GET", "/r/x").header("Strict-Transport-Security") == "max-age=31536000; includeSubDomains"


def test_route_overrides_removals_and_strip():
    gw = StubGateway(BASE + ROUTES)
    gw.backend.response_headers = [(b"X-Powered-By", b"php"), (b"X-Frame-Options", b"ALLOW-FROM x")]
    r = gw.request("GET", "/own/x")
    assert r.header("X-Powered-By") is None
    assert r.header("Referrer-Policy") is None
    assert r.header("Content-Security-Policy") == "default-src 'none'"
    # The backend's own value is kept unless replace_existing.
    assert r.all("X-Frame-Options") == ["ALLOW-FROM x"]
    assert gw.request("GET", "/win/x").all("X-Frame-Options") == ["DENY"]


def test_off_per_route_and_at_the_top():
    gw = StubGateway(BASE + ROUTES)
    assert gw.request("GET", "/none/x").header("X-Frame-Options") is None
    gw = StubGateway(BASE + "security_headers: false\n" + ROUTES)
    assert gw.request("GET", "/r/x").header("X-Frame-Options") is None
    assert gw.request("GET", "/nowhere").header("X-Frame-Options") is None
    assert gw.request("GET", "/own/x").header("X-Frame-Options") == "SAMEORIGIN"


@pytest.mark.parametrize(
    "value, reason",
    [
        ("{headers: {'Bad Name': x}}", "not a header name"),
        ("{headers: {X-A: \"a\\nb\"}}", "forbidden character"),
        ("{strip: ['a b']}", "not a header name"),
        ("{replace: true}", "unknown key"),
    ],
)
def test_bad_config(value, reason):
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + f"security_headers: {value}\nroutes: []\n", "gw.yaml")
    assert info.value.line == 7 and reason in str(info.value), str(info.value)
