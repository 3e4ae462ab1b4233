"""
Tests for L{gateway.cache} (RFC 9111 / RFC 5861 rules, collapsing) and
L{gateway.cachestore} (memory and Redis stores).

Times are explicit: C{NOW} is a fixed POSIX time and every rule is checked
just inside and just outside its boundary.
"""

import random
import uuid

import pytest
import pytest_twisted
import redis
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool
from twisted.web.http import datetimeToString
from zope.interface.verify import verifyObject

from gateway.cache import (
    CachedResponse,
    CachePolicy,
    Collapser,
    Outcome,
    add_variant,
    cache_key,
    current_age,
    freshen,
    freshness_lifetime,
    headers_from_twisted,
    invalidates,
    is_storable,
    key_prefix,
    lookup,
    make_entry,
    parse_cache_control,
    respond,
    serve_stale_on_error,
    storage_ttl,
)
from gateway.cachestore import (
    ICacheStore,
    MemoryCacheStore,
    RedisCacheStore,
    decode_variants,
    encode_variants,
)

NOW = 1_700_000_000.0
POLICY = CachePolicy(default_ttl=0.0, max_object_size=1024, allow_set_cookie=False)


def http_date(t):
    return datetimeToString(int(t))


def entry(cc=None, status=200, body=b"hello", headers=(), request_headers=(),
          t=NOW, policy=POLICY, date=True):
    """
    A stored entry received at C{t}, built through L{make_entry}.
    """
    h = list(headers)
    if cc is not None:
        h.append((b"Cache-Control", cc))
    if date:
        h.append((b"Date", http_date(t)))
    e = make_entry(b"GET", list(request_headers), status, h, body, t, t, policy)
    assert e is not None, "entry unexpectedly not storable"
    return e


def value(headers, name):
    values = [v for (n, v) in headers if n.lower() == name]
    assert len(values) <= 1
    return values[0] if values else None


# --- freshness (RFC 9111 S4.2) -------------------------------------------------


def test_s_maxage_overrides_max_age_rfc9111_5_2_2_10():
    """RFC 9111 5.2.2.10: a shared cache uses s-maxage before max-age."""
    headers = [(b"Cache-Control", b"max-age=10, s-maxage=300")]
    assert freshness_lifetime(headers, 200, POLICY) == 300


def test_max_age_overrides_expires_rfc9111_5_2_2_1():
    """RFC 9111 5.2.2.1 / 4.2.1: max-age wins over Expires."""
    headers = [
        (b"Cache-Control", b"max-age=60"),
        (b"Date", http_date(NOW)),
        (b"Expires", http_date(NOW + 3600)),
    ]
    assert freshness_lifetime(headers, 200, POLICY) == 60


def test_expires_minus_date_rfc9111_4_2_1():
    """RFC 9111 4.2.1: lifetime is Expires minus Date, not minus receipt."""
    headers = [(b"Date", http_date(NOW - 100)), (b"Expires", http_date(NOW + 200))]
    assert freshness_lifetime(headers, 200, POLICY, response_time=NOW) == 300


def test_expires_without_date_uses_response_time_rfc9111_4_2_1():
    """RFC 9111 4.2.1 (RFC 9110 6.6.1): no Date: the receipt time stands in."""
    headers = [(b"Expires", http_date(NOW + 120))]
    assert freshness_lifetime(headers, 200, POLICY, response_time=NOW) == 120
    # And make_entry records that Date, so the entry keeps the same lifetime.
    e = make_entry(b"GET", [], 200, headers, b"x", NOW, NOW, POLICY)
    assert value(e.headers, b"date") == http_date(NOW)
    assert freshness_lifetime(e.headers, 200, POLICY) == 120


def test_invalid_expires_means_stale_rfc9111_5_3():
    """RFC 9111 5.3: an invalid Expires (e.g. "0") means already expired,
    and counts as explicit: no heuristic."""
    policy = CachePolicy(default_ttl=500)
    headers = [(b"Date", http_date(NOW)), (b"Expires", b"0")]
    assert freshness_lifetime(headers, 200, policy) == 0


def test_invalid_max_age_means_stale_rfc9111_4_2_1():
    """RFC 9111 4.2.1: invalid freshness information makes the response
    stale; no heuristic is applied instead."""
    policy = CachePolicy(default_ttl=500)
    assert freshness_lifetime([(b"Cache-Control", b"max-age=abc")], 200, policy) == 0
    assert freshness_lifetime([(b"Cache-Control", b"max-age=-5")], 200, policy) == 0


def test_delta_seconds_overflow_capped_rfc9111_1_2_2():
    """RFC 9111 1.2.2: too-large delta-seconds become 2**31."""
    headers = [(b"Cache-Control", b"max-age=99999999999999999999")]
    assert freshness_lifetime(headers, 200, POLICY) == 2**31


def test_first_duplicate_directive_used_rfc9111_4_2_1():
    """RFC 9111 4.2.1: with duplicate directives the first occurrence is used,
    also across field lines."""
    headers = [(b"Cache-Control", b"max-age=30"), (b"cache-control", b"max-age=900")]
    assert freshness_lifetime(headers, 200, POLICY) == 30


def test_quoted_directive_value_accepted_rfc9111_5_2():
    """RFC 9111 5.2: recipients accept the quoted-string form too; commas in
    quotes do not split directives."""
    cc = parse_cache_control([b'max-age="45", private="a, b", Public'])
    assert cc == {"max-age": "45", "private": "a, b", "public": None}
    assert freshness_lifetime([(b"Cache-Control", b'max-age="45"')], 200, POLICY) == 45


