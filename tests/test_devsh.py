"""
Issue 20: C{./scripts/dev.sh} says what it does -- C{status} prints the CLI's
table or says plainly that no gateway runs, and the usage lists the suites.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
from conftest import StartHestia, require
from support.backendproc import free_port
from support.hestiaproc import clean_environ, wait_for

ROOT = Path(__file__).resolve().parents[1]
DEV_SH = ROOT / "scripts" / "dev.sh"

pytestmark = pytest.mark.integration


def dev_sh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # dev.sh uses the checkout's own .venv; without one it would install it first.
    require((ROOT / ".venv" / "bin" / "hestia").exists(), "no .venv in the checkout (./scripts/dev.sh setup)")
    return subprocess.run(
        ["bash", str(DEV_SH), *args], capture_output=True, text=True, timeout=60,
        env=clean_environ(env), stdin=subprocess.DEVNULL, check=False,
    )


def test_status_says_when_no_gateway_is_running() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = dev_sh("status", env={"HESTIA_URL": url})
    assert result.returncode == 5  # hestia.cli.Exit.UNREACHABLE
    assert result.stderr.strip() == (
        f"no Hestia gateway is running at {url} (start one with ./scripts/dev.sh run, or set HESTIA_URL)"
    )
    assert "Traceback" not in result.stdout + result.stderr


def test_status_prints_the_services_table(hestia: StartHestia) -> None:
    gw = hestia({"services": {"web": {"url": "http://127.0.0.1:9"}, "other": {"url": "http://127.0.0.1:9"}}})
    result = dev_sh("status", env={"HESTIA_URL": gw.url})
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split()[:3] == ["NAME", "STATE", "BACKEND"]
    assert sorted(row.split()[0] for row in rows) == ["other", "web"]
    one = dev_sh("status", "web", env={"HESTIA_URL": gw.url})
    assert one.returncode == 0 and [row.split()[0] for row in one.stdout.splitlines()[1:]] == ["web"]
    missing = dev_sh("status", "nope", env={"HESTIA_URL": gw.url})
    assert missing.returncode == 3 and "nope" in missing.stderr


def test_usage_lists_the_suites() -> None:
    result = subprocess.run(["bash", str(DEV_SH), "help"], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    for suite in ("unit", "integration", "contract", "coverage", "semaphore", "lint"):
        assert suite in result.stdout
    assert "set -euo" not in result.stdout  # the usage is the header comment, nothing more


def test_run_twice_and_stop(tmp_path: Path) -> None:
    # A second `run` in the same checkout says that one runs and how to stop it (twistd's own
    # message suggests a --pidfile, which dev.sh owns); `stop` stops it and says so, and leaves
    # the machine-wide test engine alone (only `stop --engine` touches it).
    port = free_port()
    config = tmp_path / "hestia_config.yml"
    config.write_text(f'server: {{listen: "tcp:{port}:interface=127.0.0.1", state_path: h.db}}\nservices: {{}}\n')
    env = {
        "HESTIA_CONFIG": str(config), "HESTIA_RUN_DIR": str(tmp_path / "run"), "HESTIA_WATCH_CONFIG": "0",
        "HESTIA_PODMAN_SOCK": str(tmp_path / "engine" / "podman.sock"),  # a stop of the engine would say so
    }
    require((ROOT / ".venv" / "bin" / "hestia").exists(), "no .venv in the checkout (./scripts/dev.sh setup)")
    with open(tmp_path / "run.log", "wb") as log:
        first = subprocess.Popen(["bash", str(DEV_SH), "run"], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                 env=clean_environ(env), start_new_session=True)
    try:
        def answers() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(answers, 30.0, 0.1), (tmp_path / "run.log").read_text()
        second = dev_sh("run", env=env)
        assert second.returncode == 1
        assert second.stderr.strip() == (
            f"Hestia is already running from this checkout (pid {first.pid}): ./scripts/dev.sh stop stops it"
        )
        stopped = dev_sh("stop", env=env)
        assert stopped.returncode == 0, stopped.stderr
        assert f"stopped Hestia (pid {first.pid})" in stopped.stderr
        assert "podman-engine" not in stopped.stdout + stopped.stderr
        assert first.wait(timeout=10) is not None
        again = dev_sh("stop", env=env)
        assert again.returncode == 0 and "no Hestia started by ./scripts/dev.sh run is running" in again.stderr
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
