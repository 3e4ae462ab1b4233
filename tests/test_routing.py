"""Routing: path normalisation (RFC 3986) and route choice."""

import pytest

from gateway.config import parse_config
from gateway.routing import Router, host_of, normalise_path, remove_dot_segments, split_target


@pytest.mark.parametrize(
    "path, expected",
    [
        (b"/a/b/c/./../../g", b"/a/g"),  # RFC 3986 §5.2.4 example
        (b"/mid/content=5/../6", b"/mid/6"),
        (b"/api/users/../../admin", b"/admin"),
        (b"/../../etc", b"/etc"),
        (b"/a/.", b"/a/"),
        (b"/a/..", b"/"),
        (b"/plain/path", b"/plain/path"),
    ],
)
def test_remove_dot_segments(path, expected):
    assert remove_dot_segments(path) == expected


def test_normalise_path_decodes_unreserved_only():
    assert normalise_path(b"/%61pi/%7euser/%2e%2e/x") == b"/api/x"
    assert normalise_path(b"/a%2fb/%3f") == b"/a%2Fb/%3F"  # reserved stay escaped, upper-cased
    assert normalise_path(b"*") == b"/*"


def test_split_target():
    assert split_target(b"/a?b=1?c") == (b"/a", b"?b=1?c")
    assert split_target(b"/a") == (b"/a", b"")
    assert split_target(b"http://h:1/p?q") == (b"/p", b"?q")
    assert split_target(b"http://h") == (b"/", b"")


def test_host_of():
    assert host_of(b"API.Example.com:8080") == "api.example.com"
    assert host_of(b"[::1]:80") == "[::1]"
    assert host_of(None) == ""


CONFIG = """
services: {s: {backends: [{url: "http://h"}]}}
routes:
  - {name: root, service: s}
  - {name: api, service: s, match: {path_prefix: /api}}
  - {name: users, service: s, match: {path_prefix: /api/users}}
  - {name: users-post, service: s, match: {path_prefix: /api/users, methods: [POST]}}
  - {name: users-v2, service: s, match: {path_prefix: /api/users, headers: {X-Version: v2}}}
  - {name: exact-host, service: s, match: {path_prefix: /api, host: api.example.com}}
  - {name: wild-host, service: s, match: {path_prefix: /api, host: "*.example.com"}}
  - {name: first, service: s, match: {path_prefix: /dup}}
  - {name: second, service: s, match: {path_prefix: /dup}}
"""


@pytest.fixture
def router():
    return Router(parse_config(CONFIG).routes)


def name(router, path, method=b"GET", host="", headers=None):
    headers = headers or {}
    route = router.match(method, path, host, lambda n: headers.get(n))
    return route.name if route else None


def test_longest_prefix_wins(router):
    assert name(router, b"/api/users/7") == "users"
    assert name(router, b"/api/users") == "users"
    assert name(router, b"/api/orders") == "api"
    assert name(router, b"/other") == "root"


def test_prefix_matches_at_segment_boundary(router):
    assert name(router, b"/api/usersX") == "api"
    assert name(router, b"/apix") == "root"


def test_method_header_and_host_conditions(router):
    assert name(router, b"/api/users/1", method=b"POST") == "users-post"
    assert name(router, b"/api/users/1", headers={b"x-version": b"v2"}) == "users-v2"
    assert name(router, b"/api/users/1", headers={b"x-version": b"v3"}) == "users"
    assert name(router, b"/api/x", host="api.example.com") == "exact-host"
    assert name(router, b"/api/x", host="eu.api.example.com") == "wild-host"
    assert name(router, b"/api/x", host="example.com") == "api"  # the apex is not a subdomain


def test_equal_routes_keep_config_order(router):
    assert name(router, b"/dup/x") == "first"


def test_no_match():
    router = Router(parse_config(CONFIG.replace("  - {name: root, service: s}\n", "")).routes)
    assert name(router, b"/nothing") is None
