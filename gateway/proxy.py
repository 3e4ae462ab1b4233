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

import io
import json
from typing import Optional
from urllib.parse import unquote_to_bytes as unquote

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.http_headers import Headers
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
from gateway.retry import RETRIABLE_STATUSES, backoff, should_retry
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
        "upstream_headers", "upstream_remove", "upstream_path", "exchange",
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
        #: The forwarding state (L{_Exchange}) once the request is forwarded.
        self.exchange = None


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


def error_body(message: str, request_id: Optional[str]) -> bytes:
    """
    The JSON body of an error the gateway answers itself, UTF-8:
    C{{"error": message, "request_id": request_id}}.
    """
    return json.dumps({"error": message, "request_id": request_id}).encode("utf-8")


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
        self._hooks_of = None
        self._hooks_cache: "_Hooks | None" = None

    def _hooks(self) -> "_Hooks":
        """
        The filters' bound hooks, looked up once per filters tuple (the
        gateway's C{filters} may be replaced, e.g. by tests), not once per
        filter per request.
        """
        filters = self._gateway.filters
        if filters is not self._hooks_of:
            self._hooks_cache = _Hooks(filters)
            self._hooks_of = filters
        return self._hooks_cache

    # -- the pipeline ------------------------------------------------------

    def render(self, request: server.Request):
        snapshot = self._gateway.snapshot
        headers = request.requestHeaders
        raw_id = choose_request_id(headers)
        request_id = raw_id.decode("ascii")
        request.responseHeaders.setRawHeaders(REQUEST_ID_HEADER, [raw_id])
        address = request.getClientAddress()
        client_ip = getattr(address, "host", "") or ""
        path, query = split_target(request.uri)
        path = normalise_path(path)
        context = RequestContext(request_id, request.method, path, client_ip, self._clock.seconds())
        context.query = query
        context.snapshot = snapshot
        # What notifyFinish() does, without a Deferred for every request.
        request.notifications.append(_FinishNotice(self, request, context))

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
            _run_unrouted(self._hooks().on_unrouted, request, context)
            self._answer(request, context, Answer.error_(404, "no route matches the request"))
            return server.NOT_DONE_YET
        context.route = route
        context.service = route.service
        self._run_filters(None, request, context, 0)
        return server.NOT_DONE_YET

    def _run_filters(self, _, request, context: RequestContext, index: int, hooks=None) -> None:
        if hooks is None:
            hooks = self._hooks().on_request
        while index < len(hooks):
            on_request = hooks[index]
            index += 1
            try:
                result = on_request(request, context)
            except Exception:
                self._filter_failed(Failure(), request, context)
                return
            if result is None:
                continue
            if isinstance(result, Deferred):
                result.addCallback(self._filter_result, request, context, index, hooks)
                result.addErrback(self._filter_failed, request, context)
                return
            self._answer(request, context, result)
            return
        self._forward(request, context)

    def _filter_result(self, result, request, context: RequestContext, index: int, hooks) -> None:
        if request._disconnected:
            return
        if result is None:
            self._run_filters(None, request, context, index, hooks)
        else:
            self._answer(request, context, result)

    def _filter_failed(self, failure: Failure, request, context: RequestContext) -> None:
        _log.failure(
            "request filter failed", failure, request_id=context.request_id
        )
        context.error = "internal error"
        if not request._disconnected:
            self._answer_500(request, context)

    def _answer_500(self, request, context: RequestContext) -> None:
        """
        Answer 500 with only the response headers that belong to any answer
        (L{_KEPT_ON_ERROR}): none of what was set for the answer that could
        not be given (a filter's L{Answer}, or a backend's fields copied
        before the failure, whose C{Content-Encoding} or C{Set-Cookie}
        would be wrong on the gateway's JSON error).
        """
        if not request.startedWriting:
            headers = request.responseHeaders
            fresh = Headers()
            for name in _KEPT_ON_ERROR:
                values = headers.getRawHeaders(name)
                if values:
                    fresh.setRawHeaders(name, values)
            request.responseHeaders = fresh
        self._answer(request, context, Answer.error_(500, "internal gateway error"))

    def _response_filters(self, request, context: RequestContext) -> None:
        for on_response in self._hooks().on_response:
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
            body = error_body(answer.error, context.request_id)
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
    #
    # One client request may take several attempts. Each attempt picks a
    # usable backend not tried yet, takes its breaker's permission, and is
    # sent with a timeout of min(per-try timeout, time left of the overall
    # timeout). A failed attempt is retried when gateway.retry.should_retry
    # allows it (connect failures for any method; resets, timeouts and
    # 502/503/504 answers for idempotent methods or routes that allow it),
    # retries are left, time is left, an untried backend is usable and the
    # service's retry budget has room; after a jittered exponential backoff.
    # Retries after a connect failure are not charged to the budget: nothing
    # reached any backend, so they cannot multiply its load, and when one
    # backend of several dies, every request that picked it in the moment
    # before it is taken out would otherwise compete for a budget sized
    # for real retries.
    # A retried 5xx answer's body is discarded and its slot released:
    # nothing reaches the client before the attempt that is answered.

    def _forward(self, request, context: RequestContext) -> None:
        route = context.route
        runtime = context.snapshot.services[route.service]
        headers = request.requestHeaders
        path = context.upstream_path
        if path is None:
            path = route_path(route, context.path)
        body = None
        if headers.hasHeader(b"content-length") or headers.hasHeader(b"transfer-encoding"):
            body = request.content.getvalue()
            context.bytes_in = len(body)

        service = runtime.service
        overall = route.timeout if route.timeout is not None else service.timeouts.response
        per_try = route.retries.per_try_timeout
        if per_try is None:
            per_try = service.timeouts.per_try
        exchange = _Exchange(
            runtime=runtime,
            target=path + context.query,
            body=body,
            key=runtime.hash_key(context.client_ip, request.getHeader, request.getCookie, context.path),
            deadline=self._clock.seconds() + overall,
            per_try=per_try,
        )
        runtime.budget.request_started()
        context.exchange = exchange  # ended by _finished
        self._attempt(request, context, exchange)

    def _attempt(self, request, context: RequestContext, exchange: "_Exchange") -> None:
        exchange.waiting = None
        if request._disconnected:
            return
        runtime = exchange.runtime
        backend = self._choose(runtime, exchange)
        remaining = exchange.deadline - self._clock.seconds()
        if backend is None or remaining <= 0:
            exchange.end_retry()
            if backend is not None:
                runtime.release(backend)
            if exchange.last_error is not None:
                self._answer_error(request, context, exchange.last_error)
            elif backend is None:
                context.error = "no backend available"
                retry_after = b"%d" % runtime.retry_after()
                self._answer(
                    request,
                    context,
                    Answer.error_(503, "no healthy backend", ((b"Retry-After", retry_after),)),
                )
            else:
                self._answer_error(
                    request, context, UpstreamError(504, "backend response timed out", "timeout")
                )
            return
        exchange.tried.append(backend)
        context.backend = backend
        forwarded = upstream_headers(
            request.requestHeaders,
            client_ip=context.client_ip,
            proto=b"https" if request.isSecure() else b"http",
            host=context.host,
            preserve_host=context.route.preserve_host,
            backend=backend,
        )
        forwarded.setRawHeaders(REQUEST_ID_HEADER, [context.request_id.encode("ascii")])
        apply_upstream_headers(forwarded, context.upstream_remove, context.upstream_headers)
        if not context.upstream_started:
            context.upstream_started = self._clock.seconds()
        timeout = remaining if exchange.per_try is None else min(exchange.per_try, remaining)
        sent = exchange.sent = runtime.forwarder.request(
            request.method, backend, exchange.target, forwarded, exchange.body, timeout
        )
        sent.addCallbacks(
            self._got_response,
            self._attempt_failed,
            callbackArgs=(request, context, exchange, backend),
            errbackArgs=(request, context, exchange, backend),
        )
        sent.addErrback(self._internal_error, request, context)

    def _choose(self, runtime: ServiceRuntime, exchange: "_Exchange") -> Optional[Backend]:
        """
        A usable backend not tried yet whose breaker lets the request
        through (its permission taken), or None.
        """
        candidates = [b for b in runtime.available() if b not in exchange.tried]
        while candidates:
            backend = runtime.balancer.pick(candidates, exchange.key)
            if backend is None:
                return None
            if runtime.acquire(backend):
                return backend
            candidates = [b for b in candidates if b != backend]
        return None

    def _may_retry(
        self, request, context, exchange: "_Exchange", outcome: str, status=None, charged=True
    ) -> bool:
        policy = context.route.retries
        runtime = exchange.runtime
        if context.retries >= policy.max_retries:
            return False
        if not should_retry(request.method, outcome, status, policy.non_idempotent):
            return False
        if exchange.deadline - self._clock.seconds() <= 0:
            return False
        if not any(b not in exchange.tried for b in runtime.available()):
            return False
        if charged and not runtime.budget.can_retry():
            _log.debug(
                "retry budget of {service} exhausted",
                event="retry_budget_exhausted",
                service=runtime.service.name,
                request_id=context.request_id,
            )
            return False
        return True

    def _retry(self, request, context: RequestContext, exchange: "_Exchange", charged: bool) -> None:
        policy = context.route.retries
        context.retries += 1
        if charged:
            exchange.runtime.budget.retry_started()
            exchange.retrying = True
        delay = backoff(context.retries - 1, policy.backoff_base, policy.backoff_max, self._gateway.rng)
        delay = min(delay, max(0.0, exchange.deadline - self._clock.seconds()))
        exchange.waiting = self._clock.callLater(delay, self._attempt, request, context, exchange)

    def _got_response(self, response, request, context, exchange: "_Exchange", backend) -> None:
        exchange.sent = None
        exchange.end_retry()
        runtime = exchange.runtime
        runtime.record(backend, ok=response.code < 500)
        if request._disconnected:
            response.deliverBody(_Discard())
            runtime.forwarder.limits.release(backend)
            return
        if response.code in RETRIABLE_STATUSES and self._may_retry(
            request, context, exchange, "status", response.code
        ):
            response.deliverBody(_Discard())
            runtime.forwarder.limits.release(backend)
            exchange.last_error = UpstreamError(
                response.code, f"backend answered {response.code}", "status"
            )
            _log.debug(
                "retrying after {status} from {backend}", status=response.code,
                backend=backend.url, request_id=context.request_id,
            )
            self._retry(request, context, exchange, charged=True)
            return
        self._respond(response, request, context, runtime, backend, exchange)

    def _respond(self, response, request, context, runtime: ServiceRuntime, backend, exchange):
        context.upstream_ended = self._clock.seconds()
        context.status = response.code
        try:
            verdict = self._upstream_verdict("on_upstream_response", request, context, response)
        except Exception:
            self._upstream_filter_failed(Failure(), response, request, context, runtime, backend)
            return
        if isinstance(verdict, Deferred):
            verdict.addCallbacks(
                self._relay_or_answer,
                self._upstream_filter_failed,
                callbackArgs=(response, request, context, runtime, backend, exchange),
                errbackArgs=(response, request, context, runtime, backend),
            )
            verdict.addErrback(self._internal_error, request, context)
            return
        # Decided now (most often: no filter had a say), with no Deferred to
        # carry the verdict.  An error from here on is the gateway's own,
        # not a filter's: it reaches _internal_error through _attempt's
        # errback, and the backend's slot, released or not, is not released
        # a second time.
        self._relay_or_answer(verdict, response, request, context, runtime, backend, exchange)

    def _upstream_verdict(self, hook: str, request, context, outcome):
        """
        Offer a backend's response (or failure) to the filters that define
        C{hook}, in pipeline order; the first that returns something other
        than None decides.

        @return: None (carry on), that filter's result, or a L{Deferred}
            firing with either.
        @raise Exception: what a filter raised.
        """
        for ask in getattr(self._hooks(), hook):
            result = ask(request, context, outcome)
            if result is not None:
                return result
        return None

    def _ask_upstream_filters(self, hook: str, request, context, outcome) -> Deferred:
        """
        L{_upstream_verdict} as a L{Deferred}: it fires with None (carry on)
        or the deciding filter's result, or fails with what a filter raised.
        """
        try:
            result = self._upstream_verdict(hook, request, context, outcome)
        except Exception:
            return fail()
        return result if isinstance(result, Deferred) else succeed(result)

    def _relay_or_answer(self, verdict, response, request, context, runtime, backend, exchange) -> None:
        if isinstance(verdict, Answer) or request._disconnected:
            response.deliverBody(_Discard())
            runtime.forwarder.limits.release(backend)
            if isinstance(verdict, Answer):
                self._answer(request, context, verdict)
            return
        self._relay(verdict or response, request, context, runtime, backend, exchange)

    def _upstream_filter_failed(self, failure, response, request, context, runtime, backend) -> None:
        response.deliverBody(_Discard())
        runtime.forwarder.limits.release(backend)
        self._filter_failed(failure, request, context)

    def _relay(self, response, request, context, runtime: ServiceRuntime, backend, exchange) -> None:
        """Stream a backend response (or a filter's wrapper of it) to the client."""
        phrase = response.phrase
        if phrase and (b"\r" in phrase or b"\n" in phrase):
            phrase = None  # Twisted's phrase for the code: the backend's would split the head
        request.setResponseCode(response.code, phrase)
        copy_response_headers(response, request.responseHeaders, request.method)
        self._response_filters(request, context)

        def body_ended(relay: BodyRelay) -> None:
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

        relay = exchange.relay = BodyRelay(request, body_ended)
        response.deliverBody(relay)

    def _attempt_failed(self, failure: Failure, request, context, exchange: "_Exchange", backend):
        exchange.sent = None
        exchange.end_retry()
        runtime = exchange.runtime
        context.upstream_ended = self._clock.seconds()
        if request._disconnected or not failure.check(UpstreamError):
            runtime.release(backend)
            if not request._disconnected:
                self._internal_error(failure, request, context)
            return
        error = failure.value
        if error.kind == "overload":
            # The gateway's own connection cap, not the backend's fault.
            # Nothing was sent, so any method may be retried; but the
            # backends are busy, so the retry is charged to the budget.
            runtime.release(backend)
            outcome, charged = "connect_failure", True
        else:
            runtime.record(backend, ok=False)
            outcome, charged = error.kind, error.kind != "connect_failure"
        exchange.last_error = error
        if self._may_retry(request, context, exchange, outcome, charged=charged):
            _log.debug(
                "retrying after {kind} from {backend}", kind=error.kind,
                backend=backend.url, request_id=context.request_id,
            )
            self._retry(request, context, exchange, charged)
            return
        self._answer_error(request, context, error)

    def _answer_error(self, request, context, error: UpstreamError) -> None:
        """
        Answer a request that got no usable backend response, unless a
        filter (the cache's stale-if-error) answers it instead.
        """
        context.error = error.reason
        decided = self._ask_upstream_filters("on_upstream_failure", request, context, Failure(error))
        decided.addCallback(
            lambda answer: self._answer(
                request, context, answer or Answer.error_(error.status, error.reason)
            )
        )
        decided.addErrback(self._filter_failed, request, context)

    def _internal_error(self, failure: Failure, request, context) -> None:
        _log.failure("unexpected forwarding failure", failure, request_id=context.request_id)
        context.error = "internal error"
        if not request._disconnected:
            self._answer_500(request, context)

    def _finished(self, result, request, context: RequestContext) -> None:
        context.ended = self._clock.seconds()
        if isinstance(result, Failure) and not request.startedWriting:
            context.status = 499  # the client closed the connection first
        else:
            context.status = request.code
        notify_observers(self._gateway.request_observers, context)
        exchange = context.exchange
        if exchange is not None:
            exchange.end_retry()
            exchange.runtime.budget.request_finished()
            if isinstance(result, Failure):
                exchange.client_gone()
        return None


