"""
The twistd plugin's options and service tree.

C{twistd -n gateway --config etc/gateway.yaml} (or C{twist gateway ...})
builds the tree with L{makeService}::

    GatewayService (MultiService)
      ├─ health checks      (HealthChecks: one LoopingCall per service with a health_check)
      ├─ filter services    (each request filter's C{service}, if any)
      ├─ admin listener     (StreamServerEndpointService, admin.listen)
      └─ main listener      (StreamServerEndpointService, listen)  added last, stops first
"""

from __future__ import annotations

import os
import sys

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from gateway.config import Config, ConfigError, load_config

_log = Logger()

#: Where the config is looked for when --config is not given.
DEFAULT_CONFIG_PATHS = ("/etc/txgateway/gateway.yaml",)


def summary(config: Config) -> str:
    """A human-readable summary of a valid config, as printed by --check."""
    lines = [f"{config.source}: OK", f"listen: {config.listen}"]
    lines.append(f"admin: {config.admin.listen or 'off'}")
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
    ]
    optFlags = [
        ["check", None, "Validate the config file, print a summary or the errors, and exit."],
    ]

    def postOptions(self) -> None:
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
        if self["listen"]:
            try:
                serverFromString(_reactor(), self["listen"])
            except (ValueError, KeyError, TypeError) as e:
                raise usage.UsageError(f"--listen: bad endpoint {self['listen']!r}: {e}")
        if self["check"]:
            print(summary(config))
            raise SystemExit(0)
        self.config = config


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
    the listeners; on stop, the listeners stop first (they were added last),
    then idle backend connections are closed.

    @ivar gateway: the L{gateway.state.Gateway}.
    """

    def __init__(self, gateway) -> None:
        super().__init__()
        self.gateway = gateway

    def stopService(self):
        d = super().stopService()
        d.addCallback(lambda _: self.gateway.close())
        return d


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


def makeService(options: Options, reactor=None) -> GatewayService:
    """
    Build the service tree from parsed options.

    @param reactor: the reactor to run on; the global one if None.
    @raise ValueError: an endpoint string cannot be parsed.
    """
    from gateway.admin import admin_site
    from gateway.proxy import GatewaySite
    from gateway.state import Gateway

    if reactor is None:
        reactor = _reactor()
    config: Config = getattr(options, "config", None) or load_config(options["config"])
    gateway = Gateway(reactor, config)
    root = GatewayService(gateway)
    # Before the listeners: probes start before the first client request.
    HealthChecks(gateway).setServiceParent(root)
    for f in gateway.filters:  # their services start before the listeners
        service = getattr(f, "service", None)
        if service is not None:
            service.setServiceParent(root)

    if config.admin.listen:
        admin = StreamServerEndpointService(
            serverFromString(reactor, with_backlog(config.admin.listen)), admin_site(gateway)
        )
        admin.setName("admin-listener")
        admin._raiseSynchronously = True
        admin.setServiceParent(root)

    # twistd re-raises the signal that stopped the reactor once it has
    # stopped, so a clean SIGTERM shutdown would exit with -15; a gateway
    # that drained and stopped cleanly exits 0, as systemd expects.
    reactor.addSystemEventTrigger(
        "after", "shutdown", lambda: setattr(reactor, "_exitSignal", None)
    )

    listen = options["listen"] or config.listen
    listener = StreamServerEndpointService(
        serverFromString(reactor, with_backlog(listen)), GatewaySite(gateway)
    )
    listener.setName("listener")
    listener._raiseSynchronously = True
    listener.setServiceParent(root)
    _log.info(
        "txgateway serving {routes} routes on {listen}, admin on {admin}",
        routes=len(config.routes),
        listen=listen,
        admin=config.admin.listen,
    )
    return root
