"""
Tests for L{gateway.secheaders}.
"""

import pytest
from twisted.web.http_headers import Headers

from gateway.secheaders import DEFAULT_SECURITY_HEADERS, SecurityHeaders

HSTS = b"strict-transport-security"


def applied(policy, **backend):
    headers = Headers()
    for name, value in backend.items():
        headers.addRawHeader(name.replace("_", "-").encode(), value)
    policy.apply(headers)
    return {name.lower(): values for name, values in headers.getAllRawHeaders()}


def test_defaults_over_tls():
    assert applied(SecurityHeaders(tls=True)) == {
        b"x-content-type-options": [b"nosniff"],
        b"x-frame-options": [b"DENY"],
        b"referrer-policy": [b"no-referrer"],
        HSTS: [b"max-age=31536000; includeSubDomains"],
    }


def test_no_hsts_without_tls():
    result = applied(SecurityHeaders(tls=False))
    assert HSTS not in result
    assert result[b"x-frame-options"] == [b"DENY"]
    # Not even when configured explicitly.
    plain = SecurityHeaders(tls=False, overrides={"Strict-Transport-Security": "max-age=60"})
    assert HSTS not in applied(plain)


def test_overrides_additions_and_removals():
    policy = SecurityHeaders(
        tls=True,
        overrides={
            "x-frame-options": "SAMEORIGIN",
            "Referrer-Policy": None,
            "Content-Security-Policy": "default-src 'none'",
            "strict-transport-security": "max-age=63072000; includeSubDomains; preload",
        },
    )
    result = applied(policy)
    assert result[b"x-frame-options"] == [b"SAMEORIGIN"]
    assert b"referrer-policy" not in result
    assert result[b"content-security-policy"] == [b"default-src 'none'"]
    assert result[b"strict-transport-security"] == [
        b"max-age=63072000; includeSubDomains; preload"
    ]
    assert len(policy.headers) == 4


def test_backend_values_kept_unless_replacing():
    kept = applied(SecurityHeaders(tls=True), X_Frame_Options=b"SAMEORIGIN")
    assert kept[b"x-frame-options"] == [b"SAMEORIGIN"]
    assert kept[b"x-content-type-options"] == [b"nosniff"]
    replaced = applied(SecurityHeaders(tls=True, replace_existing=True),
                       X_Frame_Options=b"SAMEORIGIN")
    assert replaced[b"x-frame-options"] == [b"DENY"]


def test_strip_backend_headers():
    policy = SecurityHeaders(tls=False, strip=["Server", "X-Powered-By"])
    result = applied(policy, Server=b"nginx", X_Powered_By=b"PHP/5", Content_Type=b"text/plain")
    assert b"server" not in result and b"x-powered-by" not in result
    assert result[b"content-type"] == [b"text/plain"]


def test_invalid_configuration():
    for overrides in [{"X-Bad": "a\r\nSet-Cookie: x=1"}, {"X-Bad": "a\x00"}, {"Bad Name": "v"}]:
        with pytest.raises(ValueError):
            SecurityHeaders(tls=True, overrides=overrides)
    with pytest.raises(ValueError):
        SecurityHeaders(tls=True, strip=["Bad:Name"])


def test_default_set_is_the_documented_one():
    assert dict(DEFAULT_SECURITY_HEADERS) == {
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
    }
