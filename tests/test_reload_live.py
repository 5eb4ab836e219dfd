"""
Issue 19, live: a reload restarts only what must restart.

A real C{twistd hestia}, real backends (tests/support/backend.py) and, for a remote
machine, the Semaphore UI double: a changed timeout keeps the running process;
a changed command waits for an explicit restart, under load, without a failed
request; a removed service finishes its stream first; a semaphore VM is not
torn down because a number changed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import StartHestia
from support.backendproc import pid_alive, wait_for
from support.hestiaproc import VENV_BIN, BackendSpec, HestiaProcess, clean_environ

# The Semaphore double and its helpers, shared with the backend's own tests; the browser of the UI's.
from test_semaphore_backend import SLOW_START, START, STOP, alive_vms, config, double, gateways, run, tasks_of
from test_ui_browser import browser, until

__all__ = ["browser", "double", "gateways"]  # fixtures, used by name

pytestmark = [pytest.mark.timeout(120)]


def reload(gateway: HestiaProcess, config: dict[str, Any]) -> None:
    gateway.write_config({**config, "server": {"listen": gateway.listen, **config.get("server", {})}})
    gateway.signal(signal.SIGHUP)


def test_a_changed_idle_timeout_keeps_the_process_and_takes_effect(hestia: StartHestia, tmp_path: Path) -> None:
    spec = BackendSpec("a", tmp_path)
    gateway = hestia({"services": {"a": spec.service(idle_timeout=0)}})
    assert gateway.http.get("/services/a/health").status_code == 200
    pid = gateway.status("a")["details"]["pid"]

    reload(gateway, {"services": {"a": spec.service(idle_timeout=5)}})
    status = gateway.wait_status("a", "idle_timeout", 5, timeout=10)
    assert status["state"] == "ready" and status["details"]["pid"] == pid and pid_alive(pid)
    assert status["restart_pending"] is False
    assert wait_for(lambda: "changed in place: a (idle_timeout)" in gateway.log_text(), 5), gateway.log_text()
    assert "a: ready -> stopping (reload)" not in gateway.log_text()
    # The new timeout is in effect: idle_timeout 0 meant "never".
    gateway.wait_state("a", "stopped", timeout=30)
    assert not pid_alive(pid) and spec.starts() == 1
    assert "a: ready -> stopping (idle)" in gateway.log_text()


def test_a_changed_command_waits_for_a_restart_and_no_request_fails(hestia: StartHestia, tmp_path: Path) -> None:
    spec = BackendSpec("a", tmp_path)
    old = spec.service("--name", "old", idle_timeout=0)
    gateway = hestia({"services": {"a": old}})
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=gateway.url, trust_env=False, timeout=60) as client:
            while not stop.is_set():
                try:
                    response = client.get("/services/a/health")
                    name = response.json().get("name", "?") if response.status_code == 200 else response.text
                    seen.append((response.status_code, name))
                except httpx.HTTPError as error:
                    seen.append((0, repr(error)))

    threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        assert wait_for(lambda: len(seen) > 20, 20)
        pid = gateway.status("a")["details"]["pid"]

        reload(gateway, {"services": {"a": spec.service("--name", "new", idle_timeout=0)}})
        status = gateway.wait_status("a", "restart_pending", True, timeout=10)
        assert status["pending_changes"] == ["command"] and status["details"]["pid"] == pid
        assert wait_for(lambda: "restart pending: a (command)" in gateway.log_text(), 5)
        served = len(seen)
        assert wait_for(lambda: len(seen) > served + 20, 20)
        assert {name for _, name in seen[served:]} == {"old"}  # the old process keeps serving
        assert gateway.status("a")["details"]["pid"] == pid and spec.starts() == 1

        restarted = gateway.http.post("/v1/services/a/restart", params={"wait": "true"}, timeout=60)
        assert restarted.status_code == 200, restarted.text
        after = restarted.json()
        assert after["state"] == "ready" and after["restart_pending"] is False
        assert after["details"]["pid"] != pid and not pid_alive(pid) and spec.starts() == 2
        switched = len(seen)
        assert wait_for(lambda: len(seen) > switched + 20, 20)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    failures = [entry for entry in seen if entry[0] != 200]
    assert not failures, failures[:5]
    names = [name for _, name in seen]
    assert set(names[switched:]) == {"new"}  # the new command serves from then on
    first_new = names.index("new")
    assert set(names[:first_new]) == {"old"}


def test_hestia_restart_command(hestia: StartHestia, tmp_path: Path) -> None:
    spec = BackendSpec("a", tmp_path)
    gateway = hestia({"services": {"a": spec.service(idle_timeout=0)}})
    assert gateway.http.get("/services/a/health").status_code == 200
    pid = gateway.status("a")["details"]["pid"]
    reload(gateway, {"services": {"a": spec.service("--name", "b", idle_timeout=0)}})
    gateway.wait_status("a", "restart_pending", True, timeout=10)
    result = subprocess.run(
        [str(VENV_BIN / "hestia"), "restart", "a"], env=clean_environ({"HESTIA_URL": gateway.url}),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "a: ready (restarted with new command)"
    assert gateway.status("a")["details"]["pid"] != pid
    assert gateway.http.get("/services/a/health").json()["name"] == "b"


def test_a_removed_service_finishes_its_stream_before_it_stops(hestia: StartHestia, tmp_path: Path) -> None:
    gone, kept = BackendSpec("gone", tmp_path), BackendSpec("kept", tmp_path)
    services = {"gone": gone.service(idle_timeout=0, stop_timeout=30), "kept": kept.service()}
    gateway = hestia({"services": services})
    lines: list[dict[str, Any]] = []
    errors: list[str] = []
    first = threading.Event()

    def stream() -> None:
        try:
            with httpx.Client(trust_env=False, timeout=30) as client, client.stream(
                "GET", gateway.service_url("gone") + "/stream", params={"n": 40, "interval": 0.15}
            ) as response:
                for line in response.iter_lines():
                    if line:
                        lines.append(json.loads(line))
                        first.set()
        except httpx.HTTPError as error:
            errors.append(repr(error))
        first.set()

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    assert first.wait(20) and not errors
    pid = gateway.status("gone")["details"]["pid"]

    reload(gateway, {"services": {"kept": services["kept"]}})
    assert wait_for(lambda: gateway.http.get("/v1/services/gone/status").status_code == 404, 10)
    if reader.is_alive():
        assert pid_alive(pid)  # still streaming, so still running
    reader.join(30)
    # Every line arrived: the process was not stopped under the stream (the old code cut it).
    assert not errors and [line["i"] for line in lines] == list(range(40))
    assert wait_for(lambda: not pid_alive(pid), 10)
    log = gateway.log_text()
    assert "gone: ready -> stopping (removed)" in log and "removed (stopping once idle): gone" in log


@pytest.mark.semaphore
def test_a_semaphore_vm_is_not_stopped_by_a_reload(gateways: list[HestiaProcess], tmp_path: Path,
                                                   double: Any) -> None:
    cfg = config(double, tmp_path, "vm", idle_timeout=30)
    gateway = run(gateways, tmp_path, cfg)
    assert gateway.http.get("/services/vm/health", timeout=30).status_code == 200
    [vm] = alive_vms(double, "vm")

    # An in-place change: nothing happens to the machine.
    cfg["services"]["vm"]["idle_timeout"] = 60
    reload(gateway, cfg)
    status = gateway.wait_status("vm", "idle_timeout", 60, timeout=10)
    assert status["state"] == "ready" and status["restart_pending"] is False
    # A how-it-runs change (another start template), even with restart: now: pending, not stopped.
    cfg["services"]["vm"]["semaphore"]["start_template_id"] = SLOW_START
    reload(gateway, {**cfg, "reload": {"restart": "now"}})
    status = gateway.wait_status("vm", "restart_pending", True, timeout=10)
    assert status["pending_changes"] == ["semaphore"] and status["state"] == "ready"
    assert gateway.http.get("/services/vm/health", timeout=30).status_code == 200
    assert tasks_of(double, "vm", STOP) == []  # the double recorded no stop task
    assert [task["template_id"] for task in tasks_of(double, "vm")] == [START]
    assert alive_vms(double, "vm") == [vm]

    # Its next natural stop (here an explicit one) applies the change: the next start runs the new template.
    stopped = gateway.http.post("/v1/services/vm/stop", timeout=30).json()
    assert stopped["state"] == "stopped" and stopped["restart_pending"] is False
    assert gateway.http.get("/services/vm/health", timeout=30).status_code == 200
    assert [task["template_id"] for task in tasks_of(double, "vm") if task["template_id"] != STOP] == [
        START, SLOW_START]

    # Removed from the file: its stop task tears it down.
    reload(gateway, {**cfg, "services": {}})
    assert wait_for(lambda: [task["status"] for task in tasks_of(double, "vm", STOP)] == ["success"] * 2, 20)
    assert alive_vms(double, "vm") == []


def test_the_dashboard_offers_the_pending_restart(hestia: StartHestia, tmp_path: Path, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    spec = BackendSpec("a", tmp_path)
    gateway = hestia({"services": {"a": spec.service(idle_timeout=0)}})
    assert gateway.http.get("/services/a/health").status_code == 200
    browser.get(gateway.url + "/v1/ui/")
    selector = "tr[data-service='a'] button[data-action='restart']"
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "tr[data-service='a'] .state"))
    assert browser.find_elements(By.CSS_SELECTOR, selector) == []  # nothing pending, no button

    reload(gateway, {"services": {"a": spec.service("--name", "b", idle_timeout=0)}})
    button = until(browser, lambda d: (d.find_elements(By.CSS_SELECTOR, selector) or [None])[0])
    assert button.get_attribute("title") == "restart pending: command"
    button.click()
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, selector) == [], timeout=30)
    assert gateway.status("a")["restart_pending"] is False
    assert gateway.http.get("/services/a/health").json()["name"] == "b"