#: Response headers a 500 from the gateway keeps of those set before the
#: failure: its Date, the request's ID, and a C{Connection: close} set by
#: draining (L{gateway.drain}).
_KEPT_ON_ERROR = (b"Date", REQUEST_ID_HEADER, b"Connection")


class _FinishNotice:
    """
    Tells L{ProxyResource._finished} that a request's response has ended
    or its connection was lost, from C{request.notifications}, where
    C{notifyFinish} would put a L{Deferred}: Twisted calls C{callback(None)}
    on each entry when the response is done and C{errback(reason)} when the
    connection is lost first (C{twisted.web.http.Request}, 25.5 and 26.10).
    What C{_finished} raises is logged, not raised into Twisted's request.
    """

    __slots__ = ("_proxy", "_request", "_context")

    def __init__(self, proxy: "ProxyResource", request, context: RequestContext) -> None:
        self._proxy = proxy
        self._request = request
        self._context = context

    def callback(self, result) -> None:
        self._tell(result)

    def errback(self, reason) -> None:
        self._tell(reason if isinstance(reason, Failure) else Failure(reason))

    def _tell(self, result) -> None:
        try:
            self._proxy._finished(result, self._request, self._context)
        except Exception:
            _log.failure("ending a request failed", request_id=self._context.request_id)


