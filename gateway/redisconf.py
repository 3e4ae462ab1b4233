"""
The top-level C{redis} key, shared by every feature that keeps state in
Redis (the response cache's Redis store, rate limiting)::

    redis:
      url: redis://127.0.0.1:6379/0   # redis://, rediss:// or unix://
      timeout: 50ms                   # connect and per-command socket timeout

The key is optional; a feature that needs Redis refuses a config without it
(naming its own line). The parsed value is L{RedisConfig}, kept in
C{config.options["redis"]} (L{None} when absent).
"""

from __future__ import annotations

from typing import Any

import attrs

from gateway.config import Extension, ParseContext, Section, Where, positive_duration, register, string


#: Seconds allowed to connect to Redis and for each command, by default.
DEFAULT_TIMEOUT = 0.05


@attrs.frozen
class RedisConfig:
    """
    Where Redis is and how long to wait for it.

    @ivar url: a redis-py URL (C{redis://[[user]:password@]host[:port][/db]},
        C{rediss://...} for TLS, C{unix:///path?db=0}).
    @ivar timeout: seconds allowed to connect and for each command; a
        command that takes longer fails (the caller degrades, it never
        waits on a slow Redis).
    """

    url: str
    timeout: float = DEFAULT_TIMEOUT

    def client(self):
        """
        A new synchronous redis-py client for this server (connections are
        made lazily, on first use). It is thread-safe: use it from a thread
        pool, never from the reactor thread.

        @rtype: L{redis.Redis}
        """
        import redis

        return redis.Redis.from_url(
            self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout
        )


def parse_redis(where: Where, value: Any, context: ParseContext) -> RedisConfig:
    """
    Read the top-level C{redis} section.

    @raise gateway.config.ConfigError: unknown keys, a URL redis-py refuses,
        a timeout that is not a positive duration.
    """
    section = Section(where, value)
    url_where = section.at("url")
    url = section.take("url", string)
    timeout = section.take("timeout", positive_duration, DEFAULT_TIMEOUT)
    section.finish()
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise url_where.error(f"expected a redis://, rediss:// or unix:// URL, got {url!r}")
    import redis

    try:
        redis.ConnectionPool.from_url(url)  # parses only; connects on first use
    except (ValueError, TypeError) as e:
        raise url_where.error(f"bad Redis URL {url!r}: {e}") from None
    return RedisConfig(url=url, timeout=timeout)


REDIS = register("top", Extension("redis", parse_redis, default=None))
