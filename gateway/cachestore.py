"""
Where the response cache keeps its entries: in this process's memory, or in
Redis shared by several gateway processes.

A store maps a cache key (L{gateway.cache.cache_key}) to the variants stored
under it: a L{tuple} of L{gateway.cache.CachedResponse}, most recent first.
Every operation returns a L{Deferred}; the stores hold no cache rules (TTL
and variant selection come from L{gateway.cache}).
"""

from __future__ import annotations

import math
import struct
from collections import OrderedDict
from typing import Optional, Sequence, Tuple

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import Interface, implementer

from gateway.cache import CachedResponse

_log = Logger()

Variants = Tuple[CachedResponse, ...]


class ICacheStore(Interface):
    """
    Keeps cache entries by key. (To move to L{gateway.interfaces}.)
    """

    def get(key):
        """
        @param key: a cache key.
        @type key: L{bytes}
        @return: fires with the stored variants (L{tuple} of
            L{gateway.cache.CachedResponse}, most recent first), or L{None}
            when nothing (or nothing readable) is stored. Backend failures
            are failures of the L{Deferred}.
        @rtype: L{Deferred}
        """

    def set(key, variants, ttl):
        """
        Store C{variants} under C{key}, replacing what was there, for
        C{ttl} seconds (L{gateway.cache.storage_ttl}). A C{ttl} <= 0 deletes.

        @type ttl: L{float}
        @return: fires with L{None} when stored.
        @rtype: L{Deferred}
        """

    def delete(key):
        """
        Delete all the variants of C{key}.

        @return: fires with the number of keys deleted (0 or 1).
        @rtype: L{Deferred}
        """

    def purge(prefix):
        """
        Delete every key starting with C{prefix} (L{gateway.cache.key_prefix}).

        @type prefix: L{bytes}
        @return: fires with the number of keys deleted.
        @rtype: L{Deferred}
        """


@implementer(ICacheStore)
@attrs.define
class MemoryCacheStore:
    """
    An in-process store bounded by bytes, evicting the least recently used.

    Sizes are L{gateway.cache.CachedResponse.size} estimates summed over a
    key's variants plus the key. An entry larger than the whole limit is not
    stored. Expired entries (past their C{ttl}) are dropped when read.

    @ivar limit_bytes: the most bytes held.
    @ivar clock: has C{seconds()}, POSIX seconds (the reactor, or a
        L{twisted.internet.task.Clock} in tests).
    @ivar bytes_stored: bytes held now.
    @ivar evictions: entries evicted to make room, since start.
    """

    limit_bytes: int
    clock: object
    bytes_stored: int = attrs.field(default=0, init=False)
    evictions: int = attrs.field(default=0, init=False)
    _entries: "OrderedDict[bytes, Tuple[Variants, int, float]]" = attrs.field(
        factory=OrderedDict, init=False
    )

    def __len__(self) -> int:
        return len(self._entries)

    def _remove(self, key: bytes) -> bool:
        item = self._entries.pop(key, None)
        if item is None:
            return False
        self.bytes_stored -= item[1]
        return True

    def get(self, key: bytes) -> "Deferred[Optional[Variants]]":
        item = self._entries.get(key)
        if item is None:
            return succeed(None)
        variants, _, expires = item
        if self.clock.seconds() >= expires:
            self._remove(key)
            return succeed(None)
        self._entries.move_to_end(key)
        return succeed(variants)

    def set(self, key: bytes, variants: Sequence[CachedResponse], ttl: float) -> "Deferred[None]":
        self._remove(key)
        variants = tuple(variants)
        size = len(key) + sum(v.size for v in variants)
        if ttl <= 0 or not variants or size > self.limit_bytes:
            return succeed(None)
        while self.bytes_stored + size > self.limit_bytes and self._entries:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            self.evictions += 1
        self._entries[key] = (variants, size, self.clock.seconds() + ttl)
        self.bytes_stored += size
        return succeed(None)

    def delete(self, key: bytes) -> "Deferred[int]":
        return succeed(int(self._remove(key)))

    def purge(self, prefix: bytes) -> "Deferred[int]":
        doomed = [k for k in self._entries if k.startswith(prefix)]
        for key in doomed:
            self._remove(key)
        return succeed(len(doomed))


# --- serialisation ------------------------------------------------------------

_MAGIC = b"TXC1"
_HEAD = struct.Struct("!4sH")  # magic, variant count
_VARIANT = struct.Struct("!HddHH")  # status, request_time, response_time, n headers, n vary
_NAME = struct.Struct("!H")
_LENGTH = struct.Struct("!I")
_ABSENT = 0xFFFFFFFF


