#!/usr/bin/env python
"""
Throughput of the gateway with 1 and with N worker processes (--workers),
measured with wrk on 127.0.0.1.

Two paths: a proxied GET to demo backends (three backend processes), and a
request the gateway answers itself (404, no route): the second shows the
gateway's own scaling without the backends sharing the CPUs.

Usage: bench/workers.py [--workers 1 2] [--duration 5] [--connections 64]
Needs wrk (apt-get install wrk).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.harness import Backend, Gateway, wait_for  # noqa: E402


def config(backends, workers: int) -> str:
    urls = "".join(f"      - url: {b.url}\n" for b in backends)
    return f"""
listen: tcp:0:interface=127.0.0.1
admin: {{listen: "tcp:0:interface=127.0.0.1"}}
workers: {workers}
config_poll_interval: 0
services:
  demo:
    backends:
{urls}
routes:
  - {{name: demo, match: {{path_prefix: /api}}, service: demo, strip_prefix: true}}
"""


def wrk(url: str, duration: int, connections: int) -> tuple[float, str]:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", url],
        capture_output=True, text=True, timeout=duration + 30,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(match.group(1)), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed")
    backends = [Backend(name) for name in ("a", "b", "c")]
    try:
        print(f"{os.cpu_count()} CPUs, wrk -t2 -c{args.connections} -d{args.duration}s")
        for workers in args.workers:
            gw = Gateway(config(backends, workers))
            try:
                wait_for(lambda: gw.log().count("GatewaySite starting on") >= workers, what="the workers")
                wrk(f"http://127.0.0.1:{gw.port}/api/x", 1, args.connections)  # warm up
                proxied, _ = wrk(f"http://127.0.0.1:{gw.port}/api/x", args.duration, args.connections)
                local, _ = wrk(f"http://127.0.0.1:{gw.port}/no-route", args.duration, args.connections)
            finally:
                gw.stop()
            print(f"workers={workers}: proxied {proxied:8.0f} req/s   gateway-only (404) {local:8.0f} req/s")
    finally:
        for b in backends:
            b.stop()


if __name__ == "__main__":
    main()
