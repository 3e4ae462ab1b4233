"""
CPython's cyclic garbage collector, set for a long-running gateway.

Measured under the benchmark's typical chain (4,500 requests/s, 64
connections, one core), CPython's defaults cost the gateway about 6% of its
CPU and most of its tail latency:

  - every full (generation 2) collection traversed the ~65,000 container
    objects built at start-up (modules, config, routes, metrics
    registries), 25 to 30 ms during which no request moved, about once a
    second: p99 was 31 to 44 ms against a median of 13 ms;
  - the generation 0 threshold of 700 was crossed about 200 times a second
    by the objects of the requests in flight alone, which refcounting frees
    anyway (a request leaves no cycles behind).

L{CollectorTuning} answers both, with the collector's own tools (the
C{gc} module, Python 3.7+):

  - once the listeners listen, a full collection and then C{gc.freeze()}:
    what start-up built moves to the permanent generation, which
    collections never traverse (objects there are still freed by
    refcounting; only a reference cycle among them is never collected);
  - a generation 0 threshold of L{GEN0_THRESHOLD} container allocations
    (net of deallocations).

With both, the run above spent 0.4% of its CPU in the collector, and p99
fell to 20 to 27 ms (docs/performance.rst has the paired runs).

A config reload replaces the routes, services and pools that were frozen at
start-up: L{CollectorTuning.thaw} puts the frozen objects back under
collection when the reload is applied, and L{CollectorTuning.settle}
freezes again once the replaced pools have closed, so the old
configuration's cycles are collected rather than kept for good.

PyPy has a different, generational collector and none of these functions.
What sets its speed is the size of its nursery, where new objects are
allocated: PyPy sizes it from the CPU's cache (1 MiB on the benchmark's
machine), and every request's objects that live across a reactor turn are
copied out of it when it fills.  It is read once, when PyPy starts, from
the environment variable C{PYPY_GC_NURSERY}; with
C{PYPY_GC_NURSERY=}L{PYPY_NURSERY} the typical chain served far more
requests/s than with the default, for more memory (docs/performance.rst,
"Garbage collection").  The systemd unit sets
it; on PyPy, L{CollectorTuning.settle} logs the nursery size in use, and
how to set it when it was not.
"""

from __future__ import annotations

import gc as _gc
import os
from typing import Any

from twisted.logger import Logger

_log = Logger()

#: The nursery size recommended for PyPy (C{PYPY_GC_NURSERY}).
PYPY_NURSERY = "32MB"

#: Container allocations (net of deallocations) between two generation 0
#: collections; CPython's default is 700. The objects of 64 requests in
#: flight cross 700 on their own; in the benchmark, 5,000 and 20,000 both
#: cut the collections from ~200 to ~2 a second.
GEN0_THRESHOLD = 10_000


class CollectorTuning:
    """
    Sets and freezes the collector of this process (see the module
    docstring).  Only the process that serves (twistd's) should use one:
    freezing is process-wide.

    @param gc: the C{gc} module, or an object with its C{collect},
        C{freeze}, C{unfreeze}, C{get_freeze_count}, C{get_threshold} and
        C{set_threshold}; without C{freeze} (PyPy) nothing is done.
    @param gen0_threshold: the generation 0 threshold, in allocations; it
        is never lowered.
    """

    def __init__(
        self, gc: Any = _gc, gen0_threshold: int = GEN0_THRESHOLD, environ: Any = None
    ) -> None:
        self._gc = gc
        self.gen0_threshold = gen0_threshold
        self._environ = os.environ if environ is None else environ
        #: Whether this interpreter's collector has a permanent generation.
        self.supported = hasattr(gc, "freeze") and hasattr(gc, "set_threshold")
        self._reported = False

    def start(self) -> None:
        """
        Raise the generation 0 threshold to C{gen0_threshold} (the older
        generations' thresholds are kept).
        """
        if not self.supported:
            return
        gen0, gen1, gen2 = self._gc.get_threshold()
        if gen0 < self.gen0_threshold:
            self._gc.set_threshold(self.gen0_threshold, gen1, gen2)

    def settle(self) -> int:
        """
        Collect everything, then freeze what survives: call once the
        process has built what it keeps (the listeners listen, a reload's
        replaced pools have closed).  The collection pauses the process
        for as long as one full collection did before (tens of ms).

        @return: the number of objects now in the permanent generation (0
            where unsupported).
        """
        if not self.supported:
            self._report_nursery()
            return 0
        self._gc.collect()
        self._gc.freeze()
        frozen = self._gc.get_freeze_count()
        _log.info(
            "garbage collector: {frozen} objects frozen, thresholds {thresholds}",
            frozen=frozen,
            thresholds=self._gc.get_threshold(),
        )
        return frozen

    def thaw(self) -> None:
        """
        Put every frozen object back into the oldest generation, where
        full collections see it again (when a reload replaces what was
        frozen).
        """
        if self.supported:
            self._gc.unfreeze()

    def _report_nursery(self) -> None:
        # PyPy's gc.get_stats() describes its nursery; CPython has none.
        stats = getattr(self._gc, "get_stats", None)
        if self._reported or stats is None:
            return
        try:
            nursery = stats().nursery_size
        except (AttributeError, TypeError):
            return
        self._reported = True
        if self._environ.get("PYPY_GC_NURSERY"):
            _log.info("garbage collector: PyPy, nursery {nursery}", nursery=nursery)
        else:
            _log.info(
                "garbage collector: PyPy, nursery {nursery} (its default); "
                "PYPY_GC_NURSERY={recommended} in the environment is faster "
                "(docs/performance.rst)",
                nursery=nursery,
                recommended=PYPY_NURSERY,
            )
