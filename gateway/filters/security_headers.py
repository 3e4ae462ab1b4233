"""
Security response headers (C{security_headers}, top level and per route):
added to every response, the backend's and the gateway's own answers. See
L{gateway.secheaders} for the defaults (C{X-Content-Type-Options},
C{X-Frame-Options}, C{Referrer-Policy}, and C{Strict-Transport-Security}
on TLS listeners only).

    security_headers:
      headers:                           # override, add, or remove (null)
        X-Frame-Options: SAMEORIGIN
        Content-Security-Policy: "default-src 'none'"
        Referrer-Policy: null
      strip: [Server, X-Powered-By]      # removed from backend responses
      replace_existing: false            # true: our values beat the backend's

With no configuration the defaults are sent; C{security_headers: false}
sends none (at the top level: on every route that does not set its own).
"""

from __future__ import annotations

from typing import Any, Optional

import attrs

from gateway.config import (
    Extension,
    ParseContext,
    Section,
    Where,
    boolean,
    mapping_items,
    register,
    string,
    string_list,
)
from gateway.pipeline import register_filter
from gateway.secheaders import SecurityHeaders

NAME = "security_headers"
ORDER = 15


@attrs.frozen
class SecurityHeadersSettings:
    """The headers for plain and for TLS listeners."""

    plain: SecurityHeaders
    tls: SecurityHeaders

    @classmethod
    def build(cls, overrides=(), strip=(), replace_existing: bool = False) -> "SecurityHeadersSettings":
        """@raise ValueError: a bad header name or value."""
        overrides = dict(overrides)
        return cls(
            plain=SecurityHeaders(False, overrides, strip, replace_existing),
            tls=SecurityHeaders(True, overrides, strip, replace_existing),
        )


#: The settings of a gateway configured with nothing.
DEFAULT = SecurityHeadersSettings.build()


def _overrides(where: Where, value: Any) -> tuple:
    result = []
    for item_where, name, header_value in mapping_items(where, value):
        if header_value is not None:
            if isinstance(header_value, (int, float)) and not isinstance(header_value, bool):
                header_value = str(header_value)
            header_value = string(item_where, header_value)
        try:
            SecurityHeaders(False, {name: header_value})
        except (ValueError, UnicodeError) as e:
            raise item_where.error(str(e)) from None
        result.append((name, header_value))
    return tuple(result)


def _strip(where: Where, value: Any) -> tuple:
    names = string_list(where, value)
    try:
        SecurityHeaders(False, strip=names)
    except ValueError as e:
        raise where.error(str(e)) from None
    return names


def parse(where: Where, value: Any, context: ParseContext) -> Optional[SecurityHeadersSettings]:
    """A mapping (see the module docstring), or C{false} for none."""
    if value is False:
        return None
    section = Section(where, value)
    settings = SecurityHeadersSettings.build(
        overrides=section.take("headers", _overrides, ()),
        strip=section.take("strip", _strip, ()),
        replace_existing=section.take("replace_existing", boolean, False),
    )
    section.finish()
    return settings


register("route", Extension(NAME, parse, default=DEFAULT, top_default=True))


class SecurityHeadersFilter:
    """Adds the security headers to each response as it goes out."""

    name = NAME

    def __init__(self, gateway) -> None:
        pass

    def on_response(self, request, context) -> None:
        # No route (404): the top-level settings, if any.
        options = context.route.options if context.route is not None else context.snapshot.config.options
        chosen = headers_for(options, request.isSecure())
        if chosen is not None:
            chosen.apply(request.responseHeaders)


def headers_for(options: dict, secure: bool) -> Optional[SecurityHeaders]:
    """
    The security headers a response gets under C{options} (a route's, or
    the top-level ones when no route was chosen), or None when they are
    switched off.

    @param secure: whether the connection is TLS (C{Strict-Transport-Security}).
    """
    settings = options.get(NAME, DEFAULT)
    if settings is None:
        return None
    return settings.tls if secure else settings.plain


register_filter(ORDER, NAME, SecurityHeadersFilter)