def test_heuristic_uses_default_ttl_rfc9111_4_2_2():
    """RFC 9111 4.2.2: without explicit freshness, a heuristically cacheable
    status gets default_ttl, only when default_ttl > 0."""
    assert freshness_lifetime([], 200, CachePolicy(default_ttl=30)) == 30
    assert freshness_lifetime([], 404, CachePolicy(default_ttl=30)) == 30
    assert freshness_lifetime([], 200, CachePolicy(default_ttl=0)) == 0


def test_heuristic_only_for_heuristic_status_or_public_rfc9111_4_2_2():
    """RFC 9111 4.2.2 / RFC 9110 15.1: no heuristic for 302 or 500, unless
    marked public."""
    policy = CachePolicy(default_ttl=30)
    assert freshness_lifetime([], 302, policy) == 0
    assert freshness_lifetime([], 500, policy) == 0
    assert freshness_lifetime([(b"Cache-Control", b"public")], 302, policy) == 30


def test_no_heuristic_with_explicit_freshness_rfc9111_4_2_2():
    """RFC 9111 4.2.2: heuristics MUST NOT be used when an explicit
    expiration time is present."""
    policy = CachePolicy(default_ttl=30)
    assert freshness_lifetime([(b"Cache-Control", b"max-age=0")], 200, policy) == 0
    assert freshness_lifetime([(b"Cache-Control", b"max-age=5")], 200, policy) == 5


# --- age (RFC 9111 S4.2.3, S5.1) ----------------------------------------------


def test_current_age_apparent_age_rfc9111_4_2_3():
    """RFC 9111 4.2.3: apparent age (response_time - Date) dominates a small
    Age; resident time is added."""
    e = CachedResponse(
        status=200,
        headers=[(b"Date", http_date(NOW - 10)), (b"Age", b"5")],
        body=b"",
        request_time=NOW,
        response_time=NOW + 2,
    )
    # apparent 12, corrected age value 5 + 2 = 7, resident 30.
    assert current_age(e, NOW + 32) == 42


def test_current_age_corrected_age_value_rfc9111_4_2_3():
    """RFC 9111 4.2.3: Age plus the response delay dominates when larger."""
    e = CachedResponse(
        status=200,
        headers=[(b"Date", http_date(NOW + 2)), (b"Age", b"20")],
        body=b"",
        request_time=NOW,
        response_time=NOW + 2,
    )
    assert current_age(e, NOW + 12) == 20 + 2 + 10


def test_invalid_age_ignored_rfc9111_4_2_3():
    """RFC 9111 4.2.3: age_value is 0 if not available (invalid Age)."""
    e = CachedResponse(
        status=200,
        headers=[(b"Date", http_date(NOW)), (b"Age", b"soon")],
        body=b"",
        request_time=NOW,
        response_time=NOW,
    )
    assert current_age(e, NOW + 7) == 7


def test_age_set_on_hit_rfc9111_5_1():
    """RFC 9111 5.1: a response served from cache carries Age (whole
    seconds), replacing the stored one."""
    e = entry(b"max-age=600", headers=[(b"Age", b"100")])
    d = lookup((e,), b"GET", [], NOW + 30.7, POLICY)
    assert d.outcome is Outcome.HIT
    assert value(d.response.headers, b"age") == b"130"
    assert d.response.body == b"hello"


# --- storability (RFC 9111 S3) -------------------------------------------------


def test_only_get_responses_stored_rfc9111_3():
    """RFC 9111 3: only GET responses are stored (HEAD responses have no
    body to serve a GET; POST is not cacheable here)."""
    h = [(b"Cache-Control", b"max-age=60")]
    assert is_storable(b"GET", [], 200, h, POLICY)
    assert not is_storable(b"HEAD", [], 200, h, POLICY)
    assert not is_storable(b"POST", [], 200, h, POLICY)


def test_response_no_store_rfc9111_5_2_2_5():
    """RFC 9111 5.2.2.5: no-store responses are not stored."""
    assert not is_storable(b"GET", [], 200, [(b"Cache-Control", b"max-age=60, no-store")], POLICY)


def test_request_no_store_rfc9111_5_2_1_5():
    """RFC 9111 5.2.1.5: a request with no-store: its response is not
    stored; a stored response may still be served."""
    req = [(b"Cache-Control", b"no-store")]
    assert not is_storable(b"GET", req, 200, [(b"Cache-Control", b"max-age=60")], POLICY)
    d = lookup((entry(b"max-age=60"),), b"GET", req, NOW + 1, POLICY)
    assert d.outcome is Outcome.HIT
    assert not d.may_store
    assert lookup(None, b"GET", [], NOW, POLICY).may_store


def test_private_not_stored_by_shared_cache_rfc9111_5_2_2_7():
    """RFC 9111 5.2.2.7: a shared cache does not store private responses;
    the qualified form is treated as unqualified (conservative)."""
    for cc in (b"private, max-age=60", b'private="Set-Cookie", max-age=60'):
        assert not is_storable(b"GET", [], 200, [(b"Cache-Control", cc)], POLICY)


def test_no_cache_stored_but_always_revalidated_rfc9111_5_2_2_4():
    """RFC 9111 5.2.2.4: no-cache responses are stored but never used
    without validation, even when fresh; without a validator they are
    useless and not stored."""
    e = entry(b"no-cache, max-age=600", headers=[(b"ETag", b'"v1"')])
    d = lookup((e,), b"GET", [], NOW + 1, POLICY)
    assert d.outcome is Outcome.STALE_REVALIDATE
    assert d.conditional_headers == ((b"If-None-Match", b'"v1"'),)
    h = [(b"Cache-Control", b"no-cache, max-age=600"), (b"Date", http_date(NOW))]
    assert make_entry(b"GET", [], 200, h, b"x", NOW, NOW, POLICY) is None


