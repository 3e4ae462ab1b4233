"""IP allow/deny lists through the resource tree (the stub client is 127.0.0.1)."""

import pytest

from gateway.config import ConfigError, parse_config
from tests.stubgateway import BASE, StubGateway


def gateway(top: str = "", route: str = "") -> StubGateway:
    return StubGateway(
        BASE + top + "\nroutes:\n"
        f"  - {{name: r, service: svc, match: {{path_prefix: /r}} {route}}}\n"
        "  - {name: open, service: svc, match: {path_prefix: /open}, ip_rules: false}\n"
    )


@pytest.mark.parametrize(
    "rules, status",
    [
        ("{allow: [127.0.0.0/8]}", 200),
        ("{allow: [127.0.0.1]}", 200),
        ("{allow: [10.0.0.0/8, '2001:db8::/32']}", 403),
        ("{deny: [127.0.0.1/32]}", 403),
        ("{allow: [127.0.0.0/8], deny: [127.0.0.1]}", 403),  # deny wins
        ("{deny: [10.0.0.0/8]}", 200),
    ],
)
def test_route_rules(rules, status):
    gw = gateway(route=f", ip_rules: {rules}")
    r = gw.request("GET", "/r/x")
    assert r.code == status
    if status == 403:
        assert r.json() == {"error": "forbidden", "request_id": r.header("X-Request-Id")}
        assert gw.backend.requests == []
        assert gw.contexts[-1].error == "client address refused"


def test_top_level_default_and_route_opt_out():
    gw = gateway(top="ip_rules: {deny: [127.0.0.0/8]}")
    assert gw.request("GET", "/r/x").code == 403
    assert gw.request("GET", "/open/x").code == 200


@pytest.mark.parametrize(
    "trusted, forwarded, status",
    [
        # The stub client's peer is 127.0.0.1.
        ("", "203.0.113.5", 200),  # no trusted proxies: X-Forwarded-For is anybody's to forge
        ("trusted_proxies: [10.0.0.0/8]", "203.0.113.5", 200),  # the peer is not trusted
        ("trusted_proxies: [127.0.0.0/8]", "203.0.113.5", 403),  # the client behind our proxy
        ("trusted_proxies: [127.0.0.0/8]", "203.0.113.5, 10.1.2.3", 200),  # 10.1.2.3 is not ours
        ("trusted_proxies: [127.0.0.0/8, 10.0.0.0/8]", "203.0.113.5, 10.1.2.3", 403),
        ("trusted_proxies: [127.0.0.0/8]", None, 200),  # no header: the peer
        ("trusted_proxies: [127.0.0.0/8]", "not-an-address", 200),  # malformed: the peer
    ],
)
def test_client_behind_trusted_proxies(trusted, forwarded, status):
    gw = gateway(top=trusted, route=", ip_rules: {deny: [203.0.113.0/24]}")
    headers = {"X-Forwarded-For": forwarded} if forwarded is not None else None
    assert gw.request("GET", "/r/x", headers=headers).code == status


def test_allow_list_behind_trusted_proxies():
    gw = gateway(top="trusted_proxies: [127.0.0.1]", route=", ip_rules: {allow: [198.51.100.0/24]}")
    assert gw.request("GET", "/r/x", headers={"X-Forwarded-For": "198.51.100.7"}).code == 200
    assert gw.request("GET", "/r/x", headers={"X-Forwarded-For": "192.0.2.1"}).code == 403
    assert gw.request("GET", "/r/x").code == 403  # the proxy itself is not allowed


def test_route_rules_replace_the_default():
    gw = gateway(top="ip_rules: {deny: [127.0.0.0/8]}", route=", ip_rules: {allow: [127.0.0.0/8]}")
    assert gw.request("GET", "/r/x").code == 200


@pytest.mark.parametrize(
    "rules, line, reason",
    [
        ("{allow: [10.0.0.1/8]}", 10, "has host bits set"),
        ("{deny: [not-an-ip]}", 10, "not a CIDR network"),
        ("{allow: 10.0.0.0/8}", 10, "expected a list"),
        ("{block: []}", 10, "unknown key"),
    ],
)
def test_bad_rules_name_file_line(rules, line, reason):
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + f"routes:\n  - name: r\n    service: svc\n    ip_rules: {rules}\n", "gw.yaml")
    assert info.value.line == line and reason in str(info.value), str(info.value)
