"""
The proxy resource: the request pipeline from a client request to a
streamed backend response.

Steps, in order: request ID, route match, backend choice, forwarding,
response streaming. Every failure becomes a JSON answer
C{{"error": ..., "request_id": ...}} with the right status (404 no route,
413 body too large, 502 backend failed, 503 no backend, 504 timed out);
never a traceback, never a hang.
"""

from __future__ import annotations

import json
from typing import Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from gateway.config import Backend, Route
from gateway.cors import is_preflight
from gateway.forwarding import (
    BodyRelay,
    UpstreamError,
    copy_response_headers,
    ended_cleanly,
    upstream_headers,
)
from gateway.pipeline import Answer
from gateway.requestid import REQUEST_ID_HEADER, new_request_id, request_id as choose_request_id
from gateway.routing import host_of, normalise_path, split_target
from gateway.state import Gateway, ServiceRuntime

_log = Logger()

_NO_BODY_STATUSES = frozenset([204, 304])

#: C{context.notes} key set when a CORS preflight matched its route by the
#: method it asks about (C{Access-Control-Request-Method}), not by OPTIONS.
PREFLIGHT_BY_REQUESTED_METHOD = "preflight_by_requested_method"


class RequestContext:
    """
    What the gateway learned about one request, for logs and metrics.

    Times are in seconds from the gateway's reactor clock.
    """

    __slots__ = (
        "request_id", "method", "path", "client_ip", "route", "service", "backend",
        "status", "started", "upstream_started", "upstream_ended", "ended",
        "bytes_in", "bytes_out", "error", "consumer", "retries", "cache",
        "query", "host", "snapshot", "notes",
        "upstream_headers", "upstream_remove", "upstream_path",
    )

    def __init__(self, request_id: str, method: bytes, path: bytes, client_ip: str, started: float):
        self.request_id = request_id
        self.method = method
        self.path = path
        self.client_ip = client_ip
        self.started = started
        self.route: Optional[Route] = None
        self.service: Optional[str] = None
        self.backend: Optional[Backend] = None
        self.status = 0
        self.upstream_started = 0.0
        self.upstream_ended = 0.0
        self.ended = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.error: Optional[str] = None
        self.consumer: Optional[str] = None
        self.retries = 0
        self.cache: Optional[str] = None
        #: The query string, with its C{?}, or C{b""}.
        self.query = b""
        #: The client's C{Host} header value, or C{b""}.
        self.host = b""
        #: The L{gateway.state.Snapshot} this request is served from.
        self.snapshot = None
        #: Per-request state of filters, by filter name.
        self.notes: dict = {}
        #: Headers request filters add to the forwarded request:
        #: C{(name, value)} byte pairs, see L{apply_upstream_headers}.
        self.upstream_headers: list = []
        #: Lower-case header names request filters remove from the
        #: forwarded request, see L{apply_upstream_headers}.
        self.upstream_remove: set = set()
        #: The path (without query) to forward, set by a filter that
        #: rewrites it; None forwards L{route_path}C{(route, path)}.
        self.upstream_path: Optional[bytes] = None


def route_path(route: Route, path: bytes) -> bytes:
    """
    The path a route forwards a request for C{path} to: C{path} itself, or
    without the route's prefix when the route strips it (C{b"/"} at least).

    @param path: the normalised request path, without the query.
    """
    if route.strip_prefix and route.match.path_prefix != "/":
        path = path[len(route.match.path_prefix.encode("utf-8")):] or b"/"
        if not path.startswith(b"/"):
            path = b"/" + path
    return path


def apply_upstream_headers(headers, remove, extra) -> None:
    """
    Apply the header changes request filters asked for to the headers of
    the forwarded request, after the gateway has built them.

    First every header named in C{remove} is removed; then the pairs of
    C{extra}, in order: the first pair of a name replaces any header of
    that name, later pairs of the same name add values to it.

    @param headers: the upstream L{Headers}, changed in place.
    @param remove: lower-case header names (C{context.upstream_remove}).
    @param extra: C{(name, value)} byte pairs (C{context.upstream_headers}).
    """
    for name in remove:
        headers.removeHeader(name)
    seen = set()
    for name, value in extra:
        key = name.lower()
        if key in seen:
            headers.addRawHeader(name, value)
        else:
            seen.add(key)
            headers.setRawHeaders(name, [value])


