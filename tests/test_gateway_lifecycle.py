"""
Issue 2, "Lifecycle behaviour" and the lifecycle errors of "Proxy behaviour".

The tests run a real ``twistd -n hestia`` -- one shared by the module (each
test adding services of its own, see L{Shared}), or their own when they end it
-- whose services are real ``tests/support/backend.py`` processes started by Hestia's
process backend.  Each start appends a line to a counter file (see
L{hestiaproc.BackendSpec}), so "how many processes were started" is a fact, not
a guess.  Time is only ever waited for by polling Hestia's status or the
processes themselves; the few fixed windows measure that something does *not*
happen.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import StartHestia
from support.backendproc import pid_alive, port_open, wait_for
from support.hestiaproc import (
    GRACEFUL,
    BackendSpec,
    HestiaProcess,
    processes_marked,
    read_request_log,
    stop_cleanly,
)

pytestmark = pytest.mark.integration


def when(iso: str) -> float:
    """An ISO time from the status API as POSIX seconds."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def client(gw: HestiaProcess, timeout: float = 20.0) -> httpx.Client:
    return httpx.Client(base_url=gw.url, trust_env=False, timeout=timeout)


def background(gw: HestiaProcess, path: str, method: str = "GET", timeout: float = 20.0) -> Future[httpx.Response]:
    """Send one request from another thread; its response later."""
    def send() -> httpx.Response:
        with client(gw, timeout) as http:
            return http.request(method, path)

    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(send)
    pool.shutdown(wait=False)
    return future


class Shared:
    """
    One Hestia for the tests that each use services of their own.

    A test adds its services with L{add}: the configuration file gains them and
    C{POST /v1/reload} applies it, which leaves every other service as it is.
    Starting one gateway per test would cost a second of twistd start-up each.
    """

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        self.services: dict[str, dict[str, Any]] = {}
        self.gw = HestiaProcess({"services": {}}, tmp / "hestia").start()

    def add(self, name: str, *args: str, timed: bool = False, **settings: Any) -> BackendSpec:
        assert name not in self.services, f"service {name} already used by another test"
        spec = BackendSpec(name, self.dir)
        self.services[name] = spec.service(*args, timed=timed, **settings)
        self.gw.write_config({"server": {"listen": self.gw.listen}, "services": self.services})
        reloaded = self.gw.http.post("/v1/reload")
        assert reloaded.status_code == 200 and reloaded.json()["added"] == [name], reloaded.text
        return spec


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    tmp = tmp_path_factory.mktemp("lifecycle")
    gateway = Shared(tmp)
    try:
        yield gateway
    finally:
        stop_cleanly(gateway.gw, tmp)


def error_body(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) >= {"error", "service", "state"}, body
    return body


# -- cold start and idle stop -------------------------------------------------------------


def test_cold_start_then_idle_stop(shared: Shared) -> None:
    gw = shared.gw
    echo = shared.add("cold", "--start-delay", "0.4", idle_timeout=0.6)
    status = gw.status("cold")
    assert (status["state"], status["in_flight"], status["queued"]) == ("stopped", 0, 0)
    assert status["last_request_at"] is None and status["details"]["pid"] is None
    assert echo.starts() == 0 and not port_open(echo.port)  # nothing runs before a request

    pending = background(gw, "/services/cold/echo?first")
    starting = gw.wait_state("cold", "starting", timeout=5)
    assert starting["queued"] == 1  # held while the command starts
    response = pending.result(timeout=20)
    assert response.status_code == 200 and response.json()["path"] == "/echo?first"

    ready = gw.status("cold")
    assert ready["state"] == "ready" and ready["in_flight"] == 0 and ready["queued"] == 0
    pid = ready["details"]["pid"]
    assert pid and pid_alive(pid)
    assert ready["last_start_duration"] >= 0.4
    assert echo.starts() == 1

    stopped = gw.wait_state("cold", "stopped", timeout=8)
    assert wait_for(lambda: not pid_alive(pid), 2.0)
    idle_for = when(stopped["state_since"]) - when(ready["last_request_at"])
    assert idle_for >= 0.6 - 0.05, f"stopped after {idle_for:.2f}s idle, idle_timeout is 0.6s"
    assert stopped["state_reason"] == "idle"

    # The next request starts it again.
    with client(gw) as http:
        assert http.get("/services/cold/echo").status_code == 200
    assert echo.starts() == 2


