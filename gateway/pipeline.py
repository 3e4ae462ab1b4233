"""
The request pipeline's extension points: request filters and direct answers.

A feature module (auth, rate limiting, CORS, caching, ...) registers a
filter factory with L{register_filter}; the gateway builds one filter per
factory, runs their C{on_request} in ascending C{order} before a request is
forwarded, and their C{on_response} just before response headers go out.
The documented order:

    0 request ID (core)  5 trace context and access log  20 IP rules
    30 CORS  40 auth  50 rate limit  55 rewrite  60 cache
    70 circuit breaker  then forward

(Rewrite comes before the cache so that the cache's own backend fetches,
for collapsed misses and revalidation, go to the rewritten path with the
rewritten and credential-stripped headers.)

(15 security headers has only C{on_response}.) C{on_response} runs in the
same order, so a later filter has the last word on a response header.

A filter is an object with (all optional but C{name}):

  - C{name}: L{str}.
  - C{on_request(request, context)}: returns None to continue, an
    L{Answer} to answer the client directly, or a Deferred firing with
    either. An exception becomes a 500 JSON answer carrying the request ID.
  - C{on_unrouted(request, context)}: called, in place of C{on_request},
    for a request that no route matches, before the gateway answers it
    404, and for a request the listener refuses before routing (408,
    413, 414, 431; then C{request} has only C{requestHeaders}, those
    received so far, and C{clientproto}); for filters that record what
    such a request carried (the access log's user agent and headers).
    Its result is ignored and an exception is logged.
  - C{on_response(request, context)}: called once response headers are
    set (by the backend or an L{Answer}) and before they are written; it
    may add, change or remove C{request.responseHeaders}.
  - C{on_upstream_response(request, context, response)}: called with the
    backend's L{IResponse} before it is relayed. Returns None to relay it;
    an L{Answer} to answer with instead (the backend body is discarded); a
    wrapper of C{response} to relay in its place (it must deliver the same
    body: the proxy still releases the backend's connection slot when the
    body ends); or a Deferred firing with one of these. The first filter
    that returns something other than None decides.
  - C{on_upstream_failure(request, context, failure)}: called when no
    response came (a L{gateway.forwarding.UpstreamError}); returns None for
    the usual error answer, or an L{Answer} (or a Deferred firing with
    either) to send instead.
  - C{reconfigure(snapshot)}: called after a config reload.
  - C{service}: an L{IService} started with the gateway (GC loops,
    fetchers); None for none.
  - C{admin_children}: a mapping of path segment (L{bytes}) to a
    L{Resource} put on the admin listener (C{/cache}, ...).

Per-route settings come from C{context.route.options[NAME]} (see
L{gateway.config.register}); per-request state goes in C{context.notes}.

What is forwarded, a filter changes through the request's context
(L{gateway.proxy.RequestContext}), never by editing the client's request:

  - C{context.upstream_remove}: a set of lower-case header names removed
    from the forwarded request (credentials, headers clients must not
    forge).
  - C{context.upstream_headers}: a list of C{(name, value)} byte pairs set
    on the forwarded request after the gateway has built its headers
    (C{Host}, C{X-Forwarded-*}, C{Via}, C{X-Request-Id}) and removed those
    of C{upstream_remove}: the first pair of a name replaces that header,
    later pairs of the same name add values.
  - C{context.upstream_path}: the path to forward instead of the route's
    (L{gateway.proxy.route_path}); C{context.query} is the query string
    forwarded, with its C{?}.
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
