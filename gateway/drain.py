"""
Graceful shutdown: finish the requests in flight, then close.

On C{SIGTERM} twistd stops the service tree. The listeners stop first (no
new connections are accepted; with socket activation the socket itself
stays open in systemd, so new connections wait in its backlog for the next
process). Then L{Drainer.drain}:

  1. marks every open HTTP/1.1 connection non-persistent (responses not yet
     started, and all that start from now on, get C{Connection: close}) and
     closes the idle ones;
  2. every 50 ms, closes connections that have become idle (HTTP/1.1: no
     request; HTTP/2: no stream). A connection that has not sent its first
     request yet gets a second to do so: it may have been accepted just
     before the listener stopped, its request on the way;
  3. at C{drain_timeout} seconds, aborts whatever is left.

The backend connection pools are closed after that
(L{gateway.tap.GatewayService.stopService}), and twistd exits 0.

Connections are tracked by the site's protocol factory (L{Drainer.install}),
which wraps each connection's channel; nothing is done per request.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol

from gateway.config import Extension, duration, register
from gateway.proxy import GatewayChannel

_log = Logger()

#: Seconds in-flight requests get to finish on shutdown, when the file
#: sets none. systemd's C{TimeoutStopSec} must be longer (the unit says 45).
DEFAULT_DRAIN_TIMEOUT = 30.0

#: Seconds between two looks for connections that have become idle.
IDLE_CHECK_INTERVAL = 0.05

#: Seconds a connection that has not sent a request yet is given to send
#: one once draining starts.
FIRST_REQUEST_GRACE = 1.0

register(
    "top",
    Extension(
        "drain_timeout",
        lambda where, value, context: duration(where, value),
        DEFAULT_DRAIN_TIMEOUT,
    ),
)


class _DrainingChannel(GatewayChannel):
    """
    The gateway's HTTP/1.1 channel (with its header limits); once draining, every response it starts
    says C{Connection: close} and the connection closes after it.

    @ivar served: requests answered on this connection.
    """

    def __init__(self, drainer: "Drainer") -> None:
        super().__init__()
        self._drainer = drainer
        self.served = 0

    def checkPersistence(self, request, version) -> bool:
        if self._drainer.draining:
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            return False
        return super().checkPersistence(request, version)

    def requestDone(self, request) -> None:
        self.served += 1
        super().requestDone(request)


class _TrackedChannel(_GenericHTTPChannelProtocol):
    """
    Twisted's HTTP/1.1-or-HTTP/2 channel, registering itself with a
    L{Drainer} while connected.
    """

    def __init__(self, drainer: "Drainer") -> None:
        super().__init__(_DrainingChannel(drainer))
        self._drainer = drainer
        self.accepted = 0.0

    def makeConnection(self, transport) -> None:
        # (the proxied makeConnection calls the channel's connectionMade,
        # not this object's)
        self.accepted = self._drainer._clock.seconds()
        self._drainer.connections.add(self)
        super().makeConnection(transport)

    def connectionLost(self, reason) -> None:
        self._drainer.connections.discard(self)
        super().connectionLost(reason)


def busy(protocol: _GenericHTTPChannelProtocol) -> bool:
    """Whether a client connection has a request or stream in progress."""
    channel = protocol._channel
    if isinstance(channel, HTTPChannel):
        return bool(channel.requests)
    return bool(getattr(channel, "streams", None))


def idle(protocol: _TrackedChannel, now: float) -> bool:
    """
    Whether a client connection can be closed now without failing a
    request: nothing in progress, and either it has served a request
    (an idle keep-alive connection) or it has sent nothing for
    L{FIRST_REQUEST_GRACE} seconds. (A connection accepted just before the
    listener stopped may have its first request on the way.)
    """
    if busy(protocol):
        return False
    if getattr(protocol._channel, "served", 0):
        return True
    return now - protocol.accepted >= FIRST_REQUEST_GRACE


def _transport(protocol: _GenericHTTPChannelProtocol):
    return getattr(protocol._channel, "transport", None)


class Drainer:
    """
    Tracks a site's client connections and closes them gracefully.

    @param clock: C{IReactorTime}.
    @ivar connections: the open client connections.
    @ivar draining: True once L{drain} was called.
    """

    def __init__(self, clock) -> None:
        self._clock = clock
        self.connections: set = set()
        self.draining = False

    def install(self, site) -> None:
        """Track the connections of C{site} (a L{twisted.web.server.Site})."""
        site.protocol = lambda: _TrackedChannel(self)

    def _wind_down(self, protocol, now: float) -> None:
        channel = protocol._channel
        if isinstance(channel, HTTPChannel) and channel.requests:
            # (not on a connection between requests: it would drop the next
            # one unread; checkPersistence answers that with close)
            channel.persistent = False
            for request in channel.requests:
                if not request.startedWriting:
                    request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        if idle(protocol, now) and _transport(protocol) is not None:
            _transport(protocol).loseConnection()

    def drain(self, timeout: float) -> Deferred:
        """
        Close every tracked connection once its requests have finished, or
        after C{timeout} seconds.

        @param timeout: seconds; requests still in flight then are cut.
        @return: a Deferred firing with the number of connections that
            had to be aborted, once all connections are closed. It never
            fails.
        """
        self.draining = True
        now = self._clock.seconds()
        for protocol in list(self.connections):
            self._wind_down(protocol, now)
        if not self.connections:
            return succeed(0)
        in_flight = sum(1 for p in self.connections if busy(p))
        _log.info(
            "draining {connections} client connections ({busy} busy) for up to {timeout}s",
            connections=len(self.connections),
            busy=in_flight,
            timeout=timeout,
        )
        deadline = self._clock.seconds() + timeout
        done: Deferred = Deferred()
        state = {"aborted": 0}

        def check() -> None:
            now = self._clock.seconds()
            if not self.connections or (state["aborted"] and now >= deadline + 1.0):
                # (aborted connections are gone by the next turn; never wait
                # more than a second for them)
                loop.stop()
                return
            if now >= deadline and not state["aborted"]:
                state["aborted"] = len(self.connections)
                _log.warn(
                    "drain timeout: aborting {count} connections still in flight",
                    count=state["aborted"],
                )
                for protocol in list(self.connections):
                    if _transport(protocol) is not None:
                        _transport(protocol).abortConnection()
                return
            for protocol in list(self.connections):
                if idle(protocol, now) and _transport(protocol) is not None:
                    _transport(protocol).loseConnection()

        loop = LoopingCall(check)
        loop.clock = self._clock
        finished = loop.start(IDLE_CHECK_INTERVAL, now=False)
        finished.addErrback(lambda f: _log.failure("drain loop failed", f))
        finished.addBoth(lambda _: done.callback(state["aborted"]))
        return done

    def in_flight(self) -> Optional[int]:
        """The number of connections with a request in progress."""
        return sum(1 for p in self.connections if busy(p))
