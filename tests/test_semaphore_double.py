"""Tests of the Semaphore UI test double (tests/support/semaphore_double/).

The gateway's Semaphore tests are only as good as the double they run against, so
the NOTES.md rules the double claims to implement are pinned here, over real
HTTP against the double running as a real subprocess.  Every test also checks
that it left no protocol violation behind (``expect_violations`` consumes the
ones a test provokes on purpose), which proves the double's own responses pass
its spec validation.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from support.semaphore_double import (
    DoubleProcess,
    iter_pids_alive,
    parse_scenario,
)
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, Request, TextMessage

pytestmark = [pytest.mark.semaphore, pytest.mark.contract, pytest.mark.timeout(60)]

TOKEN = "double-test-token"
BACKEND = Path(__file__).resolve().parent / "support" / "backend.py"
# tests/support/backend.py is the project's VM stand-in; fall back to the stdlib if it is absent.
VM_COMMAND = (
    ["python", "tests/support/backend.py", "--port", "{port}", "--name", "{hestia_service}"]
    if BACKEND.exists()
    else ["python", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
)
VM_HEALTH = "/health" if BACKEND.exists() else "/"
SCENARIO: dict[str, Any] = {
    "queue_interval_seconds": 0.05,
    "templates": {
        "1": {"behaviour": "start", "name": "Start VM", "command": VM_COMMAND,
              "running_seconds": 0.05},
        "2": {"behaviour": "stop", "name": "Stop VM", "running_seconds": 0.02,
              "kill_grace_seconds": 2},
        "3": {"behaviour": "hang_waiting"},
        "4": {"behaviour": "error", "running_seconds": 0.02},
        "5": {"behaviour": "hang_running", "stop_delay_seconds": 0.05},
        "6": {"behaviour": "noop", "running_seconds": 0.02},
    },
}
FINISHED = {"success", "error", "stopped"}
Json = dict[str, Any]
T = TypeVar("T")


@pytest.fixture(scope="module")
def double(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DoubleProcess]:
    state = tmp_path_factory.mktemp("semaphore-double")
    proc = DoubleProcess(state, token=TOKEN, scenario=SCENARIO)
    with proc:
        yield proc
    assert proc.proc is not None and proc.proc.returncode == 0
    pids = [vm["pid"] for vm in json.loads((state / "vms.json").read_text())["vms"]]
    assert list(iter_pids_alive(pids)) == [], "the double left VM processes behind"


@pytest.fixture
def api(double: DoubleProcess) -> Iterator[httpx.Client]:
    """An authenticated client; afterwards, no unexpected protocol violation may remain."""
    double.admin("DELETE", "violations")
    with httpx.Client(base_url=double.api, timeout=5,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client
    assert double.violations() == []


def expect_violations(double: DoubleProcess, *kinds: str) -> list[Json]:
    """Assert the double recorded exactly these violations (in order), then forget them."""
    found = double.violations()
    assert [v["kind"] for v in found] == list(kinds), found
    double.admin("DELETE", "violations")
    return found


def start_task(api: httpx.Client, template_id: int, env: Json | None = None) -> Json:
    body: Json = {"template_id": template_id}
    if env is not None:
        body["environment"] = json.dumps(env)
    r = api.post("/project/1/tasks", json=body)
    assert r.status_code == 201, r.text
    task: Json = r.json()
    assert task["status"] == "waiting"
    return task


def poll(fetch: Callable[[], T], done: Callable[[T], bool], timeout: float = 5.0) -> T:
    """Short polling instead of fixed sleeps: fast when things go right, bounded when not."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; last value: {value}")
        time.sleep(0.02)


def wait_status(api: httpx.Client, task_id: int, *statuses: str, timeout: float = 5.0) -> Json:
    return poll(lambda: api.get(f"/project/1/tasks/{task_id}").json(),
                lambda t: t["status"] in statuses, timeout)


def admin_task(double: DoubleProcess, task_id: int) -> Json:
    return next(t for t in double.tasks() if t["id"] == task_id)


