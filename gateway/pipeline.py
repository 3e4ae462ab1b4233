"""
The request pipeline's extension points: request filters and direct answers.

A feature module (auth, rate limiting, CORS, caching, ...) registers a
filter factory with L{register_filter}; the gateway builds one filter per
factory, runs their C{on_request} in ascending C{order} before a request is
forwarded, and their C{on_response} just before response headers go out.
The documented order:

    0 request ID (core)  5 trace context  10 access log  20 IP rules
    30 CORS  40 auth  50 rate limit  60 cache  70 circuit breaker
    then forward

A filter is an object with (all optional but C{name}):

  - C{name}: L{str}.
  - C{on_request(request, context)}: returns None to continue, an
    L{Answer} to answer the client directly, or a Deferred firing with
    either. An exception becomes a 500 JSON answer carrying the request ID.
  - C{on_response(request, context)}: called once response headers are
    set (by the backend or an L{Answer}) and before they are written; it
    may add, change or remove C{request.responseHeaders}.
  - C{reconfigure(snapshot)}: called after a config reload.
  - C{service}: an L{IService} started with the gateway (GC loops,
    fetchers); None for none.

Per-route settings come from C{context.route.options[NAME]} (see
L{gateway.config.register}); per-request state goes in C{context.notes}.
Headers for the backend go in C{context.notes["upstream_headers"]}, a list
of C{(name, value)} byte pairs; each replaces the client's header of that
name, and a value of None removes it (L{gateway.proxy.apply_upstream_headers}).
"""

from __future__ import annotations

from typing import Callable

import attrs


@attrs.frozen
class Answer:
    """
    A response made by the gateway itself, not by a backend.

    @ivar status: the HTTP status code.
    @ivar headers: C{(name, value)} byte pairs, added in order.
    @ivar body: the body bytes, or None to send the JSON error body
        C{{"error": error, "request_id": ...}}.
    @ivar error: the error message for the JSON body.
    """

    status: int
    headers: tuple = ()
    body: "bytes | None" = None
    error: str = ""

    @classmethod
    def error_(cls, status: int, message: str, headers: tuple = ()) -> "Answer":
        """A JSON error answer."""
        return cls(status=status, headers=headers, body=None, error=message)


@attrs.frozen(order=True)
class FilterSpec:
    order: int
    name: str
    factory: Callable = attrs.field(order=False)


#: Registered filters, by name.
FILTERS: dict[str, FilterSpec] = {}


def register_filter(order: int, name: str, factory: Callable) -> None:
    """
    Add a filter to every gateway built from now on.

    @param order: position in the pipeline (see the module docstring).
    @param factory: called with the L{gateway.state.Gateway}, returns the
        filter object.
    """
    FILTERS[name] = FilterSpec(order, name, factory)


def build_filters(gateway) -> tuple:
    """One filter per registered factory, in pipeline order."""
    return tuple(spec.factory(gateway) for spec in sorted(FILTERS.values()))