class _Hooks:
    """
    The bound hooks of a filters tuple, in pipeline order, each tuple
    holding only the filters that define that hook.
    """

    __slots__ = ("on_request", "on_unrouted", "on_response", "on_upstream_response", "on_upstream_failure")

    def __init__(self, filters) -> None:
        for hook in self.__slots__:
            bound = (getattr(f, hook, None) for f in filters)
            setattr(self, hook, tuple(h for h in bound if h is not None))


class _Exchange:
    """
    The forwarding state of one client request across its attempts.

    @ivar tried: the backends tried so far, in order.
    @ivar deadline: the reactor time by which response headers must come.
    @ivar per_try: seconds one attempt may take, or None.
    @ivar last_error: the L{UpstreamError} of the latest failed attempt.
    @ivar sent: the attempt in flight, or None.
    @ivar waiting: the delayed call of a retry's backoff, or None.
    @ivar relay: the L{BodyRelay} streaming the answer, once there is one.
    @ivar retrying: a retry counted in the budget has not ended yet.
    """

    __slots__ = (
        "runtime", "target", "body", "key", "deadline", "per_try", "tried",
        "last_error", "sent", "waiting", "relay", "retrying",
    )

    def __init__(self, runtime, target, body, key, deadline, per_try) -> None:
        self.runtime = runtime
        self.target = target
        self.body = body
        self.key = key
        self.deadline = deadline
        self.per_try = per_try
        self.tried: list = []
        self.last_error: Optional[UpstreamError] = None
        self.sent: Optional[Deferred] = None
        self.waiting = None
        self.relay: Optional[BodyRelay] = None
        self.retrying = False

    def end_retry(self) -> None:
        """The retry in progress, if any, has ended: give back its budget."""
        if self.retrying:
            self.retrying = False
            self.runtime.budget.retry_finished()

    def client_gone(self) -> None:
        """Stop whatever is in progress: attempt, backoff wait or body."""
        if self.waiting is not None and self.waiting.active():
            self.waiting.cancel()
            self.waiting = None
        if self.sent is not None:
            # Even when called: with a slot free at once, C{sent} is the
            # upstream request's own chain, called once the connection is
            # made but paused until the response; cancel() then cancels
            # what it waits on, and does nothing once it has an outcome.
            self.sent.cancel()
        if self.relay is not None and self.relay.transport is not None:
            self.relay.transport.stopProducing()


