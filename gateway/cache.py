"""
The rules of a shared HTTP response cache (RFC 9111, plus RFC 5861).

Everything in this module is pure: functions take the time as C{now} (POSIX
seconds, a L{float}, read by the caller from its injected clock) and do no
I/O, like h11's core. The stores live in L{gateway.cachestore}; the proxy
glues the two together.

Headers are sequences of C{(name, value)} L{bytes} pairs in wire order; names
compare case-insensitively. L{headers_from_twisted} converts a
L{twisted.web.http_headers.Headers}.

What this cache does, with the sources:

  - Only C{GET} responses are stored; C{HEAD} is answered from a stored
    C{GET} response (RFC 9110 S{sect}9.3.2) and otherwise forwarded, never
    stored. Other methods bypass the cache; a non-error response to an unsafe
    method invalidates the target URI (S{sect}4.4, L{invalidates}).
  - Storable responses: S{sect}3 (L{is_storable}). C{private} and
    C{no-store} forbid it (qualified C{private="..."} and C{no-cache="..."}
    are treated as unqualified, the conservative reading S{sect}5.2.2.4 and
    S{sect}5.2.2.7 allow); requests with C{Authorization} only when the
    response has C{public}, C{s-maxage} or C{must-revalidate}
    (S{sect}3.5); C{Set-Cookie} responses only with
    L{CachePolicy.allow_set_cookie}, and then the C{Set-Cookie} fields are
    removed from the stored copy so one client's cookie is never handed to
    another; C{Vary: *}, C{206} and C{304} are never stored; bodies over
    L{CachePolicy.max_object_size} and incomplete bodies (S{sect}3.3) are
    not stored.
  - Freshness: C{s-maxage}, then C{max-age}, then C{Expires} minus C{Date}
    (S{sect}4.2.1); otherwise L{CachePolicy.default_ttl} as a heuristic, only
    when positive and the status is heuristically cacheable or the response
    is C{public} (S{sect}4.2.2). Invalid values make the response stale.
    Age: S{sect}4.2.3 (L{current_age}).
  - Serving stale is never done when the response has C{no-cache},
    C{must-revalidate}, C{proxy-revalidate} or C{s-maxage} (S{sect}4.2.4,
    S{sect}5.2.2.10: C{s-maxage} implies C{proxy-revalidate} in a shared
    cache); otherwise within C{stale-while-revalidate} (served while a
    background revalidation runs) and C{stale-if-error} (served when the
    backend fails with an error or a 500, 502, 503 or 504), RFC 5861.

Client request directives (S{sect}5.2.1), all honoured:

  - C{no-store}: a stored response may still be served, but the response to
    this request is not stored (L{CacheDecision.may_store} is false).
  - C{no-cache}: a stored response is only used after a successful
    revalidation (conditional request); without validators, it is a miss.
  - C{max-age=N}: only a stored response no older than N seconds is used
    without revalidation (C{max-age=0} always revalidates).
  - C{min-fresh=N}: only one still fresh N seconds from now.
  - C{max-stale[=N]}: a stale response (at most N seconds stale) may be
    served, unless the response forbids serving stale.
  - C{only-if-cached}: when nothing usable is stored, the answer is
    L{Outcome.GATEWAY_TIMEOUT}: reply 504 without contacting the backend.
  - C{stale-if-error=N} (RFC 5861 S{sect}4): extends the error window.
  - C{Pragma} is ignored (deprecated, S{sect}5.4).

Requests with C{Range}, C{If-Range}, C{If-Match} or C{If-Unmodified-Since}
bypass the cache (forwarded, response not stored): this cache does not
combine partial content nor evaluate those preconditions.
C{If-None-Match} and C{If-Modified-Since} are evaluated against the stored
response (S{sect}4.3.2, weak comparison for C{If-None-Match}) and answered
with 304 when they match.

Cache keys are C{route NUL path-and-query NUL host}; all the variants of one
key (selected by C{Vary}, S{sect}4.1) are stored together as one tuple,
most recent first, so one store read serves a lookup.
"""

from __future__ import annotations

import enum
import functools
from typing import (
    Callable,
    Dict,
    Generic,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
)

import attrs
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString, stringToDatetime

_log = Logger()

Header = Tuple[bytes, bytes]
Headers = Sequence[Header]

#: Statuses heuristically cacheable by default (RFC 9110 S{sect}15.1),
#: less 206: this cache does not store partial content.
HEURISTICALLY_CACHEABLE = frozenset(
    {200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501}
)

#: Statuses on which a stale response may be served under C{stale-if-error}
#: (RFC 5861 S{sect}4).
ERROR_STATUSES = frozenset({500, 502, 503, 504})

#: The largest delta-seconds value (RFC 9111 S{sect}1.2.2).
MAX_DELTA_SECONDS = 2**31

# Fields a cache must not store (RFC 9111 S{sect}3.1; RFC 9110 S{sect}7.6.1).
_NOT_STORED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authentication-info",
        b"proxy-authorization",
    }
)

# Request fields whose values are case-insensitive, for Vary normalisation
# (RFC 9111 S{sect}4.1; RFC 9110 S{sect}12.5).
_CASE_INSENSITIVE_VALUES = frozenset(
    {b"accept-encoding", b"accept-language", b"accept-charset", b"accept"}
)

# Request fields this cache does not evaluate: such requests bypass it.
_BYPASS_REQUEST_FIELDS = (b"range", b"if-range", b"if-match", b"if-unmodified-since")