@pytest.mark.parametrize(
    "cc, storable",
    [
        (b"max-age=60", False),
        (b"public, max-age=60", True),
        (b"s-maxage=60", True),
        (b"must-revalidate, max-age=60", True),
    ],
)
def test_authorization_stored_only_if_allowed_rfc9111_3_5(cc, storable):
    """RFC 9111 3.5: responses to requests with Authorization are stored
    only with public, s-maxage or must-revalidate."""
    req = [(b"Authorization", b"Bearer x")]
    assert is_storable(b"GET", req, 200, [(b"Cache-Control", cc)], POLICY) is storable
    assert is_storable(b"GET", [], 200, [(b"Cache-Control", cc)], POLICY)


def test_authorization_request_not_served_from_private_entry_rfc9111_3_5():
    """RFC 9111 3.5: a request with Authorization is not served a stored
    response that lacks public/s-maxage/must-revalidate."""
    auth = [(b"Authorization", b"Bearer x")]
    plain = entry(b"max-age=60")
    assert lookup((plain,), b"GET", auth, NOW + 1, POLICY).outcome is Outcome.MISS
    assert lookup((plain,), b"GET", [], NOW + 1, POLICY).outcome is Outcome.HIT
    public = entry(b"public, max-age=60")
    assert lookup((public,), b"GET", auth, NOW + 1, POLICY).outcome is Outcome.HIT


def test_set_cookie_not_stored_unless_allowed():
    """Set-Cookie responses are stored only with allow_set_cookie, and then
    without the Set-Cookie field (never replayed to other clients)."""
    h = [(b"Cache-Control", b"max-age=60"), (b"Set-Cookie", b"sid=1"), (b"Date", http_date(NOW))]
    assert not is_storable(b"GET", [], 200, h, POLICY)
    assert make_entry(b"GET", [], 200, h, b"x", NOW, NOW, POLICY) is None
    allow = CachePolicy(allow_set_cookie=True)
    e = make_entry(b"GET", [], 200, h, b"x", NOW, NOW, allow)
    assert e is not None
    assert value(e.headers, b"set-cookie") is None


@pytest.mark.parametrize("status", [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501])
def test_heuristically_cacheable_statuses_rfc9110_15_1(status):
    """RFC 9110 15.1 / RFC 9111 3: these statuses are storable without
    explicit freshness."""
    assert is_storable(b"GET", [], status, [], POLICY)


@pytest.mark.parametrize("status", [201, 302, 307, 400, 403, 500, 503])
def test_other_statuses_need_explicit_freshness_rfc9111_3(status):
    """RFC 9111 3: other final statuses are storable only with explicit
    freshness (max-age, s-maxage, Expires) or public."""
    assert not is_storable(b"GET", [], status, [], POLICY)
    assert is_storable(b"GET", [], status, [(b"Cache-Control", b"max-age=5")], POLICY)
    assert is_storable(b"GET", [], status, [(b"Expires", http_date(NOW))], POLICY)


@pytest.mark.parametrize("status", [100, 103, 206, 304])
def test_non_final_partial_and_304_never_stored_rfc9111_3(status):
    """RFC 9111 3: non-final responses are not stored; 206 and 304 are not
    stored by this cache (it does not combine partial content)."""
    assert not is_storable(b"GET", [], status, [(b"Cache-Control", b"max-age=60")], POLICY)


def test_must_understand_rfc9111_5_2_2_3():
    """RFC 9111 5.2.2.3: with must-understand, no-store is ignored for a
    status the cache understands, and the response refused otherwise."""
    h = [(b"Cache-Control", b"must-understand, no-store, max-age=60")]
    assert is_storable(b"GET", [], 200, h, POLICY)
    assert not is_storable(b"GET", [], 299, h, POLICY)


def test_vary_star_never_stored_nor_served_rfc9111_4_1():
    """RFC 9111 4.1: Vary: * always fails to match."""
    h = [(b"Cache-Control", b"max-age=60"), (b"Vary", b"Accept, *")]
    assert not is_storable(b"GET", [], 200, h, POLICY)
    e = CachedResponse(200, h + [(b"Date", http_date(NOW))], b"x", NOW, NOW)
    assert lookup((e,), b"GET", [], NOW + 1, POLICY).outcome is Outcome.MISS


def test_max_object_size():
    """Bodies over max_object_size are not stored; at the limit they are."""
    h = [(b"Cache-Control", b"max-age=60")]
    assert make_entry(b"GET", [], 200, h, b"x" * 1024, NOW, NOW, POLICY) is not None
    assert make_entry(b"GET", [], 200, h, b"x" * 1025, NOW, NOW, POLICY) is None


def test_incomplete_response_not_stored_rfc9111_3_3():
    """RFC 9111 3.3: a body shorter than Content-Length is incomplete."""
    h = [(b"Cache-Control", b"max-age=60"), (b"Content-Length", b"10")]
    assert make_entry(b"GET", [], 200, h, b"short", NOW, NOW, POLICY) is None
    assert make_entry(b"GET", [], 200, h, b"0123456789", NOW, NOW, POLICY) is not None


def test_hop_by_hop_fields_not_stored_rfc9111_3_1():
    """RFC 9111 3.1: Connection, the fields it names and other hop-by-hop
    fields are not stored."""
    h = [
        (b"Cache-Control", b"max-age=60"),
        (b"Connection", b"close, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Keep-Alive", b"timeout=5"),
        (b"X-Kept", b"yes"),
    ]
    e = make_entry(b"GET", [], 200, h, b"x", NOW, NOW, POLICY)
    names = {n.lower() for (n, _) in e.headers}
    assert names == {b"cache-control", b"x-kept", b"date"}


def test_unusable_response_not_stored_rfc9111_4_2():
    """A response with no freshness, no validator and no stale window could
    never be served (RFC 9111 4.2), so it is not stored."""
    assert make_entry(b"GET", [], 200, [], b"x", NOW, NOW, POLICY) is None
    assert make_entry(b"GET", [], 200, [(b"ETag", b'"a"')], b"x", NOW, NOW, POLICY)