def stop(api: httpx.Client, task_id: int, body: Json) -> None:
    r = api.post(f"/project/{1}/tasks/{task_id}/stop", json=body)
    assert r.status_code == 204 and r.content == b""


def vm_of(double: DoubleProcess, machine_id: str) -> Json:
    """The newest VM provisioned for ``machine_id``."""
    return [vm for vm in double.vms() if vm["machine_id"] == machine_id][-1]


# ------------------------------------------------------------------ auth & ping


def test_ping_needs_no_login(double: DoubleProcess, api: httpx.Client) -> None:
    r = httpx.get(f"{double.api}/ping")
    assert (r.status_code, r.text) == (200, "pong")
    assert r.headers["content-type"].startswith("text/plain")
    assert httpx.head(f"{double.api}/ping").status_code == 200


def test_missing_or_wrong_token_is_401_with_empty_body(double: DoubleProcess,
                                                        api: httpx.Client) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}):
        r = httpx.get(f"{double.api}/project/1/templates", headers=headers)
        assert (r.status_code, r.content) == (401, b"")
    expect_violations(double, "unauthorized", "unauthorized", "unauthorized")


def test_unknown_project_is_404(double: DoubleProcess, api: httpx.Client) -> None:
    r = api.post("/project/2/tasks", json={"template_id": 6})
    assert r.status_code == 404
    expect_violations(double, "unknown_project")


def test_calls_outside_the_spec_or_the_double_are_recorded(double: DoubleProcess,
                                                           api: httpx.Client) -> None:
    assert api.get("/project/1/no-such-thing").status_code == 404
    assert api.put("/ping").status_code == 405
    assert api.delete("/project/1/tasks/1").status_code == 501  # in the spec, not modelled
    expect_violations(double, "unknown_endpoint", "method_not_allowed", "not_modelled_by_double")


# --------------------------------------------------------------- task creation


def test_template_id_must_be_a_json_integer(double: DoubleProcess, api: httpx.Client) -> None:
    for bad in ("6", 6.5, True):
        r = api.post("/project/1/tasks", json={"template_id": bad})
        assert r.status_code == 400, bad
    found = expect_violations(double, "request_schema", "request_schema", "request_schema")
    assert "is not of type 'integer'" in found[0]["detail"][0]
    r = api.post("/project/1/tasks", json={"template_id": 6, "debug": "yes"})
    assert r.status_code == 400  # booleans must be JSON booleans
    expect_violations(double, "request_schema")
    assert api.post("/project/1/tasks", json={"template_id": 999}).status_code == 404
    expect_violations(double, "unknown_template")


def test_environment_must_be_a_string_holding_a_json_object(double: DoubleProcess,
                                                           api: httpx.Client) -> None:
    r = api.post("/project/1/tasks", json={"template_id": 6, "environment": {"machine_id": "x"}})
    assert r.status_code == 400
    for text in ("not json", "[1, 2]"):
        r = api.post("/project/1/tasks", json={"template_id": 6, "environment": text})
        assert r.status_code == 400 and "error" in r.json()
    expect_violations(double, "request_schema", "environment_not_json", "environment_not_object")
    task = start_task(api, 6, {"machine_id": "env-ok", "hestia_service": "svc"})
    assert admin_task(double, task["id"])["environment"] == {"machine_id": "env-ok",
                                                            "hestia_service": "svc"}
    wait_status(api, task["id"], *FINISHED)


def test_unknown_task_is_400_not_404_and_no_violation(api: httpx.Client) -> None:
    for suffix in ("", "/output", "/raw_output"):
        r = api.get(f"/project/1/tasks/987654{suffix}")
        assert r.status_code == 400, suffix
    assert api.post("/project/1/tasks/987654/stop", json={}).status_code == 400


def test_stop_needs_a_json_body(double: DoubleProcess, api: httpx.Client) -> None:
    task = start_task(api, 3)
    r = api.post(f"/project/1/tasks/{task['id']}/stop")
    assert r.status_code == 400
    expect_violations(double, "empty_body")
    stop(api, task["id"], {"force": True})
    assert wait_status(api, task["id"], *FINISHED)["status"] == "stopped"