class _Discard:
    """A body protocol that throws the body away."""

    def makeConnection(self, transport) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason) -> None:
        pass


#: The second last formatted by L{http_date}, and its value.
_date: tuple = (None, b"")


def http_date(now: float) -> bytes:
    """
    C{now} as an HTTP date (RFC 9110, section 5.6.7: IMF-fixdate, e.g.
    C{b"Sun, 22 Nov 2026 05:20:00 GMT"}), formatted once a second: the
    responses of one second share one value.

    @param now: seconds since the epoch.
    """
    global _date
    second = int(now)
    cached = _date
    if cached[0] == second:
        return cached[1]
    value = http.datetimeToString(second)
    _date = (second, value)
    return value


class GatewayRequest(server.Request):
    """
    A request whose body is held in memory up to the configured limit
    (C{limits.max_request_body}); a larger body is refused with 413 and the
    connection is closed without reading the rest.  The body is not parsed
    (L{GatewaySite} sets C{parsePOSTFormSubmission=False}): C{args} holds
    the query string's arguments only.
    """

    _too_large = False

    def process(self) -> None:
        """
        What Twisted's C{server.Request.process} does (Twisted 25.5 and 26.10
        alike), less two things it does to every response that the gateway
        does not keep: a C{Server} field naming Twisted (the proxy removed
        it; a backend's own passes through), and a C{Date} formatted anew
        for each request (formatted once a second here, L{http_date}, on the
        gateway's clock; a backend's C{Date} replaces it, RFC 9110, section
        6.6.1).  Both cost about 1.5% of the CPU of a proxied request on
        CPython (py-spy).
        """
        self.site = site = self.channel.site
        self.responseHeaders.setRawHeaders(b"Date", [http_date(site.gateway.reactor.seconds())])
        self.prepath = []
        self.postpath = list(map(unquote, self.path[1:].split(b"/")))
        if self.path == b"*":
            self._handle_star(site.gateway)
            return
        try:
            resrc = site.getResourceFor(self)
            if resource._IEncodingResource.providedBy(resrc):
                encoder = resrc.getEncoder(self)
                if encoder is not None:
                    self._encoder = encoder
            self.render(resrc)
        except BaseException:
            self.processingFailed(Failure())

    def _handle_star(self, gateway: Gateway) -> None:
        """
        Twisted's answer to a request for C{*} (C{OPTIONS *}: 200, an empty
        body; any other method: 405 with C{Allow: OPTIONS}; RFC 9110,
        section 9.3.7), with what the gateway's other answers carry: an
        C{X-Request-Id}, the top-level security headers, and a report to
        the request observers (no route).
        """
        raw_id = choose_request_id(self.requestHeaders)
        self.responseHeaders.setRawHeaders(REQUEST_ID_HEADER, [raw_id])
        _apply_security_headers(gateway, self.isSecure(), self.responseHeaders)
        self._handleStar()
        error = None if self.code == 200 else "method not allowed"
        client = getattr(self.getClientAddress(), "host", "") or ""
        _observe_unrouted(
            gateway, raw_id.decode("ascii"), client, self.code, error, self.method, b"*", 0,
            self.requestHeaders,
        )

    def _limit(self) -> int:
        return self.channel.site.gateway.snapshot.config.limits.max_request_body

    def gotLength(self, length) -> None:
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
        if not isinstance(self.channel, http.HTTPChannel):
            # HTTP/2: no raw bytes on a shared connection; this stream gets
            # its 413 when the request ends (requestReceived).
            return
        refuse_on(self.channel, 413, "request body too large", self.requestHeaders)

    def requestReceived(self, command, path, version) -> None:
        if self._too_large:
            if not isinstance(self.channel, http.HTTPChannel):
                self._refuse_stream(command, path, version)
            return
        super().requestReceived(command, path, version)

    def _refuse_stream(self, command, path, version) -> None:
        """
        Answer 413 on an HTTP/2 stream whose body was too large, as
        L{refuse_connection} answers on HTTP/1.1 (the client's valid
        C{X-Request-Id} or a new one, C{Date}, the top-level security
        headers, the request observers told) but on this stream only: the
        connection and its other streams go on.
        """
        self.method, self.uri, self.clientproto = command, path, version
        message = "request body too large"
        raw_id = choose_request_id(self.requestHeaders)
        request_id = raw_id.decode("ascii")
        body = error_body(message, request_id)
        gateway = getattr(self.channel.site, "gateway", None)
        self.setResponseCode(413)
        self.setHeader(b"Content-Type", b"application/json")
        self.setHeader(REQUEST_ID_HEADER, raw_id)
        self.setHeader(b"Content-Length", b"%d" % len(body))
        if gateway is not None:
            self.setHeader(b"Date", http_date(gateway.reactor.seconds()))
            _apply_security_headers(gateway, self.isSecure(), self.responseHeaders)
        self.write(body)
        self.finish()
        address = self.getClientAddress()
        client = getattr(address, "host", "") or ""
        _report_refusal(
            gateway, request_id, client, 413, message, command, path, len(body), self.requestHeaders,
            address,
        )


