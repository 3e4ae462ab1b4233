"""
A request filter that fails on demand, for tests only: never listed in
L{gateway.config.FEATURE_MODULES}. Tests register it with L{register} in
their own process, or in a gateway process they start (see
C{tests/test_filters_e2e.py}).

A request with C{X-Test-Raise: request} makes C{on_request} raise;
C{deferred}, return a failed Deferred; C{response}, makes C{on_response}
raise; C{unrouted}, makes C{on_unrouted} raise (for a request no route
matches).
"""

from twisted.internet.defer import fail

from gateway import pipeline

NAME = "test_raise"
ORDER = 45


class RaisingFilter:
    name = NAME

    def __init__(self, gateway) -> None:
        pass

    @staticmethod
    def _mode(request):
        values = request.requestHeaders.getRawHeaders(b"x-test-raise")
        return values[0] if values else None

    def on_request(self, request, context):
        mode = self._mode(request)
        if mode == b"request":
            raise RuntimeError("test filter raised on request")
        if mode == b"deferred":
            return fail(RuntimeError("test filter failed its Deferred"))
        return None

    def on_unrouted(self, request, context):
        if self._mode(request) == b"unrouted":
            raise RuntimeError("test filter raised on an unrouted request")

    def on_response(self, request, context):
        if self._mode(request) == b"response":
            raise RuntimeError("test filter raised on response")


def register() -> None:
    pipeline.register_filter(ORDER, NAME, RaisingFilter)


def unregister() -> None:
    pipeline.FILTERS.pop(NAME, None)
