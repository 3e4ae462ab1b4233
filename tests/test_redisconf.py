"""
Tests for the top-level C{redis} key (L{gateway.redisconf}): defaults, every
refusal with its line and reason, and the client it builds.
"""

import textwrap

import pytest

import gateway.redisconf  # noqa: F401  (registers the key)
from gateway.config import ConfigError, parse_config
from gateway.redisconf import RedisConfig

BASE = """\
services:
  s: {backends: [{url: "http://127.0.0.1:9001"}]}
"""


def parse(text: str):
    return parse_config(textwrap.dedent(text), "gw.yaml")


def refused(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value


def test_redis_defaults():
    config = parse("redis: {url: 'redis://localhost'}\n" + BASE + "routes: []\n")
    assert config.options["redis"] == RedisConfig(url="redis://localhost", timeout=0.05)


@pytest.mark.parametrize(
    "redis_yaml, line, reason",
    [
        ("redis: {url: 'http://127.0.0.1:6379'}\n", 1, "redis.url: expected a redis://, rediss:// or unix:// URL"),
        ("redis: {url: 'redis://127.0.0.1:notaport'}\n", 1, "redis.url: bad Redis URL"),
        ("redis:\n  url: 'redis://x'\n  timeout: 0s\n", 3, "redis.timeout: must be longer than zero"),
        ("redis:\n  url: 'redis://x'\n  pool: 3\n", 3, "redis.pool: unknown key"),
        ("redis: {timeout: 1s}\n", 1, "redis: missing required key 'url'"),
    ],
)
def test_bad_redis_refused(redis_yaml, line, reason):
    error = refused(redis_yaml + BASE + "routes: []\n")
    assert error.line == line
    assert error.reason.startswith(reason), error.reason


def test_redis_client_uses_the_timeout():
    client = RedisConfig(url="redis://127.0.0.1:6379/3", timeout=0.25).client()
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 0.25 and kwargs["socket_connect_timeout"] == 0.25
    assert kwargs["db"] == 3
    client.close()
