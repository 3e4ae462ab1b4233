"""How the forwarder connects to backends."""

import time

import pytest_twisted
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import URI
from zope.interface.verify import verifyObject
from twisted.web.iweb import IAgentEndpointFactory

from gateway.config import Backend, Service
from gateway.forwarding import BackendEndpoints, ServiceForwarder, UpstreamError
from twisted.web.http_headers import Headers
from tests.harness import closed_port


def test_ip_literals_connect_directly_and_names_through_hostname_endpoint():
    endpoints = BackendEndpoints(MemoryReactorClock(), 1.5)
    verifyObject(IAgentEndpointFactory, endpoints)
    v4 = endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:9001/x"))
    assert isinstance(v4, TCP4ClientEndpoint) and v4._timeout == 1.5
    v6 = endpoints.endpointForURI(URI.fromBytes(b"http://[::1]:9001/x"))
    assert isinstance(v6, TCP6ClientEndpoint) and v6._host == "::1"
    named = endpoints.endpointForURI(URI.fromBytes(b"http://backend.internal:9001/x"))
    assert isinstance(named, HostnameEndpoint)
    tls = endpoints.endpointForURI(URI.fromBytes(b"https://127.0.0.1:9443/x"))
    assert isinstance(tls._wrappedEndpoint, TCP4ClientEndpoint)


@pytest_twisted.inlineCallbacks
def test_a_refused_connection_fails_at_once():
    # HostnameEndpoint would take its 0.3 s attempt delay to give up.
    from twisted.internet import reactor

    backend = Backend.from_url(f"http://127.0.0.1:{closed_port()}")
    forwarder = ServiceForwarder(reactor, Service(name="s", backends=(backend,)))
    started = time.monotonic()
    try:
        yield forwarder.request(b"GET", backend, b"/", Headers(), None, 5.0)
    except UpstreamError as e:
        assert e.kind == "connect_failure"
    else:
        raise AssertionError("the request succeeded")
    assert time.monotonic() - started < 0.2
    yield forwarder.close()