# ------------------------------------------------------------------- lifecycle


def test_start_template_runs_to_success_with_a_live_vm(double: DoubleProcess,
                                                       api: httpx.Client) -> None:
    env = {"machine_id": "vm-a", "hestia_service": "svc-a"}
    task = start_task(api, 1, env)
    done = wait_status(api, task["id"], *FINISHED)
    assert done["status"] == "success" and done["start"] and done["end"]
    history = [h["status"] for h in admin_task(double, task["id"])["status_history"]]
    assert history == ["waiting", "starting", "running", "success"]

    output = api.get(f"/project/1/tasks/{task['id']}/output").json()
    assert all(set(line) == {"task_id", "time", "output"} for line in output)
    assert all(line["task_id"] == task["id"] for line in output)
    assert any("\x1b[" in line["output"] for line in output)  # ANSI colours, like ansible
    urls = [m.group(1) for line in output
            if (m := re.fullmatch(r"hestia_url=(http://127\.0\.0\.1:\d+)", line["output"]))]
    assert len(urls) == 1
    raw = api.get(f"/project/1/tasks/{task['id']}/raw_output")
    assert raw.headers["content-type"].startswith("text/plain")
    assert f"hestia_url={urls[0]}\n" in raw.text
    assert httpx.get(urls[0] + VM_HEALTH).status_code == 200

    vm = vm_of(double, "vm-a")
    assert (vm["alive"], vm["service"], vm["url"], vm["task_id"]) == (True, "svc-a", urls[0],
                                                                      task["id"])
    stopper = start_task(api, 2, {"machine_id": "vm-a"})
    assert wait_status(api, stopper["id"], *FINISHED)["status"] == "success"
    vm = vm_of(double, "vm-a")
    assert vm["alive"] is False and vm["killed_by"] == f"task {stopper['id']}"
    assert list(iter_pids_alive([vm["pid"]])) == []
    with pytest.raises(httpx.TransportError):
        httpx.get(urls[0] + VM_HEALTH, timeout=1)


def test_a_vm_can_die_behind_the_gateways_back(double: DoubleProcess, api: httpx.Client) -> None:
    task = start_task(api, 1, {"machine_id": "vm-dies", "hestia_service": "svc-d"})
    assert wait_status(api, task["id"], *FINISHED)["status"] == "success"
    killed = double.admin("POST", "vms/kill", {"machine_id": "vm-dies", "signal": "KILL"})
    assert [vm["machine_id"] for vm in killed] == ["vm-dies"]
    poll(lambda: vm_of(double, "vm-dies"), lambda vm: vm["alive"] is False)
    again = start_task(api, 1, {"machine_id": "vm-dies", "hestia_service": "svc-d"})
    assert wait_status(api, again["id"], *FINISHED)["status"] == "success"  # a fresh VM
    assert [vm["alive"] for vm in double.vms() if vm["machine_id"] == "vm-dies"] == [False, True]
    stopper = start_task(api, 2, {"machine_id": "vm-dies"})
    assert wait_status(api, stopper["id"], *FINISHED)["status"] == "success"


def test_second_task_for_the_same_template_waits(double: DoubleProcess,
                                                 api: httpx.Client) -> None:
    first = start_task(api, 5)
    wait_status(api, first["id"], "running")
    second = start_task(api, 5)
    time.sleep(0.3)  # six queue ticks: plenty of chances to start it wrongly
    assert api.get(f"/project/1/tasks/{second['id']}").json()["status"] == "waiting"

    stop(api, first["id"], {})  # a normal stop of a running task ends "error" (NOTES)
    assert wait_status(api, first["id"], *FINISHED)["status"] == "error"
    assert [h["status"] for h in admin_task(double, first["id"])["status_history"]] == [
        "waiting", "starting", "running", "stopping", "error"]
    wait_status(api, second["id"], "running")
    stop(api, second["id"], {"force": True})
    assert wait_status(api, second["id"], *FINISHED)["status"] == "stopped"
    record = admin_task(double, second["id"])
    assert record["stop_requested"] and record["stop_requests"][0]["body"] == {"force": True}