_PHRASES = {
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}


def refuse_connection(
    transport,
    status: int,
    message: str,
    headers=None,
    gateway: Optional[Gateway] = None,
    method: bytes = b"",
    target: bytes = b"",
    secure: bool = False,
) -> None:
    """
    Answer a request the channel will not read to its end with a JSON
    error, then close the connection: the rest of what the client sends
    (body, headers) is never read, so the connection cannot be reused.

    With C{gateway}, the answer carries a C{Date} from the gateway's
    reactor clock and the top-level security headers
    (C{security_headers}; no route was chosen) and the request is reported
    to the gateway's request observers (access log, metrics, dashboard) as
    any answered request is, with C{route} None and C{error} C{message}.

    @param transport: the client connection.
    @param status: one of 408, 413, 414, 431.
    @param message: the C{error} of the JSON body.
    @param headers: the request headers received so far (their valid
        C{X-Request-Id} is kept), or None.
    @param gateway: the L{Gateway} whose listener refused, or None.
    @param method: the request method, if its request line was read.
    @param target: the request target (path and query), likewise.
    @param secure: whether the connection is TLS (which security headers).
    """
    raw_id = choose_request_id(headers) if headers is not None else new_request_id().encode("ascii")
    request_id = raw_id.decode("ascii")
    body = error_body(message, request_id)
    extra = b""
    if gateway is not None:
        # A Date from the gateway's clock, as on its other answers (RFC
        # 9110, section 6.6.1: a 4xx from a server with a clock has one).
        extra = b"Date: %s\r\n%s" % (
            http_date(gateway.reactor.seconds()), _security_header_lines(gateway, secure)
        )
    transport.write(
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
        b"X-Request-Id: %s\r\n%sConnection: close\r\nContent-Length: %d\r\n\r\n%s"
        % (status, _PHRASES[status], raw_id, extra, len(body), body)
    )
    transport.loseConnection()
    peer = transport.getPeer()
    client = getattr(peer, "host", "") or ""
    _report_refusal(
        gateway, request_id, client, status, message, method, target, len(body), headers, peer
    )


