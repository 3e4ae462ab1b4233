"""
gateway.heap: the garbage collector's threshold and freeze, with the real
C{gc} module of this process (thawed and restored after each test), and how
the service tree and the config watcher use it.
"""

import ctypes
import gc
import json
import os
import subprocess
import sys
import weakref
from types import SimpleNamespace

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from gateway.config import parse_config
from gateway.heap import (
    GEN0_THRESHOLD,
    M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD,
    MALLOC_MMAP_THRESHOLD,
    MALLOC_TRIM_THRESHOLD,
    CollectorTuning,
    _megabytes,
    default_mallopt,
    glibc_mallopt,
    tuning_enabled,
)
from gateway.reload import ConfigWatcher
from gateway.state import Gateway
from gateway.tap import GatewayService
from tests.harness import ROOT

cpython = pytest.mark.cpython_only  # gc.freeze is CPython's


@pytest.fixture
def real_gc():
    thresholds = gc.get_threshold() if hasattr(gc, "get_threshold") else None
    yield gc
    if hasattr(gc, "freeze"):
        gc.unfreeze()
        gc.set_threshold(*thresholds)


class _Cycle:
    def __init__(self):
        self.me = self


@cpython
def test_start_raises_gen0_threshold_and_keeps_the_others(real_gc):
    gc.set_threshold(700, 11, 12)
    CollectorTuning().start()
    assert gc.get_threshold() == (GEN0_THRESHOLD, 11, 12)


@cpython
def test_start_never_lowers_a_higher_threshold(real_gc):
    gc.set_threshold(GEN0_THRESHOLD * 2, 10, 10)
    CollectorTuning().start()
    assert gc.get_threshold() == (GEN0_THRESHOLD * 2, 10, 10)


@cpython
def test_settle_freezes_what_exists_and_thaw_gives_it_back(real_gc):
    """
    A cycle alive when settle() runs is in the permanent generation: once
    dropped, a full collection leaves it; after thaw() one collects it.
    """
    cycle = _Cycle()
    gone = []
    ref = weakref.ref(cycle, lambda _: gone.append(True))
    frozen = CollectorTuning().settle()
    assert frozen > 0 and gc.get_freeze_count() > 0
    del cycle
    gc.collect()
    assert ref() is not None and gone == []
    CollectorTuning().thaw()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert gone == [True]


@cpython
def test_settle_collects_garbage_before_freezing(real_gc):
    """Cycles already unreachable are collected, not frozen."""
    gc.disable()  # no automatic collection may do settle's work
    try:
        cycle = _Cycle()
        ref = weakref.ref(cycle)
        del cycle
        CollectorTuning().settle()
        assert ref() is None
    finally:
        gc.enable()


@cpython
def test_settle_thaws_first_so_a_cycle_frozen_earlier_is_collected(real_gc):
    """
    A cycle alive (a request in flight, say) when one settle froze it, and
    dropped since, is collected by the next settle.
    """
    tuning = CollectorTuning()
    cycle = _Cycle()
    ref = weakref.ref(cycle)
    tuning.settle()
    del cycle
    gc.collect()
    assert ref() is not None  # frozen
    tuning.settle()
    assert ref() is None


@cpython
def test_reloaded_thaws_now_and_settles_after_the_last_of_a_burst(real_gc):
    clock = Clock()
    tuning = CollectorTuning()
    tuning.settle()
    assert gc.get_freeze_count() > 0
    tuning.reloaded(clock, delay=60)
    assert gc.get_freeze_count() == 0  # the replaced config is collectable now
    clock.advance(59)
    tuning.reloaded(clock, delay=60)  # a second reload pushes the settle back
    clock.advance(59)
    assert gc.get_freeze_count() == 0
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(1)
    assert gc.get_freeze_count() > 0
    assert clock.getDelayedCalls() == []


@cpython
def test_cancel_drops_a_pending_settle(real_gc):
    clock = Clock()
    tuning = CollectorTuning()
    tuning.reloaded(clock)
    tuning.cancel()
    assert clock.getDelayedCalls() == []


def test_settle_logs_a_failure_and_never_raises(monkeypatch):
    messages = _logged(monkeypatch)

    class Broken:
        def unfreeze(self):
            raise RuntimeError("broken collector")

        freeze = set_threshold = unfreeze

    assert CollectorTuning(gc=Broken()).settle() == 0
    assert messages() == ["garbage collector: settling failed"]


@pytest.mark.parametrize(
    "value, enabled",
    [(None, True), ("", True), ("on", True), ("off", False), ("0", False), ("FALSE", False)],
)
def test_tuning_can_be_turned_off_from_the_environment(value, enabled):
    environ = {} if value is None else {"TXGATEWAY_GC_TUNING": value}
    assert tuning_enabled(environ) is enabled


