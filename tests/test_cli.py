"""
Issue 8, "CLI": the ``hestia`` console script against a real gateway.

The script is run as the installed console script (a subprocess), the way a
person runs it; the gateway is a real ``twistd -n hestia`` with real backends.
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support.backendproc import free_port, wait_for
from support.hestiaproc import BackendSpec, HestiaProcess, clean_environ, run_to_exit, stop_cleanly

from hestia.cli import Exit, human_duration, status_table

HESTIA = str(Path(sys.executable).with_name("hestia"))


def hestia_cli(*args: str, url: str | None = None, token: str | None = None,
               cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = clean_environ({"HESTIA_URL": url} if url else None)
    if token is not None:
        env["HESTIA_TOKEN"] = token
    return subprocess.run([HESTIA, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout, check=False, stdin=subprocess.DEVNULL)


# -- unit ---------------------------------------------------------------------------


@pytest.mark.unit
def test_status_table_aligns_and_summarises() -> None:
    now = 1_700_000_100.0
    table = status_table([
        {"name": "ollama", "state": "ready", "backend": "process", "state_since": "2023-11-14T22:13:20Z",
         "last_request_at": "2023-11-14T22:14:50Z", "in_flight": 2, "queued": 0, "last_error": None},
        {"name": "web-ui", "state": "failed", "backend": "docker", "state_since": "2023-11-14T22:13:20Z",
         "in_flight": 0, "queued": 3, "last_error": "exited with status 3\nmore"},
    ], now=now)
    lines = table.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "BACKEND", "UPTIME", "LAST", "REQUEST", "IN", "FLIGHT",
                                "QUEUED", "LAST", "ERROR"]
    assert lines[1].split()[:4] == ["ollama", "ready", "process", "1m40s"]
    assert "10s ago" in lines[1]
    assert lines[2].split()[:4] == ["web-ui", "failed", "docker", "-"]
    assert lines[2].endswith("exited with status 3")  # first line only
    assert lines[0].index("STATE") == lines[1].index("ready") == lines[2].index("failed")


@pytest.mark.unit
@pytest.mark.parametrize(("seconds", "text"), [
    (None, "-"), (0.25, "0.2s"), (12, "12s"), (125, "2m05s"), (7300, "2h01m"), (90000, "1d01h"),
])
def test_human_duration(seconds: float | None, text: str) -> None:
    assert human_duration(seconds) == text


@pytest.mark.unit
def test_check_config_ok(tmp_path: Path) -> None:
    path = tmp_path / "hestia_config.yml"
    path.write_text(yaml.safe_dump({"services": {"web": {"url": "http://127.0.0.1:9", "command": "true"}}}))
    result = hestia_cli("check-config", str(path))
    assert result.returncode == Exit.OK, result.stderr
    assert "OK, 1 service(s)" in result.stdout
    assert "web: process -> http://127.0.0.1:9" in result.stdout


@pytest.mark.integration
def test_check_config_says_what_the_daemon_says(tmp_path: Path) -> None:
    bad = {"services": {"ollama": {"url": "http://127.0.0.1:9", "idle_timout": 5}}}
    daemon = run_to_exit(bad, tmp_path)
    assert daemon.returncode != 0
    result = hestia_cli("check-config", str(tmp_path / "hestia_config.yml"))
    assert result.returncode == Exit.USAGE
    assert "services.ollama.idle_timout" in result.stderr
    daemon_line = next(line for line in daemon.stderr.splitlines() if "config error" in line)
    assert result.stderr.strip() == daemon_line.strip()


@pytest.mark.unit
def test_check_config_missing_file(tmp_path: Path) -> None:
    result = hestia_cli("check-config", str(tmp_path / "nope.yml"))
    assert result.returncode == Exit.USAGE
    assert "nope.yml" in result.stderr and "cannot read" in result.stderr


@pytest.mark.unit
def test_unreachable_gateway() -> None:
    result = hestia_cli("status", url=f"http://127.0.0.1:{free_port()}")
    assert result.returncode == Exit.UNREACHABLE
    assert "cannot reach Hestia" in result.stderr


@pytest.mark.unit
def test_a_url_without_scheme_names_where_it_came_from() -> None:
    from_option = hestia_cli("--url", "localhost:8080", "status")
    assert from_option.returncode == Exit.USAGE
    assert from_option.stderr == "hestia: --url must be an http:// or https:// URL, not 'localhost:8080'\n"
    from_env = hestia_cli("status", url="localhost:8080")
    assert from_env.returncode == Exit.USAGE
    assert from_env.stderr == "hestia: HESTIA_URL must be an http:// or https:// URL, not 'localhost:8080'\n"


@pytest.mark.integration
def test_another_server_at_the_url_is_not_taken_for_hestia(tmp_path: Path) -> None:
    # `python3 -m http.server 8080` (or any other server) where the CLI expects Hestia.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        result = hestia_cli("status", url=url, cwd=tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == Exit.UNREACHABLE
    assert result.stderr == (
        f"hestia: {url} is not a Hestia gateway: /v1/services answered HTTP 404 File not found, "
        "not Hestia's JSON (set HESTIA_URL)\n"
    )


@pytest.mark.unit
def test_usage_error_exit_code() -> None:
    assert hestia_cli("frobnicate").returncode == Exit.USAGE
    assert hestia_cli("start").returncode == Exit.USAGE


# -- integration --------------------------------------------------------------------


class Gw:
    def __init__(self, tmp: Path) -> None:
        self.echo = BackendSpec("echo", tmp)
        self.broken = BackendSpec("broken", tmp)
        self.gw = HestiaProcess({
            "services": {
                "echo": self.echo.service("--start-delay", "0.5", "--verbose", idle_timeout=0),
                "broken": self.broken.service("--fail-start", "3", idle_timeout=0),
            },
        }, tmp / "hestia").start()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gw]:
    tmp = tmp_path_factory.mktemp("cli")
    fixture = Gw(tmp)
    try:
        yield fixture
    finally:
        stop_cleanly(fixture.gw, tmp)


@pytest.mark.integration
def test_status_table(gw: Gw) -> None:
    result = hestia_cli("status", url=gw.gw.url)
    assert result.returncode == Exit.OK, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("NAME")
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["echo", "broken"]
    one = hestia_cli("status", "echo", url=gw.gw.url)
    assert one.returncode == Exit.OK
    assert len(one.stdout.splitlines()) == 2


@pytest.mark.integration
def test_start_wait_stop(gw: Gw) -> None:
    hestia_cli("stop", "echo", url=gw.gw.url)
    result = hestia_cli("start", "echo", "--wait", url=gw.gw.url)
    assert result.returncode == Exit.OK, result.stderr
    assert "echo: starting" in result.stdout  # the progress line (not a tty: one line per state)
    assert result.stdout.rstrip().splitlines()[-1].startswith("echo: ready (started in ")
    assert gw.gw.state("echo") == "ready"
    stopped = hestia_cli("stop", "echo", url=gw.gw.url)
    assert stopped.returncode == Exit.OK
    assert stopped.stdout.strip() == "echo: stopped"
    assert gw.gw.state("echo") == "stopped"


@pytest.mark.integration
def test_start_wait_on_a_running_service_says_it_was_already_running(gw: Gw) -> None:
    first = hestia_cli("start", "echo", "--wait", url=gw.gw.url)
    assert first.returncode == Exit.OK, first.stderr
    again = hestia_cli("start", "echo", "--wait", url=gw.gw.url)
    assert again.returncode == Exit.OK, again.stderr
    assert again.stdout == "echo: already running\n"  # not the last start's "started in 0.5s"


@pytest.mark.unit
def test_version() -> None:
    from hestia import __version__

    result = hestia_cli("--version")
    assert (result.returncode, result.stdout) == (0, f"hestia {__version__}\n")


@pytest.mark.integration
def test_start_wait_reports_failure_reason(gw: Gw) -> None:
    result = hestia_cli("start", "broken", "--wait", url=gw.gw.url)
    assert result.returncode == Exit.FAILED
    assert "broken: start failed:" in result.stderr
    assert "3" in result.stderr  # the exit status, from the backend's own words


@pytest.mark.integration
def test_unknown_service(gw: Gw) -> None:
    for args in (("status", "nope"), ("start", "nope"), ("stop", "nope"), ("logs", "nope")):
        result = hestia_cli(*args, url=gw.gw.url)
        assert result.returncode == Exit.NOT_FOUND, (args, result.stderr)
        assert "nope" in result.stderr


@pytest.mark.integration
def test_logs(gw: Gw) -> None:
    hestia_cli("start", "echo", "--wait", url=gw.gw.url)
    result = hestia_cli("logs", "echo", "--tail", "50", url=gw.gw.url)
    if result.returncode == Exit.NOT_FOUND:
        # A gateway without the logs route: a clear message, not a traceback.
        assert "no logs endpoint" in result.stderr
        return
    assert result.returncode == Exit.OK, result.stderr
    assert result.stdout.strip(), "no output lines"


@pytest.mark.integration
def test_logs_follow_prints_new_lines(gw: Gw) -> None:
    hestia_cli("start", "echo", "--wait", url=gw.gw.url)
    env = clean_environ({"HESTIA_URL": gw.gw.url})
    proc = subprocess.Popen([HESTIA, "logs", "echo", "-f", "--tail", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    seen: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: seen.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        marker = f"/echo/marker-{free_port()}"
        # The follower may not be connected yet when a request is made: ask
        # until its line shows up (each request logs a new line).
        for _ in range(20):
            gw.gw.http.get(f"/services/echo{marker}")
            if wait_for(lambda: any(marker in line for line in list(seen)), 0.5, 0.02):
                break
        assert any(marker in line for line in list(seen)), seen
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.integration
def test_token_is_sent(tmp_path: Path) -> None:
    """With auth on, no token exits 4; $HESTIA_TOKEN as a bearer token works."""
    secret = "s3cret-admin-token"
    gw = HestiaProcess(
        {"auth": {"tokens": [{"name": "admin", "token_env": "TEST_ADMIN_TOKEN", "scopes": ["admin"]}]},
         "services": {"static": {"url": f"http://127.0.0.1:{free_port()}"}}},
        tmp_path, env={"TEST_ADMIN_TOKEN": secret},
    )
    try:
        gw.start()
        denied = hestia_cli("status", url=gw.url)
        if denied.returncode == Exit.OK:
            pytest.skip("this gateway does not enforce auth on /v1/services")
        assert denied.returncode == Exit.AUTH, denied.stderr
        assert "HESTIA_TOKEN" in denied.stderr
        allowed = hestia_cli("status", url=gw.url, token=secret)
        assert allowed.returncode == Exit.OK, allowed.stderr
        assert secret not in allowed.stdout + allowed.stderr
    finally:
        gw.stop()


@pytest.mark.integration
def test_logs_follow_says_when_the_gateway_goes_away(tmp_path: Path) -> None:
    # `hestia logs NAME -f` is a tail -f: its end is the gateway's, and it says so (exit 5).
    echo = BackendSpec("echo", tmp_path)
    gw = HestiaProcess({"services": {"echo": echo.service("--verbose", idle_timeout=0)}}, tmp_path / "hestia").start()
    try:
        assert hestia_cli("start", "echo", "--wait", url=gw.url).returncode == Exit.OK
        proc = subprocess.Popen([HESTIA, "logs", "echo", "-f", "--tail", "0"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=clean_environ({"HESTIA_URL": gw.url}))
        seen: list[str] = []
        threading.Thread(target=lambda: seen.extend(proc.stdout or ()), daemon=True).start()
        marker = f"/echo/marker-{free_port()}"
        for _ in range(20):  # connected once a new line shows up
            gw.http.get(f"/services/echo{marker}")
            if wait_for(lambda: any(marker in line for line in list(seen)), 0.5, 0.02):
                break
        assert any(marker in line for line in list(seen)), seen
        gw.stop()
        assert proc.wait(timeout=20) == Exit.UNREACHABLE
        assert proc.stderr is not None
        assert proc.stderr.read() == "hestia: echo: the gateway closed the log stream (did it stop?)\n"
    finally:
        stop_cleanly(gw, tmp_path)
