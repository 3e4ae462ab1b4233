"""Path and header rewrites through the resource tree."""

import pytest

from gateway.config import ConfigError, parse_config
from tests.stubgateway import BASE, StubGateway

ROUTES = r"""
routes:
  - name: replace
    service: svc
    match: {path_prefix: /api/users}
    rewrite: {replace_prefix: /v2}
  - name: regex
    service: svc
    match: {path_prefix: /items}
    strip_prefix: true
    rewrite: {regex: ["^/(\\d+)$", "/item/\\1/detail"]}
  - name: both
    service: svc
    match: {path_prefix: /old}
    rewrite: {replace_prefix: /new/, regex: ["/(?P<id>\\d+)", "/id-\\g<id>"]}
  - name: root
    service: svc
    match: {path_prefix: /}
    rewrite: {replace_prefix: /base}
  - name: headers
    service: svc
    match: {path_prefix: /h}
    rewrite:
      request_headers:
        add: {X-Tag: gw}
        set: {X-Tenant: acme, Host: backend.example}
        remove: [Cookie]
      response_headers:
        add: {Cache-Control: no-transform}
        set: {X-Served-By: gateway}
        remove: [X-Powered-By, X-Frame-Options]
"""


@pytest.mark.parametrize(
    "path, uri",
    [
        ("/api/users/7?x=1", "/v2/7?x=1"),
        ("/api/users", "/v2"),
        ("/items/42", "/item/42/detail"),
        ("/items/abc", "/abc"),  # no match: the stripped path
        ("/old/12/x", "/new/id-12/x"),
        ("/anything", "/base/anything"),
    ],
)
def test_paths(path, uri):
    gw = StubGateway(BASE + ROUTES)
    assert gw.request("GET", path).json()["uri"] == uri


def test_request_and_response_headers():
    gw = StubGateway(BASE + ROUTES)
    gw.backend.response_headers = [(b"X-Powered-By", b"php"), (b"Cache-Control", b"max-age=5")]
    r = gw.request("GET", "/h/x", headers={"X-Tag": "client", "X-Tenant": "evil", "Cookie": "a=b"})
    assert r.upstream_header("X-Tag") == ["client", "gw"]
    assert r.upstream_header("X-Tenant") == ["acme"]
    assert r.upstream_header("Host") == ["backend.example"]
    assert r.upstream_header("Cookie") == []
    assert r.all("Cache-Control") == ["max-age=5", "no-transform"]
    assert r.header("X-Served-By") == "gateway"
    assert r.header("X-Powered-By") is None
    # Response rewrites come after the security headers: they win.
    assert r.header("X-Frame-Options") is None


@pytest.mark.parametrize(
    "rewrite, reason",
    [
        ("{replace_prefix: v2}", "starts with '/'"),
        ("{regex: ['(']}", "expected [pattern, replacement]"),
        ("{regex: ['(', 'x']}", "not a regular expression"),
        ("{regex: ['(a)', '\\2']}", "has no group 2"),
        ("{regex: ['(a)', '\\g<name>']}", "has no group 'name'"),
        ("{request_headers: {add: {'X A': b}}}", "not a header name"),
        ("{response_headers: {set: {X-A: \"a\\nb\"}}}", "visible ASCII"),
        ("{request_headers: {append: {}}}", "unknown key"),
    ],
)
def test_bad_config(rewrite, reason):
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + f"routes:\n  - name: r\n    service: svc\n    rewrite: {rewrite}\n", "gw.yaml")
    assert info.value.line == 10 and reason in str(info.value), str(info.value)
