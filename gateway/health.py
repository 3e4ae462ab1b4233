"""
Backend health: active probes and passive outlier detection.

  - L{HealthState}: the up/down state of one backend from consecutive
    probe results, with hysteresis.
  - L{ActiveHealthChecker}: probes every backend of a service each
    interval (a L{LoopingCall} on the injected clock) and keeps a
    L{HealthState} per backend.
  - L{OutlierDetector}: passive checks; ejects a backend for a while after
    consecutive failed requests, as Envoy's C{consecutive_5xx} outlier
    detection.
  - L{treq_probe}: the real probe, an HTTP GET with treq.

A backend is usable when it is healthy, not ejected, and its circuit
breaker (L{gateway.breaker}) lets requests through.

Sources: Envoy's health checking and outlier detection
(U{https://www.envoyproxy.io/docs/envoy/latest/intro/arch_overview/upstream/outlier}
and C{config.cluster.v3.OutlierDetection}); nginx plus's C{health_check
passes= fails=}, the model of the thresholds.
"""

from __future__ import annotations

import math
from http.cookiejar import DefaultCookiePolicy
from typing import Any, Callable, Container, Optional, Sequence

import attrs
import treq
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory

from gateway.config import Backend
from gateway.forwarding import BackendEndpoints

_log = Logger()

Probe = Callable[[Backend, str, float], "Deferred[int]"]
"""C{probe(backend, path, timeout)}: a Deferred firing with an HTTP status."""


# --- one backend's state from active checks -----------------------------------


@attrs.define
class HealthState:
    """
    The health of one backend from consecutive check results.

    Starts healthy. A healthy backend turns unhealthy after
    C{unhealthy_threshold} failed checks in a row; an unhealthy one turns
    healthy after C{healthy_threshold} passed checks in a row.

    @ivar healthy: the current state.
    """

    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    healthy: bool = True
    _streak: int = 0

    def __attrs_post_init__(self) -> None:
        if self.healthy_threshold < 1 or self.unhealthy_threshold < 1:
            raise ValueError("health thresholds must be at least 1")

    def record(self, ok: bool) -> bool:
        """
        Record one check result.

        @param ok: whether the check passed.
        @return: C{True} if this result flipped the state.
        """
        if ok == self.healthy:
            self._streak = 0
            return False
        self._streak += 1
        needed = self.healthy_threshold if ok else self.unhealthy_threshold
        if self._streak < needed:
            return False
        self.healthy = ok
        self._streak = 0
        return True


# --- passive outlier detection ------------------------------------------------


@attrs.define
class _Outlier:
    consecutive: int = 0
    ejections: int = 0
    ejected_until: float = -math.inf