def encode_variants(variants: Sequence[CachedResponse]) -> bytes:
    """
    Serialise variants compactly (binary, length-prefixed, versioned by a
    magic prefix).

    @rtype: L{bytes}
    @raise struct.error: for fields too large for the format (a name over
        64 KiB, a value or body over 4 GiB).
    """
    parts = [_HEAD.pack(_MAGIC, len(variants))]
    for v in variants:
        parts.append(
            _VARIANT.pack(v.status, v.request_time, v.response_time, len(v.headers), len(v.vary))
        )
        for name, value in v.headers:
            parts += [_NAME.pack(len(name)), name, _LENGTH.pack(len(value)), value]
        for name, value in v.vary:
            parts += [_NAME.pack(len(name)), name]
            if value is None:
                parts.append(_LENGTH.pack(_ABSENT))
            else:
                parts += [_LENGTH.pack(len(value)), value]
        parts += [_LENGTH.pack(len(v.body)), v.body]
    return b"".join(parts)


def decode_variants(data: bytes) -> Variants:
    """
    The inverse of L{encode_variants}.

    @rtype: L{tuple} of L{CachedResponse}
    @raise ValueError: if C{data} is not a whole, well-formed encoding.
    """
    view = memoryview(data)
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(view):
            raise ValueError("truncated cache entry")
        chunk = view[pos : pos + n].tobytes()
        pos += n
        return chunk

    def unpack(fmt: struct.Struct):
        return fmt.unpack(take(fmt.size))

    magic, count = unpack(_HEAD)
    if magic != _MAGIC:
        raise ValueError("not a cache entry")
    variants = []
    for _ in range(count):
        status, request_time, response_time, n_headers, n_vary = unpack(_VARIANT)
        headers = []
        for _ in range(n_headers):
            name = take(unpack(_NAME)[0])
            headers.append((name, take(unpack(_LENGTH)[0])))
        vary = []
        for _ in range(n_vary):
            name = take(unpack(_NAME)[0])
            (length,) = unpack(_LENGTH)
            vary.append((name, None if length == _ABSENT else take(length)))
        body = take(unpack(_LENGTH)[0])
        variants.append(
            CachedResponse(
                status=status,
                headers=headers,
                body=body,
                request_time=request_time,
                response_time=response_time,
                vary=tuple(vary),
            )
        )
    if pos != len(view):
        raise ValueError("trailing bytes after cache entry")
    return tuple(variants)


def _glob_escape(data: bytes) -> bytes:
    out = bytearray()
    for byte in data:
        if byte in b"*?[]\\":
            out.append(0x5C)
        out.append(byte)
    return bytes(out)


@implementer(ICacheStore)
@attrs.define
class RedisCacheStore:
    """
    A store in Redis, shared by every gateway process using the same
    C{prefix}.

    Uses the synchronous redis-py client in a thread pool so the reactor
    never waits on Redis; serialisation happens in the pool too. Each key
    holds one value, L{encode_variants} of its variants, with a millisecond
    expiry (C{SET ... PX}) so Redis purges it. Two processes adding
    different variants of one key at once may lose one of them (last write
    wins): it is simply fetched again.

    @ivar client: a L{redis.Redis} (not decoding responses; thread-safe).
    @ivar reactor: the reactor the L{Deferred}s fire in.
    @ivar threadpool: a started L{twisted.python.threadpool.ThreadPool} owned
        by the caller (stop it on shutdown).
    @ivar prefix: put before every cache key in Redis.
    @ivar scan_count: keys asked per C{SCAN} step when purging.
    """

    client: object
    reactor: object
    threadpool: object
    prefix: bytes = b"txgateway:cache:"
    scan_count: int = 1000

    def _run(self, f, *args) -> Deferred:
        return deferToThreadPool(self.reactor, self.threadpool, f, *args)

    def get(self, key: bytes) -> "Deferred[Optional[Variants]]":
        full = self.prefix + key

        def read():
            data = self.client.get(full)
            if data is None:
                return None
            try:
                return decode_variants(data)
            except (ValueError, struct.error) as e:
                return e

        def done(result):
            if isinstance(result, Exception):
                _log.warn("unreadable cache entry {key!r}: {error}", key=full, error=str(result))
                return None
            return result

        return self._run(read).addCallback(done)

    def set(self, key: bytes, variants: Sequence[CachedResponse], ttl: float) -> "Deferred[None]":
        full = self.prefix + key
        variants = tuple(variants)
        if ttl <= 0 or not variants:
            return self.delete(key).addCallback(lambda _: None)
        milliseconds = max(1, math.ceil(ttl * 1000))

        def write():
            self.client.set(full, encode_variants(variants), px=milliseconds)

        return self._run(write)

    def delete(self, key: bytes) -> "Deferred[int]":
        return self._run(self.client.delete, self.prefix + key)

    def purge(self, prefix: bytes) -> "Deferred[int]":
        pattern = _glob_escape(self.prefix + prefix) + b"*"

        def purge():
            deleted = 0
            batch = []
            for key in self.client.scan_iter(match=pattern, count=self.scan_count):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += self.client.unlink(*batch)
                    batch = []
            if batch:
                deleted += self.client.unlink(*batch)
            return deleted

        return self._run(purge)