class ProxyResource(Resource):
    """
    The leaf resource serving every client request on the main listener.

    @param gateway: supplies the config snapshot, the service runtimes and
        the request filters (L{gateway.pipeline}).
    """

    isLeaf = True

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self._gateway = gateway
        self._clock = gateway.reactor

    # -- the pipeline ------------------------------------------------------

    def render(self, request: server.Request):
        snapshot = self._gateway.snapshot
        headers = request.requestHeaders
        raw_id = choose_request_id(headers)
        request_id = raw_id.decode("ascii")
        request.responseHeaders.setRawHeaders(REQUEST_ID_HEADER, [raw_id])
        request.responseHeaders.removeHeader(b"server")
        address = request.getClientAddress()
        client_ip = getattr(address, "host", "") or ""
        path, query = split_target(request.uri)
        path = normalise_path(path)
        context = RequestContext(request_id, request.method, path, client_ip, self._clock.seconds())
        context.query = query
        context.snapshot = snapshot
        request.notifyFinish().addBoth(self._finished, request, context)

        host_header = (headers.getRawHeaders(b"host") or [b""])[0]
        context.host = host_header

        def header(name: bytes) -> Optional[bytes]:
            values = headers.getRawHeaders(name)
            return values[0] if values else None

        route = snapshot.router.match(request.method, path, host_of(host_header), header)
        if route is None and is_preflight(request.method, headers):
            # A CORS preflight asks about the method it names: a route
            # taking only that method must see it (the CORS filter refuses
            # it when that route has no CORS policy).
            requested = headers.getRawHeaders(b"access-control-request-method")[0]
            route = snapshot.router.match(
                requested.strip().upper(), path, host_of(host_header), header
            )
            if route is not None:
                context.notes[PREFLIGHT_BY_REQUESTED_METHOD] = True
        if route is None:
            context.error = "no route"
            self._answer(request, context, Answer.error_(404, "no route matches the request"))
            return server.NOT_DONE_YET
        context.route = route
        context.service = route.service
        self._run_filters(None, request, context, 0)
        return server.NOT_DONE_YET

    def _run_filters(self, _, request, context: RequestContext, index: int) -> None:
        filters = self._gateway.filters
        while index < len(filters):
            on_request = getattr(filters[index], "on_request", None)
            index += 1
            if on_request is None:
                continue
            try:
                result = on_request(request, context)
            except Exception:
                self._filter_failed(Failure(), request, context)
                return
            if result is None:
                continue
            if isinstance(result, Deferred):
                result.addCallback(self._filter_result, request, context, index)
                result.addErrback(self._filter_failed, request, context)
                return
            self._answer(request, context, result)
            return
        self._forward(request, context)

    def _filter_result(self, result, request, context: RequestContext, index: int) -> None:
        if request._disconnected:
            return
        if result is None:
            self._run_filters(None, request, context, index)
        else:
            self._answer(request, context, result)

    def _filter_failed(self, failure: Failure, request, context: RequestContext) -> None:
        _log.failure(
            "request filter failed", failure, request_id=context.request_id
        )
        context.error = "internal error"
        if not request._disconnected:
            self._answer(request, context, Answer.error_(500, "internal gateway error"))

    def _response_filters(self, request, context: RequestContext) -> None:
        for f in self._gateway.filters:
            on_response = getattr(f, "on_response", None)
            if on_response is not None:
                try:
                    on_response(request, context)
                except Exception:
                    _log.failure("response filter failed", request_id=context.request_id)

    def _answer(self, request, context: RequestContext, answer: Answer) -> None:
        """Answer the client directly (not from a backend)."""
        if request._disconnected:
            return
        if request.startedWriting:
            request.channel.transport.abortConnection()
            return
        if answer.body is None:
            body = json.dumps({"error": answer.error, "request_id": context.request_id}).encode("utf-8")
            request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
        else:
            body = answer.body
        request.setResponseCode(answer.status)
        for name, value in answer.headers:
            request.responseHeaders.addRawHeader(name, value)
        if answer.status not in _NO_BODY_STATUSES:
            request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        self._response_filters(request, context)
        context.bytes_out = len(body)
        request.write(body)
        request.finish()

    # -- forwarding --------------------------------------------------------

    def _forward(self, request, context: RequestContext) -> None:
        route = context.route
        runtime = context.snapshot.services[route.service]
        headers = request.requestHeaders
        path = context.upstream_path
        if path is None:
            path = route_path(route, context.path)

        backend = runtime.balancer.pick(runtime.available(), context.client_ip.encode("ascii", "replace"))
        if backend is None:
            context.error = "no backend available"
            self._answer(
                request,
                context,
                Answer.error_(503, "no healthy backend", ((b"Retry-After", b"1"),)),
            )
            return
        context.backend = backend

        forwarded = upstream_headers(
            headers,
            client_ip=context.client_ip,
            proto=b"https" if request.isSecure() else b"http",
            host=context.host,
            preserve_host=route.preserve_host,
            backend=backend,
        )
        forwarded.setRawHeaders(REQUEST_ID_HEADER, [context.request_id.encode("ascii")])
        apply_upstream_headers(forwarded, context.upstream_remove, context.upstream_headers)
        body = None
        if headers.hasHeader(b"content-length") or headers.hasHeader(b"transfer-encoding"):
            body = request.content.getvalue()
            context.bytes_in = len(body)

        context.upstream_started = self._clock.seconds()
        sent = runtime.forwarder.request(
            request.method,
            backend,
            path + context.query,
            forwarded,
            body,
            runtime.service.timeouts.response,
        )
        state = {"relay": None}

        def client_gone(failure: Failure) -> None:
            # The client went away: stop the backend request or body.
            if not sent.called:
                sent.cancel()
            elif state["relay"] is not None and state["relay"].transport is not None:
                state["relay"].transport.stopProducing()

        request.notifyFinish().addErrback(client_gone)
        sent.addCallbacks(
            self._respond,
            self._upstream_failed,
            callbackArgs=(request, context, runtime, backend, state),
            errbackArgs=(request, context),
        )

    def _respond(self, response, request, context, runtime: ServiceRuntime, backend, state):
        context.upstream_ended = self._clock.seconds()
        context.status = response.code
        if request._disconnected:
            response.deliverBody(_Discard())
            runtime.forwarder.limits.release(backend)
            return
        request.setResponseCode(response.code, response.phrase)
        copy_response_headers(response, request.responseHeaders, request.method)
        self._response_filters(request, context)
        relay = state["relay"] = BodyRelay(request)
        response.deliverBody(relay)

        def body_ended(_: None) -> None:
            reason = relay.reason
            runtime.forwarder.limits.release(backend)
            context.bytes_out = relay.sent
            if request._disconnected:
                return
            if ended_cleanly(reason):
                request.finish()
            else:
                context.error = "backend response body failed"
                _log.info(
                    "backend {backend} failed mid-response: {reason}",
                    backend=backend.url,
                    reason=reason.getErrorMessage(),
                    request_id=context.request_id,
                )
                request.channel.transport.abortConnection()

        relay.done.addCallback(body_ended)

    def _upstream_failed(self, failure: Failure, request, context) -> None:
        context.upstream_ended = self._clock.seconds()
        if request._disconnected:
            return
        if failure.check(UpstreamError):
            error = failure.value
            context.error = error.reason
            self._answer(request, context, Answer.error_(error.status, error.reason))
            return
        _log.failure("unexpected forwarding failure", failure, request_id=context.request_id)
        context.error = "internal error"
        self._answer(request, context, Answer.error_(500, "internal gateway error"))

    def _finished(self, result, request, context: RequestContext) -> None:
        context.ended = self._clock.seconds()
        if isinstance(result, Failure) and not request.startedWriting:
            context.status = 499  # the client closed the connection first
        else:
            context.status = request.code
        for observer in self._gateway.request_observers:
            try:
                observer(context)
            except Exception:
                _log.failure("request observer failed", request_id=context.request_id)
        return None


