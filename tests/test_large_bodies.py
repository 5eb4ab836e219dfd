"""
Large bodies in bounded memory: uploads are spooled, downloads stream with
backpressure, so neither a big upload nor a slow reader makes Hestia hold the
body in RAM.
"""

from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.backendproc import free_port
from support.hestiaproc import backend_command

pytestmark = pytest.mark.integration

MIB = 1 << 20


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def static_backend(hestia: Any, tmp_path: Path) -> tuple[Any, str]:
    port = free_port()
    # A process service, so the backend is started (and reaped) by Hestia itself.
    command = backend_command(port, "--name", "big", request_log=tmp_path / "big-requests.log")
    gateway = hestia({"services": {"big": {"url": f"http://127.0.0.1:{port}", "command": command,
                                           "health": {"path": "/health"}, "idle_timeout": 0}}})
    return gateway, gateway.service_url("big")


def test_a_256_mib_upload_is_not_held_in_memory(hestia: Any, tmp_path: Path) -> None:
    gateway, base = static_backend(hestia, tmp_path)
    assert httpx.get(f"{base}/health", timeout=20).status_code == 200
    before = rss_kib(gateway.proc.pid)
    piece = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256()
    for _ in range(256):
        digest.update(piece)

    def body():  # type: ignore[no-untyped-def]
        for _ in range(256):
            yield piece

    response = httpx.post(f"{base}/sink", content=body(), headers={"Content-Length": str(256 * MIB)},
                          timeout=120)
    assert response.status_code == 200
    assert response.json() == {"body_len": 256 * MIB, "body_sha256": digest.hexdigest()}
    grown = (rss_kib(gateway.proc.pid, "VmHWM") - before) / 1024
    assert grown < 64, f"Hestia's peak memory grew by {grown:.0f} MiB for a 256 MiB upload"


def test_a_slow_reader_does_not_make_hestia_buffer(hestia: Any, tmp_path: Path) -> None:
    gateway, base = static_backend(hestia, tmp_path)
    assert httpx.get(f"{base}/health", timeout=20).status_code == 200
    size = 300 * MIB
    before = rss_kib(gateway.proc.pid)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    client.connect(("127.0.0.1", gateway.port))
    client.sendall(f"GET /services/big/bytes?n={size} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += client.recv(4096)
    # The client stops reading.  Without backpressure Hestia would now pull the
    # whole body from the fast loopback backend into memory within a second.
    deadline = time.monotonic() + 2.0
    peak = before
    while time.monotonic() < deadline:
        peak = max(peak, rss_kib(gateway.proc.pid))
        time.sleep(0.05)
    grown = (peak - before) / 1024
    assert grown < 32, f"Hestia buffered {grown:.0f} MiB for a reader that stopped reading"
    received = len(head.split(b"\r\n\r\n", 1)[1])
    client.settimeout(30)
    while received < size:
        chunk = client.recv(1 << 20)
        if not chunk:
            break
        received += len(chunk)
    client.close()
    assert received == size