# --- lookup: freshness, stale, directives ---------------------------------------


def test_fresh_then_stale_boundary_rfc9111_4_2():
    """RFC 9111 4.2: fresh while lifetime > age; at age == lifetime it is
    stale and, having a validator, revalidated (4.3.1)."""
    e = entry(b"max-age=60", headers=[(b"ETag", b'"v1"'), (b"Last-Modified", http_date(NOW - 999))])
    assert lookup((e,), b"GET", [], NOW + 59.9, POLICY).outcome is Outcome.HIT
    d = lookup((e,), b"GET", [], NOW + 60, POLICY)
    assert d.outcome is Outcome.STALE_REVALIDATE
    assert d.entry is e
    assert d.conditional_headers == (
        (b"If-None-Match", b'"v1"'),
        (b"If-Modified-Since", http_date(NOW - 999)),
    )
    assert d.collapse


def test_stale_without_validator_is_miss_with_fallback_rfc9111_4_3_1():
    """RFC 9111 4.3.1: nothing to validate with: forward unconditionally; the
    stale entry is kept for stale-if-error."""
    e = entry(b"max-age=60, stale-if-error=100")
    d = lookup((e,), b"GET", [], NOW + 61, POLICY)
    assert d.outcome is Outcome.MISS and d.entry is e


@pytest.mark.parametrize(
    "directive",
    [b"must-revalidate", b"proxy-revalidate", b"s-maxage=60"],
    ids=["must-revalidate_5_2_2_2", "proxy-revalidate_5_2_2_8", "s-maxage_5_2_2_10"],
)
def test_never_serve_stale_rfc9111_4_2_4(directive):
    """RFC 9111 4.2.4, 5.2.2.2, 5.2.2.8, 5.2.2.10: must-revalidate,
    proxy-revalidate and s-maxage forbid stale-while-revalidate,
    stale-if-error and max-stale."""
    cc = b"max-age=60, " + directive + b", stale-while-revalidate=100, stale-if-error=100"
    e = entry(cc, headers=[(b"ETag", b'"v"')])
    now = NOW + 61
    assert lookup((e,), b"GET", [], now, POLICY).outcome is Outcome.STALE_REVALIDATE
    assert serve_stale_on_error(e, now, POLICY) is None
    stale_ok = [(b"Cache-Control", b"max-stale")]
    assert lookup((e,), b"GET", stale_ok, now, POLICY).outcome is Outcome.STALE_REVALIDATE
    # Control: without the directive the same entry is served stale.
    plain = entry(b"max-age=60, stale-while-revalidate=100, stale-if-error=100",
                  headers=[(b"ETag", b'"v"')])
    assert lookup((plain,), b"GET", [], now, POLICY).outcome is Outcome.STALE_SERVABLE
    assert serve_stale_on_error(plain, now, POLICY) is not None


def test_stale_while_revalidate_window_rfc5861_3():
    """RFC 5861 3: within stale-while-revalidate the stale response is
    served and revalidated in the background; past it, revalidated first."""
    e = entry(b"max-age=60, stale-while-revalidate=30", headers=[(b"ETag", b'"v"')])
    d = lookup((e,), b"GET", [], NOW + 90, POLICY)
    assert d.outcome is Outcome.STALE_SERVABLE
    assert d.response.body == b"hello"
    assert value(d.response.headers, b"age") == b"90"
    assert d.conditional_headers == ((b"If-None-Match", b'"v"'),)
    assert lookup((e,), b"GET", [], NOW + 90.5, POLICY).outcome is Outcome.STALE_REVALIDATE


def test_stale_if_error_window_rfc5861_4():
    """RFC 5861 4: on error, a stale response is served within
    stale-if-error of the response or of the request, not after."""
    e = entry(b"max-age=60, stale-if-error=30")
    served = serve_stale_on_error(e, NOW + 90, POLICY)
    assert served is not None and served.status == 200 and served.body == b"hello"
    assert serve_stale_on_error(e, NOW + 90.5, POLICY) is None
    req = [(b"Cache-Control", b"stale-if-error=100")]
    assert serve_stale_on_error(e, NOW + 150, POLICY, b"GET", req) is not None
    assert serve_stale_on_error(e, NOW + 161, POLICY, b"GET", req) is None
    assert serve_stale_on_error(None, NOW, POLICY) is None
    # Without stale-if-error, never: not even a still-fresh entry.
    assert serve_stale_on_error(entry(b"max-age=60"), NOW + 61, POLICY) is None
    assert serve_stale_on_error(entry(b"max-age=60"), NOW + 1, POLICY) is None


def test_request_no_cache_revalidates_rfc9111_5_2_1_4():
    """RFC 9111 5.2.1.4: client no-cache: no use of a stored response
    without validation, even fresh; no validator means a miss."""
    req = [(b"Cache-Control", b"no-cache")]
    e = entry(b"max-age=600", headers=[(b"ETag", b'"v"')])
    assert lookup((e,), b"GET", req, NOW + 1, POLICY).outcome is Outcome.STALE_REVALIDATE
    bare = entry(b"max-age=600")
    assert lookup((bare,), b"GET", req, NOW + 1, POLICY).outcome is Outcome.MISS


def test_request_max_age_rfc9111_5_2_1_1():
    """RFC 9111 5.2.1.1: client max-age=N: only a response no older than N
    is used; max-age=0 always revalidates; no stale-while-revalidate then."""
    e = entry(b"max-age=600, stale-while-revalidate=600", headers=[(b"ETag", b'"v"')])
    at = NOW + 50
    assert lookup((e,), b"GET", [(b"Cache-Control", b"max-age=0")], at, POLICY).outcome is Outcome.STALE_REVALIDATE
    assert lookup((e,), b"GET", [(b"Cache-Control", b"max-age=50")], at, POLICY).outcome is Outcome.HIT
    assert lookup((e,), b"GET", [(b"Cache-Control", b"max-age=49")], at, POLICY).outcome is Outcome.STALE_REVALIDATE


