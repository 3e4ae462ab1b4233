"""
The gateway's runtime state: the config snapshot requests are served from,
and the per-service objects (connection pools, balancers) built from it.

A request takes L{Gateway.snapshot} once, at its start, and is served from
it to the end; L{Gateway.apply} swaps in a new snapshot for the requests
that follow. Services whose config did not change keep their runtime (pool,
balancer state), so a reload does not drop warm connections.
"""

from __future__ import annotations

import importlib
import random
from typing import Callable, Mapping, Optional

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from gateway.balancing import make_balancer
from gateway.config import FEATURE_MODULES, Config, Service
from gateway.forwarding import ServiceForwarder
from gateway.metrics import GatewayMetrics
from gateway.pipeline import build_filters
from gateway.routing import Router

_log = Logger()


class ServiceRuntime:
    """
    What one service needs at runtime: its forwarder (pool, connection
    limits) and its balancer.

    @param reactor: see L{ServiceForwarder}.
    @param rng: randomness for balancers that need it.
    """

    def __init__(self, reactor, service: Service, rng: random.Random) -> None:
        self.service = service
        self.forwarder = ServiceForwarder(reactor, service)
        self.balancer = make_balancer(
            service.balancer, service.backends, self.forwarder.limits.active, rng
        )

    def available(self):
        """The backends a request may be sent to now, in config order."""
        return self.service.backends

    def close(self) -> Deferred:
        """Close idle pooled connections."""
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
    @param rng: randomness for balancers; a seeded one in tests.
    """

    def __init__(self, reactor, config: Config, rng: Optional[random.Random] = None) -> None:
        self.reactor = reactor
        self.rng = rng or random.Random()
        #: Called with each finished L{gateway.proxy.RequestContext}.
        self.request_observers: list[Callable] = []
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
                services[name] = ServiceRuntime(self.reactor, service, self.rng)
        return Snapshot(config, Router(config.routes), services)

    def apply(self, config: Config) -> Deferred:
        """
        Serve the requests that follow from C{config}.

        Runtimes of services that are gone or changed are closed once the
        swap is made; their in-flight requests finish on the connections
        they hold.

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
        return gatherResults(closing, consumeErrors=True)

    def close(self) -> Deferred:
        """Close every service's idle connections (at shutdown)."""
        return gatherResults(
            [runtime.close() for runtime in self.snapshot.services.values()],
            consumeErrors=True,
        )
