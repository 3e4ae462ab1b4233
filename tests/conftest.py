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
