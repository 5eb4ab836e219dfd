"""
Issue 2, "Configuration", through a real ``twistd -n hestia``: errors at start,
SIGHUP and C{POST /v1/reload}, zero configuration, environment overrides and
C{keep_warm}.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import StartHestia
from support.backendproc import free_port, pid_alive, port_open, wait_for
from support.hestiaproc import BackendSpec, clean_environ, run_to_exit

pytestmark = pytest.mark.integration

GOOD = {"url": "http://127.0.0.1:9", "command": ["true"]}


@pytest.mark.parametrize(
    ("services", "env", "expected"),
    [
        pytest.param({"echo": {**GOOD, "idle_timout": 5}}, {}, "services.echo.idle_timout", id="unknown-key"),
        pytest.param({"echo": {**GOOD, "idle_timeout": "soon"}}, {}, "services.echo.idle_timeout", id="wrong-type"),
        pytest.param({"Echo!": GOOD}, {}, "services.Echo!", id="bad-name"),
        pytest.param({"echo": {"command": ["true"]}}, {}, "services.echo.url", id="missing-url"),
        pytest.param({"echo": GOOD}, {"ECHO_QUEUE_LIMIT": "many"}, "services.echo.queue_limit", id="bad-env"),
    ],
)
def test_a_config_error_exits_with_one_line(
    tmp_path: Path, services: dict[str, Any], env: dict[str, str], expected: str
) -> None:
    result = run_to_exit({"services": services}, tmp_path, env)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    [line] = lines
    assert str(tmp_path / "hestia_config.yml") in line  # the file
    assert expected in line  # the service and the key
    assert "Traceback" not in result.stdout + result.stderr


def test_sighup_reloads_and_a_bad_file_keeps_the_running_config(hestia: StartHestia, tmp_path: Path) -> None:
    kept = BackendSpec("kept", tmp_path)
    changed = BackendSpec("changed", tmp_path)
    services: dict[str, Any] = {
        "kept": kept.service(idle_timeout=0),
        "changed": changed.service(idle_timeout=5),
    }
    gw = hestia({"services": services})
    http = gw.http
    assert http.get("/services/kept/health").status_code == 200
    kept_pid = gw.status("kept")["details"]["pid"]

    # A good change: one service changed, one added, one untouched.
    services["changed"] = changed.service(idle_timeout=7)
    services["added"] = {"url": "http://127.0.0.1:9"}
    gw.write_config({"server": {"listen": gw.listen}, "services": services})
    gw.signal(signal.SIGHUP)
    gw.wait_status("changed", "idle_timeout", 7, timeout=5)
    assert gw.status("added")["backend"] == "static"
    assert gw.status("kept")["details"]["pid"] == kept_pid  # not restarted
    assert pid_alive(kept_pid)

    # A bad file: logged, and everything stays as it runs.
    bad = {"server": {"listen": gw.listen}, "services": {**services, "changed": {**services["changed"], "idle_timeout": "x"}}}
    gw.write_config(bad)
    gw.signal(signal.SIGHUP)
    assert wait_for(lambda: "reload failed" in gw.log_text(), 5)
    assert "services.changed.idle_timeout" in gw.log_text()
    assert gw.status("changed")["idle_timeout"] == 7
    assert gw.status("added")["state"] == "ready"
    assert gw.status("kept")["details"]["pid"] == kept_pid

    refused = http.post("/v1/reload")
    assert refused.status_code == 400
    assert "services.changed.idle_timeout" in refused.json()["error"]
    assert gw.status("changed")["idle_timeout"] == 7

    # POST /v1/reload applies a good file.
    del services["added"]
    gw.write_config({"server": {"listen": gw.listen}, "services": services})
    reloaded = http.post("/v1/reload")
    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json()["removed"] == ["added"]
    assert http.get("/v1/services/added/status").status_code == 404
    assert gw.status("kept")["details"]["pid"] == kept_pid


def test_zero_configuration(hestia: StartHestia) -> None:
    gw = hestia(None)  # no file, an empty working directory, no HESTIA_CONFIG
    assert gw.config_path is None and "HESTIA_CONFIG" not in gw.env
    status = gw.http.get("/v1/services/ollama/status")
    assert status.status_code == 200
    body = status.json()
    assert body["name"] == "ollama" and body["url"] == "http://localhost:11434"
    has_ollama = shutil.which("ollama", path=clean_environ()["PATH"]) is not None
    assert body["backend"] == ("process" if has_ollama else "static")
    assert [s["name"] for s in gw.http.get("/v1/services").json()["services"]] == ["ollama"]


def test_environment_overrides(hestia: StartHestia, tmp_path: Path) -> None:
    echo = BackendSpec("my-echo", tmp_path)
    port, file_port = free_port(), free_port()
    config = {
        "server": {"listen": f"tcp:{file_port}:interface=127.0.0.1"},
        "services": {"my-echo": {**echo.service(idle_timeout=300), "url": "http://127.0.0.1:9"}},
    }
    env = {
        "HESTIA_LISTEN": f"tcp:{port}:interface=127.0.0.1",
        "MY_ECHO_URL": echo.url,
        "MY_ECHO_IDLE_TIMEOUT": "0.5",
    }
    gw = hestia(config, env, port=port, config_from_env=True)  # the file named by HESTIA_CONFIG
    assert "--config" not in gw.argv
    assert not port_open(file_port)  # HESTIA_LISTEN won over server.listen
    status = gw.status("my-echo")
    assert (status["url"], status["idle_timeout"]) == (echo.url, 0.5)
    with httpx.Client(base_url=gw.url, trust_env=False, timeout=20) as http:
        assert http.get("/services/my-echo/echo").status_code == 200  # reached at MY_ECHO_URL
    gw.wait_state("my-echo", "stopped", timeout=5)


def test_keep_warm_starts_with_the_gateway_and_never_idles(hestia: StartHestia, tmp_path: Path) -> None:
    warm = BackendSpec("warm", tmp_path)
    env_warm = BackendSpec("env-warm", tmp_path)
    gw = hestia(
        {"services": {"warm": warm.service(keep_warm=True, idle_timeout=0.2),
                      "env-warm": env_warm.service(idle_timeout=0.2)}},
        {"ENV_WARM_KEEP_WARM": "true"},
    )
    for name, spec in (("warm", warm), ("env-warm", env_warm)):
        status = gw.wait_state(name, "ready", timeout=10)  # with no request at all
        assert status["keep_warm"] is True and status["last_request_at"] is None
        assert spec.starts() == 1
        assert gw.http.get(f"/services/{name}/echo").status_code == 200
        assert gw.status(name)["idle_stop_at"] is None
    # Five idle timeouts later both are still up, on their first process.
    assert not wait_for(lambda: {gw.state("warm"), gw.state("env-warm")} != {"ready"}, 1.0)
    assert (warm.starts(), env_warm.starts()) == (1, 1)