def test_hang_waiting_until_forced_stop(double: DoubleProcess, api: httpx.Client) -> None:
    task = start_task(api, 3)
    time.sleep(0.2)
    assert api.get(f"/project/1/tasks/{task['id']}").json()["status"] == "waiting"
    stop(api, task["id"], {"force": True})
    assert wait_status(api, task["id"], *FINISHED)["status"] == "stopped"
    assert [h["status"] for h in admin_task(double, task["id"])["status_history"]] == [
        "waiting", "stopped"]


def test_error_template_fails_like_ansible(api: httpx.Client) -> None:
    task = start_task(api, 4, {"machine_id": "vm-err"})
    assert wait_status(api, task["id"], *FINISHED)["status"] == "error"
    raw = api.get(f"/project/1/tasks/{task['id']}/raw_output").text
    assert "fatal: [localhost]: FAILED! =>" in raw and "failed=1" in raw


def test_stopping_a_finished_success_rewrites_it_to_stopped(double: DoubleProcess,
                                                            api: httpx.Client) -> None:
    double.admin("DELETE", "warnings")
    task = start_task(api, 6)
    assert wait_status(api, task["id"], *FINISHED)["status"] == "success"
    stop(api, task["id"], {})
    assert api.get(f"/project/1/tasks/{task['id']}").json()["status"] == "stopped"
    assert [w["kind"] for w in double.admin("GET", "warnings")] == ["stop_finished_task"]


def test_stop_mid_provisioning_leaves_the_vm_running(double: DoubleProcess,
                                                     api: httpx.Client) -> None:
    slow = {**SCENARIO["templates"]["1"], "running_seconds": 30}
    assert double.admin("POST", "templates/7", slow)["running_seconds"] == 30
    task = start_task(api, 7, {"machine_id": "vm-mid", "hestia_service": "svc-mid"})
    poll(double.vms, lambda vms: any(v["machine_id"] == "vm-mid" for v in vms))
    stop(api, task["id"], {})
    assert wait_status(api, task["id"], *FINISHED)["status"] == "error"
    assert vm_of(double, "vm-mid")["alive"] is True  # the gateway must clean it up itself
    stopper = start_task(api, 2, {"hestia_service": "svc-mid"})
    assert wait_status(api, stopper["id"], *FINISHED)["status"] == "success"
    assert vm_of(double, "vm-mid")["alive"] is False


def test_runtime_settings_role_legacy_errors_and_max_parallel(double: DoubleProcess,
                                                              api: httpx.Client) -> None:
    try:
        double.admin("POST", "settings", {"role": "guest"})
        assert api.post("/project/1/tasks", json={"template_id": 6}).status_code == 403
        assert api.get("/project/1/templates/6").status_code == 200  # reading is allowed
        double.admin("POST", "settings", {"role": "task_runner", "legacy_errors": True})
        r = api.post("/project/1/tasks", json={"template_id": 999})
        assert (r.status_code, r.content) == (500, b"")  # what older servers answer
        expect_violations(double, "unknown_template")
        double.admin("POST", "settings", {"legacy_errors": False, "max_parallel_tasks": 1})
        blocker = start_task(api, 5)
        wait_status(api, blocker["id"], "running")
        queued = start_task(api, 6)  # another template, but the server is full
        time.sleep(0.2)
        assert api.get(f"/project/1/tasks/{queued['id']}").json()["status"] == "waiting"
        stop(api, blocker["id"], {"force": True})
        assert wait_status(api, queued["id"], *FINISHED)["status"] == "success"
    finally:
        double.admin("POST", "settings", {"role": "task_runner", "legacy_errors": False,
                                          "max_parallel_tasks": 0})