def test_request_min_fresh_rfc9111_5_2_1_3():
    """RFC 9111 5.2.1.3: min-fresh=N: still fresh N seconds from now."""
    e = entry(b"max-age=100", headers=[(b"ETag", b'"v"')])
    at = NOW + 60
    assert lookup((e,), b"GET", [(b"Cache-Control", b"min-fresh=40")], at, POLICY).outcome is Outcome.HIT
    assert lookup((e,), b"GET", [(b"Cache-Control", b"min-fresh=41")], at, POLICY).outcome is Outcome.STALE_REVALIDATE


def test_request_max_stale_rfc9111_5_2_1_2():
    """RFC 9111 5.2.1.2: max-stale accepts stale responses (up to N)."""
    e = entry(b"max-age=60")
    at = NOW + 90  # 30 s stale
    assert lookup((e,), b"GET", [(b"Cache-Control", b"max-stale")], at, POLICY).outcome is Outcome.HIT
    assert lookup((e,), b"GET", [(b"Cache-Control", b"max-stale=30")], at, POLICY).outcome is Outcome.HIT
    assert lookup((e,), b"GET", [(b"Cache-Control", b"max-stale=29")], at, POLICY).outcome is Outcome.MISS


def test_only_if_cached_rfc9111_5_2_1_7():
    """RFC 9111 5.2.1.7: only-if-cached: a stored response or 504."""
    req = [(b"Cache-Control", b"only-if-cached")]
    assert lookup(None, b"GET", req, NOW, POLICY).outcome is Outcome.GATEWAY_TIMEOUT
    e = entry(b"max-age=60", headers=[(b"ETag", b'"v"')])
    assert lookup((e,), b"GET", req, NOW + 1, POLICY).outcome is Outcome.HIT
    assert lookup((e,), b"GET", req, NOW + 61, POLICY).outcome is Outcome.GATEWAY_TIMEOUT


def test_bypass_unsafe_methods_and_ranges_rfc9111_3():
    """Only GET and HEAD use the cache; Range and If-Match requests bypass
    it (this cache does not combine partial content, RFC 9111 3.4)."""
    e = entry(b"max-age=60")
    assert lookup((e,), b"POST", [], NOW, POLICY).outcome is Outcome.BYPASS
    assert lookup((e,), b"GET", [(b"Range", b"bytes=0-1")], NOW, POLICY).outcome is Outcome.BYPASS
    assert lookup((e,), b"GET", [(b"If-Match", b'"x"')], NOW, POLICY).outcome is Outcome.BYPASS
    assert lookup((e,), b"GET", [], NOW, POLICY).outcome is Outcome.HIT


def test_head_served_from_stored_get_rfc9110_9_3_2():
    """RFC 9110 9.3.2: HEAD answered from a stored GET: same fields, no
    body; HEAD is never stored nor collapsed."""
    e = entry(b"max-age=60", body=b"12345", headers=[(b"Content-Length", b"5")])
    d = lookup((e,), b"HEAD", [], NOW + 1, POLICY)
    assert d.outcome is Outcome.HIT
    assert d.response.body == b""
    assert value(d.response.headers, b"content-length") == b"5"
    assert not lookup(None, b"HEAD", [], NOW, POLICY).may_store
    assert cache_key(b"HEAD", b"Example.com", b"/a") == cache_key(b"GET", b"example.com", b"/a")


# --- Vary (RFC 9111 S4.1) ------------------------------------------------------


def vary_entry(accept_encoding, body, t=NOW):
    req = [] if accept_encoding is None else [(b"Accept-Encoding", accept_encoding)]
    return entry(b"max-age=60", headers=[(b"Vary", b"Accept-Encoding")], body=body,
                 request_headers=req, t=t)


def test_vary_selects_variant_rfc9111_4_1():
    """RFC 9111 4.1: the variant whose Vary-named request fields match."""
    gz, br = vary_entry(b"gzip", b"GZ"), vary_entry(b"br", b"BR")
    variants = (gz, br)
    for ae, body in ((b"gzip", b"GZ"), (b"br", b"BR")):
        d = lookup(variants, b"GET", [(b"Accept-Encoding", ae)], NOW + 1, POLICY)
        assert d.outcome is Outcome.HIT and d.response.body == body
    d = lookup(variants, b"GET", [(b"Accept-Encoding", b"deflate")], NOW + 1, POLICY)
    assert d.outcome is Outcome.MISS


def test_vary_normalises_values_rfc9111_4_1():
    """RFC 9111 4.1: values are normalised (whitespace, combined lines,
    case for case-insensitive fields) before comparing."""
    e = vary_entry(b"gzip, br", b"X")
    for req in (
        [(b"Accept-Encoding", b"gzip,br")],
        [(b"accept-encoding", b"GZIP ,  BR")],
        [(b"Accept-Encoding", b"gzip"), (b"Accept-Encoding", b"br")],
    ):
        assert lookup((e,), b"GET", req, NOW + 1, POLICY).outcome is Outcome.HIT, req
    assert lookup((e,), b"GET", [(b"Accept-Encoding", b"br, gzip")], NOW + 1, POLICY).outcome is Outcome.MISS


def test_vary_absent_matches_only_absent_rfc9111_4_1():
    """RFC 9111 4.1: a field absent from the original request matches only
    when also absent."""
    e = vary_entry(None, b"X")
    assert lookup((e,), b"GET", [], NOW + 1, POLICY).outcome is Outcome.HIT
    assert lookup((e,), b"GET", [(b"Accept-Encoding", b"")], NOW + 1, POLICY).outcome is Outcome.MISS


