"""
The garbage collector, set for a long-running gateway.

B{CPython.}  Measured under the benchmark's typical chain (4,500
requests/s, 64 connections, one core), CPython's defaults cost the gateway
about 6% of its CPU and most of its tail latency:

  - every full (generation 2) collection traversed the ~65,000 container
    objects built at start-up (modules, config, routes, metrics
    registries), 25 to 30 ms during which no request moved, about once a
    second;
  - the generation 0 threshold of 700 was crossed about 200 times a second
    by the objects of the requests in flight alone, which refcounting frees
    anyway (a request leaves no cycles behind).

L{CollectorTuning} answers both with the collector's own tools (the C{gc}
module, Python 3.7+):

  - once the listeners listen, a full collection and then C{gc.freeze()}:
    what start-up built moves to the permanent generation, which
    collections never traverse (objects there are still freed by
    refcounting; only a reference cycle among them waits for the next
    L{CollectorTuning.settle}, which thaws before it collects);
  - a generation 0 threshold of L{GEN0_THRESHOLD} container allocations
    (net of deallocations).

In paired runs p99 went from 36-47 to 21-26 ms with the typical chain and
requests/s rose 6-7%; with a threshold of 5,000 the collector's share of
the CPU fell from 6% to 0.5% (docs/performance.rst, "Garbage
collection").

A config reload replaces routes, services and pools that were frozen:
L{CollectorTuning.reloaded} thaws at once, so the old configuration's
cycles are collected as usual, and settles again L{RESETTLE_DELAY} seconds
after the last reload, when the requests that were in flight during it,
and the replaced pools, are long gone.

B{PyPy} has a different, generational collector and none of these
functions.  What sets its speed is the size of its nursery, where new
objects are allocated: PyPy sizes it from the CPU's cache (1 MB on the
benchmark's machine, 130 MB on a later one with a 260 MiB L3), and every
request's objects that are still alive when it fills are copied out.
It is read once, when PyPy starts, from the environment variable
C{PYPY_GC_NURSERY}; with C{PYPY_GC_NURSERY=}L{PYPY_NURSERY} the typical
chain served 1.6 to 1.7 times the requests/s of the default, for about
160 MiB more memory.  Its
major collections mark the heap in steps of several times the nursery:
with a 32 MB nursery, all of it at once, a 47-63 ms pause every few
seconds that set the p99.  C{PYPY_GC_INCREMENT_STEP=}L{PYPY_INCREMENT_STEP}
marks it in steps of at most 19 ms for the same total time
(docs/performance.rst).
The systemd unit sets both; on PyPy, L{CollectorTuning.settle} logs the
nursery size in use, and advises the step when it is unset and the
nursery when it is unset and PyPy's default is smaller.

B{glibc's malloc}, with which CPython allocates large strings, serves a
block of at least its mmap threshold (128 KiB at first, raised on the fly
to the size of such a block freed, up to 32 MiB) with pages mapped for it
alone, and gives the top of its heap back to the system once more than its
trim threshold is free there (128 KiB at first, twice a raised mmap
threshold).  With 64 large responses in flight, the 256 KiB reads of their
bodies (L{gateway.upstream.LARGE_READ}) kept crossing both: about 66 page
faults per 1 MiB response, 46,000 a second, each zeroing a page the kernel
then copied into.  Given a C{mallopt} (L{default_mallopt}: on CPython),
L{CollectorTuning.start} sets the mmap threshold to
L{MALLOC_MMAP_THRESHOLD} and the trim threshold to
L{MALLOC_TRIM_THRESHOLD}: the blocks are then reused from the heap,
without faults, for up to 32 MiB more resident memory per process (+9 MiB
measured; docs/performance.rst, "Large bodies without page faults").  The
thresholds are then fixed: a block of 4 to 32 MiB (a large request body
read whole) is always mapped for itself, where glibc would have raised the
threshold after the first.  Under PyPy, whose collector frees large
strings only when it collects, the gateway faulted as often with these
thresholds as without (20-32 faults per MiB relayed), so they are not set
there.  A threshold the operator gave glibc in the environment
(C{GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...} or
C{...trim_threshold=...}, C{MALLOC_MMAP_THRESHOLD_}, C{MALLOC_TRIM_THRESHOLD_})
is kept, and C{TXGATEWAY_MALLOC_TUNING=off} leaves both to glibc.  (With
another allocator preloaded, such as tcmalloc, glibc's C{mallopt} sets
thresholds no allocation uses.)

C{TXGATEWAY_GC_TUNING=off} in the environment turns all of this off.
"""

