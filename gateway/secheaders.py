"""
Security response headers the gateway adds to every proxied response.

The default set:

  - C{X-Content-Type-Options: nosniff}
  - C{X-Frame-Options: DENY}
  - C{Referrer-Policy: no-referrer}
  - C{Strict-Transport-Security: max-age=31536000; includeSubDomains}, only
    on a TLS listener: RFC 6797 section 7.2 has browsers ignore it over
    plain HTTP, and sending it there would only mislead.

Configuration overrides a default's value, adds a header, or removes a
default (value L{None}); it can also strip headers from backend responses
(C{Server}, C{X-Powered-By}). By default a header the backend set itself is
kept (the backend may know better, e.g. C{X-Frame-Options: SAMEORIGIN} for a
page meant to be framed); C{replace_existing} makes the gateway's values win.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import attrs
from twisted.web.http_headers import Headers

DEFAULT_SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Strict-Transport-Security", "max-age=31536000; includeSubDomains"),
)

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# RFC 9110 section 5.5: visible characters, spaces and tabs; no CR, LF, NUL.
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*\Z")
_HSTS = b"strict-transport-security"


def _name(value: str) -> bytes:
    name = value.encode("ascii", "replace")
    if not _TOKEN.match(name):
        raise ValueError("not a header name: %r" % (value,))
    return name


def _value(name: str, value: str) -> bytes:
    raw = value.encode("utf-8")
    if not _FIELD_VALUE.match(raw):
        raise ValueError("header %s has a forbidden character" % (name,))
    return raw.strip()


@attrs.frozen
class SecurityHeaders:
    """
    The security headers for one listener.

    @ivar tls: whether the listener is TLS; without it,
        C{Strict-Transport-Security} is never sent (even if overridden).
    @ivar overrides: header name -> value replacing the default or adding a
        header, or L{None} to remove a default. Names are case-insensitive.
    @ivar strip: header names removed from every backend response.
    @ivar replace_existing: whether the gateway's values replace those the
        backend set (L{False}: only missing headers are added).
    @ivar headers: the resulting C{(name, value)} pairs, computed once.
    @raise ValueError: at construction, on a bad header name or a value with
        CR, LF, NUL or another control character.
    """

    tls: bool
    overrides: Mapping[str, Optional[str]] = attrs.field(
        factory=dict, converter=lambda m: tuple(dict(m).items())
    )
    strip: tuple[bytes, ...] = attrs.field(
        default=(), converter=lambda names: tuple(_name(n) for n in names)
    )
    replace_existing: bool = False
    headers: tuple[tuple[bytes, bytes], ...] = attrs.field(init=False)

    @headers.default
    def _compute(self) -> tuple[tuple[bytes, bytes], ...]:
        merged: dict[bytes, tuple[bytes, Optional[bytes]]] = {}
        for name, value in DEFAULT_SECURITY_HEADERS:
            merged[name.lower().encode("ascii")] = (name.encode("ascii"), value.encode("ascii"))
        for name, value in self.overrides:
            raw_name = _name(name)
            merged[raw_name.lower()] = (
                raw_name,
                None if value is None else _value(name, value),
            )
        return tuple(
            (raw_name, value)
            for key, (raw_name, value) in merged.items()
            if value is not None and (self.tls or key != _HSTS)
        )

    def apply(self, response_headers: Headers) -> None:
        """
        Add the security headers to a response, in place, and strip the
        configured backend headers.

        @param response_headers: the response headers about to be sent
            (C{request.responseHeaders}), after the backend's were copied.
        @return: L{None}
        """
        for name in self.strip:
            response_headers.removeHeader(name)
        replace = self.replace_existing
        for name, value in self.headers:
            if replace or not response_headers.hasHeader(name):
                response_headers.setRawHeaders(name, [value])