def test_vary_most_recent_variant_wins_rfc9111_4_1():
    """RFC 9111 4.1: among several matching responses the most recent is
    used; add_variant replaces the one the new response supersedes and caps
    the number of variants."""
    old = vary_entry(b"gzip", b"OLD", t=NOW)
    new = vary_entry(b"gzip", b"NEW", t=NOW + 5)
    assert lookup((old, new), b"GET", [(b"Accept-Encoding", b"gzip")], NOW + 6, POLICY).response.body == b"NEW"
    br = vary_entry(b"br", b"BR")
    stored = add_variant((old, br), new, [(b"Accept-Encoding", b"gzip")], NOW + 5, POLICY)
    assert stored == (new, br)
    many = ()
    for i in range(20):
        v = vary_entry(b"enc%d" % i, b"%d" % i)
        many = add_variant(many, v, [(b"Accept-Encoding", b"enc%d" % i)], NOW, POLICY)
    assert len(many) == POLICY.max_variants
    assert many[0].body == b"19"


# --- validation (RFC 9111 S4.3) ------------------------------------------------


def validated_entry():
    return entry(b"max-age=60", headers=[(b"ETag", b'W/"v1"'), (b"Last-Modified", http_date(NOW - 100))])


def test_if_none_match_weak_comparison_gives_304_rfc9111_4_3_2():
    """RFC 9111 4.3.2, RFC 9110 13.1.2: If-None-Match uses weak comparison;
    a match gets a 304 without body, with the validators and Age."""
    e = validated_entry()
    d = lookup((e,), b"GET", [(b"If-None-Match", b'"other", "v1"')], NOW + 3, POLICY)
    assert d.outcome is Outcome.HIT
    assert d.response.status == 304 and d.response.body == b""
    assert value(d.response.headers, b"etag") == b'W/"v1"'
    assert value(d.response.headers, b"age") == b"3"
    assert value(d.response.headers, b"content-length") is None
    d = lookup((e,), b"GET", [(b"If-None-Match", b'"v2"')], NOW + 3, POLICY)
    assert d.response.status == 200 and d.response.body == b"hello"
    assert respond(e, b"GET", [(b"If-None-Match", b"*")], NOW).status == 304


def test_if_modified_since_rfc9111_4_3_2():
    """RFC 9110 13.1.3: 304 when Last-Modified <= If-Modified-Since;
    If-None-Match takes precedence; invalid dates are ignored."""
    e = validated_entry()
    assert respond(e, b"GET", [(b"If-Modified-Since", http_date(NOW - 100))], NOW).status == 304
    assert respond(e, b"GET", [(b"If-Modified-Since", http_date(NOW - 101))], NOW).status == 200
    assert respond(e, b"GET", [(b"If-Modified-Since", b"yesterday")], NOW).status == 200
    both = [(b"If-None-Match", b'"nope"'), (b"If-Modified-Since", http_date(NOW))]
    assert respond(e, b"GET", both, NOW).status == 200


def test_if_modified_since_uses_date_without_last_modified_rfc9111_4_3_2():
    """RFC 9111 4.3.2: without Last-Modified, the stored Date is used."""
    e = entry(b"max-age=60")  # Date is NOW
    assert respond(e, b"GET", [(b"If-Modified-Since", http_date(NOW))], NOW).status == 304
    assert respond(e, b"GET", [(b"If-Modified-Since", http_date(NOW - 1))], NOW).status == 200


def test_conditional_ignored_for_non_2xx_rfc9110_13_2_1():
    """RFC 9110 13.2.1: preconditions are ignored unless the response would
    be 2xx."""
    e = entry(b"max-age=60", status=404, headers=[(b"ETag", b'"v"')])
    assert respond(e, b"GET", [(b"If-None-Match", b'"v"')], NOW).status == 404


def test_freshen_on_304_rfc9111_4_3_4():
    """RFC 9111 4.3.4: a 304 updates the stored fields (not Content-Length),
    restarts the age and makes the entry fresh again."""
    e = entry(
        b"max-age=60",
        headers=[(b"ETag", b'"v1"'), (b"X-Version", b"1"), (b"Content-Length", b"5"), (b"Age", b"10")],
    )
    t = NOW + 100
    assert lookup((e,), b"GET", [], t, POLICY).outcome is Outcome.STALE_REVALIDATE
    fresh = freshen(
        e,
        [
            (b"ETag", b'"v1"'),
            (b"Cache-Control", b"max-age=120"),
            (b"X-Version", b"2"),
            (b"Content-Length", b"0"),
            (b"Date", http_date(t + 1)),
            (b"Connection", b"close"),
        ],
        request_time=t,
        response_time=t + 1,
    )
    assert fresh is not None
    assert value(fresh.headers, b"x-version") == b"2"
    assert value(fresh.headers, b"cache-control") == b"max-age=120"
    assert value(fresh.headers, b"content-length") == b"5"
    assert value(fresh.headers, b"age") is None
    assert value(fresh.headers, b"connection") is None
    assert fresh.body == b"hello"
    assert current_age(fresh, t + 11) == 11
    d = lookup((fresh,), b"GET", [], t + 100, POLICY)
    assert d.outcome is Outcome.HIT


def test_freshen_without_date_uses_receipt_time_rfc9110_6_6_1():
    """RFC 9110 6.6.1 / RFC 9111 4.2.3: a 304 without Date gets the receipt
    time as Date, so the old Date does not make the entry look old."""
    e = entry(b"max-age=60", headers=[(b"ETag", b'"v1"')])
    t = NOW + 1000
    fresh = freshen(e, [(b"ETag", b'"v1"')], t, t)
    assert value(fresh.headers, b"date") == http_date(t)
    assert current_age(fresh, t + 5) == 5
    assert lookup((fresh,), b"GET", [], t + 5, POLICY).outcome is Outcome.HIT


