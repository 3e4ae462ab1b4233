"""
A lean HTTP/1.1 client for backends: one L{UpstreamProtocol} per backend
connection, responses parsed by C{httptools} (llhttp), and a small
keep-alive L{UpstreamPool} per service.

Twisted's C{HTTP11ClientProtocol} and C{HTTPConnectionPool} were most of
the gateway's client-side CPU under load (docs/performance.rst): a state
machine per request, a body producer protocol, a line parser written in
Python, several Deferreds per request. This client does one request at a
time per connection with one Deferred, writes the request head and body
in one C{transport.write}, and leaves parsing to llhttp: llhttp checks
every byte of a response head and frames the body (Content-Length,
chunked, close-delimited, keep-alive).  It is not asked to call back for
each header field, though: a call from C into Python costs about a
microsecond on PyPy (cpyext), ten of them most of the cost of a small
response there.  Once llhttp has accepted a whole head, its status line
and fields are read from its bytes in one pass
(L{UpstreamProtocol.on_headers_complete}); a head larger than
L{MAX_HEAD_SIZE} fails the response.

Its responses look like L{twisted.web.iweb.IResponse} to the proxy:
C{code}, C{phrase}, C{headers} (without connection-control fields, which
are in C{connection_headers}, as L{gateway.forwarding} arranges for
Twisted's client), C{length} and C{deliverBody}. The body protocol gets a
transport whose C{pauseProducing} stops reading from the backend socket,
and C{connectionLost} with L{ResponseDone} (complete),
L{PotentialDataLoss} (ended by the backend closing) or L{ResponseFailed}
(cut short).

A connection goes back to the pool only after a complete response that
neither side ended with C{Connection: close}. An idempotent request
without a body that fails on a reused connection before any response byte
(the backend closed it while it sat idle) is retried once on a new
connection, as C{HTTPConnectionPool.retryAutomatically} does.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import httptools
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseFailed, ResponseNeverReceived
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from gateway import splice as _splice

#: Response fields Twisted's client files apart from C{Response.headers}
#: (L{twisted.web._newclient.HTTPParser.CONNECTION_CONTROL_HEADERS}).
CONNECTION_CONTROL = frozenset(
    [
        b"content-length",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    ]
)

#: Methods retried once when a reused connection turns out to be closed.
IDEMPOTENT = frozenset([b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"DELETE"])

#: Methods that carry C{Content-Length: 0} when sent without a body.
_EMPTY_BODY_LENGTH = frozenset([b"POST", b"PUT", b"PATCH"])

#: Bytes read from a backend's TCP socket at a time, from the head to the
#: end of a Content-Length body longer than this, instead of Twisted's
#: 64 KiB: a quarter of the reads, relays and writes per MiB (+18% of
#: 1 MiB responses/s on CPython, paired runs).  Not for every read:
#: CPython's recv() allocates the whole size first, and 256 KiB reads cost
#: small responses 10%.
LARGE_READ = 256 * 1024

#: The largest response head read from a backend, in bytes (status line
#: and header fields); a larger one fails the response (a 502 for the
#: client), as Envoy's C{max_response_headers_kb} (60 KiB) and nginx's
#: C{proxy_buffer_size} ("upstream sent too big header") do.
MAX_HEAD_SIZE = 64 * 1024


class ResponseHeadTooLarge(Exception):
    """A backend's response head exceeded L{MAX_HEAD_SIZE} bytes."""

    def __str__(self) -> str:
        return f"the backend's response head is over {MAX_HEAD_SIZE} bytes"


class NotHTTPResponse(Exception):
    """A response head that llhttp accepts but that is not HTTP's (its
    status line starts C{RTSP/} or C{ICE/})."""