class OutlierDetector:
    """
    Passive outlier detection over one service's backends, as Envoy's
    consecutive-5xx detection.

    After C{consecutive_failures} failed requests in a row (the proxy
    decides what a failure is: connect error, reset, timeout, 5xx) a backend
    is ejected: L{is_ejected} is true for C{ejection_time * n} seconds,
    where C{n} counts its ejections, capped at C{max_ejection_time}. Each
    full C{ejection_time} a backend spends back in service takes one off
    C{n} (Envoy decrements it on each sweep interval instead), so a flapping
    backend stays out longer and longer while a recovered one is forgiven.
    Ejection ends by itself when its time is up; the failure count starts
    again from zero. Failures reported while ejected (requests sent before)
    are ignored.

    At most C{floor(len(backends) * max_ejection_percent / 100)} backends
    are ejected at once, but at least one when the service has two or more
    backends (Envoy always allows the first ejection; it may then exceed the
    percentage by one host, we do not). A service's only backend is never
    ejected: with no other backend to send traffic to and no panic mode,
    ejection would just turn the service off; the circuit breaker is the
    tool for that. C{max_ejection_percent=0} disables ejection.

    @param clock: the time source, read with C{clock.seconds()}.
    @param backends: the service's backends.
    @param consecutive_failures: failures in a row that eject, >= 1.
    @param ejection_time: base ejection time in seconds, > 0.
    @param max_ejection_percent: 0..100.
    @param max_ejection_time: the longest ejection in seconds; defaults to
        C{max(300, ejection_time)} (Envoy's default is 300 s).
    @param service: the service's name, a field of the log events.
    @raise ValueError: a parameter is out of range.
    """

    def __init__(
        self,
        clock: IReactorTime,
        backends: Sequence[Backend],
        consecutive_failures: int = 5,
        ejection_time: float = 30.0,
        max_ejection_percent: int = 10,
        max_ejection_time: Optional[float] = None,
        service: str = "",
    ) -> None:
        if consecutive_failures < 1:
            raise ValueError("consecutive_failures must be at least 1")
        if ejection_time <= 0:
            raise ValueError("ejection_time must be positive")
        if not 0 <= max_ejection_percent <= 100:
            raise ValueError("max_ejection_percent must be within 0..100")
        if max_ejection_time is None:
            max_ejection_time = max(300.0, ejection_time)
        if max_ejection_time < ejection_time:
            raise ValueError("max_ejection_time cannot be below ejection_time")
        self._clock = clock
        self._service = service
        self._threshold = consecutive_failures
        self._base = ejection_time
        self._max_time = max_ejection_time
        self._hosts = {b: _Outlier() for b in backends}
        count = len(self._hosts)
        if count < 2 or max_ejection_percent == 0:
            self.max_ejected = 0
        else:
            self.max_ejected = max(1, count * max_ejection_percent // 100)

    def is_ejected(self, backend: Backend) -> bool:
        """
        Is C{backend} ejected now? Unknown backends never are.

        @rtype: L{bool}
        """
        host = self._hosts.get(backend)
        return host is not None and self._clock.seconds() < host.ejected_until

    def ejected_for(self, backend: Backend) -> float:
        """
        Seconds until C{backend}'s ejection ends; 0 if it is not ejected.
        """
        host = self._hosts.get(backend)
        if host is None:
            return 0.0
        return max(0.0, host.ejected_until - self._clock.seconds())

    def ejected_count(self) -> int:
        """The number of backends ejected now."""
        now = self._clock.seconds()
        return sum(now < h.ejected_until for h in self._hosts.values())

    def record_success(self, backend: Backend) -> None:
        """A request to C{backend} succeeded: resets its failure count."""
        host = self._hosts.get(backend)
        if host is not None:
            host.consecutive = 0

    def record_failure(self, backend: Backend) -> bool:
        """
        A request to C{backend} failed.

        @return: C{True} if this failure ejected it.
        """
        host = self._hosts.get(backend)
        now = self._clock.seconds()
        if host is None or now < host.ejected_until:
            return False
        host.consecutive += 1
        if host.consecutive < self._threshold or self.ejected_count() >= self.max_ejected:
            return False
        if host.ejections:
            forgiven = int((now - host.ejected_until) // self._base)
            host.ejections = max(0, host.ejections - forgiven)
        host.ejections += 1
        duration = min(self._base * host.ejections, self._max_time)
        host.ejected_until = now + duration
        host.consecutive = 0
        _log.warn(
            "backend {backend} ejected for {duration} s after {failures}"
            " consecutive failures (ejection {ejections})",
            event="backend_ejected",
            service=self._service,
            backend=backend.url,
            duration=duration,
            failures=self._threshold,
            ejections=host.ejections,
        )
        return True


# --- active health checks -----------------------------------------------------


@attrs.frozen
class HealthCheck:
    """
    The parameters of a service's active health check.

    @ivar path: the path probed on each backend, e.g. C{"/health"}.
    @ivar interval: seconds between rounds of probes, > 0.
    @ivar timeout: seconds before a probe counts as failed, > 0.
    @ivar healthy_threshold: passed probes in a row to turn healthy.
    @ivar unhealthy_threshold: failed probes in a row to turn unhealthy.
    @ivar expected_status: the statuses that pass, any container of
        L{int}: C{range(200, 400)} or C{frozenset({200, 204})}.
    """

    path: str = "/health"
    interval: float = 10.0
    timeout: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    expected_status: Container[int] = range(200, 400)


class ActiveHealthChecker:
    """
    Probes every backend of one service each C{check.interval} seconds.

    Each round runs one probe per backend, in parallel, each cut off after
    C{check.timeout} seconds on the injected clock (L{Deferred.addTimeout}),
    so a probe that never answers fails instead of wedging the loop. A probe
    that fires with a status outside C{check.expected_status}, fails, raises
    or times out counts as a failed check. No error ever reaches the
    L{LoopingCall}: it would stop for good. The next round starts on the
    next interval boundary after the current round ends.

    State changes are logged (C{"backend {backend} is now {state}"}) and
    passed to C{on_change(backend, healthy)}. Backends start healthy.

    @param clock: the reactor's time, for the loop and the timeouts.
    @param backends: the service's backends.
    @param check: a L{HealthCheck}, or any object with its attributes.
    @param probe: C{probe(backend, path, timeout)} returning a L{Deferred}
        firing with the response's status code (L{int}); see L{treq_probe}.
    @param on_change: called with C{(backend, healthy)} on each change.
    @param service: the service's name, a field of the log events.
    """

    def __init__(
        self,
        clock: IReactorTime,
        backends: Sequence[Backend],
        check: Any,
        probe: Probe,
        on_change: Optional[Callable[[Backend, bool], object]] = None,
        service: str = "",
    ) -> None:
        self._clock = clock
        self._service = service
        self._backends = tuple(backends)
        self._check = check
        self._probe = probe
        self._on_change = on_change
        self._states = {
            b: HealthState(check.healthy_threshold, check.unhealthy_threshold)
            for b in self._backends
        }
        self._loop = LoopingCall(self._round)
        self._loop.clock = clock
        self._inflight: set[Deferred] = set()

    def start(self) -> None:
        """Start probing now, then every interval. Idempotent."""
        if not self._loop.running:
            self._loop.start(self._check.interval, now=True).addErrback(
                lambda f: _log.failure("health check loop stopped", f)
            )

    def stop(self) -> None:
        """
        Stop probing and cancel probes in flight (their results are
        dropped). Leaves no delayed call behind. Idempotent.
        """
        if self._loop.running:
            self._loop.stop()
        for d in list(self._inflight):
            d.cancel()

    @property
    def running(self) -> bool:
        """Whether the checker is started."""
        return self._loop.running

    def is_healthy(self, backend: Backend) -> bool:
        """
        Is C{backend} healthy by the latest checks? Unknown backends are
        taken as healthy.
        """
        state = self._states.get(backend)
        return state is None or state.healthy

    def _round(self) -> Deferred:
        return gatherResults(
            [self._check_one(b) for b in self._backends], consumeErrors=True
        ).addErrback(lambda f: _log.failure("health check round failed", f))

    def _check_one(self, backend: Backend) -> Deferred:
        check = self._check
        d = maybeDeferred(self._probe, backend, check.path, check.timeout)
        d.addTimeout(check.timeout, self._clock)
        self._inflight.add(d)

        def verdict(result: Any) -> bool:
            self._inflight.discard(d)
            if isinstance(result, Failure):
                _log.debug(
                    "probe of {backend} failed: {error}",
                    backend=backend.url, error=result.getErrorMessage(),
                )
                return False
            return result in check.expected_status

        d.addBoth(verdict)
        d.addCallback(self._record, backend)
        d.addErrback(lambda f: _log.failure("health check of {backend} failed", f,
                                             backend=backend.url))
        return d

    def _record(self, ok: bool, backend: Backend) -> None:
        if not self._loop.running:
            return  # stopped: results of cancelled probes are not verdicts
        if self._states[backend].record(ok):
            state = "healthy" if ok else "unhealthy"
            _log.info(
                "backend {backend} is now {state}",
                event="backend_health",
                service=self._service,
                backend=backend.url,
                state=state,
            )
            if self._on_change is not None:
                self._on_change(backend, ok)


# --- the real probe -----------------------------------------------------------


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False  # no "Starting factory" log lines on every probe


class _ProbePool(HTTPConnectionPool):
    _factory = _QuietFactory


def treq_probe(reactor: IReactorTime, client: Any = None) -> Probe:
    """
    A probe doing C{GET <backend.url><path>} with treq.

    Redirects are not followed (a 3xx is the probe's answer); the body is
    read and discarded. Without C{client}, probes use their own
    L{treq.client.HTTPClient} over an L{Agent} with a non-persistent pool
    (each probe opens a fresh connection, so it also checks that the backend
    accepts connections, and none is left idle) and a cookie jar that keeps
    no cookies.

    @param reactor: the reactor, for connections and the timeout.
    @param client: a L{treq.client.HTTPClient}, or L{None}.
    @return: C{probe(backend, path, timeout)} returning a L{Deferred} that
        fires with the status code (L{int}), or fails with the connection
        error, or with a cancellation error when the response headers take
        more than C{timeout} seconds (the checker's own timeout also covers
        the body).
    """
    if client is None:
        pool = _ProbePool(reactor, persistent=False)
        jar = IndexableCookieJar(DefaultCookiePolicy(allowed_domains=[]))
        agent = Agent.usingEndpointFactory(reactor, BackendEndpoints(reactor, 30.0), pool=pool)
        client = HTTPClient(agent, cookiejar=jar)

    def probe(backend: Backend, path: str, timeout: float) -> Deferred:
        url = backend.url + path
        d = client.get(url, timeout=timeout, allow_redirects=False, reactor=reactor)
        return d.addCallback(lambda r: treq.content(r).addCallback(lambda _: r.code))

    return probe

