"""
Issue 16, live: costs and schedules in a real C{twistd -n hestia} with real
backend processes.  Bounds are generous: the assertions are about outcomes
(what was accounted, what started), not about speed.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import StartHestia
from support.backendproc import wait_for
from support.hestiaproc import VENV_BIN, BackendSpec, clean_environ, reap_leftovers

pytestmark = pytest.mark.integration

CHECKPOINT_EVERY = 5.0  # hestia.costs.CHECKPOINT_EVERY: what a SIGKILL may lose


def _config(spec: BackendSpec, state: Path, **settings: Any) -> dict[str, Any]:
    return {
        "server": {"state_path": str(state)},
        "costs": {"currency": "EUR"},
        "timezone": "UTC",
        # 3600 an hour: the cost is the running seconds.
        "services": {"gpu": spec.service(cost_per_hour=3600, idle_timeout=0, **settings)},
    }


def _metric(text: str, name: str, service: str) -> float:
    match = re.search(rf'^{name}\{{[^}}]*service="{service}"[^}}]*\}} (\S+)$', text, re.M)
    assert match, f"{name} for {service} not in the metrics"
    return float(match.group(1))


def _elapsed_ready(status: dict[str, Any]) -> float:
    since = datetime.fromisoformat(status["state_since"].replace("Z", "+00:00"))
    return (datetime.now(UTC) - since).total_seconds()


def test_costs_follow_running_time_and_survive_restart_and_sigkill(hestia: StartHestia, tmp_path: Path) -> None:
    spec = BackendSpec("gpu", tmp_path)
    state = tmp_path / "state.db"
    first = hestia(_config(spec, state))
    assert first.http.get("/services/gpu/health").status_code == 200
    time.sleep(2.0)
    status = first.status("gpu")
    assert status["state"] == "ready"
    elapsed = _elapsed_ready(status)
    assert elapsed - 0.5 <= status["running_seconds_total"] <= elapsed + 0.5
    assert status["cost_total"] == pytest.approx(status["running_seconds_total"], abs=0.01)
    first.http.post("/v1/services/gpu/stop")
    stopped = first.wait_state("gpu", "stopped")
    total = stopped["running_seconds_total"]
    assert total >= 2.0

    # /v1/costs and the metrics say the same, and the same as the status.
    report = first.http.get("/v1/costs", params={"period": "all"}).json()
    assert report["currency"] == "EUR"
    [gpu] = [entry for entry in report["services"] if entry["name"] == "gpu"]
    metrics = first.http.get("/v1/metrics").text
    assert _metric(metrics, "hestia_service_running_seconds_total", "gpu") == pytest.approx(gpu["running_seconds"], abs=0.01)
    assert _metric(metrics, "hestia_service_cost_total", "gpu") == pytest.approx(gpu["cost"], abs=0.01)
    assert 'hestia_service_cost_total{currency="EUR",service="gpu"}' in metrics
    assert gpu["running_seconds"] == pytest.approx(total, abs=0.01)
    assert gpu["starts"] == 1 and gpu["cold_starts"] == 1
    assert gpu["woken_by"] == {"127.0.0.1": 1}
    assert gpu["always_on_cost"] > gpu["cost"] and gpu["saved"] == pytest.approx(gpu["always_on_cost"] - gpu["cost"], abs=0.01)
    assert first.http.get("/v1/costs", params={"period": "fortnight"}).status_code == 400
    # The command line shows the same, as a table.
    table = subprocess.run([str(VENV_BIN / "hestia"), "--url", first.url, "costs", "--period", "all"],
                           capture_output=True, text=True, env=clean_environ(), timeout=60, check=True).stdout
    [row] = [line.split() for line in table.splitlines() if line.startswith("gpu ")]
    assert row[2] == f"{gpu['cost']:.2f}" and row[5:] == ["1", "1", "0"]
    assert "COST EUR" in table and table.splitlines()[-1].startswith("TOTAL")

    # A graceful restart: the same total.
    first.stop()
    second = hestia(_config(spec, state))
    assert second.status("gpu")["running_seconds_total"] == pytest.approx(total, abs=0.01)

    # A SIGKILL while running: the next gateway keeps all but the last checkpoint interval.
    second.http.post("/v1/services/gpu/start", params={"wait": "true"})
    time.sleep(CHECKPOINT_EVERY + 2.5)
    running = _elapsed_ready(second.status("gpu"))
    second.signal(signal.SIGKILL)
    second.wait_exit()
    reap_leftovers(str(spec.request_log))  # the backend outlived its gateway
    third = hestia(_config(spec, state))
    after = third.status("gpu")["running_seconds_total"]
    assert total + running - CHECKPOINT_EVERY - 1.0 <= after <= total + running + 0.5
    week = third.http.get("/v1/costs", params={"period": "week"}).json()
    assert [entry["starts"] for entry in week["services"] if entry["name"] == "gpu"] == [2]


def _window(start: datetime, hours: float) -> str:
    end = start + timedelta(hours=hours)
    return f"{start:%H:%M}-{end:%H:%M}"


def test_a_window_covering_now_starts_the_service_and_keeps_it_from_idling(
    hestia: StartHestia, tmp_path: Path
) -> None:
    spec = BackendSpec("gpu", tmp_path)
    now = datetime.now(UTC)
    config = _config(spec, tmp_path / "state.db", schedule=[_window(now - timedelta(minutes=30), 2)])
    config["services"]["gpu"]["idle_timeout"] = 1
    gateway = hestia(config)
    status = gateway.wait_state("gpu", "ready", timeout=20)
    assert status["state_reason"] == "started" and status["held_by"] == ["schedule"]
    time.sleep(3.0)  # three idle timeouts
    assert gateway.state("gpu") == "ready"
    assert spec.requests() == [] or all(entry["path"] == "/health" for entry in spec.requests())
    events = gateway.http.get("/v1/services/gpu/events").json()["events"]
    assert any(event["kind"] == "start" and event["reason"] == "schedule" for event in events)


def test_a_window_later_leaves_the_service_stopped(hestia: StartHestia, tmp_path: Path) -> None:
    spec = BackendSpec("gpu", tmp_path)
    later = datetime.now(UTC) + timedelta(hours=2)
    gateway = hestia(_config(spec, tmp_path / "state.db", schedule=[_window(later, 1)]))
    time.sleep(2.0)
    assert gateway.state("gpu") == "stopped"
    assert spec.starts() == 0
    assert gateway.status("gpu")["held_by"] == []


def _habit_in_five_minutes(state: Path) -> None:
    """The last three weeks each had a first use at this time of the week, 5 minutes from now."""
    import sqlite3

    from hestia.state import migrate

    connection = sqlite3.connect(state)
    migrate(connection)
    soon = time.time() + 300
    connection.executemany("INSERT INTO first_uses (service, at) VALUES ('gpu', ?)",
                           [(soon - weeks * 7 * 86400,) for weeks in (1, 2, 3)])
    connection.commit()
    connection.close()


def test_prewarm_starts_a_service_ahead_of_a_habit_learnt_from_history(hestia: StartHestia, tmp_path: Path) -> None:
    spec = BackendSpec("gpu", tmp_path)
    state = tmp_path / "state.db"
    _habit_in_five_minutes(state)
    config = _config(spec, state, prewarm={"lead": "10m", "min_weeks": 2, "budget_per_day": 10000})
    config["services"]["gpu"]["idle_timeout"] = 1
    gateway = hestia(config)
    status = gateway.wait_state("gpu", "ready", timeout=20)
    assert status["held_by"] == ["prewarm"]  # kept up until the habitual time, then the idle rule
    time.sleep(2.0)
    assert gateway.state("gpu") == "ready"
    assert all(entry["path"] == "/health" for entry in spec.requests())  # no request started it
    events = gateway.http.get("/v1/services/gpu/events").json()["events"]
    [decision] = [event for event in events if event["kind"] == "prewarm"]
    assert decision["reason"].startswith("prewarm: started, habitually used ")
    assert "(3 of the last 3 weeks)" in decision["reason"]
    assert any(event["kind"] == "start" and event["reason"] == "prewarm" for event in events)
    report = gateway.http.get("/v1/costs").json()
    assert [entry["prewarm_starts"] for entry in report["services"]] == [1]


def test_prewarm_over_budget_is_skipped_and_says_why(hestia: StartHestia, tmp_path: Path) -> None:
    spec = BackendSpec("gpu", tmp_path)
    state = tmp_path / "state.db"
    _habit_in_five_minutes(state)
    # 3600 EUR an hour: a guess running up to 5 minutes plus the idle timeout costs ~360.
    config = _config(spec, state, prewarm={"budget_per_day": 1.5})
    config["services"]["gpu"]["idle_timeout"] = 60
    gateway = hestia(config)

    def decided() -> list[dict[str, Any]]:
        events = gateway.http.get("/v1/services/gpu/events").json()["events"]
        return [event for event in events if event["kind"] == "prewarm"]

    assert wait_for(decided, 10.0)
    [decision] = decided()
    assert decision["reason"].startswith("prewarm: skipped, habitually used ")
    assert "of 1.50 EUR" in decision["reason"]
    assert gateway.state("gpu") == "stopped" and spec.starts() == 0
