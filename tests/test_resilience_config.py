"""Config keys of the resilience features: balancers, health, breakers, retries, timeouts."""

import pytest

from gateway import balancing
from gateway.config import (
    BALANCERS,
    CircuitBreakerConfig,
    ConfigError,
    HealthCheckConfig,
    PassiveHealth,
    Retries,
    RetryBudgetConfig,
    StatusRanges,
    Timeouts,
    parse_config,
)


def parse(service: str = "", route: str = "", file: str = "gw.yaml"):
    """A config with service s (two backends, plus C{service} lines) and route r."""
    text = f"""\
services:
  s:
    backends:
      - url: http://127.0.0.1:9001
      - url: http://127.0.0.1:9002
{service}
routes:
  - name: r
    service: s
{route}
"""
    return parse_config(text, file)


def error(service: str = "", route: str = "") -> str:
    with pytest.raises(ConfigError) as info:
        parse(service, route)
    return str(info.value)


def test_defaults_leave_health_and_breaker_off_and_retry_twice():
    config = parse()
    service = config.services["s"]
    assert service.balancer == "round_robin" and service.hash_on is None
    assert service.health_check is None
    assert service.passive_health is None
    assert service.circuit_breaker is None
    assert service.retry_budget == RetryBudgetConfig(percent=20.0, min_concurrency=3)
    assert service.timeouts == Timeouts(connect=2.0, response=30.0, per_try=None)
    route = config.routes[0]
    assert route.retries == Retries(max_retries=2, non_idempotent=False)
    assert route.timeout is None


def test_every_balancer_is_accepted_and_known_to_the_balancing_module():
    assert set(BALANCERS) == set(balancing.BALANCERS)
    for name in BALANCERS:
        extra = "    hash_on: client_ip" if name == "consistent_hash" else ""
        assert parse(f"    balancer: {name}\n{extra}").services["s"].balancer == name


def test_full_resilience_section():
    config = parse(
        """\
    balancer: consistent_hash
    hash_on: header:X-User
    timeouts: {connect: 250ms, response: 5s, per_try: 1s}
    health_check:
      path: /healthz
      interval: 2s
      timeout: 500ms
      healthy_threshold: 1
      unhealthy_threshold: 2
      expected_status: [200, "204-206"]
    passive_health: {consecutive_failures: 3, ejection_time: 5s, max_ejection_percent: 50,
                     max_ejection_time: 1m}
    circuit_breaker: {failure_threshold: 0, failure_ratio: 0.5, window: 20s, min_requests: 10,
                      cooldown: 3s}
    retry_budget: {percent: 10, min_concurrency: 1}""",
        """\
    timeout: 2s
    retries: {max_retries: 3, non_idempotent: true, per_try_timeout: 400ms,
              backoff_base: 10ms, backoff_max: 100ms}""",
    )
    service = config.services["s"]
    assert service.hash_on == "header:X-User"
    assert service.timeouts == Timeouts(connect=0.25, response=5.0, per_try=1.0)
    assert service.health_check == HealthCheckConfig(
        path="/healthz", interval=2.0, timeout=0.5, healthy_threshold=1,
        unhealthy_threshold=2, expected_status=StatusRanges(((200, 200), (204, 206))),
    )
    assert service.passive_health == PassiveHealth(3, 5.0, 50, 60.0)
    assert service.circuit_breaker == CircuitBreakerConfig(None, 0.5, 20.0, 10, 3.0)
    assert service.retry_budget == RetryBudgetConfig(10.0, 1)
    route = config.routes[0]
    assert route.timeout == 2.0
    assert route.retries == Retries(3, True, 0.4, 0.01, 0.1)


def test_health_check_defaults_and_status_ranges():
    check = parse("    health_check: {path: /}").services["s"].health_check
    assert (check.interval, check.timeout) == (10.0, 2.0)
    assert (check.healthy_threshold, check.unhealthy_threshold) == (2, 3)
    assert 200 in check.expected_status and 399 in check.expected_status
    assert 400 not in check.expected_status and 199 not in check.expected_status
    check = parse('    health_check: {path: /, expected_status: "200-204"}').services["s"].health_check
    assert 204 in check.expected_status and 205 not in check.expected_status


def test_retries_as_a_count():
    assert parse(route="    retries: 0").routes[0].retries == Retries(max_retries=0)


