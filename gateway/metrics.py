"""
Prometheus metrics of the gateway, in a registry of its own.

L{GatewayMetrics.observe} is a request observer (see
L{gateway.state.Gateway.request_observers}): it records each finished
request. Every label value comes from the config (route, service and
backend names) or from a small fixed set (methods, status codes 100-599,
cache results): nothing a client sends becomes a label, so the number of
series is bounded by the config. Labelled children are resolved once per
label set and kept in dicts, so recording a request costs a few dict
lookups and the client library's increments (C{bench/observe_cost.py}
measures it).

Backend health, circuit state and in-flight counts are read when scraped,
from C{gateway.backend_states()} when the gateway provides it (the health
and breaker wiring does), else from the connection limits (all backends
healthy and closed).

Config reload code reports each attempt with L{GatewayMetrics.config_reloaded}.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from gateway import __version__, splice
from gateway.breaker import STATE_VALUES

#: Histogram buckets in seconds, for a proxy: 1 ms to 30 s.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)

#: Method label values; any other method is counted as C{OTHER}.
METHODS = {
    m.encode("ascii"): m
    for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")
}
OTHER = "OTHER"

#: Cache result label values, by what a cache filter sets in C{context.cache}
#: (its C{X-Cache} value, in either case); anything else is C{other}.
CACHE_RESULTS = {
    **{v: v.lower() for v in ("HIT", "MISS", "STALE", "BYPASS")},
    **{v: v for v in ("hit", "miss", "stale", "bypass")},
}

#: The C{route} and C{service} label of requests no route matched.
UNROUTED = ""


def status_label(status: int) -> str:
    """C{"200"} for a valid status code, C{"other"} outside 100-599."""
    return str(status) if 100 <= status <= 599 else "other"


def backend_states(gateway) -> list:
    """
    The state of every backend, as dicts with the keys C{service},
    C{backend} (URL), C{healthy}, C{ejected}, C{circuit} (C{"closed"},
    C{"open"}, C{"half_open"}), C{circuit_value} (0, 1, 2) and C{active}
    (requests in flight).

    Uses C{gateway.backend_states()} when the gateway has it; otherwise
    every backend is healthy and closed, with its in-flight count from the
    service's connection limits.
    """
    provider = getattr(gateway, "backend_states", None)
    if provider is not None:
        return list(provider())
    states = []
    for name, runtime in gateway.snapshot.services.items():
        active = runtime.forwarder.limits.active
        for backend in runtime.service.backends:
            states.append(
                {
                    "service": name,
                    "backend": backend.url,
                    "healthy": True,
                    "ejected": False,
                    "circuit": "closed",
                    "circuit_value": 0,
                    "active": active(backend),
                }
            )
    return states


#: The backend gauges: (name, help), labelled by service and backend, in
#: the order of the values of L{backend_gauge_values}.
BACKEND_GAUGES = (
    ("gateway_backend_healthy", "1 if the backend is healthy and not ejected, else 0."),
    ("gateway_circuit_state", "Circuit breaker state: 0 closed, 1 open, 2 half-open."),
    ("gateway_active_connections", "Requests in flight to the backend."),
)


def backend_gauge_values(state: dict) -> tuple:
    """
    The values of L{BACKEND_GAUGES} for one of L{backend_states}: healthy
    (1.0 when healthy and not ejected, else 0.0), circuit (0.0 closed, 1.0
    open, 2.0 half-open) and requests in flight.
    """
    up = state.get("healthy", True) and not state.get("ejected", False)
    circuit = state.get("circuit_value")
    if circuit is None:
        circuit = STATE_VALUES.get(state.get("circuit", "closed"), 0)
    return (1.0 if up else 0.0, float(circuit), float(state.get("active", 0)))


class _BackendCollector:
    """Backend gauges, read from L{backend_states} at each scrape."""

    def __init__(self, gateway) -> None:
        self._gateway = gateway

    def _families(self):
        return tuple(
            GaugeMetricFamily(name, text, labels=["service", "backend"]) for name, text in BACKEND_GAUGES
        )

    def describe(self):
        return self._families()

    def collect(self):
        families = self._families()
        if self._gateway is not None:
            for state in backend_states(self._gateway):
                labels = [state["service"], state["backend"]]
                for family, value in zip(families, backend_gauge_values(state)):
                    family.add_metric(labels, value)
        return list(families)


class _RouteChildren:
    """The labelled children of one (route, service) pair."""

    __slots__ = ("duration", "rate_limited", "cache")

    def __init__(self, metrics: "GatewayMetrics", route: str, service: str) -> None:
        self.duration = metrics.request_duration.labels(route, service)
        self.rate_limited = metrics.rate_limited.labels(route)
        self.cache: dict = {}


class GatewayMetrics:
    """
    The gateway's metrics and their registry.

    @param gateway: the L{gateway.state.Gateway} whose backends the backend
        gauges describe; None for none (tests, benchmarks).
    @param version: the C{version} label of C{gateway_build_info}.
    @ivar registry: the L{CollectorRegistry} holding only these metrics.
    """

    def __init__(self, gateway=None, version: str = __version__) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gateway_requests",
            "Requests answered, by route, service, method and status.",
            ["route", "service", "method", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from a request's arrival to the end of its response.",
            ["route", "service"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "gateway_upstream_duration_seconds",
            "Time from sending a request to a backend to its response headers.",
            ["service", "backend"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.rate_limited = Counter(
            "gateway_rate_limited", "Requests refused by a rate limit.", ["route"], registry=registry
        )
        self.cache_requests = Counter(
            "gateway_cache_requests",
            "Requests on cached routes by cache result (hit, miss, stale, bypass, other).",
            ["route", "result"],
            registry=registry,
        )
        self.config_reloads = Counter(
            "gateway_config_reloads", "Config reload attempts by result (ok, failed).", ["result"],
            registry=registry,
        )
        self.build_info = Gauge(
            "gateway_build_info", "Always 1; the version is a label.", ["version"], registry=registry
        )
        self.build_info.labels(version).set(1)
        self.config_reloads.labels("ok")
        self.config_reloads.labels("failed")
        registry.register(_BackendCollector(gateway))
        self.spliced_responses = Counter(
            "gateway_spliced_responses",
            "Response bodies whose rest went from backend to client socket by splice(2).",
            registry=registry,
        )
        self.spliced_bytes = Counter(
            "gateway_spliced_bytes",
            "Response body bytes moved from backend to client socket by splice(2).",
            registry=registry,
        )
        splice.report_to(self.spliced_responses, self.spliced_bytes)
        self._request_children: dict = {}
        self._route_children: dict = {}
        self._upstream_children: dict = {}
        self._config = None
        #: How many configs were applied (1 for the first), and when the
        #: last one was (epoch seconds); see L{prepare}.
        self.config_generation = 0
        self.config_loaded_at: Optional[float] = None

    # -- the hot path ------------------------------------------------------

    def observe(self, context) -> None:
        """
        Record one finished request (a L{gateway.proxy.RequestContext}).

        A request counts as rate limited when a filter set
        C{context.notes["rate_limited"]}, or when the gateway itself
        answered 429 without reaching a backend.
        """
        route = context.route
        if route is None:
            route_name = service = UNROUTED
        else:
            route_name = route.name
            service = context.service or route.service
        method = METHODS.get(context.method, OTHER)
        status = context.status
        key = (route_name, service, method, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(
                route_name, service, method, status_label(status)
            )
        child.inc()
        pair = (route_name, service)
        children = self._route_children.get(pair)
        if children is None:
            children = self._route_children[pair] = _RouteChildren(self, route_name, service)
        children.duration.observe(context.ended - context.started)
        backend = context.backend
        if backend is not None and context.upstream_ended >= context.upstream_started > 0:
            upstream_key = (service, backend.url)
            upstream = self._upstream_children.get(upstream_key)
            if upstream is None:
                upstream = self._upstream_children[upstream_key] = self.upstream_duration.labels(
                    service, backend.url
                )
            upstream.observe(context.upstream_ended - context.upstream_started)
        cache = context.cache
        if cache is not None:
            counter = children.cache.get(cache)
            if counter is None:
                counter = children.cache[cache] = self.cache_requests.labels(
                    route_name, CACHE_RESULTS.get(cache, "other")
                )
            counter.inc()
        if context.notes.get("rate_limited") or (status == 429 and backend is None):
            children.rate_limited.inc()

    # -- everything else ---------------------------------------------------

    def config_reloaded(self, ok: bool) -> None:
        """
        Count one config reload attempt.

        @param ok: True if the new config was applied, False if it was
            refused (invalid file, failed validation).
        """
        self.config_reloads.labels("ok" if ok else "failed").inc()

    def prepare(self, config, now: float) -> None:
        """
        Take C{config} as the one in use from C{now}: count a new config
        generation, create the series of each of its routes at zero, so
        that C{rate()} sees them from the first scrape, and drop the series
        of routes, services and backends it no longer has (their label
        values would otherwise stay until a restart).

        @param now: seconds since the epoch (the reactor's clock).
        """
        if config is not self._config:
            self._config = config
            self.config_generation += 1
            self.config_loaded_at = now
        routes = {(route.name, route.service) for route in config.routes}
        backends = {
            (name, backend.url) for name, service in config.services.items() for backend in service.backends
        }
        for pair in routes:
            if pair not in self._route_children:
                self._route_children[pair] = _RouteChildren(self, *pair)
        keep = routes | {(UNROUTED, UNROUTED)}
        route_names = {name for name, _ in keep}
        for key in [k for k in self._request_children if (k[0], k[1]) not in keep]:
            del self._request_children[key]
            _remove(self.requests, key[0], key[1], key[2], status_label(key[3]))
        for pair in [p for p in self._route_children if p not in keep]:
            children = self._route_children.pop(pair)
            _remove(self.request_duration, *pair)
            for cache in children.cache:
                _remove(self.cache_requests, pair[0], CACHE_RESULTS.get(cache, "other"))
            if pair[0] not in route_names:
                _remove(self.rate_limited, pair[0])
        for key in [k for k in self._upstream_children if k not in backends]:
            del self._upstream_children[key]
            _remove(self.upstream_duration, *key)

    def render(self) -> bytes:
        """The metrics in the Prometheus text format (version 0.0.4)."""
        return generate_latest(self.registry)

    def samples(self) -> Iterable:
        """Every sample of the registry, as C{(name, labels, value)}."""
        for family in self.registry.collect():
            for sample in family.samples:
                yield sample.name, sample.labels, sample.value


def _remove(metric, *labels) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


def percentile_from_buckets(buckets: list, q: float) -> Optional[float]:
    """
    Estimate the C{q} quantile (0..1) from cumulative histogram buckets.

    @param buckets: C{(upper_bound, cumulative_count)} in ascending order,
        the last one +Inf.
    @return: seconds, interpolated linearly within the bucket (as
        Prometheus's C{histogram_quantile} does), or None with no samples.
    """
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    counts = [count for _, count in buckets]
    index = bisect_left(counts, rank)
    index = min(index, len(buckets) - 1)
    upper, count = buckets[index]
    lower, below = (buckets[index - 1] if index > 0 else (0.0, 0.0))
    if upper == float("inf"):
        return lower
    if count == below:
        return upper
    return lower + (upper - lower) * (rank - below) / (count - below)


def stats(metrics: GatewayMetrics, gateway, extra: Optional[dict] = None) -> dict:
    """
    The C{/stats} document: per-route and per-backend counters, backend
    health and circuit states, config version and reload counts, built
    from the metrics at the time of the call (not on the request path).
    """
    routes: dict = {}
    upstream: dict = {}
    buckets: dict = {}
    reloads = {"ok": 0, "failed": 0}
    for name, labels, value in metrics.samples():
        if name == "gateway_requests_total":
            route = routes.setdefault(labels["route"], _route_entry(labels["service"]))
            route["requests"] += int(value)
            status = labels["status"]
            klass = status[0] + "xx" if status != "other" else "other"
            route["status"][klass] = route["status"].get(klass, 0) + int(value)
        elif name == "gateway_request_duration_seconds_bucket":
            per_bound = buckets.setdefault(labels["route"], {})
            bound = float(labels["le"])
            per_bound[bound] = per_bound.get(bound, 0.0) + value
        elif name == "gateway_request_duration_seconds_sum":
            routes.setdefault(labels["route"], _route_entry(labels["service"]))["_sum"] += value
        elif name == "gateway_rate_limited_total":
            routes.setdefault(labels["route"], _route_entry(None))["rate_limited"] = int(value)
        elif name == "gateway_cache_requests_total":
            entry = routes.setdefault(labels["route"], _route_entry(None))
            entry["cache"][labels["result"]] = int(value)
        elif name.startswith("gateway_upstream_duration_seconds_"):
            key = (labels["service"], labels["backend"])
            slot = upstream.setdefault(key, {"count": 0, "sum": 0.0})
            if name.endswith("_count"):
                slot["count"] = int(value)
            elif name.endswith("_sum"):
                slot["sum"] = value
        elif name == "gateway_config_reloads_total":
            reloads[labels["result"]] = int(value)
    for name, route in routes.items():
        total = route.pop("_sum")
        series = sorted(buckets.get(name, {}).items())
        p50 = percentile_from_buckets(series, 0.5)
        p99 = percentile_from_buckets(series, 0.99)
        route["latency_ms"] = {
            "mean": round(total * 1000 / route["requests"], 3) if route["requests"] else None,
            "p50": round(p50 * 1000, 3) if p50 is not None else None,
            "p99": round(p99 * 1000, 3) if p99 is not None else None,
        }
    backends = []
    for state in backend_states(gateway):
        entry = dict(state)
        slot = upstream.get((state["service"], state["backend"]), {"count": 0, "sum": 0.0})
        entry["requests"] = slot["count"]
        entry["upstream_mean_ms"] = round(slot["sum"] * 1000 / slot["count"], 3) if slot["count"] else None
        backends.append(entry)
    snapshot = gateway.snapshot
    document = {
        "version": __version__,
        "time": gateway.reactor.seconds(),
        "config": {
            "source": snapshot.config.source,
            "generation": metrics.config_generation,
            "loaded_at": metrics.config_loaded_at,
            "routes": len(snapshot.config.routes),
            "services": len(snapshot.config.services),
            "reloads": reloads,
        },
        "routes": routes,
        "backends": backends,
    }
    if extra:
        document.update(extra)
    return document


def _route_entry(service: Optional[str]) -> dict:
    return {"service": service, "requests": 0, "status": {}, "rate_limited": 0, "cache": {}, "_sum": 0.0}