def refuse_on(channel: http.HTTPChannel, status: int, message: str, headers=None) -> None:
    """
    L{refuse_connection} on an HTTP/1.1 channel, with what the channel
    knows: its site's gateway, the request line if it was read, TLS or not.
    """
    refuse_connection(
        channel.transport,
        status,
        message,
        headers,
        getattr(channel.site, "gateway", None),
        getattr(channel, "_command", b""),
        getattr(channel, "_path", b""),
        channel.isSecure(),
    )


def _apply_security_headers(gateway: Gateway, secure: bool, headers: Headers) -> None:
    """Set the top-level security headers (C{security_headers}) on C{headers}."""
    from gateway.filters.security_headers import headers_for

    chosen = headers_for(gateway.snapshot.config.options, secure)
    if chosen is not None:
        chosen.apply(headers)


def _security_header_lines(gateway: Gateway, secure: bool) -> bytes:
    """The top-level security headers as C{Name: value\\r\\n} lines."""
    out = Headers()
    _apply_security_headers(gateway, secure, out)
    return b"".join(
        name + b": " + value + b"\r\n" for name, values in out.getAllRawHeaders() for value in values
    )


def _report_refusal(
    gateway, request_id, client, status, message, method, target, sent, headers, peer=None
) -> None:
    """
    Log a request the gateway refused before routing it (a channel limit),
    and report it to C{gateway}'s request observers (L{_observe_unrouted})
    unless C{gateway} is None.

    @param client: the client's IP address, or C{""} (not an IP
        connection: the log names C{peer} instead).
    """
    _log.info(
        "refused a request from {client} with {status}: {reason}",
        client=client or str(peer),
        status=status,
        reason=message,
        request_id=request_id,
    )
    if gateway is not None:
        _observe_unrouted(gateway, request_id, client, status, message, method, target, sent, headers)


