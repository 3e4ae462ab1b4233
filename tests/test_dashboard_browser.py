"""
The dashboard in a real headless browser: Debian's C{chromium} driven by
C{chromedriver} through selenium. Requests sent through the gateway must
appear in the page's table within a second. A screenshot is saved to
C{$ARTIFACTS/dashboard.png} (default C{./artifacts/}) for CI to keep.

Skipped when selenium, chromium or chromedriver is missing; CI installs
them (C{apt-get install chromium chromium-driver}, C{pip install .[test]}).
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.harness import ROOT, Gateway, get

webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason="chromium and chromium-driver are not installed",
)

ARTIFACTS = os.environ.get("ARTIFACTS") or os.path.join(ROOT, "artifacts")


@pytest.fixture(scope="module")
def gateway(backends):
    a, b, _ = backends
    gw = Gateway(
        f"""
listen: tcp:0:interface=127.0.0.1
admin: {{listen: "tcp:0:interface=127.0.0.1"}}
services:
  users:
    backends: [{{url: {a.url}}}, {{url: {b.url}}}]
routes:
  - name: users-api
    match: {{path_prefix: /api/users}}
    service: users
"""
    )
    yield gw
    assert gw.stop() == 0, gw.log()
    assert "Traceback" not in gw.log(), gw.log()


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "--window-size=1280,1100",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(predicate, timeout: float, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return value
        time.sleep(interval)


def test_requests_appear_in_the_table_within_a_second(gateway, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"http://127.0.0.1:{gateway.admin_port}/dashboard/")
    state = browser.find_element(By.ID, "connection")
    assert wait_until(lambda: state.text == "live", 10), state.text

    ids = [f"browser-{i}-{time.monotonic_ns()}" for i in range(5)]
    sent = time.monotonic()
    for i, request_id in enumerate(ids):
        r = get(gateway.port, f"/api/users/{i}?page=1", headers={"X-Request-Id": request_id})
        assert r.status == 200

    def rows():
        found = {}
        for request_id in ids:
            elements = browser.find_elements(By.CSS_SELECTOR, f'#requests tr[data-request-id="{request_id}"]')
            if not elements:
                return None
            found[request_id] = elements[0]
        return found

    found = wait_until(rows, 1.0)
    elapsed = time.monotonic() - sent
    assert found, f"requests not in the table {elapsed:.2f}s after they were sent"
    assert elapsed < 1.5  # the 1 s budget, plus the time taken to send them
    cells = [td.text for td in found[ids[2]].find_elements(By.TAG_NAME, "td")]
    method, path, route, backend, status, ms, cache, request_id = cells[1:]
    assert (method, path, route, status, request_id) == ("GET", "/api/users/2", "users-api", "200", ids[2])
    assert backend.startswith("http://127.0.0.1:") and float(ms) >= 0

    # The next summary tick fills the counters, the charts and the backends.
    assert wait_until(lambda: int(browser.find_element(By.ID, "total-requests").text) >= 5, 3)
    backends = browser.find_elements(By.CSS_SELECTOR, "#backends tbody tr")
    assert len(backends) == 2 and all("healthy" in b.text and "closed" in b.text for b in backends)
    assert browser.find_element(By.ID, "rps").text != "–"

    os.makedirs(ARTIFACTS, exist_ok=True)
    for _ in range(20):  # some traffic for the charts to show
        get(gateway.port, "/api/users/chart")
    time.sleep(1.2)
    path = os.path.join(ARTIFACTS, "dashboard.png")
    assert browser.save_screenshot(path)
    assert os.path.getsize(path) > 10_000

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def test_client_text_is_never_html(gateway, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"http://127.0.0.1:{gateway.admin_port}/dashboard/")
    state = browser.find_element(By.ID, "connection")
    assert wait_until(lambda: state.text == "live", 10)
    get(gateway.port, "/api/users/%3Cimg%20src=x%20onerror=alert(1)%3E", headers={"X-Request-Id": "xss-probe"})
    row = wait_until(
        lambda: browser.find_elements(By.CSS_SELECTOR, '#requests tr[data-request-id="xss-probe"]'), 2
    )
    assert row
    assert browser.find_elements(By.CSS_SELECTOR, "#requests img") == []
