"""
The main listener's channel: header count and size limits (431, 414), the
header deadline against slowloris clients (408) and the idle timeout, all
from C{limits:} in the config.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from gateway.config import ConfigError, Limits, parse_config
from gateway.proxy import GatewaySite
from gateway.state import Gateway

CONFIG = """
services:
  svc:
    backends: [{url: "http://127.0.0.1:9"}]
routes: []
limits:
%s
"""


def limits(**values) -> str:
    return "\n".join(f"  {k}: {v}" for k, v in values.items()) or "  {}"


def connect(extra: str = "", **values):
    reactor = MemoryReactorClock()
    gateway = Gateway(reactor, parse_config(CONFIG % limits(**values) + extra))
    site = GatewaySite(gateway, reactor=reactor)
    protocol = site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    protocol.makeConnection(transport)
    return reactor, protocol, transport


def answer(transport):
    """(status, headers dict, body) of what the gateway wrote."""
    raw = transport.value()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    return status, headers, body


def headers(n: int, size: int = 1) -> bytes:
    return b"".join(b"X-H%d: %s\r\n" % (i, b"v" * size) for i in range(n))


def test_defaults_and_config_keys():
    assert Limits() == Limits(10 * 1024 * 1024, 100, 16384, 60.0, 30.0)
    config = parse_config(CONFIG % limits(
        max_header_count=20, max_header_bytes="4KiB", client_idle_timeout="5s",
        client_header_timeout="500ms",
    ))
    assert config.limits == Limits(10 * 1024 * 1024, 20, 4096, 5.0, 0.5)
    # Giving some keys keeps the others' defaults.
    assert parse_config(CONFIG % limits(max_header_count=7)).limits.max_request_body == 10 * 1024 * 1024


@pytest.mark.parametrize(
    "key, value, reason",
    [
        ("max_header_count", 0, "must be at least 1"),
        ("max_header_bytes", 100, "must be between 1KiB and 1MiB"),
        ("client_idle_timeout", "soon", "expected a duration"),
        ("client_header_timeout", -1, "cannot be negative"),
    ],
)
def test_bad_limits_name_the_line(key, value, reason):
    with pytest.raises(ConfigError) as info:
        parse_config(CONFIG % limits(**{key: value}), "gw.yaml")
    assert info.value.line == 7
    assert f"limits.{key}: " in str(info.value) and reason in str(info.value)


def test_header_count_at_the_limit_is_served():
    _, protocol, transport = connect(max_header_count=5)
    protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: gw\r\n" + headers(4) + b"\r\n")
    status, _, body = answer(transport)
    assert status == 404  # parsed and routed (there are no routes)


def test_too_many_headers_get_431_with_a_request_id_and_close():
    reactor, protocol, transport = connect(max_header_count=5)
    reactor.rightNow = 784111777.25
    protocol.dataReceived(
        b"GET /x HTTP/1.1\r\nX-Request-Id: abc-1\r\n" + headers(5) + b"\r\n"
    )
    status, head, body = answer(transport)
    assert status == 431
    assert head[b"Connection"] == b"close" and head[b"X-Request-Id"] == b"abc-1"
    assert head[b"Date"] == b"Sun, 06 Nov 1994 08:49:37 GMT"  # the gateway's clock
    assert json.loads(body) == {"error": "too many request header fields", "request_id": "abc-1"}
    assert transport.disconnecting


def test_header_bytes_over_the_limit_get_431():
    _, protocol, transport = connect(max_header_bytes="1KiB")
    protocol.dataReceived(b"GET /x HTTP/1.1\r\n" + headers(3, 400) + b"\r\n")
    status, _, body = answer(transport)
    assert status == 431
    assert json.loads(body)["error"] == "request header fields too large"
    assert transport.disconnecting


def test_one_header_line_longer_than_the_limit_gets_431():
    # Longer than a line may be at all: Twisted would close without a word.
    _, protocol, transport = connect(max_header_bytes="1KiB")
    protocol.dataReceived(b"GET /x HTTP/1.1\r\nX-Big: " + b"v" * 3000)
    assert answer(transport)[0] == 431
    assert transport.disconnecting


def test_long_request_line_gets_414():
    _, protocol, transport = connect(max_header_bytes="1KiB")
    protocol.dataReceived(b"GET /" + b"a" * 1100 + b" HTTP/1.1\r\n\r\n")
    status, _, body = answer(transport)
    assert status == 414 and json.loads(body)["error"] == "request line too long"
    _, protocol, transport = connect(max_header_bytes="1KiB")
    protocol.dataReceived(b"GET /" + b"a" * 3000)  # not even a line end
    assert answer(transport)[0] == 414


def test_nothing_after_a_refusal_is_parsed():
    _, protocol, transport = connect(max_header_count=1)
    protocol.dataReceived(b"GET /x HTTP/1.1\r\n" + headers(2) + b"\r\nGET /y HTTP/1.1\r\n\r\n")
    assert transport.value().count(b"HTTP/1.1 ") == 1


def test_slowloris_headers_get_408_though_bytes_keep_coming():
    reactor, protocol, transport = connect(client_header_timeout="1s", client_idle_timeout="10s")
    protocol.dataReceived(b"GET /x HTTP/1.1\r\n")
    for _ in range(3):
        reactor.advance(0.3)
        protocol.dataReceived(b"X-A: b\r\n")  # each byte resets the idle timeout
    assert transport.value() == b""
    reactor.advance(0.2)
    status, _, body = answer(transport)
    assert status == 408 and json.loads(body)["error"] == "request headers not received in time"
    assert transport.disconnecting


def test_header_deadline_is_per_request_and_cancelled_when_headers_end():
    reactor, protocol, transport = connect(client_header_timeout="1s", client_idle_timeout=0)
    protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert answer(transport)[0] == 404
    assert reactor.getDelayedCalls() == []
    transport.clear()
    reactor.advance(5)  # idle between requests: not the header deadline's business
    protocol.dataReceived(b"GET /y HTTP/1.1\r\n")
    assert len(reactor.getDelayedCalls()) == 1
    reactor.advance(1)
    assert answer(transport)[0] == 408


def test_a_head_whole_in_one_read_sets_no_header_deadline():
    """The deadline is for heads that trickle in: one that came whole needs no timer."""
    reactor, protocol, transport = connect(client_header_timeout="7s", client_idle_timeout=0)
    armed = []
    channel = protocol._channel
    call_later = channel.callLater

    def recording(delay, *args, **kwargs):
        armed.append(delay)
        return call_later(delay, *args, **kwargs)

    channel.callLater = recording
    protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert answer(transport)[0] == 404
    assert 7.0 not in armed
    transport.clear()
    protocol.dataReceived(b"GET /y HTTP/1.1\r\nHost: gw\r\n\r\nGET /z HT")  # a whole head, then part of one
    assert armed.count(7.0) == 1
    reactor.advance(7)
    assert transport.value().count(b"HTTP/1.1 408 ") == 1


def test_refusals_carry_security_headers_and_reach_the_access_log():
    """A raw 4xx is a response like any other: security headers, one access event."""
    reactor, protocol, transport = connect(max_header_count=2)
    gateway = protocol._channel.site.gateway
    seen = []
    gateway.request_observers.append(seen.append)
    reactor.advance(10)
    protocol.dataReceived(b"GET /x?token=abc HTTP/1.1\r\nX-Request-Id: refused-1\r\n" + headers(3) + b"\r\n")
    status, sent, body = answer(transport)
    assert status == 431
    assert sent[b"X-Content-Type-Options"] == b"nosniff" and sent[b"X-Frame-Options"] == b"DENY"
    assert b"Strict-Transport-Security" not in sent  # not over TLS
    (context,) = seen
    assert (context.status, context.method, context.path, context.query) == (431, b"GET", b"/x", b"?token=abc")
    assert context.request_id == "refused-1" and context.client_ip == "192.0.2.7"
    assert context.route is None and context.error == "too many request header fields"
    assert context.started == context.ended == 10 and context.bytes_out == len(body)


def test_refusal_before_a_request_line_is_observed_too():
    reactor, protocol, transport = connect(max_header_bytes="1KiB")
    seen = []
    protocol._channel.site.gateway.request_observers.append(seen.append)
    protocol.dataReceived(b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n")
    assert answer(transport)[0] == 414
    (context,) = seen
    assert (context.status, context.method, context.path) == (414, b"-", b"")


def test_refusals_have_the_logged_request_headers():
    logged = "observability: {access_log: {headers: [User-Agent, X-H0, Host]}}\n"
    reactor, protocol, transport = connect(logged, max_header_count=2)
    seen = []
    protocol._channel.site.gateway.request_observers.append(seen.append)
    protocol.dataReceived(b"GET /x HTTP/1.1\r\nUser-Agent: ua/1\r\n" + headers(3) + b"\r\n")
    assert answer(transport)[0] == 431
    (context,) = seen
    # The headers received before the refusal.
    assert context.notes["request_headers"] == {"user-agent": "ua/1", "x-h0": "v", "host": None}
    reactor, protocol, transport = connect(logged, max_header_bytes="1KiB")
    seen = []
    protocol._channel.site.gateway.request_observers.append(seen.append)
    protocol.dataReceived(b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n")
    assert answer(transport)[0] == 414
    (context,) = seen
    assert context.notes["request_headers"] == {"user-agent": None, "x-h0": None, "host": None}


def test_no_security_headers_on_a_refusal_when_switched_off():
    reactor = MemoryReactorClock()
    gateway = Gateway(reactor, parse_config(CONFIG % limits(max_header_count=1) + "security_headers: false\n"))
    site = GatewaySite(gateway, reactor=reactor)
    protocol = site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET /x HTTP/1.1\r\n" + headers(2) + b"\r\n")
    status, sent, _ = answer(transport)
    assert status == 431 and b"X-Content-Type-Options" not in sent


def test_idle_client_is_disconnected():
    reactor, protocol, transport = connect(client_idle_timeout="2s")
    reactor.advance(1.9)
    assert not transport.disconnecting
    reactor.advance(0.2)
    assert transport.disconnecting and transport.value() == b""


def test_zero_turns_the_timeouts_off():
    reactor, protocol, transport = connect(client_idle_timeout=0, client_header_timeout=0)
    protocol.dataReceived(b"GET /x HTTP/1.1\r\n")
    assert reactor.getDelayedCalls() == []
    protocol.connectionLost(None)


def test_connection_lost_cancels_the_header_deadline():
    reactor, protocol, transport = connect(client_header_timeout="1s", client_idle_timeout=0)
    protocol.dataReceived(b"GET /x HTTP/1.1\r\n")
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    protocol.connectionLost(Failure(ConnectionDone()))
    assert reactor.getDelayedCalls() == []


def connect_routed(**values):
    """L{connect} with a route to a backend that never answers."""
    reactor = MemoryReactorClock()
    text = CONFIG.replace("routes: []", "routes: [{name: r, match: {path_prefix: /}, service: svc}]")
    gateway = Gateway(reactor, parse_config(text % limits(**values)))
    site = GatewaySite(gateway, reactor=reactor)
    protocol = site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    protocol.makeConnection(transport)
    return reactor, protocol, transport


def test_idle_timeout_waits_while_a_request_is_in_flight():
    reactor, protocol, transport = connect_routed(client_idle_timeout="2s")
    protocol.dataReceived(b"GET /slow HTTP/1.1\r\nHost: gw\r\n\r\n")
    reactor.advance(10)  # the backend has not answered: not idle
    assert not transport.disconnecting and transport.value() == b""
    reactor.advance(21)  # the response timeout (30 s) answers the client
    assert answer(transport)[0] == 504
    reactor.advance(1.9)  # idle from the end of the response
    assert not transport.disconnecting
    reactor.advance(0.2)
    assert transport.disconnecting


def test_connection_lost_cancels_the_idle_timeout():
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    reactor, protocol, transport = connect(client_idle_timeout="2s", client_header_timeout=0)
    protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert reactor.getDelayedCalls() != []
    protocol.connectionLost(Failure(ConnectionDone()))
    assert reactor.getDelayedCalls() == []


def test_pausing_with_no_request_in_progress_cancels_the_idle_timeout():
    reactor, protocol, transport = connect(client_idle_timeout="2s", client_header_timeout=0)
    assert reactor.getDelayedCalls() != []
    protocol._channel.setTimeout(None)  # as the switch to HTTP/2 does
    assert reactor.getDelayedCalls() == []


def test_response_head_written_as_twisted_writes_it_in_one_piece():
    """
    GatewayChannel.writeHeaders: the same bytes as Twisted's
    HTTPChannel.writeHeaders, in one write instead of a sequence; a plain
    list of fields still goes through Twisted's sanitising path.
    """
    from twisted.web import http
    from twisted.web.http_headers import Headers

    from gateway.proxy import GatewayChannel

    def written(channel_class, headers):
        channel = channel_class()
        transport = StringTransport()
        writes = []
        transport.writeSequence = lambda seq: writes.append(list(seq)) or StringTransport.writeSequence(transport, seq)
        transport.write = lambda data: writes.append(data) or StringTransport.write(transport, data)
        channel.transport = transport
        channel.writeHeaders(b"HTTP/1.1", b"200", b"OK", headers)
        return transport.value(), writes

    headers = Headers({b"Content-Type": [b"text/plain"], b"Set-Cookie": [b"a=1", b"b=2"], b"X-Empty": [b""]})
    ours, writes = written(GatewayChannel, headers)
    theirs, _ = written(http.HTTPChannel, headers)
    assert ours == theirs
    assert ours.startswith(b"HTTP/1.1 200 OK\r\n") and ours.endswith(b"\r\n\r\n")
    assert b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n" in ours
    assert writes == [ours]  # one piece
    # Not a Headers: Twisted's own method, which sanitises the values.
    raw, _ = written(GatewayChannel, [(b"X-Bad", b"a\r\nInjected: yes")])
    assert raw == written(http.HTTPChannel, [(b"X-Bad", b"a\r\nInjected: yes")])[0]
    assert b"\r\nInjected: yes" not in raw


@pytest.mark.parametrize(
    "line, status",
    [(b"GET /nowhere HTTP/1.1", 404), (b"OPTIONS * HTTP/1.1", 200), (b"GET * HTTP/1.1", 405)],
)
def test_answers_have_the_gateway_clock_date_and_no_server_field(line, status):
    """
    GatewayRequest.process: the Date of the gateway's own answers comes
    from its reactor's clock (formatted once a second), and no Server field
    names Twisted, also on the requests for "*" that Twisted answers.
    """
    reactor, protocol, transport = connect()
    reactor.rightNow = 784111777.25  # not advance(): that would fire the idle timeout
    protocol.dataReceived(line + b"\r\nHost: a\r\n\r\n")
    got, fields, _ = answer(transport)
    assert got == status
    assert fields[b"Date"] == b"Sun, 06 Nov 1994 08:49:37 GMT"
    assert b"Server" not in fields
    assert len(fields[b"X-Request-Id"]) >= 16  # a new one, as on every answer


@pytest.mark.parametrize("method, status, error", [(b"OPTIONS", 200, None), (b"GET", 405, "method not allowed")])
def test_requests_for_star_keep_the_client_id_and_are_observed(method, status, error):
    """
    The answers to a request for "*" (Twisted's) carry the client's
    X-Request-Id and the security headers, and reach the request observers
    (access log, metrics) with no route.
    """
    reactor, protocol, transport = connect()
    observed = []
    protocol._channel.site.gateway.request_observers.append(observed.append)
    protocol.dataReceived(method + b" * HTTP/1.1\r\nHost: a\r\nX-Request-Id: star-1\r\n\r\n")
    got, fields, body = answer(transport)
    assert (got, body) == (status, b"")
    assert fields[b"X-Request-Id"] == b"star-1"
    assert fields[b"X-Content-Type-Options"] == b"nosniff"  # the default security headers
    [context] = observed
    assert (context.status, context.request_id, context.method, context.path, context.error) == (
        status, "star-1", method, b"*", error,
    )
    assert context.route is None


def test_request_args_hold_the_query_only():
    """A form body is the backend's: not parsed into request.args (GatewaySite)."""
    reactor, protocol, transport = connect_routed()
    body = b"a=1&b=2"
    protocol.dataReceived(
        b"POST /x?q=1 HTTP/1.1\r\nHost: a\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    [request] = protocol._channel.requests
    assert request.args == {b"q": [b"1"]}
    assert request.content.getvalue() == body


def test_twisted_request_process_is_the_one_gateway_request_process_copies():
    """
    GatewayRequest.process copies Twisted's server.Request.process (25.5 and
    26.10 alike) but for the Server and Date fields: when Twisted changes
    its process, this fails, and the copy must be looked at again.
    """
    import hashlib
    import inspect
    import re

    from twisted.web import server

    source = inspect.getsource(server.Request.process)
    code = re.sub(r'"""(.|\n)*?"""', "", source)
    code = "\n".join(line.strip() for line in code.splitlines() if line.strip() and not line.strip().startswith("#"))
    assert hashlib.sha256(code.encode()).hexdigest()[:16] == "55113f8ab2ddcfd1", code


def test_http2_body_over_the_limit_gets_413_on_its_stream_with_date_id_and_an_observer(monkeypatch):
    """
    On HTTP/2 a body over C{max_request_body} is refused on its stream (not
    with raw bytes on the shared connection), with what an HTTP/1.1 refusal
    carries: the client's X-Request-Id, a Date from the gateway's clock, the
    security headers, and a report to the request observers.
    """
    h2 = pytest.importorskip("h2.connection")
    import h2.config
    import h2.events
    from twisted.web import _http2, http

    reactor = MemoryReactorClock()
    reactor.rightNow = 784111777.25
    # Twisted makes the connection with the global reactor: this one instead.
    monkeypatch.setattr(http, "H2Connection", lambda: _http2.H2Connection(reactor))
    gateway = Gateway(reactor, parse_config(CONFIG % limits(max_request_body="1KiB")))
    observed = []
    gateway.request_observers.append(observed.append)
    site = GatewaySite(gateway, reactor=reactor)
    protocol = site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    transport.negotiatedProtocol = b"h2"
    protocol.makeConnection(transport)

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [
        (":method", "POST"), (":path", "/upload"), (":scheme", "https"), (":authority", "gw"),
        ("x-request-id", "h2-big"), ("content-length", "5000"),
    ])
    client.send_data(1, b"z" * 5000, end_stream=True)
    protocol.dataReceived(client.data_to_send())
    reactor.advance(0)  # H2Connection sends the stream's data at the next turn

    events = client.receive_data(transport.value())
    [response] = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    fields = {name: value for name, value in response.headers}
    body = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert fields[b":status"] == b"413"
    assert fields[b"x-request-id"] == b"h2-big"
    assert fields[b"date"] == b"Sun, 06 Nov 1994 08:49:37 GMT"
    assert json.loads(body) == {"error": "request body too large", "request_id": "h2-big"}
    [context] = observed
    assert (context.status, context.request_id, context.method, context.path) == (
        413, "h2-big", b"POST", b"/upload",
    )
    assert context.error == "request body too large" and context.route is None
    assert not transport.disconnecting  # the connection's other streams go on


def test_a_client_gone_before_its_answer_is_observed_as_499_and_its_attempt_stopped():
    """
    The proxy learns of a request's end from C{request.notifications}
    (without notifyFinish's Deferred): a client that closes its connection
    while the backend has not answered is observed with status 499, and the
    attempt in flight is cancelled (its connection slot given back).
    """
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    reactor, protocol, transport = connect_routed()
    gateway = protocol._channel.site.gateway
    observed = []
    gateway.request_observers.append(observed.append)
    protocol.dataReceived(b"GET /slow HTTP/1.1\r\nHost: gw\r\nX-Request-Id: gone-1\r\n\r\n")
    [runtime] = gateway.snapshot.services.values()
    [backend] = runtime.service.backends
    assert runtime.forwarder.limits.active(backend) == 1  # the attempt holds a slot
    protocol.connectionLost(Failure(ConnectionDone()))
    [context] = observed
    assert (context.status, context.request_id) == (499, "gone-1")
    assert runtime.forwarder.limits.active(backend) == 0


def test_an_answered_request_is_observed_once_and_an_error_in_ending_it_is_logged(monkeypatch):
    """
    A request answered by the gateway (no route: 404) reaches the observers
    once, with its status; what ending a request raises is logged, and the
    connection goes on to its next request.
    """
    from twisted.logger import globalLogPublisher

    from gateway.proxy import ProxyResource

    reactor, protocol, transport = connect()
    observed = []
    protocol._channel.site.gateway.request_observers.append(observed.append)
    protocol.dataReceived(b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [c.status for c in observed] == [404]

    def broken(self, result, request, context):
        raise RuntimeError("broken end")

    monkeypatch.setattr(ProxyResource, "_finished", broken)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        transport.clear()
        protocol.dataReceived(b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert answer(transport)[0] == 404
    [event] = [e for e in events if "log_failure" in e]
    assert event["log_failure"].check(RuntimeError) and event["log_format"] == "ending a request failed"
    transport.clear()
    protocol.dataReceived(b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n")
    assert answer(transport)[0] == 404


def test_a_client_gone_once_the_backend_connection_is_made_aborts_it_and_frees_the_slot():
    """
    With the backend's connection made and the request sent, the
    forwarder's Deferred is called (paused on the response): a client that
    goes away must still stop the attempt, aborting the backend connection
    and giving its slot back, rather than leave both taken until the
    backend answers or the timeout fires.
    """
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    reactor, protocol, transport = connect_routed()
    gateway = protocol._channel.site.gateway
    protocol.dataReceived(b"GET /slow HTTP/1.1\r\nHost: gw\r\n\r\n")
    [runtime] = gateway.snapshot.services.values()
    [backend] = runtime.service.backends
    host, port, factory, _, _ = reactor.tcpClients[0]
    upstream = factory.buildProtocol(IPv4Address("TCP", host, port))
    backend_transport = StringTransport()
    upstream.makeConnection(backend_transport)
    reactor.advance(0)
    assert backend_transport.value().startswith(b"GET /slow HTTP/1.1\r\n")  # sent
    assert runtime.forwarder.limits.active(backend) == 1
    protocol.connectionLost(Failure(ConnectionDone()))
    assert runtime.forwarder.limits.active(backend) == 0
    assert backend_transport.disconnecting or getattr(backend_transport, "aborting", False)