def test_two_hundred_concurrent_requests_start_one_process(shared: Shared) -> None:
    gw = shared.gw
    echo = shared.add("burst", "--start-delay", "0.3", queue_limit=500)

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=gw.url, trust_env=False, timeout=30, limits=limits) as http:
            return await asyncio.gather(*(http.get(f"/services/burst/echo?i={i}") for i in range(200)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 200
    assert sorted(r.json()["path"] for r in responses) == sorted(f"/echo?i={i}" for i in range(200))
    assert echo.starts() == 1
    assert len(echo.requests("/echo")) == 200


def test_queue_limit_overflow_is_503_with_retry_after(shared: Shared) -> None:
    gw = shared.gw
    echo = shared.add("limited", "--start-delay", "1", queue_limit=2)
    held = [background(gw, f"/services/limited/echo?held={i}") for i in range(2)]
    gw.wait_status("limited", "queued", 2, timeout=5)
    with client(gw) as http:
        began = time.monotonic()
        refused = http.get("/services/limited/echo?third", headers={"X-Request-ID": "over-1"})
        assert time.monotonic() - began < 1.0  # refused at once, not held
    body = error_body(refused, 503)
    assert (body["service"], body["state"]) == ("limited", "starting")
    assert "queue" in body["error"]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-request-id"] == "over-1"
    assert [f.result(timeout=20).status_code for f in held] == [200, 200]
    assert echo.starts() == 1
    assert all("third" not in entry["path"] for entry in echo.requests())


# -- failures ------------------------------------------------------------------------------


def test_start_failure_is_502_with_exit_status_and_output(shared: Shared) -> None:
    gw = shared.gw
    broken = shared.add("broken", "--fail-start", "3")
    with client(gw) as http:
        response = http.post("/services/broken/api/chat", content=b"{}")
    body = error_body(response, 502)
    assert (body["service"], body["state"]) == ("broken", "failed")
    assert "exit status 3" in body["error"]
    detail = "\n".join(body["detail"])
    assert "error: cannot load model weights" in detail
    assert "error: exiting with status 3" in detail
    status = gw.status("broken")
    assert status["state"] == "failed"
    assert "exit status 3" in status["last_error"]
    assert status["details"]["last_exit"] == "exit status 3"
    assert broken.starts() == 1


def test_crash_loop_answers_502_at_once_during_a_cooldown(shared: Shared) -> None:
    gw = shared.gw
    broken = shared.add("looping", "--fail-start", "5")
    with client(gw) as http:
        for attempt in range(1, 4):
            body = error_body(http.get("/services/looping/x"), 502)
            assert "exit status 5" in body["error"]
            assert broken.starts() == attempt  # each of the first three failures was a real start
        began = time.monotonic()
        refused = http.get("/services/looping/x")
        assert time.monotonic() - began < 0.5
    body = error_body(refused, 502)
    assert "not retrying" in body["error"] and "exit status 5" in body["error"]
    assert "error: exiting with status 5" in body["detail"]
    assert 20 <= int(refused.headers["retry-after"]) <= 30
    assert broken.starts() == 3  # no fourth start
    assert gw.status("looping")["cooldown_until"] is not None


def test_start_timeout_is_504_and_kills_the_start(shared: Shared) -> None:
    gw = shared.gw
    slow = shared.add("never-ready", "--start-delay", "30", start_timeout=0.5)
    with client(gw) as http:
        began = time.monotonic()
        response = http.get("/services/never-ready/echo")
        took = time.monotonic() - began
    body = error_body(response, 504)
    assert "start_timeout" in body["error"]
    assert 0.45 <= took < 5
    assert gw.status("never-ready")["state"] == "failed"
    assert wait_for(lambda: not slow.running(), 5.0), "the half-started process was left running"


def test_queue_timeout_is_504_and_the_start_goes_on(shared: Shared) -> None:
    gw = shared.gw
    slow = shared.add("late", "--start-delay", "1", queue_timeout=0.3)
    with client(gw) as http:
        began = time.monotonic()
        response = http.get("/services/late/echo")
        took = time.monotonic() - began
        body = error_body(response, 504)
        assert "waited" in body["error"] and body["state"] == "starting"
        assert 0.25 <= took < 0.95
        assert gw.status("late")["queued"] == 0
        gw.wait_state("late", "ready", timeout=10)  # the start itself was not abandoned
        assert http.get("/services/late/echo").status_code == 200
    assert slow.starts() == 1
    assert slow.requests("/echo") and len(slow.requests("/echo")) == 1  # the timed-out one never arrived


def test_a_held_request_whose_client_leaves_leaves_the_queue(shared: Shared) -> None:
    gw = shared.gw
    slow = shared.add("held", "--start-delay", "1")
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(b"GET /services/held/echo?gone HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        gw.wait_status("held", "queued", 1, timeout=5)
    left = time.monotonic()
    status = gw.wait_status("held", "queued", 0, timeout=2)
    assert time.monotonic() - left < 0.5
    assert status["state"] == "starting"  # gone long before the start could have released it
    gw.wait_state("held", "ready", timeout=10)
    assert not slow.requests("/echo"), "the abandoned request was still forwarded"


def test_a_backend_dying_while_serving_is_failed_then_restarted(shared: Shared) -> None:
    gw = shared.gw
    echo = shared.add("crashy")
    with client(gw) as http:
        assert http.get("/services/crashy/echo").status_code == 200
        pid = gw.status("crashy")["details"]["pid"]
        crashed = http.post("/services/crashy/crash")
        error_body(crashed, 502)
        failed = gw.wait_state("crashy", "failed", timeout=5)
        assert "exited while serving: exit status 3" in failed["last_error"]
        assert not pid_alive(pid)
        assert http.get("/services/crashy/echo").status_code == 200  # a new start
    assert echo.starts() == 2


# -- in flight: no idle stop ---------------------------------------------------------------


def test_idle_stop_waits_for_long_requests_and_streams(shared: Shared) -> None:
    gw = shared.gw
    echo = shared.add("streamer", idle_timeout=0.3)
    with client(gw) as http:
        # A plain request three times longer than idle_timeout.
        slow = http.get("/services/streamer/slow?seconds=0.9")
        assert slow.status_code == 200 and slow.json() == {"slept": 0.9}
        assert echo.starts() == 1
        gw.wait_state("streamer", "stopped", timeout=5)

        # A stream almost five times longer than idle_timeout.
        lines, observed = [], []
        with http.stream("GET", "/services/streamer/stream?n=8&interval=0.2") as response:
            for line in response.iter_lines():
                if line:
                    lines.append(json.loads(line))
                    observed.append(gw.status("streamer"))
        ended = time.time()
    assert [line["i"] for line in lines] == list(range(8))
    # While the stream runs (the status after its last line may already see it ended):
    during = [(s["state"], s["in_flight"], s["idle_stop_at"]) for s in observed[:-1]]
    assert during == [("ready", 1, None)] * 7, during
    assert echo.starts() == 2  # never stopped (and restarted) mid-stream
    stopped = gw.wait_state("streamer", "stopped", timeout=5)
    # The idle clock started when the stream ended.
    assert when(stopped["state_since"]) >= ended + 0.3 - 0.1


# -- stopping --------------------------------------------------------------------------------


def test_stopping_ends_the_whole_process_group(shared: Shared) -> None:
    gw = shared.gw
    manual = shared.add("manual", "--spawn-child", str(shared.dir / "manual.child.pid"), idle_timeout=0)
    idler = shared.add("idler", "--spawn-child", str(shared.dir / "idler.child.pid"), idle_timeout=0.5)
    with client(gw) as http:
        for name in ("manual", "idler"):
            assert http.get(f"/services/{name}/health").status_code == 200
        leader = gw.status("manual")["details"]["pid"]
        grandchild = manual.grandchild_pid()
        assert pid_alive(leader) and pid_alive(grandchild)

        stopped = http.post("/v1/services/manual/stop")
        assert stopped.status_code == 200 and stopped.json()["state"] == "stopped"
        assert wait_for(lambda: not pid_alive(leader) and not pid_alive(grandchild), 2.0)

    # An idle stop too.
    idle_grandchild = idler.grandchild_pid()
    gw.wait_state("idler", "stopped", timeout=5)
    assert wait_for(lambda: not pid_alive(idle_grandchild), 2.0)
    assert "stopping manual" in gw.log_text()  # the leader got SIGTERM first


def test_a_process_ignoring_sigterm_is_killed_after_stop_timeout(shared: Shared) -> None:
    gw = shared.gw
    stubborn = shared.add("stubborn", "--ignore-sigterm", stop_timeout=0.6)
    with client(gw) as http:
        assert http.get("/services/stubborn/health").status_code == 200
        pid = gw.status("stubborn")["details"]["pid"]
        began = time.monotonic()
        stopped = http.post("/v1/services/stubborn/stop")
        took = time.monotonic() - began
    assert stopped.status_code == 200
    assert stopped.json()["state"] == "stopped"
    assert stopped.json()["details"]["last_exit"] == "killed by signal 9 (SIGKILL)"
    assert 0.55 <= took < 5
    assert not pid_alive(pid) and not stubborn.running()
    assert "ignoring SIGTERM (stubborn)" in gw.log_text()


def _gateway_with_two_running(hestia: StartHestia, tmp_path: Path, **server: Any) -> tuple[
    HestiaProcess, BackendSpec, BackendSpec
]:
    one = BackendSpec("one", tmp_path)
    two = BackendSpec("two", tmp_path)
    gw = hestia({
        "server": server,
        "services": {
            "one": one.service("--spawn-child", str(one.child_pidfile), idle_timeout=0),
            "two": two.service(idle_timeout=0),
        },
    })
    with client(gw) as http:
        assert http.get("/services/one/health").status_code == 200
        assert http.get("/services/two/health").status_code == 200
    return gw, one, two


def test_sigterm_lets_in_flight_requests_finish_and_stops_everything(
    hestia: StartHestia, tmp_path: Path
) -> None:
    gw, one, two = _gateway_with_two_running(hestia, tmp_path)
    pids = [gw.status(name)["details"]["pid"] for name in ("one", "two")] + [one.grandchild_pid()]
    in_flight = background(gw, "/services/one/slow?seconds=1")
    gw.wait_status("one", "in_flight", 1, timeout=5)

    gw.signal(signal.SIGTERM)
    assert wait_for(lambda: not port_open(gw.port), 1.0), "still accepting after SIGTERM"
    response = in_flight.result(timeout=10)
    assert response.status_code == 200 and response.json() == {"slept": 1.0}
    assert gw.wait_exit(10) in GRACEFUL
    assert wait_for(lambda: not any(pid_alive(pid) for pid in pids), 2.0), "orphans"
    assert not processes_marked(str(tmp_path))
    assert "waiting up to" in gw.log_text()


def test_sigterm_drain_is_bounded_by_shutdown_timeout(hestia: StartHestia, tmp_path: Path) -> None:
    gw, one, two = _gateway_with_two_running(hestia, tmp_path, shutdown_timeout=0.5)
    in_flight = background(gw, "/services/two/slow?seconds=60")
    gw.wait_status("two", "in_flight", 1, timeout=5)
    began = time.monotonic()
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit(10) in GRACEFUL
    assert 0.45 <= time.monotonic() - began < 5
    with pytest.raises(httpx.HTTPError):
        in_flight.result(timeout=5).raise_for_status()
    assert wait_for(lambda: not processes_marked(str(tmp_path)), 2.0), "orphans"


# -- readiness latency ------------------------------------------------------------------------


def test_held_requests_are_forwarded_within_50ms_of_readiness(shared: Shared) -> None:
    gw = shared.gw
    # Five cold starts, ending at different phases of the probe schedule.
    specs = [
        shared.add(f"ready{i}", "--start-delay", f"{0.3 + 0.009 * i:.3f}", timed=True, idle_timeout=0)
        for i in range(5)
    ]
    gaps_from_listening, gaps_from_probe = [], []
    with client(gw) as http:
        for spec in specs:
            assert http.get(f"/services/{spec.name}/echo").status_code == 200
            log = read_request_log(spec.request_log)
            listening = next(e["t"] for e in log if e["path"] == "<listening>")
            first_probe = next(e["t"] for e in log if e["path"] == "/health")
            forwarded = next(e["t"] for e in log if e["path"] == "/echo")
            gaps_from_listening.append(forwarded - listening)
            gaps_from_probe.append(forwarded - first_probe)
    # On the backend's clock, from the moment it could first answer its health check.
    assert statistics.median(gaps_from_listening) < 0.050, gaps_from_listening
    assert statistics.median(gaps_from_probe) < 0.050, gaps_from_probe


def test_no_health_probes_once_ready(shared: Shared) -> None:
    gw = shared.gw
    echo = shared.add("quiet", timed=True, idle_timeout=0)
    with client(gw) as http:
        assert http.get("/services/quiet/echo").status_code == 200
        probes = len(echo.requests("/health"))
        assert 1 <= probes <= 2
        # A window in which nothing should happen: no polling of a ready service.
        time.sleep(0.5)
        assert len(echo.requests("/health")) == probes