def test_freshen_refuses_other_validator_rfc9111_4_3_4():
    """RFC 9111 4.3.4: a 304 with a strong ETag that the stored response
    does not have updates nothing; weak tags compare weakly."""
    e = entry(b"max-age=60", headers=[(b"ETag", b'"v1"')])
    assert freshen(e, [(b"ETag", b'"v2"')], NOW, NOW) is None
    assert freshen(e, [(b"ETag", b'W/"v1"')], NOW, NOW) is not None
    weak = entry(b"max-age=60", headers=[(b"ETag", b'W/"v1"')])
    assert freshen(weak, [(b"ETag", b'"v1"')], NOW, NOW) is None


def test_unsafe_methods_invalidate_rfc9111_4_4():
    """RFC 9111 4.4: a non-error response to an unsafe method invalidates."""
    assert invalidates(b"POST", 200) and invalidates(b"DELETE", 204) and invalidates(b"PUT", 301)
    assert not invalidates(b"POST", 500) and not invalidates(b"POST", 404)
    assert not invalidates(b"GET", 200) and not invalidates(b"HEAD", 200)


def test_keys_and_prefixes():
    """Keys of one route and path prefix share key_prefix; others do not."""
    k = cache_key(b"GET", b"h", b"/users/1?x=2", route=b"api")
    assert k.startswith(key_prefix(b"api", b"/users/"))
    assert not k.startswith(key_prefix(b"ap"))
    assert not k.startswith(key_prefix(b"api", b"/orders"))
    with pytest.raises(ValueError):
        cache_key(b"POST", b"h", b"/")


def test_storage_ttl_covers_freshness_and_stale_windows():
    """Stores keep an entry for its remaining freshness plus the larger
    stale window, plus revalidate_window when it has a validator; stale
    windows do not count when serving stale is forbidden."""
    p = CachePolicy(revalidate_window=300)
    e = entry(b"max-age=60, stale-while-revalidate=20, stale-if-error=40", policy=p)
    assert storage_ttl((e,), NOW + 10, p) == 50 + 40
    v = entry(b"max-age=60", headers=[(b"ETag", b'"a"')], policy=p)
    assert storage_ttl((v,), NOW, p) == 360
    m = entry(b"max-age=60, must-revalidate, stale-if-error=40", policy=p)
    assert storage_ttl((m,), NOW, p) == 60
    assert storage_ttl((e, v), NOW, p) == 360


def test_headers_from_twisted():
    from twisted.web.http_headers import Headers

    h = Headers({b"vary": [b"a", b"b"]})
    assert sorted(headers_from_twisted(h)) == [(b"Vary", b"a"), (b"Vary", b"b")]


# --- memory store --------------------------------------------------------------


def sized(n, t=NOW):
    return CachedResponse(200, [(b"Date", http_date(t))], b"x" * n, t, t)


def test_memory_store_byte_limit_holds_under_many_inserts():
    """The LRU never holds more than limit_bytes; evictions are counted and
    bytes_stored is exact."""
    clock = Clock()
    store = MemoryCacheStore(limit_bytes=50_000, clock=clock)
    verifyObject(ICacheStore, store)
    rng = random.Random(7)
    for i in range(2000):
        variants = (sized(rng.randrange(0, 3000)),)
        store.set(b"k%d" % rng.randrange(400), variants, 60)
        assert store.bytes_stored <= 50_000
    present = [store._entries[k] for k in store._entries]
    assert store.bytes_stored == sum(size for (_, size, _) in present)
    assert store.evictions > 0
    assert len(store) > 5


def test_memory_store_lru_order_and_oversize():
    """Reading an entry makes it most recent; the least recent goes first;
    an entry larger than the limit is not stored."""
    clock = Clock()
    one = sized(300)
    limit = 3 * (len(b"a") + one.size)
    store = MemoryCacheStore(limit_bytes=limit, clock=clock)
    for k in (b"a", b"b", b"c"):
        store.set(k, (one,), 60)
    store.get(b"a")
    store.set(b"d", (one,), 60)
    got = {k: store.get(k).result for k in (b"a", b"b", b"c", b"d")}
    assert got[b"b"] is None
    assert all(got[k] == (one,) for k in (b"a", b"c", b"d"))
    assert store.evictions == 1
    store.set(b"big", (sized(limit),), 60)
    assert store.get(b"big").result is None
    assert store.get(b"a").result == (one,)


def test_memory_store_ttl_delete_purge():
    """Entries expire after their ttl (injected clock); delete and purge by
    prefix remove all variants of the keys."""
    clock = Clock()
    clock.advance(NOW)
    store = MemoryCacheStore(limit_bytes=10**6, clock=clock)
    e = sized(10)
    store.set(b"r\x00/a\x00h", (e, e), 30)
    store.set(b"r\x00/ab\x00h", (e,), 30)
    store.set(b"s\x00/a\x00h", (e,), 30)
    clock.advance(29.9)
    assert store.get(b"r\x00/a\x00h").result == (e, e)
    assert store.purge(key_prefix(b"r", b"/a")).result == 2
    assert store.get(b"r\x00/ab\x00h").result is None
    assert store.delete(b"s\x00/a\x00h").result == 1
    assert store.bytes_stored == 0
    store.set(b"t", (e,), 30)
    clock.advance(30)
    assert store.get(b"t").result is None
    assert store.bytes_stored == 0


# --- serialisation -------------------------------------------------------------


