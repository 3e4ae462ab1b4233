"""
Retry policy: when a failed attempt may be retried, how long to wait, and
a budget that stops retries from multiplying load on a struggling service.

The forwarder decides per attempt::

    if (attempt < route_max_retries
            and should_retry(method, outcome, status, route_allows_non_idempotent)
            and budget.can_retry()):
        budget.retry_started()
        delay = backoff(attempt, base, cap, rng)   # then retry, on another backend
        ...                                        # budget.retry_finished() when done

Sources: RFC 9110 section 9.2.2 (idempotent methods); Envoy's retry budgets
(C{config.cluster.v3.CircuitBreakers.Thresholds.RetryBudget}:
C{budget_percent}, C{min_retry_concurrency}); Marc Brooker, "Exponential
Backoff And Jitter", AWS Architecture Blog, 2015
(U{https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/}).
"""

from __future__ import annotations

import random
from typing import Optional

import attrs

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
"""The idempotent methods of RFC 9110 section 9.2.2."""

RETRIABLE_STATUSES = frozenset({502, 503, 504})
"""Response statuses that may be retried (bad gateway, unavailable, gateway timeout)."""

OUTCOMES = frozenset({"connect_failure", "reset", "timeout", "status"})
"""How an attempt can end badly; see L{should_retry}."""


def is_idempotent(method: bytes) -> bool:
    """
    Is C{method} idempotent (RFC 9110 section 9.2.2)? Methods are
    case-sensitive: C{b"get"} is not C{b"GET"}.

    @param method: the request method, e.g. C{b"GET"}.
    """
    return method in IDEMPOTENT_METHODS


def should_retry(
    method: bytes,
    outcome: str,
    status: Optional[int] = None,
    retry_non_idempotent: bool = False,
) -> bool:
    """
    May an attempt that ended with C{outcome} be retried?

      - C{"connect_failure"}: the connection was never made, so the backend
        never saw the request: retry, whatever the method.
      - C{"reset"} (connection lost after sending), C{"timeout"} (no
        response in time) and C{"status"} with a C{status} of 502, 503 or
        504: the backend may have acted on the request, so retry only an
        idempotent method, or any method when the route allows it.
      - any other status: no.

    The caller still checks the attempt count and L{RetryBudget.can_retry}.

    @param method: the request method, e.g. C{b"POST"}.
    @param outcome: one of L{OUTCOMES}.
    @param status: the response status, for C{outcome="status"}.
    @param retry_non_idempotent: the route allows retrying any method.
    @raise ValueError: unknown C{outcome}.
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}; expected one of {sorted(OUTCOMES)}")
    if outcome == "connect_failure":
        return True
    if outcome == "status" and status not in RETRIABLE_STATUSES:
        return False
    return retry_non_idempotent or is_idempotent(method)


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """
    The wait before a retry: exponential backoff with full jitter, a
    uniform draw in C{[0, min(cap, base * 2 ** attempt)]} seconds (Brooker,
    "Exponential Backoff And Jitter", AWS Architecture Blog, 2015).

    @param attempt: retries already made, 0 before the first retry.
    @param base: seconds, the ceiling before the first retry, >= 0.
    @param cap: seconds, the largest ceiling, >= 0.
    @param rng: the randomness.
    @return: seconds to wait.
    @raise ValueError: a negative argument.
    """
    if attempt < 0 or base < 0 or cap < 0:
        raise ValueError("attempt, base and cap cannot be negative")
    # 2.0 ** 1024 overflows; past 2 ** 64 the cap has long won anyway.
    ceiling = min(cap, base * 2.0 ** min(attempt, 64))
    return rng.uniform(0.0, ceiling)


# No validation on assignment: the counters change twice per request, and
# an attrs __setattr__ hook on them was 2% of the CPU under load.
@attrs.define(on_setattr=attrs.setters.NO_OP)
class RetryBudget:
    """
    Envoy's retry budget: concurrent retries are limited to a fraction of
    the requests in progress, with a floor.

    A retry may start while the active retries are fewer than
    C{max(min_concurrency, ratio * active_requests)}. "Active requests"
    counts client requests being served, each once whatever its number of
    attempts; "active retries" counts retry attempts in progress.

    One budget per service. Calls must be paired: L{request_started} with
    L{request_finished}, L{retry_started} with L{retry_finished}.

    @ivar ratio: the budget as a fraction of active requests, >= 0
        (Envoy's C{budget_percent} / 100; its default is 20%).
    @ivar min_concurrency: retries always allowed at once, >= 0 (Envoy's
        C{min_retry_concurrency}, default 3).
    @ivar active_requests: requests in progress.
    @ivar active_retries: retries in progress.
    """

    ratio: float = attrs.field(default=0.2, validator=attrs.validators.ge(0))
    min_concurrency: int = attrs.field(default=3, validator=attrs.validators.ge(0))
    active_requests: int = attrs.field(default=0, init=False)
    active_retries: int = attrs.field(default=0, init=False)

    def request_started(self) -> None:
        """A client request started."""
        self.active_requests += 1

    def request_finished(self) -> None:
        """A client request ended, however it ended."""
        self.active_requests = max(0, self.active_requests - 1)

    def retry_started(self) -> None:
        """A retry attempt started."""
        self.active_retries += 1

    def retry_finished(self) -> None:
        """A retry attempt ended, however it ended."""
        self.active_retries = max(0, self.active_retries - 1)

    def can_retry(self) -> bool:
        """May one more retry start now?"""
        return self.active_retries < max(self.min_concurrency, self.ratio * self.active_requests)
