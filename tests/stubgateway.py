"""
The gateway's resource tree without sockets, for filter tests.

L{StubGateway} builds a L{Gateway} from YAML on a L{MemoryReactorClock},
serves its L{ProxyResource} through L{treq.testing.StubTreq}, and forwards
to an in-memory backend (L{EchoBackend}) through a L{RequestTraversalAgent}
given to every service's forwarder. L{StubGateway.request} pumps both until
the answer is complete, so tests stay synchronous.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from functools import partial
from typing import Optional

from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from gateway import state
from gateway.config import parse_config
from gateway.forwarding import ServiceForwarder
from gateway.proxy import ProxyResource
from gateway.state import Gateway

BASE = """
listen: tcp:0
admin: {listen: null}
services:
  svc:
    backends: [{url: "http://backend.test:9001"}]
"""


class EchoBackend(Resource):
    """
    Answers every request with a JSON echo of its method, URI and headers;
    C{/status/NNN} answers NNN. Extra response headers come from
    L{response_headers}. Each request is kept in L{requests}.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list = []
        #: (name, value) byte pairs added to every response.
        self.response_headers: list = []

    def render(self, request) -> bytes:
        self.requests.append(request)
        for name, value in self.response_headers:
            request.responseHeaders.addRawHeader(name, value)
        if request.path.startswith(b"/status/"):
            request.setResponseCode(int(request.path.split(b"/")[2]))
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(
            {
                "method": request.method.decode(),
                "uri": request.uri.decode("latin-1"),
                "headers": [
                    [k.decode("latin-1"), v.decode("latin-1")]
                    for k, vs in request.requestHeaders.getAllRawHeaders()
                    for v in vs
                ],
                "body": request.content.read().decode("latin-1"),
            }
        ).encode()


class Answer:
    """A response as the client saw it."""

    def __init__(self, response, body: bytes) -> None:
        self.code = response.code
        self.headers = response.headers
        self.body = body

    def header(self, name: str) -> Optional[str]:
        values = self.headers.getRawHeaders(name.encode("latin-1"))
        return values[0].decode("latin-1") if values else None

    def all(self, name: str) -> list:
        return [v.decode("latin-1") for v in self.headers.getRawHeaders(name.encode("latin-1"), [])]

    def json(self):
        return json.loads(self.body)

    def upstream_header(self, name: str) -> list:
        """The values of header C{name} the backend received (echoed)."""
        return [v for k, v in self.json()["headers"] if k.lower() == name.lower()]


@contextmanager
def forwarding_to(agent):
    """Services built inside this block forward through C{agent}."""
    original = state.ServiceForwarder
    state.ServiceForwarder = partial(ServiceForwarder, agent=agent)
    try:
        yield
    finally:
        state.ServiceForwarder = original


class StubGateway:
    """
    A gateway built from C{config_text} (YAML; L{BASE} is a good start)
    in front of C{backend}.

    @ivar filter_factories: filter name -> factory(gateway), replacing the
        registered ones (to inject fakes).
    """

    def __init__(self, config_text: str, backend: Optional[Resource] = None, filter_factories=None) -> None:
        self.backend = backend if backend is not None else EchoBackend()
        self.backend_agent = RequestTraversalAgent(self.backend)
        self.reactor = MemoryReactorClock()
        self.config = parse_config(config_text, "test.yaml")
        with forwarding_to(self.backend_agent):
            self.gateway = Gateway(self.reactor, self.config)
        if filter_factories:
            self.gateway.filters = tuple(
                filter_factories[f.name](self.gateway) if f.name in filter_factories else f
                for f in self.gateway.filters
            )
        self.client = StubTreq(ProxyResource(self.gateway))
        #: Every finished RequestContext, in order.
        self.contexts: list = []
        self.gateway.request_observers.append(self.contexts.append)

    def filter(self, name: str):
        """The gateway's filter called C{name}."""
        return next(f for f in self.gateway.filters if f.name == name)

    def reload(self, config_text: str) -> None:
        """Apply a new config, as a reload would."""
        with forwarding_to(self.backend_agent):
            self.gateway.apply(parse_config(config_text, "test.yaml"))

    def pump(self, *extra_flush) -> None:
        for _ in range(3):
            self.client.flush()
            self.backend_agent.flush()
            for flush in extra_flush:
                flush()

    def request(self, method: str, path: str, headers=None, body: Optional[bytes] = None,
                host: str = "gateway.test", extra_flush=()) -> Answer:
        """
        One request through the gateway, answered synchronously.

        @raise AssertionError: it did not complete.
        """
        d = self.client.request(method, f"http://{host}{path}", headers=headers, data=body)
        results: list = []
        d.addBoth(results.append)
        for _ in range(10):
            if results:
                break
            self.pump(*extra_flush)
        assert results, f"{method} {path}: no response"
        if isinstance(results[0], Failure):
            results[0].raiseException()
        response = results[0]
        content: list = []
        self.client.content(response).addBoth(content.append)
        for _ in range(10):
            if content:
                break
            self.pump(*extra_flush)
        assert content, f"{method} {path}: body never ended"
        if isinstance(content[0], Failure):
            content[0].raiseException()
        return Answer(response, content[0])
