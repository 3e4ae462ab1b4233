"""The lean backend client: parsing, keep-alive, flow control, cancellation."""

import httptools
import pytest
from twisted.internet.defer import CancelledError, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseFailed, ResponseNeverReceived
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from gateway.upstream import MAX_HEAD_SIZE, NotHTTPResponse, ResponseHeadTooLarge, UpstreamPool
from tests.harness import BodyRecorder


class FakeEndpoint:
    """
    Connects at once over a C{transport} (a L{StringTransport} class);
    remembers each protocol.
    """

    def __init__(self, refuse=False, transport=StringTransport):
        self.protocols = []
        self.refuse = refuse
        self.transport = transport

    def connect(self, factory):
        if self.refuse:
            from twisted.internet.defer import fail

            return fail(ConnectionRefusedError())
        proto = factory.buildProtocol(None)
        proto.makeConnection(self.transport())
        self.protocols.append(proto)
        return succeed(proto)


Body = BodyRecorder


def close(proto, reason=ConnectionDone):
    proto.transport.disconnecting = True
    proto.connectionLost(Failure(reason()))


def setup(max_idle=4):
    reactor = MemoryReactorClock()
    return reactor, UpstreamPool(reactor, max_idle), FakeEndpoint()


def send(pool, endpoint, method=b"GET", body=None, headers=None):
    headers = headers or Headers({b"Host": [b"b.test"]})
    return pool.request("k", endpoint, method, b"/p?q=1", headers, body)


def result(d):
    out = []
    d.addBoth(out.append)
    assert out, "no result"
    return out[0]


def test_request_written_in_one_piece():
    _, pool, ep = setup()
    send(pool, ep, b"POST", b"hello", Headers({b"Host": [b"b.test"], b"X-A": [b"1", b"2"]}))
    written = ep.protocols[0].transport.value()
    assert written == (
        b"POST /p?q=1 HTTP/1.1\r\nHost: b.test\r\nX-A: 1\r\nX-A: 2\r\n"
        b"Content-Length: 5\r\n\r\nhello"
    )


def test_content_length_response_and_keep_alive_reuse():
    reactor, pool, ep = setup()
    d = send(pool, ep)
    proto = ep.protocols[0]
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nSet-Cookie: a=1\r\n")
    proto.dataReceived(b"Set-Cookie: b=2\r\nConnection: keep-alive\r\n\r\nhel")
    response = result(d)
    assert (response.code, response.phrase, response.length) == (200, b"OK", 5)
    assert response.headers.getRawHeaders(b"set-cookie") == [b"a=1", b"b=2"]
    assert not response.headers.hasHeader(b"content-length")
    assert response.connection_headers.getRawHeaders(b"connection") == [b"keep-alive"]
    assert proto.transport.producerState == "paused"  # nobody reads the body yet
    body = Body()
    response.deliverBody(body)
    assert proto.transport.producerState == "producing"
    proto.dataReceived(b"lo")
    assert b"".join(body.data) == b"hello"
    assert body.reason.check(ResponseDone)
    assert len(reactor.getDelayedCalls()) == 1  # the pool's idle sweep
    proto.transport.clear()
    d2 = send(pool, ep)
    assert len(ep.protocols) == 1 and proto.reused
    assert proto.transport.value().startswith(b"GET /p?q=1 HTTP/1.1\r\n")
    assert len(reactor.getDelayedCalls()) == 1  # no timer per connection, none cancelled
    proto.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert result(d2).code == 204


