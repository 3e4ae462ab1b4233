"""
The admin listener's resources: C{/health}, C{/backends}, and those request
filters add (C{admin_children}): C{/metrics} (Prometheus), C{/stats} (JSON)
and C{/dashboard/} from the observe filter (L{gateway.observe}), C{/cache}.

The admin listener is separate from client traffic and binds to
127.0.0.1 by default: nothing here is meant for the public.
"""

from __future__ import annotations

import json

from twisted.web import server
from twisted.web.resource import Resource

from gateway.metrics import stats
from gateway.state import Gateway


def json_response(request: server.Request, status: int, payload) -> bytes:
    """Set C{status} and JSON headers on C{request}; return the body."""
    body = json.dumps(payload, indent=None, sort_keys=True).encode("utf-8") + b"\n"
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return body


class HealthResource(Resource):
    """
    C{GET /health}: 200 C{{"status": "ok", ...}} while the gateway serves.
    """

    isLeaf = True

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self._gateway = gateway

    def render_GET(self, request: server.Request) -> bytes:
        snapshot = self._gateway.snapshot
        watcher = getattr(self._gateway, "config_watcher", None)
        error = watcher.last_error if watcher is not None else None
        return json_response(
            request,
            200,
            {
                "status": "ok",
                "config": snapshot.config.source,
                "routes": len(snapshot.config.routes),
                "services": len(snapshot.config.services),
                # reloads so far, and why the last file was refused (None
                # once a good file was loaded)
                "config_reloads": dict(self._gateway.reloads),
                "config_error": str(error) if error is not None else None,
            },
        )


#: What C{generate_latest} writes: the classic text format, which every
#: Prometheus server reads (newer clients label it 1.0.0).
PROMETHEUS_TEXT = b"text/plain; version=0.0.4; charset=utf-8"


class MetricsResource(Resource):
    """
    C{GET /metrics}: the gateway's own registry in the Prometheus text
    format, rendered on the reactor thread (it takes well under a
    millisecond for a config of a few dozen routes).
    """

    isLeaf = True

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self._gateway = gateway

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", PROMETHEUS_TEXT)
        request.setHeader(b"Cache-Control", b"no-store")
        return self._gateway.metrics.render()


class StatsResource(Resource):
    """
    C{GET /stats}: JSON with per-route and per-backend counters, backend
    health and circuit states, and the config in use
    (L{gateway.metrics.stats}).

    @param extra: returns more top-level keys (the observe filter's own
        counters), or None.
    """

    isLeaf = True

    def __init__(self, gateway: Gateway, extra=None) -> None:
        super().__init__()
        self._gateway = gateway
        self._extra = extra

    def render_GET(self, request: server.Request) -> bytes:
        extra = self._extra() if self._extra is not None else None
        return json_response(request, 200, stats(self._gateway.metrics, self._gateway, extra))


class BackendsResource(Resource):
    """
    C{GET /backends}: C{{"backends": [...]}}, the state of every backend
    (L{gateway.state.Gateway.backend_states}): health, ejection, circuit
    state and requests in flight.
    """

    isLeaf = True

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self._gateway = gateway

    def render_GET(self, request: server.Request) -> bytes:
        return json_response(request, 200, {"backends": self._gateway.backend_states()})


class AdminRoot(Resource):
    """The admin listener's root: its children are the admin endpoints."""

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self.gateway = gateway
        self.putChild(b"health", HealthResource(gateway))
        self.putChild(b"backends", BackendsResource(gateway))
        for f in gateway.filters:
            for name, resource in getattr(f, "admin_children", {}).items():
                self.putChild(name, resource)

    def render_GET(self, request: server.Request) -> bytes:
        return json_response(
            request, 200, {"endpoints": sorted(k.decode() for k in self.children)}
        )


class AdminSite(server.Site):
    """The site of the admin listener; it keeps no access log."""

    noisy = False

    def log(self, request) -> None:
        pass


def admin_site(gateway: Gateway) -> AdminSite:
    """The site for the admin listener."""
    return AdminSite(AdminRoot(gateway))