@pytest.mark.pypy_only
def test_without_freeze_nothing_is_done():
    tuning = CollectorTuning()
    assert not tuning.supported
    tuning.start()
    assert tuning.settle() == 0
    tuning.thaw()


class _Recorder:
    def __init__(self):
        self.calls = []

    def start(self):
        self.calls.append("start")

    def settle(self):
        self.calls.append("settle")
        return 1

    def reloaded(self, clock):
        self.calls.append("reloaded")

    def cancel(self):
        self.calls.append("cancel")


def test_service_settles_once_the_listeners_listen_and_the_reactor_runs():
    collector = _Recorder()
    reactor = MemoryReactorClock()
    service = GatewayService(
        SimpleNamespace(reactor=reactor),
        collector=collector,
        notify=lambda state: collector.calls.append(state),
    )
    listening = defer.Deferred()
    service.readiness.append(lambda: listening)
    service.startService()
    assert collector.calls == ["start"]
    listening.callback(None)
    assert collector.calls == ["start"]
    reactor.run()
    assert collector.calls == ["start", "READY=1", "settle"]


_CONFIG = """
routes:
  - {{name: r, match: {{path_prefix: /r}}, service: {service}}}
services:
  a: {{backends: [{{url: "http://127.0.0.1:9001"}}]}}
  b: {{backends: [{{url: "http://127.0.0.1:9002"}}]}}
"""


def test_the_watcher_reports_applied_reloads_and_cancels_on_stop(tmp_path, monkeypatch):
    path = tmp_path / "gateway.yaml"
    path.write_text(_CONFIG.format(service="a"))
    gateway = Gateway(Clock(), parse_config(path.read_text(), str(path)))
    closing = defer.Deferred()
    monkeypatch.setattr(gateway, "apply", lambda config: closing)
    collector = _Recorder()
    watcher = ConfigWatcher(
        gateway, str(path), 0, gateway.reactor, run=lambda f, *a: defer.maybeDeferred(f, *a),
        install_signal=False, collector=collector,
    )
    path.write_text(_CONFIG.format(service="b"))
    watcher.reload()
    assert collector.calls == ["reloaded"]
    watcher.stopService()
    assert collector.calls == ["reloaded", "cancel"]


def _pypy_gc(nursery="1.0MB"):
    """What PyPy's gc module offers here: get_stats(), no freeze."""
    return SimpleNamespace(get_stats=lambda: SimpleNamespace(nursery_size=nursery))


def _logged(monkeypatch):
    from twisted.logger import Logger, formatEvent

    import gateway.heap

    events = []
    monkeypatch.setattr(gateway.heap, "_log", Logger(observer=events.append))
    return lambda: [formatEvent(e) for e in events]


def test_on_pypy_settle_reports_the_nursery_and_how_to_grow_it(monkeypatch):
    messages = _logged(monkeypatch)
    tuning = CollectorTuning(gc=_pypy_gc(), environ={})
    assert not tuning.supported
    assert tuning.settle() == 0
    assert tuning.settle() == 0  # again after a reload: reported once
    assert messages() == [
        "garbage collector: PyPy, nursery 1.0MB (its default); in the environment, "
        "PYPY_GC_NURSERY=32MB is faster and PYPY_GC_INCREMENT_STEP=2MB shortens its "
        "pauses (docs/performance.rst)"
    ]


def test_on_pypy_chosen_settings_are_reported_as_is(monkeypatch):
    messages = _logged(monkeypatch)
    CollectorTuning(
        gc=_pypy_gc("32.0MB"),
        environ={"PYPY_GC_NURSERY": "32MB", "PYPY_GC_INCREMENT_STEP": "2MB"},
    ).settle()
    assert messages() == ["garbage collector: PyPy, nursery 32.0MB"]


def test_on_pypy_a_large_default_nursery_is_not_advised_against(monkeypatch):
    """PyPy sizes its nursery from the CPU's cache: where that gives more
    than the recommended size, only the marking step is advised."""
    messages = _logged(monkeypatch)
    CollectorTuning(gc=_pypy_gc("130.0MB"), environ={}).settle()
    assert messages() == [
        "garbage collector: PyPy, nursery 130.0MB (its default); in the environment, "
        "PYPY_GC_INCREMENT_STEP=2MB shortens its pauses (docs/performance.rst)"
    ]


@pytest.mark.parametrize(
    "size, megabytes",
    [("1.0MB", 1.0), ("130.0MB", 130.0), ("512.0kB", 0.5), ("1.5GB", 1536.0), ("what", 0.0)],
)
def test_pypy_sizes_are_read_in_megabytes(size, megabytes):
    assert _megabytes(size) == megabytes


