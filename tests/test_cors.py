"""
Tests for L{gateway.cors}: origin matching, preflights and the headers of
ordinary cross-origin responses.
"""

import pytest
from twisted.web.http_headers import Headers

from gateway.cors import CORS_RESPONSE_HEADERS, CorsPolicy, is_preflight


def request(origin=None, method=None, headers=None, **more):
    h = Headers()
    if origin is not None:
        h.addRawHeader(b"Origin", origin)
    if method is not None:
        h.addRawHeader(b"Access-Control-Request-Method", method)
    if headers is not None:
        h.addRawHeader(b"Access-Control-Request-Headers", headers)
    for name, value in more.items():
        h.addRawHeader(name.replace("_", "-").encode(), value)
    return h


def as_dict(pairs):
    result = {}
    for name, value in pairs:
        assert name not in result, "duplicate %r" % (name,)
        result[name] = value
    return result


POLICY = CorsPolicy(
    allowed_origins=["https://app.example.com", "https://*.example.org", "http://localhost:3000"],
    allowed_methods=["GET", "POST", "delete"],
    allowed_headers=["Content-Type", "X-Request-ID"],
    exposed_headers=["X-Request-ID", "X-RateLimit-Remaining"],
    max_age=600,
)


def test_is_preflight():
    assert is_preflight(b"OPTIONS", request(b"https://a.com", b"PUT"))
    assert not is_preflight(b"OPTIONS", request(b"https://a.com"))
    assert not is_preflight(b"OPTIONS", request(method=b"PUT"))
    assert not is_preflight(b"GET", request(b"https://a.com", b"PUT"))


@pytest.mark.parametrize("origin,allowed", [
    (b"https://app.example.com", True),
    (b"HTTPS://APP.EXAMPLE.COM", True),
    (b"http://app.example.com", False),
    (b"https://app.example.com:8443", False),
    (b"https://app.example.com.evil.com", False),
    (b"https://evilapp.example.com", False),
    (b"https://a.example.org", True),
    (b"https://a.b.example.org", True),
    (b"https://example.org", False),
    (b"https://.example.org", False),
    (b"https://evil.com/.example.org", False),
    (b"https://evil.com?.example.org", False),
    (b"https://a.example.org:444", False),
    (b"http://a.example.org", False),
    (b"https://aexample.org", False),
    (b"http://localhost:3000", True),
    (b"http://localhost:3001", False),
    (b"null", False),
    (b"", False),
])
def test_origin_matching(origin, allowed):
    assert POLICY.origin_allowed(origin) is allowed


def test_wildcard_origin_with_port():
    p = CorsPolicy(["https://*.example.com:8443"])
    assert p.origin_allowed(b"https://a.example.com:8443")
    assert not p.origin_allowed(b"https://a.example.com")


def test_star_origin_and_null():
    anyone = CorsPolicy(["*"])
    assert anyone.origin_allowed(b"https://x.test") and anyone.origin_allowed(b"null")
    with_credentials = CorsPolicy(["*"], allow_credentials=True)
    assert with_credentials.origin_allowed(b"https://x.test")
    assert not with_credentials.origin_allowed(b"null")
    assert CorsPolicy(["null"], allow_credentials=True).origin_allowed(b"null")


def test_preflight_allowed():
    result = POLICY.preflight(request(b"https://a.example.org", b"DELETE",
                                      b"content-type, X-Request-ID"))
    assert result.allowed and result.status == 204 and result.reason == ""
    assert as_dict(result.headers) == {
        b"Access-Control-Allow-Origin": b"https://a.example.org",
        b"Access-Control-Allow-Methods": b"GET, POST, DELETE",
        b"Access-Control-Allow-Headers": b"content-type, x-request-id",
        b"Access-Control-Max-Age": b"600",
        b"Vary": b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
    }


@pytest.mark.parametrize("headers,reason", [
    (request(b"https://evil.com", b"GET"), "origin not allowed"),
    (request(None, b"GET"), "origin not allowed"),
    (request(b"https://app.example.com", b"PUT"), "method PUT not allowed"),
    (request(b"https://app.example.com", b"GET", b"content-type, x-admin"),
     "header x-admin not allowed"),
    (request(b"https://app.example.com", b"GET", b"Authorization"),
     "header authorization not allowed"),
    (request(b"https://app.example.com"), "no single requested method"),
])
def test_preflight_refused_without_cors_headers(headers, reason):
    result = POLICY.preflight(headers)
    assert not result.allowed and result.status == 403
    assert result.reason == reason
    assert [name for name, _ in result.headers] == [b"Vary"]


