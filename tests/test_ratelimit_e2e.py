"""
End to end: rate limits in real twistd gateways, in front of a real demo
backend, with the shared Redis on 127.0.0.1:6379 (keys under a fresh
prefix, deleted afterwards) and, for outages, a redis-server of this test's
own on a free port, killed, stopped and restarted by its PID.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter

import pytest
import redis

from tests.harness import redis_key_prefix, Gateway, closed_port, get, wait_for

#: The longest one request may take while Redis is down or hung, seconds:
#: the store's timeout (250 ms here) plus a margin for a loaded machine.
NO_HANG = 3.0


def uid() -> str:
    return uuid.uuid4().hex


def config(backend_url: str, redis_url: str, routes: str, top: str = "", timeout: str = "500ms") -> str:
    return f"""
listen: tcp:0:interface=127.0.0.1
admin: {{listen: "tcp:0:interface=127.0.0.1"}}
redis: {{url: "{redis_url}", timeout: {timeout}}}
{top}
services:
  one:
    backends: [{{url: {backend_url}}}]
    timeouts: {{connect: 1s, response: 5s}}
routes:
{routes}
"""


def stop(gw: Gateway) -> None:
    assert gw.stop() == 0, gw.log()
    assert "Traceback" not in gw.log(), gw.log()


def limiter_stats(gw: Gateway) -> dict:
    return get(gw.admin_port, "/ratelimit").json()


@pytest.fixture(scope="module")
def redis_prefix():
    yield from redis_key_prefix("rl:")


# --- one gateway, memory store -------------------------------------------------------


ROUTES = """
  - name: bucket
    match: {path_prefix: /bucket}
    service: one
    rate_limit: {rate: 0.01, burst: 3, key: "header:X-Client", name: per-client}
  - name: window
    match: {path_prefix: /window}
    service: one
    rate_limit: {algorithm: sliding_window, limit: 2, window: 1h, key: "header:X-Client"}
  - name: by-ip
    match: {path_prefix: /ip}
    service: one
    rate_limit: {rate: 0.01, burst: 1}
  - name: by-consumer
    match: {path_prefix: /consumer}
    service: one
    auth: {methods: [api_key]}
    rate_limit: {rate: 0.01, burst: 1, key: consumer}
  - name: free
    match: {path_prefix: /free}
    service: one
"""

TOP = """
trusted_proxies: [127.0.0.0/8]
consumers:
  - {name: alice, api_keys: [alice-1, alice-2]}
  - {name: bob, api_keys: [bob-1]}
"""


@pytest.fixture(scope="module")
def gateway(backends):
    gw = Gateway(config(backends[0].url, "redis://127.0.0.1:6379/0", ROUTES, TOP))
    yield gw
    stop(gw)


def test_429_with_json_retry_after_and_ratelimit_headers(gateway):
    client = {"X-Client": uid()}
    passed = [get(gateway.port, "/bucket/x", client) for _ in range(3)]
    assert [r.status for r in passed] == [200, 200, 200]
    assert [r.all("RateLimit") for r in passed] == [
        ['"per-client";r=2;t=100'],
        ['"per-client";r=1;t=200'],
        ['"per-client";r=0;t=300'],
    ]
    assert all(r.all("RateLimit-Policy") == ['"per-client";q=3;w=300'] for r in passed)
    assert all(not r.all("Retry-After") for r in passed)

    refused = get(gateway.port, "/bucket/x", client)
    assert refused.status == 429
    assert refused.header("Content-Type") == "application/json"
    assert refused.json() == {"error": "rate limit exceeded", "request_id": refused.header("X-Request-Id")}
    assert refused.all("Retry-After") == ["100"]
    assert refused.all("RateLimit-Policy") == ['"per-client";q=3;w=300']
    assert refused.all("RateLimit") == ['"per-client";r=0;t=100']
    assert limiter_stats(gateway)["rejected"]["bucket"] >= 1


def test_sliding_window(gateway):
    client = {"X-Client": uid()}
    codes = [get(gateway.port, "/window/x", client).status for _ in range(3)]
    assert codes == [200, 200, 429]
    r = get(gateway.port, "/window/x", {"X-Client": uid()})
    assert r.status == 200 and r.all("RateLimit-Policy") == ['"default";q=2;w=3600']


def test_key_by_header(gateway):
    alice, bob = {"X-Client": uid()}, {"X-Client": uid()}
    assert [get(gateway.port, "/bucket/x", alice).status for _ in range(4)] == [200, 200, 200, 429]
    assert get(gateway.port, "/bucket/x", bob).status == 200


def test_key_by_client_ip_behind_a_trusted_proxy(gateway):
    """127.0.0.1 is a trusted proxy here: the client is the right-most
    untrusted address of X-Forwarded-For."""
    client = f"198.51.100.{uuid.uuid4().int % 250 + 1}"
    other = "2001:db8::" + uid()[:4]
    forwarded = {"X-Forwarded-For": f"203.0.113.1, {client}, 127.0.0.2"}
    assert get(gateway.port, "/ip/x", forwarded).status == 200
    assert get(gateway.port, "/ip/x", {"X-Forwarded-For": client}).status == 429
    assert get(gateway.port, "/ip/x", {"X-Forwarded-For": other}).status == 200


def test_key_by_consumer(gateway):
    """Two keys of one consumer share its bucket; the bucket is per gateway
    (memory store), so this test takes alice's only token."""
    assert get(gateway.port, "/consumer/x", {"X-API-Key": "alice-1"}).status == 200
    assert get(gateway.port, "/consumer/x", {"X-API-Key": "alice-2"}).status == 429
    assert get(gateway.port, "/consumer/x", {"X-API-Key": "bob-1"}).status == 200
    assert get(gateway.port, "/consumer/x").status == 401


