"""Tests for gateway.breaker."""

import pytest
from twisted.internet.task import Clock

from gateway.breaker import CircuitBreaker


def make(clock=None, **kw):
    clock = clock or Clock()
    changes = []
    kw.setdefault("on_change", lambda old, new: changes.append((old, new)))
    return CircuitBreaker(clock, **kw), clock, changes


def fail(breaker, n):
    for _ in range(n):
        assert breaker.acquire()
        breaker.record_failure()


def succeed(breaker, n):
    for _ in range(n):
        assert breaker.acquire()
        breaker.record_success()


def test_starts_closed():
    breaker, _, changes = make()
    assert breaker.state == "closed" and breaker.state_value == 0
    assert breaker.available() and breaker.acquire()
    assert changes == []


def test_consecutive_failures_open():
    breaker, _, changes = make(failure_threshold=3, cooldown=5.0)
    fail(breaker, 2)
    breaker.record_success()  # resets the run
    fail(breaker, 2)
    assert breaker.state == "closed"
    fail(breaker, 1)
    assert breaker.state == "open" and breaker.state_value == 1
    assert not breaker.available() and not breaker.acquire()
    assert changes == [("closed", "open")]


def test_open_to_half_open_after_cooldown():
    breaker, clock, changes = make(failure_threshold=1, cooldown=5.0)
    fail(breaker, 1)
    clock.advance(4.999)
    assert breaker.state == "open" and not breaker.available()
    clock.advance(0.001)
    assert breaker.state == "half_open" and breaker.state_value == 2
    assert changes == [("closed", "open"), ("open", "half_open")]
    assert clock.getDelayedCalls() == []


def test_half_open_allows_exactly_one_trial():
    breaker, clock, _ = make(failure_threshold=1, cooldown=5.0)
    fail(breaker, 1)
    clock.advance(5)
    assert breaker.available()
    assert breaker.available()  # available() consumes nothing
    assert breaker.acquire()
    assert not breaker.available()
    assert not breaker.acquire()
    assert not breaker.acquire()
    assert breaker.state == "half_open"


def test_half_open_success_closes():
    breaker, clock, changes = make(failure_threshold=2, cooldown=5.0)
    fail(breaker, 2)
    clock.advance(5)
    assert breaker.acquire()
    breaker.record_success()
    assert breaker.state == "closed"
    assert changes[-1] == ("half_open", "closed")
    # The failure run starts afresh after closing.
    fail(breaker, 1)
    assert breaker.state == "closed"
    fail(breaker, 1)
    assert breaker.state == "open"


def test_half_open_failure_reopens_for_another_cooldown():
    breaker, clock, changes = make(failure_threshold=1, cooldown=5.0)
    fail(breaker, 1)
    clock.advance(7)
    assert breaker.acquire()
    breaker.record_failure()
    assert breaker.state == "open"
    assert changes[-1] == ("half_open", "open")
    clock.advance(4.9)
    assert breaker.state == "open"
    clock.advance(0.1)
    assert breaker.state == "half_open" and breaker.acquire()


def test_release_frees_the_trial_slot():
    breaker, clock, _ = make(failure_threshold=1, cooldown=5.0)
    fail(breaker, 1)
    clock.advance(5)
    assert breaker.acquire()
    breaker.release()
    assert breaker.state == "half_open"
    assert breaker.available() and breaker.acquire()
    assert not breaker.acquire()


def test_release_when_closed_is_harmless():
    breaker, _, _ = make(failure_threshold=1)
    assert breaker.acquire()
    breaker.release()
    assert breaker.state == "closed" and breaker.available()


def test_verdicts_while_open_are_ignored():
    breaker, clock, _ = make(failure_threshold=1, cooldown=5.0)
    fail(breaker, 1)
    clock.advance(3)
    breaker.record_success()  # requests sent before the breaker opened
    assert breaker.state == "open"
    breaker.record_failure()
    clock.advance(2)  # the cooldown was not restarted by that failure
    assert breaker.state == "half_open"


