"""
The gateway's runtime state: the config snapshot requests are served from,
and the per-service objects (connection pools, balancers, health and
breaker state) built from it.

A request takes L{Gateway.snapshot} once, at its start, and is served from
it to the end; L{Gateway.apply} swaps in a new snapshot for the requests
that follow. Services whose config did not change keep their runtime (pool,
balancer state, health, ejections, breakers), so a reload neither drops warm
connections nor forgets that a backend is down.
"""

from __future__ import annotations

import importlib
import math
import random
from typing import Any, Callable, Mapping, Optional

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from gateway.balancing import hash_key, make_balancer
from gateway.breaker import CircuitBreaker
from gateway.config import FEATURE_MODULES, Backend, Config, Service
from gateway.forwarding import ServiceForwarder
from gateway.health import ActiveHealthChecker, OutlierDetector, Probe, treq_probe
from gateway.metrics import GatewayMetrics
from gateway.pipeline import build_filters
from gateway.retry import RetryBudget
from gateway.routing import Router

_log = Logger()


class ServiceRuntime:
    """
    What one service needs at runtime: its forwarder (pool, connection
    limits), its balancer, and the state that decides which backends are
    usable: the active health checker, the outlier detector and one circuit
    breaker per backend (each only when configured), and the retry budget.

    A backend is usable when its health check (if any) says healthy, it is
    not ejected, and its breaker (if any) lets a request through.

    For each request sent to a backend the proxy calls L{acquire} (the
    breaker's permission), then exactly one of L{record} (a verdict) or
    L{release} (no verdict: the client went away, or the gateway itself had
    no capacity).

    @param reactor: see L{ServiceForwarder}; also the clock of the health
        checks and breakers.
    @param rng: randomness for balancers that need it.
    @param probe: the active health probe; L{treq_probe} if None.
    """

    def __init__(
        self, reactor, service: Service, rng: random.Random, probe: Optional[Probe] = None
    ) -> None:
        self.service = service
        self.forwarder = ServiceForwarder(reactor, service)
        self.balancer = make_balancer(
            service.balancer, service.backends, self.forwarder.limits.active, rng,
            service.hash_on,
        )
        self.budget = RetryBudget(
            ratio=service.retry_budget.percent / 100,
            min_concurrency=service.retry_budget.min_concurrency,
        )
        self.checker: Optional[ActiveHealthChecker] = None
        if service.health_check is not None:
            self.checker = ActiveHealthChecker(
                reactor,
                service.backends,
                service.health_check,
                probe or treq_probe(reactor),
                service=service.name,
            )
        self.detector: Optional[OutlierDetector] = None
        passive = service.passive_health
        if passive is not None:
            self.detector = OutlierDetector(
                reactor,
                service.backends,
                consecutive_failures=passive.consecutive_failures,
                ejection_time=passive.ejection_time,
                max_ejection_percent=passive.max_ejection_percent,
                max_ejection_time=passive.max_ejection_time,
                service=service.name,
            )
        self.breakers: dict[Backend, CircuitBreaker] = {}
        breaker = service.circuit_breaker
        if breaker is not None:
            for backend in service.backends:
                self.breakers[backend] = CircuitBreaker(
                    reactor,
                    failure_threshold=breaker.failure_threshold,
                    failure_ratio=breaker.failure_ratio,
                    window=breaker.window,
                    min_requests=breaker.min_requests,
                    cooldown=breaker.cooldown,
                    on_change=lambda old, new, b=backend: self._circuit_changed(b, old, new),
                )
        #: Other runtime state of each backend, by backend URL: whatever is
        #: kept here survives a reload that changes the service, for the
        #: backends that remain (see L{inherit}).
        self.backend_state: dict[str, Any] = {}

    def _circuit_changed(self, backend: Backend, old: str, new: str) -> None:
        _log.info(
            "circuit of backend {backend} is now {state} (was {previous})",
            event="circuit_state",
            service=self.service.name,
            backend=backend.url,
            state=new,
            previous=old,
        )

    def inherit(self, previous: "ServiceRuntime") -> None:
        """
        Take over the runtime state of C{previous}, the runtime of this
        service in the config being replaced, for the backends that are
        still listed.
        """
        urls = {backend.url for backend in self.service.backends}
        for url, state in previous.backend_state.items():
            if url in urls:
                self.backend_state[url] = state
        # Health, ejection and breaker state carry over where the settings
        # that shaped them did not change (thresholds live in that state).
        was = {backend.url: backend for backend in previous.service.backends}
        old, new = previous.service, self.service
        for backend in new.backends:
            before = was.get(backend.url)
            if before is None:
                continue
            if self.checker is not None and previous.checker is not None and new.health_check == old.health_check:
                self.checker.adopt(backend, previous.checker.state_of(before))
            if self.detector is not None and previous.detector is not None and new.passive_health == old.passive_health:
                self.detector.adopt(backend, previous.detector.state_of(before))
            if before in previous.breakers and backend in self.breakers and new.circuit_breaker == old.circuit_breaker:
                self.breakers[backend] = previous.breakers[before]

    # --- choosing backends ---------------------------------------------------

    def usable(self, backend: Backend) -> bool:
        """Whether a request may be sent to C{backend} now."""
        if self.checker is not None and not self.checker.is_healthy(backend):
            return False
        if self.detector is not None and self.detector.is_ejected(backend):
            return False
        breaker = self.breakers.get(backend)
        return breaker is None or breaker.available()

    def available(self) -> list:
        """The backends a request may be sent to now, in config order."""
        return [b for b in self.service.backends if self.usable(b)]

    def hash_key(self, client_ip: str, headers, cookies, path: bytes) -> Optional[bytes]:
        """
        The request's key for a C{consistent_hash} balancer, or None for
        other policies. See L{gateway.balancing.hash_key} for the arguments.
        """
        if self.service.hash_on is None:
            return None
        return hash_key(self.service.hash_on, client_ip, headers, cookies, path)

    def retry_after(self) -> int:
        """
        Whole seconds after which some backend may be usable again, at
        least 1: for the C{Retry-After} of a 503 when none is.
        """
        soonest = math.inf
        for backend in self.service.backends:
            wait = 0.0
            if self.checker is not None and not self.checker.is_healthy(backend):
                check = self.service.health_check
                wait = check.interval * check.healthy_threshold
            if self.detector is not None:
                wait = max(wait, self.detector.ejected_for(backend))
            breaker = self.breakers.get(backend)
            if breaker is not None:
                wait = max(wait, breaker.open_for())
            soonest = min(soonest, wait)
        if soonest == math.inf:
            return 1
        return max(1, math.ceil(soonest))

    # --- verdicts -------------------------------------------------------------

    def acquire(self, backend: Backend) -> bool:
        """
        Ask C{backend}'s breaker to let a request through (in half-open,
        this takes the one trial). C{True} must be followed by exactly one
        of L{record} or L{release}.
        """
        breaker = self.breakers.get(backend)
        return breaker is None or breaker.acquire()

    def record(self, backend: Backend, ok: bool) -> None:
        """
        The verdict of a request to C{backend}: C{ok} is false for a
        connect failure, reset, timeout or 5xx answer.
        """
        breaker = self.breakers.get(backend)
        if ok:
            if breaker is not None:
                breaker.record_success()
            if self.detector is not None:
                self.detector.record_success(backend)
        else:
            if breaker is not None:
                breaker.record_failure()
            if self.detector is not None:
                self.detector.record_failure(backend)

    def release(self, backend: Backend) -> None:
        """A request to C{backend} ended without a verdict."""
        breaker = self.breakers.get(backend)
        if breaker is not None:
            breaker.release()

    # --- observing -------------------------------------------------------------

    def backend_states(self) -> list:
        """
        The state of each backend, in config order, for metrics and stats:
        dicts with C{service}, C{backend} (the URL), C{healthy} (by active
        checks; true without them), C{ejected}, C{circuit} (C{"closed"},
        C{"open"} or C{"half_open"}; C{"closed"} without a breaker),
        C{circuit_value} (0, 1, 2: the C{gateway_circuit_state} gauge) and
        C{active} (requests in flight).
        """
        states = []
        for backend in self.service.backends:
            breaker = self.breakers.get(backend)
            states.append(
                {
                    "service": self.service.name,
                    "backend": backend.url,
                    "healthy": self.checker is None or self.checker.is_healthy(backend),
                    "ejected": self.detector is not None and self.detector.is_ejected(backend),
                    "circuit": breaker.state if breaker is not None else "closed",
                    "circuit_value": breaker.state_value if breaker is not None else 0,
                    "active": self.forwarder.limits.active(backend),
                }
            )
        return states

    # --- lifetime ---------------------------------------------------------------

    def start(self) -> None:
        """Start the active health checks, if any. Idempotent."""
        if self.checker is not None:
            self.checker.start()

    def stop(self) -> None:
        """Stop the active health checks, if any. Idempotent."""
        if self.checker is not None:
            self.checker.stop()

    def close(self) -> Deferred:
        """Stop the health checks and close idle pooled connections."""
        self.stop()
        return self.forwarder.close()