def test_one_parser_serves_response_after_response():
    """
    A connection keeps its parser from one response to the next; after a
    response that stopped the parser (HEAD, a body of known length still to
    come) the next one gets a new parser, and every response in the mix is
    read right.
    """
    _, pool, ep = setup()

    def exchange(method, *chunks):
        d = send(pool, ep, method)
        proto = ep.protocols[0]
        for chunk in chunks:
            proto.dataReceived(chunk)
        response = result(d)
        body = Body()
        response.deliverBody(body)
        assert body.reason.check(ResponseDone)
        assert pool._idle["k"] == [proto]
        return proto, response, b"".join(body.data)

    proto, response, body = exchange(b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    parser = proto._parser
    assert (response.code, body) == (200, b"ok")
    _, response, body = exchange(b"GET", b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nnew")
    assert (response.code, body) == (201, b"new")
    assert proto._parser is parser  # whole responses: the same parser
    _, response, body = exchange(b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")
    assert (response.code, body) == (200, b"")
    _, response, body = exchange(
        b"GET", b"HTTP/1.1 202 Accepted\r\nContent-Length: 6\r\n\r\nsp", b"lit", b"!"
    )
    assert (response.code, body) == (202, b"split!")
    _, response, body = exchange(
        b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    assert (response.code, body) == (200, b"abc")
    _, response, body = exchange(b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlast")
    assert (response.code, body) == (200, b"last")
    assert len(ep.protocols) == 1


def test_chunked_body():
    _, pool, ep = setup()
    d = send(pool, ep)
    proto = ep.protocols[0]
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    response = result(d)
    assert response.length is UNKNOWN_LENGTH
    body = Body()
    response.deliverBody(body)
    proto.dataReceived(b"2\r\nde\r\n0\r\n\r\n")
    assert b"".join(body.data) == b"abcde" and body.reason.check(ResponseDone)
    assert pool._idle["k"] == [proto]


def test_body_complete_before_delivery():
    _, pool, ep = setup()
    d = send(pool, ep)
    ep.protocols[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    body = Body()
    result(d).deliverBody(body)
    assert body.data == [b"ok"] and body.reason.check(ResponseDone)


def _read_all(proto, d):
    body = Body()
    result(d).deliverBody(body)
    return body


def test_known_length_body_bypasses_the_parser_in_any_split():
    """The Content-Length fast path hands the body on unchanged however the
    bytes are split, including a head whose CRLFCRLF straddles two reads,
    and the connection is reused for the next request."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-A: 1\r\n\r\n"
    wire = head + b"0123456789"
    for cut in range(1, len(wire)):
        for second in (cut, min(cut + 3, len(wire))):
            _, pool, ep = setup()
            d = send(pool, ep)
            proto = ep.protocols[0]
            proto.dataReceived(wire[:cut])
            proto.dataReceived(wire[cut:second])
            proto.dataReceived(wire[second:])
            response = result(d)
            assert response.headers.getRawHeaders(b"x-a") == [b"1"]
            body = Body()
            response.deliverBody(body)
            assert b"".join(body.data) == b"0123456789", (cut, second)
            assert body.reason.check(ResponseDone)
            assert pool._idle["k"] == [proto], (cut, second)


def test_known_length_body_whole_in_the_first_read_is_parsed():
    """No fast path when the body came with the head: stopping the parser
    costs more than parsing a small body."""
    _, pool, ep = setup()
    d = send(pool, ep)
    proto = ep.protocols[0]
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert proto._body_left is None
    body = _read_all(proto, d)
    assert body.data == [b"ok"] and body.reason.check(ResponseDone)
    assert pool._idle["k"] == [proto]


def test_known_length_body_does_not_copy_whole_reads():
    _, pool, ep = setup()
    d = send(pool, ep)
    proto = ep.protocols[0]
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nab")
    body = _read_all(proto, d)
    chunk = b"cdef"
    proto.dataReceived(chunk)
    assert body.data[-1] is chunk
    proto.dataReceived(b"gh")
    assert b"".join(body.data) == b"abcdefgh" and body.reason.check(ResponseDone)


def test_bytes_past_a_known_length_are_dropped_and_the_connection_closed():
    _, pool, ep = setup()
    d = send(pool, ep)
    proto = ep.protocols[0]
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab")
    body = _read_all(proto, d)
    proto.dataReceived(b"cEXTRA")
    assert b"".join(body.data) == b"abc" and body.reason.check(ResponseDone)
    assert "k" not in pool._idle or proto not in pool._idle["k"]
    assert proto.transport.disconnecting


def test_known_length_after_100_continue_starts_after_the_final_head():
    """After a 1xx head the first CRLFCRLF is not the final head's end: the
    body, parsed or on the fast path, starts after the final head's, in any
    split of the bytes, with empty lines before a status line."""
    wire = (
        b"\r\nHTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n"
        b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-A: a\r\n\r\nbody"
    )
    for cut in range(1, len(wire)):
        for second in (cut, min(cut + 5, len(wire))):
            _, pool, ep = setup()
            d = send(pool, ep, b"POST", b"x")
            proto = ep.protocols[0]
            for chunk in (wire[:cut], wire[cut:second], wire[second:]):
                if chunk:  # (Twisted delivers no empty reads)
                    proto.dataReceived(chunk)
            response = result(d)
            assert response.code == 200, (cut, second)
            assert list(response.headers.getAllRawHeaders()) == [(b"X-A", [b"a"])]
            body = Body()
            response.deliverBody(body)
            assert b"".join(body.data) == b"body", (cut, second)
            assert body.reason.check(ResponseDone)
            assert pool._idle["k"] == [proto]


#: Heads llhttp accepts, each read as llhttp's own field callbacks read it.
ACCEPTED_HEADS = [
    b"HTTP/1.1 200 OK\r\nA: b  \r\nB:\tc\t\r\nC:  d e  \r\n",
    b"HTTP/1.1 200 OK\r\nEmpty:\r\nAlso-Empty: \r\nColons: a:b::c\r\n",
    b"HTTP/1.1 200 OK\r\nObs-Text: \x80\xff\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n",
    b"HTTP/1.1 200\r\nX: 1\r\n",
    b"HTTP/1.1 200 \r\n",
    b"HTTP/1.0 404 Not  Found \r\nX-A: 1\r\n",
    b"HTTP/1.1 599 Whatever\r\nx-lower: v\r\nX-UPPER: V\r\n",
    b"\r\n\r\nHTTP/1.1 200 OK\r\nX: after empty lines\r\n",
]


class _LLHTTPFields:
    """llhttp's reading of a head, from its per-field callbacks."""

    def __init__(self, wire):
        self.fields = []
        parser = httptools.HttpResponseParser(self)
        parser.feed_data(wire)
        self.code = parser.get_status_code()

    def on_status(self, status):
        self.phrase = status

    def on_header(self, name, value):
        self.fields.append((name, value))


@pytest.mark.parametrize("head", ACCEPTED_HEADS)
def test_fields_are_read_as_llhttp_reads_them(head):
    """
    The status line and fields are read from the head's bytes once llhttp
    has accepted it: the same code, reason phrase and fields, in order, as
    llhttp's own per-field callbacks give (leading whitespace of a value
    dropped, trailing whitespace kept), whatever the split into reads.
    """
    wire = head + b"Content-Length: 0\r\n\r\n"
    llhttp = _LLHTTPFields(wire)
    for cut in range(1, len(wire)):
        _, pool, ep = setup()
        d = send(pool, ep)
        proto = ep.protocols[0]
        proto.dataReceived(wire[:cut])
        proto.dataReceived(wire[cut:])
        response = result(d)
        assert response.code == llhttp.code
        assert response.phrase == getattr(llhttp, "phrase", b"")
        fields = [
            (name, value)
            for name, values in response.headers.getAllRawHeaders()
            for value in values
        ]
        expected = [(n, v) for n, v in llhttp.fields if n.lower() != b"content-length"]
        # Headers keeps one entry per name, in the order names first came.
        by_name = {}
        for name, value in expected:
            by_name.setdefault(name.lower(), []).append(value)
        assert [(n.lower(), v) for n, v in fields] == [
            (name, value) for name, values in by_name.items() for value in values
        ], cut


@pytest.mark.parametrize(
    "line",
    [b"A: b\r\n c\r\n", b"A : b\r\n", b"A: b\rc\r\n", b" A: b\r\n", b"A\r\n", b": b\r\n",
     b"A: b\x00\r\n"],
    ids=["obs-fold", "space-before-colon", "bare-cr", "leading-space", "no-colon",
         "empty-name", "nul"],
)
def test_heads_llhttp_refuses_fail_the_response(line):
    """A head llhttp refuses is never read by the gateway: the response
    fails (a 502 for the client) and the connection is dropped."""
    wire = b"HTTP/1.1 200 OK\r\n" + line + b"Content-Length: 0\r\n\r\n"
    with pytest.raises(httptools.HttpParserError):
        _LLHTTPFields(wire)
    _, pool, ep = setup()
    d = send(pool, ep)
    ep.protocols[0].dataReceived(wire)
    assert result(d).check(ResponseFailed)
    assert ep.protocols[0].transport.disconnecting


@pytest.mark.parametrize(
    "wire",
    [
        b"RTSP/1.0 200 OK\r\nX: HTTP/1.1 404 Fake\r\nContent-Length: 0\r\n\r\n",
        b"ICE/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["rtsp", "ice"],
)
def test_status_lines_of_other_protocols_fail_the_response(wire):
    """llhttp accepts RTSP/ and ICE/ status lines; the gateway does not
    read them as HTTP (nor an HTTP/ found later in a field value)."""
    _LLHTTPFields(wire)  # accepted by llhttp
    _, pool, ep = setup()
    d = send(pool, ep)
    ep.protocols[0].dataReceived(wire)
    failure = result(d)
    assert failure.check(ResponseFailed)
    assert failure.value.reasons[0].check(NotHTTPResponse)
    assert ep.protocols[0].transport.disconnecting


def test_stray_bytes_on_a_pooled_connection():
    """Empty lines from a backend while its connection is in the pool are
    skipped, and the connection is still pooled once; anything else drops
    it from the pool."""
    _, pool, ep = setup()
    d = send(pool, ep)
    proto = ep.protocols[0]
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert result(d).code == 200 and pool._idle["k"] == [proto]
    proto.dataReceived(b"\r\n")
    proto.dataReceived(b"\r\n\r\n")
    assert pool._idle["k"] == [proto] and not proto.transport.disconnecting
    d2 = send(pool, ep)
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert result(d2).code == 200 and pool._idle["k"] == [proto]
    proto.dataReceived(b"HTTP/1.1 200 OK\r\n")
    assert proto.transport.disconnecting
    close(proto)
    assert not pool._idle.get("k")


def test_a_head_over_the_limit_fails_the_response():
    """A head that grows past MAX_HEAD_SIZE over many reads fails the
    response and drops the connection; one just under it is read."""
    filler = b"X-Filler: " + b"f" * 90 + b"\r\n"
    status = b"HTTP/1.1 200 OK\r\n"
    end = b"Content-Length: 0\r\n\r\n"
    fitting = status + filler * ((MAX_HEAD_SIZE - len(status) - len(end)) // len(filler)) + end
    assert len(fitting) <= MAX_HEAD_SIZE
    _, pool, ep = setup()
    d = send(pool, ep)
    proto = ep.protocols[0]
    for i in range(0, len(fitting), 1000):
        proto.dataReceived(fitting[i:i + 1000])
    assert result(d).code == 200 and pool._idle["k"] == [proto]

    _, pool, ep = setup()
    d = send(pool, ep)
    proto = ep.protocols[0]
    proto.dataReceived(status)
    while not proto.transport.disconnecting:
        proto.dataReceived(filler * 10)
        assert proto._held_size <= MAX_HEAD_SIZE
    failure = result(d)
    assert failure.check(ResponseFailed)
    assert failure.value.reasons[0].check(ResponseHeadTooLarge)

    # Over the limit by the read that completes it, held or not.
    too_large = fitting.replace(end, filler * 2 + end)
    for cuts in ([], [len(too_large) - 10], [60_000, len(too_large) - 10]):
        _, pool, ep = setup()
        d = send(pool, ep)
        proto = ep.protocols[0]
        for a, b in zip([0] + cuts, cuts + [len(too_large)]):
            proto.dataReceived(too_large[a:b])
        failure = result(d)
        assert failure.check(ResponseFailed), cuts
        assert failure.value.reasons[0].check(ResponseHeadTooLarge), cuts


def test_a_response_after_the_response_is_ignored_and_the_connection_closed():
    """Bytes past a complete response (here a whole second response in the
    same read) are nobody's: the first response is whole, the connection
    is not reused."""
    _, pool, ep = setup()
    d = send(pool, ep)
    proto = ep.protocols[0]
    proto.dataReceived(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        b"HTTP/1.1 500 Nobody Asked\r\nContent-Length: 3\r\n\r\nbad"
    )
    response = result(d)
    body = Body()
    response.deliverBody(body)
    assert response.code == 200
    assert b"".join(body.data) == b"ok" and body.reason.check(ResponseDone)
    assert "k" not in pool._idle or proto not in pool._idle["k"]
    assert proto.transport.disconnecting


def test_bare_lf_heads_are_refused():
    """llhttp requires CRLF line ends, so the fast path's CRLFCRLF search
    never meets a head that ends otherwise."""
    _, pool, ep = setup()
    d = send(pool, ep)
    ep.protocols[0].dataReceived(b"HTTP/1.1 200 OK\nContent-Length: 4\n\nbody")
    assert result(d).check(ResponseFailed)


def test_connection_lost_inside_a_known_length_body_fails_it():
    _, pool, ep = setup()
    d = send(pool, ep)
    proto = ep.protocols[0]
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    body = _read_all(proto, d)
    close(proto, ConnectionLost)
    assert b"".join(body.data) == b"abc"
    assert body.reason.check(ResponseFailed)


def test_close_delimited_body_is_potential_data_loss():
    _, pool, ep = setup()
    d = send(pool, ep)
    proto = ep.protocols[0]
    proto.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome")
    body = Body()
    result(d).deliverBody(body)
    close(proto)
    assert body.data == [b"some"] and body.reason.check(PotentialDataLoss)
    assert "k" not in pool._idle or not pool._idle["k"]


def test_truncated_body_fails():
    _, pool, ep = setup()
    d = send(pool, ep)
    proto = ep.protocols[0]
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nsome")
    body = Body()
    result(d).deliverBody(body)
    close(proto, ConnectionLost)
    assert body.reason.check(ResponseFailed)


def test_head_response_has_no_body_and_connection_is_reused():
    _, pool, ep = setup()
    d = send(pool, ep, b"HEAD")
    proto = ep.protocols[0]
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    response = result(d)
    assert response.length == 0
    assert response.headers.getRawHeaders(b"content-length") == [b"1000"]
    body = Body()
    response.deliverBody(body)
    assert body.reason.check(ResponseDone) and body.data == []
    assert pool._idle["k"] == [proto]


def test_304_has_no_body():
    _, pool, ep = setup()
    d = send(pool, ep)
    ep.protocols[0].dataReceived(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n")
    response = result(d)
    body = Body()
    response.deliverBody(body)
    assert response.length == 0 and body.reason.check(ResponseDone)


def test_100_continue_skipped():
    _, pool, ep = setup()
    d = send(pool, ep, b"POST", b"x")
    proto = ep.protocols[0]
    proto.dataReceived(b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n")
    early = []
    d.addBoth(lambda r: early.append(r) or r)
    assert not early
    proto.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    response = result(d)
    assert response.code == 201 and not response.headers.hasHeader(b"x-interim")


def test_connection_close_not_reused():
    _, pool, ep = setup()
    d = send(pool, ep)
    proto = ep.protocols[0]
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert result(d).code == 200
    assert proto.transport.disconnecting
    assert not pool._idle.get("k")


def test_http10_not_reused():
    _, pool, ep = setup()
    d = send(pool, ep)
    proto = ep.protocols[0]
    proto.dataReceived(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert result(d).code == 200 and proto.transport.disconnecting


def test_backend_closed_idle_connection_is_dropped():
    _, pool, ep = setup()
    d = send(pool, ep)
    proto = ep.protocols[0]
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    result(d)
    close(proto)
    assert not pool._idle["k"]
    send(pool, ep)
    assert len(ep.protocols) == 2


def test_reused_connection_closed_before_response_is_retried_once():
    reactor, pool, ep = setup()
    d = send(pool, ep)
    first = ep.protocols[0]
    first.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    result(d)
    d = send(pool, ep)  # goes out on the idle connection, which the backend has closed
    close(first, ConnectionLost)
    assert len(ep.protocols) == 2
    second = ep.protocols[1]
    assert second.transport.value().startswith(b"GET /p?q=1 ")
    second.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert result(d).code == 200


def test_cancel_during_retry_aborts_the_new_connection():
    _, pool, ep = setup()
    d = send(pool, ep)
    first = ep.protocols[0]
    first.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    result(d)
    d = send(pool, ep)
    close(first, ConnectionLost)
    d.cancel()
    assert result(d).check(CancelledError)
    assert ep.protocols[1].transport.disconnecting


def test_non_idempotent_request_not_retried():
    _, pool, ep = setup()
    d = send(pool, ep)
    first = ep.protocols[0]
    first.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    result(d)
    d = send(pool, ep, b"POST", b"x")
    close(first, ConnectionLost)
    assert result(d).check(ResponseNeverReceived)
    assert len(ep.protocols) == 1


def test_fresh_connection_failure_not_retried():
    _, pool, ep = setup()
    d = send(pool, ep)
    close(ep.protocols[0], ConnectionLost)
    assert result(d).check(ResponseNeverReceived)
    assert len(ep.protocols) == 1


def test_failure_after_partial_head_is_response_failed():
    _, pool, ep = setup()
    d = send(pool, ep)
    ep.protocols[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-")
    close(ep.protocols[0], ConnectionLost)
    assert result(d).check(ResponseFailed)


def test_garbage_fails_and_aborts():
    _, pool, ep = setup()
    d = send(pool, ep)
    ep.protocols[0].dataReceived(b"NOT HTTP AT ALL\r\n\r\n")
    assert result(d).check(ResponseFailed)
    assert ep.protocols[0].transport.disconnecting


def test_connect_failure_propagates():
    _, pool, _ = setup()
    d = send(pool, FakeEndpoint(refuse=True))
    assert result(d).check(ConnectionRefusedError)


def test_pause_and_resume_reach_the_socket():
    _, pool, ep = setup()
    d = send(pool, ep)
    proto = ep.protocols[0]
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
    body = Body()
    result(d).deliverBody(body)
    body.transport.pauseProducing()
    assert proto.transport.producerState == "paused"
    body.transport.resumeProducing()
    assert proto.transport.producerState == "producing"
    proto.dataReceived(b"abcdef")
    assert body.reason.check(ResponseDone)
    body.transport.stopProducing()  # after the end: the pooled connection is left alone
    assert not proto.transport.disconnecting and pool._idle["k"] == [proto]


def test_stop_producing_aborts_and_ends_body():
    _, pool, ep = setup()
    d = send(pool, ep)
    proto = ep.protocols[0]
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
    body = Body()
    result(d).deliverBody(body)
    body.transport.stopProducing()
    assert proto.transport.disconnecting
    close(proto, ConnectionLost)
    assert body.reason.check(ResponseFailed)
    assert not pool._idle.get("k")


def test_cancel_before_response_aborts_connection():
    _, pool, ep = setup()
    d = send(pool, ep)
    d.cancel()
    assert result(d).check(CancelledError)
    proto = ep.protocols[0]
    assert proto.transport.disconnecting
    close(proto, ConnectionLost)  # no second result
    assert not pool._idle.get("k")


def test_cancel_retrying_request():
    _, pool, ep = setup()
    d = send(pool, ep)
    ep.protocols[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    result(d)
    d = send(pool, ep)
    d.cancel()
    assert result(d).check(CancelledError)
    assert ep.protocols[0].transport.disconnecting


def test_idle_connections_time_out_and_close():
    reactor, pool, ep = setup()
    d = send(pool, ep)
    proto = ep.protocols[0]
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    result(d)
    reactor.advance(60)
    assert proto.transport.disconnecting
    close(proto)
    assert not pool._idle["k"] and not reactor.getDelayedCalls()


def test_each_idle_connection_closes_idle_timeout_after_its_release():
    """One sweep timer, set again for the oldest idle connection; reuse restarts the clock."""
    reactor, pool, ep = setup()
    first, second = send(pool, ep), send(pool, ep)  # two connections
    a, b = ep.protocols
    a.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    result(first)  # a idle from t=0
    reactor.advance(30)
    b.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    result(second)  # b idle from t=30
    assert len(reactor.getDelayedCalls()) == 1
    reactor.advance(29.9)
    assert not a.transport.disconnecting
    reactor.advance(0.1)  # t=60
    assert a.transport.disconnecting and not b.transport.disconnecting
    close(a)
    assert pool._idle["k"] == [b]
    reactor.advance(25)  # t=85: b is taken and released again
    third = send(pool, ep)
    assert b.reused
    b.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    result(third)
    reactor.advance(5)  # t=90, the sweep set for b's first release: b has been idle 5 s
    assert not b.transport.disconnecting
    reactor.advance(54.9)
    assert not b.transport.disconnecting
    reactor.advance(0.1)  # t=145 = 85 + 60
    assert b.transport.disconnecting
    close(b)
    assert not pool._idle["k"] and not reactor.getDelayedCalls()


def test_pool_close_waits_for_idle_connections():
    reactor, pool, ep = setup()
    d = send(pool, ep)
    proto = ep.protocols[0]
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    result(d)
    closed = pool.close()
    assert not closed.called and proto.transport.disconnecting
    close(proto)
    assert closed.called and not reactor.getDelayedCalls()


def test_max_idle():
    _, pool, ep = setup(max_idle=1)
    first, second = send(pool, ep), send(pool, ep)
    for proto in ep.protocols:
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    result(first), result(second)
    assert len(pool._idle["k"]) == 1
    assert ep.protocols[1].transport.disconnecting


# --- over real sockets, both clients of the forwarder --------------------------

import pytest
import pytest_twisted
from twisted.internet.defer import inlineCallbacks as _inline
from twisted.web import resource, server

from gateway.config import Backend, Service
from gateway.forwarding import ServiceForwarder
from gateway.upstream import UpstreamResponse


class _Origin(resource.Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.peers = []

    def render(self, request):
        self.peers.append(request.channel.transport.getPeer().port)
        request.setHeader(b"x-method", request.method)
        request.responseHeaders.setRawHeaders(b"set-cookie", [b"a=1", b"b=2"])
        if request.path == b"/chunked":
            request.write(b"abc")
            request.write(b"def")
            request.finish()
            return server.NOT_DONE_YET
        return b"hello " + request.content.read()


@pytest.mark.parametrize("lean", [True, False])
@pytest_twisted.inlineCallbacks
def test_forwarder_over_sockets(lean):
    from twisted.internet import reactor
    from treq import content

    origin = _Origin()
    port = reactor.listenTCP(0, server.Site(origin), interface="127.0.0.1")
    backend = Backend.from_url(f"http://127.0.0.1:{port.getHost().port}")
    forwarder = ServiceForwarder(reactor, Service(name="s", backends=(backend,)), lean=lean)
    headers = Headers({b"Host": [backend.host_header]})
    try:
        r1 = yield forwarder.request(b"GET", backend, b"/", headers, None, 5.0)
        assert isinstance(r1, UpstreamResponse) is lean
        assert (yield content(r1)) == b"hello "
        assert r1.headers.getRawHeaders(b"set-cookie") == [b"a=1", b"b=2"]
        assert r1.connection_headers.getRawHeaders(b"content-length") == [b"6"]
        forwarder.limits.release(backend)
        r2 = yield forwarder.request(b"POST", backend, b"/", headers, b"there", 5.0)
        assert (yield content(r2)) == b"hello there"
        forwarder.limits.release(backend)
        r3 = yield forwarder.request(b"GET", backend, b"/chunked", headers, None, 5.0)
        assert r3.length is UNKNOWN_LENGTH and (yield content(r3)) == b"abcdef"
        forwarder.limits.release(backend)
        r4 = yield forwarder.request(b"HEAD", backend, b"/", headers, None, 5.0)
        assert (yield content(r4)) == b"" and r4.headers.getRawHeaders(b"x-method") == [b"HEAD"]
        forwarder.limits.release(backend)
        r5 = yield forwarder.request(b"GET", backend, b"/", headers, None, 5.0)
        assert (yield content(r5)) == b"hello "
        forwarder.limits.release(backend)
        assert len(set(origin.peers)) == 1  # one kept-alive connection carried them all
    finally:
        yield forwarder.close()
        yield port.stopListening()


class _TCPLikeTransport(StringTransport):
    """A StringTransport with the read size of Twisted's TCP transport."""

    bufferSize = 65536


def _connected_over(transport_class):
    _, pool, _ = setup()
    return pool, FakeEndpoint(transport=transport_class)


def test_a_large_known_length_body_is_read_in_larger_pieces_until_its_end():
    """
    Twisted's TCP transport reads bufferSize bytes at a time (64 KiB): for
    a body of more than LARGE_READ still to come the connection reads
    LARGE_READ, and goes back to 64 KiB for the next response.
    """
    from twisted.internet import tcp

    from gateway.upstream import LARGE_READ

    assert tcp.Connection.bufferSize == 65536  # what doRead passes to recv()
    pool, ep = _connected_over(_TCPLikeTransport)
    size = LARGE_READ + 10
    d = send(pool, ep)
    proto = ep.protocols[0]
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
    assert proto.transport.bufferSize == LARGE_READ
    body = _read_all(proto, d)
    proto.dataReceived(b"x" * LARGE_READ)
    assert proto.transport.bufferSize == LARGE_READ
    proto.dataReceived(b"x" * 10)
    assert body.reason.check(ResponseDone)
    assert proto.transport.bufferSize == 65536
    # a small body leaves the read size alone
    d = send(pool, ep)
    assert ep.protocols == [proto]
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert proto.transport.bufferSize == 65536
    proto.dataReceived(b"y" * 1000)
    assert result(d).code == 200


def test_a_transport_without_a_read_size_is_left_alone():
    """A TLS connection's transport has no bufferSize: nothing is set on it."""
    from gateway.upstream import LARGE_READ

    pool, ep = _connected_over(StringTransport)
    d = send(pool, ep)
    proto = ep.protocols[0]
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (LARGE_READ * 2))
    assert not hasattr(proto.transport, "bufferSize")
    body = _read_all(proto, d)
    proto.dataReceived(b"z" * (LARGE_READ * 2))
    assert body.reason.check(ResponseDone)
