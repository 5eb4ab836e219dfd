"""
A process that fails to start, again and again, through a real gateway.

Each failed start must report what that attempt printed, once (the output of
earlier attempts used to pile up in C{detail}), and the start log line must name
the process's pid even when the process is gone before the line is written.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from conftest import StartHestia
from support.backendproc import free_port
from support.hestiaproc import VENV_BIN, wait_for

pytestmark = pytest.mark.integration

LINE = "boom: cannot open the model file"


def test_each_failed_start_reports_its_own_output_once(hestia: StartHestia) -> None:
    gw = hestia({"services": {"flaky": {
        "url": "http://127.0.0.1:9",  # never reached: the process exits first
        "command": ["sh", "-c", f"echo '{LINE}'; exit 3"],
        "idle_timeout": 0,
    }}})
    bodies = []

    def attempt() -> bool:
        response = gw.http.post("/services/flaky/api", content=b"{}")
        assert response.status_code == 502, response.text
        bodies.append(response.json())
        return len(re.findall(r"started sh -c .*\(pid ", gw.log_text())) >= 3

    # A crash loop cools down between attempts: keep asking until three real starts ran.
    assert wait_for(attempt, 30.0, 0.3), gw.log_text()
    for body in bodies:
        assert "exit status 3" in body["error"]
        assert body["detail"] == [LINE], body
    assert gw.status("flaky")["last_error_detail"] == [LINE]
    starts = re.findall(r"started sh -c .*\(pid (\S+)\)", gw.log_text())
    assert starts and all(pid.isdigit() for pid in starts), starts


def test_start_failure_detail_via_the_api(hestia: StartHestia) -> None:
    gw = hestia({"services": {"once": {
        "url": "http://127.0.0.1:9",
        "command": ["sh", "-c", "echo first; echo second >&2; exit 4"],
        "idle_timeout": 0,
    }}})
    with httpx.Client(base_url=gw.url, trust_env=False, timeout=10) as http:
        assert http.post("/v1/services/once/start", params={"wait": "true"}).status_code >= 400
    status = gw.wait_state("once", "failed")
    assert sorted(status["last_error_detail"]) == ["first", "second"]


def test_a_command_not_on_the_path_says_so(hestia: StartHestia) -> None:
    # The shipped config's ollama service on a machine without ollama: the answer names the
    # missing program and where it was looked for, rather than the exec wrapper's "exit status 127".
    gw = hestia({"services": {"ollama": {
        "url": "http://127.0.0.1:9",
        "command": ["hestia-test-no-such-program", "serve"],
        "idle_timeout": 0,
    }}}, {"PATH": "/usr/bin:/bin"})
    response = gw.http.get("/services/ollama/api/tags")
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error.startswith("command not found: hestia-test-no-such-program (looked in PATH=/usr/bin:/bin and in ")
    assert gw.status("ollama")["last_error"] == error
    assert "started hestia-test-no-such-program" not in gw.log_text()  # nothing was spawned
    # Where Hestia's own bin directory is on the PATH already, it is not named twice.
    own_bin = str(VENV_BIN)
    other = hestia({"services": {"ollama": {"url": "http://127.0.0.1:9", "command": ["hestia-test-no-such-program"]}}},
                   {"PATH": f"{own_bin}:/usr/bin:/bin"})
    assert other.http.get("/services/ollama/").json()["error"] == (
        f"command not found: hestia-test-no-such-program (looked in PATH={own_bin}:/usr/bin:/bin)"
    )
    assert error in gw.log_text()  # the gateway's log says why, not only "start failed"


def test_a_relative_command_that_does_not_exist_says_so(hestia: StartHestia, tmp_path: Path) -> None:
    gw = hestia({"services": {"tool": {
        "url": "http://127.0.0.1:9",
        "command": ["./bin/missing-tool"],
        "cwd": str(tmp_path),
        "idle_timeout": 0,
    }}})
    response = gw.http.get("/services/tool/")
    assert response.status_code == 502, response.text
    assert response.json()["error"] == (
        f"command not found: ./bin/missing-tool is not an executable file (relative to cwd {tmp_path})"
    )


def test_a_command_installed_with_hestia_runs_without_its_bin_on_the_path(hestia: StartHestia) -> None:
    # `pip install .` in a virtualenv, then that virtualenv's twistd, not activated (systemd, a
    # full path): the shipped config's demo service is the `hestia-demo` script of the same install.
    port = free_port()
    gw = hestia({"services": {"demo": {
        "url": f"http://127.0.0.1:{port}",
        "command": ["hestia-demo", "--port", str(port), "--bind", "127.0.0.1"],
        "health": {"path": "/"},
        "idle_timeout": 0,
    }}}, {"PATH": "/usr/bin:/bin"})
    response = gw.http.get("/services/demo/")
    assert response.status_code == 200, response.text
    assert "started on demand by Hestia" in response.text
