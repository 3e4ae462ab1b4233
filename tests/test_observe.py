"""Tests for gateway.observe: the config section and the observe filter."""

import pytest
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from gateway.accesslog import SENSITIVE_QUERY_PARAMETERS
from gateway.config import ConfigError, parse_config
from gateway.observe import Observability, ObserveFilter, find, settings_of
from gateway.proxy import apply_upstream_headers
from gateway.state import Gateway
from tests.contexts import CONFIG, finished

TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def with_section(section: str) -> str:
    return CONFIG + section


def test_defaults():
    settings = settings_of(parse_config(CONFIG))
    assert settings == Observability()
    assert settings.access_log.enabled and settings.access_log.file is None
    assert settings.access_log.format == "combined" and settings.access_log.batch == 64 * 1024
    assert settings.dashboard.client_buffer == 256 * 1024
    assert settings.tracing.enabled and settings.tracing.otlp is None


def test_full_section():
    config = parse_config(
        with_section(
            """
observability:
  access_log: {enabled: false, file: /tmp/a.log, format: json, flush_interval: 250ms,
               batch: 0, max_buffer: 1MiB, redact_query: [Session_ID]}
  dashboard: {recent: 10, history: 60, client_buffer: 64KiB, max_clients: 2}
  tracing:
    sample_new: false
    otlp: {endpoint: "http://127.0.0.1:4318/v1/traces", service_name: edge,
           headers: {x-key: abc}, timeout: 2s}
"""
        )
    )
    s = settings_of(config)
    assert not s.access_log.enabled and s.access_log.file == "/tmp/a.log"
    assert s.access_log.flush_interval == 0.25 and s.access_log.max_buffer == 1 << 20
    assert s.access_log.format == "json" and s.access_log.batch == 0
    assert s.access_log.redact_query == SENSITIVE_QUERY_PARAMETERS | {"session_id"}
    assert (s.dashboard.recent, s.dashboard.history, s.dashboard.client_buffer, s.dashboard.max_clients) == (
        10, 60, 65536, 2,
    )
    assert not s.tracing.sample_new
    assert s.tracing.otlp.endpoint.endswith("/v1/traces") and s.tracing.otlp.headers == (("x-key", "abc"),)
    assert s.tracing.otlp.timeout == 2.0


@pytest.mark.parametrize(
    "section, reason",
    [
        ("observability: {acces_log: {}}", "observability.acces_log: unknown key"),
        ("observability: {dashboard: {recent: 0}}", "observability.dashboard.recent: must be at least 1"),
        ("observability: {dashboard: {client_buffer: 1KiB}}", "must be at least 4096 bytes"),
        ("observability: {tracing: {otlp: {endpoint: localhost:4318}}}", "expected an http:// or https:// URL"),
        ("observability: {tracing: {otlp: {}}}", "missing required key 'endpoint'"),
        ("observability: {access_log: {flush_interval: 0}}", "must be longer than zero"),
        (
            "observability: {access_log: {format: JSON}}",
            "observability.access_log.format: expected one of combined, json, got 'JSON'",
        ),
        (
            "observability: {access_log: {headers: [User-Agent, Authorization]}}",
            "observability.access_log.headers[1]: Authorization carries credentials:"
            " the access log never records it",
        ),
        (
            "observability: {access_log: {headers: [Cookie]}}",
            "Cookie carries credentials",
        ),
        (
            "observability: {access_log: {headers: [user agent]}}",
            "observability.access_log.headers[0]: not a header name: 'user agent'",
        ),
        ("observability: {access_log: {headers: User-Agent}}", "expected a list"),
    ],
)
def test_invalid_sections(section, reason):
    with pytest.raises(ConfigError) as e:
        parse_config(with_section(section), "gw.yaml")
    assert reason in str(e.value)


class Request:
    def __init__(self, headers=None):
        self.requestHeaders = Headers(headers or {})
        self.clientproto = b"HTTP/1.1"


def make_gateway(section: str = ""):
    clock = Clock()
    clock.advance(1_700_000_000)
    return Gateway(clock, parse_config(with_section(section), "gw.yaml"))


def test_filter_registered_with_observers():
    gateway = make_gateway()
    observe = find(gateway)
    assert isinstance(observe, ObserveFilter) and gateway.filters[0] is observe
    assert gateway.metrics.observe in gateway.request_observers
    assert observe.access_log in gateway.request_observers
    assert observe.feed.observe in gateway.request_observers
    assert observe.exporter is None