def test_a_valid_session_leaves_no_violation(double: DoubleProcess, api: httpx.Client) -> None:
    assert httpx.get(f"{double.api}/ping").text == "pong"
    templates = api.get("/project/1/templates", params={"sort": "name", "order": "asc"}).json()
    assert {t["id"] for t in templates} >= {1, 2, 3, 4, 5, 6}
    assert api.get("/project/1/templates/6").json()["name"] == "noop (template 6)"
    task = start_task(api, 6)
    wait_status(api, task["id"], *FINISHED)
    api.get(f"/project/1/tasks/{task['id']}/output").raise_for_status()
    api.get("/project/1/tasks").raise_for_status()
    assert double.violations() == []  # the fixture checks again after teardown


def test_websocket_pushes_status_updates(double: DoubleProcess, api: httpx.Client) -> None:
    sock = socket.create_connection(("127.0.0.1", double.port), timeout=5)
    ws = WSConnection(ConnectionType.CLIENT)
    sock.sendall(ws.send(Request(host=f"127.0.0.1:{double.port}", target="/api/ws",
                                 extra_headers=[(b"authorization", f"Bearer {TOKEN}".encode())])))
    statuses: list[str] = []
    accepted = False
    task_id = None
    deadline = time.monotonic() + 5
    with sock:
        while "success" not in statuses and time.monotonic() < deadline:
            ws.receive_data(sock.recv(65536))
            for event in ws.events():
                if isinstance(event, RejectConnection):
                    pytest.fail(f"websocket rejected: {event.status_code}")
                if isinstance(event, AcceptConnection):
                    accepted = True
                    task_id = start_task(api, 6)["id"]
                elif isinstance(event, TextMessage):
                    msg = json.loads(event.data)
                    if msg["type"] == "update" and msg["task_id"] == task_id:
                        statuses.append(msg["status"])
    assert accepted
    assert statuses == ["starting", "running", "success"]


# ----------------------------------------------------------- process handling


def test_state_survives_a_crash_and_sigterm_kills_vms(tmp_path: Path) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    first = DoubleProcess(tmp_path, token=TOKEN, scenario=SCENARIO).start()
    try:
        with httpx.Client(base_url=first.api, headers=auth) as client:
            started = start_task(client, 1, {"machine_id": "vm-crash", "hestia_service": "c"})
            wait_status(client, started["id"], "success")
            hung = start_task(client, 5)
            wait_status(client, hung["id"], "running")
        vm_pid = vm_of(first, "vm-crash")["pid"]
    finally:
        first.stop(signal.SIGKILL)  # the double dies; its VM survives, as a real VM would
    assert list(iter_pids_alive([vm_pid])) == [vm_pid]

    second = DoubleProcess(tmp_path, token=TOKEN, scenario=SCENARIO)
    with second, httpx.Client(base_url=second.api, headers=auth) as client:
        assert vm_of(second, "vm-crash")["alive"] is True
        # A task that was running when the server went away stays "running" forever.
        stale = client.get(f"/project/1/tasks/{hung['id']}").json()
        assert stale["status"] == "running"
        assert admin_task(second, hung["id"])["stale_after_restart"] is True
        stop(client, hung["id"], {})
        assert client.get(f"/project/1/tasks/{hung['id']}").json()["status"] == "stopped"
        assert start_task(client, 6)["id"] > hung["id"]  # ids never come back
        assert second.violations() == []
    assert second.proc is not None and second.proc.returncode == 0
    assert list(iter_pids_alive([vm_pid])) == []  # SIGTERM powered the VM off


def test_scenario_typos_fail_loudly() -> None:
    with pytest.raises(ValueError, match="behavior"):
        parse_scenario({"templates": {"1": {"behavior": "start"}}})
    with pytest.raises(ValueError, match="command"):
        parse_scenario({"templates": {"1": {"behaviour": "start"}}})
    settings, templates = parse_scenario({"queue_interval_seconds": 1,
                                          "templates": [{"id": 3, "behaviour": "noop"}]})
    assert settings == {"queue_interval_seconds": 1} and templates[3].playbook == "noop.yml"
