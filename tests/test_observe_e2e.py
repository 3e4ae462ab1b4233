"""
End to end: metrics, stats, JSON access logs, trace context and the
dashboard's event stream on a real twistd (or twist) gateway.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import ROOT, Gateway, closed_port, env, get, request, rss_bound_mib, rss_kib, wait_for

TWIST = os.path.join(os.path.dirname(sys.executable), "twist")
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def config(backends, observability: str = "") -> str:
    a, b, c = backends
    return f"""
listen: tcp:0:interface=127.0.0.1
admin: {{listen: "tcp:0:interface=127.0.0.1"}}
{observability}
services:
  pair:
    backends: [{{url: {a.url}}}, {{url: {b.url}}}]
  dead:
    backends: [{{url: "http://127.0.0.1:{closed_port()}"}}]
routes:
  - name: pair
    match: {{path_prefix: /pair}}
    service: pair
    strip_prefix: true
  - name: dead
    match: {{path_prefix: /dead}}
    service: dead
"""


@pytest.fixture(scope="module")
def gateway(backends):
    gw = Gateway(
        config(
            backends,
            "observability: {dashboard: {client_buffer: 16KiB, recent: 1000}, "
            "access_log: {redact_query: [session_id]}}",
        )
    )
    yield gw
    assert gw.stop() == 0, gw.log()
    assert "Traceback" not in gw.log(), gw.log()


def samples(port: int) -> dict:
    r = get(port, "/metrics")
    assert r.status == 200
    assert r.header("Content-Type").startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(r.body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(all_samples: dict, name: str, **labels):
    return all_samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_traffic(gateway, backends):
    before = samples(gateway.admin_port)
    for _ in range(5):
        assert get(gateway.port, "/pair/x").status == 200
    for _ in range(2):
        assert request(gateway.port, "POST", "/pair/x", body=b"abc").status == 200
    assert get(gateway.port, "/pair/status/404").status == 404
    assert get(gateway.port, "/nothing/here?ip=1").status == 404
    assert get(gateway.port, "/dead/x").status == 502
    assert request(gateway.port, "BREW", "/pair/x").status in (200, 405, 501)
    after = samples(gateway.admin_port)

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("gateway_requests_total", route="pair", service="pair", method="GET", status="200") == 5
    assert delta("gateway_requests_total", route="pair", service="pair", method="POST", status="200") == 2
    assert delta("gateway_requests_total", route="pair", service="pair", method="GET", status="404") == 1
    assert delta("gateway_requests_total", route="", service="", method="GET", status="404") == 1
    assert delta("gateway_requests_total", route="dead", service="dead", method="GET", status="502") == 1
    assert delta("gateway_request_duration_seconds_count", route="pair", service="pair") == 9
    a, b, _ = backends
    upstream = delta("gateway_upstream_duration_seconds_count", service="pair", backend=a.url) + delta(
        "gateway_upstream_duration_seconds_count", service="pair", backend=b.url
    )
    assert upstream == 9
    assert sample(after, "gateway_backend_healthy", service="pair", backend=a.url) == 1
    assert sample(after, "gateway_circuit_state", service="pair", backend=a.url) == 0
    assert sample(after, "gateway_active_connections", service="pair", backend=a.url) == 0
    assert sample(after, "gateway_rate_limited_total", route="pair") == 0
    assert sample(after, "gateway_config_reloads_total", result="ok") == 0
    assert any(k[0] == "gateway_build_info" for k in after)
    # No client input in any label.
    for name, labels in after:
        for _, value in labels:
            assert "nothing" not in value and "BREW" not in value and "status/" not in value


def test_stats(gateway, backends):
    get(gateway.port, "/pair/x")
    doc = get(gateway.admin_port, "/stats").json()
    assert doc["routes"]["pair"]["requests"] >= 1
    assert doc["routes"]["pair"]["latency_ms"]["p50"] > 0
    assert {b["backend"] for b in doc["backends"]} >= {backends[0].url, backends[1].url}
    assert all("healthy" in b and "circuit" in b for b in doc["backends"])
    assert doc["config"]["generation"] == 1 and doc["config"]["source"].endswith(".yaml")
    assert doc["dashboard"]["client_buffer"] == 16 * 1024


def test_traceparent_continued_to_backend(gateway):
    r = get(
        gateway.port,
        "/pair/echo",
        headers={"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "congo=t61rcWkgMzE"},
    )
    headers = {k.lower(): v for k, v in r.json()["headers"]}
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", TRACE, "01")
    assert span_id != PARENT and re.match(r"^[0-9a-f]{16}$", span_id)
    assert headers["tracestate"] == "congo=t61rcWkgMzE"


def test_trace_started_without_traceparent(gateway):
    r = get(gateway.port, "/pair/echo", headers={"traceparent": "garbage", "tracestate": "congo=1"})
    headers = {k.lower(): v for k, v in r.json()["headers"]}
    assert re.match(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$", headers["traceparent"])
    assert "tracestate" not in headers  # never passed on with a new trace


class EventReader:
    """A raw SSE client on a socket, reading events with a deadline."""

    def __init__(self, port: int, rcvbuf: int = 0) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(b"GET /dashboard/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        self.buffer = b""
        self.head = None

    def events(self, timeout: float):
        """Yield (event, payload) until C{timeout} seconds have passed."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n\n" in self.buffer:
                block, self.buffer = self.buffer.split(b"\n\n", 1)
                if self.head is None:
                    self.head, block = block.split(b"\r\n\r\n", 1) if b"\r\n\r\n" in block else (block, b"")
                fields = {}
                for line in block.split(b"\n"):
                    line = line.strip(b"\r")
                    if re.match(rb"^[0-9a-f]+$", line):  # a chunk size line
                        continue
                    if b": " in line:
                        k, v = line.split(b": ", 1)
                        fields[k] = v
                if b"event" in fields:
                    yield fields[b"event"].decode(), json.loads(fields[b"data"])
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return
            if not data:
                return
            self.buffer += data

    def close(self) -> None:
        self.sock.close()