def test_failure_ratio_opens_with_enough_requests():
    breaker, _, _ = make(failure_threshold=None, failure_ratio=0.5, min_requests=4, window=10)
    fail(breaker, 1)
    succeed(breaker, 1)
    fail(breaker, 1)
    assert breaker.state == "closed"  # 2/3 failed but only 3 requests
    succeed(breaker, 1)  # 2/4 = 0.5 >= 0.5: checked on every verdict
    assert breaker.state == "open"


def test_failure_ratio_below_threshold_stays_closed():
    breaker, _, _ = make(failure_threshold=None, failure_ratio=0.3, min_requests=10, window=10)
    for _ in range(20):
        succeed(breaker, 3)
        fail(breaker, 1)  # 25 % failures
    assert breaker.state == "closed"


def test_failure_ratio_exact_float_edge():
    # 3/10 == 0.3 must trip, although 0.3 * 10 > 3 in floating point.
    breaker, _, _ = make(failure_threshold=None, failure_ratio=0.3, min_requests=10, window=10)
    succeed(breaker, 7)
    fail(breaker, 3)
    assert breaker.state == "open"


def test_failure_ratio_window_edges():
    breaker, clock, _ = make(failure_threshold=None, failure_ratio=0.5, min_requests=4, window=10)
    fail(breaker, 2)  # at t=0, bucket 0
    clock.advance(9.99)  # still in the window (bucket 9)
    succeed(breaker, 1)
    assert breaker.state == "closed"  # 3 requests < min_requests
    succeed(breaker, 1)  # 2/4 failed
    assert breaker.state == "open"

    breaker, clock, _ = make(failure_threshold=None, failure_ratio=0.5, min_requests=4, window=10)
    fail(breaker, 2)
    clock.advance(10.0)  # bucket 0 has left the window
    succeed(breaker, 2)
    fail(breaker, 1)  # 1/3 in the window (3/5 had the old bucket stayed)
    assert breaker.state == "closed"
    fail(breaker, 1)  # 2/4
    assert breaker.state == "open"


def test_failure_ratio_window_is_cleared_on_close():
    breaker, clock, _ = make(failure_threshold=None, failure_ratio=0.5, min_requests=4, cooldown=1)
    fail(breaker, 2)
    succeed(breaker, 1)
    fail(breaker, 1)
    assert breaker.state == "open"
    clock.advance(1)
    succeed(breaker, 1)
    assert breaker.state == "closed"
    # The old failures are gone: one more failure is 1/1, under min_requests.
    fail(breaker, 1)
    succeed(breaker, 2)
    assert breaker.state == "closed"


def test_either_trigger_opens():
    breaker, _, _ = make(failure_threshold=3, failure_ratio=0.9, min_requests=100)
    fail(breaker, 3)
    assert breaker.state == "open"


def test_no_callback_needed():
    breaker = CircuitBreaker(Clock(), failure_threshold=1, on_change=None)
    breaker.record_failure()
    assert breaker.state == "open"


@pytest.mark.parametrize("kw", [
    dict(failure_threshold=0),
    dict(failure_ratio=0.0),
    dict(failure_ratio=1.5),
    dict(window=0),
    dict(min_requests=0),
    dict(cooldown=-1),
])
def test_bad_parameters(kw):
    with pytest.raises(ValueError):
        CircuitBreaker(Clock(), **kw)


def test_open_for_counts_down_the_cooldown():
    clock = Clock()
    breaker = CircuitBreaker(clock, failure_threshold=1, cooldown=10)
    assert breaker.open_for() == 0
    breaker.record_failure()
    assert breaker.open_for() == 10
    clock.advance(4)
    assert breaker.open_for() == 6
    clock.advance(6)
    assert breaker.open_for() == 0 and breaker.state == "half_open"
