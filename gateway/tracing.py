"""
W3C Trace Context (U{https://www.w3.org/TR/trace-context/}) for the gateway,
and an optional OTLP span exporter.

Each request continues the client's trace when its C{traceparent} is valid,
or starts a new one otherwise. The gateway is one hop: it gets a span ID of
its own, which the backend receives as the parent in C{traceparent}; the
client's C{tracestate} is passed on unchanged when the C{traceparent} was
valid, and dropped when a new trace was started (as the spec requires).

The parsing here is pure: no I/O, no clock. L{OtlpExporter} is the only
part that does I/O, and only when the C{opentelemetry} extra is installed
and an endpoint is configured.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence

from twisted.application.service import Service
from twisted.logger import Logger

_log = Logger()

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"

#: Version 00: version-traceid-parentid-flags, lower-case hex only.
_TRACEPARENT = re.compile(rb"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
_OWS = b" \t"
#: The only flag version 00 defines; the others are not passed on.
SAMPLED = 0x01

#: A tracestate list member (key=value), keys simple or multi-tenant.
_TRACESTATE_MEMBER = re.compile(
    rb"^(?:[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
    rb"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]$"
)
#: The most list members a tracestate may hold.
MAX_TRACESTATE_MEMBERS = 32


class TraceContext:
    """
    The trace context of one request through the gateway.

    @ivar trace_id: 32 lower-case hex digits.
    @ivar span_id: the gateway's own span ID for this request, 16 hex digits.
    @ivar parent_id: the caller's span ID, or None when the trace started here.
    @ivar flags: the trace flags (bit 0: sampled).
    @ivar tracestate: the C{tracestate} value to pass on, or None for none.
    """

    __slots__ = ("trace_id", "span_id", "parent_id", "flags", "tracestate")

    def __init__(
        self,
        trace_id: str,
        span_id: str,
        parent_id: Optional[str],
        flags: int,
        tracestate: Optional[bytes] = None,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.flags = flags
        self.tracestate = tracestate

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def traceparent(self) -> bytes:
        """The C{traceparent} for the backend: this trace, the gateway's span."""
        return b"00-%s-%s-%02x" % (
            self.trace_id.encode("ascii"), self.span_id.encode("ascii"), self.flags
        )

    def __repr__(self) -> str:
        return (
            f"TraceContext(trace_id={self.trace_id!r}, span_id={self.span_id!r}, "
            f"parent_id={self.parent_id!r}, flags={self.flags:#04x}, tracestate={self.tracestate!r})"
        )


def new_trace_id() -> str:
    """A random, non-zero trace ID: 32 hex digits."""
    while True:
        value = os.urandom(16).hex()
        if value != "0" * 32:
            return value


def new_span_id() -> str:
    """A random, non-zero span ID: 16 hex digits."""
    while True:
        value = os.urandom(8).hex()
        if value != "0" * 16:
            return value


def parse_traceparent(values: Optional[Sequence[bytes]]) -> Optional[tuple[str, str, int]]:
    """
    Parse the C{traceparent} header fields of a request.

    Follows the spec's rules: exactly one field; version C{ff} is invalid;
    version 00 must be exactly 55 characters; a later version may carry
    more after a C{-}, and is read as version 00; all-zero trace or parent
    IDs and upper-case hex are invalid.

    @param values: the raw field values (C{Headers.getRawHeaders}), or None.
    @return: C{(trace_id, parent_id, flags)} with flags reduced to those
        version 00 defines, or None when absent or invalid.
    """
    if not values or len(values) != 1:
        return None
    value = values[0].strip(_OWS)
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_id, parent_id, flags = match.groups()
    if version == b"ff":
        return None
    if version == b"00":
        if len(value) != 55:
            return None
    elif len(value) > 55 and value[55:56] != b"-":
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id.decode("ascii"), parent_id.decode("ascii"), int(flags, 16) & SAMPLED


def parse_tracestate(values: Optional[Sequence[bytes]]) -> Optional[bytes]:
    """
    Validate the C{tracestate} header fields of a request.

    Several fields are joined with commas, as HTTP allows; empty list
    members are dropped.

    @return: the value to pass on, or None when absent, empty or invalid
        (more than 32 members, a malformed member, a repeated key): the
        spec lets a vendor discard a tracestate it cannot parse.
    """
    if not values:
        return None
    members = []
    keys = set()
    for value in values:
        for member in value.split(b","):
            member = member.strip(_OWS)
            if not member:
                continue
            if _TRACESTATE_MEMBER.match(member) is None:
                return None
            key = member.split(b"=", 1)[0]
            if key in keys:
                return None
            keys.add(key)
            members.append(member)
    if not members or len(members) > MAX_TRACESTATE_MEMBERS:
        return None
    return b",".join(members)


def continue_or_start(
    traceparent: Optional[Sequence[bytes]],
    tracestate: Optional[Sequence[bytes]],
    sample_new: bool = True,
) -> TraceContext:
    """
    The trace context of a request: the caller's trace if its
    C{traceparent} is valid, a new one otherwise; either way with a new
    span ID for the gateway.

    @param traceparent: the request's raw C{traceparent} field values.
    @param tracestate: the request's raw C{tracestate} field values.
    @param sample_new: set the sampled flag on traces started here.
    """
    parsed = parse_traceparent(traceparent)
    if parsed is None:
        return TraceContext(new_trace_id(), new_span_id(), None, SAMPLED if sample_new else 0)
    trace_id, parent_id, flags = parsed
    return TraceContext(trace_id, new_span_id(), parent_id, flags, parse_tracestate(tracestate))