class _Refused:
    """What the filters' C{on_unrouted} hooks read of a refused request."""

    __slots__ = ("requestHeaders", "clientproto")

    def __init__(self, headers) -> None:
        self.requestHeaders = headers if headers is not None else Headers()
        self.clientproto = b"HTTP/1.1"


def _observe_unrouted(gateway, request_id, client, status, message, method, target, sent, headers=None) -> None:
    """
    Report a request answered without a route (refused, or for C{*}) to
    the request observers, as L{ProxyResource._finished} does, after the
    filters' C{on_unrouted} hooks have seen the headers received so far
    (C{headers}, or None).

    @param message: the context's C{error}, or None.
    """
    now = gateway.reactor.seconds()
    path, query = split_target(target) if target else (b"", b"")
    context = RequestContext(request_id, method or b"-", path, client, now)
    context.query = query
    context.snapshot = gateway.snapshot
    context.status = status
    context.error = message
    context.bytes_out = sent
    context.ended = now
    _run_unrouted(_Hooks(gateway.filters).on_unrouted, _Refused(headers), context)
    notify_observers(gateway.request_observers, context)


def _run_unrouted(hooks, request, context: RequestContext) -> None:
    """Run the filters' C{on_unrouted} C{hooks}; one that raises is logged, the others still run."""
    for on_unrouted in hooks:
        try:
            on_unrouted(request, context)
        except Exception:
            _log.failure("request filter failed", request_id=context.request_id)


