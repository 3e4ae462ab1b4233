"""Tests for gateway.retry."""

import random

import pytest

from gateway.retry import RetryBudget, backoff, is_idempotent, should_retry

IDEMPOTENT = [b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"]
NOT_IDEMPOTENT = [b"POST", b"PATCH", b"CONNECT", b"get"]


@pytest.mark.parametrize("method", IDEMPOTENT)
def test_idempotent(method):
    assert is_idempotent(method)


@pytest.mark.parametrize("method", NOT_IDEMPOTENT)
def test_not_idempotent(method):
    assert not is_idempotent(method)


@pytest.mark.parametrize("method", IDEMPOTENT + NOT_IDEMPOTENT)
def test_connect_failure_is_always_retried(method):
    assert should_retry(method, "connect_failure")


@pytest.mark.parametrize("outcome,status", [
    ("reset", None), ("timeout", None), ("status", 502), ("status", 503), ("status", 504),
])
def test_sent_requests_retried_only_if_idempotent_or_allowed(outcome, status):
    assert should_retry(b"GET", outcome, status)
    assert should_retry(b"DELETE", outcome, status)
    assert not should_retry(b"POST", outcome, status)
    assert not should_retry(b"PATCH", outcome, status)
    assert should_retry(b"POST", outcome, status, retry_non_idempotent=True)


@pytest.mark.parametrize("status", [200, 404, 500, 501, 505, 429, None])
def test_other_statuses_are_not_retried(status):
    assert not should_retry(b"GET", "status", status)
    assert not should_retry(b"POST", "status", status, retry_non_idempotent=True)


def test_unknown_outcome():
    with pytest.raises(ValueError):
        should_retry(b"GET", "bad_luck")


def test_backoff_full_jitter_bounds():
    rng = random.Random(7)
    for attempt, ceiling in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (10, 1.0), (5000, 1.0)]:
        draws = [backoff(attempt, 0.1, 1.0, rng) for _ in range(2000)]
        assert all(0.0 <= d <= ceiling for d in draws)
        # Full jitter: spread over the whole range, not bunched at the top.
        assert min(draws) < 0.05 * ceiling
        assert max(draws) > 0.95 * ceiling
        assert 0.45 * ceiling < sum(draws) / len(draws) < 0.55 * ceiling


def test_backoff_is_deterministic_with_a_seed():
    a = [backoff(i, 0.05, 2.0, random.Random(3)) for i in range(5)]
    b = [backoff(i, 0.05, 2.0, random.Random(3)) for i in range(5)]
    assert a == b


def test_backoff_refuses_negatives():
    with pytest.raises(ValueError):
        backoff(-1, 0.1, 1.0, random.Random(1))
    with pytest.raises(ValueError):
        backoff(0, -0.1, 1.0, random.Random(1))


def test_budget_floor():
    budget = RetryBudget(ratio=0.2, min_concurrency=3)
    budget.request_started()
    for _ in range(3):
        assert budget.can_retry()
        budget.retry_started()
    assert not budget.can_retry()
    budget.retry_finished()
    assert budget.can_retry()


def test_budget_ratio_of_active_requests():
    budget = RetryBudget(ratio=0.2, min_concurrency=3)
    for _ in range(50):
        budget.request_started()
    for _ in range(10):  # 20 % of 50
        assert budget.can_retry()
        budget.retry_started()
    assert not budget.can_retry()
    for _ in range(5):
        budget.request_started()  # 55 requests: 11 retries
    assert budget.can_retry()
    budget.retry_started()
    assert not budget.can_retry()
    for _ in range(55):
        budget.request_finished()
    for _ in range(8):
        budget.retry_finished()
    assert budget.active_retries == 3 and budget.active_requests == 0
    assert not budget.can_retry()  # back to the floor of 3
    budget.retry_finished()
    assert budget.can_retry()


def test_budget_zero_floor_and_unbalanced_finish():
    budget = RetryBudget(ratio=0.5, min_concurrency=0)
    assert not budget.can_retry()
    budget.request_finished()
    budget.retry_finished()
    assert budget.active_requests == 0 and budget.active_retries == 0
    budget.request_started()
    assert budget.can_retry()  # 0 < 0.5


def test_budget_validates():
    with pytest.raises(ValueError):
        RetryBudget(ratio=-0.1)
    with pytest.raises(ValueError):
        RetryBudget(min_concurrency=-1)
