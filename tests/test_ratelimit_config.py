"""
Tests for the C{rate_limit} key (routes, services, top level) and the
top-level C{trusted_proxies}: defaults, which section applies to a route,
and every refusal with its file, line and reason.
"""

import ipaddress
import textwrap

import pytest

from gateway.config import ConfigError, parse_config
from gateway.filters.rate_limit import KeySpec, RateLimitConfig, effective_config
from gateway.ratelimit import SlidingWindow, TokenBucket
from gateway.redisconf import RedisConfig

BASE = """\
services:
  s: {backends: [{url: "http://127.0.0.1:9001"}]}
  t: {backends: [{url: "http://127.0.0.1:9002"}]}
"""

REDIS = 'redis: {url: "redis://127.0.0.1:6379/0", timeout: 20ms}\n'


def parse(text: str):
    return parse_config(textwrap.dedent(text), "gw.yaml")


def route_config(section: str, top: str = ""):
    """The config of one route C{r} (service C{s}) with C{rate_limit: section}."""
    return parse(top + BASE + f"routes:\n  - name: r\n    service: s\n    rate_limit: {section}\n")


def route_limit(section: str, top: str = "") -> RateLimitConfig:
    config = route_config(section, top)
    return effective_config(config.routes[0], config)


def refused(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value


def test_defaults():
    conf = route_limit("{rate: 10}")
    assert conf == RateLimitConfig(
        policy=TokenBucket(rate=10, burst=10),
        level="route",
        key=KeySpec("client_ip"),
        store="memory",
        redis_failure="local",
        redis=None,
    )


def test_burst_defaults_to_the_rate_rounded_up():
    assert route_limit("{rate: 0.5}").policy == TokenBucket(rate=0.5, burst=1)
    assert route_limit("{rate: 2.5}").policy == TokenBucket(rate=2.5, burst=3)


def test_token_bucket_and_sliding_window():
    assert route_limit("{rate: 10, burst: 20, name: per-ip}").policy == TokenBucket(
        rate=10, burst=20, name="per-ip"
    )
    assert route_limit("{algorithm: sliding_window, limit: 100, window: 1m}").policy == (
        SlidingWindow(limit=100, window=60)
    )


@pytest.mark.parametrize(
    "key, spec",
    [
        ("client_ip", KeySpec("client_ip")),
        ("consumer", KeySpec("consumer")),
        ("route", KeySpec("route")),
        ("global", KeySpec("global")),
        ("header:X-Client-Id", KeySpec("header", b"x-client-id")),
    ],
)
def test_keys(key, spec):
    assert route_limit(f"{{rate: 1, key: '{key}'}}").key == spec


def test_redis_store_takes_the_top_level_redis():
    conf = route_limit(
        "{rate: 1, store: redis, redis_failure: closed, redis_prefix: 'gw1:'}", top=REDIS
    )
    assert conf.store == "redis" and conf.redis_failure == "closed"
    assert conf.redis == RedisConfig(url="redis://127.0.0.1:6379/0", timeout=0.02)
    assert conf.redis_prefix == "gw1:"


def test_which_section_applies():
    """The route's, else its service's, else the top level's; false turns off."""
    config = parse(
        "rate_limit: {rate: 1, key: global}\n"
        + BASE.replace(
            "  t: {backends",
            "  t:\n    rate_limit: {rate: 2}\n    backends: [{url: 'http://127.0.0.1:9003'}]\n  u: {backends",
        )
        + """\
routes:
  - {name: own, service: s, rate_limit: {rate: 3}}
  - {name: top, service: s}
  - {name: of-service, service: t}
  - {name: own-over-service, service: t, rate_limit: {rate: 4}}
  - {name: disabled, service: s, rate_limit: false}
  - {name: disabled-over-service, service: t, rate_limit: false}
"""
    )
    found = {r.name: effective_config(r, config) for r in config.routes}
    assert found["own"].policy.rate == 3 and found["own"].level == "route"
    assert found["top"].policy.rate == 1 and found["top"].level == "top"
    assert found["of-service"].policy.rate == 2 and found["of-service"].level == "service"
    assert found["own-over-service"].policy.rate == 4
    assert found["disabled"] is None and found["disabled-over-service"] is None


def test_service_can_turn_the_top_level_off():
    config = parse(
        "rate_limit: {rate: 1}\n"
        + BASE.replace("  t: {backends", "  t:\n    rate_limit: false\n    backends: [{url: 'http://127.0.0.1:9003'}]\n  u: {backends")
        + "routes:\n  - {name: r, service: t}\n  - {name: q, service: s}\n"
    )
    assert effective_config(config.routes[0], config) is None
    assert effective_config(config.routes[1], config).policy.rate == 1


def test_no_rate_limit():
    config = parse(BASE + "routes:\n  - {name: r, service: s}\n")
    assert effective_config(config.routes[0], config) is None


def test_trusted_proxies():
    config = parse("trusted_proxies: [10.0.0.0/8, '2001:db8::/32', 192.0.2.7]\n" + BASE + "routes: []\n")
    assert config.options["trusted_proxies"] == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("192.0.2.7/32"),
    )
    assert parse(BASE + "routes: []\n").options["trusted_proxies"] == ()