# Fields a cache-generated 304 carries (RFC 9110 S{sect}15.4.5).
_NOT_MODIFIED_FIELDS = frozenset(
    {
        b"cache-control",
        b"content-location",
        b"date",
        b"etag",
        b"expires",
        b"vary",
        b"last-modified",
    }
)

_KEY_SEPARATOR = b"\x00"


# --- header helpers -----------------------------------------------------------


def headers_from_twisted(headers) -> List[Header]:
    """
    Convert Twisted headers into this module's form.

    @param headers: request or response headers.
    @type headers: L{twisted.web.http_headers.Headers}
    @return: C{(name, value)} pairs, one per field line; names as Twisted
        keeps them (canonical capitalisation).
    @rtype: L{list} of L{tuple} of (L{bytes}, L{bytes})
    """
    return [
        (name, value)
        for name, values in headers.getAllRawHeaders()
        for value in values
    ]


def header_values(headers: Headers, name: bytes) -> List[bytes]:
    """
    All the field-line values of one field, in order.

    @param name: the field name, lower case.
    @rtype: L{list} of L{bytes}
    """
    return [v for (n, v) in headers if n.lower() == name]


def _first(headers: Headers, name: bytes) -> Optional[bytes]:
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


def _has(headers: Headers, name: bytes) -> bool:
    return any(n.lower() == name for (n, _) in headers)


def split_list(value: str) -> List[str]:
    """
    Split a comma-separated field value, leaving commas inside quoted
    strings alone (RFC 9110 S{sect}5.6.1).

    @return: the non-empty members, whitespace stripped.
    @rtype: L{list} of L{str}
    """
    items: List[str] = []
    buf: List[str] = []
    quoted = escaped = False
    for ch in value:
        if quoted:
            buf.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
            buf.append(ch)
        elif ch == ",":
            items.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    items.append("".join(buf))
    return [item.strip() for item in items if item.strip()]


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        out, escaped = [], False
        for ch in value[1:-1]:
            if escaped:
                out.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            else:
                out.append(ch)
        return "".join(out)
    return value


def parse_cache_control(values: Iterable[bytes]) -> Dict[str, Optional[str]]:
    """
    Parse C{Cache-Control} field lines (RFC 9111 S{sect}5.2).

    Directive names are lower-cased; values are unquoted (recipients accept
    both the token and the quoted form, S{sect}5.2). When a directive occurs
    more than once, the first occurrence is kept (S{sect}4.2.1).

    @param values: the field-line values, in order.
    @type values: iterable of L{bytes}
    @return: directive name to value, or L{None} for a directive without one.
    @rtype: L{dict} of L{str} to L{str} or L{None}
    """
    result: Dict[str, Optional[str]] = {}
    for line in values:
        for item in split_list(line.decode("latin-1")):
            name, sep, value = item.partition("=")
            name = name.strip().lower()
            if not name or name in result:
                continue
            result[name] = _unquote(value.strip()) if sep else None
    return result


def _delta_seconds(value: Optional[str]) -> Optional[int]:
    """
    Parse delta-seconds (RFC 9111 S{sect}1.2.2): digits only, capped at 2**31.

    @return: the seconds, or L{None} if C{value} is absent or invalid.
    """
    if value is None or not (value.isascii() and value.isdigit()):
        return None
    return min(int(value), MAX_DELTA_SECONDS)


def parse_http_date(value: Optional[bytes]) -> Optional[float]:
    """
    Parse an HTTP-date in any of its three forms (RFC 9110 S{sect}5.6.7).

    @return: POSIX seconds, or L{None} if absent or invalid.
    @rtype: L{float} or L{None}
    """
    if value is None:
        return None
    try:
        return float(stringToDatetime(value.strip()))
    except (ValueError, IndexError, KeyError, TypeError, OverflowError):
        return None


def _format_http_date(seconds: float) -> bytes:
    return datetimeToString(int(seconds))


# --- policy and entries -------------------------------------------------------


@attrs.frozen
class CachePolicy:
    """
    The cache's configuration, one frozen snapshot.

    @ivar default_ttl: heuristic freshness lifetime in seconds, used only for
        responses without explicit freshness whose status is heuristically
        cacheable or which are C{public} (RFC 9111 S{sect}4.2.2); 0 never
        guesses.
    @ivar max_object_size: the largest body stored, in bytes.
    @ivar allow_set_cookie: store responses carrying C{Set-Cookie} (the
        field itself is removed from the stored copy).
    @ivar revalidate_window: seconds an expired entry that has a validator
        (C{ETag} or C{Last-Modified}) is kept past its stale windows so a
        conditional request can refresh it cheaply.
    @ivar max_variants: the most C{Vary} variants kept per key; the oldest
        are dropped first.
    """

    default_ttl: float = 0.0
    max_object_size: int = 1024 * 1024
    allow_set_cookie: bool = False
    revalidate_window: float = 600.0
    max_variants: int = 8


def _to_header_tuple(headers: Iterable[Header]) -> Tuple[Header, ...]:
    return tuple((bytes(n), bytes(v)) for (n, v) in headers)


