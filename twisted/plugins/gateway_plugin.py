# This file imports nothing of the gateway's: twistd reads every plugin file
# to list them, and must not pay for (or fail on) importing the gateway.
from twisted.application.reactors import Reactor
from twisted.application.service import ServiceMaker

gateway = ServiceMaker("txgateway", "gateway.tap", "HTTP API gateway.", "gateway")

# twistd --reactor=gateway: epoll, trying each write before polling for it.
gatewayReactor = Reactor(
    "gateway", "gateway.reactor", "epoll, writing before polling for writability (txgateway)"
)
