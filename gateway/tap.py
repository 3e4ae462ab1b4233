"""
The twistd plugin's options and service tree.

C{twistd -n gateway --config etc/gateway.yaml} (or C{twist gateway ...})
builds the tree with L{makeService}::

    GatewayService (MultiService)
      ├─ admin listener     (StreamServerEndpointService, admin.listen)
      └─ main listener      (StreamServerEndpointService, listen)  added last, stops first
"""

from __future__ import annotations

import os
import sys

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
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
        lines.append(
            f"service {name}: {service.balancer}, "
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

    # Services of request filters (GC loops, log flushers, feeds) start
    # before the listeners and stop after them.
    for request_filter in gateway.filters:
        service = getattr(request_filter, "service", None)
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