@attrs.frozen
class CachedResponse:
    """
    One stored response (one variant of a cache key).

    @ivar status: the status code.
    @ivar headers: the stored header fields in order, without hop-by-hop
        fields; always has a C{Date}.
    @ivar body: the whole body.
    @ivar request_time: when the request that produced (or last validated)
        this response was sent, POSIX seconds (RFC 9111 S{sect}4.2.3).
    @ivar response_time: when that response was received, POSIX seconds.
    @ivar vary: the normalised request field values named by C{Vary}, as
        C{(lower-case name, value or None when absent)} pairs.
    """

    status: int
    headers: Tuple[Header, ...] = attrs.field(converter=_to_header_tuple)
    body: bytes
    request_time: float
    response_time: float
    vary: Tuple[Tuple[bytes, Optional[bytes]], ...] = ()

    @functools.cached_property
    def directives(self) -> Dict[str, Optional[str]]:
        """
        The parsed C{Cache-Control} of this response.
        """
        return parse_cache_control(header_values(self.headers, b"cache-control"))

    @property
    def size(self) -> int:
        """
        An estimate of the bytes this entry holds in memory.
        """
        return (
            len(self.body)
            + sum(len(n) + len(v) + 8 for (n, v) in self.headers)
            + sum(len(n) + len(v or b"") + 8 for (n, v) in self.vary)
            + 96
        )


@attrs.frozen
class ServedResponse:
    """
    A response the cache hands the proxy to send to the client.

    @ivar status: 200 (or the stored status), or 304 for a matched
        conditional request.
    @ivar headers: the fields to send, with C{Age} set.
    @ivar body: the body; empty for C{HEAD} and 304.
    """

    status: int
    headers: Tuple[Header, ...]
    body: bytes


class Outcome(enum.Enum):
    """
    What L{lookup} found.
    """

    #: A usable stored response: send L{CacheDecision.response}.
    HIT = "hit"
    #: A stored response with a validator that must be validated first: send
    #: the request with L{CacheDecision.conditional_headers} to the backend.
    STALE_REVALIDATE = "stale-revalidate"
    #: Stale, within C{stale-while-revalidate}: send
    #: L{CacheDecision.response} now and revalidate in the background.
    STALE_SERVABLE = "stale-servable"
    #: Nothing usable: forward. L{CacheDecision.entry} may still hold a
    #: stale response for L{serve_stale_on_error}.
    MISS = "miss"
    #: The cache does not take part: forward, do not store.
    BYPASS = "bypass"
    #: C{only-if-cached} and nothing usable: reply 504 (S{sect}5.2.1.7).
    GATEWAY_TIMEOUT = "gateway-timeout"


@attrs.frozen
class CacheDecision:
    """
    The answer of L{lookup}.

    @ivar outcome: the L{Outcome}.
    @ivar entry: the selected stored response, if any (for
        L{Outcome.STALE_REVALIDATE}: the one to L{freshen} on 304; for
        L{Outcome.MISS}: a stale fallback for L{serve_stale_on_error}).
    @ivar response: what to send now, for L{Outcome.HIT} and
        L{Outcome.STALE_SERVABLE}.
    @ivar conditional_headers: fields to add to the backend request
        (C{If-None-Match}, C{If-Modified-Since}) after removing the client's
        own conditional fields; for L{Outcome.STALE_REVALIDATE} and
        L{Outcome.STALE_SERVABLE}.
    @ivar may_store: whether the response to this request may be stored.
    """

    outcome: Outcome
    entry: Optional[CachedResponse] = None
    response: Optional[ServedResponse] = None
    conditional_headers: Tuple[Header, ...] = ()
    may_store: bool = False

    @property
    def collapse(self) -> bool:
        """
        Whether the backend request should go through the L{Collapser}: true
        for C{GET} misses and revalidations.
        """
        return self.may_store and self.outcome in (
            Outcome.MISS,
            Outcome.STALE_REVALIDATE,
        )


# --- keys ---------------------------------------------------------------------


def cache_key(
    method: bytes, host: bytes, path_and_query: bytes, route: bytes = b""
) -> bytes:
    """
    The primary cache key of a request (RFC 9111 S{sect}2).

    C{GET} and C{HEAD} share a key: C{HEAD} is answered from the stored
    C{GET} response. Layout: C{route NUL path-and-query NUL host}, so all the
    keys of a route, or of a path prefix within it, share a prefix
    (L{key_prefix}).

    @param method: the request method; C{GET} or C{HEAD}.
    @param host: the request's host (C{Host} or authority), lower-cased here.
    @param path_and_query: the request target as received.
    @param route: the route's name, so purges can name a route.
    @rtype: L{bytes}
    @raise ValueError: for another method.
    """
    if method not in (b"GET", b"HEAD"):
        raise ValueError(f"no cache key for method {method!r}")
    return _KEY_SEPARATOR.join((route, path_and_query, host.lower()))


def key_prefix(route: bytes, path_prefix: bytes = b"") -> bytes:
    """
    The prefix shared by the keys of C{route} whose path-and-query starts
    with C{path_prefix}, for C{DELETE /cache?route=...&path=...}.

    @rtype: L{bytes}
    """
    return route + _KEY_SEPARATOR + path_prefix


# --- storability and freshness ----------------------------------------------


def _auth_shareable(directives: Mapping[str, Optional[str]]) -> bool:
    # RFC 9111 S{sect}3.5.
    return (
        "public" in directives
        or "s-maxage" in directives
        or "must-revalidate" in directives
    )


