"""
End to end: a real twistd gateway in front of backends that die, hang,
come back or answer 5xx. Health checks, outlier detection, breakers and
retries are observed from outside: client responses, the backends' own
request counts, and the admin listener's C{/backends}.
"""

from __future__ import annotations

import http.client
import signal
import socket
import threading
import time
from collections import Counter

import pytest

from tests.harness import Backend, Gateway, closed_port, get, request, wait_for


def backend_state(gateway: Gateway, url: str, service: str) -> dict:
    states = get(gateway.admin_port, "/backends").json()["backends"]
    return next(s for s in states if s["backend"] == url and s["service"] == service)


def usable(state: dict) -> bool:
    return state["healthy"] and not state["ejected"] and state["circuit"] != "open"


def count_requests(backends) -> dict:
    return {b.name: b.stats()["requests"] for b in backends}


class Hanger:
    """
    A TCP server on 127.0.0.1 that accepts connections, reads, and never
    answers; its connections close when it stops.
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted = 0
        self._held: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            self._held.append(conn)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._held:
            conn.close()
        self.sock.close()


# --- one gateway for the scenarios that do not kill backends --------------------


@pytest.fixture(scope="module")
def hanger():
    h = Hanger()
    yield h
    h.stop()


@pytest.fixture(scope="module")
def gateway(backends, hanger):
    a, b, c = backends
    dead1, dead2 = closed_port(), closed_port()
    gw = Gateway(
        f"""
listen: tcp:0:interface=127.0.0.1
admin: {{listen: "tcp:0:interface=127.0.0.1"}}
services:
  three:
    backends: [{{url: {a.url}}}, {{url: {b.url}}}, {{url: {c.url}}}]
  halfdead:
    backends: [{{url: "http://127.0.0.1:{dead1}"}}, {{url: {a.url}}}]
  pair:
    backends: [{{url: {a.url}}}, {{url: {b.url}}}]
  down:
    backends: [{{url: "http://127.0.0.1:{dead1}"}}, {{url: "http://127.0.0.1:{dead2}"}}]
    health_check: {{path: /health, interval: 200ms, timeout: 200ms, unhealthy_threshold: 1}}
  hang:
    backends: [{{url: {hanger.url}}}, {{url: {a.url}}}]
    timeouts: {{connect: 500ms, response: 600ms}}
    circuit_breaker: {{failure_threshold: 2, cooldown: 60s}}
  hang_retry:
    backends: [{{url: {hanger.url}}}, {{url: {b.url}}}]
    timeouts: {{connect: 500ms, response: 3s, per_try: 400ms}}
  sticky:
    balancer: consistent_hash
    hash_on: header:X-User
    backends: [{{url: {a.url}}}, {{url: {b.url}}}, {{url: {c.url}}}]
  sticky_cookie:
    balancer: consistent_hash
    hash_on: cookie:session
    backends: [{{url: {a.url}}}, {{url: {b.url}}}, {{url: {c.url}}}]
routes:
  - {{name: three, match: {{path_prefix: /three}}, service: three, strip_prefix: true}}
  - {{name: halfdead, match: {{path_prefix: /halfdead}}, service: halfdead, strip_prefix: true}}
  - {{name: pair, match: {{path_prefix: /pair}}, service: pair, strip_prefix: true}}
  - name: pair-post-retry
    match: {{path_prefix: /retry-any}}
    service: pair
    strip_prefix: true
    retries: {{max_retries: 1, non_idempotent: true}}
  - {{name: down, match: {{path_prefix: /down}}, service: down, strip_prefix: true}}
  - {{name: hang, match: {{path_prefix: /hang}}, service: hang, strip_prefix: true}}
  - name: hang-retry
    match: {{path_prefix: /hretry}}
    service: hang_retry
    strip_prefix: true
  - {{name: sticky, match: {{path_prefix: /sticky}}, service: sticky, strip_prefix: true}}
  - {{name: cookie, match: {{path_prefix: /cookie}}, service: sticky_cookie, strip_prefix: true}}
