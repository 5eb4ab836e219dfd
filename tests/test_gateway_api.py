"""
Issue 2, "/v1 (Klein)": the management API of a real ``twistd -n hestia``.

One gateway for the module, with a process service (C{echo}, which takes a
moment to start), one that cannot start (C{broken}) and a static upstream.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.backendproc import free_port, pid_alive, wait_for
from support.hestiaproc import BackendSpec, HestiaProcess, stop_cleanly

pytestmark = pytest.mark.integration

REQUIRED = {
    "name", "state", "backend", "url", "in_flight", "queued", "keep_warm",
    "idle_timeout", "state_since", "last_request_at", "last_error",
}


class Api:
    def __init__(self, tmp: Path) -> None:
        self.echo = BackendSpec("echo", tmp)
        self.broken = BackendSpec("broken", tmp)
        self.static_url = f"http://127.0.0.1:{free_port()}"
        self.gw = HestiaProcess({
            "services": {
                "echo": self.echo.service("--start-delay", "0.4", idle_timeout=0),
                "broken": self.broken.service("--fail-start", "2", idle_timeout=42),
                "upstream": {"url": self.static_url, "idle_timeout": "5m"},
            },
        }, tmp / "hestia").start()
        self.http = httpx.Client(base_url=self.gw.url, trust_env=False, timeout=20)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("api")
    fixture = Api(tmp)
    try:
        yield fixture
    finally:
        fixture.http.close()
        stop_cleanly(fixture.gw, tmp)


def ok_json(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


def parse_time(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def test_health(api: Api) -> None:
    body = ok_json(api.http.get("/v1/health"))
    assert body["status"] == "ok"


def test_services_lists_the_status_of_every_service(api: Api) -> None:
    body = ok_json(api.http.get("/v1/services"))
    assert sorted(s["name"] for s in body["services"]) == ["broken", "echo", "upstream"]
    for status in body["services"]:
        assert REQUIRED <= set(status), REQUIRED - set(status)


def test_status_fields(api: Api) -> None:
    status = ok_json(api.http.get("/v1/services/broken/status"))
    assert REQUIRED <= set(status)
    assert status["name"] == "broken"
    assert status["state"] in ("stopped", "failed")  # failed once test_start_wait... ran
    assert status["backend"] == "process"
    assert status["url"] == api.broken.url
    assert (status["in_flight"], status["queued"], status["keep_warm"]) == (0, 0, False)
    assert status["idle_timeout"] == 42
    assert abs(parse_time(status["state_since"]) - time.time()) < 300
    assert status["last_request_at"] is None

    upstream = ok_json(api.http.get("/v1/services/upstream/status"))
    assert (upstream["backend"], upstream["state"], upstream["url"]) == ("static", "ready", api.static_url)
    assert upstream["idle_timeout"] == 300  # "5m"
    assert upstream["last_error"] is None


def test_start_stop_and_start_wait(api: Api) -> None:
    http = api.http
    assert ok_json(http.get("/v1/services/echo/status"))["state"] == "stopped"
    began = time.monotonic()
    started = ok_json(http.post("/v1/services/echo/start"), 202)
    assert time.monotonic() - began < 0.35  # answered before the start ended
    assert started["state"] == "starting" and started["name"] == "echo"
    assert wait_for(lambda: api.gw.state("echo") == "ready", 10)
    assert api.echo.starts() == 1

    again = ok_json(http.post("/v1/services/echo/start"), 200)
    assert again["state"] == "ready"
    pid = again["details"]["pid"]
    assert pid_alive(pid)

    stopped = ok_json(http.post("/v1/services/echo/stop"))
    assert stopped["state"] == "stopped"
    assert not pid_alive(pid)
    assert ok_json(http.post("/v1/services/echo/stop"))["state"] == "stopped"  # idempotent

    began = time.monotonic()
    waited = ok_json(http.post("/v1/services/echo/start?wait=true"), 200)
    assert waited["state"] == "ready" and time.monotonic() - began >= 0.4
    assert api.echo.starts() == 2

    # A request is seen in the status; a start by the API is not a request.
    assert waited["last_request_at"] is None
    before = time.time()
    assert http.get("/services/echo/echo").status_code == 200
    status = ok_json(http.get("/v1/services/echo/status"))
    assert parse_time(status["last_request_at"]) >= before - 0.01
    assert status["state_since"] == waited["state_since"]
    assert status["last_error"] is None


def test_start_failures_show_in_the_answer_and_the_status(api: Api) -> None:
    failed = ok_json(api.http.post("/v1/services/broken/start?wait=1"), 502)
    assert (failed["service"], failed["state"]) == ("broken", "failed")
    assert "exit status 2" in failed["error"]
    assert "error: exiting with status 2" in failed["detail"]

    ok_json(api.http.post("/v1/services/broken/start"), 202)
    assert wait_for(lambda: api.broken.starts() == 2 and api.gw.state("broken") == "failed", 10)
    status = ok_json(api.http.get("/v1/services/broken/status"))
    assert "exit status 2" in status["last_error"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/services/nope/status"),
        ("POST", "/v1/services/nope/start"),
        ("POST", "/v1/services/nope/start?wait=true"),
        ("POST", "/v1/services/nope/stop"),
    ],
)
def test_unknown_service_is_404_json(api: Api, method: str, path: str) -> None:
    body = ok_json(api.http.request(method, path), 404)
    assert body["service"] == "nope"
    assert body["error"]


def test_unknown_route_is_404_json(api: Api) -> None:
    body = ok_json(api.http.get("/v1/no/such/route"), 404)
    assert body["error"]