def test_on_pypy_a_missing_setting_is_advised_alone(monkeypatch):
    messages = _logged(monkeypatch)
    CollectorTuning(gc=_pypy_gc("32.0MB"), environ={"PYPY_GC_NURSERY": "32MB"}).settle()
    assert messages() == [
        "garbage collector: PyPy, nursery 32.0MB; in the environment, "
        "PYPY_GC_INCREMENT_STEP=2MB shortens its pauses (docs/performance.rst)"
    ]


@pytest.mark.pypy_only
def test_real_pypy_nursery_is_read(monkeypatch):
    messages = _logged(monkeypatch)
    CollectorTuning(environ={}).settle()
    assert messages()[0].startswith("garbage collector: PyPy, nursery ")


@cpython
def test_cpython_settle_does_not_report_a_nursery(real_gc, monkeypatch):
    messages = _logged(monkeypatch)
    CollectorTuning(environ={}).settle()
    assert "nursery" not in " ".join(messages())


def test_make_service_hands_the_collector_to_the_service_and_the_watcher(tmp_path):
    from gateway.tap import Options, makeService

    path = tmp_path / "gw.yaml"
    path.write_text("listen: tcp:0:interface=127.0.0.1\n" + _CONFIG.format(service="a"))
    options = Options()
    options.parseOptions(["--config", str(path)])
    collector = _Recorder()
    root = makeService(options, MemoryReactorClock(), collector=collector)
    assert root.collector is collector
    assert root.getServiceNamed("config-watcher")._collector is collector
    # a caller that brings its own reactor (a test) gets no tuning unasked
    assert makeService(options, MemoryReactorClock()).collector is None


# --- glibc's malloc ------------------------------------------------------------


class _Mallopt:
    """A C{mallopt} that records its calls and answers C{result}."""

    def __init__(self, result=1):
        self.calls = []
        self.result = result

    def __call__(self, param, value):
        self.calls.append((param, value))
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_start_sets_the_malloc_thresholds(monkeypatch):
    messages = _logged(monkeypatch)
    mallopt = _Mallopt()
    # (PyPy's gc: the malloc thresholds do not depend on the collector)
    tuning = CollectorTuning(gc=_pypy_gc(), environ={}, mallopt=mallopt)
    tuning.start()
    assert mallopt.calls == [
        (M_MMAP_THRESHOLD, 4 * 1024 * 1024),
        (M_TRIM_THRESHOLD, 32 * 1024 * 1024),
    ]
    assert messages() == ["malloc: blocks under 4 MiB come from the heap, trimmed above 32 MiB free"]


MMAP = (M_MMAP_THRESHOLD, 4 * 1024 * 1024)
TRIM = (M_TRIM_THRESHOLD, 32 * 1024 * 1024)


@pytest.mark.parametrize(
    "environ, kept, calls",
    [
        ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}, "mmap", [TRIM]),
        ({"GLIBC_TUNABLES": "glibc.pthread.rseq=0:glibc.malloc.trim_threshold=0"}, "trim", [MMAP]),
        ({"MALLOC_MMAP_THRESHOLD_": "131072"}, "mmap", [TRIM]),
        ({"MALLOC_TRIM_THRESHOLD_": "0"}, "trim", [MMAP]),
    ],
)
def test_a_threshold_the_environment_sets_is_kept(monkeypatch, environ, kept, calls):
    messages = _logged(monkeypatch)
    mallopt = _Mallopt()
    assert not CollectorTuning(gc=_pypy_gc(), environ=environ, mallopt=mallopt).tune_malloc()
    assert mallopt.calls == calls
    assert messages() == [f"malloc: {kept} threshold left as the environment sets it"]


