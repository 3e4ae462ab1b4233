"""Tests for gateway.accesslog: fields, redaction, the access-log file (combined and JSON Lines)."""

import io
import json
import os
import time

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    LogPublisher,
    eventAsJSON,
    eventFromJSON,
    formatEvent,
    jsonFileLogObserver,
)

from gateway.accesslog import (
    ACCESS_FIELDS,
    AccessLog,
    AccessLogFile,
    access_fields,
    combined_line,
    json_line,
    redact_headers,
    redact_query,
)
from gateway.tracing import continue_or_start
from tests.contexts import config, finished


def test_fields_of_a_request():
    c = config()
    context = finished(c, started=1714564800.25, duration=0.0125, upstream=0.010)
    context.consumer = "alice"
    context.bytes_in = 5
    context.retries = 1
    context.cache = "MISS"
    context.query = b"?page=2"
    trace = continue_or_start(None, None)
    context.notes["trace"] = trace
    fields = access_fields(context)
    assert tuple(fields) == ACCESS_FIELDS
    assert fields == {
        "time": "2024-05-01T12:00:00.250Z",
        "request_id": "req-1",
        "trace_id": trace.trace_id,
        "client_ip": "192.0.2.1",
        "consumer": "alice",
        "method": "GET",
        "path": "/users/7?page=2",
        "route": "users-api",
        "service": "users",
        "backend": "http://127.0.0.1:9001",
        "status": 200,
        "bytes_in": 5,
        "bytes_out": 123,
        "duration_ms": 12.5,
        "upstream_duration_ms": 10.0,
        "cache": "MISS",
        "retries": 1,
        "error": None,
    }
    json.dumps(fields)  # plain values only


def test_iso_time_across_seconds():
    """The per-second cache of the formatted time never shows a stale second."""
    from gateway.accesslog import _iso_time

    assert _iso_time(1714564800.25) == "2024-05-01T12:00:00.250Z"
    assert _iso_time(1714564800.999) == "2024-05-01T12:00:00.999Z"
    assert _iso_time(1714564861.5) == "2024-05-01T12:01:01.500Z"
    assert _iso_time(1714564800.0) == "2024-05-01T12:00:00.000Z"  # an earlier second again
    assert _iso_time(0.5) == "1970-01-01T00:00:00.500Z"


def test_fields_of_an_unrouted_request():
    fields = access_fields(finished(config(), route=None, status=404))
    assert fields["route"] is fields["backend"] is fields["service"] is fields["trace_id"] is None
    assert fields["upstream_duration_ms"] is None and fields["status"] == 404


def test_query_secrets_redacted():
    assert redact_query(b"") == b""
    assert redact_query(b"?a=1&b=2") == b"?a=1&b=2"
    assert redact_query(b"?api_key=s3cr3t&a=1&TOKEN=x&Access%5Ftoken=y&password") == (
        b"?api_key=REDACTED&a=1&TOKEN=REDACTED&Access%5Ftoken=REDACTED&password"
    )
    assert redact_query(b"?session_id=1", frozenset(["session_id"])) == b"?session_id=REDACTED"
    c = config()
    context = finished(c)
    context.query = b"?key=abc&q=shoes"
    assert access_fields(context)["path"] == "/users/7?key=REDACTED&q=shoes"
    assert b"abc" not in combined_line(context)


def test_header_secrets_redacted():
    pairs = [
        (b"Authorization", b"Bearer eyJ"),
        (b"Cookie", b"sid=1"),
        (b"X-Api-Key", b"k"),
        (b"Proxy-Authorization", b"Basic eA=="),
        (b"Set-Cookie", b"a=b"),
        (b"Accept", b"*/*"),
        (b"X-Custom-Secret", b"s"),
    ]
    redacted = dict(redact_headers(pairs, [b"x-custom-secret"]))
    assert redacted[b"Accept"] == b"*/*"
    for name in (b"Authorization", b"Cookie", b"X-Api-Key", b"Proxy-Authorization", b"Set-Cookie", b"X-Custom-Secret"):
        assert redacted[name] == b"REDACTED"