def test_event_stream_delivers_requests_within_a_second(gateway):
    reader = EventReader(gateway.admin_port)
    try:
        kinds = []
        for kind, payload in reader.events(5):
            kinds.append(kind)
            if kind == "hello":
                assert {"requests", "series", "backends", "totals"} <= set(payload)
                break
        assert kinds == ["hello"]
        assert b"text/event-stream" in reader.head
        sent = time.monotonic()
        get(gateway.port, "/pair/feed", headers={"X-Request-Id": "feed-test-1"})
        seen = None
        for kind, payload in reader.events(1.0):
            if kind == "requests" and any(r["id"] == "feed-test-1" for r in payload):
                seen = time.monotonic() - sent
                row = next(r for r in payload if r["id"] == "feed-test-1")
                assert row["path"] == "/pair/feed" and row["route"] == "pair" and row["status"] == 200
                break
        assert seen is not None and seen < 1.0
        ticks = [p for k, p in reader.events(1.5) if k == "tick"]
        assert ticks and "rps" in ticks[-1]["point"] and ticks[-1]["backends"]
    finally:
        reader.close()


def test_dashboard_page_is_self_contained(gateway):
    r = get(gateway.admin_port, "/dashboard/")
    assert r.status == 200 and r.header("Content-Type").startswith("text/html")
    assert "default-src 'self'" in r.header("Content-Security-Policy")
    page = r.body.decode()
    for asset, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        assert asset in page
        a = get(gateway.admin_port, "/dashboard/" + asset)
        assert a.status == 200 and a.header("Content-Type").startswith(kind)
        assert not re.search(r"https?://|url\(\s*['\"]?//", a.body.decode())  # nothing from elsewhere
    # Nothing fetched from elsewhere: no absolute URLs in src or href.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert get(gateway.admin_port, "/dashboard").status == 302
    assert get(gateway.admin_port, "/dashboard/nope").status == 404


@pytest_twisted.inlineCallbacks
def test_stalled_event_stream_stays_bounded(gateway):
    """A browser that stops reading: its queue is capped and events are dropped."""
    import treq
    from twisted.internet import reactor
    from twisted.internet.defer import DeferredSemaphore, gatherResults
    from twisted.web.client import HTTPConnectionPool

    stalled = EventReader(gateway.admin_port, rcvbuf=4096)  # never read from
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 50
    limit = DeferredSemaphore(50)
    long_path = "/pair/" + "p" * 180
    baseline = rss_kib(gateway.pid)
    peak = baseline
    sent = 0
    deadline = time.monotonic() + 45
    try:
        # Until the socket's buffers and then the stream's queue are full
        # (about 100 KB of events: the gateway caps the socket's kernel
        # send buffer), bounded in time.
        while time.monotonic() < deadline:
            results = yield gatherResults(
                [
                    limit.run(treq.get, f"http://127.0.0.1:{gateway.port}{long_path}?n={i}", pool=pool)
                    for i in range(1000)
                ],
                consumeErrors=True,
            )
            for r in results:
                yield r.content()
            sent += len(results)
            peak = max(peak, rss_kib(gateway.pid))
            doc = (yield treq.get(f"http://127.0.0.1:{gateway.admin_port}/stats", pool=pool))
            stats = yield doc.json()
            if stats["dashboard"]["dropped_events"] > 0:
                break
    finally:
        yield pool.closeCachedConnections()
    streams = stats["dashboard"]["streams"]
    assert streams, "the stalled client is still connected"
    assert all(s["queued_bytes"] <= 16 * 1024 for s in streams), streams
    assert stats["dashboard"]["dropped_events"] > 0, (sent, stats["dashboard"])
    assert any(s["paused"] for s in streams), streams
    growth_mib = (peak - baseline) / 1024
    assert growth_mib < rss_bound_mib(32), f"gateway RSS grew by {growth_mib:.0f} MiB"
    stalled.close()
    # The proxy kept serving throughout.
    assert get(gateway.port, "/pair/x").status == 200
    wait_for(
        lambda: get(gateway.admin_port, "/stats").json()["dashboard"]["clients"] == 0,
        timeout=5,
        what="the stalled stream to be forgotten",
    )


