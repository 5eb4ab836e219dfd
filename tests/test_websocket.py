"""
WebSockets through Hestia: held during a cold start, tunnelled both ways,
in flight while open, with the `websockets` package at both ends.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.backendproc import free_port, wait_for
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

pytestmark = pytest.mark.integration

WS_BACKEND = str(Path(__file__).parent / "support" / "ws_backend.py")


def ws_service(tmp_path: Path, **settings: Any) -> tuple[dict[str, Any], int]:
    port = free_port()
    service = {
        "url": f"http://127.0.0.1:{port}",
        # The tmp_path marker lets the fixture find anything left behind.
        "command": [sys.executable, WS_BACKEND, "--port", str(port), "--start-delay", "0.3"],
        "env": {"HESTIA_TEST_MARKER": str(tmp_path)},
        "health": {"path": "/health"},
        "idle_timeout": 1,
        "start_timeout": 20,
        **settings,
    }
    return {"services": {"ws": service}}, port


def test_a_cold_websocket_is_held_then_tunnelled(hestia: Any, tmp_path: Path) -> None:
    config, _ = ws_service(tmp_path)
    gateway = hestia(config)
    assert gateway.state("ws") == "stopped"
    url = f"ws://127.0.0.1:{gateway.port}/services/ws/echo"
    with connect(url, open_timeout=20, max_size=None) as socket:
        socket.send("hello")
        assert socket.recv(timeout=5) == "hello"
        big = bytes(range(256)) * 8192  # 2 MiB: exercises the splice's flow control.
        socket.send(big)
        assert socket.recv(timeout=20) == big
        status = gateway.status("ws")
        assert status["state"] == "ready" and status["in_flight"] == 1
        # Open far longer than idle_timeout: an open tunnel is in flight.
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            socket.send("ping")
            assert socket.recv(timeout=5) == "ping"
            assert gateway.state("ws") == "ready"
    assert wait_for(lambda: gateway.status("ws")["in_flight"] == 0, 5)
    # Closed: the idle clock runs again and stops the service.
    gateway.wait_state("ws", "stopped", timeout=10)


def test_a_refused_upgrade_reaches_the_client(hestia: Any, tmp_path: Path) -> None:
    config, _ = ws_service(tmp_path)
    gateway = hestia(config)
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{gateway.port}/services/ws/nothing", open_timeout=20)
    assert refused.value.response.status_code == 404
    assert wait_for(lambda: gateway.status("ws")["in_flight"] == 0, 5)


def test_an_unreachable_backend_is_a_502(hestia: Any, tmp_path: Path) -> None:
    gateway = hestia({"services": {"gone": {"url": f"http://127.0.0.1:{free_port()}"}}})
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{gateway.port}/services/gone/echo", open_timeout=10)
    assert refused.value.response.status_code == 502
    assert b"backend unreachable" in refused.value.response.body