def test_both_thresholds_from_the_environment_leave_malloc_alone():
    mallopt = _Mallopt()
    environ = {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0", "MALLOC_MMAP_THRESHOLD_": "1"}
    assert not CollectorTuning(gc=_pypy_gc(), environ=environ, mallopt=mallopt).tune_malloc()
    assert mallopt.calls == []


def test_other_malloc_settings_do_not_stop_the_thresholds():
    mallopt = _Mallopt()
    environ = {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0",
        "MALLOC_ARENA_MAX": "2",
    }
    assert CollectorTuning(gc=_pypy_gc(), environ=environ, mallopt=mallopt).tune_malloc()
    assert mallopt.calls == [MMAP, TRIM]


@pytest.mark.parametrize("value", ["off", "0", "no", "false", " OFF "])
def test_malloc_tuning_can_be_turned_off_alone(monkeypatch, value):
    messages = _logged(monkeypatch)
    mallopt = _Mallopt()
    environ = {"TXGATEWAY_MALLOC_TUNING": value}
    assert not CollectorTuning(gc=_pypy_gc(), environ=environ, mallopt=mallopt).tune_malloc()
    assert mallopt.calls == [] and messages() == []


def test_a_refused_threshold_stops_the_tuning(monkeypatch):
    messages = _logged(monkeypatch)
    mallopt = _Mallopt(0)
    assert not CollectorTuning(gc=_pypy_gc(), environ={}, mallopt=mallopt).tune_malloc()
    assert mallopt.calls == [MMAP]  # the trim threshold is not set after a refusal
    assert messages() == [
        "malloc: mallopt refused a mmap threshold of 4194304 bytes; large bodies may cost page faults"
    ]


def test_a_failing_mallopt_is_logged_and_never_raises(monkeypatch):
    messages = _logged(monkeypatch)
    failing = _Mallopt(OSError("no"))
    assert not CollectorTuning(gc=_pypy_gc(), environ={}, mallopt=failing).tune_malloc()
    assert messages()[-1].startswith("malloc: setting its mmap threshold failed")


def test_without_mallopt_malloc_is_left_alone(monkeypatch):
    messages = _logged(monkeypatch)
    assert not CollectorTuning(gc=_pypy_gc(), environ={}).tune_malloc()
    assert messages() == []


_GLIBC = hasattr(os, "confstr") and bool(os.confstr("CS_GNU_LIBC_VERSION"))


_MALLOPT_EFFECTS = """
import ctypes, json
from gateway.heap import (
    M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD, glibc_mallopt,
)

class MallInfo2(ctypes.Structure):  # glibc 2.33+: ten size_t fields
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
mallopt = glibc_mallopt()

def mapped_by(size):  # bytes mapped for the block alone
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(size)
    after = libc.mallinfo2().hblkhd
    libc.free(block)
    return after - before

def kept_after(size):  # free bytes left at the heap's top once the block is freed
    libc.free(libc.malloc(size))
    return libc.mallinfo2().keepcost

ok = [mallopt(M_TRIM_THRESHOLD, 128 * 1024), mallopt(M_MMAP_THRESHOLD, 128 * 1024)]
libc.malloc_trim(0)
effects = [mapped_by(1 << 20)]
ok.append(mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD))
effects += [mapped_by(1 << 20), kept_after(2 << 20)]
ok.append(mallopt(M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))
effects.append(kept_after(2 << 20))
print(json.dumps([ok, effects]))
"""


@pytest.mark.skipif(not _GLIBC, reason="glibc's mallopt")
def test_glibc_mallopt_moves_the_real_thresholds():
    """
    glibc's mallopt answers 1 even for parameters it does not know, so the
    constants are checked by their effect, in a fresh process (a long test
    run's heap has free blocks that would serve the allocations): a 1 MiB
    block is mapped for itself under a 128 KiB mmap threshold and comes
    from the heap under 4 MiB; a freed 2 MiB block at the heap's top is
    given back under a 128 KiB trim threshold and kept under 32 MiB.
    """
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("glibc older than 2.33: no mallinfo2")
    out = subprocess.run(
        [sys.executable, "-c", _MALLOPT_EFFECTS], capture_output=True, text=True, timeout=60, cwd=ROOT, check=True
    ).stdout
    ok, (mapped_small, mapped_large, kept_small, kept_large) = json.loads(out)
    assert ok == [1, 1, 1, 1]
    assert mapped_small >= 1 << 20 and mapped_large == 0
    assert kept_small < 1 << 20 <= 2 << 20 <= kept_large, (kept_small, kept_large)


def test_glibc_mallopt_is_none_without_glibc(monkeypatch):
    def no_such_name(name):
        raise ValueError("unrecognized configuration name")

    monkeypatch.setattr(os, "confstr", no_such_name)
    assert glibc_mallopt() is None
    monkeypatch.setattr(os, "confstr", lambda name: None)
    assert glibc_mallopt() is None


@pytest.mark.parametrize("implementation", ["PyPy", "GraalVM"])
def test_only_cpython_gets_mallopt_by_default(monkeypatch, implementation):
    import platform

    monkeypatch.setattr(platform, "python_implementation", lambda: implementation)
    assert default_mallopt() is None


@pytest.mark.skipif(not _GLIBC, reason="glibc's mallopt")
def test_cpython_gets_glibc_mallopt_by_default(monkeypatch):
    import platform

    monkeypatch.setattr(platform, "python_implementation", lambda: "CPython")
    assert default_mallopt() is not None