def _vary_names(headers: Headers) -> Optional[List[bytes]]:
    """
    The lower-cased field names of C{Vary}, or L{None} for C{Vary: *}.
    """
    names: List[bytes] = []
    for line in header_values(headers, b"vary"):
        for item in line.split(b","):
            item = item.strip().lower()
            if item == b"*":
                return None
            if item and item not in names:
                names.append(item)
    return names


def is_storable(
    method: bytes,
    request_headers: Headers,
    status: int,
    response_headers: Headers,
    policy: CachePolicy,
) -> bool:
    """
    Whether a shared cache may store this response (RFC 9111 S{sect}3).

    Does not look at the body: L{make_entry} also refuses bodies over
    L{CachePolicy.max_object_size} and incomplete ones.

    @param method: the request method; only C{GET} responses are stored.
    @param status: the response status code.
    @rtype: L{bool}
    """
    if method != b"GET":
        return False
    # Final statuses only; 206 and 304 are not stored (S{sect}3, S{sect}3.4).
    if status < 200 or status in (206, 304):
        return False
    request_cc = parse_cache_control(header_values(request_headers, b"cache-control"))
    if "no-store" in request_cc:  # S{sect}5.2.1.5
        return False
    cc = parse_cache_control(header_values(response_headers, b"cache-control"))
    if "must-understand" in cc:  # S{sect}5.2.2.3
        if status not in HEURISTICALLY_CACHEABLE:
            return False
    elif "no-store" in cc:  # S{sect}5.2.2.5
        return False
    if "private" in cc:  # S{sect}5.2.2.7
        return False
    if _has(request_headers, b"authorization") and not _auth_shareable(cc):
        return False  # S{sect}3.5
    if _has(response_headers, b"set-cookie") and not policy.allow_set_cookie:
        return False
    if _vary_names(response_headers) is None:  # Vary: * never matches, S{sect}4.1
        return False
    return (
        "public" in cc
        or "max-age" in cc
        or "s-maxage" in cc
        or _has(response_headers, b"expires")
        or status in HEURISTICALLY_CACHEABLE
    )


def freshness_lifetime(
    response_headers: Headers,
    status: int,
    policy: CachePolicy,
    response_time: Optional[float] = None,
) -> float:
    """
    The freshness lifetime of a response in a shared cache (RFC 9111
    S{sect}4.2.1): C{s-maxage}, else C{max-age}, else C{Expires} minus
    C{Date}, else the heuristic L{CachePolicy.default_ttl} (S{sect}4.2.2).

    An invalid C{s-maxage}, C{max-age} or C{Expires} gives 0 (stale) and
    rules out the heuristic.

    @param response_time: when the response was received, POSIX seconds;
        stands in for a missing or invalid C{Date}. Without either, an
        C{Expires} gives 0.
    @return: seconds, >= 0.
    @rtype: L{float}
    """
    cc = parse_cache_control(header_values(response_headers, b"cache-control"))
    for directive in ("s-maxage", "max-age"):
        if directive in cc:
            return float(_delta_seconds(cc[directive]) or 0)
    expires_value = _first(response_headers, b"expires")
    if expires_value is not None:
        expires = parse_http_date(expires_value)
        date = parse_http_date(_first(response_headers, b"date"))
        if date is None:
            date = response_time
        if expires is None or date is None:
            return 0.0
        return max(0.0, expires - date)
    if policy.default_ttl > 0 and (
        status in HEURISTICALLY_CACHEABLE or "public" in cc
    ):
        return float(policy.default_ttl)
    return 0.0


def current_age(entry: CachedResponse, now: float) -> float:
    """
    The current age of a stored response (RFC 9111 S{sect}4.2.3)::

        apparent_age = max(0, response_time - date_value)
        corrected_age_value = age_value + (response_time - request_time)
        corrected_initial_age = max(apparent_age, corrected_age_value)
        current_age = corrected_initial_age + (now - response_time)

    An absent or invalid C{Age} counts as 0.

    @param now: POSIX seconds.
    @return: seconds.
    @rtype: L{float}
    """
    date = parse_http_date(_first(entry.headers, b"date"))
    if date is None:
        date = entry.response_time
    age_value = _delta_seconds(
        (_first(entry.headers, b"age") or b"").strip().decode("latin-1")
    ) or 0
    apparent_age = max(0.0, entry.response_time - date)
    response_delay = entry.response_time - entry.request_time
    corrected_age_value = age_value + response_delay
    corrected_initial_age = max(apparent_age, corrected_age_value)
    resident_time = now - entry.response_time
    return corrected_initial_age + resident_time


def _lifetime(entry: CachedResponse, policy: CachePolicy) -> float:
    return freshness_lifetime(entry.headers, entry.status, policy, entry.response_time)


def _stale_prohibited(directives: Mapping[str, Optional[str]]) -> bool:
    # S{sect}4.2.4; s-maxage implies proxy-revalidate, S{sect}5.2.2.10.
    return any(
        d in directives
        for d in ("no-cache", "must-revalidate", "proxy-revalidate", "s-maxage")
    )


def _window(directives: Mapping[str, Optional[str]], name: str) -> float:
    return float(_delta_seconds(directives.get(name)) or 0)


def _has_validator(entry: CachedResponse) -> bool:
    return _has(entry.headers, b"etag") or _has(entry.headers, b"last-modified")