@pytest.mark.parametrize(
    "service, route, expected",
    [
        ("    balancer: fastest", "",
         "gw.yaml:6: services.s.balancer: expected one of round_robin, weighted_round_robin,"),
        ("    balancer: consistent_hash", "",
         "gw.yaml:6: services.s.balancer: consistent_hash needs hash_on"),
        ("    hash_on: client_ip", "",
         "gw.yaml:6: services.s.hash_on: only applies to the consistent_hash balancer, not round_robin"),
        ("    balancer: consistent_hash\n    hash_on: query:x", "",
         "gw.yaml:7: services.s.hash_on: bad hash_on 'query:x'"),
        ("    health_check: {interval: 1s}", "",
         "gw.yaml:6: services.s.health_check: missing required key 'path'"),
        ("    health_check:\n      path: health", "",
         "gw.yaml:7: services.s.health_check.path: a health check path must start with '/'"),
        ("    health_check:\n      path: /\n      interval: 0s", "",
         "gw.yaml:8: services.s.health_check.interval: must be longer than zero"),
        ("    health_check:\n      path: /\n      timeout: soon", "",
         "gw.yaml:8: services.s.health_check.timeout: expected a duration"),
        ("    health_check:\n      path: /\n      unhealthy_threshold: 0", "",
         "gw.yaml:8: services.s.health_check.unhealthy_threshold: must be at least 1"),
        ("    health_check:\n      path: /\n      expected_status: 200-700", "",
         "gw.yaml:8: services.s.health_check.expected_status: not a range of HTTP statuses"),
        ("    health_check:\n      path: /\n      expected_status: [200, ok]", "",
         "gw.yaml:8: services.s.health_check.expected_status[1]: expected a status"),
        ("    health_check:\n      path: /\n      expected_status: []", "",
         "gw.yaml:8: services.s.health_check.expected_status: expected at least one status"),
        ("    health_check:\n      path: /\n      retries: 3", "",
         "gw.yaml:8: services.s.health_check.retries: unknown key"),
        ("    passive_health:\n      consecutive_failures: 0", "",
         "gw.yaml:7: services.s.passive_health.consecutive_failures: must be at least 1"),
        ("    passive_health:\n      max_ejection_percent: 101", "",
         "gw.yaml:7: services.s.passive_health.max_ejection_percent: must be at most 100"),
        ("    passive_health:\n      ejection_time: 1m\n      max_ejection_time: 10s", "",
         "gw.yaml:8: services.s.passive_health.max_ejection_time: cannot be shorter than"),
        ("    circuit_breaker:\n      failure_ratio: 1.5", "",
         "gw.yaml:7: services.s.circuit_breaker.failure_ratio: must be at most 1"),
        ("    circuit_breaker:\n      failure_ratio: 0", "",
         "gw.yaml:7: services.s.circuit_breaker.failure_ratio: must be above 0"),
        ("    circuit_breaker:\n      min_requests: 5", "",
         "gw.yaml:7: services.s.circuit_breaker.min_requests: only applies with failure_ratio"),
        ("    circuit_breaker:\n      failure_threshold: 0", "",
         "gw.yaml:7: services.s.circuit_breaker: failure_threshold is 0 and there is no"),
        ("    circuit_breaker:\n      cooldown: -1", "",
         "gw.yaml:7: services.s.circuit_breaker.cooldown: a duration cannot be negative"),
        ("    retry_budget:\n      percent: 120", "",
         "gw.yaml:7: services.s.retry_budget.percent: must be at most 100"),
        ("    timeouts:\n      response: 1s\n      per_try: 2s", "",
         "gw.yaml:8: services.s.timeouts.per_try: cannot be longer than response (1s)"),
        ("", "    retries: 11",
         "gw.yaml:10: routes[0].retries: must be at most 10"),
        ("", "    retries: {max_retries: -1}",
         "gw.yaml:10: routes[0].retries.max_retries: must be at least 0"),
        ("", "    retries:\n      non_idempotent: yes please",
         "gw.yaml:11: routes[0].retries.non_idempotent: expected true or false"),
        ("", "    retries:\n      backoff_base: 1s\n      backoff_max: 100ms",
         "gw.yaml:12: routes[0].retries.backoff_max: cannot be shorter than backoff_base (1s)"),
        ("", "    retries:\n      retry_on: [503]",
         "gw.yaml:11: routes[0].retries.retry_on: unknown key"),
        ("", "    timeout: 0",
         "gw.yaml:10: routes[0].timeout: must be longer than zero"),
    ],
)
def test_bad_values_are_refused_with_file_line_and_reason(service, route, expected):
    assert error(service, route).startswith(expected)
