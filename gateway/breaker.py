"""
The circuit breaker: one small state machine per backend.

::

    closed --(failure_threshold consecutive failures,
              or failure_ratio over the window)--> open
    open --(cooldown elapsed)--> half_open
    half_open --(the one trial request succeeds)--> closed
    half_open --(the trial fails)--> open

The breaker never sets a timer: C{open -> half_open} happens when the state
is next looked at after the cooldown, so a breaker leaves no delayed calls
behind. It reads the time from the injected clock only.

Usage by the proxy, for each request to a backend::

    if not breaker.acquire():      # refused: try another backend or 503
        ...
    # ... then exactly one of:
    breaker.record_success()       # a response that is not a failure
    breaker.record_failure()       # connect error, reset, timeout, 5xx
    breaker.release()              # ended without a verdict (client gone)

Sources: Nygard, "Release It!" (2007), ch. 5 "Circuit Breaker"; Fowler,
U{https://martinfowler.com/bliki/CircuitBreaker.html}; the rolling window
and minimum volume follow resilience4j's C{failureRateThreshold} and
C{minimumNumberOfCalls}.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable, Optional

from twisted.internet.interfaces import IReactorTime

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

STATE_VALUES = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}
"""The numeric value of each state, for a metrics gauge."""


class CircuitBreaker:
    """
    A circuit breaker for one backend.

    The breaker opens when either trigger fires (each may be disabled with
    L{None}):

      - C{failure_threshold} failures in a row;
      - at least C{min_requests} verdicts in the rolling window of which a
        fraction of C{failure_ratio} or more are failures. The window is
        kept in buckets of C{bucket} seconds: the current bucket plus the
        C{ceil(window / bucket) - 1} before it, so with C{window=10} and
        1 s buckets a verdict counts for between 9 and 10 seconds. The
        ratio is checked after every verdict, as resilience4j does.

    In C{half_open} exactly one trial request is let through at a time; its
    success closes the breaker (with a fresh window), its failure reopens it
    for another C{cooldown}.

    The breaker does not tell requests apart: a verdict or L{release}
    arriving in C{half_open} is taken as the trial's, and verdicts arriving
    while C{open} (requests sent before it opened) are ignored.

    @param clock: the time source, read with C{clock.seconds()}.
    @param failure_threshold: consecutive failures that open the breaker,
        >= 1, or L{None} to disable.
    @param failure_ratio: failure fraction in (0, 1] that opens it, or
        L{None} to disable.
    @param window: the rolling window's length in seconds, > 0.
    @param min_requests: the fewest verdicts in the window before the
        ratio is considered, >= 1.
    @param cooldown: seconds spent open before a trial request, >= 0.
    @param on_change: called as C{on_change(old, new)} with state names on
        every transition, e.g. to log it.
    @param bucket: width of a window bucket in seconds, > 0.
    @raise ValueError: a parameter is out of range.
    """

    def __init__(
        self,
        clock: IReactorTime,
        failure_threshold: Optional[int] = 5,
        failure_ratio: Optional[float] = None,
        window: float = 10.0,
        min_requests: int = 20,
        cooldown: float = 30.0,
        on_change: Optional[Callable[[str, str], object]] = None,
        bucket: float = 1.0,
    ) -> None:
        if failure_threshold is not None and failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if failure_ratio is not None and not 0 < failure_ratio <= 1:
            raise ValueError("failure_ratio must be in (0, 1]")
        if window <= 0 or bucket <= 0:
            raise ValueError("window and bucket must be positive")
        if min_requests < 1:
            raise ValueError("min_requests must be at least 1")
        if cooldown < 0:
            raise ValueError("cooldown cannot be negative")
        self._clock = clock
        self._threshold = failure_threshold
        self._ratio = failure_ratio
        self._min_requests = min_requests
        self._cooldown = cooldown
        self._on_change = on_change
        self._bucket = bucket
        self._buckets_kept = max(1, math.ceil(window / bucket))
        # (bucket index, total, failures), oldest first.
        self._window: deque[list[int]] = deque()
        self._consecutive = 0
        self._state = CLOSED
        self._opened_at = 0.0
        self._trial = False

    # --- reading the state ------------------------------------------------------

    @property
    def state(self) -> str:
        """The current state: C{"closed"}, C{"open"} or C{"half_open"}."""
        if self._state == OPEN and self._clock.seconds() >= self._opened_at + self._cooldown:
            self._trial = False
            self._set(HALF_OPEN)
        return self._state

    @property
    def state_value(self) -> int:
        """The current state as a number for metrics: closed 0, open 1, half_open 2."""
        return STATE_VALUES[self.state]

    def open_for(self) -> float:
        """
        Seconds until an open breaker lets a trial request through; 0 when
        it is not open.
        """
        if self.state != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self._cooldown - self._clock.seconds())

    def available(self) -> bool:
        """
        Would a request be let through now? Consumes nothing.

        @rtype: L{bool}
        """
        state = self.state
        return state == CLOSED or (state == HALF_OPEN and not self._trial)

    def acquire(self) -> bool:
        """
        Ask to send a request; in C{half_open}, take the one trial slot.

        @return: C{True} if the request may go, C{False} if it is refused.
            Each C{True} must be followed by exactly one of
            L{record_success}, L{record_failure} or L{release}.
        """
        state = self.state
        if state == CLOSED:
            return True
        if state == HALF_OPEN and not self._trial:
            self._trial = True
            return True
        return False

    # --- verdicts ----------------------------------------------------------------

    def record_success(self) -> None:
        """A request succeeded: closes a half-open breaker."""
        state = self.state
        if state == HALF_OPEN:
            self._close()
        elif state == CLOSED:
            self._consecutive = 0
            self._count(failed=False)

    def record_failure(self) -> None:
        """A request failed: may open a closed breaker; reopens a half-open one."""
        state = self.state
        if state == HALF_OPEN:
            self._open()
        elif state == CLOSED:
            self._consecutive += 1
            self._count(failed=True)
            if self._threshold is not None and self._consecutive >= self._threshold:
                self._open()

    def release(self) -> None:
        """
        A request ended without a verdict (cancelled by the client, or
        refused before it was sent): frees the half-open trial slot.
        """
        if self.state == HALF_OPEN:
            self._trial = False

    # --- internals ---------------------------------------------------------------

    def _count(self, failed: bool) -> None:
        index = math.floor(self._clock.seconds() / self._bucket)
        window = self._window
        while window and window[0][0] <= index - self._buckets_kept:
            window.popleft()
        if not window or window[-1][0] != index:
            window.append([index, 0, 0])
        window[-1][1] += 1
        window[-1][2] += failed
        if self._ratio is None:
            return
        total = sum(b[1] for b in window)
        failures = sum(b[2] for b in window)
        if total >= self._min_requests and failures / total >= self._ratio:
            self._open()

    def _open(self) -> None:
        self._opened_at = self._clock.seconds()
        self._trial = False
        self._set(OPEN)

    def _close(self) -> None:
        self._trial = False
        self._consecutive = 0
        self._window.clear()
        self._set(CLOSED)

    def _set(self, new: str) -> None:
        old, self._state = self._state, new
        if old != new and self._on_change is not None:
            self._on_change(old, new)