# --- twist --log-format=json --------------------------------------------------------


class Twist:
    """A C{twist --log-format=json gateway} process writing JSON to a file."""

    def __init__(self, config_text: str) -> None:
        fd, self.config_path = tempfile.mkstemp(prefix="obs-gateway-", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            f.write(config_text)
        fd, self.log_path = tempfile.mkstemp(prefix="obs-twist-", suffix=".json")
        self.out = os.fdopen(fd, "wb")
        self.popen = subprocess.Popen(
            [TWIST, "--log-format=json", "gateway", "--config", self.config_path],
            stdout=self.out,
            stderr=subprocess.STDOUT,
            env=env(),
            cwd=ROOT,
        )

        def started():
            if self.popen.poll() is not None:
                raise RuntimeError(f"twist exited with {self.popen.returncode}:\n{self.text()}")
            return re.search(r"GatewaySite starting on (\d+)", self.text())

        self.port = int(wait_for(started, what="the gateway's listener").group(1))

    def text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.out.close()
        os.unlink(self.config_path)
        return self.popen.returncode


def test_twist_json_log_has_one_object_per_line_with_access_fields(backends):
    from gateway.accesslog import ACCESS_FIELDS

    fd, combined = tempfile.mkstemp(prefix="obs-combined-", suffix=".log")
    os.close(fd)
    twist = Twist(
        config(
            backends,
            f"observability: {{access_log: {{file: {combined}, flush_interval: 100ms, "
            "headers: [User-Agent, X-Forwarded-For]}}",
        )
    )
    try:
        r = get(
            twist.port,
            "/pair/echo?api_key=k-SECRET-1&q=shoes",
            headers={
                "Authorization": "Bearer t-SECRET-2",
                "Cookie": "sid=c-SECRET-3",
                "X-Api-Key": "h-SECRET-4",
                "X-Request-Id": "json-log-1",
                "traceparent": f"00-{TRACE}-{PARENT}-01",
                "User-Agent": "obs-test/1.0",
            },
        )
        assert r.status == 200
        get(twist.port, "/unrouted", headers={"X-Request-Id": "json-log-2", "User-Agent": "scan/2"})
        wait_for(lambda: b"/unrouted" in open(combined, "rb").read(), timeout=5, what="the combined log")
    finally:
        assert twist.stop() == 0, twist.text()
    text = twist.text()
    # (str.splitlines would also split at the RS character.)
    lines = text.rstrip("\n").split("\n")
    events = []
    for line in lines:
        assert line.startswith("\x1e{"), line  # RFC 7464: jq --seq reads it
        events.append(json.loads(line[1:]))
    access = [e for e in events if e.get("log_namespace") == "gateway.access"]
    by_id = {e["request_id"]: e for e in access}
    first = by_id["json-log-1"]
    for name in ACCESS_FIELDS:
        assert name in first, name
    assert first["method"] == "GET" and first["status"] == 200 and first["route"] == "pair"
    assert first["path"] == "/pair/echo?api_key=REDACTED&q=shoes"
    assert first["trace_id"] == TRACE
    assert first["client_ip"] == "127.0.0.1" and first["service"] == "pair"
    assert first["backend"].startswith("http://127.0.0.1:")
    assert first["duration_ms"] > 0 and first["upstream_duration_ms"] > 0
    assert first["bytes_out"] == len(r.body) and first["retries"] == 0
    assert first["request_headers"] == {"user-agent": "obs-test/1.0", "x-forwarded-for": None}
    second = by_id["json-log-2"]
    assert second["status"] == 404 and second["route"] is None
    assert second["request_headers"] == {"user-agent": "scan/2", "x-forwarded-for": None}
    assert "SECRET" not in text
    log = open(combined, "rb").read()
    os.unlink(combined)
    assert b"SECRET" not in log
    assert re.search(
        rb'^127\.0\.0\.1 - - \[[^]]+\] "GET /pair/echo\?api_key=REDACTED&q=shoes HTTP/1\.1" 200 \d+ "-" "obs-test/1\.0"$',
        log,
        re.M,
    ), log
    # A request no route matches has its user agent in the line too.
    assert re.search(rb'^127\.0\.0\.1 - - \[[^]]+\] "GET /unrouted HTTP/1\.1" 404 \d+ "-" "scan/2"$', log, re.M), log


def test_json_lines_access_file_instead_of_the_event(backends, tmp_path):
    """
    With the event off and a JSON file, each request is one JSON object
    on one line of the file, and nothing of it in the process log.
    """
    from gateway.accesslog import ACCESS_FIELDS

    path = tmp_path / "access.jsonl"
    gw = Gateway(
        config(
            backends,
            f"observability: {{access_log: {{enabled: false, file: {path}, format: json, "
            "flush_interval: 100ms, headers: [User-Agent, Host, Referer]}}",
        )
    )
    try:
        r = get(
            gw.port,
            "/pair/echo?token=t-SECRET-1&q=1",
            headers={"X-Request-Id": "jsonl-1", "User-Agent": "jsonl-test/1"},
        )
        assert r.status == 200
        get(gw.port, "/unrouted", headers={"X-Request-Id": "jsonl-2"})
        wait_for(
            lambda: get(gw.admin_port, "/stats").json()["access_log"]["written"] >= 2,
            timeout=5,
            what="both lines written",
        )
        stats = get(gw.admin_port, "/stats").json()["access_log"]
    finally:
        assert gw.stop() == 0, gw.log()
    assert stats["format"] == "json" and stats["written"] >= 2 and stats["dropped"] == 0
    data = path.read_bytes()
    assert b"SECRET" not in data
    lines = data.decode("ascii").splitlines()
    records = {}
    for line in lines:
        record = json.loads(line)
        assert tuple(record) == ACCESS_FIELDS + ("request_headers",)
        records[record["request_id"]] = record
    first, second = records["jsonl-1"], records["jsonl-2"]
    assert first["request_headers"] == {
        "user-agent": "jsonl-test/1",
        "host": f"127.0.0.1:{gw.port}",
        "referer": None,
    }
    assert first["path"] == "/pair/echo?token=REDACTED&q=1" and first["status"] == 200
    assert first["route"] == "pair" and first["bytes_out"] == len(r.body)
    assert first["upstream_duration_ms"] > 0 and first["backend"].startswith("http://127.0.0.1:")
    assert second["status"] == 404 and second["route"] is None
    # No route: the headers are recorded all the same.
    assert second["request_headers"]["host"] == f"127.0.0.1:{gw.port}"
    assert "jsonl-1" not in gw.log()


# --- OTLP export to a collector ---------------------------------------------------------


def test_spans_exported_to_an_otlp_collector(backends):
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            message = ExportTraceServiceRequest()
            message.ParseFromString(body)
            received.append((self.path, self.headers.get("X-Collector-Key"), message))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    gw = None
    try:
        gw = Gateway(
            config(
                backends,
                "observability: {tracing: {otlp: {endpoint: "
                f'"http://127.0.0.1:{server.server_port}/v1/traces", service_name: gw-e2e, '
                "headers: {X-Collector-Key: k1}}}}",
            )
        )
        r = get(gw.port, "/pair/otlp", headers={"traceparent": f"00-{TRACE}-{PARENT}-01"})
        span_id = {k.lower(): v for k, v in r.json()["headers"]}["traceparent"].split("-")[2]
        wait_for(lambda: received, timeout=10, what="spans at the collector")
    finally:
        if gw is not None:
            assert gw.stop() == 0, gw.log()
        server.shutdown()
        server.server_close()
    path, key, message = received[0]
    assert path == "/v1/traces" and key == "k1"
    (resource_spans,) = message.resource_spans
    attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert attributes["service.name"] == "gw-e2e"
    (span,) = resource_spans.scope_spans[0].spans
    assert span.trace_id.hex() == TRACE
    assert span.parent_span_id.hex() == PARENT
    assert span.span_id.hex() == span_id  # the span the backend was told is its parent
    assert span.name == "GET pair"
