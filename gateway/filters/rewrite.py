"""
Rewrites per route (C{routes[].rewrite}): the forwarded path, and headers
of the forwarded request and of the response.

    rewrite:
      replace_prefix: /v2                 # /api/users/7 -> /v2/7 (prefix /api/users)
      regex: ["^/v2/(\\\\d+)$", "/v2/item/\\\\1"]   # then: first match replaced
      request_headers:
        add: {X-Via-Gateway: "1"}        # appended to the client's values
        set: {X-Tenant: acme}            # replaces the client's values
        remove: [Cookie]
      response_headers:
        add: {Cache-Control: "no-transform"}
        set: {X-Served-By: gateway}
        remove: [X-Powered-By]

The path is worked out in this order: the route's prefix is replaced by
C{replace_prefix} (which then takes precedence over C{strip_prefix}), or
stripped when the route says C{strip_prefix: true}; then the first match of
C{regex} (a Python regular expression, on the percent-encoded path) is
replaced by its replacement (C{\\1}, C{\\g<name>} refer to groups). The query
string is kept. Request header changes apply after the gateway has set
C{Host}, C{X-Forwarded-*}, C{Via} and C{X-Request-Id}, so they can change
those too. Response header changes apply last, after CORS and the security
headers, to the backend's responses and the gateway's own answers.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import attrs

from gateway.config import (
    Extension,
    ParseContext,
    Section,
    Where,
    mapping_items,
    register,
    sequence,
    string,
)
from gateway.pipeline import register_filter
from gateway.proxy import route_path

NAME = "rewrite"
ORDER = 55  # before the cache, whose own backend fetches use the rewritten path

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_FIELD_VALUE = re.compile(r"^[\t\x20-\x7e]*$")
_GROUP_REFERENCE = re.compile(r"\\(?:(\d+)|g<([^>]*)>)")


@attrs.frozen
class HeaderRewrite:
    """
    @ivar add: C{(name, value)} byte pairs appended.
    @ivar set: C{(name, value)} byte pairs replacing a header's values.
    @ivar remove: lower-case names removed.
    """

    add: tuple = ()
    set: tuple = ()
    remove: frozenset = frozenset()

    def apply(self, headers) -> None:
        """Apply to a L{Headers} in place: remove, then set, then add."""
        for name in self.remove:
            headers.removeHeader(name)
        for name, value in self.set:
            headers.setRawHeaders(name, [value])
        for name, value in self.add:
            headers.addRawHeader(name, value)


@attrs.frozen
class Rewrite:
    """
    One route's rewrites.

    @ivar replace_prefix: what replaces the route's path prefix, or None.
    @ivar regex: C{(compiled bytes pattern, replacement bytes)} or None.
    """

    replace_prefix: Optional[bytes] = None
    regex: Optional[tuple] = None
    request_headers: HeaderRewrite = HeaderRewrite()
    response_headers: HeaderRewrite = HeaderRewrite()

    def path(self, route, path: bytes) -> bytes:
        """The path to forward for the normalised request C{path}."""
        if self.replace_prefix is not None:
            prefix = route.match.path_prefix.encode("utf-8")
            rest = path if prefix == b"/" else path[len(prefix):]
            path = self.replace_prefix.rstrip(b"/") + rest
        else:
            path = route_path(route, path)
        if self.regex is not None:
            pattern, replacement = self.regex
            path = pattern.sub(replacement, path, count=1)
        if not path.startswith(b"/"):
            path = b"/" + path
        return path


def _header_name(where: Where, name: Any) -> bytes:
    if not isinstance(name, str) or not _TOKEN.match(name):
        raise where.error(f"not a header name: {name!r}")
    return name.encode("ascii")


def _header_value(where: Where, value: Any) -> bytes:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not _FIELD_VALUE.match(value):
        raise where.error("a header value must be a string of visible ASCII characters")
    return value.strip().encode("ascii")


def _pairs(where: Where, value: Any) -> tuple:
    return tuple(
        (_header_name(w, name), _header_value(w, v)) for w, name, v in mapping_items(where, value)
    )


def _names(where: Where, value: Any) -> frozenset:
    return frozenset(_header_name(w, name).lower() for w, name in sequence(where, value))


def _headers(where: Where, value: Any) -> HeaderRewrite:
    section = Section(where, value)
    rewrite = HeaderRewrite(
        add=section.take("add", _pairs, ()),
        set=section.take("set", _pairs, ()),
        remove=section.take("remove", _names, frozenset()),
    )
    section.finish()
    return rewrite


def _prefix(where: Where, value: Any) -> bytes:
    prefix = string(where, value)
    if not prefix.startswith("/") or any(c in prefix for c in "?# \t\r\n"):
        raise where.error("a path prefix starts with '/' and has no query, fragment or spaces")
    return prefix.encode("utf-8")


def _regex(where: Where, value: Any) -> tuple:
    items = sequence(where, value)
    if len(items) != 2:
        raise where.error("expected [pattern, replacement]")
    (pattern_where, pattern_text), (replacement_where, replacement) = items
    pattern_text = string(pattern_where, pattern_text)
    try:
        pattern = re.compile(pattern_text.encode("utf-8"))
    except re.error as e:
        raise pattern_where.error(f"not a regular expression: {e}") from None
    if not isinstance(replacement, str):
        raise replacement_where.error("the replacement must be a string")
    for number, name in _GROUP_REFERENCE.findall(replacement):
        if number and int(number) > pattern.groups:
            raise replacement_where.error(f"the pattern has no group {number}")
        if name and name not in pattern.groupindex and not (name.isdigit() and int(name) <= pattern.groups):
            raise replacement_where.error(f"the pattern has no group {name!r}")
    try:
        pattern.sub(replacement.encode("utf-8"), b"")
    except (re.error, IndexError) as e:
        raise replacement_where.error(f"bad replacement: {e}") from None
    return pattern, replacement.encode("utf-8")


def parse(where: Where, value: Any, context: ParseContext) -> Optional[Rewrite]:
    """A route's C{rewrite} mapping (see the module docstring)."""
    section = Section(where, value)
    rewrite = Rewrite(
        replace_prefix=section.take("replace_prefix", _prefix, None),
        regex=section.take("regex", _regex, None),
        request_headers=section.take("request_headers", _headers, HeaderRewrite()),
        response_headers=section.take("response_headers", _headers, HeaderRewrite()),
    )
    section.finish()
    return rewrite


