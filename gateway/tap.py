"""
The twistd plugin's options and service tree.

C{twistd -n gateway --config etc/gateway.yaml} (or C{twist gateway ...})
builds the tree with L{makeService}::

    GatewayService (MultiService)
      ├─ health checks      (HealthChecks: one LoopingCall per service with a health_check)
      ├─ filter services    (each request filter's C{service}, if any)
      ├─ config watcher     (gateway.reload: poll + SIGHUP)
      ├─ admin listener     (StreamServerEndpointService, admin.listen)
      └─ main listener      (StreamServerEndpointService, listen)  added last, stops first

With C{--workers N} (N > 1) this process is the master: its last child is
a L{gateway.workers.WorkerSupervisor} in place of the main listener, and
each worker runs this plugin with C{--worker-fd} (no admin listener, the
inherited socket as its listener). See L{gateway.workers}.

On stop (C{SIGTERM}) the listeners stop first, then open client
connections drain for up to C{drain_timeout} seconds (L{gateway.drain}),
then backend pools close; twistd exits 0. Under systemd (C{Type=notify})
C{READY=1} is sent once the listeners listen and the reactor runs (its
C{SIGTERM} handler installed), and C{STOPPING=1} when the stop begins
(L{gateway.sdnotify}). Then the garbage collector is settled
(L{gateway.heap}), whose malloc thresholds are set as the service starts.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from gateway.config import Config, ConfigError, load_config
from gateway.heap import CollectorTuning, default_mallopt, tuning_enabled
from gateway.reactor import install_unless_chosen

_log = Logger()

#: Where the config is looked for when --config is not given.
DEFAULT_CONFIG_PATHS = ("/etc/txgateway/gateway.yaml",)


def summary(config: Config) -> str:
    """A human-readable summary of a valid config, as printed by --check."""
    lines = [f"{config.source}: OK", f"listen: {config.listen}"]
    lines.append(f"admin: {config.admin.listen or 'off'}")
    workers = config.options.get("workers", 1)
    if workers != 1:
        lines.append(f"workers: {workers}")
    tls = config.options.get("tls")
    if tls is not None:
        names = "; ".join(",".join(c.names) or c.cert_path for c in tls.certificates)
        lines.append(f"tls: {names}" + (" (h2 offered)" if tls.http2 else ""))
    for name, service in config.services.items():
        extras = [service.balancer + (f" on {service.hash_on}" if service.hash_on else "")]
        if service.health_check is not None:
            check = service.health_check
            extras.append(f"health check {check.path} every {check.interval:g}s")
        if service.passive_health is not None:
            extras.append(f"ejection after {service.passive_health.consecutive_failures} failures")
        if service.circuit_breaker is not None:
            extras.append("circuit breaker")
        lines.append(
            f"service {name}: {', '.join(extras)}: "
            + ", ".join(b.url for b in service.backends)
        )
    for route in config.routes:
        match = route.match
        extra = []
        if match.host:
            extra.append(f"host {match.host}")
        if match.methods:
            extra.append("methods " + ",".join(sorted(match.methods)))
        if match.headers:
            extra.append("headers " + ",".join(n.decode() for n, _ in match.headers))
        lines.append(
            f"route {route.name}: {match.path_prefix} -> {route.service}"
            + (f" ({'; '.join(extra)})" if extra else "")
        )
    return "\n".join(lines)


class Options(usage.Options):
    """Command-line options of C{twistd gateway}."""

    synopsis = "[options]"
    longdesc = "Run txgateway, an HTTP API gateway, from a YAML config file."
    optParameters = [
        ["config", "c", None, "Path of the YAML config file."],
        ["listen", "l", None, "Twisted endpoint for client traffic (overrides the file), e.g. tcp:8080."],
        ["workers", "w", None,
         "Worker processes serving the listener: a number, or auto for one per CPU "
         "(overrides the file's workers; default 1, a single process)."],
        ["worker-fd", None, None, "(internal) Serve the listening socket inherited as this fd, as a worker."],
        ["worker-index", None, "0", "(internal) This worker's number."],
    ]
    optFlags = [
        ["check", None, "Validate the config file, print a summary or the errors, and exit."],
    ]

    def parseOptions(self, options=None) -> None:
        """
        Parse the command line; refuse bad options or a bad config file with
        exit status 1 and the reason on standard error.

        twistd before Twisted 26 prints a L{usage.UsageError} and exits 0,
        which would tell systemd (and scripts) that a refused config started;
        so the error is turned into L{SystemExit} here, on every Twisted.

        @raise SystemExit: with the message, on a usage or config error.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"{os.path.basename(sys.argv[0])} gateway: {e}")

    def postOptions(self) -> None:
        # Before anything imports the global reactor: with no --reactor
        # given, the gateway runs on its own (gateway.reactor).
        install_unless_chosen()
        path = self["config"]
        if path is None:
            path = next((p for p in DEFAULT_CONFIG_PATHS if os.path.exists(p)), None)
            if path is None:
                raise usage.UsageError("--config PATH is required (no default config file found)")
            self["config"] = path
        try:
            config = load_config(path)
        except ConfigError as e:
            if self["check"]:
                print(str(e), file=sys.stderr)
                raise SystemExit(1)
            raise usage.UsageError(str(e))
        try:
            self["workers"] = _workers(self["workers"] or config.options.get("workers", 1))
        except ValueError as e:
            raise usage.UsageError(f"--workers: {e}")
        if self["worker-fd"] is not None:
            self["worker-fd"] = int(self["worker-fd"])
            self["worker-index"] = int(self["worker-index"])
            self["workers"] = 1
        if self["listen"]:
            try:
                serverFromString(_reactor(), self["listen"])
            except (ValueError, KeyError, TypeError, IndexError) as e:
                # (IndexError: a systemd: index that nothing was passed for)
                raise usage.UsageError(f"--listen: bad endpoint {self['listen']!r}: {e}")
        if self["check"]:
            print(summary(config))
            raise SystemExit(0)
        if self["worker-fd"] is None:
            self._check_listener(self["listen"] or config.listen)
        self.config = config

    def _check_listener(self, listen: str) -> None:
        """
        Refuse, before anything starts, a listener that the processes to be
        started cannot serve (as L{makeService} would, with a traceback).

        @raise usage.UsageError: from L{_check_worker_endpoint} or
            L{gateway.workers.check_inherited_group}.
        """
        from gateway.workers import check_inherited_group

        if self["workers"] <= 1 and not listen.lower().startswith("systemd:"):
            return  # (nothing to check: not parsed twice)
        try:
            endpoint = serverFromString(_reactor(), with_backlog(listen))
        except Exception:
            return  # makeService says what is wrong with it
        if self["workers"] > 1:
            _check_worker_endpoint(endpoint, listen)
        try:
            check_inherited_group(endpoint, self["workers"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def _workers(value) -> int:
    from gateway.workers import parse_workers

    return parse_workers(value)


def _reactor():
    from twisted.internet import reactor

    return reactor


#: The listen backlog given to TCP and TLS listeners whose endpoint string
#: names none: Twisted's default of 50 drops connections under bursts.
DEFAULT_BACKLOG = 1024


def with_backlog(description: str) -> str:
    """
    C{description} with C{backlog=DEFAULT_BACKLOG} added if it is a TCP or
    TLS endpoint that does not set a backlog.
    """
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "ssl") and "backlog=" not in description:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    return description


class GatewayService(MultiService):
    """
    The gateway's root service: its children are the periodic services and
    the listeners; on stop, the listeners and health checks stop first,
    then open client connections drain, then the services of the request
    filters stop (L{after_drain}: the access-log file, Redis clients,
    fetchers, which the requests still draining use), then idle backend
    connections are closed.

    @ivar after_drain: the children that stop after the drain, in the
        order they were added.

    @ivar gateway: the L{gateway.state.Gateway}.
    @ivar drainer: the L{gateway.drain.Drainer} of the main listener, or
        None (the master of workers has no client connections).
    @ivar drain_timeout: seconds given to in-flight requests on stop.
    @ivar collector: a L{gateway.heap.CollectorTuning} started with the
        service and settled once the listeners listen and the reactor runs,
        or None (tests, which share one process).
    """

    def __init__(
        self,
        gateway,
        drainer=None,
        drain_timeout: float = 0.0,
        notify=None,
        collector: Optional[CollectorTuning] = None,
    ) -> None:
        super().__init__()
        self.gateway = gateway
        self.drainer = drainer
        self.drain_timeout = drain_timeout
        self._notify = notify or (lambda state: None)
        self.collector = collector
        #: Callables returning a Deferred that fires when a listener
        #: listens, called once the children started (for READY=1).
        self.readiness: list = []
        self.after_drain: list = []

    def startService(self) -> None:
        if self.collector is not None:
            self.collector.start()
        super().startService()
        ready = gatherResults([when() for when in self.readiness], consumeErrors=True)
        # Not before the reactor runs: twistd starts services before it
        # installs its SIGTERM handler, and a listener listens at once, so a
        # manager that stopped the gateway as soon as it read READY=1 could
        # kill it with the default handler (no drain, exit -15).
        ready.addCallback(lambda _: _when_running(self.gateway.reactor))
        ready.addCallback(lambda _: self._notify("READY=1"))
        if self.collector is not None:
            # Still before the reactor's first poll; settle never raises.
            ready.addCallback(lambda _: self.collector.settle())
        ready.addErrback(lambda f: _log.failure("a listener failed to start", f))

    def stopService(self):
        self._notify("STOPPING=1")
        Service.stopService(self)

        def stop(services) -> DeferredList:
            # (As MultiService.stopService: the last added first, all at once.)
            return DeferredList([maybeDeferred(s.stopService) for s in reversed(services)])

        d = stop([s for s in self if s not in self.after_drain])
        if self.drainer is not None:
            d.addCallback(lambda _: self.drainer.drain(self.drain_timeout))
        d.addCallback(lambda _: stop([s for s in self if s in self.after_drain]))
        d.addCallback(lambda _: self.gateway.close())
        d.addErrback(lambda f: _log.failure("stopping the gateway failed", f))
        return d


def _when_running(reactor) -> Deferred:
    """
    A Deferred firing once C{reactor} runs (at once if it does): after
    its C{"startup"} event, when twistd's signal handlers are installed.
    """
    running: Deferred = Deferred()
    reactor.callWhenRunning(running.callback, None)
    return running


class HealthChecks(Service):
    """
    Runs the active health checks of every service while the gateway runs,
    following reloads (L{gateway.state.Gateway.start}).
    """

    name = "health-checks"

    def __init__(self, gateway) -> None:
        self.gateway = gateway

    def startService(self) -> None:
        super().startService()
        self.gateway.start()

    def stopService(self):
        self.gateway.stop()
        return super().stopService()


def _listener(reactor, endpoint, factory, name: str) -> StreamServerEndpointService:
    service = StreamServerEndpointService(endpoint, factory)
    service.setName(name)
    service._raiseSynchronously = True
    return service


def _when_listening(service: StreamServerEndpointService) -> Deferred:
    """
    A Deferred that fires when C{service}, started, listens (its own
    Deferred's result is passed through untouched: its C{stopService}
    needs the port).
    """
    done: Deferred = Deferred()

    def fire(result):
        done.callback(None)
        return result

    service._waitingForPort.addBoth(fire)
    return done


def _check_worker_endpoint(endpoint, listen: str) -> None:
    """
    @raise usage.UsageError: C{endpoint} is not one whose socket workers
        can share (TCP, or an inherited C{systemd:} socket).
    """
    from twisted.internet.endpoints import (
        AdoptedStreamServerEndpoint,
        TCP4ServerEndpoint,
        TCP6ServerEndpoint,
    )

    if not isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint, AdoptedStreamServerEndpoint)):
        raise usage.UsageError(
            f"--workers needs a tcp:, tcp6: or systemd: listener, not {listen!r} "
            "(for TLS with workers, use the config's tls: key)"
        )