def _strip(headers: Iterable[Header], drop_set_cookie: bool) -> List[Header]:
    """
    Remove fields a cache must not store (S{sect}3.1): hop-by-hop fields,
    those named by C{Connection}, proxy fields; and C{Set-Cookie}.
    """
    headers = list(headers)
    named = set()
    for line in header_values(headers, b"connection"):
        named.update(t.strip().lower() for t in line.split(b","))
    out = []
    for name, value in headers:
        low = name.lower()
        if low in _NOT_STORED or low in named:
            continue
        if drop_set_cookie and low == b"set-cookie":
            continue
        out.append((name, value))
    return out


def _normalise(name: bytes, values: List[bytes]) -> Optional[bytes]:
    """
    Normalise a request field for Vary matching (S{sect}4.1): lines combined,
    whitespace around members removed, case folded where values are
    case-insensitive. L{None} when the field is absent.
    """
    if not values:
        return None
    members = [m.strip() for line in values for m in line.split(b",")]
    joined = b",".join(m for m in members if m)
    if name in _CASE_INSENSITIVE_VALUES:
        joined = joined.lower()
    return b" ".join(joined.split())


def _vary_values(
    names: Sequence[bytes], request_headers: Headers
) -> Tuple[Tuple[bytes, Optional[bytes]], ...]:
    return tuple(
        (name, _normalise(name, header_values(request_headers, name)))
        for name in names
    )


def vary_matches(entry: CachedResponse, request_headers: Headers) -> bool:
    """
    Whether a stored response may be selected for a request (S{sect}4.1):
    every field named by its C{Vary} has the same normalised value in the
    request as in the request that produced it (absent matches only
    absent). C{Vary: *} never matches.

    @rtype: L{bool}
    """
    names = _vary_names(entry.headers)
    if names is None:
        return False
    stored = dict(entry.vary)
    for name in names:
        if name not in stored:
            return False
        if stored[name] != _normalise(name, header_values(request_headers, name)):
            return False
    return True


def make_entry(
    method: bytes,
    request_headers: Headers,
    status: int,
    response_headers: Headers,
    body: bytes,
    request_time: float,
    response_time: float,
    policy: CachePolicy,
) -> Optional[CachedResponse]:
    """
    Build the entry to store for a backend response, or L{None} if it must
    not (or need not) be stored.

    Refused: what L{is_storable} refuses; bodies over
    L{CachePolicy.max_object_size}; bodies shorter or longer than
    C{Content-Length} (incomplete, S{sect}3.3); responses that could never
    be used (no freshness, no validator, no stale window). Hop-by-hop fields
    and C{Set-Cookie} are removed; a C{Date} is added if missing (RFC 9110
    S{sect}6.6.1).

    @param body: the whole body as received (transfer coding removed).
    @param request_time: when the backend request was sent, POSIX seconds.
    @param response_time: when its response was received, POSIX seconds.
    @rtype: L{CachedResponse} or L{None}
    """
    if not is_storable(method, request_headers, status, response_headers, policy):
        return None
    if len(body) > policy.max_object_size:
        return None
    length = _first(response_headers, b"content-length")
    if length is not None:
        try:
            if int(length) != len(body):
                return None
        except ValueError:
            return None
    headers = _strip(response_headers, drop_set_cookie=True)
    if not _has(headers, b"date") or parse_http_date(_first(headers, b"date")) is None:
        headers = [(n, v) for (n, v) in headers if n.lower() != b"date"]
        headers.append((b"Date", _format_http_date(response_time)))
    names = _vary_names(headers) or []
    entry = CachedResponse(
        status=status,
        headers=headers,
        body=body,
        request_time=request_time,
        response_time=response_time,
        vary=_vary_values(names, request_headers),
    )
    if _retention(entry, response_time, policy) <= 0:
        return None  # could never be used
    return entry


def freshen(
    entry: CachedResponse,
    not_modified_headers: Headers,
    request_time: float,
    response_time: float,
) -> Optional[CachedResponse]:
    """
    Update a stored response with a 304 received on revalidating it
    (RFC 9111 S{sect}4.3.3, S{sect}4.3.4).

    The 304's fields replace the stored ones of the same name, except
    C{Content-Length}, hop-by-hop fields and C{Set-Cookie}. The stored
    C{Age} is dropped (the 304 is a fresh statement from the backend), a
    304 without C{Date} is dated on receipt, and the exchange's times become
    the entry's, so its age restarts.

    A 304 whose C{ETag} does not identify the stored response (strong
    comparison for a strong tag, weak for a weak one) updates nothing: the
    caller should then fetch unconditionally. A 304 without a validator is
    taken to answer the conditional request this cache sent for C{entry}.

    @param request_time: when the conditional request was sent.
    @param response_time: when the 304 was received.
    @return: the freshened entry, or L{None} if the 304 does not match.
    @rtype: L{CachedResponse} or L{None}
    """
    new_etag = _first(not_modified_headers, b"etag")
    if new_etag is not None:
        old_etag = _first(entry.headers, b"etag")
        if old_etag is None:
            return None
        new_etag, old_etag = new_etag.strip(), old_etag.strip()
        if new_etag.startswith(b"W/"):
            if _opaque(new_etag) != _opaque(old_etag):
                return None
        elif old_etag.startswith(b"W/") or new_etag != old_etag:
            return None
    else:
        new_lm = _first(not_modified_headers, b"last-modified")
        old_lm = _first(entry.headers, b"last-modified")
        if new_lm is not None and old_lm is not None and new_lm.strip() != old_lm.strip():
            return None
    update = [
        (n, v)
        for (n, v) in _strip(not_modified_headers, drop_set_cookie=True)
        if n.lower() != b"content-length"
    ]
    if parse_http_date(_first(update, b"date")) is None:
        # RFC 9110 S{sect}6.6.1: a message without Date is dated on receipt.
        update = [(n, v) for (n, v) in update if n.lower() != b"date"]
        update.append((b"Date", _format_http_date(response_time)))
    replaced = {n.lower() for (n, _) in update} | {b"age"}
    headers = [(n, v) for (n, v) in entry.headers if n.lower() not in replaced]
    headers.extend(update)
    return attrs.evolve(
        entry,
        headers=headers,
        request_time=request_time,
        response_time=response_time,
    )


