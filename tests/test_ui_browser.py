"""
Issue 8: the dashboard and the waiting page in a real headless Chromium.

Debian's C{chromium} and C{chromium-driver}, driven by Selenium with an
explicit driver path (no driver download, no network).  Screenshots go to
C{tests/artifacts/}.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require
from support.backendproc import free_port
from support.hestiaproc import PYTHON, BackendSpec, HestiaProcess, reap_leftovers, stop_cleanly

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).with_name("artifacts")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require(os.path.exists(CHROMEDRIVER) and os.path.exists(CHROMIUM),
            "needs Debian's chromium and chromium-driver (scripts/install-system-deps.sh)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage", "--window-size=1280,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


class Gw:
    def __init__(self, tmp: Path) -> None:
        self.echo = BackendSpec("echo", tmp)
        self.site = tmp / "site"
        self.site.mkdir()
        (self.site / "index.html").write_text(
            "<html><head><title>Real page</title></head><body><h1 id='real'>the real page</h1></body></html>"
        )
        web_port = free_port()
        web = f"sleep 1; exec {PYTHON} -m http.server {web_port} --bind 127.0.0.1 --directory {self.site}"
        self.gw = HestiaProcess({
            "services": {
                "echo": self.echo.service("--start-delay", "0.3", idle_timeout=0),
                "web": {"url": f"http://127.0.0.1:{web_port}", "command": web,
                        "health": {"path": "/"}, "idle_timeout": 0},
            },
        }, tmp / "hestia").start()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gw]:
    tmp = tmp_path_factory.mktemp("browser")
    fixture = Gw(tmp)
    try:
        yield fixture
    finally:
        stop_cleanly(fixture.gw, tmp)


def until(driver: Any, condition: Callable[[Any], Any], timeout: float = 15.0) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05,
                         ignored_exceptions=(StaleElementReferenceException,)).until(condition)


def row_state(driver: Any, name: str) -> str | None:
    from selenium.webdriver.common.by import By

    cells = driver.find_elements(By.CSS_SELECTOR, f"tr[data-service='{name}'] .state")
    return cells[0].get_attribute("data-state") if cells else None


def test_dashboard_shows_state_changes_and_stops_a_service(browser: Any, gw: Gw) -> None:
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(exist_ok=True)
    browser.get(gw.gw.url + "/v1/ui/")
    assert browser.title == "Hestia"
    until(browser, lambda d: row_state(d, "echo") == "stopped")
    assert row_state(browser, "web") == "stopped"

    # A request from elsewhere starts the service: the dashboard follows.
    assert gw.gw.http.get("/services/echo/health").status_code == 200
    until(browser, lambda d: row_state(d, "echo") == "ready")
    row = browser.find_element(By.CSS_SELECTOR, "tr[data-service='echo']")
    assert "process" in row.text
    browser.save_screenshot(str(ARTIFACTS / "dashboard-ready.png"))

    # Press stop; the service stops, for the gateway and on the page.
    def press_stop(d: Any) -> bool:
        button = d.find_element(By.CSS_SELECTOR, "tr[data-service='echo'] button[data-action='stop']")
        if not button.is_enabled():
            return False
        button.click()
        return True

    until(browser, press_stop)
    until(browser, lambda d: row_state(d, "echo") == "stopped")
    assert gw.gw.state("echo") == "stopped"
    browser.save_screenshot(str(ARTIFACTS / "dashboard-stopped.png"))

    # And start it from the page.
    def press_start(d: Any) -> bool:
        button = d.find_element(By.CSS_SELECTOR, "tr[data-service='echo'] button[data-action='start']")
        if not button.is_enabled():
            return False
        button.click()
        return True

    until(browser, press_start)
    until(browser, lambda d: row_state(d, "echo") == "ready")


def test_waiting_page_reloads_into_the_real_page(browser: Any, gw: Gw) -> None:
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(exist_ok=True)
    gw.gw.http.post("/v1/services/web/stop")
    browser.get(gw.gw.service_url("web") + "/")
    # The waiting page first: the service's name and its state.
    assert browser.find_element(By.ID, "name").text == "web"
    assert browser.find_element(By.ID, "state").text in ("starting", "ready")
    browser.save_screenshot(str(ARTIFACTS / "waiting-page.png"))
    # Then, by itself, the real page.
    until(browser, lambda d: d.title == "Real page", timeout=20)
    assert browser.find_element(By.ID, "real").text == "the real page"
    assert gw.gw.state("web") == "ready"


def test_waiting_page_shows_a_failed_start(browser: Any, gw: Gw, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    broken = BackendSpec("broken", tmp_path)
    config = {
        "services": {"broken": broken.service("--fail-start", "3", "--start-delay", "0.5", idle_timeout=0)},
    }
    other = HestiaProcess(config, tmp_path / "hestia").start()
    try:
        browser.get(other.service_url("broken") + "/")
        until(browser, lambda d: d.find_element(By.ID, "failed").is_displayed(), timeout=20)
        assert browser.find_element(By.ID, "state").text == "failed"
        reason = browser.find_element(By.ID, "reason").text
        assert reason and "3" in reason
        assert not browser.find_element(By.ID, "progress-box").is_displayed()
        browser.save_screenshot(str(ARTIFACTS / "waiting-page-failed.png"))
    finally:
        other.stop()
        reap_leftovers(str(tmp_path))