def makeService(
    options: Options, reactor=None, collector: Optional[CollectorTuning] = None
) -> GatewayService:
    """
    Build the service tree from parsed options.

    @param reactor: the reactor to run on; the global one if None.
    @param collector: the tuning of this process's garbage collector and
        malloc (L{gateway.heap}); if None, a new one when C{reactor} is None too
        (twistd's call) unless C{TXGATEWAY_GC_TUNING=off}, else none (a
        test's call, in a process it shares).
    @raise ValueError: an endpoint string cannot be parsed.
    @raise usage.UsageError: the listener cannot be served by this many
        workers (L{gateway.workers.check_inherited_group}).
    """
    from gateway.admin import admin_site
    from gateway.drain import Drainer
    from gateway.proxy import GatewaySite
    from gateway.reload import ConfigWatcher
    from gateway.sdnotify import notify
    from gateway.state import Gateway

    if reactor is None:
        reactor = _reactor()
        if collector is None and tuning_enabled(os.environ):
            collector = CollectorTuning(mallopt=default_mallopt())
    config: Config = getattr(options, "config", None) or load_config(options["config"])
    gateway = Gateway(reactor, config)
    worker_fd = options.get("worker-fd")
    workers = options.get("workers") or 1
    is_master = worker_fd is None and workers > 1
    drain_timeout = config.options.get("drain_timeout", 30.0)
    drainer = None if is_master else Drainer(reactor)
    root = GatewayService(
        gateway,
        drainer,
        drain_timeout,
        notify=notify if worker_fd is None else None,
        collector=collector,
    )

    if not is_master:
        # Before the listeners: health probes start before the first client
        # request, and the services of request filters (GC loops, fetchers,
        # flushers) start before them and stop after the drain. A master
        # serves no traffic: its workers run these.
        HealthChecks(gateway).setServiceParent(root)
        for request_filter in gateway.filters:
            service = getattr(request_filter, "service", None)
            if service is not None:
                service.setServiceParent(root)
                root.after_drain.append(service)

    watcher = ConfigWatcher(
        gateway,
        options["config"],
        config.options.get("config_poll_interval", 5.0),
        reactor,
        collector=collector,
    )
    watcher.setServiceParent(root)
    #: (for the admin resources) the watcher's last refused file.
    gateway.config_watcher = watcher

    admin_root = None
    if config.admin.listen and worker_fd is None:
        site = admin_site(gateway)
        admin_root = site.resource
        admin = _listener(
            reactor, serverFromString(reactor, with_backlog(config.admin.listen)), site, "admin-listener"
        )
        admin.setServiceParent(root)

    # twistd re-raises the signal that stopped the reactor once it has
    # stopped, so a clean SIGTERM shutdown would exit with -15; a gateway
    # that drained and stopped cleanly exits 0, as systemd expects.
    reactor.addSystemEventTrigger(
        "after", "shutdown", lambda: setattr(reactor, "_exitSignal", None)
    )

    listen = options["listen"] or config.listen
    if worker_fd is not None:
        from gateway.workers import BackendGauges, ParentWatch, adopted_endpoint, count_requests

        endpoint = adopted_endpoint(reactor, worker_fd)
        ParentWatch(reactor).setServiceParent(root)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            count_requests(gateway, options["worker-index"])
            BackendGauges(gateway, reactor).setServiceParent(root)
    else:
        from gateway.workers import check_inherited_group

        endpoint = serverFromString(reactor, with_backlog(listen))
        try:
            check_inherited_group(endpoint, workers)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    if is_master:
        from gateway.workers import (
            MergedMetricsResource,
            WorkersResource,
            WorkerSupervisor,
            worker_command,
        )

        _check_worker_endpoint(endpoint, listen)
        supervisor = WorkerSupervisor(
            reactor,
            endpoint,
            workers,
            lambda index: worker_command(options, index),
            drain_timeout,
        )
        watcher.signal_observers.append(supervisor.signal_workers)
        if admin_root is not None:
            admin_root.putChild(b"workers", WorkersResource(supervisor))
            admin_root.putChild(b"metrics", MergedMetricsResource(supervisor))
        supervisor.setName("workers")
        supervisor.setServiceParent(root)
        root.readiness.append(lambda: supervisor.ready)
    else:
        site = GatewaySite(gateway)
        drainer.install(site)
        factory = site
        if config.options.get("tls") is not None:
            from gateway.tls import wrap_listener

            factory = wrap_listener(gateway, site)
        listener = _listener(reactor, endpoint, factory, "listener")
        listener.setServiceParent(root)
        root.readiness.append(lambda: _when_listening(listener))

    if worker_fd is not None:
        _log.info(
            "txgateway worker {index} serving {routes} routes on the master's socket",
            index=options["worker-index"],
            routes=len(config.routes),
        )
    else:
        _log.info(
            "txgateway serving {routes} routes on {listen}, admin on {admin}, {workers} worker(s)",
            routes=len(config.routes),
            listen=listen,
            admin=config.admin.listen,
            workers=workers,
        )
    return root