def test_filter_continues_trace_and_sets_upstream_headers():
    gateway = make_gateway()
    observe = find(gateway)
    context = finished(gateway.snapshot.config)
    context.notes.clear()
    request = Request({b"traceparent": [TRACEPARENT], b"tracestate": [b"a=1", b"b=2"]})
    assert observe.on_request(request, context) is None
    trace = context.notes["trace"]
    assert trace.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    upstream = Headers({b"traceparent": [TRACEPARENT], b"tracestate": [b"a=1", b"b=2"]})
    apply_upstream_headers(upstream, context.upstream_remove, context.upstream_headers)
    assert upstream.getRawHeaders(b"traceparent") == [trace.traceparent()]
    assert upstream.getRawHeaders(b"tracestate") == [b"a=1,b=2"]


def test_filter_drops_tracestate_of_a_new_trace():
    gateway = make_gateway()
    context = finished(gateway.snapshot.config)
    context.notes.clear()
    find(gateway).on_request(Request({b"tracestate": [b"a=1"]}), context)
    upstream = Headers({b"tracestate": [b"a=1"]})
    apply_upstream_headers(upstream, context.upstream_remove, context.upstream_headers)
    assert not upstream.hasHeader(b"tracestate")
    assert upstream.getRawHeaders(b"traceparent") == [context.notes["trace"].traceparent()]


def test_tracing_off_leaves_headers_alone():
    gateway = make_gateway("observability: {tracing: {enabled: false}, dashboard: {enabled: false}}")
    observe = find(gateway)
    assert observe.feed is None
    context = finished(gateway.snapshot.config)
    context.notes.clear()
    observe.on_request(Request({b"traceparent": [TRACEPARENT]}), context)
    assert context.notes == {} and context.upstream_headers == [] and not context.upstream_remove


def test_client_line_recorded_only_with_a_combined_file(tmp_path):
    gateway = make_gateway(f"observability: {{access_log: {{file: {tmp_path}/access.log}}}}")
    context = finished(gateway.snapshot.config)
    context.notes.clear()
    find(gateway).on_request(Request({b"user-agent": [b"ua/1"], b"referer": [b"http://r/"]}), context)
    assert context.notes["client"] == (b"HTTP/1.1", b"http://r/", b"ua/1")
    plain = make_gateway()
    context = finished(plain.snapshot.config)
    context.notes.clear()
    find(plain).on_request(Request({b"user-agent": [b"ua/1"]}), context)
    assert "client" not in context.notes
    as_json = make_gateway(f"observability: {{access_log: {{file: {tmp_path}/access.log, format: json}}}}")
    context = finished(as_json.snapshot.config)
    context.notes.clear()
    find(as_json).on_request(Request({b"user-agent": [b"ua/1"]}), context)
    assert "client" not in context.notes  # JSON lines have no user agent: not recorded
    assert find(as_json).access_log.file_format == "json"
    assert find(as_json).stats()["access_log"]["format"] == "json"
    assert find(as_json).access_log.file._batch_size == 64 * 1024


def test_logged_request_headers():
    text = CONFIG.replace(
        "{name: orders-api, match: {path_prefix: /orders}, service: orders}",
        "{name: orders-api, match: {path_prefix: /orders}, service: orders,"
        " auth: {methods: [api_key], api_key: {header: My-Key}}}",
    )
    text += "consumers: [{name: alice, api_keys: [k-123]}]\n"
    text += "observability: {access_log: {headers: [User-Agent, Host, user-agent, X-Forwarded-For, My-Key]}}\n"
    gateway = Gateway(Clock(), parse_config(text, "gw.yaml"))
    assert settings_of(gateway.snapshot.config).access_log.headers == (
        b"user-agent", b"host", b"x-forwarded-for", b"my-key",
    )
    context = finished(gateway.snapshot.config)
    context.notes.clear()
    request = Request(
        {
            b"user-agent": [b"curl/8 \xff"],
            b"x-forwarded-for": [b"192.0.2.1", b"198.51.100.2"],
            b"my-key": [b"k-123"],
        }
    )
    find(gateway).on_request(request, context)
    # Absent headers are None; several lines are joined (RFC 9110, 5.3);
    # a header a route takes an API key from is redacted.
    assert context.notes["request_headers"] == {
        "user-agent": "curl/8 \\xff",
        "host": None,
        "x-forwarded-for": "192.0.2.1, 198.51.100.2",
        "my-key": "REDACTED",
    }
    assert "client" not in context.notes  # no combined file
    # A reload moves the redaction with the route's API-key header.
    moved = text.replace("api_key: {header: My-Key}", "api_key: {header: Other-Key}")
    gateway.apply(parse_config(moved, "gw.yaml"))
    context.notes.clear()
    find(gateway).on_request(request, context)
    assert context.notes["request_headers"]["my-key"] == "k-123"
    plain = make_gateway()
    context = finished(plain.snapshot.config)
    context.notes.clear()
    find(plain).on_request(Request({b"user-agent": [b"ua/1"]}), context)
    assert "request_headers" not in context.notes