class _ParserEvents:
    """
    What an C{httptools} parser calls back: the start and end of a head,
    body bytes, the end of a message.  llhttp calls only the callbacks its
    protocol object has, so the status line and the fields (about ten calls
    into Python per response, through cpyext on PyPy) are not called back.
    """

    __slots__ = ("on_message_begin", "on_headers_complete", "on_body", "on_message_complete")

    def __init__(self, protocol: "UpstreamProtocol") -> None:
        self.on_message_begin = protocol.on_message_begin
        self.on_headers_complete = protocol.on_headers_complete
        self.on_body = protocol.on_body
        self.on_message_complete = protocol.on_message_complete


class _Stop(Exception):
    """Raised in a parser callback to stop parsing: the end of a HEAD
    response's head, or the start of a body on the fast path."""


class UpstreamResponse:
    """
    A backend's response: its head, and its body streamed to the protocol
    given to L{deliverBody}. It is also that protocol's transport.

    @ivar code: the status code (L{int}).
    @ivar phrase: the reason phrase (L{bytes}).
    @ivar headers: the end-to-end fields (L{Headers}).
    @ivar connection_headers: the connection-control fields (L{Headers}).
    @ivar length: the body's length from C{Content-Length}, 0 for a body
        that cannot be there (HEAD, 204, 304), or C{UNKNOWN_LENGTH}.
    """

    version = (b"HTTP", 1, 1)

    def __init__(self, connection, code, phrase, headers, connection_headers, length):
        self._connection: Optional[UpstreamProtocol] = connection
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.connection_headers = connection_headers
        self.length = length
        self._protocol = None
        self._buffer: list = []
        self._ended: Optional[Failure] = None
        self._paused = False
        #: whether splicing the body may still be tried (L{gateway.splice})
        self._spliceable = _splice.ENABLED

    # -- from the connection

    def _body(self, data: bytes) -> None:
        if self._protocol is None:
            self._buffer.append(data)
        else:
            self._protocol.dataReceived(data)

    def _end(self, reason: Failure) -> None:
        self._connection = None
        if self._protocol is None:
            self._ended = reason
        else:
            protocol, self._protocol = self._protocol, None
            protocol.connectionLost(reason)

    # -- IResponse

    def deliverBody(self, protocol) -> None:
        """Stream the body to C{protocol} (an L{IProtocol})."""
        self._protocol = protocol
        protocol.makeConnection(self)
        buffered, self._buffer = self._buffer, []
        for data in buffered:
            protocol.dataReceived(data)
        if self._ended is not None:
            reason, self._ended = self._ended, None
            self._protocol = None
            protocol.connectionLost(reason)
        elif self._connection is not None and not self._paused:
            self._connection._resume_reading()

    def setPreviousResponse(self, response) -> None:
        pass

    # -- IPushProducer, for the body protocol

    def pauseProducing(self) -> None:
        self._paused = True
        if self._connection is not None:
            self._connection.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        connection = self._connection
        if connection is not None and self._protocol is not None:
            left = connection._body_left
            if self._spliceable and left is not None and left >= _splice.SPLICE_MIN:
                # The client took everything written so far: the rest of a
                # large body may go straight from socket to socket.  Tried
                # once per response: what refuses it (the transports, the
                # reader, the pipe budget) would refuse it again.
                self._spliceable = False
                connection._splice = _splice.BodySplice.start(connection, self._protocol)
                if connection._splice is not None:
                    return
            connection.transport.resumeProducing()

    def stopProducing(self) -> None:
        """Stop reading the body: the connection is aborted."""
        if self._connection is not None:
            self._connection.abort()