@pytest.mark.parametrize(
    "section, line, reason",
    [
        ("{burst: 3}", 7, "missing required key 'rate'"),
        ("{rate: 0}", 7, "rate_limit.rate: must be a positive number"),
        ("{rate: -1}", 7, "must be a positive number"),
        ("{rate: fast}", 7, "rate_limit.rate: expected a number"),
        ("{rate: 1, burst: 0}", 7, "rate_limit.burst: must be at least 1"),
        ("{rate: 1, burst: 1.5}", 7, "expected an integer"),
        ("{rate: 1, limit: 10}", 7, "rate_limit.limit: only applies to algorithm: sliding_window"),
        ("{algorithm: sliding_window, limit: 10, window: 1s, rate: 1}", 7,
         "rate_limit.rate: only applies to algorithm: token_bucket"),
        ("{algorithm: sliding_window, window: 1s}", 7, "missing required key 'limit'"),
        ("{algorithm: sliding_window, limit: 10}", 7, "missing required key 'window'"),
        ("{algorithm: sliding_window, limit: 10, window: 0s}", 7, "must be longer than zero"),
        ("{algorithm: leaky_bucket, rate: 1}", 7, "expected one of token_bucket, sliding_window"),
        ("{rate: 1, key: ip}", 7, "rate_limit.key: expected one of client_ip, header:NAME"),
        ("{rate: 1, key: 'header:X Client'}", 7, "not a header name"),
        ("{rate: 1, key: 'header:'}", 7, "not a header name"),
        ("{rate: 1, store: disk}", 7, "rate_limit.store: expected one of memory, redis"),
        ("{rate: 1, redis_failure: open}", 7, "redis_failure: only applies with store: redis"),
        ("{rate: 1, redis_prefix: x}", 7, "redis_prefix: only applies with store: redis"),
        ("{rate: 1, name: 'caf\u00e9'}", 7, "rate_limit.name: name must be printable ASCII"),
        ("{rate: 1, per: second}", 7, "rate_limit.per: unknown key"),
        ("yes", 7, "expected a mapping"),
    ],
)
def test_refusals_name_file_and_line(section, line, reason):
    error = refused(BASE + f"routes:\n  - name: r\n    service: s\n    rate_limit: {section}\n")
    assert error.path == "gw.yaml" and error.line == line, str(error)
    assert reason in str(error), str(error)


def test_redis_store_needs_the_top_level_redis_section():
    error = refused(
        BASE
        + "routes:\n  - name: r\n    service: s\n    rate_limit:\n      rate: 1\n      store: redis\n"
    )
    assert error.line == 9
    assert "routes[0].rate_limit.store: store: redis needs a top-level redis" in str(error)


def test_redis_failure_must_be_known():
    error = refused(REDIS + BASE + "routes:\n  - name: r\n    service: s\n    rate_limit:\n"
                    "      rate: 1\n      store: redis\n      redis_failure: maybe\n")
    assert error.line == 11 and "expected one of open, closed, local" in str(error)


def test_refusals_at_service_and_top_level():
    error = refused(BASE.replace("  t: {backends", "  t:\n    rate_limit: {rate: 0}\n    backends: [{url: 'http://127.0.0.1:9003'}]\n  u: {backends") + "routes: []\n")
    assert error.line == 4 and "services.t.rate_limit.rate" in str(error)
    error = refused("rate_limit: {rate: 1, store: redis}\n" + BASE + "routes: []\n")
    assert error.line == 1 and error.reason.startswith("rate_limit.store:")


@pytest.mark.parametrize(
    "value, reason",
    [
        ("[10.0.0.1/8]", "has host bits set"),
        ("[proxy.example]", "not a CIDR network"),
        ("10.0.0.0/8", "expected a list"),
    ],
)
def test_bad_trusted_proxies(value, reason):
    error = refused(f"trusted_proxies: {value}\n" + BASE + "routes: []\n")
    assert error.line == 1 and reason in str(error), str(error)