def _retention(entry: CachedResponse, now: float, policy: CachePolicy) -> float:
    """
    Seconds from C{now} for which C{entry} stays useful: its remaining
    freshness, plus its stale windows when serving stale is allowed, plus
    L{CachePolicy.revalidate_window} when it has a validator.
    """
    cc = entry.directives
    if "no-cache" in cc and not _has_validator(entry):
        return 0.0  # must validate, cannot: useless
    remaining = _lifetime(entry, policy) - current_age(entry, now)
    keep = 0.0
    if not _stale_prohibited(cc):
        keep = max(_window(cc, "stale-while-revalidate"), _window(cc, "stale-if-error"))
    if _has_validator(entry):
        keep = max(keep, policy.revalidate_window)
    return remaining + keep


def storage_ttl(
    variants: Sequence[CachedResponse], now: float, policy: CachePolicy
) -> float:
    """
    How long a store should keep these variants, in seconds: the longest
    L{_retention} among them. Not positive means do not store.

    @rtype: L{float}
    """
    return max((_retention(v, now, policy) for v in variants), default=0.0)


def add_variant(
    variants: Optional[Sequence[CachedResponse]],
    entry: CachedResponse,
    request_headers: Headers,
    now: float,
    policy: CachePolicy,
) -> Tuple[CachedResponse, ...]:
    """
    The variants to store under a key once C{entry} is added (S{sect}4.1).

    C{entry} goes first (most recent); stored variants that the request
    producing it would have selected are replaced by it, useless ones
    (expired past their retention) dropped, and at most
    L{CachePolicy.max_variants} kept.

    @param variants: the variants stored under the key, most recent first,
        or L{None}.
    @param request_headers: the request C{entry} answers.
    @rtype: L{tuple} of L{CachedResponse}
    """
    kept = [entry]
    for old in variants or ():
        if vary_matches(old, request_headers):
            continue
        if _retention(old, now, policy) <= 0:
            continue
        kept.append(old)
    return tuple(kept[: policy.max_variants])


# --- serving ------------------------------------------------------------------


def _opaque(tag: bytes) -> bytes:
    tag = tag.strip()
    return tag[2:] if tag.startswith(b"W/") else tag


def _none_match(entry: CachedResponse, value: bytes) -> bool:
    """
    Whether C{If-None-Match} matches the stored response (weak comparison,
    RFC 9110 S{sect}13.1.2, S{sect}8.8.3.2).
    """
    etag = _first(entry.headers, b"etag")
    for member in split_list(value.decode("latin-1")):
        if member == "*":
            return True
        if etag is not None and _opaque(member.encode("latin-1")) == _opaque(etag):
            return True
    return False


def _not_modified(
    entry: CachedResponse, method: bytes, request_headers: Headers
) -> bool:
    """
    Whether the client's conditional request matches the stored response
    (RFC 9111 S{sect}4.3.2, RFC 9110 S{sect}13.1.2, S{sect}13.1.3,
    S{sect}13.2.2).
    """
    if method not in (b"GET", b"HEAD") or not 200 <= entry.status < 300:
        return False
    inm = header_values(request_headers, b"if-none-match")
    if inm:
        return _none_match(entry, b",".join(inm))
    ims_values = header_values(request_headers, b"if-modified-since")
    if len(ims_values) != 1:
        return False
    ims = parse_http_date(ims_values[0])
    if ims is None:
        return False
    modified = parse_http_date(_first(entry.headers, b"last-modified"))
    if modified is None:
        modified = parse_http_date(_first(entry.headers, b"date"))
    if modified is None:
        modified = entry.response_time
    return modified <= ims


def respond(
    entry: CachedResponse, method: bytes, request_headers: Headers, now: float
) -> ServedResponse:
    """
    The response to send from a stored response.

    Sets C{Age} to the current age in whole seconds (S{sect}5.1); answers a
    matching C{If-None-Match} / C{If-Modified-Since} with 304 (S{sect}4.3.2);
    sends no body for C{HEAD}.

    @param now: POSIX seconds.
    @rtype: L{ServedResponse}
    """
    age = min(int(max(0.0, current_age(entry, now))), MAX_DELTA_SECONDS)
    if _not_modified(entry, method, request_headers):
        headers = tuple(
            (n, v) for (n, v) in entry.headers if n.lower() in _NOT_MODIFIED_FIELDS
        ) + ((b"Age", b"%d" % age),)
        return ServedResponse(status=304, headers=headers, body=b"")
    headers = tuple((n, v) for (n, v) in entry.headers if n.lower() != b"age")
    headers += ((b"Age", b"%d" % age),)
    return ServedResponse(
        status=entry.status,
        headers=headers,
        body=b"" if method == b"HEAD" else entry.body,
    )


