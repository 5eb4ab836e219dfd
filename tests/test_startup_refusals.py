"""
Issue 12, hole 7 and the start-up parts of item 12, through a real
``twistd -n hestia``: whatever is wrong (the file, the state store, the
listening address), Hestia refuses to start with ONE line on stderr naming
what is wrong with which file, exits non-zero, and prints no traceback.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import StartHestia
from support.backendproc import free_port, wait_for
from support.hestiaproc import BackendSpec, clean_environ, run_to_exit

from hestia.state import SCHEMA_VERSION

pytestmark = pytest.mark.integration

SERVICE = {"web": {"url": "http://127.0.0.1:9"}}


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode not in (0, None), result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def config(state_path: Path | str, listen: str | None = None, **server: Any) -> dict[str, Any]:
    return {"server": {"listen": listen or f"tcp:{free_port()}:interface=127.0.0.1",
                       "state_path": str(state_path), **server},
            "services": SERVICE}


# -- the configuration file ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(b"services:\n  123: {url: 'http://h:1'}\n", "services.123: service names must be strings",
                     id="number-name"),
        pytest.param(b"services:\n  yes: {url: 'http://h:1'}\n", "services.True: service names must be strings",
                     id="yes-name"),
        pytest.param(b"services:\n  web: {url: 'http://h:1', env: {A: '\xe9t\xe9'}}\n", "not UTF-8 text: line 2",
                     id="latin-1"),
        pytest.param(b"services:\n  web: {url: 'http://h:1'}\nservices: {}\n", "line 3, column 1: duplicate key",
                     id="duplicate"),
        pytest.param(b"server: {header_timeout: .nan}\nservices:\n  web: {url: 'http://h:1'}\n",
                     "server.header_timeout: expected a number of seconds, got NaN", id="nan"),
        pytest.param(b"services:\n  web: {url: 'http://h:1', idle_timeout: .inf}\n",
                     "services.web.idle_timeout: must be at most", id="inf"),
        pytest.param(b"server: {listen: 'bogus:1'}\nservices:\n  web: {url: 'http://h:1'}\n",
                     "server.listen: not a listening endpoint", id="bad-listen"),
    ],
)
def test_a_bad_file_is_one_line(tmp_path: Path, text: bytes, expected: str) -> None:
    path = tmp_path / "hestia_config.yml"
    path.write_bytes(text)
    result = subprocess.run(
        [str(Path(sys.executable).with_name("twistd")), "-n", "--pidfile=", "hestia", "--config", str(path)],
        capture_output=True, text=True, timeout=30, cwd=tmp_path, check=False, stdin=subprocess.DEVNULL,
        env=clean_environ(),
    )
    line = one_line(result)
    assert str(path) in line and expected in line


def test_a_busy_listen_address_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line(run_to_exit(config(tmp_path / "h.db", f"tcp:{port}:interface=127.0.0.1"), tmp_path))
    assert f"cannot listen on 127.0.0.1:{port}" in line and "in use" in line
    assert line.endswith("(another process has it: choose another with --listen, $HESTIA_LISTEN or server.listen)")


# -- the state store -------------------------------------------------------------------------


def _corrupt(path: Path) -> None:
    path.write_bytes(b"this is not an SQLite database\n" * 200)


def _newer(path: Path) -> None:
    connection = sqlite3.connect(path)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()


@pytest.mark.parametrize(
    ("prepare", "expected"),
    [
        pytest.param(lambda path: path.mkdir(), "is not a regular file", id="a-directory"),
        pytest.param(_corrupt, "not a usable SQLite database", id="corrupt"),
        pytest.param(_newer, f"schema version {SCHEMA_VERSION + 1}, newer", id="newer-schema"),
    ],
)
def test_a_broken_state_file_stops_start_up(tmp_path: Path, prepare: Any, expected: str) -> None:
    state = tmp_path / "state.db"
    prepare(state)
    line = one_line(run_to_exit(config(state), tmp_path))
    assert line.startswith(f"hestia: state file error: {state}: ") and expected in line


def test_a_state_directory_that_cannot_be_created_stops_start_up(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    state = tmp_path / "a-file" / "state" / "hestia.db"
    line = one_line(run_to_exit(config(state), tmp_path))
    assert f"{state}: cannot create its directory" in line


def test_a_read_only_place_stops_start_up(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root writes through file modes; /proc takes no new files even from root.
        state: Path = Path("/proc/hestia-test-state.db")
    else:
        place = tmp_path / "read-only"
        place.mkdir()
        place.chmod(0o555)
        state = place / "state.db"
    line = one_line(run_to_exit(config(state), tmp_path))
    assert f"{state}: cannot " in line


LOCKER = (
    "import sqlite3, sys, time\n"
    "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
    "c.execute('PRAGMA journal_mode = WAL')\n"
    "c.execute('CREATE TABLE IF NOT EXISTS held (x)')\n"
    "c.execute('BEGIN EXCLUSIVE')\n"
    "c.execute('INSERT INTO held VALUES (1)')\n"
    "print('locked', flush=True)\n"
    "time.sleep(float(sys.argv[2]))\n"
)


def lock(path: Path, seconds: float) -> subprocess.Popen[str]:
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(path), str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
    return locker


def test_a_locked_state_file_is_waited_for_a_bounded_time_then_refused(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    locker = lock(state, 60)
    try:
        began = time.monotonic()
        result = run_to_exit(config(state), tmp_path, timeout=40)
        waited = time.monotonic() - began
    finally:
        locker.kill()
        locker.wait()
    line = one_line(result)
    assert f"{state}: locked by another process" in line
    assert waited < 30  # bounded (5 s by default), not for ever


def test_shutdown_ends_within_shutdown_timeout_with_the_state_file_locked(
    hestia: StartHestia, tmp_path: Path
) -> None:
    """
    The old store waited SQLite's busy timeout for each queued write, one
    after another: a locked file held the shutdown for 20 s and more.
    """
    web = BackendSpec("web", tmp_path)
    state = tmp_path / "state.db"
    gw = hestia({"server": {"state_path": str(state), "shutdown_timeout": 2},
                 "services": {"web": web.service()}})
    locker = lock(state, 120)
    try:
        # Starts and stops: transitions whose writes now wait for the lock.
        for _ in range(3):
            assert gw.http.get("/services/web/health").status_code == 200
            assert gw.http.post("/v1/services/web/stop").status_code in (200, 202)
            gw.wait_state("web", "stopped")
        began = time.monotonic()
        status = gw.stop(timeout=60)
        took = time.monotonic() - began
    finally:
        locker.kill()
        locker.wait()
    assert status is not None and not gw.killed
    # shutdown_timeout plus the backend's stop and the process exit, generously.
    assert took < 10, f"shutdown took {took:.1f}s:\n{gw.log_text()[-3000:]}"
    assert "Traceback" not in gw.log_text()
    assert wait_for(lambda: not web.running(), 5)


def test_check_config_refuses_what_the_daemon_refuses(tmp_path: Path) -> None:
    path = tmp_path / "hestia_config.yml"
    path.write_text(yaml.safe_dump({
        "auth": {"tokens": [{"name": "admin", "token_env": "HESTIA_TEST_UNSET_TOKEN", "scopes": ["admin"]}]},
        "services": SERVICE,
    }))
    env = clean_environ()
    checked = subprocess.run([str(Path(sys.executable).with_name("hestia")), "check-config", str(path)],
                             capture_output=True, text=True, timeout=30, env=env, check=False)
    daemon = run_to_exit(path.read_text(), tmp_path)
    daemon_line = one_line(daemon)
    assert "auth.tokens.admin.token_env" in daemon_line
    assert checked.returncode == 2, checked.stdout
    assert checked.stderr.strip() == daemon_line.strip()