"""
    )
    yield gw
    assert gw.stop() == 0, gw.log()
    assert "Traceback" not in gw.log(), gw.log()


def test_all_backends_down_is_503_with_retry_after_and_json(gateway):
    urls = [s["backend"] for s in get(gateway.admin_port, "/backends").json()["backends"]
            if s["service"] == "down"]
    wait_for(
        lambda: not any(backend_state(gateway, u, "down")["healthy"] for u in urls),
        timeout=10, what="the health checks to mark both backends down",
    )
    r = get(gateway.port, "/down/x")
    assert r.status == 503
    assert r.header("Content-Type") == "application/json"
    assert r.json() == {"error": "no healthy backend", "request_id": r.header("X-Request-Id")}
    assert int(r.header("Retry-After")) >= 1
    assert "is now unhealthy" in gateway.log()


def test_retries_go_to_a_different_backend_each_time(gateway, backends):
    before = count_requests(backends)
    r = get(gateway.port, "/three/status/503")
    after = count_requests(backends)
    # Two retries: three attempts, one on each backend; the last answer is relayed.
    assert r.status == 503 and r.json()["backend"] in ("a", "b", "c")
    assert {name: after[name] - before[name] for name in after} == {"a": 1, "b": 1, "c": 1}


def test_connect_failure_is_retried_for_any_method(gateway, backends):
    # halfdead's first backend refuses connections: every request that
    # tries it first must still be answered by a, whatever its method.
    for method in ("GET", "POST", "PATCH", "GET", "POST"):
        r = request(gateway.port, method, "/halfdead/x", body=b"payload")
        assert r.status == 200, (method, r.status, r.body)
        assert r.json()["backend"] == "a" and r.json()["method"] == method


def test_reset_is_retried_for_get_but_not_for_post(gateway, backends):
    a, b, _ = backends
    before = count_requests([a, b])
    assert request(gateway.port, "POST", "/pair/drop", body=b"x").status == 502
    after = count_requests([a, b])
    # The backend may have acted on the POST: it is not sent again.
    assert sum(after.values()) - sum(before.values()) == 1

    before = after
    assert get(gateway.port, "/pair/drop").status == 502
    after = count_requests([a, b])
    # The GET went to both backends (Twisted may also resend it once on a
    # reused pooled connection, so at least two).
    assert after["a"] > before["a"] and after["b"] > before["b"]

    # A route may allow retrying non-idempotent methods.
    before = after
    assert request(gateway.port, "POST", "/retry-any/drop", body=b"x").status == 502
    after = count_requests([a, b])
    assert after["a"] - before["a"] == 1 and after["b"] - before["b"] == 1


def test_hanging_backend_times_out_then_its_breaker_opens(gateway, hanger):
    timed_out = 0
    for _ in range(8):
        started = time.monotonic()
        r = get(gateway.port, "/hang/x", timeout=10)
        elapsed = time.monotonic() - started
        if r.status == 504:
            assert r.json()["error"] == "backend response timed out"
            assert elapsed < 3, elapsed  # the 600 ms timeout, not forever
            timed_out += 1
        else:
            assert r.status == 200 and r.json()["backend"] == "a"
    # Round robin sends every other request to the hanging backend until
    # two timeouts open its breaker; from then on it is skipped.
    assert timed_out == 2
    assert backend_state(gateway, hanger.url, "hang")["circuit"] == "open"
    accepted = hanger.accepted
    for _ in range(10):
        started = time.monotonic()
        r = get(gateway.port, "/hang/x")
        assert r.status == 200 and r.json()["backend"] == "a"
        assert time.monotonic() - started < 0.5
    assert hanger.accepted == accepted


def test_hanging_backend_with_per_try_timeout_is_retried_for_get_only(gateway, hanger):
    for _ in range(4):
        started = time.monotonic()
        r = get(gateway.port, "/hretry/x")
        assert r.status == 200 and r.json()["backend"] == "b"
        assert time.monotonic() - started < 2.5  # at most one 400 ms try lost
    statuses = Counter(
        request(gateway.port, "POST", "/hretry/x", body=b"x").status for _ in range(4)
    )
    # Round robin: every other POST reaches the hanging backend and is not retried.
    assert statuses == {200: 2, 504: 2}


def test_consistent_hash_keeps_each_user_on_one_backend(gateway):
    placement = {}
    for round_ in range(3):
        for user in range(30):
            r = get(gateway.port, "/sticky/x", headers={"X-User": f"user-{user}"})
            assert r.status == 200
            placement.setdefault(user, set()).add(r.json()["backend"])
    assert all(len(seen) == 1 for seen in placement.values()), placement
    spread = Counter(next(iter(seen)) for seen in placement.values())
    assert len(spread) == 3, spread

    for session in ("s1", "s2", "s3", "s4"):
        seen = {
            get(gateway.port, "/cookie/x", headers={"Cookie": f"session={session}"}).json()["backend"]
            for _ in range(4)
        }
        assert len(seen) == 1


# --- SIGKILL one of three backends under load, and restart it -------------------


class Load:
    """
    Client threads sending GETs over keep-alive connections until stopped;
    each result is C{(time, status or exception name, backend)}.
    """

    def __init__(self, port: int, path: str, threads: int = 4) -> None:
        self.port = port
        self.path = path
        self.results: list = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        conn = None
        while not self._stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                conn.request("GET", self.path)
                r = conn.getresponse()
                body = r.read()
                backend = r.getheader("X-Backend")
                result = (time.monotonic(), r.status, backend)
                if r.status != 200:
                    result = (time.monotonic(), r.status, body[:200])
            except Exception as e:  # a failed GET, whatever the cause
                result = (time.monotonic(), type(e).__name__, None)
                conn.close()
                conn = None
            with self._lock:
                self.results.append(result)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def failures(self) -> list:
        return [r for r in self.results if r[1] != 200]

    def served_by(self, name: str, since: float) -> bool:
        with self._lock:
            return any(t >= since and backend == name for t, _, backend in self.results)


def test_sigkill_one_of_three_backends_under_load_and_restart_it():
    backends = [Backend(name) for name in ("k1", "k2", "k3")]
    gateway = load = None
    try:
        urls = "".join(f"\n      - url: {b.url}" for b in backends)
        gateway = Gateway(
            f"""