def conditional_headers(entry: CachedResponse) -> Tuple[Header, ...]:
    """
    The fields that make a backend request validate C{entry}
    (RFC 9111 S{sect}4.3.1): C{If-None-Match} with its C{ETag},
    C{If-Modified-Since} with its C{Last-Modified}.

    @rtype: L{tuple} of header pairs; empty without validators.
    """
    out: List[Header] = []
    etag = _first(entry.headers, b"etag")
    if etag is not None:
        out.append((b"If-None-Match", etag.strip()))
    modified = _first(entry.headers, b"last-modified")
    if modified is not None:
        out.append((b"If-Modified-Since", modified.strip()))
    return tuple(out)


#: Request fields to remove before adding L{CacheDecision.conditional_headers}.
CLIENT_CONDITIONAL_FIELDS = (b"if-none-match", b"if-modified-since")


def lookup(
    variants: Optional[Sequence[CachedResponse]],
    method: bytes,
    request_headers: Headers,
    now: float,
    policy: CachePolicy,
) -> CacheDecision:
    """
    Decide how to answer a request from the variants stored under its key.

    See the module docstring for the rules and the client directives.

    @param variants: what the store returned for L{cache_key}, most recent
        first, or L{None}.
    @param method: the request method.
    @param request_headers: the client's request fields.
    @param now: POSIX seconds.
    @rtype: L{CacheDecision}
    """
    if method not in (b"GET", b"HEAD") or any(
        _has(request_headers, f) for f in _BYPASS_REQUEST_FIELDS
    ):
        return CacheDecision(Outcome.BYPASS)
    req = parse_cache_control(header_values(request_headers, b"cache-control"))
    may_store = method == b"GET" and "no-store" not in req
    has_auth = _has(request_headers, b"authorization")
    entry = None
    for candidate in variants or ():
        if not vary_matches(candidate, request_headers):
            continue
        if has_auth and not _auth_shareable(candidate.directives):
            continue  # S{sect}3.5: not served to authenticated requests
        if entry is None or candidate.response_time > entry.response_time:
            entry = candidate
    if entry is None:
        if "only-if-cached" in req:
            return CacheDecision(Outcome.GATEWAY_TIMEOUT)
        return CacheDecision(Outcome.MISS, may_store=may_store)

    cc = entry.directives
    lifetime = _lifetime(entry, policy)
    age = current_age(entry, now)
    fresh = lifetime > age  # S{sect}4.2
    client_limited = False
    if "max-age" in req and age > (_delta_seconds(req["max-age"]) or 0):
        client_limited = True  # S{sect}5.2.1.1
    if "min-fresh" in req and lifetime - age < (_delta_seconds(req["min-fresh"]) or 0):
        client_limited = True  # S{sect}5.2.1.3
    must_validate = "no-cache" in cc or "no-cache" in req  # S{sect}5.2.2.4, 5.2.1.4

    if fresh and not client_limited and not must_validate:
        return CacheDecision(
            Outcome.HIT,
            entry=entry,
            response=respond(entry, method, request_headers, now),
            may_store=may_store,
        )

    staleness = age - lifetime
    if not must_validate and not client_limited and not _stale_prohibited(cc):
        if "max-stale" in req:  # S{sect}5.2.1.2
            limit = _delta_seconds(req["max-stale"])
            if req["max-stale"] is None or (limit is not None and staleness <= limit):
                return CacheDecision(
                    Outcome.HIT,
                    entry=entry,
                    response=respond(entry, method, request_headers, now),
                    may_store=may_store,
                )
        swr = _delta_seconds(cc.get("stale-while-revalidate"))
        if swr is not None and staleness <= swr:
            return CacheDecision(  # RFC 5861 S{sect}3
                Outcome.STALE_SERVABLE,
                entry=entry,
                response=respond(entry, method, request_headers, now),
                conditional_headers=conditional_headers(entry),
                may_store=may_store,
            )
    if "only-if-cached" in req:
        return CacheDecision(Outcome.GATEWAY_TIMEOUT, entry=entry)
    validators = conditional_headers(entry)
    if validators and method == b"GET":
        return CacheDecision(
            Outcome.STALE_REVALIDATE,
            entry=entry,
            conditional_headers=validators,
            may_store=may_store,
        )
    return CacheDecision(Outcome.MISS, entry=entry, may_store=may_store)


def serve_stale_on_error(
    entry: Optional[CachedResponse],
    now: float,
    policy: CachePolicy,
    method: bytes = b"GET",
    request_headers: Headers = (),
) -> Optional[ServedResponse]:
    """
    The stale response to send when the backend failed (a connection error,
    a timeout, or a status in L{ERROR_STATUSES}), if C{stale-if-error}
    allows it (RFC 5861 S{sect}4).

    The window is the larger of the response's and the request's
    C{stale-if-error}. Never when the response has C{no-cache},
    C{must-revalidate}, C{proxy-revalidate} or C{s-maxage} (RFC 9111
    S{sect}4.2.4).

    @param entry: L{CacheDecision.entry} of the lookup, or L{None}.
    @param now: POSIX seconds.
    @return: the response to send, or L{None}: send the error.
    @rtype: L{ServedResponse} or L{None}
    """
    if entry is None:
        return None
    cc = entry.directives
    if _stale_prohibited(cc):
        return None
    req = parse_cache_control(header_values(request_headers, b"cache-control"))
    windows = [
        w
        for w in (
            _delta_seconds(cc.get("stale-if-error")),
            _delta_seconds(req.get("stale-if-error")),
        )
        if w is not None
    ]
    staleness = current_age(entry, now) - _lifetime(entry, policy)
    if not windows or staleness > max(windows):
        return None
    return respond(entry, method, request_headers, now)


