"""
Issue 13 (and issue 12, hole 4) against real processes: held requests survive the herd.

The backend is what a new user runs: Python's C{ThreadingHTTPServer} with a
listen backlog of 5, one connection per request (C{tests/support/backlog_backend.py}),
started by Hestia as a process service.  A crowd held through its cold start
must all be answered 200; so must a warm burst of new client connections.  A
backend that takes a request and never answers gets a 504 at
C{response_timeout}, and hung requests do not hold a slot forever.

The assertions are outcomes only (every status), with generous time bounds:
the machine is shared.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.backendproc import free_port
from support.hestiaproc import HestiaProcess, stop_cleanly

BACKLOG_BACKEND = Path(__file__).parent / "support" / "backlog_backend.py"


def raise_open_files(wanted: int) -> None:
    """Room for the crowd's sockets here and in Hestia (which inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


async def one_get(port: int, path: str, timeout: float) -> tuple[int, bytes]:
    """One request on its own connection: (status, body); status 0 when it failed."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
        writer.close()
    except (OSError, TimeoutError) as error:
        return 0, repr(error).encode()
    if not data.startswith(b"HTTP/1.1 "):
        return 0, data[:200]
    return int(data[9:12]), data.split(b"\r\n\r\n", 1)[-1]


def upgrade_answer(port: int, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
    """A WebSocket upgrade request; the answer's status and body (by its Content-Length)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                     "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data and (piece := sock.recv(65536)):
            data += piece
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length and (piece := sock.recv(65536)):
            body += piece
    return int(head[9:12]), body


def crowd(port: int, paths: list[str], timeout: float = 90.0) -> list[tuple[int, bytes]]:
    """Send every request at once, each on a new connection; their answers in order."""

    async def run() -> list[tuple[int, bytes]]:
        return await asyncio.gather(*(one_get(port, path, timeout) for path in paths))

    return asyncio.run(run())


def statuses(answers: list[tuple[int, bytes]]) -> Counter[int]:
    return Counter(status for status, _ in answers)


def backlog_service(port: int, **settings: Any) -> dict[str, Any]:
    return {
        "url": f"http://127.0.0.1:{port}",
        "command": [sys.executable, str(BACKLOG_BACKEND), "--port", str(port), "--start-delay", "1.0"],
        "health": {"path": "/health"},
        "queue_limit": 5000,
        "idle_timeout": 0,
        **settings,
    }


@pytest.fixture
def herd(tmp_path: Path) -> Iterator[tuple[HestiaProcess, int]]:
    raise_open_files(8192)
    port = free_port()
    config = {"defaults": {"stop_timeout": 3}, "services": {"small": backlog_service(port)}}
    hestia = HestiaProcess(config, tmp_path / "hestia").start()
    try:
        yield hestia, port
    finally:
        hestia.http.close()
        stop_cleanly(hestia, tmp_path)


@pytest.mark.parametrize("count", [200, 1000])
def test_a_crowd_held_through_a_cold_start_of_a_backlog_5_backend_is_all_answered(
    herd: tuple[HestiaProcess, int], count: int
) -> None:
    hestia, _ = herd
    assert hestia.http.get("/v1/services/small/status").json()["state"] == "stopped"
    began = time.monotonic()
    answers = crowd(hestia.port, [f"/services/small/r{i}" for i in range(count)])
    took = time.monotonic() - began
    assert statuses(answers) == {200: count}, [a for a in answers if a[0] != 200][:5]
    assert all(body == f"ok /r{i}\n".encode() for i, (_, body) in enumerate(answers))
    status = hestia.http.get("/v1/services/small/status").json()
    assert status["state"] == "ready"
    assert status["concurrency"]["max_concurrency"] == 64 and status["concurrency"]["active"] == 0
    assert took < 60, f"{count} requests took {took:.1f}s"


def test_a_warm_burst_of_new_client_connections_is_all_answered(herd: tuple[HestiaProcess, int]) -> None:
    hestia, _ = herd
    assert hestia.http.get("/services/small/warm").status_code == 200
    answers = crowd(hestia.port, [f"/services/small/w{i}" for i in range(200)])
    assert statuses(answers) == {200: 200}, [a for a in answers if a[0] != 200][:5]


def test_a_backend_that_never_answers_gets_504_at_response_timeout(tmp_path: Path) -> None:
    config = {"defaults": {"stop_timeout": 3}, "services": {
        "hangs": backlog_service(free_port(), response_timeout=2),
        # Three slots: hung requests must give theirs back.
        "narrow": backlog_service(free_port(), response_timeout=2, max_concurrency=3),
    }}
    hestia = HestiaProcess(config, tmp_path / "hestia").start()
    try:
        assert hestia.http.get("/services/hangs/warm").status_code == 200
        assert hestia.http.get("/services/narrow/warm").status_code == 200

        async def hung_and_one_more(service: str) -> tuple[list[tuple[int, bytes]], tuple[int, bytes], float]:
            hung = [asyncio.ensure_future(one_get(hestia.port, f"/services/{service}/hang{i}", 30))
                    for i in range(3)]
            await asyncio.sleep(0.3)  # the three are with the backend first
            began = time.monotonic()
            other = await one_get(hestia.port, f"/services/{service}/other", 30)
            other_took = time.monotonic() - began
            return list(await asyncio.gather(*hung)), other, other_took

        began = time.monotonic()
        hung, other, other_took = asyncio.run(hung_and_one_more("hangs"))
        took = time.monotonic() - began
        assert other[0] == 200 and other_took < 1.5  # not blocked behind the hung ones
        assert [status for status, _ in hung] == [504, 504, 504]
        assert b"response_timeout 2s" in hung[0][1] and b'"service": "hangs"' in hung[0][1]
        assert 1.5 < took < 15

        # With three slots all hung, a fourth request waits only until the
        # deadline frees one: never forever.
        hung, other, other_took = asyncio.run(hung_and_one_more("narrow"))
        assert [status for status, _ in hung] == [504, 504, 504]
        assert other[0] == 200 and 1.0 < other_took < 15
        # A WebSocket upgrade that the backend takes and never answers: the
        # same deadline, not a client held forever.
        began = time.monotonic()
        status, body = upgrade_answer(hestia.port, "/services/hangs/hang-ws")
        assert status == 504, body
        assert b"response_timeout 2s" in body
        assert 1.5 < time.monotonic() - began < 15
        metrics = hestia.http.get("/v1/metrics").text
        assert 'hestia_response_timeouts_total{service="hangs"} 4.0' in metrics
        assert 'hestia_response_timeouts_total{service="narrow"} 3.0' in metrics
    finally:
        hestia.http.close()
        stop_cleanly(hestia, tmp_path)