class Snapshot:
    """
    One config and everything derived from it, read-only once built.

    @ivar config: the validated L{Config}.
    @ivar router: the L{Router} over its routes.
    @ivar services: service name -> L{ServiceRuntime}.
    """

    def __init__(
        self, config: Config, router: Router, services: Mapping[str, ServiceRuntime]
    ) -> None:
        self.config = config
        self.router = router
        self.services = services


class Gateway:
    """
    Holds the current L{Snapshot} and builds new ones.

    @param reactor: the reactor the gateway runs on (C{IReactorTCP},
        C{IReactorTime}).
    @param config: the first configuration.
    @param rng: randomness for balancers and retry backoff; a seeded one in
        tests.
    @param probe: the active health probe of every service; L{treq_probe}
        if None.
    """

    def __init__(
        self,
        reactor,
        config: Config,
        rng: Optional[random.Random] = None,
        probe: Optional[Probe] = None,
    ) -> None:
        self.reactor = reactor
        self.rng = rng or random.Random()
        self._probe = probe
        #: Whether health checks run (between L{start} and L{stop}).
        self.running = False
        #: Called with each finished L{gateway.proxy.RequestContext}.
        self.request_observers: list[Callable] = []
        #: Config reloads so far, by result (C{"ok"}, C{"error"}); counted
        #: by L{gateway.reload.ConfigWatcher}, exported as metrics.
        self.reloads: dict[str, int] = {"ok": 0, "error": 0}
        #: The Prometheus metrics (L{gateway.metrics.GatewayMetrics});
        #: config reload code reports with C{metrics.config_reloaded(ok)}.
        self.metrics = GatewayMetrics(self)
        self.request_observers.append(self.metrics.observe)
        self.snapshot: Snapshot = self._build(config, {})
        for module in FEATURE_MODULES:
            importlib.import_module(module)
        #: The request filters, in pipeline order (L{gateway.pipeline}).
        self.filters = build_filters(self)

    def _build(self, config: Config, old: Mapping[str, ServiceRuntime]) -> Snapshot:
        services = {}
        for name, service in config.services.items():
            previous = old.get(name)
            if previous is not None and previous.service == service:
                services[name] = previous
            else:
                services[name] = ServiceRuntime(self.reactor, service, self.rng, self._probe)
                if previous is not None:
                    services[name].inherit(previous)
        return Snapshot(config, Router(config.routes), services)

    def apply(self, config: Config) -> Deferred:
        """
        Serve the requests that follow from C{config}.

        Runtimes of services that are gone or changed are closed once the
        swap is made (their health checks stop); their in-flight requests
        finish on the connections they hold. While the gateway is running,
        the health checks of new runtimes start. A changed service's new
        runtime inherits the health, ejection and breaker state of the
        backends it keeps (L{ServiceRuntime.inherit}).

        @return: a Deferred that fires when the old pools are closed.
        """
        old = self.snapshot.services
        self.snapshot = self._build(config, old)
        for f in self.filters:
            reconfigure = getattr(f, "reconfigure", None)
            if reconfigure is not None:
                reconfigure(self.snapshot)
        kept = set(map(id, self.snapshot.services.values()))
        closing = [runtime.close() for runtime in old.values() if id(runtime) not in kept]
        if self.running:
            for runtime in self.snapshot.services.values():
                runtime.start()
        return gatherResults(closing, consumeErrors=True)

    def start(self) -> None:
        """Start every service's health checks, and those of later reloads."""
        self.running = True
        for runtime in self.snapshot.services.values():
            runtime.start()

    def stop(self) -> None:
        """Stop every service's health checks."""
        self.running = False
        for runtime in self.snapshot.services.values():
            runtime.stop()

    def backend_states(self) -> list:
        """
        Every backend's state, service by service in config order; see
        L{ServiceRuntime.backend_states}.
        """
        return [
            state
            for runtime in self.snapshot.services.values()
            for state in runtime.backend_states()
        ]

    def close(self) -> Deferred:
        """Close every service's idle connections (at shutdown)."""
        return gatherResults(
            [runtime.close() for runtime in self.snapshot.services.values()],
            consumeErrors=True,
        )
