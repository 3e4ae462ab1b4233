#!/usr/bin/env python
"""
Does a real gateway process give back the memory of a million rate-limit
buckets?  Starts a demo backend and a twistd gateway on 127.0.0.1 whose one
route is limited per C{X-Client} header (memory store), then sends N requests
(default 1,000,000) with N distinct C{X-Client} values through wrk (a Lua
script numbers them), and prints the gateway's resident set size:

  - baseline: after a warm-up, before the distinct keys;
  - peak: the highest RSS seen while the keys were held (sampled every
    0.5 s), with the number of keys the store held then;
  - after GC: once every bucket went idle and the GC (every 10 s) dropped it,
    i.e. once C{GET /ratelimit} on the admin listener says C{memory_keys: 0}.

A bucket goes idle C{--idle} seconds after its only request (the token
bucket's C{1/rate}; the sliding window's state lives up to two windows, so
its window is C{--idle / 2}).  Pick C{--idle} longer than the run, so that
all N keys are held at the peak; the script then waits that long for them
to go idle.  C{--rounds 2} repeats the run with new keys, to show that the
memory is reused rather than grown.

Usage: bench/ratelimit_rss.py [-n 1000000] [--idle 400] [--algorithm token_bucket|sliding_window]
                              [--connections 32] [--threads 2] [--rounds 1]

The environment is passed on to the gateway: C{PYTHONMALLOC=malloc
bench/ratelimit_rss.py} measures a gateway whose objects all come from the C
library's malloc, which the store's GC can hand back to the system
(L{gateway.ratelimit.release_memory}), instead of CPython's small-object
arenas, which are only freed when wholly empty.

Needs wrk (apt install wrk).  Everything runs on 127.0.0.1 and is stopped by
PID at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.harness import Backend, Gateway, get, rss_kib, wait_for  # noqa: E402

#: wrk's Lua: each thread sends its share of requests, each with an X-Client
#: header never used before, then stops.
WRK_SCRIPT = textwrap.dedent(
    """\
    local threads = {}
    local next_id = 0

    function setup(thread)
      thread:set("thread_id", next_id)
      next_id = next_id + 1
      table.insert(threads, thread)
    end

    function init(args)
      run = args[1]
      share = tonumber(args[2])
      sent = 0
      answered = 0
      refused = 0
    end

    function request()
      sent = sent + 1
      return wrk.format("GET", "/rl", {["X-Client"] = run .. "-" .. thread_id .. "-" .. sent})
    end

    function response(status, headers, body)
      answered = answered + 1
      if status ~= 200 then refused = refused + 1 end
      if answered >= share then wrk.thread:stop() end
    end

    function done(summary, latency, requests)
      local total, bad = 0, 0
      for _, thread in ipairs(threads) do
        total = total + thread:get("answered")
        bad = bad + thread:get("refused")
      end
      io.write(string.format("wrk: %d answered, %d not 200\\n", total, bad))
    end
    """
)


def config(backend_url: str, algorithm: str, idle: float) -> str:
    if algorithm == "token_bucket":
        policy = f"{{rate: {1 / idle!r}, burst: 1, key: 'header:X-Client'}}"
    else:
        policy = (
            f"{{algorithm: sliding_window, limit: 1, window: {idle / 2!r},"
            " key: 'header:X-Client'}"
        )
    return textwrap.dedent(
        f"""\
        listen: tcp:0:interface=127.0.0.1
        admin: {{listen: "tcp:0:interface=127.0.0.1"}}
        services:
          one:
            backends: [{{url: "{backend_url}"}}]
            max_connections_per_backend: 64
        routes:
          - name: rl
            match: {{path_prefix: /rl}}
            service: one
            rate_limit: {policy}
        """
    )


def memory_keys(gw: Gateway) -> int:
    return get(gw.admin_port, "/ratelimit").json()["memory_keys"]


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


class Sampler:
    """Samples the gateway's RSS and key count every half second."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.peak = (0, 0)  # (RSS KiB, keys held)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                rss = rss_kib(self.gw.pid)
                if rss > self.peak[0]:
                    self.peak = (rss, memory_keys(self.gw))
            except (OSError, ValueError):
                pass

    def stop(self) -> tuple:
        self._stop.set()
        self._thread.join(5)
        return self.peak


