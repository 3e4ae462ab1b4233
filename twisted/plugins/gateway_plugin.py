# This file imports nothing of the gateway's: twistd reads every plugin file
# to list them, and must not pay for (or fail on) importing the gateway.
from twisted.application.service import ServiceMaker

gateway = ServiceMaker("txgateway", "gateway.tap", "HTTP API gateway.", "gateway")