class _Discard:
    """A body protocol that throws the body away."""

    def makeConnection(self, transport) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason) -> None:
        pass


class GatewayRequest(server.Request):
    """
    A request whose body is held in memory up to the configured limit
    (C{limits.max_request_body}); a larger body is refused with 413 and the
    connection is closed without reading the rest.
    """

    _too_large = False

    def _limit(self) -> int:
        return self.channel.site.gateway.snapshot.config.limits.max_request_body

    def gotLength(self, length) -> None:
        import io

        self.content = io.BytesIO()
        if length is not None and length > self._limit():
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large:
            return
        self.content.write(data)
        if self.content.tell() > self._limit():
            self._refuse()

    def _refuse(self) -> None:
        self._too_large = True
        self.content = _NullFile()
        refuse_connection(
            self.channel.transport, 413, "request body too large", self.requestHeaders
        )

    def requestReceived(self, command, path, version) -> None:
        if self._too_large:
            return
        super().requestReceived(command, path, version)


_PHRASES = {
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}


def refuse_connection(transport, status: int, message: str, headers=None) -> None:
    """
    Answer a request the channel will not read to its end with a JSON
    error, then close the connection: the rest of what the client sends
    (body, headers) is never read, so the connection cannot be reused.

    @param transport: the client connection.
    @param status: one of 408, 413, 414, 431.
    @param message: the C{error} of the JSON body.
    @param headers: the request headers received so far (their valid
        C{X-Request-Id} is kept), or None.
    """
    raw_id = choose_request_id(headers) if headers is not None else new_request_id().encode("ascii")
    request_id = raw_id.decode("ascii")
    body = json.dumps({"error": message, "request_id": request_id}).encode("utf-8")
    transport.write(
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
        b"X-Request-Id: %s\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
        % (status, _PHRASES[status], raw_id, len(body), body)
    )
    transport.loseConnection()
    peer = transport.getPeer()
    _log.info(
        "refused a request from {client} with {status}: {reason}",
        client=getattr(peer, "host", str(peer)),
        status=status,
        reason=message,
        request_id=request_id,
    )


