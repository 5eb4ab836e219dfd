"""
Issue 16: the dashboard's costs table and 7-day timeline in a real headless
Chromium (driven as in test_ui_browser.py), over a state database holding a
few days of history and a live cold start.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import StartHestia
from support.hestiaproc import BackendSpec
from test_ui_browser import ARTIFACTS, browser, until

from hestia.state import migrate

pytestmark = [pytest.mark.browser, pytest.mark.integration]
__all__ = ["browser"]  # the fixture, imported for this module's tests

HOUR = 3600.0


def _history(path: Path, now: float) -> None:
    """Three days of spans: a cold start, a prewarm start and a schedule window."""
    connection = sqlite3.connect(path)
    migrate(connection)
    rows = [
        ("gpu", "gpu", now - 3 * 24 * HOUR, now - 3 * 24 * HOUR + 2 * HOUR, 1.5, "request", "alice"),
        ("gpu", "gpu", now - 2 * 24 * HOUR, now - 2 * 24 * HOUR + HOUR, 1.5, "prewarm", None),
        ("gpu", "gpu", now - 1 * 24 * HOUR, now - 1 * 24 * HOUR + 3 * HOUR, 1.5, "schedule", None),
    ]
    connection.executemany(
        "INSERT INTO running_spans (service, unit, started_at, ended_at, checkpoint_at, rate, reason, woken_by)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(s, u, a, b, b, r, why, who) for s, u, a, b, r, why, who in rows],
    )
    connection.execute("INSERT INTO accounting (key, value) VALUES ('since', ?)", (now - 4 * 24 * HOUR,))
    connection.commit()
    connection.close()


def test_dashboard_shows_costs_and_the_seven_day_timeline(
    browser: Any, hestia: StartHestia, tmp_path: Path  # noqa: F811
) -> None:
    from selenium.webdriver.common.by import By

    spec = BackendSpec("gpu", tmp_path)
    state = tmp_path / "state.db"
    _history(state, time.time())
    gateway = hestia({
        "server": {"state_path": str(state)},
        "costs": {"currency": "EUR"},
        "services": {"gpu": spec.service(cost_per_hour=1.5, idle_timeout=0)},
    })
    assert gateway.http.get("/services/gpu/health").status_code == 200  # a cold start now
    gateway.http.post("/v1/services/gpu/stop")
    gateway.wait_state("gpu", "stopped")
    report = gateway.http.get("/v1/costs").json()
    [gpu] = report["services"]
    assert gpu["starts"] == 4 and gpu["cold_starts"] == 2 and gpu["prewarm_starts"] == 1

    ARTIFACTS.mkdir(exist_ok=True)
    browser.get(gateway.url + "/v1/ui/")
    row = "#costs tr[data-service='gpu']"
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row + " td.starts")
          and d.find_element(By.CSS_SELECTOR, row + " td.starts").text == "4")
    assert browser.find_element(By.CSS_SELECTOR, row + " td.cost").text == f"{gpu['cost']:.2f} EUR"
    assert browser.find_element(By.CSS_SELECTOR, row + " td.saved").text == f"{gpu['saved']:.2f}"
    spans = browser.find_elements(By.CSS_SELECTOR, row + " svg.timeline rect.span")
    assert sorted(span.get_attribute("data-reason") for span in spans) == ["prewarm", "request", "request", "schedule"]
    assert len(browser.find_elements(By.CSS_SELECTOR, row + " svg.timeline .mark-cold")) == 2
    assert len(browser.find_elements(By.CSS_SELECTOR, row + " svg.timeline .mark-prewarm")) == 1
    # The spans sit where their days are on a 700-wide week: 3 days ago at 4/7, today's at the right end.
    positions = sorted(float(span.get_attribute("x")) for span in spans)
    assert positions[0] == pytest.approx(700 * 4 / 7, abs=3)
    assert positions[-1] > 695
    browser.find_element(By.ID, "costs-section").location_once_scrolled_into_view  # noqa: B018
    browser.save_screenshot(str(ARTIFACTS / "dashboard-costs.png"))

    # Another period: today has only the live start.
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, "period")).select_by_value("day")
    until(browser, lambda d: d.find_element(By.CSS_SELECTOR, row + " td.starts").text in ("1", "2"))