register("route", Extension(NAME, parse, default=None))


class RewriteFilter:
    """Applies the route's rewrites to what is forwarded and answered."""

    name = NAME

    def __init__(self, gateway) -> None:
        pass

    def on_request(self, request, context) -> None:
        rewrite = context.route.options.get(NAME)
        if rewrite is None:
            return None
        if rewrite.replace_prefix is not None or rewrite.regex is not None:
            context.upstream_path = rewrite.path(context.route, context.path)
        changes = rewrite.request_headers
        context.upstream_remove.update(changes.remove)
        for name, value in changes.set:
            context.upstream_headers.append((name, value))
        for name, value in changes.add:
            # The hook replaces a header with its first pair: keep what the
            # client sent (and no earlier rule removed) ahead of the value.
            key = name.lower()
            if (
                key not in changes.remove
                and key not in context.upstream_remove
                and all(n.lower() != key for n, _ in changes.set)
            ):
                for kept in request.requestHeaders.getRawHeaders(name, []):
                    context.upstream_headers.append((name, kept))
            context.upstream_headers.append((name, value))
        return None

    def on_response(self, request, context) -> None:
        if context.route is None:
            return
        rewrite = context.route.options.get(NAME)
        if rewrite is not None:
            rewrite.response_headers.apply(request.responseHeaders)


register_filter(ORDER, NAME, RewriteFilter)