def test_unlimited_route_has_no_headers(gateway):
    r = get(gateway.port, "/free/x")
    assert r.status == 200 and not r.all("RateLimit") and not r.all("RateLimit-Policy")


# --- two gateways, one Redis --------------------------------------------------------


class Load:
    """
    Requests from C{threads} threads over keep-alive connections, spread
    over gateway ports; records every status and the slowest answer.
    """

    def __init__(self, ports, path: str, headers=None) -> None:
        self.ports = ports
        self.path = path
        self.headers = headers or {}
        self.statuses: Counter = Counter()
        self.slowest = 0.0
        self.errors: list = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _worker(self, port: int, count) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            n = 0
            while not self._stop.is_set() and (count is None or n < count):
                n += 1
                started = time.monotonic()
                try:
                    conn.request("GET", self.path, headers=self.headers)
                    response = conn.getresponse()
                    response.read()
                    status = response.status
                except (OSError, http.client.HTTPException) as e:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                    with self._lock:
                        self.errors.append(repr(e))
                    continue
                took = time.monotonic() - started
                with self._lock:
                    self.statuses[status] += 1
                    self.slowest = max(self.slowest, took)
                if count is None:
                    time.sleep(0.005)  # a steady trickle, not a flood
        finally:
            conn.close()

    def run(self, per_thread: int, threads_per_port: int = 4) -> "Load":
        """C{per_thread} requests from each thread; returns when all are done."""
        workers = [
            threading.Thread(target=self._worker, args=(port, per_thread))
            for port in self.ports
            for _ in range(threads_per_port)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        assert not any(w.is_alive() for w in workers), "load did not finish in 120 s"
        return self

    def start(self, threads_per_port: int = 2) -> "Load":
        """Run until L{stop}."""
        self._workers = [
            threading.Thread(target=self._worker, args=(port, None), daemon=True)
            for port in self.ports
            for _ in range(threads_per_port)
        ]
        for w in self._workers:
            w.start()
        return self

    def stop(self) -> "Load":
        self._stop.set()
        for w in self._workers:
            w.join(30)
        assert not any(w.is_alive() for w in self._workers), "a load thread hung"
        return self


SHARED = """
  - name: shared-bucket
    match: {{path_prefix: /b}}
    service: one
    rate_limit: {{rate: 0.0001, burst: {n}, key: global, store: redis,
                 redis_failure: closed, redis_prefix: "{prefix}"}}
  - name: shared-window
    match: {{path_prefix: /w}}
    service: one
    rate_limit: {{algorithm: sliding_window, limit: {n}, window: 1h, key: global,
                 store: redis, redis_failure: closed, redis_prefix: "{prefix}"}}
"""


@pytest.mark.parametrize("path", ["/b", "/w"], ids=["token_bucket", "sliding_window"])
def test_two_gateways_share_a_redis_limit(backends, redis_prefix, path):
    """Two processes, one limit of N: N pass in total (not 2N)."""
    n = 200
    prefix = f"{redis_prefix}{uid()}:"
    text = config(backends[0].url, "redis://127.0.0.1:6379/0", SHARED.format(n=n, prefix=prefix))
    first = Gateway(text)
    try:
        second = Gateway(text)
        try:
            load = Load([first.port, second.port], path).run(per_thread=2 * n // 8 + 10)
            assert not load.errors, load.errors[:5]
            assert set(load.statuses) <= {200, 429}, load.statuses
            allowed = load.statuses[200]
            print(f"two gateways, limit {n}: {dict(load.statuses)}")
            assert abs(allowed - n) <= 0.05 * n, load.statuses
            stats = [limiter_stats(first), limiter_stats(second)]
            # decided by Redis, not by redis_failure (a Redis slower than the
            # 500 ms timeout on a loaded machine would refuse a few)
            assert sum(s["degraded"] for s in stats) <= 0.05 * n, stats
            assert all(s["rejected"] for s in stats), stats  # both gateways refused some
            client = redis.Redis(host="127.0.0.1", port=6379)
            assert list(client.scan_iter(match=prefix + "*"))
            client.close()
        finally:
            stop(second)
    finally:
        stop(first)


# --- a Redis of our own: killed, hung, restarted --------------------------------------


class OwnRedis:
    """A redis-server child on a free port, with nothing saved to disk."""

    def __init__(self) -> None:
        self.port = closed_port()
        self.dir = tempfile.mkdtemp(prefix="txgateway-redis-")
        self.popen = None
        self.start()

    def start(self) -> None:
        self.popen = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self.ping, what=f"redis-server on port {self.port}")

    def ping(self) -> bool:
        try:
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5)
            try:
                return client.ping()
            finally:
                client.close()
        except redis.RedisError:
            return False

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def pause(self) -> None:
        self.popen.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.popen.send_signal(signal.SIGCONT)

    def keys(self) -> list:
        client = redis.Redis(host="127.0.0.1", port=self.port)
        try:
            return list(client.scan_iter())
        finally:
            client.close()

    def close(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)