from __future__ import annotations

import gc as _gc
import os
import platform
import re
from typing import Any, Callable, Mapping, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

_log = Logger()

#: Container allocations (net of deallocations) between two generation 0
#: collections; CPython's default is 700 (2,000 from 3.13). The objects
#: of 64 requests in flight cross 700 on their own; in the benchmark,
#: 5,000 and 20,000 both cut the collections from ~200 to ~2 a second.
GEN0_THRESHOLD = 10_000

#: Seconds from the last config reload to the next settle.
RESETTLE_DELAY = 60.0

#: The nursery size recommended for PyPy (C{PYPY_GC_NURSERY}).
PYPY_NURSERY = "32MB"

#: The bytes marked per step of a major collection recommended for PyPy
#: (C{PYPY_GC_INCREMENT_STEP}; its default is several times the nursery).
PYPY_INCREMENT_STEP = "2MB"


#: Bytes from which glibc's malloc gives a block its own C{mmap} (its
#: default is 128 KiB, raised as such blocks are freed, up to 32 MiB).
MALLOC_MMAP_THRESHOLD = 4 * 1024 * 1024

#: Free bytes at the top of glibc's heap above which it gives memory back
#: to the system (its default is 128 KiB, or twice a raised mmap
#: threshold): the resident memory a gateway process may keep unused after
#: a burst of large responses.
MALLOC_TRIM_THRESHOLD = 32 * 1024 * 1024

#: C{mallopt} parameters, from glibc's C{malloc.h}.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: Each threshold: its name in the log, its C{mallopt} parameter, the bytes
#: the gateway sets, and how an operator sets it instead (its
#: C{GLIBC_TUNABLES} name and its older environment variable).
_THRESHOLDS = (
    ("mmap", M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD, "glibc.malloc.mmap_threshold", "MALLOC_MMAP_THRESHOLD_"),
    ("trim", M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD, "glibc.malloc.trim_threshold", "MALLOC_TRIM_THRESHOLD_"),
)


def glibc_mallopt() -> Optional[Callable[[int, int], int]]:
    """
    The C library's C{mallopt}, if this process runs on glibc.

    @return: a callable C{(param: int, value: int) -> int} that answers 1
        on success and 0 on failure (glibc's C{mallopt(3)}), or None when
        the C library is not glibc (musl, macOS) or has no C{mallopt}.
        Never raises.
    """
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
    except (ValueError, OSError, AttributeError):
        return None  # not glibc: the name is glibc's
    import ctypes  # (only here: PyPy never loads it)

    try:
        function = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def default_mallopt() -> Optional[Callable[[int, int], int]]:
    """
    The C{mallopt} the gateway's L{CollectorTuning} is given: glibc's
    (L{glibc_mallopt}) on CPython; None on PyPy, whose collector frees
    large strings only when it collects, so that a PyPy gateway faulted as
    often with the thresholds as without (see the module docstring).

    @return: as L{glibc_mallopt}.
    """
    if platform.python_implementation() != "CPython":
        return None
    return glibc_mallopt()


def _set_by_operator(environ: Mapping[str, str], tunable: str, variable: str) -> bool:
    """Whether C{environ} sets glibc's C{tunable} or its old C{variable}."""
    names = {item.partition("=")[0].strip() for item in environ.get("GLIBC_TUNABLES", "").split(":")}
    return tunable in names or bool(environ.get(variable))


