"""
Observability wiring: the C{observability:} config section, and the
C{observe} request filter that ties the access log (L{gateway.accesslog}),
the dashboard feed (L{gateway.feed}), trace context
(L{gateway.tracing}) and metrics (L{gateway.metrics}) to the gateway.

The filter runs first (order 5). For each routed request it continues or
starts the W3C trace and asks the forwarder to send the backend a
C{traceparent} naming the gateway's span; it registers the access log,
the dashboard feed and the optional OTLP exporter as request observers;
its C{service} runs their timers and threads. Its C{on_unrouted} records
the request headers the access log shows for requests no route matches
too.

The config section, all keys optional::

    observability:
      access_log:
        enabled: true          # the structured event per request
        file: /var/log/txgateway/access.log   # a line per request; none by default
        format: combined       # the file's lines: combined (log format) or json (JSON Lines)
        flush_interval: 1s     # the file is written in batches, from a thread,
        batch: 64KiB           # or as soon as this many bytes wait (0: only every flush_interval)
        max_buffer: 8MiB       # lines waiting for the disk beyond this are dropped
        redact_query: [session_id]   # more query parameters to redact
        headers: [User-Agent, Referer, Host]   # request headers to log (not in the combined file)
      dashboard:
        enabled: true
        recent: 100            # latest requests kept and shown
        history: 300           # one-second points kept (5 minutes)
        client_buffer: 256KiB  # per browser, then the oldest events are dropped
        max_clients: 16
      tracing:
        enabled: true          # false: traceparent passes through untouched
        sample_new: true       # traces started here are flagged sampled
        otlp:                  # needs the opentelemetry extra
          endpoint: http://127.0.0.1:4318/v1/traces
          service_name: txgateway
          headers: {authorization: "Bearer ..."}
          timeout: 10s

A reload applies C{access_log.enabled}, C{access_log.redact_query},
C{access_log.headers}, C{tracing.enabled} and C{tracing.sample_new}; the other keys take effect at
the next start.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
from twisted.application.service import MultiService
from twisted.logger import Logger

from gateway.accesslog import (
    FILE_FORMATS,
    REDACTED,
    SENSITIVE_HEADERS,
    SENSITIVE_QUERY_PARAMETERS,
    AccessLog,
    AccessLogFile,
)
from gateway.config import (
    Extension,
    ParseContext,
    Section,
    Where,
    boolean,
    header_name,
    integer,
    mapping_items,
    one_of,
    positive_duration,
    register,
    sequence,
    size,
    string,
    string_list,
)
from gateway.feed import DashboardResource, RequestFeed
from gateway.pipeline import register_filter
from gateway.tracing import TRACESTATE, OtlpExporter, continue_or_start, otlp_available, upstream_trace_headers

_log = Logger()


@attrs.frozen
class AccessLogSettings:
    """
    @ivar enabled: emit the structured access event of each request.
    @ivar file: the access-log file, or None for none.
    @ivar format: its lines: C{"combined"} (the combined log format) or
        C{"json"} (JSON Lines of the access event's fields).
    @ivar flush_interval: seconds between writes of the file.
    @ivar batch: bytes waiting that start a write before the interval
        ends (0: none).
    @ivar max_buffer: bytes held for the file before lines are dropped.
    @ivar redact_query: query parameter names (lower case) whose values
        are redacted, including the defaults.
    @ivar headers: request header names (lower-case C{bytes}) whose values
        the access event and the JSON Lines file carry, in
        C{request_headers}; none of L{SENSITIVE_HEADERS}.
    """

    enabled: bool = True
    file: Optional[str] = None
    format: str = "combined"
    flush_interval: float = 1.0
    batch: int = 64 << 10
    max_buffer: int = 8 << 20
    redact_query: frozenset = SENSITIVE_QUERY_PARAMETERS
    headers: tuple = ()


@attrs.frozen
class DashboardSettings:
    enabled: bool = True
    recent: int = 100
    history: int = 300
    client_buffer: int = 256 * 1024
    max_clients: int = 16


@attrs.frozen
class OtlpSettings:
    endpoint: str
    service_name: str = "txgateway"
    headers: tuple = ()
    timeout: float = 10.0


@attrs.frozen
class TracingSettings:
    enabled: bool = True
    sample_new: bool = True
    otlp: Optional[OtlpSettings] = None


@attrs.frozen
class Observability:
    access_log: AccessLogSettings = AccessLogSettings()
    dashboard: DashboardSettings = DashboardSettings()
    tracing: TracingSettings = TracingSettings()


def _logged_headers(where: Where, value: Any) -> tuple:
    """
    C{access_log.headers}: header names, lower case, each once.
    @raise ConfigError: not a header name, or a header that carries
        credentials (L{SENSITIVE_HEADERS}).
    """
    names: list = []
    for w, item in sequence(where, value):
        name = header_name(w, item)
        lower = name.lower().encode("ascii")
        if lower in SENSITIVE_HEADERS:
            raise w.error(f"{name} carries credentials: the access log never records it")
        if lower not in names:
            names.append(lower)
    return tuple(names)


def _access_log(where: Where, value: Any) -> AccessLogSettings:
    section = Section(where, value)
    extra = section.take("redact_query", string_list, ())
    settings = AccessLogSettings(
        enabled=section.take("enabled", boolean, True),
        file=section.take("file", string, None),
        format=section.take("format", one_of(*FILE_FORMATS), "combined"),
        flush_interval=section.take("flush_interval", positive_duration, 1.0),
        batch=section.take("batch", size, 64 << 10),
        max_buffer=section.take("max_buffer", size, 8 << 20),
        redact_query=SENSITIVE_QUERY_PARAMETERS | {name.lower() for name in extra},
        headers=section.take("headers", _logged_headers, ()),
    )
    section.finish()
    return settings


def _dashboard(where: Where, value: Any) -> DashboardSettings:
    section = Section(where, value)
    settings = DashboardSettings(
        enabled=section.take("enabled", boolean, True),
        recent=section.take("recent", integer(1, 10000), 100),
        history=section.take("history", integer(10, 86400), 300),
        client_buffer=section.take("client_buffer", size, 256 * 1024),
        max_clients=section.take("max_clients", integer(1, 1000), 16),
    )
    section.finish()
    if settings.client_buffer < 4096:
        raise where.child("client_buffer", where.line).error("must be at least 4096 bytes")
    return settings


def _otlp(where: Where, value: Any) -> OtlpSettings:
    section = Section(where, value)
    endpoint_where = section.at("endpoint")
    endpoint = section.take("endpoint", string)
    if not endpoint.startswith(("http://", "https://")):
        raise endpoint_where.error("expected an http:// or https:// URL")
    headers = section.take(
        "headers",
        lambda w, v: tuple((str(k), string(iw, val)) for iw, k, val in mapping_items(w, v)),
        (),
    )
    settings = OtlpSettings(
        endpoint=endpoint,
        service_name=section.take("service_name", string, "txgateway"),
        headers=headers,
        timeout=section.take("timeout", positive_duration, 10.0),
    )
    section.finish()
    return settings


def _tracing(where: Where, value: Any) -> TracingSettings:
    section = Section(where, value)
    settings = TracingSettings(
        enabled=section.take("enabled", boolean, True),
        sample_new=section.take("sample_new", boolean, True),
        otlp=section.take("otlp", _otlp, None),
    )
    section.finish()
    return settings


def parse_observability(where: Where, value: Any, context: ParseContext) -> Observability:
    """The C{observability:} section. @raise ConfigError: it is invalid."""
    section = Section(where, value)
    result = Observability(
        access_log=section.take("access_log", _access_log, AccessLogSettings()),
        dashboard=section.take("dashboard", _dashboard, DashboardSettings()),
        tracing=section.take("tracing", _tracing, TracingSettings()),
    )
    section.finish()
    return result


register("top", Extension("observability", parse_observability, Observability()))


def settings_of(config) -> Observability:
    """The observability settings of a L{gateway.config.Config}."""
    return config.options.get("observability") or Observability()


def redacted_query_names(config) -> frozenset:
    """
    The query parameter names whose values the access log redacts: the
    defaults, C{access_log.redact_query}, and every query argument a
    route's auth takes an API key from (C{auth.api_key.query}), which a
    refused request still carries.
    """
    names = set(settings_of(config).access_log.redact_query)
    for route in config.routes:
        query = getattr(route.options.get("auth"), "api_key_query", None)
        if query:
            names.add(query.decode("utf-8", "replace").lower())
    return frozenset(names)


def logged_headers(config) -> tuple:
    """
    What the access log records of the request headers: C{(name, key,
    secret)} for each of C{access_log.headers}, with C{name} the header
    (lower-case C{bytes}), C{key} its name in C{request_headers} (C{str})
    and C{secret} true when a route's auth takes an API key from that
    header (C{auth.api_key.header}): its value is then logged as
    C{REDACTED}.
    """
    secret = set()
    for route in config.routes:
        auth = route.options.get("auth")
        header = getattr(auth, "api_key_header", None)
        if header and "api_key" in auth.methods:
            secret.add(header.lower())
    return tuple(
        (name, name.decode("ascii"), name in secret) for name in settings_of(config).access_log.headers
    )


class ObserveFilter:
    """
    The C{observe} request filter (order 5): trace context on the way in,
    and the owner of the access log, dashboard feed and OTLP exporter.

    @param gateway: the L{gateway.state.Gateway}; its C{metrics} and
        C{request_observers} are used.
    @ivar feed: the L{RequestFeed}, or None when the dashboard is off.
    @ivar access_log: the L{AccessLog}.
    @ivar exporter: the L{OtlpExporter}, or None.
    @ivar service: the timers and threads of all of these.
    @ivar admin_children: the admin resources, by path segment.
    """

    name = "observe"

    def __init__(self, gateway) -> None:
        self._gateway = gateway
        settings = self.settings = settings_of(gateway.snapshot.config)
        reactor = gateway.reactor
        self.service = MultiService()
        self.service.setName("observability")

        log_file = None
        if settings.access_log.file is not None:
            log_file = AccessLogFile(
                settings.access_log.file,
                reactor,
                settings.access_log.flush_interval,
                settings.access_log.max_buffer,
                settings.access_log.batch,
            )
            log_file.setServiceParent(self.service)
        self.access_log = AccessLog(
            log_file,
            redacted_query_names(gateway.snapshot.config),
            settings.access_log.enabled,
            file_format=settings.access_log.format,
        )
        gateway.request_observers.append(self.access_log)

        self.feed: Optional[RequestFeed] = None
        if settings.dashboard.enabled:
            d = settings.dashboard
            self.feed = RequestFeed(gateway, reactor, d.recent, d.history, d.client_buffer, d.max_clients)
            self.feed.service.setServiceParent(self.service)
            gateway.request_observers.append(self.feed.observe)

        self.exporter: Optional[OtlpExporter] = None
        otlp = settings.tracing.otlp
        if settings.tracing.enabled and otlp is not None:
            if otlp_available():
                self.exporter = OtlpExporter(
                    otlp.endpoint, otlp.service_name, dict(otlp.headers), otlp.timeout
                )
                self.exporter.setServiceParent(self.service)
                gateway.request_observers.append(self.exporter.observe)
            else:
                _log.warn(
                    "observability.tracing.otlp is configured but the opentelemetry extra is "
                    "not installed (pip install 'txgateway[opentelemetry]'): no spans are exported"
                )
        from gateway.admin import MetricsResource, StatsResource

        #: Put on the admin listener: C{/metrics}, C{/stats} and (with the
        #: dashboard on) C{/dashboard/}.
        self.admin_children = {
            b"metrics": MetricsResource(gateway),
            b"stats": StatsResource(gateway, self.stats),
        }
        if self.feed is not None:
            self.admin_children[b"dashboard"] = DashboardResource(self.feed)
        # Protocol, referer and user agent are in the combined format only.
        self._want_client_line = log_file is not None and settings.access_log.format == "combined"
        self._logged_headers = logged_headers(gateway.snapshot.config)
        self._tracing = settings.tracing
        metrics = getattr(gateway, "metrics", None)
        if metrics is not None:
            metrics.prepare(gateway.snapshot.config, reactor.seconds())

    def on_unrouted(self, request, context) -> None:
        """
        For a request no route matches (and, from L{on_request}, for every
        routed one): record what the access log shows of its headers, the
        combined file's protocol, referer and user agent, and
        C{access_log.headers}.
        """
        if self._want_client_line:
            headers = request.requestHeaders
            referer = headers.getRawHeaders(b"referer")
            agent = headers.getRawHeaders(b"user-agent")
            context.notes["client"] = (
                request.clientproto,
                referer[0] if referer else None,
                agent[0] if agent else None,
            )
        if self._logged_headers:
            context.notes["request_headers"] = self._request_headers(request.requestHeaders)

    def on_request(self, request, context) -> None:
        if self._want_client_line or self._logged_headers:
            self.on_unrouted(request, context)
        tracing = self._tracing
        if not tracing.enabled:
            return None
        headers = request.requestHeaders
        tracestate = headers.getRawHeaders(TRACESTATE)
        trace = continue_or_start(headers.getRawHeaders(b"traceparent"), tracestate, tracing.sample_new)
        context.notes["trace"] = trace
        context.upstream_headers.extend(upstream_trace_headers(trace))
        if trace.tracestate is None and tracestate is not None:
            context.upstream_remove.add(TRACESTATE)
        return None

    def _request_headers(self, headers) -> dict:
        logged = {}
        for name, key, secret in self._logged_headers:
            values = headers.getRawHeaders(name)
            if values is None:
                logged[key] = None
            elif secret:
                logged[key] = REDACTED
            else:
                logged[key] = b", ".join(values).decode("utf-8", "backslashreplace")
        return logged

    def stats(self) -> dict:
        """Counters of the observability machinery itself, for C{/stats}."""
        log_file = self.access_log.file
        result = {
            "access_log": {
                "file": log_file.path if log_file is not None else None,
                "format": self.access_log.file_format if log_file is not None else None,
                "written": log_file.written if log_file is not None else 0,
                "dropped": log_file.dropped if log_file is not None else 0,
            },
        }
        if self.feed is not None:
            result["dashboard"] = {
                "clients": len(self.feed.clients),
                "dropped_events": self.feed.dropped,
                "client_buffer": self.feed.client_buffer,
                "streams": [
                    {"paused": c.paused, "queued_bytes": c.queued, "dropped_events": c.dropped}
                    for c in self.feed.clients
                ],
                "totals": dict(self.feed.totals),
            }
        if self.exporter is not None:
            result["otlp"] = {"spans": self.exporter.exported}
        return result

    def reconfigure(self, snapshot) -> None:
        """After a reload: new access-log settings, metrics series of the new config."""
        new = settings_of(snapshot.config)
        self.access_log.enabled = new.access_log.enabled
        self.access_log.sensitive = redacted_query_names(snapshot.config)
        self._logged_headers = logged_headers(snapshot.config)
        self._tracing = new.tracing
        metrics = getattr(self._gateway, "metrics", None)
        if metrics is not None:
            metrics.prepare(snapshot.config, self._gateway.reactor.seconds())


register_filter(5, "observe", ObserveFilter)


def find(gateway) -> Optional[ObserveFilter]:
    """The gateway's L{ObserveFilter}, or None."""
    for f in gateway.filters:
        if isinstance(f, ObserveFilter):
            return f
    return None
