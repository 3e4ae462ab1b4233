"""
CORS per route (C{routes[].cors}, default at the top level): the gateway
answers preflights itself and adds the policy's headers to every other
response of the route, replacing the backend's own C{Access-Control-*}
headers. See L{gateway.cors.CorsPolicy} for the rules.

    cors:
      allowed_origins: ["https://app.example.com", "https://*.example.com"]
      allowed_methods: [GET, POST, PUT]       # default GET, HEAD, POST
      allowed_headers: [Authorization, Content-Type]
      exposed_headers: [X-Request-Id]
      allow_credentials: true
      max_age: 10m                            # preflight cache; absent: not sent

A preflight (C{OPTIONS} with C{Origin} and C{Access-Control-Request-Method})
is matched to its route by the method it asks about when no route takes
C{OPTIONS}; it is answered 204 when allowed and 403 otherwise, before
authentication (preflights carry no credentials). C{cors: false} turns a
top-level default off on a route.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.logger import Logger

from gateway.config import (
    Extension,
    ParseContext,
    Section,
    Where,
    boolean,
    duration,
    register,
    string_list,
)
from gateway.cors import CORS_RESPONSE_HEADERS, CorsPolicy, is_preflight
from gateway.pipeline import Answer, register_filter
from gateway.proxy import PREFLIGHT_BY_REQUESTED_METHOD

NAME = "cors"
ORDER = 30

_log = Logger()


def _checked(build, where: Where, value: Any):
    try:
        return build(where, value)
    except ValueError as e:
        raise where.error(str(e)) from None


def parse(where: Where, value: Any, context: ParseContext) -> Optional[CorsPolicy]:
    """
    A mapping (see the module docstring), or C{false} for no CORS.

    @raise ConfigError: a malformed origin, method or header name, no
        origin, or C{*} exposed headers with credentials.
    """
    if value is False:
        return None
    section = Section(where, value)

    def names(key: str, check, default):
        place = section.at(key)
        values = section.take(key, string_list, default)
        try:
            check(values)
        except ValueError as e:
            raise place.error(str(e)) from None
        return values

    if not section.has("allowed_origins"):
        raise where.error("missing required key 'allowed_origins'")
    origins = names("allowed_origins", lambda v: CorsPolicy(allowed_origins=v), ())
    methods = names("allowed_methods", lambda v: CorsPolicy(("*",), allowed_methods=v), ("GET", "HEAD", "POST"))
    allowed = names("allowed_headers", lambda v: CorsPolicy(("*",), allowed_headers=v), ())
    exposed = names("exposed_headers", lambda v: CorsPolicy(("*",), exposed_headers=v), ())
    credentials = section.take("allow_credentials", boolean, False)
    max_age = section.take("max_age", duration, None)
    try:
        policy = CorsPolicy(
            allowed_origins=origins,
            allowed_methods=methods,
            allowed_headers=allowed,
            exposed_headers=exposed,
            allow_credentials=credentials,
            max_age=None if max_age is None else int(max_age),
        )
    except ValueError as e:
        raise where.error(str(e)) from None
    section.finish()
    return policy


register("route", Extension(NAME, parse, default=None, top_default=True))

_PREFLIGHT = "preflight"


class CorsFilter:
    """Answers preflights; puts the route's CORS headers on responses."""

    name = NAME

    def __init__(self, gateway) -> None:
        pass

    def on_request(self, request, context) -> Optional[Answer]:
        policy = context.route.options.get(NAME)
        headers = request.requestHeaders
        if policy is None:
            if context.notes.get(PREFLIGHT_BY_REQUESTED_METHOD):
                # The route takes the method the preflight asks about, not
                # OPTIONS, and has no CORS policy of its own to answer with.
                context.error = "no route"
                return Answer.error_(404, "no route matches the request")
            return None
        if not is_preflight(request.method, headers):
            return None
        context.notes[NAME] = _PREFLIGHT
        result = policy.preflight(headers)
        if result.allowed:
            return Answer(status=204, headers=result.headers, body=b"")
        context.error = "CORS preflight refused"
        _log.info(
            "CORS preflight refused on route {route}: {reason}",
            route=context.route.name,
            reason=result.reason,
            request_id=context.request_id,
        )
        return Answer.error_(403, f"CORS preflight refused: {result.reason}", result.headers)

    def on_response(self, request, context) -> None:
        if context.route is None or context.notes.get(NAME) == _PREFLIGHT:
            return
        policy = context.route.options.get(NAME)
        if policy is None:
            return
        response_headers = request.responseHeaders
        for name in CORS_RESPONSE_HEADERS:
            response_headers.removeHeader(name)
        for name, value in policy.response_headers(request.requestHeaders):
            response_headers.addRawHeader(name, value)


register_filter(ORDER, NAME, CorsFilter)