def test_preflight_with_two_origins_refused():
    h = request(b"https://app.example.com", b"GET")
    h.addRawHeader(b"Origin", b"https://app.example.com")
    assert not POLICY.preflight(h).allowed


def test_preflight_normalizes_standard_methods():
    assert POLICY.preflight(request(b"https://app.example.com", b"post")).allowed
    custom = CorsPolicy(["*"], allowed_methods=["PURGE"])
    assert custom.preflight(request(b"https://x.test", b"PURGE")).allowed
    assert not custom.preflight(request(b"https://x.test", b"purge")).allowed


def test_preflight_with_credentials_never_says_star():
    p = CorsPolicy(["*"], allowed_methods=["*"], allowed_headers=["*"],
                   allow_credentials=True)
    result = p.preflight(request(b"https://x.test", b"PATCH", b"x-one,x-two"))
    headers = as_dict(result.headers)
    assert headers[b"Access-Control-Allow-Origin"] == b"https://x.test"
    assert headers[b"Access-Control-Allow-Credentials"] == b"true"
    assert headers[b"Access-Control-Allow-Methods"] == b"PATCH"
    assert headers[b"Access-Control-Allow-Headers"] == b"x-one, x-two"
    assert b"Access-Control-Max-Age" not in headers


def test_star_headers_do_not_cover_authorization():
    p = CorsPolicy(["*"], allowed_headers=["*"])
    assert p.preflight(request(b"https://x.test", b"GET", b"x-anything")).allowed
    assert not p.preflight(request(b"https://x.test", b"GET", b"authorization")).allowed
    p = CorsPolicy(["*"], allowed_headers=["*", "Authorization"])
    assert p.preflight(request(b"https://x.test", b"GET", b"authorization")).allowed


def test_star_origin_without_credentials_is_constant():
    p = CorsPolicy(["*"], exposed_headers=["X-Request-ID"])
    expected = {b"Access-Control-Allow-Origin": b"*",
                b"Access-Control-Expose-Headers": b"X-Request-ID"}
    assert as_dict(p.response_headers(request(b"https://x.test"))) == expected
    assert as_dict(p.response_headers(request())) == expected
    preflight = as_dict(p.preflight(request(b"https://x.test", b"GET")).headers)
    assert preflight[b"Access-Control-Allow-Origin"] == b"*"


def test_actual_response_allowed_origin_echoed_with_vary():
    p = CorsPolicy(["https://app.example.com"], exposed_headers=["X-Request-ID"],
                   allow_credentials=True)
    assert as_dict(p.response_headers(request(b"https://app.example.com"))) == {
        b"Access-Control-Allow-Origin": b"https://app.example.com",
        b"Access-Control-Allow-Credentials": b"true",
        b"Access-Control-Expose-Headers": b"X-Request-ID",
        b"Vary": b"Origin",
    }


def test_actual_response_refused_or_no_origin_only_varies():
    assert POLICY.response_headers(request(b"https://evil.com")) == ((b"Vary", b"Origin"),)
    assert POLICY.response_headers(request()) == ((b"Vary", b"Origin"),)


def test_configuration_errors():
    for bad in [
        dict(allowed_origins=[]),
        dict(allowed_origins=["https://app.example.com/path"]),
        dict(allowed_origins=["app.example.com"]),
        dict(allowed_origins=["https://*example.com"]),
        dict(allowed_origins=["https://a.*.example.com"]),
        dict(allowed_origins=["*"], allowed_methods=["GE T"]),
        dict(allowed_origins=["*"], allowed_headers=["X Bad"]),
        dict(allowed_origins=["*"], max_age=-1),
        dict(allowed_origins=["*"], exposed_headers=["*"], allow_credentials=True),
    ]:
        with pytest.raises(ValueError):
            CorsPolicy(**bad)
    # Trailing slash and case are normalized.
    assert CorsPolicy(["HTTPS://App.Example.com/"]).origin_allowed(b"https://app.example.com")


def test_cors_response_headers_listed():
    names = {name for name, _ in POLICY.preflight(
        request(b"https://app.example.com", b"GET", b"content-type")).headers}
    assert names - {b"Vary"} <= set(CORS_RESPONSE_HEADERS)