def test_encode_decode_round_trip():
    """The compact encoding keeps every field, including absent Vary
    values and binary bodies; damaged data is refused."""
    a = CachedResponse(
        200,
        [(b"Vary", b"Accept-Encoding, X-A"), (b"Date", http_date(NOW)), (b"X", b"")],
        bytes(range(256)) * 10,
        NOW - 0.25,
        NOW + 0.5,
        vary=((b"accept-encoding", b"gzip"), (b"x-a", None)),
    )
    b = CachedResponse(404, [], b"", NOW, NOW)
    data = encode_variants((a, b))
    assert decode_variants(data) == (a, b)
    with pytest.raises(ValueError):
        decode_variants(data[:-1])
    with pytest.raises(ValueError):
        decode_variants(data + b"x")
    with pytest.raises(ValueError):
        decode_variants(b"XXXX" + data[4:])


# --- collapsing ----------------------------------------------------------------


def test_collapser_n_waiters_one_fetch():
    """Concurrent calls for one key make one fetch; each waiter gets its
    own Deferred with the result; callbacks of one do not affect others."""
    c = Collapser()
    calls = []
    backend = Deferred()

    def fetch():
        calls.append(1)
        return backend

    ds = [c.collapse(b"k", fetch) for _ in range(10)]
    other = c.collapse(b"other", lambda: succeed("o"))
    assert len(calls) == 1 and c.in_flight(b"k")
    ds[0].addCallback(lambda r: "changed by the leader")
    backend.callback("result")
    assert not c.in_flight(b"k")
    assert ds[0].result == "changed by the leader"
    assert [d.result for d in ds[1:]] == ["result"] * 9
    assert other.result == "o"
    # Once landed, the next call fetches again.
    c.collapse(b"k", fetch)
    assert len(calls) == 2


def test_collapser_follower_refusing_result_fetches_itself():
    """A follower whose accept() refuses the leader's result (e.g. private
    or another Vary variant) runs its own fetch."""
    c = Collapser()
    backend = Deferred()
    leader = c.collapse(b"k2", lambda: backend)
    own = []
    follower = c.collapse(b"k2", lambda: own.append(1) or succeed("own"),
                          accept=lambda r: r == "shared")
    taker = c.collapse(b"k2", lambda: fail(AssertionError("no")))
    backend.callback("private")
    assert leader.result == "private"
    assert follower.result == "own" and own == [1]
    assert taker.result == "private"


def test_collapser_failure_goes_to_every_waiter():
    c = Collapser()
    backend = Deferred()
    ds = [c.collapse(b"k", lambda: backend) for _ in range(3)]
    backend.errback(ConnectionRefusedError("down"))
    for d in ds:
        f = []
        d.addErrback(f.append)
        assert f[0].check(ConnectionRefusedError)


def test_collapser_cancel():
    """Cancelling one waiter leaves the fetch running for the others;
    cancelling all cancels the fetch."""
    c = Collapser()
    cancelled = []
    backend = Deferred(lambda d: cancelled.append(1))
    a = c.collapse(b"k", lambda: backend)
    b = c.collapse(b"k", lambda: backend)
    a.cancel()
    assert a.called and not cancelled and c.in_flight(b"k")
    a.addErrback(lambda f: f.trap(CancelledError))
    b.cancel()
    b.addErrback(lambda f: f.trap(CancelledError))
    assert cancelled == [1] and not c.in_flight(b"k")


def test_collapser_cancelled_waiter_then_fetch_lands():
    """A withdrawn waiter keeps its CancelledError; the others still get
    the result when the fetch lands."""
    c = Collapser()
    backend = Deferred()
    a = c.collapse(b"k", lambda: backend)
    b = c.collapse(b"k", lambda: backend)
    a.cancel()
    errors = []
    a.addErrback(errors.append)
    backend.callback("result")
    assert errors[0].check(CancelledError)
    assert b.result == "result"


# --- Redis store ---------------------------------------------------------------


@pytest.fixture
def redis_store():
    client = redis.Redis(host="127.0.0.1", port=6379)
    prefix = b"test-cache-%s:" % uuid.uuid4().hex.encode()
    pool = ThreadPool(minthreads=1, maxthreads=4, name="test-cache-redis")
    pool.start()
    store = RedisCacheStore(client=client, reactor=reactor, threadpool=pool, prefix=prefix)
    yield store, client, prefix
    pool.stop()
    keys = list(client.scan_iter(match=prefix + b"*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest_twisted.inlineCallbacks
def test_redis_store_round_trip(redis_store):
    """Against the real Redis: set/get round trip with TTL, delete, purge of
    a prefix only, and an unreadable value read as a miss."""
    store, client, prefix = redis_store
    verifyObject(ICacheStore, store)
    e = vary_entry(b"gzip", b"\x00body\xff")
    key = cache_key(b"GET", b"h", b"/a", route=b"r")
    yield store.set(key, (e,), 12.5)
    got = yield store.get(key)
    assert got == (e,)
    ttl_ms = client.pttl(prefix + key)
    assert 11_000 < ttl_ms <= 12_500
    assert (yield store.get(b"missing")) is None

    yield store.set(cache_key(b"GET", b"h", b"/ab", route=b"r"), (e,), 60)
    yield store.set(cache_key(b"GET", b"h", b"/b", route=b"r"), (e,), 60)
    assert (yield store.purge(key_prefix(b"r", b"/a"))) == 2
    assert (yield store.get(key)) is None
    assert (yield store.get(cache_key(b"GET", b"h", b"/b", route=b"r"))) == (e,)
    assert (yield store.delete(cache_key(b"GET", b"h", b"/b", route=b"r"))) == 1

    yield store.set(key, (e,), 0)
    assert (yield store.get(key)) is None
    client.set(prefix + b"junk", b"not an entry")
    assert (yield store.get(b"junk")) is None
    assert reactor.getDelayedCalls() == []