def upstream_trace_headers(trace: TraceContext) -> list:
    """
    The C{(name, value)} pairs to set on the forwarded request
    (C{context.upstream_headers}): the new C{traceparent}, and the
    C{tracestate} to pass on (joined into one field) if any. A client's
    C{tracestate} that must not go on (a new trace, or malformed) is to be
    removed (C{context.upstream_remove}).
    """
    headers = [(TRACEPARENT, trace.traceparent())]
    if trace.tracestate is not None:
        headers.append((TRACESTATE, trace.tracestate))
    return headers


# --- optional OTLP export ------------------------------------------------------


def otlp_available() -> bool:
    """Whether the C{opentelemetry} extra (SDK and OTLP/HTTP exporter) is installed."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return False
    return True


def _nanoseconds(seconds: float) -> int:
    """Epoch seconds as integer nanoseconds, without float rounding at 1e18."""
    whole = int(seconds)
    return whole * 1_000_000_000 + round((seconds - whole) * 1e9)


class OtlpExporter(Service):
    """
    Exports one SERVER span per sampled request over OTLP/HTTP (protobuf).

    The span carries the request's trace ID, the gateway's span ID, the
    caller's span as parent, the request's start and end times and a few
    attributes (method, route, path, status, backend, request ID). Spans
    are queued to the SDK's C{BatchSpanProcessor}, which sends them from its
    own thread: a slow or absent collector never blocks the reactor, and a
    full queue drops spans (the SDK logs it).

    Nothing else is exported: no metrics or logs over OTLP, no spans for
    individual retries or filters.

    @param endpoint: the collector's traces URL, e.g.
        C{http://127.0.0.1:4318/v1/traces}.
    @param service_name: the C{service.name} resource attribute.
    @param headers: extra HTTP headers for the collector (e.g. an API key).
    @param timeout: seconds for one export request.
    @raise ImportError: the C{opentelemetry} extra is not installed.
    """

    name = "otlp-exporter"

    def __init__(
        self,
        endpoint: str,
        service_name: str = "txgateway",
        headers: Optional[dict] = None,
        timeout: float = 10.0,
        exporter=None,
    ) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        from gateway import __version__

        self.endpoint = endpoint
        self._headers = headers
        self._timeout = timeout
        self._exporter = exporter
        self._processor = None
        self._resource = Resource.create({"service.name": service_name, "service.version": __version__})
        self._scope = InstrumentationScope("txgateway", __version__)
        self.exported = 0

    def startService(self) -> None:
        # The processor starts a thread: not before twistd has daemonized.
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        exporter = self._exporter
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(
                endpoint=self.endpoint, headers=self._headers or None, timeout=self._timeout
            )
        self._processor = BatchSpanProcessor(
            exporter, schedule_delay_millis=1000, export_timeout_millis=self._timeout * 1000
        )
        super().startService()

    def observe(self, context) -> None:
        """A request observer: export the request's span if it is sampled."""
        trace = context.notes.get("trace")
        if trace is None or not trace.sampled or self._processor is None:
            return
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
        from opentelemetry.trace.status import Status, StatusCode

        flags = TraceFlags(trace.flags)
        span_context = SpanContext(int(trace.trace_id, 16), int(trace.span_id, 16), False, flags)
        parent = None
        if trace.parent_id is not None:
            parent = SpanContext(int(trace.trace_id, 16), int(trace.parent_id, 16), True, flags)
        route = context.route.name if context.route is not None else None
        method = context.method.decode("ascii", "replace")
        attributes = {
            "http.request.method": method,
            "url.path": context.path.decode("utf-8", "replace"),
            "http.response.status_code": context.status,
            "gateway.request_id": context.request_id,
        }
        if route is not None:
            attributes["http.route"] = route
        if context.backend is not None:
            attributes["gateway.backend"] = context.backend.url
        if context.service is not None:
            attributes["gateway.service"] = context.service
        status = Status(StatusCode.ERROR) if context.status >= 500 else Status(StatusCode.UNSET)
        span = ReadableSpan(
            name=f"{method} {route}" if route else method,
            context=span_context,
            parent=parent,
            resource=self._resource,
            attributes=attributes,
            kind=SpanKind.SERVER,
            status=status,
            start_time=_nanoseconds(context.started),
            end_time=_nanoseconds(context.ended),
            instrumentation_scope=self._scope,
        )
        self._processor.on_end(span)
        self.exported += 1

    def stopService(self):
        super().stopService()
        processor, self._processor = self._processor, None
        if processor is None:
            return None
        # Sends what is queued, from a thread: a collector that is down
        # delays the shutdown (up to the export timeout), never blocks it.
        from twisted.internet.threads import deferToThread

        d = deferToThread(processor.shutdown)
        d.addErrback(lambda f: _log.failure("OTLP exporter shutdown failed", f))
        return d