def test_event_is_fields_not_a_string():
    events = []
    log = AccessLog(observer=events.append)
    before = time.time()
    log(finished(config()))
    (event,) = events
    for name in ACCESS_FIELDS:
        assert name in event
    assert event["status"] == 200 and event["route"] == "users-api"
    assert event["log_level"] is LogLevel.info and event["log_namespace"] == "gateway.access"
    assert before <= event["log_time"] <= time.time()
    text = formatEvent(event)
    assert text == '"GET /users/7" 200 12.0ms req-1'
    decoded = json.loads(eventAsJSON(event))
    assert decoded["duration_ms"] == 12.0 and decoded["request_id"] == "req-1"
    assert "log_logger" not in decoded
    assert formatEvent(eventFromJSON(eventAsJSON(event))) == text


def test_event_text_keeps_braces_literal():
    """A path with replacement-field syntax is shown as it came, not formatted."""
    events = []
    context = finished(config())
    context.path = b"/users/{0}/{status!r}/{{x}}"
    AccessLog(observer=events.append)(context)
    (event,) = events
    assert formatEvent(event) == '"GET /users/{0}/{status!r}/{{x}}" 200 12.0ms req-1'
    assert event["path"] == "/users/{0}/{status!r}/{{x}}"


def test_access_event_through_a_logging_pipeline():
    """The event passes twist's level filter and reaches the JSON file observer."""
    out = io.StringIO()
    publisher = LogPublisher(
        FilteringLogObserver(jsonFileLogObserver(out), [LogLevelFilterPredicate(LogLevel.info)])
    )
    AccessLog(observer=publisher)(finished(config()))
    quiet = LogLevelFilterPredicate(LogLevel.info)
    quiet.setLogLevelForNamespace("gateway.access", LogLevel.warn)
    AccessLog(observer=FilteringLogObserver(jsonFileLogObserver(out), [quiet]))(finished(config()))
    (line,) = out.getvalue().rstrip("\n").split("\n")  # (splitlines splits at RS too)
    decoded = json.loads(line[1:])
    assert decoded["request_id"] == "req-1" and decoded["log_namespace"] == "gateway.access"


def test_disabled_event():
    events = []
    AccessLog(observer=events.append, enabled=False)(finished(config()))
    assert events == []


def test_combined_line():
    c = config()
    context = finished(c, started=1714564800.9, method=b"POST", status=201)
    context.query = b"?q=1"
    context.consumer = "alice smith"
    context.notes["client"] = (b"HTTP/1.0", b"http://ref.example/", b'curl/8 "quoted"\x01')
    assert combined_line(context) == (
        b'192.0.2.1 - alice_smith [01/May/2024:12:00:00 +0000] "POST /users/7?q=1 HTTP/1.0" 201 123 '
        b'"http://ref.example/" "curl/8 \\x22quoted\\x22\\x01"\n'
    )
    plain = finished(c, route=None, status=404)
    plain.bytes_out = 0
    assert combined_line(plain).endswith(b'"GET /users/7 HTTP/1.1" 404 - "-" "-"\n')


def test_json_line_is_the_event_fields_on_one_ascii_line():
    context = finished(config(), started=1714564800.25)
    context.path = "/caf\u00e9/\u2028/\"x\"\n".encode("utf-8")
    context.query = b"?token=abc&q=1"
    line = json_line(context)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    line.decode("ascii")  # non-ASCII is escaped, so any reader's encoding will do
    fields = json.loads(line)
    assert fields == access_fields(context)
    assert tuple(fields) == ACCESS_FIELDS
    assert fields["path"] == "/caf\u00e9/\u2028/\"x\"\n?token=REDACTED&q=1"
    assert b"abc" not in json_line(context, frozenset(["token"]))


def test_logged_request_headers_are_the_last_field():
    context = finished(config(), notes={"request_headers": {"user-agent": "caf\u00e9/1", "host": None}})
    fields = access_fields(context)
    assert tuple(fields) == ACCESS_FIELDS + ("request_headers",)
    assert json.loads(json_line(context))["request_headers"] == {"user-agent": "caf\u00e9/1", "host": None}
    events = []
    AccessLog(None, observer=events.append)(context)
    assert events[0]["request_headers"] == {"user-agent": "caf\u00e9/1", "host": None}


class Lines:
    def __init__(self):
        self.lines = []

    def write(self, line):
        self.lines.append(line)


