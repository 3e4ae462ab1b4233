"""Tests for gateway.tracing: W3C Trace Context parsing and continuation."""

import re

import pytest
import pytest_twisted

from gateway.tracing import (
    SAMPLED,
    TRACEPARENT,
    TRACESTATE,
    continue_or_start,
    parse_traceparent,
    parse_tracestate,
    upstream_trace_headers,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01".encode()
_TRACEPARENT_00 = re.compile(rb"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def test_valid_traceparent():
    assert parse_traceparent([VALID]) == (TRACE, PARENT, 1)
    assert parse_traceparent([f"00-{TRACE}-{PARENT}-00".encode()]) == (TRACE, PARENT, 0)


def test_optional_whitespace_is_ignored():
    assert parse_traceparent([b" \t" + VALID + b" "]) == (TRACE, PARENT, 1)


def test_unknown_flags_are_not_passed_on():
    assert parse_traceparent([f"00-{TRACE}-{PARENT}-ff".encode()]) == (TRACE, PARENT, SAMPLED)
    assert parse_traceparent([f"00-{TRACE}-{PARENT}-02".encode()]) == (TRACE, PARENT, 0)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"garbage",
        f"00-{TRACE.upper()}-{PARENT}-01".encode(),  # upper-case hex
        f"00-{TRACE}-{PARENT.upper()}-01".encode(),
        f"ff-{TRACE}-{PARENT}-01".encode(),  # version ff is invalid
        f"00-{'0' * 32}-{PARENT}-01".encode(),  # all-zero trace ID
        f"00-{TRACE}-{'0' * 16}-01".encode(),  # all-zero parent ID
        f"00-{TRACE}-{PARENT}-01-extra".encode(),  # version 00 is exactly 55 chars
        f"00-{TRACE}-{PARENT}-1".encode(),
        f"00-{TRACE[:-1]}-{PARENT}-01".encode(),
        f"00_{TRACE}_{PARENT}_01".encode(),
        f"0x-{TRACE}-{PARENT}-01".encode(),
        f"01-{TRACE}-{PARENT}-01x".encode(),  # a later version needs '-' after 55
    ],
)
def test_invalid_traceparent(value):
    assert parse_traceparent([value]) is None


def test_later_version_read_as_00():
    assert parse_traceparent([f"cc-{TRACE}-{PARENT}-01".encode()]) == (TRACE, PARENT, 1)
    assert parse_traceparent([f"cc-{TRACE}-{PARENT}-01-what-the-future-holds".encode()]) == (
        TRACE, PARENT, 1,
    )


def test_absent_or_repeated_traceparent():
    assert parse_traceparent(None) is None
    assert parse_traceparent([]) is None
    assert parse_traceparent([VALID, VALID]) is None


def test_continue_keeps_trace_and_makes_a_new_span():
    trace = continue_or_start([VALID], [b"congo=t61rcWkgMzE"])
    assert trace.trace_id == TRACE
    assert trace.parent_id == PARENT
    assert re.match(r"^[0-9a-f]{16}$", trace.span_id) and trace.span_id not in (PARENT, "0" * 16)
    assert trace.sampled
    assert trace.traceparent() == f"00-{TRACE}-{trace.span_id}-01".encode()
    assert trace.tracestate == b"congo=t61rcWkgMzE"
    other = continue_or_start([VALID], None)
    assert other.span_id != trace.span_id  # a new span per request


def test_unsampled_caller_stays_unsampled():
    trace = continue_or_start([f"00-{TRACE}-{PARENT}-00".encode()], None)
    assert not trace.sampled and trace.traceparent().endswith(b"-00")


def test_start_when_absent_or_invalid():
    for incoming in (None, [b"nonsense"], [VALID, VALID]):
        trace = continue_or_start(incoming, [b"congo=t61rcWkgMzE"])
        assert trace.parent_id is None
        assert trace.trace_id != TRACE and re.match(r"^[0-9a-f]{32}$", trace.trace_id)
        assert trace.trace_id != "0" * 32
        assert _TRACEPARENT_00.match(trace.traceparent())
        assert trace.tracestate is None  # never passed on for a new trace
    assert continue_or_start(None, None, sample_new=True).sampled
    assert not continue_or_start(None, None, sample_new=False).sampled
    ids = {continue_or_start(None, None).trace_id for _ in range(100)}
    assert len(ids) == 100


def test_tracestate_valid_and_joined():
    assert parse_tracestate([b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"]) == (
        b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    )
    assert parse_tracestate([b"rojo=1", b" congo=2 ,, "]) == b"rojo=1,congo=2"
    assert parse_tracestate([b"tenant@system=x y"]) == b"tenant@system=x y"
    assert parse_tracestate([b"", b" "]) is None
    assert parse_tracestate(None) is None


@pytest.mark.parametrize(
    "value",
    [
        b"Rojo=1",  # upper-case key
        b"rojo",  # no value
        b"rojo=",  # empty value
        b"rojo=a=b",
        b"rojo=1,rojo=2",  # a key twice
        b"rojo=\x7f",  # not a printable character
        b"rojo=1,b",  # a member without a value
        ",".join(f"k{i}=v" for i in range(33)).encode(),  # more than 32 members
        b"a" * 257 + b"=v",
    ],
)
def test_tracestate_invalid(value):
    assert parse_tracestate([value]) is None


def test_upstream_headers():
    trace = continue_or_start([VALID], [b"congo=1", b"rojo=2"])
    assert upstream_trace_headers(trace) == [
        (TRACEPARENT, trace.traceparent()),
        (TRACESTATE, b"congo=1,rojo=2"),
    ]
    fresh = continue_or_start(None, [b"congo=1"])
    assert upstream_trace_headers(fresh) == [(TRACEPARENT, fresh.traceparent())]


# --- OTLP export (only with the opentelemetry extra) ---------------------------------


@pytest_twisted.inlineCallbacks
def test_otlp_exporter_sends_the_gateway_span():
    pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from gateway.tracing import OtlpExporter
    from tests.contexts import config, finished

    memory = InMemorySpanExporter()
    exporter = OtlpExporter("http://127.0.0.1:1/v1/traces", "gw-test", exporter=memory)
    c = config()
    continued = finished(c, status=502, started=1700000000.5, duration=0.25)
    continued.notes["trace"] = trace = continue_or_start([VALID], None)
    exporter.observe(continued)  # not started: nothing is queued
    exporter.startService()
    exporter.observe(continued)
    unsampled = finished(c, request_id="req-2")
    unsampled.notes["trace"] = continue_or_start([f"00-{TRACE}-{PARENT}-00".encode()], None)
    exporter.observe(unsampled)
    exporter.observe(finished(c, request_id="req-3"))  # no trace context: tracing off
    yield exporter.stopService()
    (span,) = memory.get_finished_spans()
    assert exporter.exported == 1
    assert format(span.context.trace_id, "032x") == TRACE
    assert format(span.context.span_id, "016x") == trace.span_id
    assert format(span.parent.span_id, "016x") == PARENT
    assert span.kind == SpanKind.SERVER and span.name == "GET users-api"
    assert span.start_time == 1700000000500000000 and span.end_time == 1700000000750000000
    assert span.attributes["http.response.status_code"] == 502
    assert span.attributes["gateway.backend"] == "http://127.0.0.1:9001"
    assert span.resource.attributes["service.name"] == "gw-test"
    assert not span.status.is_ok
