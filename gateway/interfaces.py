"""
The interfaces the gateway's parts meet at.

Interfaces have no C{self} in their method signatures; implementations are
checked with L{zope.interface.verify.verifyObject} in the tests.
"""

from zope.interface import Attribute, Interface


class IBalancer(Interface):
    """
    Chooses the backend of a service that serves the next request.

    A balancer is built once per service (and rebuilt on a config reload
    that changes the service) from the service's backends in config order.
    It keeps whatever state its policy needs (a cursor, current weights, a
    hash ring) but never decides health: the caller passes the backends that
    are usable right now (healthy, not ejected, circuit not open).
    """

    def pick(available, key=None):
        """
        Choose one backend among C{available}.

        @param available: the usable backends, a subsequence of the backends
            the balancer was built with, in config order.
        @type available: L{typing.Sequence} of L{gateway.config.Backend}
        @param key: the hash key of the request (client IP, a header or
            cookie value, or the path), for balancers that hash; others
            ignore it.
        @type key: L{bytes} or L{None}

        @return: one element of C{available}, or L{None} when it is empty.
        """


class IRequestFilter(Interface):
    """
    One step of the proxy pipeline run before a request is forwarded.
    """

    name = Attribute("L{str}: the filter's name, used in logs and metrics.")
