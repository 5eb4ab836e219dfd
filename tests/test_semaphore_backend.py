"""
The C{semaphore} backend, end to end: a real C{twistd hestia} gateway, the
Semaphore UI double (tests/support/semaphore_double/) as a subprocess whose start
template really starts a C{tests/support/backend.py} "VM", and real HTTP through the
proxy.  Every test ends by checking that the double saw no protocol violation
and that the API token appeared nowhere: not in the gateway's log, not in
C{/v1}, not in an error body.

The unit tests at the top pin the pieces that need no processes: the
lifecycle's resume seam (with a Clock), configuration, output parsing.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.hestiaproc import HestiaProcess, free_port, wait_for
from support.semaphore_double import DoubleProcess
from twisted.internet.task import Clock

from hestia.backends.semaphore.client import clean_lines, find_hestia_url
from hestia.backends.semaphore.settings import Secret, SemaphoreService
from hestia.config import ConfigError
from hestia.lifecycle import ServiceLifecycle, State
from hestia.loader import parse_config
from hestia.testing import FakeBackend

TOKEN = "s3cr3t-semaphore-token-4f9c1d"
START, STOP, HANG_WAITING, ERROR, HANG_RUNNING, SLOW_START, SLOW_STOP = 1, 2, 3, 4, 5, 6, 7
VM = ["python", "tests/support/backend.py", "--port", "{port}", "--name", "{hestia_service}"]
SCENARIO: dict[str, Any] = {
    "queue_interval_seconds": 0.05,
    "templates": {
        str(START): {"behaviour": "start", "name": "Start VM", "command": VM,
                     "starting_seconds": 0.02, "running_seconds": 0.05},
        str(STOP): {"behaviour": "stop", "name": "Stop VM", "running_seconds": 0.02, "kill_grace_seconds": 2},
        str(HANG_WAITING): {"behaviour": "hang_waiting"},
        str(ERROR): {"behaviour": "error", "running_seconds": 0.02,
                     "fail_message": "no capacity in eu-west-1"},
        str(HANG_RUNNING): {"behaviour": "hang_running", "stop_delay_seconds": 0.05},
        str(SLOW_START): {"behaviour": "start", "name": "Slow start", "command": VM,
                          "starting_seconds": 0.02, "running_seconds": 2.0, "url_output": "debug"},
        str(SLOW_STOP): {"behaviour": "stop", "name": "Slow stop", "running_seconds": 2.0,
                         "kill_grace_seconds": 2},
    },
}


# ---------------------------------------------------------------- unit: lifecycle seam


class SurvivingBackend(FakeBackend):
    survives_gateway = True
    detached = False

    def detach(self) -> None:
        self.detached = True


def _service(idle: float = 10.0) -> Any:
    return parse_config(
        {"services": {"vm": {"url": "http://127.0.0.1:9", "idle_timeout": idle}}}, "t.yml", {}
    ).services["vm"]


@pytest.mark.unit
def test_resume_ready_keeps_the_idle_clock() -> None:
    """A service resumed as ready is idle-stopped when its recorded idle time runs out, not later."""
    clock = Clock()
    clock.advance(1000)
    backend = FakeBackend()
    changes: list[Any] = []
    lifecycle = ServiceLifecycle(_service(idle=10), backend, clock, [changes.append])
    lifecycle.resume(State.READY, "resumed", last_request_at=994.0)
    assert lifecycle.state is State.READY and backend.starts == []
    clock.advance(3.9)
    assert lifecycle.state is State.READY
    clock.advance(0.2)
    assert lifecycle.state is State.STOPPING and len(backend.stops) == 1
    assert [(c.old, c.new) for c in changes] == [(State.STOPPED, State.READY), (State.READY, State.STOPPING)]


@pytest.mark.unit
def test_resume_ready_long_idle_stops_at_once() -> None:
    clock = Clock()
    clock.advance(1000)
    backend = FakeBackend()
    lifecycle = ServiceLifecycle(_service(idle=10), backend, clock)
    lifecycle.resume(State.READY, "resumed", last_request_at=100.0)
    clock.advance(0)
    assert lifecycle.state is State.STOPPING


@pytest.mark.unit
def test_resume_starting_and_stopping() -> None:
    clock = Clock()
    backend = FakeBackend()
    lifecycle = ServiceLifecycle(_service(), backend, clock)
    lifecycle.resume(State.STARTING, "resumed")
    assert lifecycle.state is State.STARTING and len(backend.starts) == 1
    # A request meanwhile joins the same start: never a second one.
    lease = lifecycle.acquire()
    assert len(backend.starts) == 1
    backend.finish_start()
    clock.advance(0.01)
    backend.answer_probe(True)
    assert lifecycle.state is State.READY and lease.called

    other = ServiceLifecycle(_service(), FakeBackend(), clock)
    other.resume(State.STOPPING, "resumed")
    assert other.state is State.STOPPING
    other.backend.finish_stop()  # type: ignore[attr-defined]
    assert other.state is State.STOPPED


@pytest.mark.unit
def test_resume_only_from_a_fresh_lifecycle() -> None:
    clock = Clock()
    backend = FakeBackend()
    lifecycle = ServiceLifecycle(_service(), backend, clock)
    lifecycle.start()
    lifecycle.resume(State.READY, "late")
    assert lifecycle.state is State.STARTING
    with pytest.raises(ValueError):
        ServiceLifecycle(_service(), FakeBackend(), clock).resume(State.FAILED, "no")


@pytest.mark.unit
def test_shutdown_leaves_a_surviving_backend_running() -> None:
    clock = Clock()
    backend = SurvivingBackend()
    changes: list[Any] = []
    lifecycle = ServiceLifecycle(_service(), backend, clock, [changes.append])
    lifecycle.resume(State.READY, "resumed", last_request_at=0.0)
    done = lifecycle.shutdown()
    assert done.called and backend.detached and backend.stops == []
    assert lifecycle.state is State.READY and len(changes) == 1


# ---------------------------------------------------------------- unit: config and parsing

ENV = {
    "MYSERVICE_SEMAPHORE_ENABLED": "true",
    "MYSERVICE_SEMAPHORE_MACHINE_ID": "aws-gpu-instance",
    "SEMAPHORE_BASE_URL": "http://semaphore:3000",
    "SEMAPHORE_API_TOKEN": TOKEN,
    "SEMAPHORE_PROJECT_ID": "7",
    "MYSERVICE_SEMAPHORE_START_TEMPLATE_ID": "11",
    "MYSERVICE_SEMAPHORE_STOP_TEMPLATE_ID": "12",
}


@pytest.mark.unit
def test_service_enabled_by_environment_alone() -> None:
    config = parse_config({}, "hestia.yml", ENV)
    service = config.services["myservice"]
    assert service.backend == "semaphore" and service.url == ""
    settings = service.sections["semaphore"]
    assert isinstance(settings, SemaphoreService)
    assert (settings.machine_id, settings.start_template_id, settings.stop_template_id) == ("aws-gpu-instance", 11, 12)
    assert settings.server.project_id == 7 and settings.server.base_url == "http://semaphore:3000"
    assert settings.server.token.reveal() == TOKEN
    assert TOKEN not in repr(config) and TOKEN not in str(settings)


@pytest.mark.unit
def test_yaml_service_with_token_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    raw = {
        "semaphore": {"base_url": "https://sem.example", "token_file": str(token_file), "queue_timeout": "2m"},
        "services": {"gpu": {"url": "http://10.0.0.5:11434", "semaphore": {
            "start_template_id": 3, "stop_template_id": 4, "extra_vars": {"size": "g5.xlarge"}}}},
    }
    settings = parse_config(raw, "h.yml", {}).services["gpu"].sections["semaphore"]
    assert settings.server.token == Secret(TOKEN) and settings.server.queue_timeout == 120
    assert settings.machine_id == "gpu" and settings.extra_vars == {"size": "g5.xlarge"}


@pytest.mark.unit
@pytest.mark.parametrize(("change", "key"), [
    ({"MYSERVICE_SEMAPHORE_START_TEMPLATE_ID": None}, "services.myservice.semaphore.start_template_id"),
    ({"MYSERVICE_SEMAPHORE_STOP_TEMPLATE_ID": "x"}, "services.myservice.semaphore.stop_template_id"),
    ({"SEMAPHORE_API_TOKEN": None}, "semaphore.token_env"),
    ({"SEMAPHORE_BASE_URL": None}, "semaphore.base_url"),
    ({"MYSERVICE_SEMAPHORE_ENABLED": "perhaps"}, "services.myservice.semaphore.enabled"),
])
def test_config_errors_name_the_key(change: dict[str, str | None], key: str) -> None:
    env = {k: v for k, v in {**ENV, **change}.items() if v is not None}
    with pytest.raises(ConfigError) as raised:
        parse_config({}, "hestia.yml", env)
    assert raised.value.key.startswith(key), str(raised.value)
    assert TOKEN not in str(raised.value)


@pytest.mark.unit
def test_disabled_by_environment() -> None:
    config = parse_config({}, "h.yml", {**ENV, "MYSERVICE_SEMAPHORE_ENABLED": "false"})
    assert "myservice" not in config.services


@pytest.mark.unit
def test_output_parsing() -> None:
    entries = [
        {"output": "\x1b[0;32mok: [localhost] => {\x1b[0m"},
        {"output": '\x1b[0;32m    "msg": "hestia_url=http://10.1.2.3:8080/"\x1b[0m'},
        {"output": "hestia_url=http://10.1.2.4:8081"},
    ]
    lines = clean_lines(entries)
    assert "\x1b" not in "".join(lines)
    assert find_hestia_url(lines[:2]) == "http://10.1.2.3:8080"
    assert find_hestia_url(lines) == "http://10.1.2.4:8081"
    assert find_hestia_url(["nothing here"]) is None


# ---------------------------------------------------------------- integration


@pytest.fixture(scope="module")
def double(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DoubleProcess]:
    proc = DoubleProcess(tmp_path_factory.mktemp("semaphore-state"), token=TOKEN, scenario=SCENARIO)
    with proc:
        yield proc


@pytest.fixture
def gateways(tmp_path: Path, double: DoubleProcess) -> Iterator[list[HestiaProcess]]:
    """Gateways a test starts; afterwards: no violation, the token nowhere in their logs."""
    started: list[HestiaProcess] = []
    double.admin("DELETE", "violations")
    yield started
    for gateway in started:
        gateway.stop()
    for gateway in started:
        assert TOKEN not in gateway.log_text()
    assert double.violations() == []


pytestmark = [pytest.mark.timeout(120)]


def config(double: DoubleProcess, tmp_path: Path, name: str, *, start: int = START, stop: int = STOP,
           server: dict[str, Any] | None = None, **service: Any) -> dict[str, Any]:
    return {
        "server": {"state_path": str(tmp_path / "state.db")},
        "semaphore": {"base_url": double.url, "project_id": 1, "poll_interval": 0.2, **(server or {})},
        "services": {name: {
            "health": {"path": "/health"},
            "semaphore": {"machine_id": f"m-{name}", "start_template_id": start, "stop_template_id": stop,
                          "extra_vars": {"region": "eu-west-1"}},
            **service,
        }},
    }


def run(gateways: list[HestiaProcess], tmp_path: Path, cfg: dict[str, Any] | None,
        env: dict[str, str] | None = None) -> HestiaProcess:
    gateway = HestiaProcess(cfg, tmp_path / f"hestia-{len(gateways)}",
                            {"SEMAPHORE_API_TOKEN": TOKEN, **(env or {})})
    gateways.append(gateway)
    return gateway.start()


def tasks_of(double: DoubleProcess, name: str, template: int | None = None) -> list[dict[str, Any]]:
    return [t for t in double.tasks() if t["environment"].get("hestia_service") == name
            and (template is None or t["template_id"] == template)]


def alive_vms(double: DoubleProcess, name: str) -> list[dict[str, Any]]:
    return [vm for vm in double.vms() if vm["machine_id"] == f"m-{name}" and vm["alive"]]


def no_token(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text


@pytest.mark.semaphore
def test_env_only_service_starts_and_idles_out(gateways: list[HestiaProcess], tmp_path: Path,
                                              double: DoubleProcess) -> None:
    """The seed's quick start: a service enabled by environment alone, provisioned on the first request."""
    env = {
        "MYSERVICE_SEMAPHORE_ENABLED": "true", "MYSERVICE_SEMAPHORE_MACHINE_ID": "m-myservice",
        "SEMAPHORE_BASE_URL": double.url, "SEMAPHORE_PROJECT_ID": "1",
        "MYSERVICE_SEMAPHORE_START_TEMPLATE_ID": str(START), "MYSERVICE_SEMAPHORE_STOP_TEMPLATE_ID": str(STOP),
        "MYSERVICE_IDLE_TIMEOUT": "1.5",
    }
    gateway = run(gateways, tmp_path, None, env)
    response = gateway.http.get("/services/myservice/echo/hello", timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["path"] == "/echo/hello"
    [vm] = alive_vms(double, "myservice")
    status = gateway.status("myservice")
    assert status["state"] == "ready" and status["url"] == vm["url"]  # hestia_url replaced the (absent) url
    assert status["details"]["machine_id"] == "m-myservice"
    [task] = tasks_of(double, "myservice")
    assert task["template_id"] == START and isinstance(task["request"]["template_id"], int)
    assert isinstance(task["request"]["environment"], str)
    assert task["environment"]["machine_id"] == "m-myservice"
    # Idle: the stop template runs to its end, only then "stopped".
    gateway.wait_state("myservice", "stopped", timeout=15)
    assert alive_vms(double, "myservice") == []
    stops = tasks_of(double, "myservice", STOP)
    assert [t["status"] for t in stops] == ["success"]
    events = gateway.http.get("/v1/services/myservice/events").json()["events"]
    assert [e["kind"] for e in reversed(events)] == ["start", "ready", "stop", "stopped"]
    no_token(gateway.http.get("/v1/services").text, json.dumps(events), gateway.log_text())


@pytest.mark.semaphore
def test_task_error_is_explicit(gateways: list[HestiaProcess], tmp_path: Path, double: DoubleProcess) -> None:
    gateway = run(gateways, tmp_path, config(double, tmp_path, "broken", start=ERROR))
    response = gateway.http.get("/services/broken/", timeout=30)
    assert response.status_code == 502
    body = response.json()
    assert body["service"] == "broken" and body["state"] == "failed"
    assert "ended with status error" in body["error"]
    assert any("no capacity in eu-west-1" in line for line in body["detail"])
    assert not any("\x1b" in line for line in body["detail"])
    status = gateway.status("broken")
    assert status["state"] == "failed" and "ended with status error" in status["last_error"]
    assert any("FAILED!" in line for line in status["last_error_detail"])
    no_token(response.text, json.dumps(status))
    # The failed start is cleaned up with the stop template (it may have provisioned something).
    assert wait_for(lambda: [t["status"] for t in tasks_of(double, "broken", STOP)] == ["success"], 10)


@pytest.mark.semaphore
def test_task_stuck_in_waiting_is_stopped_with_force(gateways: list[HestiaProcess], tmp_path: Path,
                                                     double: DoubleProcess) -> None:
    gateway = run(gateways, tmp_path, config(double, tmp_path, "stuck", start=HANG_WAITING,
                                             server={"queue_timeout": 0.6}))
    response = gateway.http.get("/services/stuck/", timeout=30)
    assert response.status_code == 504, response.text
    assert "queue_timeout" in response.json()["error"]
    [task] = tasks_of(double, "stuck", HANG_WAITING)
    assert [r["body"] for r in task["stop_requests"]] == [{"force": True}]
    assert task["status"] == "stopped"
    assert gateway.state("stuck") == "failed"


@pytest.mark.semaphore
def test_start_timeout_stops_the_task(gateways: list[HestiaProcess], tmp_path: Path,
                                      double: DoubleProcess) -> None:
    gateway = run(gateways, tmp_path, config(double, tmp_path, "slow", start=HANG_RUNNING, start_timeout=1))
    response = gateway.http.get("/services/slow/", timeout=30)
    assert response.status_code == 504, response.text
    assert response.json()["state"] == "failed"
    # The running start task is stopped (it must not provision later, unobserved), then torn down.
    assert wait_for(lambda: [t["status"] for t in tasks_of(double, "slow", STOP)] == ["success"], 10)
    [task] = tasks_of(double, "slow", HANG_RUNNING)
    assert task["status"] in ("error", "stopped") and task["stop_requests"][0]["body"] == {}


@pytest.mark.semaphore
@pytest.mark.parametrize("case", ["bad-token", "no-project", "forbidden", "unreachable"])
def test_semaphore_refusals(case: str, gateways: list[HestiaProcess], tmp_path: Path,
                            double: DoubleProcess) -> None:
    cfg = config(double, tmp_path, "refused")
    env = {}
    expected = {"bad-token": "(401)", "no-project": "(404)", "forbidden": "(403)", "unreachable": "unreachable"}
    if case == "bad-token":
        env["SEMAPHORE_API_TOKEN"] = TOKEN + "-wrong"
    elif case == "no-project":
        cfg["semaphore"]["project_id"] = 99
    elif case == "unreachable":
        cfg["semaphore"]["base_url"] = f"http://127.0.0.1:{free_port()}"
    elif case == "forbidden":
        double.admin("POST", "settings", {"role": "guest"})
    try:
        gateway = run(gateways, tmp_path, cfg, env)
        response = gateway.http.get("/services/refused/", timeout=30)
    finally:
        if case == "forbidden":
            double.admin("POST", "settings", {"role": "task_runner"})
            double.admin("DELETE", "warnings")
    assert response.status_code == 502, response.text
    assert expected[case] in response.json()["error"]
    status = gateway.status("refused")
    assert status["state"] == "failed" and expected[case] in status["last_error"]
    no_token(response.text, json.dumps(status))
    assert "-wrong" not in response.text + json.dumps(status)
    assert tasks_of(double, "refused") == []
    if case in ("bad-token", "no-project"):
        # Expected refusals of a misconfigured client, recorded by the double as such.
        kinds = {v["kind"] for v in double.violations()}
        assert kinds <= {"unauthorized", "unknown_project"}
        double.admin("DELETE", "violations")
    assert TOKEN + "-wrong" not in gateway.log_text()


def _get_in_background(gateway: HestiaProcess, path: str) -> threading.Thread:
    def fetch() -> None:
        try:
            httpx.get(gateway.url + path, timeout=30, trust_env=False)
        except httpx.HTTPError:
            pass  # the gateway is killed under it

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    return thread


@pytest.mark.semaphore
@pytest.mark.parametrize("phase", ["starting", "ready", "stopping", "ready-sigterm"])
def test_gateway_killed_in_each_phase(phase: str, gateways: list[HestiaProcess], tmp_path: Path,
                                      double: DoubleProcess) -> None:
    """SIGKILL (or SIGTERM) the gateway mid-phase, start it again: no VM lost, no duplicate start task."""
    name = f"k-{phase}"
    cfg = config(double, tmp_path, name, start=SLOW_START if phase == "starting" else START,
                 stop=SLOW_STOP if phase == "stopping" else STOP, idle_timeout=3)
    first = run(gateways, tmp_path, cfg)
    if phase == "starting":
        _get_in_background(first, f"/services/{name}/health")
        assert wait_for(lambda: any(t["status"] == "running" for t in tasks_of(double, name, SLOW_START)), 10)
        first.wait_status(name, "state", "starting")
        assert first.status(name)["details"]["task_id"] is not None
    else:
        assert first.http.get(f"/services/{name}/health", timeout=30).status_code == 200
        if phase == "stopping":
            assert wait_for(lambda: tasks_of(double, name, SLOW_STOP), 15)
            assert wait_for(lambda: first.status(name)["details"]["task_phase"] == "stop", 5)
    first.signal(signal.SIGTERM if phase == "ready-sigterm" else signal.SIGKILL)
    first.wait_exit()
    if phase != "stopping":
        # Killing the gateway never touches the VM (a starting one may not exist yet).
        assert len(alive_vms(double, name)) == (1 if phase.startswith("ready") else len(alive_vms(double, name)))

    second = run(gateways, tmp_path, cfg)
    if phase == "stopping":
        second.wait_state(name, "stopped", timeout=15)
        # The stop task signals the VM and then succeeds; the process may take a
        # moment to be gone after the task reports success.
        assert wait_for(lambda: alive_vms(double, name) == [], 5)
        assert len(tasks_of(double, name, SLOW_STOP)) == 1  # the recorded stop task was followed, not redone
        assert len(tasks_of(double, name, START)) == 1
        return
    second.wait_state(name, "ready", timeout=15)
    assert second.http.get(f"/services/{name}/health", timeout=30).status_code == 200
    starts = tasks_of(double, name, SLOW_START if phase == "starting" else START)
    assert len(starts) == 1, starts
    assert len(alive_vms(double, name)) == 1
    # The resumed service keeps its idle clock: the VM is still torn down when idle.
    second.wait_state(name, "stopped", timeout=15)
    assert alive_vms(double, name) == []
    assert [t["status"] for t in tasks_of(double, name, STOP)] == ["success"]


@pytest.mark.semaphore
def test_one_start_task_for_many_requests_and_restart_after_stop(
    gateways: list[HestiaProcess], tmp_path: Path, double: DoubleProcess
) -> None:
    """Concurrent cold requests share one start task; a request during a stop waits, then starts anew."""
    name = "shared"
    gateway = run(gateways, tmp_path, config(double, tmp_path, name, stop=SLOW_STOP))
    results: list[int] = []

    def fetch() -> None:
        results.append(httpx.get(f"{gateway.url}/services/{name}/health", timeout=30, trust_env=False).status_code)

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [200] * 8
    assert len(tasks_of(double, name, START)) == 1

    stopping = threading.Thread(target=lambda: gateway.http.post(f"/v1/services/{name}/stop", timeout=30))
    stopping.start()
    gateway.wait_state(name, "stopping")
    response = httpx.get(f"{gateway.url}/services/{name}/health", timeout=30, trust_env=False)
    stopping.join(30)
    assert response.status_code == 200
    [stop_task] = tasks_of(double, name, SLOW_STOP)
    first, second = tasks_of(double, name, START)
    assert stop_task["status"] == "success" and second["created"] >= stop_task["end"]
    assert len(alive_vms(double, name)) == 1


@pytest.mark.semaphore
def test_task_launched_just_before_a_crash_is_found(
    gateways: list[HestiaProcess], tmp_path: Path, double: DoubleProcess
) -> None:
    """
    The gateway died after sending the launch but before recording the task id:
    the next gateway finds the task by its hestia_launch_id, never launching another.
    """
    name = "crashed"
    cfg = config(double, tmp_path, name)
    first = run(gateways, tmp_path, cfg)  # creates the state database
    first.stop()
    nonce = "launch-before-crash"
    created = httpx.post(
        f"{double.api}/project/1/tasks", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10,
        json={"template_id": START, "environment": json.dumps(
            {"hestia_service": name, "machine_id": f"m-{name}", "hestia_launch_id": nonce})},
    )
    assert created.status_code == 201
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute(
            "INSERT INTO services (name, state, state_since, data, updated_at) VALUES (?, 'starting', 0, ?, 0)",
            (name, json.dumps({"phase": "launching", "nonce": nonce})),
        )
    second = run(gateways, tmp_path, cfg)
    second.wait_state(name, "ready", timeout=15)
    assert second.status(name)["details"]["task_id"] == created.json()["id"]
    assert len(tasks_of(double, name, START)) == 1
    assert len(alive_vms(double, name)) == 1


@pytest.mark.semaphore
@pytest.mark.parametrize("reached_semaphore", [True, False], ids=["launched", "never-launched"])
def test_stop_task_launched_just_before_a_crash_is_found(
    reached_semaphore: bool, gateways: list[HestiaProcess], tmp_path: Path, double: DoubleProcess
) -> None:
    """
    The gateway died after sending a stop launch but before recording the task id (the
    window a SIGKILL can hit): the next gateway follows that stop task by its
    hestia_launch_id instead of launching a second one; if the launch never reached
    Semaphore, it launches the one stop that is needed.  No VM is left running either way.
    """
    name = f"stop-crash-{reached_semaphore}".lower()
    cfg = config(double, tmp_path, name, idle_timeout=600)
    first = run(gateways, tmp_path, cfg)
    assert first.http.get(f"/services/{name}/health", timeout=30).status_code == 200
    assert len(alive_vms(double, name)) == 1
    first.signal(signal.SIGKILL)
    first.wait_exit()
    nonce = f"{name}-launch-before-crash"
    if reached_semaphore:
        created = httpx.post(
            f"{double.api}/project/1/tasks", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10,
            json={"template_id": STOP, "environment": json.dumps(
                {"hestia_service": name, "machine_id": f"m-{name}", "hestia_action": "stop",
                 "hestia_launch_id": nonce})},
        )
        assert created.status_code == 201
    else:
        # Another machine's task with the same launch id (a shared project): not ours to follow.
        foreign = httpx.post(
            f"{double.api}/project/1/tasks", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10,
            json={"template_id": STOP, "environment": json.dumps(
                {"hestia_service": "someone-else", "machine_id": "m-someone-else", "hestia_action": "stop",
                 "hestia_launch_id": nonce})},
        )
        assert foreign.status_code == 201
    with sqlite3.connect(tmp_path / "state.db") as db:
        updated = db.execute(
            "UPDATE services SET state = 'stopping', data = ? WHERE name = ?",
            (json.dumps({"phase": "stop-launching", "nonce": nonce, "machine_id": f"m-{name}"}), name),
        ).rowcount
    assert updated == 1
    second = run(gateways, tmp_path, cfg)
    second.wait_state(name, "stopped", timeout=15)
    assert wait_for(lambda: alive_vms(double, name) == [], 5)
    stops = tasks_of(double, name, STOP)
    assert len(stops) == 1, stops
    # The double reports the VM gone a moment before the task's final status.
    assert wait_for(lambda: [t["status"] for t in tasks_of(double, name, STOP)] == ["success"], 5)
    assert len(tasks_of(double, name, START)) == 1