class GatewayChannel(http.HTTPChannel):
    """
    The main listener's HTTP/1.1 channel, enforcing the configured
    C{limits} (read from the gateway's snapshot when the connection opens):

      - more than C{max_header_count} header fields, or more than
        C{max_header_bytes} of request line and fields: 431 (414 when the
        request line alone is too long), where Twisted would send a bare 400;
      - C{client_header_timeout}: the headers of a request must arrive
        within this many seconds of its first byte, or the client gets 408
        (a slowloris client trickling bytes would never trip the idle
        timeout, which each byte resets);
      - C{client_idle_timeout}: Twisted's idle timeout (C{timeOut}).

    Each refusal is answered with L{refuse_connection}: a JSON body with a
    request ID, then the connection is closed.
    """

    _header_timeout: Optional[float] = None
    _header_call = None

    def connectionMade(self) -> None:
        limits = self.site.gateway.snapshot.config.limits
        self.maxHeaders = limits.max_header_count
        self.totalHeadersSize = limits.max_header_bytes
        # LineReceiver drops a longer line (one header, or the request line)
        # with no answer at all; lineLengthExceeded answers instead.
        self.MAX_LENGTH = limits.max_header_bytes
        self.timeOut = limits.client_idle_timeout or None
        self._header_timeout = limits.client_header_timeout or None
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        if (
            self._header_call is None
            and self._header_timeout is not None
            and self.line_mode
            and not self._handlingRequest
        ):
            self._header_call = self.callLater(self._header_timeout, self._headers_too_slow)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._too_large(first_line=self._receivedHeaderSize == 0)
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._too_large(first_line=self._receivedHeaderSize == 0)

    def headerReceived(self, line: bytes) -> bool:
        if self._receivedHeaderCount >= self.maxHeaders:
            self._refuse(431, "too many request header fields")
            return False
        return super().headerReceived(line)

    def allHeadersReceived(self) -> None:
        self._cancel_header_timeout()
        super().allHeadersReceived()

    def connectionLost(self, reason) -> None:
        self._cancel_header_timeout()
        super().connectionLost(reason)

    def _cancel_header_timeout(self) -> None:
        call, self._header_call = self._header_call, None
        if call is not None and call.active():
            call.cancel()

    def _headers_too_slow(self) -> None:
        self._header_call = None
        if self.transport.disconnecting:
            return
        self._refuse(408, "request headers not received in time")

    def _too_large(self, first_line: bool) -> None:
        if first_line:
            self._refuse(414, "request line too long")
        else:
            self._refuse(431, "request header fields too large")

    def _refuse(self, status: int, message: str) -> None:
        self._cancel_header_timeout()
        headers = self.requests[-1].requestHeaders if self.requests else None
        # Stop parsing: nothing more this client sends is read.
        self.dataReceived = self.lineReceived = lambda *args: None
        refuse_connection(self.transport, status, message, headers)


def _channel_factory(site) -> http._GenericHTTPChannelProtocol:
    # What Site.protocol normally does, with our channel inside.
    return http._GenericHTTPChannelProtocol(GatewayChannel())


class _NullFile:
    def write(self, data: bytes) -> None:
        pass

    def tell(self) -> int:
        return 0

    def seek(self, *args) -> None:
        pass

    def read(self, *args) -> bytes:
        return b""

    def close(self) -> None:
        pass


class GatewaySite(server.Site):
    """
    The site of the main listener: every request goes to the proxy.

    @ivar gateway: the L{Gateway} whose snapshot requests are served from.
    """

    requestFactory = GatewayRequest
    protocol = _channel_factory
    noisy = False

    def __init__(self, gateway: Gateway, **kwargs) -> None:
        super().__init__(ProxyResource(gateway), **kwargs)
        self.gateway = gateway

    def log(self, request) -> None:
        """Access logging is done by the gateway's request observers."""