def run_round(gw: Gateway, n: int, options, script: str) -> dict:
    run = uuid.uuid4().hex[:8]
    share = n // options.threads
    total = share * options.threads
    before = memory_keys(gw)
    sampler = Sampler(gw)
    started = time.monotonic()
    wrk = subprocess.Popen(
        ["wrk", "-t", str(options.threads), "-c", str(options.connections),
         "-d", f"{options.max_seconds}s", "--timeout", "10s", "-s", script,
         f"http://127.0.0.1:{gw.port}/rl", "--", run, str(share)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # wrk runs until its -d even when every thread stopped: interrupt it
        # once the gateway holds all the keys (none can go idle before).
        wait_for(
            lambda: wrk.poll() is not None or memory_keys(gw) >= before + total,
            timeout=options.max_seconds + 30,
            interval=1.0,
            what="all keys to go through",
        )
        took = time.monotonic() - started
        if wrk.poll() is None:
            wrk.send_signal(signal.SIGINT)
        out, _ = wrk.communicate(timeout=30)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait()
    peak_rss, peak_keys = sampler.stop()
    peak_rss = max(peak_rss, rss_kib(gw.pid))
    sent = time.monotonic()
    wait_for(lambda: memory_keys(gw) == 0, timeout=options.idle + 60, interval=2.0,
             what="the GC to drop every idle bucket")
    gc_wait = time.monotonic() - sent
    time.sleep(1)
    return {
        "keys": total,
        "seconds": took,
        "rate": total / took,
        "peak_rss": peak_rss,
        "peak_keys": peak_keys,
        "after_gc": rss_kib(gw.pid),
        "gc_wait": gc_wait,
        "wrk": [line for line in out.splitlines() if line.startswith(("wrk:", "Requests/sec", "  Socket"))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=1_000_000, help="distinct keys per round")
    parser.add_argument("--idle", type=float, default=400.0,
                        help="seconds after which a bucket is idle (longer than a round)")
    parser.add_argument("--algorithm", choices=["token_bucket", "sliding_window"],
                        default="token_bucket")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-seconds", type=int, default=900,
                        help="the longest a round may send for")
    options = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt install wrk)")

    fd, script = tempfile.mkstemp(prefix="ratelimit-rss-", suffix=".lua")
    with os.fdopen(fd, "w") as f:
        f.write(WRK_SCRIPT)
    backend = Backend("rss")
    gw = None
    try:
        gw = Gateway(config(backend.url, options.algorithm, options.idle))
        for _ in range(2000):  # warm-up: imports, pools, allocator
            get(gw.port, "/rl", {"X-Client": "warm-up"})
        time.sleep(1)
        baseline = rss_kib(gw.pid)
        print(f"{options.algorithm}, {options.n:,} distinct X-Client values per round,"
              f" buckets idle after {options.idle:g} s, GC every 10 s")
        print(f"baseline RSS: {mib(baseline)} ({memory_keys(gw)} keys held)")
        for number in range(1, options.rounds + 1):
            r = run_round(gw, options.n, options, script)
            grown = r["peak_rss"] - baseline
            print(
                f"round {number}: {r['keys']:,} requests in {r['seconds']:.0f} s"
                f" ({r['rate']:,.0f}/s); peak RSS {mib(r['peak_rss'])} (+{mib(grown)},"
                f" {grown * 1024 / max(1, r['peak_keys']):.0f} B/key at {r['peak_keys']:,} keys)"
            )
            print(
                f"         after GC ({r['gc_wait']:.0f} s later, 0 keys held):"
                f" RSS {mib(r['after_gc'])} (+{mib(r['after_gc'] - baseline)} over baseline)"
            )
            for line in r["wrk"]:
                print("        ", line.strip())
        print(json.dumps({"baseline_kib": baseline, "final_kib": rss_kib(gw.pid)}))
    finally:
        if gw is not None:
            gw.stop()
        backend.stop()
        os.unlink(script)


if __name__ == "__main__":
    main()
