"""
Cross-origin resource sharing, as the Fetch standard's CORS protocol
(https://fetch.spec.whatwg.org/#http-cors-protocol) defines it.

The gateway answers preflights itself and never forwards them: the policy
lives in the gateway's configuration, which the backend does not know.

  - A preflight is an C{OPTIONS} request with both C{Origin} and
    C{Access-Control-Request-Method} (L{is_preflight}). L{CorsPolicy.preflight}
    decides it: allowed -> 204 with the C{Access-Control-Allow-*} headers;
    refused (origin, method or a requested header not allowed) -> 403
    without any CORS header. A 403 rather than a bare 204 makes the refusal
    visible in the access log and the browser's network panel, while the
    browser fails the preflight either way, since the headers are missing.
  - Any other request is forwarded; L{CorsPolicy.response_headers} gives the
    headers to add to its response (the origin's grant, or only
    C{Vary: Origin} when the origin is not allowed). The backend's own
    C{Access-Control-*} response headers should be dropped
    (L{CORS_RESPONSE_HEADERS}) so that one policy holds.

Credentials: with C{allow_credentials} the response never says C{*}: the
allowed origin, the requested method and the requested headers are echoed
(Fetch treats C{*} literally on credentialed requests), and the origin
C{null} (sandboxed frames, C{file:} pages) matches only when listed
explicitly.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import attrs
from twisted.web.http_headers import Headers

#: Response headers the CORS policy owns; drop the backend's.
CORS_RESPONSE_HEADERS = (
    b"Access-Control-Allow-Origin",
    b"Access-Control-Allow-Credentials",
    b"Access-Control-Allow-Methods",
    b"Access-Control-Allow-Headers",
    b"Access-Control-Expose-Headers",
    b"Access-Control-Max-Age",
)

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_ORIGIN = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<host>\[[0-9a-f:.]+\]|[a-z0-9.-]+)"
    r"(?::(?P<port>[0-9]{1,5}))?\Z"
)
_WILDCARD = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://\*(?P<suffix>(?:\.[a-z0-9-]+)+)"
    r"(?::(?P<port>[0-9]{1,5}))?\Z"
)
# What may stand for the * of a wildcard origin: one or more DNS labels.
_SUBDOMAIN = re.compile(rb"[a-z0-9-]+(?:\.[a-z0-9-]+)*\Z")
# Fetch "normalize a method": these are matched case-insensitively.
_NORMALIZED_METHODS = {"DELETE", "GET", "HEAD", "OPTIONS", "POST", "PUT"}

_VARY_ORIGIN = (b"Vary", b"Origin")
_VARY_PREFLIGHT = (
    b"Vary",
    b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
)


def is_preflight(method: bytes, headers: Headers) -> bool:
    """
    Whether a request is a CORS preflight: C{OPTIONS} with C{Origin} and
    C{Access-Control-Request-Method}. Other C{OPTIONS} requests are ordinary
    requests.

    @param method: the request method, as received.
    @param headers: the request headers.
    """
    return (
        method == b"OPTIONS"
        and headers.hasHeader(b"Origin")
        and headers.hasHeader(b"Access-Control-Request-Method")
    )


def _origin(value: str) -> str:
    value = value.strip().lower().rstrip("/")
    if value in ("*", "null"):
        return value
    if _WILDCARD.match(value) or _ORIGIN.match(value):
        return value
    raise ValueError(
        "CORS origin %r is not *, null, scheme://host[:port] or "
        "scheme://*.domain[:port]" % (value,)
    )


def _header_names(names: Sequence[str]) -> tuple[str, ...]:
    result = []
    for name in names:
        if name != "*" and not _TOKEN.match(name.encode("ascii", "replace")):
            raise ValueError("not a header name: %r" % (name,))
        result.append(name)
    return tuple(result)


def _methods(methods: Sequence[str]) -> tuple[str, ...]:
    result = []
    for method in methods:
        if method != "*" and not _TOKEN.match(method.encode("ascii", "replace")):
            raise ValueError("not a method: %r" % (method,))
        result.append(method.upper() if method.upper() in _NORMALIZED_METHODS else method)
    return tuple(result)


@attrs.frozen
class PreflightResult:
    """
    The gateway's answer to a preflight.

    @ivar allowed: whether the request may be made.
    @ivar headers: the response headers, C{(name, value)} pairs.
    @ivar reason: why it was refused, for logs; empty when allowed.
    """

    allowed: bool
    headers: tuple[tuple[bytes, bytes], ...]
    reason: str = ""

    @property
    def status(self) -> int:
        """The response status: 204 when allowed, 403 otherwise."""
        return 204 if self.allowed else 403


@attrs.frozen
class CorsPolicy:
    """
    Which origins may call, with which methods and headers.

    @ivar allowed_origins: C{*}; exact origins (C{https://app.example.com},
        C{http://localhost:3000}, compared case-insensitively); wildcard
        subdomains (C{https://*.example.com} matches
        C{https://a.example.com} and C{https://a.b.example.com}, not
        C{https://example.com}, nor another scheme or port); or C{null}.
    @ivar allowed_methods: methods a preflight may ask for, or C{*}.
    @ivar allowed_headers: request header names a preflight may ask for
        (case-insensitive), or C{*} (which, as in Fetch, does not cover
        C{Authorization}: list it explicitly).
    @ivar exposed_headers: response header names scripts may read.
    @ivar allow_credentials: whether cookies and HTTP authentication may be
        sent (C{Access-Control-Allow-Credentials: true}).
    @ivar max_age: seconds a browser may cache a preflight, or L{None} to
        send no C{Access-Control-Max-Age}.
    @raise ValueError: at construction, on a malformed origin, method or
        header name, no origin, a negative C{max_age}, or C{*} exposed
        headers with credentials (browsers would read it literally).
    """

    allowed_origins: tuple[str, ...] = attrs.field(
        converter=lambda v: tuple(_origin(o) for o in v)
    )
    allowed_methods: tuple[str, ...] = attrs.field(
        default=("GET", "HEAD", "POST"), converter=_methods
    )
    allowed_headers: tuple[str, ...] = attrs.field(
        default=(), converter=_header_names
    )
    exposed_headers: tuple[str, ...] = attrs.field(
        default=(), converter=_header_names
    )
    allow_credentials: bool = False
    max_age: Optional[int] = None

    _any_origin: bool = attrs.field(init=False)
    _exact: frozenset = attrs.field(init=False)
    _wildcards: tuple = attrs.field(init=False)
    _any_method: bool = attrs.field(init=False)
    _methods_set: frozenset = attrs.field(init=False)
    _methods_value: bytes = attrs.field(init=False)
    _any_header: bool = attrs.field(init=False)
    _headers_set: frozenset = attrs.field(init=False)
    _grant: tuple = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        if not self.allowed_origins:
            raise ValueError("CORS needs at least one allowed origin")
        if self.max_age is not None and self.max_age < 0:
            raise ValueError("CORS max_age must not be negative")
        if self.allow_credentials and "*" in self.exposed_headers:
            raise ValueError("exposed_headers * cannot be used with credentials")
        setter = object.__setattr__
        setter(self, "_any_origin", "*" in self.allowed_origins)
        setter(
            self,
            "_exact",
            frozenset(
                o.encode("ascii")
                for o in self.allowed_origins
                if o != "*" and "://*." not in o
            ),
        )
        wildcards = []
        for o in self.allowed_origins:
            if "://*." in o:
                prefix, suffix = o.split("*", 1)
                wildcards.append((prefix.encode("ascii"), suffix.encode("ascii")))
        setter(self, "_wildcards", tuple(wildcards))
        setter(self, "_any_method", "*" in self.allowed_methods)
        setter(
            self,
            "_methods_set",
            frozenset(m.encode("ascii") for m in self.allowed_methods if m != "*"),
        )
        setter(
            self,
            "_methods_value",
            ", ".join(m for m in self.allowed_methods if m != "*").encode("ascii"),
        )
        setter(self, "_any_header", "*" in self.allowed_headers)
        setter(
            self,
            "_headers_set",
            frozenset(
                h.lower().encode("ascii") for h in self.allowed_headers if h != "*"
            ),
        )
        grant = []
        if self.allow_credentials:
            grant.append((b"Access-Control-Allow-Credentials", b"true"))
        if self.exposed_headers:
            grant.append(
                (
                    b"Access-Control-Expose-Headers",
                    ", ".join(self.exposed_headers).encode("ascii"),
                )
            )
        setter(self, "_grant", tuple(grant))

    @property
    def _constant(self) -> bool:
        # "*" without credentials: the same answer for every origin.
        return self._any_origin and not self.allow_credentials

    def origin_allowed(self, origin: bytes) -> bool:
        """
        Whether C{origin} (an C{Origin} header value) may call.

        @param origin: e.g. C{b"https://app.example.com"}.
        """
        origin = origin.strip().lower()
        if origin == b"null":
            return b"null" in self._exact or self._constant
        if self._any_origin or origin in self._exact:
            return True
        for prefix, suffix in self._wildcards:
            # The suffix starts with "." and the prefix ends with "/", so
            # they cannot overlap; an empty middle fails _SUBDOMAIN.
            if (
                origin.startswith(prefix)
                and origin.endswith(suffix)
                and _SUBDOMAIN.match(origin[len(prefix):-len(suffix)])
            ):
                return True
        return False

    def _allow_origin(self, origin: bytes) -> tuple[bytes, bytes]:
        if self._constant:
            return (b"Access-Control-Allow-Origin", b"*")
        return (b"Access-Control-Allow-Origin", origin)

    def response_headers(
        self, request_headers: Headers
    ) -> tuple[tuple[bytes, bytes], ...]:
        """
        The CORS headers for the response to a request that is not a
        preflight.

        Add each with C{addRawHeader} (so C{Vary} merges with the
        backend's), after removing the backend's L{CORS_RESPONSE_HEADERS}.

        @param request_headers: the request's headers.
        @return: for an allowed origin, C{Access-Control-Allow-Origin} (the
            origin, or C{*} when any origin is allowed without credentials)
            with C{-Allow-Credentials} and C{-Expose-Headers} as configured;
            and C{Vary: Origin} whenever the answer depends on the origin,
            including when there is none or it is refused (so that a cache
            never serves one origin's answer to another).
        """
        if self._constant:
            return (self._allow_origin(b"*"),) + self._grant
        origins = request_headers.getRawHeaders(b"Origin")
        if not origins or len(origins) != 1 or not self.origin_allowed(origins[0]):
            return (_VARY_ORIGIN,)
        return (self._allow_origin(origins[0]),) + self._grant + (_VARY_ORIGIN,)

    def preflight(self, request_headers: Headers) -> PreflightResult:
        """
        Decide a preflight (see L{is_preflight}).

        @param request_headers: the C{OPTIONS} request's headers.
        @return: allowed, with C{Access-Control-Allow-Origin},
            C{-Allow-Credentials}, C{-Allow-Methods} (the configured methods,
            or the requested one for C{*}), C{-Allow-Headers} (the requested
            headers, echoed), C{-Max-Age} and C{Vary}; or refused, with
            C{Vary} only.
        """
        vary = (_VARY_PREFLIGHT,)
        origins = request_headers.getRawHeaders(b"Origin") or []
        methods = request_headers.getRawHeaders(b"Access-Control-Request-Method") or []
        if len(origins) != 1 or not self.origin_allowed(origins[0]):
            return PreflightResult(False, vary, "origin not allowed")
        if len(methods) != 1:
            return PreflightResult(False, vary, "no single requested method")
        method = methods[0].strip()
        if method.upper().decode("latin-1") in _NORMALIZED_METHODS:
            method = method.upper()
        if not _TOKEN.match(method) or not (
            self._any_method or method in self._methods_set
        ):
            return PreflightResult(
                False, vary, "method %s not allowed" % (method.decode("latin-1"),)
            )
        requested = []
        for line in request_headers.getRawHeaders(b"Access-Control-Request-Headers") or []:
            for name in line.split(b","):
                name = name.strip().lower()
                if not name:
                    continue
                if not _TOKEN.match(name) or not (
                    name in self._headers_set
                    or (self._any_header and name != b"authorization")
                ):
                    return PreflightResult(
                        False,
                        vary,
                        "header %s not allowed" % (name.decode("latin-1"),),
                    )
                if name not in requested:
                    requested.append(name)

        headers = [self._allow_origin(origins[0].strip())]
        if self.allow_credentials:
            headers.append((b"Access-Control-Allow-Credentials", b"true"))
        headers.append(
            (
                b"Access-Control-Allow-Methods",
                method if self._any_method else self._methods_value,
            )
        )
        if requested:
            headers.append((b"Access-Control-Allow-Headers", b", ".join(requested)))
        if self.max_age is not None:
            headers.append((b"Access-Control-Max-Age", b"%d" % (self.max_age,)))
        headers.append(_VARY_PREFLIGHT)
        return PreflightResult(True, tuple(headers))