class UpstreamProtocol(Protocol):
    """
    One connection to a backend, one request at a time.

    @ivar reused: whether it has carried a request before the current one.
    """

    def __init__(self, pool, key) -> None:
        self._pool = pool
        self._key = key
        self.reused = False
        self.connected_ = False
        self._d: Optional[Deferred] = None
        self._response: Optional[UpstreamResponse] = None
        self._parser = None
        self._head = False
        self._received = False
        self._complete = False
        self._keep_alive = False
        #: the L{gateway.splice.BodySplice} moving this response's body, if any
        self._splice = None
        # The head being parsed: the read fed to the parser; the earlier
        # reads that hold the start of a head not yet complete; held + read,
        # joined once a head ends in this read; and where the next head
        # starts in that (0, or past the end of a 1xx head in this read).
        self._data = b""
        self._held: list = []
        self._held_size = 0
        self._joined: Optional[bytes] = None
        self._head_from = 0
        self._in_head = False
        self._pooled = False  # released to the pool after a response
        #: When this connection last went back to the pool (reactor time).
        self._idle_since = 0.0
        self._closed: Optional[Deferred] = None
        self._cancelled = False
        self._aborted = False
        self._ready: Optional[UpstreamResponse] = None
        self._retry = None
        self._again: Optional[Deferred] = None
        self._again_for: Optional[Deferred] = None
        # The body fast path: bytes of a Content-Length body still to come,
        # handed to the response without the parser; None when parsing.
        self._body_left: Optional[int] = None
        self._read_size: Optional[int] = None
        self._body_start = 0  # where the body begins in the read

    def connectionMade(self) -> None:
        self.connected_ = True
        # A TCP transport's read size (Twisted's 64 KiB), or None for one
        # without (TLS): raised for the rest of a large body (_take_body).
        self._read_size = getattr(self.transport, "bufferSize", None)

    # -- sending

    def request(
        self, method: bytes, path: bytes, headers: Headers, body: Optional[bytes], retry=None
    ) -> Deferred:
        """
        Send one request.

        @param retry: called with no arguments if the connection closes
            before any response byte; returns a Deferred for the same
            request on a new connection, whose result becomes this one's.

        @return: a Deferred firing with an L{UpstreamResponse} once its head
            has arrived, or failing with L{ResponseNeverReceived} or
            L{ResponseFailed}; cancelling it aborts the connection.
        """
        self._d = d = Deferred(self._cancel)
        self._retry = retry
        self._again = None
        self._response = None
        self._head = method == b"HEAD"
        self._received = False
        self._complete = False
        self._cancelled = False
        self._ready = None
        self._body_left = None
        self._held = []
        self._held_size = 0
        self._in_head = False
        self._pooled = False
        if self._parser is None:
            # One parser per connection, for response after response: llhttp
            # starts on the next message by itself.  Making one costs 7 us on
            # PyPy (cpyext), 40% of parsing a small response there.
            self._parser = httptools.HttpResponseParser(_ParserEvents(self))
        lines = [method, b" ", path, b" HTTP/1.1\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines += (name, b": ", value, b"\r\n")
        if body is not None:
            lines += (b"Content-Length: %d\r\n\r\n" % len(body), body)
        elif method in _EMPTY_BODY_LENGTH:
            lines.append(b"Content-Length: 0\r\n\r\n")
        else:
            lines.append(b"\r\n")
        self.transport.write(b"".join(lines))
        return d

    def _cancel(self, d: Deferred) -> None:
        if self._again is not None and self._again_for is d:
            self._again.cancel()  # the retry on a new connection
            return
        self._cancelled = True
        self.abort()

    def abort(self) -> None:
        """Drop the connection now; it is never reused."""
        self._aborted = True
        self._keep_alive = False
        if self._splice is not None:
            self._splice.cancel()
        self.transport.abortConnection()

    def _response_paused(self) -> bool:
        """Whether the body's reader paused the response (or there is none)."""
        return self._response is None or self._response._paused

    def _spliced_body_complete(self) -> None:
        """The rest of the body went through a L{gateway.splice.BodySplice}."""
        self._leave_fast_path()
        self._message_complete()
        self._after_data()

    def _leave_fast_path(self) -> None:
        """The whole Content-Length body is in: reads as before it."""
        self._body_left = None
        if self._read_size is not None:
            self.transport.bufferSize = self._read_size

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if self._complete:
            self._keep_alive = False  # bytes nobody asked for: do not reuse
        self._in_head = True

    def _head_bytes(self) -> bytes:
        """The bytes of this read, after those held from earlier ones."""
        joined = self._joined
        if joined is None:
            if self._held:
                self._held.append(self._data)
                joined = b"".join(self._held)
                self._held = []
                self._held_size = 0
            else:
                joined = self._data
            self._joined = joined
        return joined

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._complete:
            return  # after the response: nobody asked for this one
        data = self._head_bytes()
        # llhttp has accepted every byte of this head, or it would not be
        # here: empty lines, a status line "HTTP/x.y" SP three digits [SP
        # reason] (or RTSP/, ICE/: refused below), then fields "token:" OWS
        # value, each line ended by CRLF (no bare LF, no obs-fold).  So the
        # head runs from the status line to the first CRLFCRLF after it, and
        # its lines split as llhttp split them (tests/test_upstream.py).
        start = self._head_from
        if not data.startswith(b"HTTP/", start):
            rest = data[start:].lstrip(b"\r\n")
            if not rest.startswith(b"HTTP/"):
                raise NotHTTPResponse(rest[:16])
            start = len(data) - len(rest)
        end = data.find(b"\r\n\r\n", start)
        if end - start > MAX_HEAD_SIZE:
            raise ResponseHeadTooLarge()
        self._head_from = end + 4
        lines = data[start:end].split(b"\r\n")
        status = lines[0]
        code = int(status[9:12])
        if code < 200:
            return  # 100 Continue and the like: ignored, the final one follows
        headers: dict = {}
        control: dict = {}
        head = self._head
        length = UNKNOWN_LENGTH
        chunked = False
        for i in range(1, len(lines)):
            name, _, value = lines[i].partition(b":")
            value = value.lstrip(b" \t")  # llhttp keeps trailing whitespace
            lower = name.lower()
            if lower in CONNECTION_CONTROL and not (head and lower == b"content-length"):
                target = control
                if lower == b"content-length":
                    try:
                        length = int(value)
                    except ValueError:
                        pass
                elif lower == b"transfer-encoding":
                    chunked = True
            else:
                target = headers
            # By the lower-case name: Headers capitalizes names its own way,
            # and "Set-Cookie" and "set-cookie" are one field (RFC 9110 5.1).
            found = target.get(lower)
            if found is None:
                target[lower] = [value]
            else:
                found.append(value)
        if chunked:
            length = UNKNOWN_LENGTH
        if head or code == 204 or code == 304:
            length = 0
        self._keep_alive = self._parser.should_keep_alive()
        self._response = self._ready = UpstreamResponse(
            self, code, status[13:], Headers(headers), Headers(control), length
        )
        if head:
            self._message_complete()
            raise _Stop()
        if length is not UNKNOWN_LENGTH and length > 0:
            # The body fast path: a body of known length is handed on as
            # it arrives, without the parser, which would copy every chunk
            # (through cpyext on PyPy: a third of the CPU for 1 MiB bodies).
            # The parser is stopped at the end of the head.  A body already
            # whole in this read is left to the parser: stopping it costs an
            # exception through the C parser, which PyPy pays dearly for
            # (its small-response rate fell by half).
            if len(data) - self._head_from < length:
                self._body_left = length
                self._body_start = self._head_from - (len(data) - len(self._data))
                if length > LARGE_READ and self._read_size is not None:
                    self.transport.bufferSize = LARGE_READ
                raise _Stop()

    def on_body(self, body: bytes) -> None:
        if self._response is not None:
            self._response._body(body)

    def on_message_complete(self) -> None:
        if self._response is None:
            return  # the end of a 1xx response
        self._message_complete()

    def _message_complete(self) -> None:
        if self._complete:
            return
        self._complete = True
        response, self._response = self._response, None
        if response is not None:
            response._end(Failure(ResponseDone("Response body fully received")))

    # -- receiving

    def _take_body(self, data: bytes) -> None:
        """Hand on bytes of a Content-Length body (the fast path)."""
        left = self._body_left
        size = len(data)
        if size < left:
            self._body_left = left - size
            if size:
                self._response._body(data)
            return
        self._leave_fast_path()
        if size > left:
            self._keep_alive = False  # bytes nobody asked for: do not reuse
            data = data[:left]
        self._response._body(data)
        self._message_complete()

    def dataReceived(self, data: bytes) -> None:
        self._received = True
        if self._body_left is not None:
            self._take_body(data)
            self._after_data()
            return
        if self._pooled:
            # Bytes while the connection sits in the pool answer no request:
            # empty lines are skipped (as llhttp skips them before a status
            # line), anything else drops the connection.
            if data.strip(b"\r\n"):
                self.abort()
            return
        self._data = data
        self._joined = None
        self._head_from = 0
        try:
            self._parser.feed_data(data)
        except (_Stop, httptools.HttpParserCallbackError) as e:
            # (a callback's _Stop may arrive wrapped by the parser)
            if not isinstance(e, _Stop) and not isinstance(e.__context__, _Stop):
                cause = e.__context__
                self._fail(Failure(cause) if isinstance(cause, Exception) else Failure())
                return
            self._parser = None  # a stopped parser takes no more input
            if self._body_left is not None:
                self._take_body(data[self._body_start:])
        except Exception:
            self._fail(Failure())
            return
        # (a head after the response is nobody's: not kept)
        if self._in_head and not self._complete and not self._hold():
            return  # too large: failed
        self._data = b""
        self._joined = None
        self._after_data()

    def _hold(self) -> bool:
        """
        Keep the start of a head that this read did not complete, for the
        next read; fail the response once what is kept is over
        L{MAX_HEAD_SIZE} (a head that ends in the next read is measured
        then, in L{on_headers_complete}).

        @return: whether the response goes on.
        """
        if self._joined is not None:
            # A head ended in this read (a 1xx) and the next one began.
            piece = self._joined[self._head_from:]
            self._held = [piece]
            self._held_size = len(piece)
        else:
            # No head ended in this read, so whatever is held, and else
            # the whole read, starts at the current head.
            self._held.append(self._data)
            self._held_size += len(self._data)
        if self._held_size <= MAX_HEAD_SIZE:
            return True
        self._held = []
        self._held_size = 0
        self._fail(Failure(ResponseHeadTooLarge()))
        return False

    def _after_data(self) -> None:
        # The response is handed over only now, outside the parser: its
        # reader may send the next request or stop this one, and the
        # connection is back in the pool first if the response is complete.
        d = self._d
        response = self._response
        if self._complete:
            self._done()
        elif response is not None and response._protocol is None:
            # Keep as little of the body as possible until someone reads it.
            self.transport.pauseProducing()
        if d is not None and self._ready is not None:
            self._d = None
            ready, self._ready = self._ready, None
            d.callback(ready)

    def _resume_reading(self) -> None:
        self.transport.resumeProducing()

    def _fail(self, failure: Failure) -> None:
        self._ready = None
        self.abort()
        if self._d is not None:
            d, self._d = self._d, None
            d.errback(ResponseFailed([failure]))

    def _done(self) -> None:
        """A complete response: back to the pool, or closed."""
        if self._keep_alive and not self._aborted:
            self.transport.resumeProducing()
            self._pooled = True
            self._pool._release(self)
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        self.connected_ = False
        if self._splice is not None:
            self._splice.cancel()
        self._pool._lost(self)
        response, self._response = self._response, None
        if response is not None:
            if (
                response.length is UNKNOWN_LENGTH
                and not self._aborted
                and not response.connection_headers.hasHeader(b"transfer-encoding")
            ):
                response._end(Failure(PotentialDataLoss()))
            else:
                response._end(Failure(ResponseFailed([reason])))
        d, self._d = self._d, None
        if d is not None and not self._cancelled:
            if self._retry is not None and not self._received:
                self._again_for = d
                self._again = self._retry()
                self._again.chainDeferred(d)
            elif self._received:
                d.errback(ResponseFailed([reason]))
            else:
                d.errback(ResponseNeverReceived([reason]))
        if self._closed is not None:
            closed, self._closed = self._closed, None
            closed.callback(None)


class _UpstreamFactory(Factory):
    noisy = False

    def __init__(self, pool, key) -> None:
        self._pool = pool
        self._key = key

    def buildProtocol(self, addr):
        return UpstreamProtocol(self._pool, self._key)


class UpstreamPool:
    """
    Keep-alive connections to backends, kept by key (one per backend).

    @param reactor: provides C{IReactorTime}.
    @param max_idle: the most idle connections kept per key.
    @param idle_timeout: seconds an idle connection is kept.

    Idle connections are closed by one timer per pool (L{_sweep_idle}),
    set for the oldest idle connection's expiry, not by a timer per
    connection set and cancelled on every request.
    """

    def __init__(self, reactor, max_idle: int, idle_timeout: float = 60.0) -> None:
        self._reactor = reactor
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        #: key -> idle connections, oldest first (taken from the end).
        self._idle: dict = {}
        self._factories: dict = {}
        self._sweep = None

    def request(self, key, endpoint, method: bytes, path: bytes, headers: Headers, body) -> Deferred:
        """
        Send a request over an idle connection for C{key}, or a new one
        made with C{endpoint}.

        @return: a Deferred firing with an L{UpstreamResponse}; cancelling
            it stops the connection attempt or aborts the request.
        """
        idle = self._idle.get(key)
        while idle:
            proto = idle.pop()
            if not proto.connected_:
                continue
            proto.reused = True
            retry = None
            if method in IDEMPOTENT and body is None:
                retry = partial(self._fresh, key, endpoint, method, path, headers, body)
            return proto.request(method, path, headers, body, retry)
        return self._fresh(key, endpoint, method, path, headers, body)

    def _fresh(self, key, endpoint, method, path, headers, body) -> Deferred:
        factory = self._factories.get(key)
        if factory is None:
            factory = self._factories[key] = _UpstreamFactory(self, key)
        return endpoint.connect(factory).addCallback(
            lambda proto: proto.request(method, path, headers, body)
        )

    def _release(self, proto: UpstreamProtocol) -> None:
        idle = self._idle.setdefault(proto._key, [])
        if len(idle) >= self.max_idle:
            proto.transport.loseConnection()
            return
        idle.append(proto)
        proto._idle_since = self._reactor.seconds()
        if self._sweep is None:
            self._sweep = self._reactor.callLater(self.idle_timeout, self._sweep_idle)

    def _sweep_idle(self) -> None:
        """
        Close the connections idle for C{idle_timeout} seconds or more, and
        set the timer again for the oldest of the others.
        """
        self._sweep = None
        now = self._reactor.seconds()
        oldest = None
        for idle in self._idle.values():
            expired = 0
            while expired < len(idle) and now - idle[expired]._idle_since >= self.idle_timeout:
                expired += 1
            for proto in idle[:expired]:
                proto.transport.loseConnection()
            del idle[:expired]
            if idle and (oldest is None or idle[0]._idle_since < oldest):
                oldest = idle[0]._idle_since
        if oldest is not None:
            self._sweep = self._reactor.callLater(
                max(0.0, oldest + self.idle_timeout - now), self._sweep_idle
            )

    def _lost(self, proto: UpstreamProtocol) -> None:
        idle = self._idle.get(proto._key)
        if idle and proto in idle:
            idle.remove(proto)

    def close(self) -> Deferred:
        """
        Close the idle connections.

        @return: a Deferred firing once they are closed.
        """
        waits = []
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        for idle in self._idle.values():
            for proto in list(idle):
                proto._closed = Deferred()
                waits.append(proto._closed)
                proto.transport.loseConnection()
        self._idle = {}
        if not waits:
            return succeed(None)
        from twisted.internet.defer import gatherResults

        return gatherResults(waits).addCallback(lambda _: None)
