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
import os
from typing import Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from gateway.config import Backend, Route
from gateway.forwarding import (
    BodyRelay,
    UpstreamError,
    copy_response_headers,
    ended_cleanly,
    upstream_headers,
)
from gateway.pipeline import Answer
from gateway.routing import host_of, normalise_path, split_target
from gateway.state import Gateway, ServiceRuntime

_log = Logger()

_NO_BODY_STATUSES = frozenset([204, 304])
_REQUEST_ID_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")


def _valid_request_id(value: bytes) -> bool:
    return 0 < len(value) <= 128 and not value.translate(None, bytes(_REQUEST_ID_CHARS))


def new_request_id() -> str:
    """A fresh request ID: 32 hex digits from the OS's random source."""
    return os.urandom(16).hex()


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


def apply_upstream_headers(headers, extra) -> None:
    """
    Apply the headers request filters asked to send to the backend.

    A filter puts C{(name, value)} byte pairs in
    C{context.notes["upstream_headers"]} (a list); each replaces any header
    of that name the client sent, and a value of None removes the header.

    @param headers: the upstream L{Headers}, changed in place.
    @param extra: the list, or None for none.
    """
    if not extra:
        return
    for name, value in extra:
        if value is None:
            headers.removeHeader(name)
        else:
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
        incoming_id = headers.getRawHeaders(b"x-request-id")
        if incoming_id and _valid_request_id(incoming_id[0]):
            request_id = incoming_id[0].decode("ascii")
        else:
            request_id = new_request_id()
        request.responseHeaders.setRawHeaders(b"X-Request-Id", [request_id.encode("ascii")])
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
        path = context.path
        if route.strip_prefix and route.match.path_prefix != "/":
            path = path[len(route.match.path_prefix.encode("utf-8")):] or b"/"
            if not path.startswith(b"/"):
                path = b"/" + path

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
        forwarded.setRawHeaders(b"X-Request-Id", [context.request_id.encode("ascii")])
        apply_upstream_headers(forwarded, context.notes.get("upstream_headers"))
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
        body = json.dumps(
            {"error": "request body too large", "request_id": None}
        ).encode("utf-8")
        self.channel.transport.write(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.channel.transport.loseConnection()

    def requestReceived(self, command, path, version) -> None:
        if self._too_large:
            return
        super().requestReceived(command, path, version)


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
    noisy = False

    def __init__(self, gateway: Gateway, **kwargs) -> None:
        super().__init__(ProxyResource(gateway), **kwargs)
        self.gateway = gateway

    def log(self, request) -> None:
        """Access logging is done by the gateway's request observers."""
