#!/usr/bin/env python
"""
Which Redis client should the rate limiter use from Twisted?  Measures, each
in its own process (a process can install only one reactor):

  - txredisapi on the default (epoll) reactor: Twisted-native, one pipelined
    connection;
  - txgateway's L{gateway.ratelimit.RedisStore} (txredisapi plus the timeout,
    the NOSCRIPT handling and the L{Decision} parsing): the real cost;
  - redis-py's asyncio client under Twisted's AsyncioSelectorReactor, bridged
    with C{Deferred.fromFuture};
  - redis-py's synchronous client in a thread pool, via C{deferToThreadPool};

doing N sequential EVALSHA decisions of the token-bucket script, then N with
C in flight at once; it prints decisions per second and the gateway process's
CPU time per decision.  It also measures what the asyncio reactor costs the
rest of the gateway: keep-alive HTTP requests per second against a
twisted.web Site, epoll reactor versus asyncio reactor.

Usage: bench/redis_clients.py [-n 20000] [-c 64] [--host 127.0.0.1] [--port 6379]

Keys are C{bench:<uuid>:<i>} in DB 0, deleted at the end (they also expire
within milliseconds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

CLIENTS = ["txredisapi", "RedisStore", "redispy-asyncio", "redispy-thread"]
KEYS = 1000


def _measure(run):
    """
    Time C{run()} (a Deferred-returning callable) in wall and CPU seconds.
    """
    from twisted.internet import defer

    @defer.inlineCallbacks
    def timed():
        wall, cpu = time.perf_counter(), time.process_time()
        yield run()
        return time.perf_counter() - wall, time.process_time() - cpu

    return timed()


def _child(client: str, n: int, concurrency: int, host: str, port: int) -> None:
    """
    Run one client's measurements and print one JSON line.
    """
    if client == "redispy-asyncio":
        import asyncio

        from twisted.internet import asyncioreactor

        # set as the current loop too: the reactor runs its startup callbacks
        # before the loop runs, and ensure_future() would then pick another
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        asyncioreactor.install(loop)
    from twisted.internet import defer, reactor, task

    from gateway.ratelimit import TOKEN_BUCKET_LUA, RedisStore, TokenBucket

    prefix = f"bench:{uuid.uuid4().hex}:"
    keys = [f"{prefix}{i}" for i in range(KEYS)]
    policy = TokenBucket(rate=1e6, burst=1_000_000, name="bench")
    args = list(policy.redis_args())
    sha = TOKEN_BUCKET_LUA.sha
    cleanup = []

    if client == "txredisapi":
        import txredisapi

        conn = txredisapi.lazyConnection(host, port, convertNumbers=False)
        cleanup.append(conn.disconnect)

        def one(i):
            return conn.evalsha(sha, [keys[i % KEYS]], args)

        setup = lambda: conn.script_load(TOKEN_BUCKET_LUA.text)  # noqa: E731
    elif client == "RedisStore":
        store = RedisStore(reactor, host, port, prefix=prefix, timeout=5.0)
        cleanup.append(store.close)

        def one(i):
            return store.check(str(i % KEYS), policy)

        setup = lambda: one(0)  # noqa: E731
        keys = [prefix + policy.storage_id + ":" + str(i) for i in range(KEYS)]
    elif client == "redispy-asyncio":
        import asyncio

        import redis.asyncio

        conn = redis.asyncio.Redis(host=host, port=port)

        def cleanup_asyncio():
            return defer.Deferred.fromFuture(asyncio.ensure_future(conn.aclose()))

        cleanup.append(cleanup_asyncio)

        def one(i):
            return defer.Deferred.fromFuture(
                asyncio.ensure_future(conn.evalsha(sha, 1, keys[i % KEYS], *args))
            )

        def setup():
            return defer.Deferred.fromFuture(
                asyncio.ensure_future(conn.script_load(TOKEN_BUCKET_LUA.text))
            )
    elif client == "redispy-thread":
        import redis
        from twisted.internet.threads import deferToThreadPool
        from twisted.python.threadpool import ThreadPool

        threads = min(concurrency, 16)
        pool = ThreadPool(minthreads=threads, maxthreads=threads, name="redis")
        pool.start()
        conn = redis.Redis(
            connection_pool=redis.ConnectionPool(
                host=host, port=port, max_connections=threads
            )
        )

        def stop_pool():
            pool.stop()
            conn.close()
            return defer.succeed(None)

        cleanup.append(stop_pool)

        def one(i):
            return deferToThreadPool(
                reactor, pool, conn.evalsha, sha, 1, keys[i % KEYS], *args
            )

        setup = lambda: deferToThreadPool(  # noqa: E731
            reactor, pool, conn.script_load, TOKEN_BUCKET_LUA.text
        )
    else:
        raise SystemExit(f"unknown client {client}")

    @defer.inlineCallbacks
    def sequential():
        for i in range(n):
            yield one(i)

    def concurrent():
        @defer.inlineCallbacks
        def worker(w):
            for i in range(w, n, concurrency):
                yield one(i)

        return defer.gatherResults(
            [worker(w) for w in range(concurrency)], consumeErrors=True
        )

    @defer.inlineCallbacks
    def main(_reactor):
        yield setup()
        yield sequential()  # warm-up: connections, scripts, code paths
        result = {"client": client, "reactor": type(reactor).__name__}
        wall, cpu = yield _measure(sequential)
        result.update(seq_rate=n / wall, seq_cpu_us=cpu / n * 1e6)
        wall, cpu = yield _measure(concurrent)
        result.update(conc_rate=n / wall, conc_cpu_us=cpu / n * 1e6)
        for close in cleanup:
            yield close()
        import redis

        sync = redis.Redis(host=host, port=port)
        for start in range(0, len(keys), 500):
            sync.delete(*keys[start : start + 500])
        sync.close()
        print(json.dumps(result), flush=True)

    task.react(main)


def _http_child(which: str, n: int, concurrency: int) -> None:
    """
    Keep-alive GETs per second against a twisted.web Site on 127.0.0.1,
    client and server in this process, on the C{which} reactor.
    """
    if which == "asyncio":
        import asyncio

        from twisted.internet import asyncioreactor

        # set as the current loop too: the reactor runs its startup callbacks
        # before the loop runs, and ensure_future() would then pick another
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        asyncioreactor.install(loop)
    from twisted.internet import defer, protocol, reactor, task
    from twisted.web import resource, server

    class Ok(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            return b"ok"

    request_bytes = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"

    class Client(protocol.Protocol):
        def __init__(self, count, done):
            self.count, self.done, self.buffer = count, done, b""

        def connectionMade(self):
            self.transport.setTcpNoDelay(True)
            self.transport.write(request_bytes)

        def dataReceived(self, data):
            self.buffer += data
            while b"\r\n\r\nok" in self.buffer:
                self.buffer = self.buffer.split(b"\r\n\r\nok", 1)[1]
                self.count -= 1
                if self.count == 0:
                    self.transport.loseConnection()
                    self.done.callback(None)
                    return
                self.transport.write(request_bytes)

    @defer.inlineCallbacks
    def main(_reactor):
        site = server.Site(Ok())
        site.log = lambda request: None
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        address = port.getHost()

        def run(total):
            dones = []
            for _ in range(concurrency):
                done = defer.Deferred()
                factory = protocol.ClientFactory()
                factory.protocol = lambda done=done: Client(total // concurrency, done)
                reactor.connectTCP(address.host, address.port, factory)
                dones.append(done)
            return defer.gatherResults(dones)

        yield run(concurrency * 50)  # warm-up
        wall, cpu = yield _measure(lambda: run(n))
        yield port.stopListening()
        print(
            json.dumps(
                {"reactor": type(reactor).__name__, "rate": n / wall, "cpu_us": cpu / n * 1e6}
            ),
            flush=True,
        )

    task.react(main)


def _run(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args],
        check=True,
        capture_output=True,
        timeout=600,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20000, help="decisions per measurement")
    parser.add_argument("-c", type=int, default=64, help="decisions in flight at once")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6379)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--http-child", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=3, help="runs per client; best kept")
    options = parser.parse_args()
    if options.child:
        return _child(options.child, options.n, options.c, options.host, options.port)
    if options.http_child:
        return _http_child(options.http_child, options.n, options.c)

    common = ["-n", str(options.n), "-c", str(options.c), "--host", options.host,
              "--port", str(options.port)]
    print(f"EVALSHA token-bucket decisions, n={options.n}, in flight={options.c}, "
          f"best of {options.repeat} (highest rate, lowest CPU time of the gateway process)")
    print(f"{'client':<18}{'reactor':<24}{'seq/s':>9}{'CPU µs':>8}"
          f"{'conc/s':>9}{'CPU µs':>8}")
    for client in CLIENTS:
        runs = [_run(["--child", client, *common]) for _ in range(options.repeat)]
        best = {k: (min if k.endswith("cpu_us") else max)(r[k] for r in runs)
                for k in ("seq_rate", "seq_cpu_us", "conc_rate", "conc_cpu_us")}
        print(f"{client:<18}{runs[0]['reactor']:<24}{best['seq_rate']:>9.0f}"
              f"{best['seq_cpu_us']:>8.1f}{best['conc_rate']:>9.0f}{best['conc_cpu_us']:>8.1f}")
    print()
    print(f"twisted.web keep-alive GET, n={options.n}, connections={options.c}")
    for which in ("epoll", "asyncio"):
        runs = [_run(["--http-child", which, *common]) for _ in range(options.repeat)]
        rate = max(r["rate"] for r in runs)
        cpu = min(r["cpu_us"] for r in runs)
        print(f"{which:<18}{runs[0]['reactor']:<24}{rate:>9.0f} req/s {cpu:>6.1f} CPU µs/req")


if __name__ == "__main__":
    main()
