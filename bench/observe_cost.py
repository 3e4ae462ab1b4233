"""
What recording one request costs the reactor thread, per observer.

    python bench/observe_cost.py [--n 100000]

Builds a gateway from a small config with a fake clock (no sockets), then
times, over N finished requests of a realistic mix (several routes, both
backends, a few statuses), each piece the gateway runs per request:

  - metrics: L{GatewayMetrics.observe} (Prometheus counters and histograms)
  - feed: L{RequestFeed.observe} (the dashboard's ring and window)
  - access event: L{AccessLog} building the fields and emitting the event to
    one observer that drops it, then the same with twist's JSON observer
    writing to a temporary file (formatting and writing each event is the
    observer's cost, but it runs on the reactor thread too)
  - trace filter: the C{observe} filter's C{on_request} (parse the incoming
    C{traceparent}, make a span ID, queue the upstream headers)
  - all: every request observer the gateway registers, plus the filter,
    with the access event going to the JSON observer

Prints microseconds per request (best of 5 runs) and, with --json, the
same as JSON.

With --e2e it also runs a real twistd gateway and demo backend on
127.0.0.1 twice, with observability on (the default config: access event
to twistd's text log file, dashboard, trace context) and then off (access
event, dashboard and tracing disabled; metrics stay), sends the same
bounded number of keep-alive requests to each, and reports the gateway
process's CPU time per request (user + system, from /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.task import Clock  # noqa: E402
from twisted.logger import LogPublisher, jsonFileLogObserver  # noqa: E402
from twisted.web.http_headers import Headers  # noqa: E402

from gateway.accesslog import AccessLog  # noqa: E402
from gateway.config import parse_config  # noqa: E402
from gateway.observe import find  # noqa: E402
from gateway.proxy import RequestContext  # noqa: E402
from gateway.state import Gateway  # noqa: E402

CONFIG = """
listen: tcp:0
admin: {listen: "tcp:0"}
services:
  users: {backends: [{url: "http://127.0.0.1:9001"}, {url: "http://127.0.0.1:9002"}]}
  orders: {backends: [{url: "http://127.0.0.1:9003"}]}
routes:
  - {name: users-api, match: {path_prefix: /api/users}, service: users}
  - {name: orders-api, match: {path_prefix: /api/orders}, service: orders}
  - {name: orders-v2, match: {path_prefix: /api/v2/orders}, service: orders}
"""


def contexts(config, n: int) -> list:
    routes = config.routes
    statuses = (200, 200, 200, 200, 201, 304, 404, 502)
    out = []
    for i in range(n):
        route = routes[i % len(routes)]
        backends = config.services[route.service].backends
        started = 1_700_000_000.0 + i * 0.001
        c = RequestContext(f"{i:032x}", b"GET" if i % 5 else b"POST", b"/api/users/%d" % (i % 1000),
                           "192.0.2.%d" % (i % 250), started)
        c.route = route
        c.service = route.service
        c.backend = backends[i % len(backends)]
        c.status = statuses[i % len(statuses)]
        c.query = b"?page=2&api_key=abc" if i % 7 == 0 else b""
        c.upstream_started = started + 0.0002
        c.upstream_ended = started + 0.0002 + 0.001 * (i % 50)
        c.ended = c.upstream_ended + 0.0003
        c.bytes_out = 512
        c.cache = ("HIT", "MISS", None, None)[i % 4]
        out.append(c)
    return out


class Request:
    """What the filter reads of a request."""

    def __init__(self, traceparent: bool) -> None:
        self.requestHeaders = Headers({b"user-agent": [b"bench"]})
        if traceparent:
            self.requestHeaders.setRawHeaders(
                b"traceparent", [b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"]
            )
        self.clientproto = b"HTTP/1.1"


def best(function, items, runs: int = 5) -> float:
    """Best time per item, in microseconds."""
    results = []
    for _ in range(runs):
        start = time.perf_counter()
        for item in items:
            function(item)
        results.append((time.perf_counter() - start) / len(items) * 1e6)
    return min(results)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Per-request cost of observability.")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--e2e", action="store_true", help="also measure a real gateway's CPU per request")
    parser.add_argument("--requests", type=int, default=20_000, help="requests per --e2e run")
    args = parser.parse_args(argv)

    clock = Clock()
    clock.advance(1_700_000_000)
    gateway = Gateway(clock, parse_config(CONFIG, "bench.yaml"))
    observe = find(gateway)
    items = contexts(gateway.snapshot.config, args.n)

    import tempfile

    log_file = tempfile.TemporaryFile("w")
    dropped = AccessLog(observer=LogPublisher(lambda e: None))
    to_json = AccessLog(observer=LogPublisher(jsonFileLogObserver(log_file)))
    observe.access_log._observer = to_json._observer  # the gateway's own access log, to the file as JSON

    def filter_then_observers(context):
        context.notes = {}
        observe.on_request(request, context)
        for observer in gateway.request_observers:
            observer(context)

    request = Request(traceparent=True)
    fresh = Request(traceparent=False)
    results = {
        "metrics": best(gateway.metrics.observe, items),
        "feed": best(observe.feed.observe, items),
        "access_event_dropped": best(dropped, items),
        "access_event_json": best(to_json, items),
        "trace_filter_continue": best(lambda c: observe.on_request(request, c), items),
        "trace_filter_start": best(lambda c: observe.on_request(fresh, c), items),
        "all": best(filter_then_observers, items),
    }
    if args.e2e:
        results.update(e2e(args.requests))
    if args.json:
        print(json.dumps({"n": args.n, "us_per_request": results}, indent=2))
    else:
        print(f"per-request cost on the reactor thread, best of 5 runs of {args.n} requests:")
        for name, us in results.items():
            print(f"  {name:24s} {us:7.2f} us")
    return results


OFF = """
observability:
  access_log: {enabled: false}
  dashboard: {enabled: false}
  tracing: {enabled: false}
"""


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def e2e(requests: int, connections: int = 8) -> dict:
    """Gateway CPU microseconds per request, observability on and off."""
    import http.client
    import threading

    from tests.harness import Backend, Gateway as GatewayProcess

    backend = Backend("bench")
    results = {}
    try:
        for name, extra in (("e2e_cpu_on", ""), ("e2e_cpu_off", OFF)):
            gateway = GatewayProcess(
                f"""
listen: tcp:0:interface=127.0.0.1
admin: {{listen: "tcp:0:interface=127.0.0.1"}}
{extra}
services:
  s: {{backends: [{{url: {backend.url}}}]}}
routes:
  - {{name: r, match: {{path_prefix: /r}}, service: s}}
"""
            )
            try:
                per_connection = requests // connections

                def client():
                    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
                    for i in range(per_connection):
                        conn.request("GET", f"/r/item/{i}")
                        conn.getresponse().read()
                    conn.close()

                warm = threading.Thread(target=client)
                warm.start()
                warm.join()
                before = _cpu_seconds(gateway.pid)
                threads = [threading.Thread(target=client) for _ in range(connections)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                used = _cpu_seconds(gateway.pid) - before
                results[name] = used / (per_connection * connections) * 1e6
            finally:
                gateway.stop()
    finally:
        backend.stop()
    return results


if __name__ == "__main__":
    main()