@pytest.mark.parametrize("file_format, line", [("combined", combined_line), ("json", json_line)])
def test_access_log_writes_its_file_format(file_format, line):
    out = Lines()
    events = []
    context = finished(config())
    context.query = b"?api_key=k"
    log = AccessLog(out, frozenset(["api_key"]), enabled=False, observer=events.append, file_format=file_format)
    log(context)
    assert out.lines == [line(context, frozenset(["api_key"]))] and events == []


def test_access_log_refuses_an_unknown_file_format():
    with pytest.raises(ValueError, match="'xml' is not one of"):
        AccessLog(Lines(), file_format="xml")


@pytest_twisted.inlineCallbacks
def test_access_log_file_written_from_a_thread(tmp_path):
    from twisted.internet import reactor

    path = str(tmp_path / "access.log")
    f = AccessLogFile(path, reactor, flush_interval=0.05)
    f.startService()
    try:
        f.write(b"one\n")
        f.write(b"two\n")
        assert not os.path.exists(path)  # nothing written on the reactor thread
        yield f.flush()
        assert open(path, "rb").read() == b"one\ntwo\n"
        os.rename(path, path + ".1")  # rotated away: the next batch makes a new file
        f.write(b"three\n")
    finally:
        yield f.stopService()
    assert open(path, "rb").read() == b"three\n"
    assert f.written == 3 and f.dropped == 0
    assert not reactor.getDelayedCalls()


@pytest_twisted.inlineCallbacks
def test_access_log_file_writes_a_full_batch_before_the_interval(tmp_path):
    from twisted.internet import reactor

    path = tmp_path / "access.log"
    f = AccessLogFile(str(path), reactor, flush_interval=3600, batch_size=10)
    f.startService()
    try:
        f.write(b"12345\n")
        assert f._writing is None  # 6 bytes wait: under the batch size
        f.write(b"67890\n")
        assert f._writing is not None  # 12: a batch is on its way
        f.write(b"abcdefghijk\n")  # a batch is being written: this one waits
        yield f._writing
        assert path.read_bytes() == b"12345\n67890\n" and f.written == 2
        f.write(b"z\n")  # the next write sends what waits
        yield f._writing
        assert path.read_bytes() == b"12345\n67890\nabcdefghijk\nz\n"
    finally:
        yield f.stopService()
    assert f.written == 4 and not reactor.getDelayedCalls()
    interval_only = AccessLogFile(str(path), reactor, flush_interval=3600, batch_size=0)
    interval_only.startService()
    try:
        interval_only.write(b"x" * 100000 + b"\n")
        assert interval_only._writing is None
    finally:
        yield interval_only.stopService()
    assert interval_only.written == 1


@pytest_twisted.inlineCallbacks
def test_access_log_file_stop_writes_lines_that_come_while_it_stops(tmp_path):
    from twisted.internet import reactor

    path = tmp_path / "access.log"
    f = AccessLogFile(str(path), reactor, flush_interval=3600, batch_size=4)
    f.startService()
    f.write(b"one\n")  # a batch is being written
    assert f._writing is not None
    stopped = f.stopService()
    f.write(b"two\n")  # a request that finished meanwhile
    yield stopped
    assert path.read_bytes() == b"one\ntwo\n" and f.written == 2 and f.dropped == 0
    f.write(b"three\n")  # after the stop: nobody will write it
    assert f.dropped == 1 and b"three" not in path.read_bytes()


@pytest_twisted.inlineCallbacks
def test_access_log_file_counts_a_batch_it_cannot_write(tmp_path):
    from twisted.internet import reactor

    f = AccessLogFile(str(tmp_path / "missing" / "access.log"), reactor, flush_interval=60)
    f.startService()
    try:
        f.write(b"one\n")
        f.write(b"two\n")
        yield f.flush()
        assert f.dropped == 2 and f.written == 0
        f.write(b"three\n")
    finally:
        yield f.stopService()
    assert f.dropped == 3


def test_access_log_file_buffer_is_bounded():
    f = AccessLogFile("/nonexistent/never-written", Clock(), max_buffer=100)
    for _ in range(30):
        f.write(b"0123456789\n")
    assert f._buffered <= 100
    assert f.dropped == 30 - 9
