"""
The lifecycle state machine, step by step, with a Clock and a FakeBackend.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from hestia.errors import GatewayError, QueueFull, QueueTimedOut, ServiceUnavailable, StartFailed, StartTimedOut
from hestia.lifecycle import Lease, ServiceLifecycle, State, StateChange, iso_time
from hestia.loader import parse_config
from hestia.testing import FakeBackend

pytestmark = pytest.mark.unit


def make(**overrides: Any) -> tuple[ServiceLifecycle, FakeBackend, Clock, list[StateChange]]:
    service = {
        "url": "http://127.0.0.1:9",
        "command": ["true"],
        "idle_timeout": 60,
        "start_timeout": 30,
        "queue_limit": 5,
        "queue_timeout": 20,
        "stop_timeout": 3,
        **overrides,
    }
    config = parse_config({"services": {"svc": service}}, "test.yml", environ={})
    clock = Clock()
    backend = FakeBackend(has_lifecycle=True)
    events: list[StateChange] = []
    lifecycle = ServiceLifecycle(config.services["svc"], backend, clock, [events.append])
    return lifecycle, backend, clock, events


# Keyed by id(), holding the Deferred itself so that its id cannot be reused
# by another one within the test.
_outcomes: dict[int, tuple[Deferred[Any], list[Any]]] = {}


@pytest.fixture(autouse=True)
def _forget_outcomes() -> None:
    _outcomes.clear()


def results(deferreds: list[Deferred[Any]]) -> list[Any]:
    """
    What each Deferred has fired with so far (None for 'not yet').

    The first look attaches a callback that keeps the outcome and swallows
    failures, which the test inspects instead.
    """
    seen: list[Any] = []
    for deferred in deferreds:
        if id(deferred) not in _outcomes:
            box: list[Any] = [None]
            _outcomes[id(deferred)] = (deferred, box)
            deferred.addBoth(lambda result, box=box: box.__setitem__(0, result))
        seen.append(_outcomes[id(deferred)][1][0])
    return seen


def become_ready(lifecycle: ServiceLifecycle, backend: FakeBackend, clock: Clock) -> None:
    backend.finish_start()
    clock.advance(0)
    backend.answer_probe(True)
    assert lifecycle.state is State.READY


def test_one_start_serves_every_waiter() -> None:
    lifecycle, backend, clock, events = make()
    waiting = [lifecycle.acquire() for _ in range(5)]
    assert lifecycle.state is State.STARTING
    assert len(backend.starts) == 1
    assert results(waiting) == [None] * 5
    become_ready(lifecycle, backend, clock)
    leases = results(waiting)
    assert all(isinstance(lease, Lease) for lease in leases)
    assert lifecycle.in_flight == 5
    assert len(backend.starts) == 1
    assert [(e.old, e.new) for e in events] == [
        (State.STOPPED, State.STARTING),
        (State.STARTING, State.READY),
    ]


def test_probe_gaps_grow_with_the_start_time_up_to_the_health_interval() -> None:
    lifecycle, backend, clock, _ = make(health={"tcp": True, "interval": 0.04})
    lifecycle.acquire()
    backend.finish_start()
    clock.advance(0)  # the first probe: at once
    gaps: dict[float, float] = {}  # start time so far -> gap before the next probe
    while clock.seconds() < 10:
        assert len(backend.probes) == len(gaps) + 1
        backend.answer_probe(False)
        probe = lifecycle._probe_call
        assert probe is not None
        gaps[round(clock.seconds(), 4)] = round(probe.getTime() - clock.seconds(), 4)
        clock.advance(probe.getTime() - clock.seconds())
    # The first probe at once; 5 ms gaps while the start is young (a fresh
    # backend is seen within 5 ms); then about 0.5% of the time waited so
    # far, capped at the interval.
    assert next(iter(gaps)) == 0.0
    assert {gap for at, gap in gaps.items() if at < 1.0} == {0.005}
    assert all(gap == pytest.approx(max(0.005, min(0.04, at / 200)), abs=1e-4) for at, gap in gaps.items())
    assert gaps[max(gaps)] == 0.04


def test_no_probing_when_nothing_starts() -> None:
    lifecycle, backend, clock, _ = make()
    clock.advance(1000)
    assert backend.probes == [] and not clock.getDelayedCalls()


def test_idle_stop_waits_for_in_flight_requests() -> None:
    lifecycle, backend, clock, events = make(idle_timeout=10)
    [waiting] = [lifecycle.acquire()]
    become_ready(lifecycle, backend, clock)
    [lease] = results([waiting])
    clock.advance(100)  # A long stream: far past idle_timeout.
    assert lifecycle.state is State.READY and backend.stops == []
    lease.release()
    clock.advance(9.9)
    assert backend.stops == []
    clock.advance(0.2)
    assert lifecycle.state is State.STOPPING and len(backend.stops) == 1
    backend.finish_stop()
    assert lifecycle.state is State.STOPPED
    assert events[-1].reason == "idle"


def test_a_new_request_resets_the_idle_clock() -> None:
    lifecycle, backend, clock, _ = make(idle_timeout=10)
    first = lifecycle.acquire()
    become_ready(lifecycle, backend, clock)
    results([first])[0].release()
    clock.advance(8)
    results([lifecycle.acquire()])[0].release()
    clock.advance(8)
    assert lifecycle.state is State.READY
    clock.advance(2.5)
    assert lifecycle.state is State.STOPPING


def test_release_is_idempotent() -> None:
    lifecycle, backend, clock, _ = make()
    waiting = lifecycle.acquire()
    become_ready(lifecycle, backend, clock)
    lease = results([waiting])[0]
    lease.release()
    lease.release()
    assert lifecycle.in_flight == 0


def test_failed_start_fails_every_waiter_with_the_output() -> None:
    lifecycle, backend, clock, _ = make()
    backend.output = ["loading model", "error: out of memory"]
    waiting = [lifecycle.acquire() for _ in range(3)]
    backend.starts[0].errback(StartFailed("exited during start: exit status 3"))
    errors = [r.value for r in results(waiting)]
    assert all(isinstance(e, StartFailed) and e.status == 502 for e in errors)
    assert errors[0].to_json() == {
        "error": "exited during start: exit status 3",
        "service": "svc",
        "state": "failed",
        "detail": ["loading model", "error: out of memory"],
    }
    assert lifecycle.state is State.FAILED
    assert lifecycle.status()["last_error"] == "exited during start: exit status 3"
    assert len(backend.stops) == 1  # What was half started is cleaned up.


def test_exit_during_start_fails_the_start() -> None:
    lifecycle, backend, clock, _ = make()
    waiting = lifecycle.acquire()
    backend.finish_start()
    clock.advance(0)
    backend.exit("exit status 7")
    [failure] = results([waiting])
    assert isinstance(failure.value, StartFailed)
    assert "exit status 7" in failure.value.reason
    # A probe answered late is ignored.
    backend.answer_probe(True)
    assert lifecycle.state is State.FAILED


def test_start_timeout_is_a_504_and_stops_the_backend() -> None:
    lifecycle, backend, clock, _ = make(start_timeout=5, queue_timeout=100)
    waiting = lifecycle.acquire()
    backend.finish_start()
    for _ in range(200):
        clock.advance(0.04)
        if backend.probes and not backend.probes[-1].called:
            backend.answer_probe(False)
    [failure] = results([waiting])
    assert isinstance(failure.value, StartTimedOut) and failure.value.status == 504
    assert lifecycle.state is State.FAILED
    assert len(backend.stops) == 1


def test_queue_full_is_refused_at_once() -> None:
    lifecycle, backend, clock, _ = make(queue_limit=2)
    lifecycle.acquire()
    lifecycle.acquire()
    [failure] = results([lifecycle.acquire()])
    assert isinstance(failure.value, QueueFull)
    assert failure.value.status == 503 and failure.value.retry_after is not None
    assert len(lifecycle.queue) == 2


def test_queue_timeout_is_a_504() -> None:
    lifecycle, backend, clock, _ = make(queue_timeout=3, start_timeout=100)
    waiting = lifecycle.acquire()
    clock.advance(3)
    [failure] = results([waiting])
    assert isinstance(failure.value, QueueTimedOut) and failure.value.status == 504
    assert len(lifecycle.queue) == 0
    assert lifecycle.state is State.STARTING  # The start itself goes on.


def test_a_client_leaving_frees_its_place_at_once() -> None:
    lifecycle, backend, clock, _ = make()
    waiting = lifecycle.acquire()
    waiting.addErrback(lambda failure: None)
    assert len(lifecycle.queue) == 1
    waiting.cancel()
    assert len(lifecycle.queue) == 0


def test_crash_loop_cools_down_instead_of_restarting() -> None:
    lifecycle, backend, clock, _ = make()
    for attempt in range(3):
        waiting = lifecycle.acquire()
        backend.starts[-1].errback(StartFailed("exit status 1"))
        results([waiting])
        backend.finish_stop()
        clock.advance(1)
    [refused] = results([lifecycle.acquire()])
    assert isinstance(refused.value, StartFailed)
    assert "not retrying" in refused.value.reason
    assert refused.value.retry_after == pytest.approx(29)  # Cooldown from the 3rd failure at t=2.
    assert len(backend.starts) == 3
    clock.advance(30)
    lifecycle.acquire()
    assert len(backend.starts) == 4


def test_request_during_stop_starts_again_after_it() -> None:
    lifecycle, backend, clock, events = make(idle_timeout=1)
    first = lifecycle.acquire()
    become_ready(lifecycle, backend, clock)
    results([first])[0].release()
    clock.advance(1)
    assert lifecycle.state is State.STOPPING
    waiting = lifecycle.acquire()
    assert len(backend.starts) == 1  # Not while the stop runs.
    backend.finish_stop()
    assert lifecycle.state is State.STARTING and len(backend.starts) == 2
    become_ready(lifecycle, backend, clock)
    assert isinstance(results([waiting])[0], Lease)


def test_exit_while_ready_fails_and_the_next_request_restarts() -> None:
    lifecycle, backend, clock, _ = make()
    results([lifecycle.acquire()])
    become_ready(lifecycle, backend, clock)
    backend.output = ["panic: boom"]
    backend.exit("exit status 2")
    assert lifecycle.state is State.FAILED
    assert lifecycle.status()["last_error_detail"] == ["panic: boom"]
    lifecycle.acquire()
    assert lifecycle.state is State.STARTING and len(backend.starts) == 2


def test_keep_warm_is_never_idle_stopped_and_restarts_after_a_crash() -> None:
    lifecycle, backend, clock, _ = make(keep_warm=True, idle_timeout=1)
    lifecycle.start("keep_warm").addErrback(lambda failure: None)
    become_ready(lifecycle, backend, clock)
    clock.advance(1000)
    assert lifecycle.state is State.READY and backend.stops == []
    backend.exit("exit status 1")
    assert lifecycle.state is State.FAILED
    clock.advance(ServiceLifecycle.KEEP_WARM_RETRY)
    assert lifecycle.state is State.STARTING


def test_stop_during_start_answers_waiters_503() -> None:
    lifecycle, backend, clock, _ = make()
    waiting = lifecycle.acquire()
    stopping = lifecycle.stop("api")
    [failure] = results([waiting])
    assert isinstance(failure.value, ServiceUnavailable)
    assert lifecycle.state is State.STOPPING
    backend.finish_stop()
    assert lifecycle.state is State.STOPPED and results([stopping]) == [None]


def test_api_start_waits_for_ready() -> None:
    lifecycle, backend, clock, _ = make()
    started = lifecycle.start()
    assert results([started]) == [None] and not started.called
    become_ready(lifecycle, backend, clock)
    assert started.called


def test_api_start_reports_failure() -> None:
    lifecycle, backend, clock, _ = make()
    started = lifecycle.start()
    backend.starts[0].errback(StartFailed("nope"))
    [failure] = results([started])
    assert isinstance(failure, Failure) and isinstance(failure.value, GatewayError)


def test_shutdown_fails_waiters_and_stops() -> None:
    lifecycle, backend, clock, _ = make()
    waiting = lifecycle.acquire()
    lifecycle.shutdown()
    assert isinstance(results([waiting])[0].value, ServiceUnavailable)
    assert len(backend.stops) == 1
    assert isinstance(results([lifecycle.acquire()])[0].value, ServiceUnavailable)


def test_static_backend_is_always_ready() -> None:
    config = parse_config({"services": {"up": {"url": "http://127.0.0.1:9"}}}, "t.yml", environ={})
    clock = Clock()
    backend = FakeBackend(has_lifecycle=False)
    lifecycle = ServiceLifecycle(config.services["up"], backend, clock)
    assert lifecycle.state is State.READY
    results([lifecycle.acquire()])[0].release()
    clock.advance(10_000)
    assert lifecycle.state is State.READY and backend.stops == [] and backend.starts == []


def test_status_has_the_documented_fields() -> None:
    lifecycle, backend, clock, _ = make()
    status = lifecycle.status()
    for field in ("name", "state", "backend", "url", "in_flight", "queued", "keep_warm", "idle_timeout",
                  "state_since", "last_request_at", "last_error"):
        assert field in status
    assert status["state"] == "stopped" and status["backend"] == "fake"


def test_busy_services_do_not_churn_idle_timers() -> None:
    lifecycle, backend, clock, _ = make(idle_timeout=10)
    first = lifecycle.acquire()
    become_ready(lifecycle, backend, clock)
    results([first])[0].release()
    armed = list(clock.getDelayedCalls())  # A copy: Clock returns its own list.
    for _ in range(100):
        clock.advance(0.05)
        results([lifecycle.acquire()])[0].release()
    # The one timer set when the service went idle is still the only one.
    assert len(armed) == 1 and clock.getDelayedCalls() == armed and clock.getDelayedCalls()[0] is armed[0]
    last = clock.seconds()
    assert lifecycle.status()["idle_stop_at"] == iso_time(last + 10)
    clock.advance(10 - 0.01)
    assert lifecycle.state is State.READY
    clock.advance(0.02)
    assert lifecycle.state is State.STOPPING