def notify_observers(observers, context: RequestContext) -> None:
    """
    Hand a finished request's C{context} to each request observer (access
    log, metrics, dashboard); one that raises is logged, the others still run.
    """
    for observer in observers:
        try:
            observer(context)
        except Exception:
            _log.failure("request observer failed", request_id=context.request_id)


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
    _secure: Optional[bool] = None
    _host = None
    _peer = None

    def getPeer(self):
        # Fixed for the connection too; Twisted builds a new address object
        # on every call (several per request).
        peer = self._peer
        if peer is None:
            peer = self._peer = super().getPeer()
        return peer

    def getHost(self):
        # Each Request asks for the local address when it is made, and for a
        # TCP transport that is a getsockname() system call every time (2%
        # of the CPU under load); a connection's local address is fixed.
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    def writeHeaders(self, version, code, reason, headers) -> None:
        """
        What Twisted's C{HTTPChannel.writeHeaders} writes (Twisted 25.5 and
        26.10 alike), as one C{bytes} rather than a sequence of four pieces
        per field, which the transport checked one by one (about fifty
        calls per response).

        @param headers: a L{Headers}, whose values Twisted sanitized when
            they were set; anything else goes to Twisted's own method,
            which sanitizes it.
        """
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)
            return
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        self.transport.write(b"".join(head))

    def isSecure(self) -> bool:
        # Twisted adapts the transport to ISSLTransport on every call (about
        # 2% of the CPU under load, asked twice per request); a connection's
        # transport does not change, so ask once.
        secure = self._secure
        if secure is None:
            secure = self._secure = super().isSecure()
        return secure

    def connectionMade(self) -> None:
        gateway = getattr(self.site, "gateway", None)
        if gateway is None:  # a plain Site (tests of the drainer): Twisted's limits
            super().connectionMade()
            return
        limits = gateway.snapshot.config.limits
        self.maxHeaders = limits.max_header_count
        self.totalHeadersSize = limits.max_header_bytes
        # LineReceiver drops a longer line (one header, or the request line)
        # with no answer at all; lineLengthExceeded answers instead.
        self.MAX_LENGTH = limits.max_header_bytes
        self.timeOut = limits.client_idle_timeout or None
        self._header_timeout = limits.client_header_timeout or None
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        # The header timer runs from the first byte of a request's head
        # until the head is whole; a head that came whole in this read
        # never needs one (no timer set and cancelled per request).
        if (
            self._header_call is None
            and self._header_timeout is not None
            and self.line_mode
            and not self._handlingRequest
            and (self._receivedHeaderSize or self._buffer)
            and not self.transport.disconnecting
        ):
            self._header_call = self.callLater(self._header_timeout, self._headers_too_slow)

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
        refuse_on(self, status, message, headers)


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
        # The body is the backend's to read: Twisted's requests would
        # otherwise parse a form body (urlencoded or multipart) into
        # request.args, a pass over up to limits.max_request_body bytes,
        # and answer 400 themselves to a multipart body their parser refused.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(ProxyResource(gateway), **kwargs)
        self.gateway = gateway

    def acceptableProtocols(self) -> list[bytes]:
        """
        The protocols this site offers by ALPN: without C{h2} when the
        listener's C{tls.http2} is false.  Twisted before 26 sets the site's
        list on every server TLS connection, replacing the listener's own
        ALPN choice (L{gateway.tls}); this keeps the two in agreement.

        @return: protocol names, most preferred first, e.g.
            C{[b"h2", b"http/1.1"]}.
        """
        protocols = super().acceptableProtocols()
        tls = self.gateway.snapshot.config.options.get("tls")
        if tls is not None and not tls.http2:
            protocols = [p for p in protocols if p != b"h2"]
        return protocols

    def log(self, request) -> None:
        """Access logging is done by the gateway's request observers."""
