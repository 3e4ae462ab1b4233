import os

import pytest

from tests.harness import Backend


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
