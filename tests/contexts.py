"""Finished request contexts for observer tests, without a network."""

from __future__ import annotations

from typing import Optional

from gateway.config import parse_config
from gateway.proxy import RequestContext

CONFIG = """
listen: tcp:0
admin: {listen: "tcp:0"}
services:
  users:
    backends: [{url: "http://127.0.0.1:9001"}, {url: "http://127.0.0.1:9002"}]
  orders:
    backends: [{url: "http://127.0.0.1:9003"}]
routes:
  - {name: users-api, match: {path_prefix: /users}, service: users}
  - {name: orders-api, match: {path_prefix: /orders}, service: orders}
"""


def config(text: str = CONFIG):
    return parse_config(text, "test.yaml")


def finished(
    config,
    route: Optional[str] = "users-api",
    backend: Optional[int] = 0,
    method: bytes = b"GET",
    path: bytes = b"/users/7",
    status: int = 200,
    started: float = 1000.0,
    duration: float = 0.012,
    upstream: Optional[float] = 0.010,
    client_ip: str = "192.0.2.1",
    cache: Optional[str] = None,
    notes: Optional[dict] = None,
    request_id: str = "req-1",
) -> RequestContext:
    """A L{RequestContext} as the proxy leaves it when the request ends."""
    context = RequestContext(request_id, method, path, client_ip, started)
    if route is not None:
        r = next(r for r in config.routes if r.name == route)
        context.route = r
        context.service = r.service
        if backend is not None:
            context.backend = config.services[r.service].backends[backend]
            if upstream is not None:
                context.upstream_started = started + 0.001
                context.upstream_ended = started + 0.001 + upstream
    context.status = status
    context.ended = started + duration
    context.bytes_out = 123
    context.cache = cache
    if notes:
        context.notes.update(notes)
    return context