def test_reload_applies_settings_and_counts_a_generation():
    gateway = make_gateway()
    observe = find(gateway)
    assert gateway.metrics.config_generation == 1
    gateway.apply(
        parse_config(
            with_section("observability: {access_log: {enabled: false, redact_query: [q]}, tracing: {enabled: false}}"),
            "gw.yaml",
        )
    )
    assert gateway.metrics.config_generation == 2
    assert not observe.access_log.enabled and "q" in observe.access_log.sensitive
    context = finished(gateway.snapshot.config)
    context.notes.clear()
    observe.on_request(Request({b"traceparent": [TRACEPARENT]}), context)
    assert "trace" not in context.notes and "request_headers" not in context.notes
    gateway.apply(parse_config(with_section("observability: {access_log: {headers: [Referer]}}"), "gw.yaml"))
    context = finished(gateway.snapshot.config)
    context.notes.clear()
    observe.on_request(Request({b"referer": [b"http://r/"]}), context)
    assert context.notes["request_headers"] == {"referer": "http://r/"}


def test_a_new_access_log_file_or_format_waits_for_a_restart(tmp_path):
    from gateway.reload import restart_only_changes

    section = "observability: {access_log: {file: %s, format: %s}}"
    gateway = make_gateway(section % (tmp_path / "a.log", "combined"))
    observe = find(gateway)
    old = gateway.snapshot.config
    new = parse_config(with_section(section % (tmp_path / "a.log", "json")), "gw.yaml")
    # A new format on the same file would mix two formats in it.
    assert restart_only_changes(old, new) == ["observability.access_log.format"]
    gateway.apply(new)
    assert observe.access_log.file_format == "combined"
    moved = parse_config(with_section(section % (tmp_path / "b.log", "json")), "gw.yaml")
    assert restart_only_changes(new, moved) == ["observability.access_log.file"]
    assert restart_only_changes(new, parse_config(CONFIG, "gw.yaml")) == [
        "observability.access_log.file",
        "observability.access_log.format",
    ]
    # Without a file before or after, its buffering settings do not matter.
    quicker = parse_config(with_section("observability: {access_log: {flush_interval: 100ms}}"), "gw.yaml")
    assert restart_only_changes(parse_config(CONFIG, "gw.yaml"), quicker) == []


def test_otlp_without_the_extra_is_a_warning(monkeypatch):
    import gateway.observe as observe_module

    monkeypatch.setattr(observe_module, "otlp_available", lambda: False)
    gateway = make_gateway('observability: {tracing: {otlp: {endpoint: "http://127.0.0.1:4318/v1/traces"}}}')
    assert find(gateway).exporter is None


def test_auth_query_argument_is_redacted():
    gateway = make_gateway(
        """
consumers: [{name: alice, api_keys: [k-123]}]
observability: {access_log: {redact_query: [extra]}}
"""
    )
    assert find(gateway).access_log.sensitive == SENSITIVE_QUERY_PARAMETERS | {"extra"}
    text = CONFIG.replace(
        "{name: orders-api, match: {path_prefix: /orders}, service: orders}",
        "{name: orders-api, match: {path_prefix: /orders}, service: orders,"
        " auth: {methods: [api_key], api_key: {header: X-API-Key, query: My-Key}}}",
    )
    gateway = Gateway(Clock(), parse_config(text + "consumers: [{name: alice, api_keys: [k-123]}]\n"))
    assert "my-key" in find(gateway).access_log.sensitive
