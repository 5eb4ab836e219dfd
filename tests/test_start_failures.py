"""
A process that fails to start, again and again, through a real gateway.

Each failed start must report what that attempt printed, once (the output of
earlier attempts used to pile up in C{detail}), and the start log line must name
the process's pid even when the process is gone before the line is written.
"""

from __future__ import annotations

import re

import httpx
import pytest
from conftest import StartHestia
from hestiaproc import wait_for

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
