"""
Forwarding: sending a request to a backend and streaming its response back.

The forwarder speaks to backends with the lean client of
L{gateway.upstream} (llhttp parsing, a keep-alive pool of its own, one per
service), or, with C{TXGATEWAY_UPSTREAM_CLIENT=agent}, with
L{twisted.web.client.Agent} over an L{HTTPConnectionPool}. It does not use treq's
C{HTTPClient} here: that wraps its agent in a C{ContentDecoderAgent}, which
adds C{Accept-Encoding: gzip} and silently decompresses responses, and it
re-parses every URL; a proxy must pass bodies and encodings through as they
are. Redirects are never followed and no cookie jar is kept: each client's
cookies go to the backend and back untouched.

Header rules follow RFC 9110 §7.6: hop-by-hop fields (§7.6.1: C{Connection}
and the fields it names, C{Keep-Alive}, C{Proxy-Connection}, C{TE},
C{Trailer}, C{Transfer-Encoding}, C{Upgrade}, C{Proxy-Authorization},
C{Proxy-Authenticate}) are dropped both ways, C{Via} is added (§7.6.3), and
the client is appended to C{X-Forwarded-For}.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Callable, Optional

from twisted.internet import error as ierror
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
    _HTTP11ClientFactory,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS
from twisted.web._newclient import (
    HTTPClientParser,
    Request as _ClientRequest,
    _ensureValidMethod,
    _ensureValidURI,
)
from zope.interface import implementer

from gateway.config import Backend, Service
from gateway.tls import backend_policy
from gateway.upstream import UpstreamPool

_log = Logger()

#: Send to backends with L{gateway.upstream} (True) or with Twisted's
#: L{Agent} and L{HTTPConnectionPool} (False), kept for comparison: set
#: C{TXGATEWAY_UPSTREAM_CLIENT=agent} in the environment for the latter.
LEAN_CLIENT = os.environ.get("TXGATEWAY_UPSTREAM_CLIENT", "lean") != "agent"

#: Hop-by-hop header names, lower-case (RFC 9110 §7.6.1; C{Keep-Alive} and
#: C{Proxy-Connection} are the non-standard ones seen in the wild).
HOP_BY_HOP = frozenset(
    [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    ]
)

#: Request headers the gateway itself sets or derives, never copied as is.
_REQUEST_DERIVED = HOP_BY_HOP | {b"host", b"content-length", b"expect"}

VIA = b"1.1 txgateway"


def connection_tokens(headers: Headers) -> frozenset:
    """
    The lower-case header names listed in the C{Connection} header, which are
    hop-by-hop for this message (RFC 9110 §7.6.1).
    """
    values = headers.getRawHeaders(b"connection")
    if not values:
        return frozenset()
    return frozenset(
        token.strip().lower() for value in values for token in value.split(b",") if token.strip()
    )


def upstream_headers(
    incoming: Headers,
    *,
    client_ip: str,
    proto: bytes,
    host: bytes,
    preserve_host: bool,
    backend: Backend,
) -> Headers:
    """
    The headers to send to a backend for a client request.

    @param incoming: the client's request headers.
    @param client_ip: the address the request came from, appended to
        C{X-Forwarded-For}.
    @param proto: C{b"http"} or C{b"https"}: the client listener's scheme,
        sent as C{X-Forwarded-Proto}.
    @param host: the client's C{Host} header value (C{b""} if none), sent as
        C{X-Forwarded-Host} and, with C{preserve_host}, as C{Host}.
    @param backend: the chosen backend; its host is the C{Host} otherwise.
    @rtype: L{Headers}
    """
    drop = _REQUEST_DERIVED | connection_tokens(incoming) if incoming.hasHeader(
        b"connection"
    ) else _REQUEST_DERIVED
    out = Headers()
    for name, values in incoming.getAllRawHeaders():
        lower = name.lower()
        if lower in drop:
            continue
        if lower == b"x-forwarded-for" or lower == b"via":
            continue
        out.setRawHeaders(name, values)
    forwarded_for = incoming.getRawHeaders(b"x-forwarded-for")
    client = client_ip.encode("ascii", "replace")
    out.setRawHeaders(
        b"X-Forwarded-For",
        [b", ".join(forwarded_for) + b", " + client if forwarded_for else client],
    )
    out.setRawHeaders(b"X-Forwarded-Proto", [proto])
    if host:
        out.setRawHeaders(b"X-Forwarded-Host", [host])
    via = incoming.getRawHeaders(b"via")
    out.setRawHeaders(b"Via", [b", ".join(via) + b", " + VIA if via else VIA])
    out.setRawHeaders(b"Host", [host if preserve_host and host else backend.host_header])
    return out


def _remember_connection_headers() -> None:
    """
    Make each client L{Response} carry its connection-control fields.

    Twisted's client parser files C{Connection}, C{Content-Length} and the
    other connection-control fields apart from C{Response.headers}, so a
    proxy cannot see which fields C{Connection} names as hop-by-hop. This
    keeps a reference to that L{Headers} as C{response.connection_headers}.
    It relies on L{HTTPClientParser} building the response in
    C{statusReceived}; the tests fail if that changes.
    """
    original = HTTPClientParser.statusReceived
    if getattr(original, "_txgateway", False):
        return

    def statusReceived(self, status):
        original(self, status)
        self.response.connection_headers = self.connHeaders

    statusReceived._txgateway = True
    HTTPClientParser.statusReceived = statusReceived


_remember_connection_headers()


def copy_response_headers(response, downstream: Headers, method: bytes) -> None:
    """
    Copy a backend response's headers to the client's response, leaving out
    hop-by-hop fields (and those its C{Connection} names) and adding
    C{Via}. Repeated fields (several C{Set-Cookie}) stay separate and in
    order, and the backend's C{Content-Length} is kept.

    @param response: the backend's L{IResponse}.
    @param method: the request method (a HEAD response's length is not its
        body's).
    """
    upstream = response.headers
    control = getattr(response, "connection_headers", None)
    drop = HOP_BY_HOP
    if control is not None and control.hasHeader(b"connection"):
        drop = HOP_BY_HOP | connection_tokens(control)
    if (
        method != b"HEAD"
        and response.length is not UNKNOWN_LENGTH
        and response.code not in (204, 304)
        and response.code >= 200
    ):
        downstream.setRawHeaders(b"Content-Length", [b"%d" % response.length])
    for name, values in upstream.getAllRawHeaders():
        if name.lower() in drop:
            continue
        downstream.setRawHeaders(name, values)
    via = upstream.getRawHeaders(b"via")
    downstream.setRawHeaders(b"Via", [b", ".join(via) + b", " + VIA if via else VIA])


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body already in memory, written in one piece.

    @ivar length: the body's length in bytes, sent as C{Content-Length}.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer):
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class UpstreamError(Exception):
    """
    A request could not get a response from a backend.

    @ivar status: the status to answer the client with: 502 (refused, reset,
        bad response), 503 (no capacity) or 504 (timed out).
    @ivar reason: a short, client-safe description.
    @ivar kind: C{"connect_failure"} (nothing reached the backend: safe to
        retry any method), C{"reset"}, C{"timeout"} or C{"overload"}.
    """

    def __init__(self, status: int, reason: str, kind: str) -> None:
        super().__init__(status, reason, kind)
        self.status = status
        self.reason = reason
        self.kind = kind


def classify_failure(failure: Failure, timed_out: bool) -> UpstreamError:
    """
    Map a failed backend request to the client's answer.

    @param timed_out: the gateway's own response timer cancelled it.
    """
    if timed_out:
        return UpstreamError(504, "backend response timed out", "timeout")
    if failure.check(ierror.TimeoutError, ierror.ConnectingCancelledError):
        return UpstreamError(504, "backend connect timed out", "connect_failure")
    if failure.check(ierror.ConnectError, ierror.DNSLookupError):
        return UpstreamError(502, "backend refused the connection", "connect_failure")
    if failure.check(CancelledError):
        return UpstreamError(502, "request cancelled", "reset")
    return UpstreamError(502, "backend closed the connection without a response", "reset")


class ConnectionLimit:
    """
    Caps the requests in flight to each backend of a service.

    A request over the cap waits, first come first served, until one ends.

    @param limit: the most requests in flight to one backend.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._active: dict[str, int] = {}
        self._waiting: dict[str, deque] = {}

    def active(self, backend: Backend) -> int:
        """Requests in flight to C{backend} now."""
        return self._active.get(backend.url, 0)

    def acquire(self, backend: Backend) -> Optional[Deferred]:
        """
        Take a slot for C{backend}.

        @return: None when a slot was free and is now taken, or a Deferred
            that fires once one is (cancel it to stop waiting).
        """
        url = backend.url
        count = self._active.get(url, 0)
        if count < self.limit:
            self._active[url] = count + 1
            return None
        queue = self._waiting.setdefault(url, deque())

        def cancel(d: Deferred) -> None:
            try:
                queue.remove(d)
            except ValueError:
                pass

        waiter: Deferred = Deferred(cancel)
        queue.append(waiter)
        return waiter

    def release(self, backend: Backend) -> None:
        """Give back the slot of a request to C{backend} that has ended."""
        url = backend.url
        queue = self._waiting.get(url)
        if queue:
            queue.popleft().callback(None)  # the slot passes on
            return
        count = self._active.get(url, 0) - 1
        if count > 0:
            self._active[url] = count
        else:
            self._active.pop(url, None)


@implementer(IAgentEndpointFactory)
class BackendEndpoints:
    """
    How the agent connects to backends: straight to the address for an IP
    literal (C{TCP4ClientEndpoint}, C{TCP6ClientEndpoint}), through
    L{HostnameEndpoint} for a name; wrapped in TLS for C{https}.

    Twisted's own factory uses L{HostnameEndpoint} for every host. Its
    happy-eyeballs loop notices that its only address refused the
    connection at the next 0.3 s tick, so each request that picked a dead
    backend would lose 300 ms before failing over; with an IP literal
    there is nothing to race and the refusal arrives at once.

    @param connect_timeout: seconds to wait for the TCP connection.
    @param tls: the policy for HTTPS backends; browser-like verification
        if None.
    """

    def __init__(
        self, reactor, connect_timeout: float, tls: Optional[IPolicyForHTTPS] = None
    ) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = tls or BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            return wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False  # no "Starting factory" log line per backend connection


class _Pool(HTTPConnectionPool):
    _factory = _QuietClientFactory


class ServiceForwarder:
    """
    Sends requests to the backends of one service over pooled connections.

    @param reactor: provides C{IReactorTCP}, C{IReactorTime} (and
        C{IReactorSSL} for HTTPS backends).
    @param service: the service; its C{timeouts.connect} and
        C{max_connections_per_backend} are used here.
    @param agent: the L{IAgent} requests are sent with; None for this
        forwarder's own pool. Tests give a
        L{treq.testing.RequestTraversalAgent}.
    @param lean: send with L{gateway.upstream.UpstreamPool} (True) or an
        L{Agent} over an L{HTTPConnectionPool} (False); L{LEAN_CLIENT} if
        None. Ignored when C{agent} is given.
    """

    def __init__(self, reactor, service: Service, agent=None, lean: Optional[bool] = None) -> None:
        self._reactor = reactor
        self.service = service
        self.pool = _Pool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = service.max_connections_per_backend
        self.pool.cachedConnectionTimeout = 60
        self.limits = ConnectionLimit(service.max_connections_per_backend)
        #: backend URL -> (pool key, endpoint, parsed URI, base path), for
        #: sending straight to the pool; None when an agent was given.
        self._targets: Optional[dict] = None
        self._lean: Optional[UpstreamPool] = None
        if agent is None and (LEAN_CLIENT if lean is None else lean):
            self._lean = UpstreamPool(reactor, service.max_connections_per_backend, 60)
        if agent is None:
            # HTTPS: verification, CA bundle, client certificate
            self._endpoints = BackendEndpoints(
                reactor, service.timeouts.connect, backend_policy(service)
            )
            agent = Agent.usingEndpointFactory(reactor, self._endpoints, pool=self.pool)
            self._targets = {}
        self._agent = agent

    def _send(self, method: bytes, backend: Backend, target: bytes, headers: Headers, producer):
        """
        What C{Agent.request} does, without its per-request work: the
        backend's URL is parsed and its endpoint built once, not for every
        request (C{URI.fromBytes} and a new endpoint per call were about a
        twentieth of the gateway's CPU under load). C{headers} always carry
        C{Host} (L{upstream_headers}), so they are not copied to add it.
        """
        found = self._targets.get(backend.url)
        if found is None:
            uri = URI.fromBytes(b"%s://%s%s" % (backend.scheme, backend.host_header, backend.base_path))
            found = (
                (uri.scheme, uri.host, uri.port),
                self._endpoints.endpointForURI(uri),
                uri,
                backend.base_path,
            )
            self._targets[backend.url] = found
        key, endpoint, uri, base_path = found
        path = _ensureValidURI(base_path + target)
        method = _ensureValidMethod(method)
        if self._lean is not None:
            return self._lean.request(key, endpoint, method, path, headers, producer)
        persistent = self.pool.persistent

        def connected(proto):
            return proto.request(
                _ClientRequest._construct(method, path, headers, producer, persistent, uri)
            )

        return self.pool.getConnection(key, endpoint).addCallback(connected)

    def _dispatch(self, method: bytes, backend: Backend, target: bytes, headers: Headers, body):
        """
        Send one request, its slot held, by the lean client, the pool's
        agent (L{_send}) or the agent given: the Deferred of its response.
        """
        if self._targets is not None:
            if self._lean is None and body is not None:
                body = BytesProducer(body)
            return self._send(method, backend, target, headers, body)
        uri = b"%s://%s%s%s" % (backend.scheme, backend.host_header, backend.base_path, target)
        return self._agent.request(method, uri, headers, BytesProducer(body) if body is not None else None)

    def request(
        self,
        method: bytes,
        backend: Backend,
        target: bytes,
        headers: Headers,
        body: Optional[bytes],
        timeout: float,
    ) -> Deferred:
        """
        Send one request to C{backend}, taking a connection slot first.

        The caller must call C{self.limits.release(backend)} once the
        response body has been read or abandoned, or the request failed.

        @param target: the path and query to request, without the backend's
            base path.
        @param body: the request body, or None for a request without one.
        @param timeout: seconds to wait for the response headers, including
            the wait for a slot and for the connection.
        @return: a Deferred firing with an L{IResponse}, or failing with
            L{UpstreamError}; cancelling it aborts the request.  With a
            slot free at once it is the upstream request's own chain: it
            may be C{called} before the response has come (paused on a
            Deferred of the connection), and cancelling it then still
            aborts the request.
        """
        sending = _Sending(self, method, backend, target, headers, body)
        sending.timer = self._reactor.callLater(timeout, sending.time_out)
        waiter = self.limits.acquire(backend)
        if waiter is None:
            # A slot at once (the common case): the request's own Deferred,
            # its outcome translated on the way, with no second Deferred.
            return sending.send_now()
        result = sending.result = Deferred(sending.cancel)
        sending.inner = waiter
        waiter.addCallbacks(sending.send, sending.no_slot)
        return result

    def close(self) -> Deferred:
        """Close the pool's idle connections. @return: fires when closed."""
        if self._lean is not None:
            return self._lean.close()
        return self.pool.closeCachedConnections()


class _Sending:
    """
    One request of L{ServiceForwarder.request}: its slot, its timeout and
    its outcome, as bound methods of one object rather than a closure each
    per request.

    With a slot free at once, C{request} returns the Deferred of the
    request sent (L{send_now}), whose outcome L{passed_response} and
    L{passed_failure} translate; waiting for a slot, it returns C{result},
    which L{send} (or L{no_slot}) fires from the request's outcome.

    @ivar inner: what the outcome waits on: the slot's waiter, then the
        request sent; None before either.
    @ivar result: the Deferred returned while waiting for a slot, else None.
    @ivar timer: the C{IDelayedCall} of the timeout.
    @ivar timed_out: whether the timeout fired.
    """

    __slots__ = (
        "forwarder", "method", "backend", "target", "headers", "body",
        "result", "inner", "timer", "timed_out",
    )

    def __init__(self, forwarder, method, backend, target, headers, body) -> None:
        self.forwarder = forwarder
        self.method = method
        self.backend = backend
        self.target = target
        self.headers = headers
        self.body = body
        self.inner: Optional[Deferred] = None
        self.result: Optional[Deferred] = None
        self.timer = None
        self.timed_out = False

    def cancel(self, _: Deferred) -> None:
        """C{result}'s canceller: stop waiting for a slot, or abort the request."""
        if self.inner is not None:
            self.inner.cancel()

    def time_out(self) -> None:
        # (let go of the timer: a DelayedCall that has run keeps its
        # function, this bound method, and that cycle would keep the
        # request's headers and body until a full collection; the outcome
        # that cancelling brings lets go of it too, in _stop_timer)
        self.timer = None
        self.timed_out = True
        if self.inner is not None:
            self.inner.cancel()

    def _stop_timer(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _start(self) -> Deferred:
        """Send the request (a slot is held): the Deferred of its response."""
        inner = self.inner = self.forwarder._dispatch(
            self.method, self.backend, self.target, self.headers, self.body
        )
        return inner

    def send_now(self) -> Deferred:
        return self._start().addCallbacks(self.passed_response, self.passed_failure)

    def passed_response(self, response):
        self._stop_timer()
        return response

    def passed_failure(self, failure: Failure) -> Failure:
        self._stop_timer()
        self.forwarder.limits.release(self.backend)
        return Failure(classify_failure(failure, self.timed_out))

    def send(self, _=None) -> None:
        """The slot's waiter fired: send, unless C{result} has its outcome."""
        if self.timed_out or self.result.called:
            self.forwarder.limits.release(self.backend)
            return
        self._start().addCallbacks(self.got_response, self.failed)

    def got_response(self, response) -> None:
        self.result.callback(self.passed_response(response))

    def failed(self, failure: Failure) -> None:
        failure = self.passed_failure(failure)
        if not self.result.called:
            self.result.errback(failure)

    def no_slot(self, failure: Failure) -> None:
        # Timed out or cancelled while waiting: no slot was taken.
        self._stop_timer()
        if not self.result.called:
            self.result.errback(UpstreamError(503, "backend at capacity", "overload"))


class BodyRelay(Protocol):
    """
    Streams a backend response body to the client with flow control: when
    the client reads slowly, the channel pauses this relay's producer, which
    stops reading from the backend, so memory stays bounded.

    @param ended: called with this relay once the body has ended (after
        C{reason} is set), straight from C{connectionLost} rather than
        through a L{Deferred} made for each response; what it raises is
        logged, not passed on to the backend's connection.
    @ivar reason: why it ended: a L{Failure} of L{ResponseDone} (or
        L{PotentialDataLoss} for a body delimited by closing) when it ended
        cleanly, set before C{ended} is called.
    @ivar sent: body bytes written to the client.
    """

    def __init__(self, request, ended: Callable[["BodyRelay"], object]) -> None:
        self.request = request
        self._ended: Optional[Callable[["BodyRelay"], object]] = ended
        self.reason: Optional[Failure] = None
        self.sent = 0

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.sent += len(data)
        self.request.write(data)

    def connectionLost(self, reason: Failure) -> None:
        if self.request.channel is not None:
            self.request.unregisterProducer()
        # else the client went away mid-body (its channel is gone, and with
        # it the producer registration): nothing to unregister.
        self.reason = reason
        if self._ended is None:
            return  # (ended already)
        # Let go of the handler first, as a fired Deferred lets go of its
        # callbacks: it holds the request's state, which holds this relay,
        # and that cycle would keep the request until a full collection.
        ended, self._ended = self._ended, None
        try:
            ended(self)
        except Exception:
            _log.failure("handling the end of a backend response body failed")


def ended_cleanly(reason: Failure) -> bool:
    """Whether a response body ended as the backend meant it to."""
    # The common case first: Failure.check walks the class's ancestry by name.
    return reason.type is ResponseDone or reason.check(ResponseDone, PotentialDataLoss) is not None
