#!/usr/bin/env python
"""
How much memory does L{gateway.ratelimit.MemoryStore} take, and does GC give it
back?  Pushes N distinct keys (default 1,000,000, shaped like IPv4 client
addresses) through one store on a L{twisted.internet.task.Clock}, and prints
the process's resident set size (from /proc/self/statm) at baseline, at peak,
and after the keys went idle and were collected, for each policy.  Also
prints the cost of one check and of the GC per key.

Usage: bench/ratelimit_memory.py [-n 1000000] [--policy token_bucket|sliding_window|both]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.task import Clock  # noqa: E402

from gateway.ratelimit import MemoryStore, SlidingWindow, TokenBucket  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    """
    Resident set size of this process, MiB (second field of /proc/self/statm).
    """
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE / 2**20


def keys(n: int, round: int):
    for i in range(n):
        yield f"{10 + round}.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" if i < 2**24 else f"{round}k{i}"


def fill(store: MemoryStore, clock: Clock, policy, n: int, round: int) -> float:
    """
    One request for each of n new keys; returns µs per check.
    """
    start = time.perf_counter()
    for i, key in enumerate(keys(n, round)):
        store.check(key, policy)
        if i % 1000 == 999:
            clock.advance(0.001)  # a million requests over a second
    return (time.perf_counter() - start) / n * 1e6


def collect(store: MemoryStore, clock: Clock, n: int, incremental: bool) -> tuple[float, str]:
    """
    Let every key go idle, then collect them; returns µs per key and how.
    """
    clock.advance(3600)
    start = time.perf_counter()
    if incremental:
        store.start_gc(10)
        clock.advance(10)  # task.Clock runs the callLater(0) chunks at once
        store.stop_gc()
        how = f"start_gc sweep, chunks of {store.gc_chunk:,} keys"
    else:
        store.gc()
        how = "one full gc()"
    return (time.perf_counter() - start) / n * 1e6, how


def run(policy, n: int, incremental: bool) -> None:
    gc.collect()
    clock = Clock()
    clock.advance(1_700_000_000)  # epoch-sized times, as in production
    store = MemoryStore(clock)
    baseline = rss_mib()
    print(f"{type(policy).__name__}: baseline RSS {baseline:.1f} MiB")
    for round in (1, 2):
        check_us = fill(store, clock, policy, n, round)
        peak = rss_mib()
        held = len(store)
        gc_us, how = collect(store, clock, n, incremental)
        gc.collect()
        after = rss_mib()
        print(
            f"  round {round}: {held:,} keys, peak {peak:.1f} MiB"
            f" (+{peak - baseline:.1f}, {(peak - baseline) * 2**20 / n:.0f} B/key);"
            f" after GC {after:.1f} MiB (+{after - baseline:.1f}), {len(store)} keys left"
        )
        print(f"           check {check_us:.2f} µs/key, GC {gc_us:.2f} µs/key ({how})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=1_000_000)
    parser.add_argument(
        "--policy", choices=["token_bucket", "sliding_window", "both"], default="both"
    )
    parser.add_argument(
        "--full", action="store_true", help="one full gc() instead of the incremental sweep"
    )
    options = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {options.n:,} distinct keys")
    if options.policy in ("token_bucket", "both"):
        run(TokenBucket(rate=10, burst=20), options.n, not options.full)
    if options.policy in ("sliding_window", "both"):
        run(SlidingWindow(limit=100, window=60), options.n, not options.full)


if __name__ == "__main__":
    main()
