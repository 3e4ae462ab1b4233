"""
Tests for the C{cache} route key (L{gateway.cachefilter.parse_cache}):
defaults, inheritance from the top level, and every refusal with its file,
line and reason.
"""

import textwrap

import pytest

from gateway.cache import CachePolicy
from gateway.cachefilter import CacheConfig, route_cache
from gateway.config import ConfigError, parse_config
from gateway.redisconf import RedisConfig


def parse(text: str):
    return parse_config(textwrap.dedent(text), "gw.yaml")


BASE = """\
services:
  s: {backends: [{url: "http://127.0.0.1:9001"}]}
"""


def routes(cache_yaml: str, top: str = "") -> str:
    return (
        top
        + BASE
        + "routes:\n"
        + "  - name: r\n"
        + "    service: s\n"
        + textwrap.indent(cache_yaml, "    ")
    )


def refused(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value


def test_no_cache_key_means_not_cached():
    config = parse(BASE + "routes: [{name: r, service: s}]\n")
    assert config.routes[0].options["cache"] is None
    assert route_cache(config.routes[0]) is None
    assert config.options["redis"] is None


def test_defaults():
    config = parse(routes("cache: {}\n"))
    conf = route_cache(config.routes[0])
    assert conf == CacheConfig(
        enabled=True,
        policy=CachePolicy(default_ttl=0.0, max_object_size=1024 * 1024, allow_set_cookie=False),
        store="memory",
        memory_limit=256 * 1024 * 1024,
    )


def test_all_keys():
    config = parse(
        routes(
            textwrap.dedent(
                """\
                cache:
                  enabled: true
                  default_ttl: 90s
                  max_object_size: 2MiB
                  store: redis
                  memory_limit: 10MiB
                  allow_set_cookie: true
                  redis_prefix: "gw1:"
                """
            ),
            top='redis: {url: "redis://127.0.0.1:6379/2", timeout: 20ms}\n',
        )
    )
    conf = route_cache(config.routes[0])
    assert conf.policy == CachePolicy(
        default_ttl=90.0, max_object_size=2 * 1024 * 1024, allow_set_cookie=True
    )
    assert conf.store == "redis" and conf.memory_limit == 10 * 1024 * 1024
    assert conf.redis == RedisConfig(url="redis://127.0.0.1:6379/2", timeout=0.02)
    assert conf.redis_prefix == b"gw1:"


def test_disabled_route_is_not_cached():
    config = parse(routes("cache: {enabled: false}\n"))
    assert route_cache(config.routes[0]) is None


def test_top_level_cache_is_the_routes_default():
    config = parse(
        "cache: {default_ttl: 5s}\n"
        + BASE
        + "routes:\n  - {name: a, service: s}\n  - {name: b, service: s, cache: {enabled: false}}\n"
    )
    a, b = config.routes
    assert route_cache(a).policy.default_ttl == 5.0
    assert route_cache(b) is None


def test_unknown_key_refused_with_its_line():
    error = refused(routes("cache:\n  enabled: true\n  ttl: 5s\n"))
    assert (error.path, error.line) == ("gw.yaml", 8)
    assert error.reason == "routes[0].cache.ttl: unknown key"


@pytest.mark.parametrize(
    "cache_yaml, line, reason",
    [
        ("cache: {store: disk}\n", 6, "routes[0].cache.store: expected one of memory, redis, got 'disk'"),
        ("cache: {default_ttl: soon}\n", 6, "routes[0].cache.default_ttl: expected a duration"),
        ("cache: {default_ttl: -1}\n", 6, "routes[0].cache.default_ttl: a duration cannot be negative"),
        ("cache: {max_object_size: 0}\n", 6, "routes[0].cache.max_object_size: must be between"),
        ("cache: {max_object_size: 1GiB}\n", 6, "routes[0].cache.max_object_size: must be between"),
        ("cache: {max_object_size: big}\n", 6, "routes[0].cache.max_object_size: expected a size"),
        ("cache: {memory_limit: 0}\n", 6, "routes[0].cache.memory_limit: must be larger than zero"),
        ("cache: {enabled: yes please}\n", 6, "routes[0].cache.enabled: expected true or false"),
        ("cache: {allow_set_cookie: 1}\n", 6, "routes[0].cache.allow_set_cookie: expected true or false"),
        ("cache: {redis_prefix: ''}\n", 6, "routes[0].cache.redis_prefix: expected a non-empty string"),
        ("cache: [memory]\n", 6, "routes[0].cache: expected a mapping"),
    ],
)
def test_bad_values_refused(cache_yaml, line, reason):
    error = refused(routes(cache_yaml))
    assert error.line == line
    assert error.reason.startswith(reason), error.reason


def test_object_larger_than_the_memory_store_refused():
    error = refused(routes("cache:\n  memory_limit: 1MiB\n  max_object_size: 2MiB\n"))
    assert error.line == 8
    assert "max_object_size (2097152) is larger than memory_limit (1048576)" in error.reason
    # The memory limit does not bind a Redis store.
    parse(
        routes(
            "cache: {store: redis, memory_limit: 1MiB, max_object_size: 2MiB}\n",
            top="redis: {url: 'redis://127.0.0.1:6379/0'}\n",
        )
    )


def test_redis_store_needs_the_top_level_redis_key():
    error = refused(routes("cache:\n  store: redis\n"))
    assert error.line == 7
    assert error.reason == (
        "routes[0].cache.store: store: redis needs a top-level redis: {url: ...} section"
    )