@pytest.fixture
def own_redis():
    server = OwnRedis()
    yield server
    server.close()


MODES = """
  - name: open
    match: {path_prefix: /open}
    service: one
    rate_limit: {rate: 0.001, burst: 5, key: global, store: redis, redis_failure: open}
  - name: closed
    match: {path_prefix: /closed}
    service: one
    rate_limit: {rate: 0.001, burst: 5, key: global, store: redis, redis_failure: closed}
  - name: local
    match: {path_prefix: /local}
    service: one
    rate_limit: {rate: 0.001, burst: 5, key: global, store: redis, redis_failure: local}
"""


def statuses(gw: Gateway, path: str, count: int) -> list:
    result = []
    for _ in range(count):
        started = time.monotonic()
        r = get(gw.port, path, timeout=NO_HANG + 2)
        assert time.monotonic() - started < NO_HANG, f"{path} took too long"
        result.append(r.status)
    return result


def test_redis_killed_mid_run_then_restarted(backends, own_redis):
    gw = Gateway(config(backends[0].url, f"redis://127.0.0.1:{own_redis.port}/0", MODES, timeout="250ms"))
    try:
        # Redis up: each route's 5 tokens are shared state in Redis
        for path in ("/open", "/closed", "/local"):
            assert statuses(gw, path, 6) == [200] * 5 + [429]
        assert len(own_redis.keys()) == 3

        # Redis killed while requests keep coming on every route
        loads = [Load([gw.port], path).start() for path in ("/open", "/closed", "/local")]
        time.sleep(0.5)
        own_redis.kill()
        time.sleep(2.0)
        for load in loads:
            load.stop()
            assert not load.errors, load.errors[:5]
            assert set(load.statuses) <= {200, 429}, load.statuses  # never a 500
            assert load.slowest < NO_HANG, load.slowest
        open_load, closed_load, local_load = (load.statuses for load in loads)
        print("while Redis was killed:", open_load, closed_load, local_load)
        assert open_load[200] > 0 and open_load[429] > 0  # refused, then let through
        assert closed_load[200] == 0
        assert local_load[200] == 5  # the fallback's own bucket of 5, in this process

        # down: each rule as configured, answered at once
        assert statuses(gw, "/open", 8) == [200] * 8  # fails open
        assert statuses(gw, "/closed", 3) == [429] * 3  # fails closed
        r = get(gw.port, "/closed")
        assert r.header("Retry-After") == "1"
        assert r.json()["error"] == "rate limit store unavailable"
        assert statuses(gw, "/local", 3) == [429] * 3  # the local bucket is empty too
        stats = limiter_stats(gw)
        assert stats["redis_failures"] >= 1 and stats["redis"][0]["failing"]
        failures = stats["redis_failures"]
        statuses(gw, "/open", 20)
        # one attempt per probe interval, not one per request
        assert limiter_stats(gw)["redis_failures"] <= failures + 3

        # restarted (empty): recovers without restarting the gateway
        own_redis.start()
        wait_for(lambda: get(gw.port, "/closed").status == 200, timeout=15, interval=0.2,
                 what="the closed route to recover")
        assert statuses(gw, "/open", 1) == [200]
        wait_for(lambda: len(own_redis.keys()) >= 2, timeout=5, what="decisions in Redis again")
        assert not limiter_stats(gw)["redis"][0]["failing"]
    finally:
        stop(gw)
    log = gw.log()
    assert log.count("failing (") == 1, log  # one warning per outage
    assert log.count("recovered after") == 1, log


def test_redis_hung_does_not_hang_requests(backends, own_redis):
    gw = Gateway(config(backends[0].url, f"redis://127.0.0.1:{own_redis.port}/0", MODES, timeout="250ms"))
    try:
        assert statuses(gw, "/closed", 1) == [200]
        own_redis.pause()
        try:
            assert statuses(gw, "/closed", 3) == [429] * 3
            assert statuses(gw, "/open", 3) == [200] * 3
        finally:
            own_redis.resume()
        wait_for(lambda: get(gw.port, "/closed").status == 200, timeout=15, interval=0.2,
                 what="the closed route to recover")
    finally:
        stop(gw)