def _megabytes(size: object) -> float:
    """
    A size as PyPy's C{gc.get_stats()} writes it (C{"1.0MB"}, C{"512.0kB"},
    C{"1.2GB"}) in megabytes; 0 if it is not one.
    """
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kKMG]?)B\s*", str(size))
    if match is None:
        return 0.0
    try:
        value = float(match.group(1))
    except ValueError:
        return 0.0
    return value * {"": 1 / 1024**2, "k": 1 / 1024, "K": 1 / 1024, "M": 1, "G": 1024}[match.group(2)]


def tuning_enabled(environ: Mapping[str, str], variable: str = "TXGATEWAY_GC_TUNING") -> bool:
    """
    Whether C{environ} leaves a tuning on: it is, unless its C{variable}
    (C{TXGATEWAY_GC_TUNING}: all of this module's; C{TXGATEWAY_MALLOC_TUNING}:
    glibc's thresholds alone; C{TXGATEWAY_SPLICE}: L{gateway.splice}) is
    C{off}, C{0}, C{no} or C{false}.
    """
    return environ.get(variable, "").strip().lower() not in (
        "off",
        "0",
        "no",
        "false",
    )


class CollectorTuning:
    """
    Sets and freezes the collector of this process, and sets glibc's
    malloc thresholds (see the module docstring).  Only the process that
    serves (twistd's) should use one: freezing and thresholds are
    process-wide.

    @param gc: the C{gc} module, or an object with its C{collect},
        C{freeze}, C{unfreeze}, C{get_freeze_count}, C{get_threshold} and
        C{set_threshold}; without C{freeze} (PyPy) only the nursery is
        reported, from C{get_stats()}.
    @param gen0_threshold: the generation 0 threshold, in container
        allocations; it is never lowered.
    @param environ: the environment (C{os.environ} if None), read for
        C{PYPY_GC_NURSERY}, C{PYPY_GC_INCREMENT_STEP} and glibc's malloc
        settings.
    @param mallopt: glibc's C{mallopt}, a callable C{(param: int, value:
        int) -> int} (L{default_mallopt}), with which L{start} sets the
        malloc thresholds; None leaves malloc as it is.
    """

    def __init__(
        self,
        gc: Any = _gc,
        gen0_threshold: int = GEN0_THRESHOLD,
        environ: Optional[Mapping[str, str]] = None,
        mallopt: Optional[Callable[[int, int], int]] = None,
    ) -> None:
        self._gc = gc
        self._mallopt = mallopt
        self.gen0_threshold = gen0_threshold
        self._environ = os.environ if environ is None else environ
        #: Whether this interpreter's collector has a permanent generation.
        self.supported = hasattr(gc, "freeze") and hasattr(gc, "set_threshold")
        self._reported = False
        self._pending: Optional[IDelayedCall] = None

    def start(self) -> None:
        """
        Raise the generation 0 threshold to C{gen0_threshold} (the older
        generations' thresholds are kept), and set glibc's malloc
        thresholds (L{tune_malloc}).
        """
        self.tune_malloc()
        if not self.supported:
            return
        gen0, gen1, gen2 = self._gc.get_threshold()
        if gen0 < self.gen0_threshold:
            self._gc.set_threshold(self.gen0_threshold, gen1, gen2)

    def tune_malloc(self) -> bool:
        """
        Set glibc's mmap threshold to L{MALLOC_MMAP_THRESHOLD} and its trim
        threshold to L{MALLOC_TRIM_THRESHOLD} bytes (see the module
        docstring).  Nothing is done without a C{mallopt} or with
        C{TXGATEWAY_MALLOC_TUNING=off} in the environment; a threshold the
        environment sets (C{GLIBC_TUNABLES}, C{MALLOC_*_THRESHOLD_}) is
        left to it.  Stops at the first threshold C{mallopt} refuses.
        Never raises; what is done is logged.

        @return: whether both thresholds were set.
        """
        if self._mallopt is None or not tuning_enabled(self._environ, "TXGATEWAY_MALLOC_TUNING"):
            return False
        done = 0
        for name, param, value, tunable, variable in _THRESHOLDS:
            if _set_by_operator(self._environ, tunable, variable):
                _log.info("malloc: {name} threshold left as the environment sets it", name=name)
                continue
            try:
                accepted = self._mallopt(param, value) == 1
            except Exception:
                _log.failure("malloc: setting its {name} threshold failed", name=name)
                return False
            if not accepted:
                _log.warn(
                    "malloc: mallopt refused a {name} threshold of {value} bytes; "
                    "large bodies may cost page faults",
                    name=name,
                    value=value,
                )
                return False
            done += 1
        if done == len(_THRESHOLDS):
            _log.info(
                "malloc: blocks under {mmap} MiB come from the heap, trimmed above {trim} MiB free",
                mmap=MALLOC_MMAP_THRESHOLD // 2**20,
                trim=MALLOC_TRIM_THRESHOLD // 2**20,
            )
        return done == len(_THRESHOLDS)

    def settle(self) -> int:
        """
        Thaw, collect everything, then freeze what survives: call once the
        process has built what it keeps (the listeners listen).  The
        collection pauses the process for as long as one full collection
        did before (tens of ms).  Never raises: a failure is logged, and
        the collector keeps its defaults.

        @return: the number of objects now in the permanent generation (0
            where unsupported or on failure).
        """
        try:
            if not self.supported:
                self._report_nursery()
                return 0
            self._gc.unfreeze()
            self._gc.collect()
            self._gc.freeze()
            frozen = self._gc.get_freeze_count()
        except Exception:
            _log.failure("garbage collector: settling failed")
            return 0
        _log.info(
            "garbage collector: {frozen} objects frozen, thresholds {thresholds}",
            frozen=frozen,
            thresholds=self._gc.get_threshold(),
        )
        return frozen

    def thaw(self) -> None:
        """
        Put every frozen object back into the oldest generation, where
        full collections see it again.
        """
        if self.supported:
            self._gc.unfreeze()

    def reloaded(self, clock: IReactorTime, delay: float = RESETTLE_DELAY) -> None:
        """
        A config reload was applied: thaw now, and settle C{delay} seconds
        after the last of a burst of reloads (a pending settle is pushed
        back, not doubled).

        @param clock: the reactor, for C{callLater}.
        @param delay: seconds.
        """
        if not self.supported:
            return
        self.thaw()
        if self._pending is not None and self._pending.active():
            self._pending.reset(delay)
        else:
            self._pending = clock.callLater(delay, self.settle)

    def cancel(self) -> None:
        """
        Drop a pending settle (the gateway is stopping).
        """
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None

    def _report_nursery(self) -> None:
        # PyPy's gc.get_stats() describes its nursery; CPython has none.
        stats = getattr(self._gc, "get_stats", None)
        if self._reported or stats is None:
            return
        nursery = getattr(stats(), "nursery_size", None)
        if nursery is None:
            return
        self._reported = True
        message = "garbage collector: PyPy, nursery {nursery}"
        hints = []
        if not self._environ.get("PYPY_GC_NURSERY"):
            message += " (its default)"
            if _megabytes(nursery) < _megabytes(PYPY_NURSERY):
                # (PyPy sizes it from the CPU's cache: 1 MB on one machine,
                # 130 MB on another; a large one needs no advice.)
                hints.append("PYPY_GC_NURSERY={nursery_hint} is faster")
        if not self._environ.get("PYPY_GC_INCREMENT_STEP"):
            hints.append("PYPY_GC_INCREMENT_STEP={step_hint} shortens its pauses")
        if hints:
            message += "; in the environment, " + " and ".join(hints) + " (docs/performance.rst)"
        _log.info(
            message, nursery=nursery, nursery_hint=PYPY_NURSERY, step_hint=PYPY_INCREMENT_STEP
        )
