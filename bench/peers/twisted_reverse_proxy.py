"""
Peer: Twisted's own C{twisted.web.proxy.ReverseProxyResource}, as shipped.

It is the baseline a Twisted gateway should beat, not a model: it opens a new
HTTP/1.0 upstream connection per request (it sends C{Connection: close}; there
is no pool, so unlike the other peers it has no keep-alive upstream), reads
the whole request body before forwarding, writes the response back in the
chunks it receives, and collapses repeated request headers.  Access logging
is off, as for every other peer.

    python bench/peers/twisted_reverse_proxy.py --port 8080 --origin http://127.0.0.1:8081
"""

import argparse
from urllib.parse import urlsplit

from twisted.internet import endpoints, reactor
from twisted.web.proxy import ReverseProxyResource
from twisted.web.server import Site


class QuietSite(Site):
    def log(self, request):
        """
        No access log (nginx and aiohttp peers run without one too).
        """


def main():
    parser = argparse.ArgumentParser(description="Twisted ReverseProxyResource peer")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--origin", required=True, help="http://host:port")
    args = parser.parse_args()
    origin = urlsplit(args.origin)
    root = ReverseProxyResource(origin.hostname, origin.port, b"")
    site = QuietSite(root)
    site.noisy = False
    endpoint = endpoints.TCP4ServerEndpoint(
        reactor, args.port, backlog=4096, interface="127.0.0.1"
    )
    endpoint.listen(site).addErrback(lambda f: (print(f), reactor.stop()))
    reactor.run()


if __name__ == "__main__":
    main()
