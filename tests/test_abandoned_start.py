"""
Issue 17: C{cancel_abandoned_start}: a load nobody waits for any more is stopped.

Rules with a Clock and a FakeBackend; then live, with a slow-loading backend
started by a real ``twistd -n hestia`` and a client that gives up.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import StartHestia
from support.hestiaproc import BackendSpec
from twisted.internet.task import Clock

from hestia.config import ConfigError
from hestia.errors import QueueTimedOut
from hestia.lifecycle import ServiceLifecycle, State
from hestia.loader import parse_config
from hestia.testing import FakeBackend


def make(**settings: Any) -> tuple[ServiceLifecycle, FakeBackend, Clock]:
    service = {"url": "http://127.0.0.1:9", "command": ["true"], "queue_timeout": 20, **settings}
    config = parse_config({"services": {"svc": service}}, "test.yml", environ={})
    clock = Clock()
    backend = FakeBackend(has_lifecycle=True)
    return ServiceLifecycle(config.services["svc"], backend, clock), backend, clock


@pytest.mark.unit
def test_the_start_stops_once_every_waiter_has_left() -> None:
    lifecycle, backend, _ = make(cancel_abandoned_start=True)
    first, second = lifecycle.acquire(), lifecycle.acquire()
    assert lifecycle.state is State.STARTING and len(backend.starts) == 1
    first.cancel()
    first.addErrback(lambda _: None)
    assert lifecycle.state is State.STARTING  # one still waits
    second.cancel()
    second.addErrback(lambda _: None)
    assert lifecycle.state is State.STOPPING and lifecycle.state_reason == "abandoned"
    assert len(backend.stops) == 1
    backend.stops[-1].callback(None)
    assert lifecycle.state is State.STOPPED
    backend.finish_start()  # the abandoned start's late news changes nothing
    assert lifecycle.state is State.STOPPED


@pytest.mark.unit
def test_a_timed_out_waiter_has_left_too() -> None:
    lifecycle, backend, clock = make(cancel_abandoned_start=True, queue_timeout=5, start_timeout=60)
    waiting = lifecycle.acquire()
    failures: list[Any] = []
    waiting.addErrback(failures.append)
    clock.advance(5)
    assert failures and failures[0].check(QueueTimedOut)
    assert lifecycle.state is State.STOPPING and backend.stops


@pytest.mark.unit
@pytest.mark.parametrize("settings", [{}, {"cancel_abandoned_start": False}])
def test_off_by_default_the_start_goes_on(settings: dict[str, Any]) -> None:
    lifecycle, backend, clock = make(**settings)
    waiting = lifecycle.acquire()
    waiting.cancel()
    waiting.addErrback(lambda _: None)
    assert lifecycle.state is State.STARTING and not backend.stops
    backend.finish_start()
    clock.advance(0)
    backend.answer_probe(True)
    assert lifecycle.state is State.READY


@pytest.mark.unit
def test_a_start_someone_asked_for_is_kept() -> None:
    lifecycle, backend, _ = make(cancel_abandoned_start=True)
    started = lifecycle.start("api")  # an API start: its caller waits as a watcher
    waiting = lifecycle.acquire()
    waiting.cancel()
    waiting.addErrback(lambda _: None)
    assert lifecycle.state is State.STARTING and not backend.stops
    assert not started.called
    # ...and a request's start an API caller joined is not abandoned either.
    other, other_backend, _ = make(cancel_abandoned_start=True)
    request = other.acquire()
    other.start("api")
    request.cancel()
    request.addErrback(lambda _: None)
    assert other.state is State.STARTING and not other_backend.stops


@pytest.mark.unit
def test_the_key_is_a_boolean() -> None:
    with pytest.raises(ConfigError, match=r"test.yml: services.svc.cancel_abandoned_start: expected true or false"):
        make(cancel_abandoned_start="maybe")


@pytest.mark.integration
def test_the_abandoned_start_is_cancelled(hestia: StartHestia, tmp_path: Path) -> None:
    slow, kept = BackendSpec("slow", tmp_path), BackendSpec("kept", tmp_path)
    gw = hestia({"services": {
        # Loading weights for 4 s, like a big model.
        "slow": {**slow.service("--start-delay", "4"), "cancel_abandoned_start": True},
        "kept": kept.service("--start-delay", "1.5"),
    }})
    for name in ("slow", "kept"):
        with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.5 s
            gw.http.get(f"/services/{name}/health", timeout=0.5)
    assert gw.wait_state("slow", "stopped", timeout=3)["state_reason"] == "abandoned"
    deadline = time.monotonic() + 5
    while slow.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not slow.running()  # the loading process was stopped, not left to finish
    assert slow.starts() == 1 and not slow.requests()
    # Without the option the start goes on and the service is ready for the next one.
    assert gw.wait_state("kept", "ready", timeout=10)["state_reason"] == "started"
    # Abandoned is not failed: the next request starts it again at once.
    answer = gw.http.get("/services/slow/health", timeout=30)
    assert answer.status_code == 200 and slow.starts() == 2
