"""
Issue 17, GPU sharing by declared memory, against a real ``twistd -n hestia``
and real backends it starts: two 16 GiB services on a 24 GiB device are never
up at once while alternating requests all answer; a 16 and a 6 GiB service run
side by side; a service with a stream in flight is not evicted.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import StartHestia
from support.hestiaproc import BackendSpec

pytestmark = pytest.mark.integration


def on_gpu(spec: BackendSpec, vram: str, *args: str) -> dict[str, Any]:
    return {**spec.service("--start-delay", "0.1", *args), "gpu": {"device": "gpu0", "vram": vram}}


def test_two_16_gib_services_on_a_24_gib_device_take_turns(hestia: StartHestia, tmp_path: Path) -> None:
    a, b = BackendSpec("a", tmp_path), BackendSpec("b", tmp_path)
    gw = hestia({
        "gpus": {"gpu0": {"vram": "24GiB", "min_residency": 0.3}},
        "services": {"a": on_gpu(a, "16GiB"), "b": on_gpu(b, "16GiB")},
    })
    both_up: list[dict[str, Any]] = []
    done = threading.Event()

    def watch() -> None:
        # Never both processes alive (a sample is three looks, so that a
        # process seen before and after the other one overlapped with it).
        while not done.is_set():
            first, second, third = a.running(), b.running(), a.running()
            if first and second and third:
                both_up.append({"a": first, "b": second})
            first, second, third = b.running(), a.running(), b.running()
            if first and second and third:
                both_up.append({"b": first, "a": second})
            done.wait(0.01)

    def one(index: int) -> tuple[str, int, str]:
        name = "ab"[index % 2]
        with httpx.Client(base_url=gw.url, trust_env=False, timeout=60) as http:
            response = http.get(f"/services/{name}/health", params={"i": index})
            return name, response.status_code, response.text

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(one, range(24)))
    finally:
        done.set()
        watcher.join()
    assert [status for _, status, _ in answers] == [200] * 24, answers
    assert all(json.loads(text)["name"] == name for name, _, text in answers)
    assert not both_up, both_up[:3]
    device = gw.status("a")["gpu"]["device_status"]
    assert device["used"] <= 24 * 1024**3 and device["swaps"] >= 1
    assert a.starts() + b.starts() >= 2
    assert gw.status("a")["gpu"]["measured"] is None  # no nvidia-smi on this machine


def test_a_16_and_a_6_gib_service_run_side_by_side(hestia: StartHestia, tmp_path: Path) -> None:
    big, small = BackendSpec("big", tmp_path), BackendSpec("small", tmp_path)
    gw = hestia({
        "gpus": {"gpu0": {"vram": "24GiB"}},
        "services": {"big": on_gpu(big, "16GiB"), "small": on_gpu(small, "6GiB")},
    })
    for _ in range(3):
        for name in ("big", "small"):
            answer = gw.http.get(f"/services/{name}/health")
            assert answer.status_code == 200 and answer.json()["name"] == name
    assert big.running() and small.running()
    assert (big.starts(), small.starts()) == (1, 1)
    assert gw.status("big")["gpu"]["device_status"]["residents"] == {"big": 16 * 1024**3, "small": 6 * 1024**3}


def test_a_service_with_a_stream_in_flight_is_not_evicted(hestia: StartHestia, tmp_path: Path) -> None:
    streamer, other = BackendSpec("streamer", tmp_path), BackendSpec("other", tmp_path)
    gw = hestia({
        "gpus": {"gpu0": {"vram": "24GiB"}},
        "services": {"streamer": on_gpu(streamer, "16GiB"), "other": on_gpu(other, "16GiB")},
    })
    ticks: list[dict[str, Any]] = []
    stream_ended = threading.Event()
    stream_started = threading.Event()

    def stream() -> None:
        with httpx.Client(base_url=gw.url, trust_env=False, timeout=60) as http, http.stream(
            "GET", "/services/streamer/stream", params={"n": 12, "interval": 0.25}
        ) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line:
                    ticks.append(json.loads(line))
                    stream_started.set()
        stream_ended.set()

    streaming = threading.Thread(target=stream)
    streaming.start()
    assert stream_started.wait(20)
    answer = httpx.get(f"{gw.url}/services/other/health", timeout=60, trust_env=False)
    answered_at = time.time()
    streaming.join(30)
    assert answer.status_code == 200 and answer.json()["name"] == "other"
    assert [tick["i"] for tick in ticks] == list(range(12))  # the whole stream, uncut
    assert answered_at >= ticks[-1]["t"]  # other started only after the stream's last tick
    status = gw.status("streamer")
    assert status["state"] == "stopped" and status["state_reason"] == "gpu"
    assert (streamer.starts(), other.starts()) == (1, 1)