def invalidates(method: bytes, status: int) -> bool:
    """
    Whether a response to C{method} invalidates the stored responses of its
    target URI (RFC 9111 S{sect}4.4): an unsafe method and a non-error
    (2xx or 3xx) status. The caller deletes L{cache_key} of the target, and
    of same-origin C{Location} / C{Content-Location} paths if it wishes.

    @rtype: L{bool}
    """
    safe = method in (b"GET", b"HEAD", b"OPTIONS", b"TRACE")
    return not safe and 200 <= status < 400


# --- request collapsing -------------------------------------------------------

T = TypeVar("T")


@attrs.define(eq=False)
class _Waiter(Generic[T]):
    deferred: Deferred
    fetch: Callable[[], "Deferred[T]"]
    accept: Optional[Callable[[T], bool]]
    own: Optional[Deferred] = None


@attrs.define(eq=False)
class _Flight:
    waiters: List[_Waiter] = attrs.Factory(list)
    fetching: Optional[Deferred] = None
    done: bool = False


@attrs.define
class Collapser:
    """
    Concurrent misses for one key make one backend request.

    The first caller for a key (the leader) runs its C{fetch}; callers that
    arrive while it runs wait for it. Each caller gets its own L{Deferred}:
    callbacks added by one never change what another sees, and cancelling
    one only withdraws that caller (the fetch is cancelled when every caller
    has withdrawn). When the fetch fails, every caller gets the failure.
    When it succeeds, the leader gets the result and each follower gets it
    if its C{accept(result)} is true; otherwise the follower runs its own
    C{fetch} (uncollapsed). Results are shared between callers, so they
    must be immutable (a L{CachedResponse} is).

    Typical C{fetch}: forward the request, store the response, fire with
    the stored L{CachedResponse} or L{None} when not stored; typical
    C{accept}: C{lambda e: e is not None and lookup((e,), ...).outcome is
    Outcome.HIT} so that a private or differently-varied response is never
    handed to another client.
    """

    _flights: Dict[bytes, _Flight] = attrs.field(factory=dict, init=False)

    def in_flight(self, key: bytes) -> bool:
        """
        Whether a fetch for C{key} is running.
        """
        return key in self._flights

    def collapse(
        self,
        key: bytes,
        fetch: Callable[[], "Deferred[T]"],
        accept: Optional[Callable[[T], bool]] = None,
    ) -> "Deferred[T]":
        """
        Run C{fetch} for C{key}, or wait for the one running.

        @param key: the collapsing key (the cache key).
        @param fetch: makes the backend request; returns a L{Deferred} (or a
            value). Called at most once, by the leader or by a follower whose
            C{accept} refused the leader's result.
        @param accept: for a follower, whether the leader's result serves
            it; default: the result is not L{None}.
        @return: fires with the result, or fails with the fetch's failure;
            L{CancelledError} if cancelled.
        @rtype: L{Deferred}
        """
        flight = self._flights.get(key)
        leader = flight is None
        if flight is None:
            flight = self._flights[key] = _Flight()
        waiter: _Waiter = _Waiter(
            deferred=None,  # type: ignore[arg-type]
            fetch=fetch,
            accept=None if leader else (accept or (lambda r: r is not None)),
        )
        waiter.deferred = Deferred(lambda d: self._withdraw(key, flight, waiter))
        flight.waiters.append(waiter)
        if leader:
            flight.fetching = maybeDeferred(fetch)
            flight.fetching.addBoth(self._landed, key, flight)
        return waiter.deferred

    def _withdraw(self, key: bytes, flight: _Flight, waiter: _Waiter) -> None:
        if waiter.own is not None:
            waiter.own.cancel()
            return
        if waiter in flight.waiters:
            flight.waiters.remove(waiter)
        if not flight.waiters and not flight.done:
            if self._flights.get(key) is flight:
                del self._flights[key]
            if flight.fetching is not None:
                flight.fetching.cancel()

    def _landed(self, result, key: bytes, flight: _Flight) -> None:
        flight.done = True
        if self._flights.get(key) is flight:
            del self._flights[key]
        waiters, flight.waiters = flight.waiters, []
        for waiter in waiters:
            if waiter.deferred.called:
                continue
            if isinstance(result, Failure):
                waiter.deferred.errback(result)
                continue
            accepted = True
            if waiter.accept is not None:
                try:
                    accepted = bool(waiter.accept(result))
                except Exception:
                    _log.failure("cache collapse accept() failed")
                    accepted = False
            if accepted:
                waiter.deferred.callback(result)
            else:
                self._own_fetch(waiter)
        return None

    def _own_fetch(self, waiter: _Waiter) -> None:
        own = maybeDeferred(waiter.fetch)
        waiter.own = own

        def settle(outcome):
            if not waiter.deferred.called:
                if isinstance(outcome, Failure):
                    waiter.deferred.errback(outcome)
                else:
                    waiter.deferred.callback(outcome)
            elif isinstance(outcome, Failure) and not outcome.check(CancelledError):
                _log.failure("uncollapsed cache fetch failed", outcome)

        own.addBoth(settle)
