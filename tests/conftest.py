import os

import pytest

from tests.harness import ON_PYPY, Backend


@pytest.fixture(scope="session")
def backends():
    """Three demo backend processes, a, b and c, for the whole session."""
    started = []
    try:
        for name in ("a", "b", "c"):
            started.append(Backend(name))
        yield started
    finally:
        for backend in started:
            backend.stop()


def pytest_collection_modifyitems(config, items):
    """
    Tests marked C{cpython_only} are about CPython itself (its small-object
    allocator, measured with tracemalloc, which PyPy lacks; C{gc.freeze}):
    under PyPy they are deselected, and counted as such, rather than
    skipped.  Tests marked C{pypy_only} (PyPy's collector) are deselected
    under CPython, and those marked C{needs_splice} (L{gateway.splice})
    where Python has no C{os.splice} (before 3.10, PyPy 3.9, not Linux).
    """
    other = "cpython_only" if ON_PYPY else "pypy_only"
    dropped = {other} if hasattr(os, "splice") else {other, "needs_splice"}
    kept = [item for item in items if not any(item.get_closest_marker(m) for m in dropped)]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """
    With TXGATEWAY_NO_SKIPS=1 (set by .ci/run, where every tool the tests
    use is installed) a skipped test fails: a missing browser, systemd tool
    or optional package must not pass CI silently.
    """
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("TXGATEWAY_NO_SKIPS") and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped, but TXGATEWAY_NO_SKIPS is set: {report.longrepr}"