listen: tcp:0:interface=127.0.0.1
admin: {{listen: "tcp:0:interface=127.0.0.1"}}
services:
  k:
    backends:{urls}
    timeouts: {{connect: 500ms, response: 5s, per_try: 2s}}
    health_check: {{path: /health, interval: 250ms, timeout: 250ms,
                    healthy_threshold: 2, unhealthy_threshold: 2}}
    passive_health: {{consecutive_failures: 3, ejection_time: 1s, max_ejection_percent: 34}}
    circuit_breaker: {{failure_threshold: 5, cooldown: 2s}}
routes:
  - {{name: k, match: {{path_prefix: /k}}, service: k, strip_prefix: true}}
"""
        )
        victim = backends[2]
        load = Load(gateway.port, "/k/item")
        time.sleep(1.5)
        assert load.served_by("k3", 0), "k3 was not serving before the kill"

        killed_at = time.monotonic()
        victim.stop(signal.SIGKILL)
        wait_for(lambda: not usable(backend_state(gateway, victim.url, "k")), timeout=10,
                 interval=0.01, what="the gateway to take the killed backend out")
        taken_out = time.monotonic() - killed_at
        out_state = backend_state(gateway, victim.url, "k")
        wait_for(lambda: not backend_state(gateway, victim.url, "k")["healthy"], timeout=10,
                 interval=0.01, what="the active health check to mark the killed backend down")
        marked_unhealthy = time.monotonic() - killed_at

        time.sleep(max(0.0, killed_at + 2.0 - time.monotonic()))
        restarted = Backend("k3", port=victim.port)
        backends[2] = restarted
        restarted_at = time.monotonic()
        wait_for(lambda: usable(backend_state(gateway, victim.url, "k")), timeout=10,
                 interval=0.01, what="the gateway to put the restarted backend back")
        put_back = time.monotonic() - restarted_at
        wait_for(lambda: load.served_by("k3", restarted_at), timeout=5,
                 what="client requests to reach the restarted backend")
        serving_again = time.monotonic() - restarted_at
        time.sleep(max(0.0, restarted_at + 1.5 - time.monotonic()))
        load.stop()

        failures = load.failures()
        total = len(load.results)
        print(
            f"\nkill/restart under load: {total} GETs, {len(failures)} failed; "
            f"taken out {taken_out * 1000:.0f} ms after SIGKILL "
            f"(healthy={out_state['healthy']}, ejected={out_state['ejected']}, "
            f"circuit={out_state['circuit']}); active check marked it unhealthy after "
            f"{marked_unhealthy * 1000:.0f} ms; put back {put_back * 1000:.0f} ms after "
            f"restart, serving clients again after {serving_again * 1000:.0f} ms"
        )
        assert failures == [], failures[:10]
        assert total > 100
        assert taken_out < 2.0
        assert marked_unhealthy < 3.0
        assert put_back < 3.0
        log = gateway.log()
        assert "is now unhealthy" in log or "ejected for" in log
        assert "is now healthy" in log
    finally:
        if load is not None:
            load.stop()
        if gateway is not None:
            assert gateway.stop() == 0, gateway.log()
            assert "Traceback" not in gateway.log(), gateway.log()
        for b in backends:
            b.stop()
