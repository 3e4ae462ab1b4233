"""Config validation: every error names the file, the line and the reason."""

import os
import textwrap

import pytest

from gateway.config import Backend, ConfigError, load_config, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GOOD = """\
listen: tcp:8080
admin:
  listen: tcp:9901:interface=127.0.0.1
services:
  users:
    balancer: round_robin
    backends:
      - url: http://127.0.0.1:9001
      - url: http://127.0.0.1:9002/base/
        weight: 2
    timeouts: {connect: 250ms, response: 1m}
    max_connections_per_backend: 16
routes:
  - name: users-api
    match:
      path_prefix: /api/users/
      host: "*.Example.com"
      methods: [get, POST]
      headers: {X-Version: v2}
    service: users
    strip_prefix: true
    preserve_host: true
limits: {max_request_body: 1MiB}
"""


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), "gw.yaml")
    return info.value


def test_good_config_becomes_frozen_objects():
    config = parse_config(GOOD, "gw.yaml")
    service = config.services["users"]
    assert [b.url for b in service.backends] == ["http://127.0.0.1:9001", "http://127.0.0.1:9002/base"]
    assert service.backends[1].weight == 2
    assert service.backends[1].base_path == b"/base"
    assert service.timeouts.connect == 0.25 and service.timeouts.response == 60.0
    route = config.routes[0]
    assert route.match.path_prefix == "/api/users"
    assert route.match.host == "*.example.com"
    assert route.match.methods == frozenset({"GET", "POST"})
    assert route.match.headers == ((b"x-version", b"v2"),)
    assert route.strip_prefix and route.preserve_host
    assert config.limits.max_request_body == 1024 * 1024
    with pytest.raises(AttributeError):
        route.name = "other"
    with pytest.raises(TypeError):
        config.services["x"] = service


def test_defaults():
    config = parse_config("services: {s: {backends: [{url: 'http://h'}]}}\nroutes: [{name: r, service: s}]\n")
    assert config.listen == "tcp:8080"
    assert config.admin.listen == "tcp:9901:interface=127.0.0.1"
    assert config.limits.max_request_body == 10 * 1024 * 1024
    assert config.routes[0].match.path_prefix == "/"
    assert config.services["s"].backends[0].port == 80
    assert config.services["s"].timeouts.connect == 2.0


def test_route_naming_a_missing_service():
    e = error(GOOD.replace("    service: users", "    service: userz"))
    assert str(e) == "gw.yaml:20: routes[0].service: no service named 'userz'"


def test_unknown_key_is_an_error_not_ignored():
    e = error(GOOD.replace("    strip_prefix: true", "    strip_prefx: true"))
    assert (e.line, e.reason) == (21, "routes[0].strip_prefx: unknown key")
    e = error(GOOD + "listne: tcp:1\n")
    assert e.reason == "listne: unknown key" and e.line == 24


def test_bad_url():
    e = error(GOOD.replace("http://127.0.0.1:9001", "ftp://127.0.0.1:9001"))
    assert e.line == 8
    assert e.reason.startswith("services.users.backends[0].url: bad URL 'ftp://127.0.0.1:9001'")
    e = error(GOOD.replace("http://127.0.0.1:9001", "http://127.0.0.1:99999"))
    assert "bad port" in e.reason


def test_duplicate_route_name():
    text = GOOD.replace("limits:", "  - name: users-api\n    service: users\nlimits:")
    e = error(text)
    assert e.reason == "routes[1].name: duplicate route name 'users-api'"
    assert e.line == 23


def test_duplicate_yaml_key():
    e = error("listen: tcp:1\nlisten: tcp:2\n")
    assert (e.line, e.reason) == (2, "duplicate key 'listen'")


def test_bad_types_and_values():
    assert "expected a duration" in error(GOOD.replace("250ms", "fast")).reason
    assert error(GOOD.replace("weight: 2", "weight: 0")).reason == (
        "services.users.backends[1].weight: must be at least 1, got 0"
    )
    assert "expected one of round_robin" in error(GOOD.replace("balancer: round_robin", "balancer: best")).reason
    assert error(GOOD.replace("strip_prefix: true", "strip_prefix: yes please")).reason == (
        "routes[0].strip_prefix: expected true or false, got a string"
    )
    assert "must start with '/'" in error(GOOD.replace("path_prefix: /api/users/", "path_prefix: api")).reason
    assert "not an HTTP method" in error(GOOD.replace("[get, POST]", "[GET, 'P O']")).reason
    assert "expected a size" in error(GOOD.replace("1MiB", "lots")).reason
    assert "endpoint string" in error(GOOD.replace("listen: tcp:8080", "listen: tpc:8080")).reason
    assert parse_config(GOOD.replace("listen: tcp:8080", "listen: 8081")).listen == "tcp:8081"
    assert "at least one backend" in error(GOOD.replace(
        "    backends:\n      - url: http://127.0.0.1:9001\n      - url: http://127.0.0.1:9002/base/\n        weight: 2\n",
        "    backends: []\n")).reason
    assert "listed twice" in error(GOOD.replace("9002/base/", "9001")).reason


def test_invalid_yaml_reports_its_line():
    e = error("services:\n  a: [1, 2\nroutes: []\n")
    assert e.line == 3 and e.reason.startswith("invalid YAML")


def test_empty_and_unreadable_files(tmp_path):
    assert error("").reason == "the file is empty"
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "missing.yaml"))
    assert "cannot read the file" in info.value.reason
    assert str(info.value).startswith(str(tmp_path / "missing.yaml") + ":0:")


@pytest.mark.parametrize("name", ["gateway.yaml", "demo.yaml"])
def test_shipped_configs_are_valid(name):
    load_config(os.path.join(ROOT, "etc", name))


def test_backend_urls():
    b = Backend.from_url("https://[::1]:8443/x/")
    assert (b.scheme, b.host, b.port, b.base_path, b.host_header) == (b"https", b"::1", 8443, b"/x", b"[::1]:8443")
    assert Backend.from_url("http://example.com:80").host_header == b"example.com"
    for bad in ("http://", "http://h/?q=1", "http://u:p@h/", "h:80"):
        with pytest.raises(ValueError):
            Backend.from_url(bad)
