"""
Lifecycle rules that mutation testing (issue 21) found unpinned: resume(), the start gate, the
crash-loop window, a failed stop, keep_warm's retry after a failed start, a backend raising a
plain exception, stop()'s Deferred, state_since/state_reason and the Retry-After floor.

Everything goes through the public entry points (acquire, start, stop, shutdown, resume, status,
the observers) with a Clock and a FakeBackend: no processes, no sleeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from hestia.errors import QueueFull, StartFailed
from hestia.lifecycle import Lease, ServiceLifecycle, State, StateChange, iso_time
from hestia.loader import parse_config
from hestia.testing import FakeBackend

pytestmark = pytest.mark.unit


def make(
    *, has_lifecycle: bool = True, start_at: float = 1000.0, **overrides: Any
) -> tuple[ServiceLifecycle, FakeBackend, Clock, list[StateChange]]:
    service = {
        "url": "http://127.0.0.1:9",
        "command": ["true"],
        "idle_timeout": 60,
        "start_timeout": 0,
        "queue_limit": 5,
        "queue_timeout": 0,
        "stop_timeout": 3,
        **overrides,
    }
    config = parse_config({"services": {"svc": service}}, "test.yml", environ={})
    clock = Clock()
    clock.advance(start_at)
    backend = FakeBackend(has_lifecycle=has_lifecycle)
    events: list[StateChange] = []
    lifecycle = ServiceLifecycle(config.services["svc"], backend, clock, [events.append])
    return lifecycle, backend, clock, events


def outcome(deferred: Deferred[Any]) -> list[Any]:
    """A box that gets what the Deferred fires with (failures included, then swallowed)."""
    box: list[Any] = []
    deferred.addBoth(box.append)
    return box


def become_ready(lifecycle: ServiceLifecycle, backend: FakeBackend, clock: Clock) -> None:
    backend.finish_start()
    clock.advance(0)
    backend.answer_probe(True)
    assert lifecycle.state is State.READY


def fail_one_start(lifecycle: ServiceLifecycle, backend: FakeBackend) -> Any:
    waiting = outcome(lifecycle.acquire())
    backend.starts[-1].errback(StartFailed("exit status 1"))
    backend.finish_stop()  # the clean-up of the half-started service
    return waiting[0].value


# -- resume() -------------------------------------------------------------------


def test_resume_ready_keeps_the_idle_clock_of_the_last_request() -> None:
    lifecycle, backend, clock, events = make(idle_timeout=60)
    lifecycle.resume(State.READY, "resumed", last_request_at=clock.seconds() - 50)
    assert lifecycle.state is State.READY and lifecycle.state_reason == "resumed"
    assert backend.starts == []
    assert [(e.old, e.new, e.reason) for e in events] == [(State.STOPPED, State.READY, "resumed")]
    assert lifecycle.status()["idle_stop_at"] == iso_time(clock.seconds() + 10)
    clock.advance(9.9)
    assert lifecycle.state is State.READY
    clock.advance(0.1)
    assert lifecycle.state is State.STOPPING and lifecycle.state_reason == "idle"
    assert len(backend.stops) == 1


def test_resume_ready_long_idle_stops_at_once_and_unknown_last_request_waits_a_full_timeout() -> None:
    overdue, backend, clock, _ = make(idle_timeout=60)
    overdue.resume(State.READY, "resumed", last_request_at=clock.seconds() - 500)
    clock.advance(0)
    assert overdue.state is State.STOPPING

    fresh, backend, clock, _ = make(idle_timeout=60)
    fresh.resume(State.READY, "resumed", last_request_at=None)
    clock.advance(59)
    assert fresh.state is State.READY
    clock.advance(1)
    assert fresh.state is State.STOPPING


def test_resume_starting_starts_and_stopping_stops() -> None:
    starting, backend, clock, _ = make()
    starting.resume(State.STARTING, "resumed")
    assert starting.state is State.STARTING and len(backend.starts) == 1
    become_ready(starting, backend, clock)

    stopping, backend, clock, _ = make()
    stopping.resume(State.STOPPING, "resumed")
    assert stopping.state is State.STOPPING and len(backend.stops) == 1
    backend.finish_stop()
    assert stopping.state is State.STOPPED


def test_resume_refuses_states_it_cannot_take_up() -> None:
    lifecycle, backend, clock, _ = make()
    with pytest.raises(ValueError, match="cannot resume into failed"):
        lifecycle.resume(State.FAILED, "resumed")
    with pytest.raises(ValueError, match="cannot resume into stopped"):
        lifecycle.resume(State.STOPPED, "resumed")


def test_only_a_fresh_stopped_lifecycle_resumes() -> None:
    # Already starting: the recorded state of a previous gateway is ignored.
    lifecycle, backend, clock, events = make()
    lifecycle.acquire()
    lifecycle.resume(State.READY, "resumed", last_request_at=clock.seconds())
    assert lifecycle.state is State.STARTING and len(events) == 1

    # Shutting down: nothing is resumed.
    lifecycle, backend, clock, events = make()
    lifecycle.shutdown()
    lifecycle.resume(State.STARTING, "resumed")
    assert lifecycle.state is State.STOPPED and backend.starts == []

    # A backend without a lifecycle (static) is always ready, resume or not.
    lifecycle, backend, clock, events = make(has_lifecycle=False)
    lifecycle.resume(State.STOPPING, "resumed")
    assert lifecycle.state is State.READY and backend.stops == [] and events == []


# -- the start gate (depends_on, exclusive groups) ---------------------------------


def test_start_gate_is_passed_before_the_launch() -> None:
    lifecycle, backend, clock, _ = make()
    gate: Deferred[None] = Deferred()
    asked: list[ServiceLifecycle] = []

    def start_gate(which: ServiceLifecycle) -> Deferred[None]:
        asked.append(which)
        return gate

    lifecycle.start_gate = start_gate
    waiting = outcome(lifecycle.acquire())
    assert asked == [lifecycle] and backend.starts == []
    gate.callback(None)
    assert len(backend.starts) == 1
    become_ready(lifecycle, backend, clock)
    assert isinstance(waiting[0], Lease)


def test_a_failing_start_gate_fails_the_start() -> None:
    lifecycle, backend, clock, _ = make()
    gate: Deferred[None] = Deferred()
    lifecycle.start_gate = lambda _: gate
    waiting = outcome(lifecycle.acquire())
    gate.errback(StartFailed("dependency db failed to start"))
    assert backend.starts == []
    assert isinstance(waiting[0].value, StartFailed)
    assert waiting[0].value.reason == "dependency db failed to start"
    assert lifecycle.state is State.FAILED


def test_stopping_during_the_gate_cancels_the_wait_and_never_launches() -> None:
    lifecycle, backend, clock, _ = make()
    gate: Deferred[None] = Deferred()
    lifecycle.start_gate = lambda _: gate
    outcome(lifecycle.acquire())
    lifecycle.stop("api")
    assert gate.called  # cancelled
    backend.finish_stop()
    assert backend.starts == [] and lifecycle.state is State.STOPPED


# -- the crash-loop window -------------------------------------------------------


def test_three_failures_spread_over_more_than_the_window_are_no_crash_loop() -> None:
    lifecycle, backend, clock, _ = make()
    for _ in range(3):
        fail_one_start(lifecycle, backend)
        clock.advance(31)  # the third failure is 62 s after the first
    assert lifecycle.status()["cooldown_until"] is None
    outcome(lifecycle.acquire())
    assert len(backend.starts) == 4 and lifecycle.state is State.STARTING


def test_three_failures_within_the_window_cool_down_for_the_cooldown() -> None:
    lifecycle, backend, clock, _ = make()
    first = clock.seconds()
    for attempt in range(3):
        fail_one_start(lifecycle, backend)
        if attempt < 2:
            clock.advance(30)  # the third failure is exactly 60 s after the first
    third = first + 60
    assert lifecycle.status()["cooldown_until"] == iso_time(third + ServiceLifecycle.COOLDOWN)
    refused = outcome(lifecycle.acquire())[0].value
    assert isinstance(refused, StartFailed)
    assert "failed 3 times in 60s" in refused.reason
    assert refused.retry_after == pytest.approx(third + ServiceLifecycle.COOLDOWN - clock.seconds())
    assert len(backend.starts) == 3


def test_cooldown_refusal_says_how_long_and_keeps_the_last_error() -> None:
    lifecycle, backend, clock, _ = make()
    for _ in range(3):
        fail_one_start(lifecycle, backend)
        clock.advance(1)
    refused = outcome(lifecycle.acquire())[0].value
    assert refused.reason == "exit status 1 (failed 3 times in 60s; not retrying for 29s)"
    assert refused.retry_after == pytest.approx(29)  # cooldown from the third failure, 1 s ago
    assert refused.status == 502


# -- failed starts -----------------------------------------------------------------


def test_a_backend_raising_a_plain_exception_is_a_start_failure() -> None:
    lifecycle, backend, clock, events = make()

    def broken_start() -> Deferred[None]:
        raise OSError("no such file: ./serve")

    backend.start = broken_start  # type: ignore[method-assign]
    waiting = outcome(lifecycle.acquire())
    error = waiting[0].value
    assert isinstance(error, StartFailed) and error.status == 502
    assert error.reason == "start failed: no such file: ./serve"
    assert error.service == "svc" and error.state == "failed"
    assert lifecycle.state is State.FAILED and lifecycle.last_error == "start failed: no such file: ./serve"
    assert events[-1].error == "start failed: no such file: ./serve"


def test_keep_warm_retries_after_a_failed_start() -> None:
    lifecycle, backend, clock, _ = make(keep_warm=True)
    started = outcome(lifecycle.start("keep_warm"))
    backend.starts[-1].errback(StartFailed("exit status 1"))
    backend.finish_stop()
    assert isinstance(started[0].value, StartFailed)
    clock.advance(ServiceLifecycle.KEEP_WARM_RETRY - 0.1)
    assert lifecycle.state is State.FAILED and len(backend.starts) == 1
    clock.advance(0.1)
    assert lifecycle.state is State.STARTING and lifecycle.state_reason == "keep_warm"
    assert len(backend.starts) == 2


def test_keep_warm_retry_waits_out_a_cooldown() -> None:
    lifecycle, backend, clock, _ = make(keep_warm=True)
    for _ in range(3):
        outcome(lifecycle.start("keep_warm"))
        backend.starts[-1].errback(StartFailed("exit status 1"))
        backend.finish_stop()
        clock.advance(1)  # less than KEEP_WARM_RETRY: start() restarts before the retry does
    # The third failure (at +2 s) began a cooldown of 30 s: no retry before it ends.
    starts = len(backend.starts)
    clock.advance(28.9)
    assert len(backend.starts) == starts
    clock.advance(0.2)
    assert len(backend.starts) == starts + 1


def test_no_keep_warm_retry_without_keep_warm_or_after_shutdown() -> None:
    lifecycle, backend, clock, _ = make()
    fail_one_start(lifecycle, backend)
    clock.advance(100)
    assert len(backend.starts) == 1 and lifecycle.state is State.FAILED

    lifecycle, backend, clock, _ = make(keep_warm=True)
    outcome(lifecycle.start("keep_warm"))
    backend.starts[-1].errback(StartFailed("exit status 1"))
    backend.finish_stop()
    lifecycle.shutdown()
    clock.advance(100)
    assert len(backend.starts) == 1


# -- stopping ----------------------------------------------------------------------


def test_stop_fires_once_the_backend_has_stopped() -> None:
    lifecycle, backend, clock, events = make()
    outcome(lifecycle.acquire())
    become_ready(lifecycle, backend, clock)
    clock.advance(2)
    stopped = outcome(lifecycle.stop("api"))
    again = outcome(lifecycle.stop("api"))  # a second stop waits for the same one
    assert stopped == [] and again == [] and lifecycle.state is State.STOPPING
    assert backend.stop_timeouts == [3]
    clock.advance(1.5)
    backend.finish_stop()
    assert stopped == [None] and again == [None]
    assert lifecycle.state is State.STOPPED and lifecycle.state_reason == "api"
    assert events[-1] == StateChange("svc", State.STOPPING, State.STOPPED, "api", clock.seconds(), 1.5)
    assert outcome(lifecycle.stop("api")) == [None]  # stopped: at once
    assert len(backend.stops) == 1


def test_a_failed_stop_leaves_the_service_failed_with_the_reason() -> None:
    lifecycle, backend, clock, events = make()
    outcome(lifecycle.acquire())
    become_ready(lifecycle, backend, clock)
    stopped = outcome(lifecycle.stop("api"))
    clock.advance(3)
    backend.stops[-1].errback(RuntimeError("kill refused"))
    assert stopped == [None]  # the caller is answered either way
    assert lifecycle.state is State.FAILED and lifecycle.state_reason == "stop failed"
    assert lifecycle.last_error == "stop failed: kill refused"
    assert events[-1].error == "stop failed: kill refused" and events[-1].duration == 3
    # The next request starts it again.
    outcome(lifecycle.acquire())
    assert lifecycle.state is State.STARTING and len(backend.starts) == 2


def test_stop_of_a_static_backend_does_nothing() -> None:
    lifecycle, backend, clock, events = make(has_lifecycle=False)
    assert outcome(lifecycle.stop("api")) == [None]
    assert backend.stops == [] and lifecycle.state is State.READY


def test_stop_of_a_failed_service_waits_for_the_clean_up() -> None:
    lifecycle, backend, clock, _ = make()
    waiting = outcome(lifecycle.acquire())
    backend.starts[-1].errback(StartFailed("exit status 1"))
    assert isinstance(waiting[0].value, StartFailed)
    stopped = outcome(lifecycle.stop("api"))
    assert stopped == []
    backend.finish_stop()
    assert stopped == [None] and lifecycle.state is State.FAILED


# -- state_since / state_reason, Retry-After ---------------------------------------------


def test_state_since_and_reason_follow_each_transition() -> None:
    lifecycle, backend, clock, _ = make()
    assert lifecycle.status()["state_since"] == iso_time(1000.0)
    assert lifecycle.status()["state_reason"] == "configured"
    clock.advance(5)
    outcome(lifecycle.acquire())
    assert lifecycle.status()["state_since"] == iso_time(1005.0)
    assert lifecycle.status()["state_reason"] == "request"
    clock.advance(2)
    become_ready(lifecycle, backend, clock)
    status = lifecycle.status()
    assert status["state_since"] == iso_time(1007.0) and status["state_reason"] == "started"
    assert status["last_start_duration"] == 2


def test_retry_after_is_one_start_with_a_floor_of_one_second() -> None:
    def refused_after_a_start_of(seconds: float | None) -> float | None:
        lifecycle, backend, clock, _ = make(queue_limit=1, idle_timeout=1)
        if seconds is not None:
            first = outcome(lifecycle.acquire())
            clock.advance(seconds)
            become_ready(lifecycle, backend, clock)
            first[0].release()
            clock.advance(1)
            backend.finish_stop()
            assert lifecycle.state is State.STOPPED
        outcome(lifecycle.acquire())
        error = outcome(lifecycle.acquire())[0].value
        assert isinstance(error, QueueFull)
        return error.retry_after

    assert refused_after_a_start_of(None) == 5.0  # never started: a guess
    assert refused_after_a_start_of(0.2) == 1.0  # a fast start: at least a second
    assert refused_after_a_start_of(7.5) == 7.5


def test_observers_see_every_change_and_a_failing_observer_harms_no_one() -> None:
    lifecycle, backend, clock, events = make()

    def broken(event: StateChange) -> None:
        raise RuntimeError("observer bug")

    lifecycle.add_observer(broken)
    seen: list[StateChange] = []
    lifecycle.add_observer(seen.append)
    outcome(lifecycle.acquire())
    become_ready(lifecycle, backend, clock)
    assert [e.new for e in seen] == [State.STARTING, State.READY]
    assert seen == events


def test_shutdown_of_a_machine_that_outlives_the_gateway_detaches() -> None:
    lifecycle, backend, clock, events = make()
    detached: list[bool] = []
    backend.survives_gateway = True  # type: ignore[attr-defined]
    backend.detach = lambda: detached.append(True)  # type: ignore[attr-defined]
    outcome(lifecycle.acquire())
    become_ready(lifecycle, backend, clock)
    changes = len(events)
    assert outcome(lifecycle.shutdown()) == [None]
    assert detached == [True] and backend.stops == [] and len(events) == changes


def test_api_start_of_a_ready_service_and_after_shutdown() -> None:
    lifecycle, backend, clock, _ = make()
    outcome(lifecycle.acquire())
    become_ready(lifecycle, backend, clock)
    assert outcome(lifecycle.start()) == [None]
    assert len(backend.starts) == 1

    lifecycle, backend, clock, _ = make()
    lifecycle.shutdown()
    refused = outcome(lifecycle.start())[0]
    assert isinstance(refused, Failure) and refused.value.status == 503
    assert outcome(lifecycle.acquire())[0].value.status == 503
    assert backend.starts == []


# -- found by the second mutation run -------------------------------------------------------


def test_a_start_abandoned_while_waiting_for_the_clean_up_never_launches() -> None:
    lifecycle, backend, clock, _ = make()
    fail_cleanup_pending = outcome(lifecycle.acquire())
    backend.starts[-1].errback(StartFailed("exit status 1"))  # clean-up: backend.stops[0], pending
    assert isinstance(fail_cleanup_pending[0].value, StartFailed)
    outcome(lifecycle.acquire())  # a new start waits for the clean-up
    assert lifecycle.state is State.STARTING and len(backend.starts) == 1
    outcome(lifecycle.stop("api"))  # abandoned before its launch
    backend.stops[1].callback(None)
    assert lifecycle.state is State.STOPPED
    outcome(lifecycle.acquire())  # and a third start, also behind the clean-up
    backend.stops[0].callback(None)  # the clean-up ends: only the live start launches
    assert len(backend.starts) == 2


def test_reasons_and_durations_of_transitions() -> None:
    lifecycle, backend, clock, events = make()
    lifecycle.start()
    assert lifecycle.state_reason == "api"
    backend.finish_start()
    clock.advance(0.5)
    backend.answer_probe(True)
    assert events[-1].new is State.READY and events[-1].duration == 0.5
    backend.exit("exit status 9")
    assert lifecycle.state_reason == "exited" and events[-1].reason == "exited"
    assert events[-1].error == "exited while serving: exit status 9"


def test_a_failing_clean_up_is_logged_and_does_not_block_the_next_start() -> None:
    from twisted.logger import globalLogPublisher

    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        lifecycle, backend, clock, _ = make()
        outcome(lifecycle.acquire())
        backend.starts[-1].errback(StartFailed("exit status 1"))
        backend.stops[-1].errback(RuntimeError("cannot kill"))
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert any(event.get("log_format") == "cleaning up {service} after a failed start"
               and event["log_failure"].check(RuntimeError) for event in logged)
    outcome(lifecycle.acquire())
    assert len(backend.starts) == 2


# -- after the merge of issue 17 (abandoned starts) and the held-out sample ------------------


def test_waiters_refused_by_a_stop_or_a_shutdown_are_told_which_service() -> None:
    lifecycle, backend, clock, _ = make()
    waiting = outcome(lifecycle.acquire())
    outcome(lifecycle.stop("api"))
    error = waiting[0].value
    assert error.status == 503 and error.service == "svc" and error.state == "starting"
    assert error.reason == "service stopped while starting (api)"

    lifecycle, backend, clock, _ = make()
    waiting = outcome(lifecycle.acquire())
    lifecycle.shutdown()
    error = waiting[0].value
    assert error.status == 503 and error.service == "svc" and error.reason == "the gateway is shutting down"


def test_resume_stopping_keeps_the_recorded_reason() -> None:
    lifecycle, backend, clock, events = make()
    lifecycle.resume(State.STOPPING, "resumed")
    assert lifecycle.state_reason == "resumed" and events[-1].reason == "resumed"


def test_a_start_every_waiter_left_is_stopped_when_configured() -> None:
    lifecycle, backend, clock, events = make(cancel_abandoned_start=True)
    waiting = lifecycle.acquire()
    waiting.addErrback(lambda _: None)
    waiting.cancel()
    assert lifecycle.state is State.STOPPING and lifecycle.state_reason == "abandoned"
    backend.finish_stop()
    assert lifecycle.state is State.STOPPED


@pytest.mark.parametrize("how", ["api", "keep_warm", "not configured", "one still waits"])
def test_a_start_someone_still_wants_is_not_abandoned(how: str) -> None:
    lifecycle, backend, clock, _ = make(cancel_abandoned_start=how != "not configured", keep_warm=how == "keep_warm")
    if how in ("api", "keep_warm"):
        outcome(lifecycle.start(how))
    staying = outcome(lifecycle.acquire()) if how == "one still waits" else []
    leaving = lifecycle.acquire()
    leaving.addErrback(lambda _: None)
    leaving.cancel()
    assert lifecycle.state is State.STARTING and backend.stops == []
    become_ready(lifecycle, backend, clock)
    if how == "one still waits":
        assert isinstance(staying[0], Lease)


def test_a_start_that_fails_by_timing_out_says_after_how_long() -> None:
    lifecycle, backend, clock, _ = make(start_timeout=5)
    waiting = outcome(lifecycle.acquire())
    clock.advance(5)
    error = waiting[0].value
    assert error.status == 504 and error.reason == "not ready after start_timeout 5s"


def test_an_exit_during_start_carries_the_last_20_lines() -> None:
    lifecycle, backend, clock, _ = make()
    waiting = outcome(lifecycle.acquire())
    backend.finish_start()
    backend.output = [f"line {number}" for number in range(30)]
    backend.exit("exit status 3")
    assert waiting[0].value.detail == [f"line {number}" for number in range(10, 30)]


def test_exits_while_serving_count_towards_the_crash_loop() -> None:
    lifecycle, backend, clock, _ = make()
    for _ in range(3):
        outcome(lifecycle.acquire())
        become_ready(lifecycle, backend, clock)
        backend.exit("exit status 1")
        clock.advance(1)
    assert lifecycle.status()["cooldown_until"] is not None
    refused = outcome(lifecycle.acquire())[0].value
    assert "failed 3 times in 60s" in refused.reason


def test_the_crash_loop_window_runs_from_the_first_of_the_three_failures() -> None:
    lifecycle, backend, clock, _ = make()
    fail_one_start(lifecycle, backend)  # t
    clock.advance(50)
    fail_one_start(lifecycle, backend)  # t + 50
    clock.advance(11)
    fail_one_start(lifecycle, backend)  # t + 61: 61 s after the first, 11 s after the second
    assert lifecycle.status()["cooldown_until"] is None


def test_a_probe_error_fails_the_start() -> None:
    lifecycle, backend, clock, _ = make()
    waiting = outcome(lifecycle.acquire())
    backend.finish_start()
    clock.advance(0.01)
    backend.probes[-1].errback(StartFailed("probe broke"))
    assert waiting[0].value.reason == "probe broke" and lifecycle.state is State.FAILED


# -- second round (issue 21): observers, gates, reload's new backend, retire, what is logged ----------


def logged(events: Sequence[dict[str, Any]]) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(event) for event in events]


def test_idle_observers_are_told_which_service_went_idle() -> None:
    lifecycle, backend, clock, _ = make()
    seen: list[Any] = []
    lifecycle.idle_observers.append(seen.append)
    waiting = outcome(lifecycle.acquire())
    become_ready(lifecycle, backend, clock)
    waiting[0].release()
    assert seen == [lifecycle]


def test_a_memory_gate_is_passed_after_the_start_gate_then_the_service_launches() -> None:
    lifecycle, backend, clock, _ = make()
    order: list[str] = []
    start_gate: Deferred[None] = Deferred()
    memory_gate: Deferred[None] = Deferred()

    def through_start(route: Any) -> Deferred[None]:
        order.append("start")
        return start_gate

    def through_memory(route: Any) -> Deferred[None]:
        assert route is lifecycle
        order.append("memory")
        return memory_gate

    lifecycle.start_gate = through_start
    lifecycle.memory_gate = through_memory
    waiting = outcome(lifecycle.acquire())
    assert order == ["start"] and backend.starts == []
    start_gate.callback(None)
    assert order == ["start", "memory"] and backend.starts == []
    memory_gate.callback(None)
    assert len(backend.starts) == 1
    become_ready(lifecycle, backend, clock)
    assert len(waiting) == 1 and not isinstance(waiting[0], Failure)


def test_an_observer_that_raises_is_logged_with_the_service_and_the_others_still_hear() -> None:
    from twisted.logger import capturedLogs

    def broken(change: StateChange) -> None:
        raise RuntimeError("observer bug")

    config = parse_config({"services": {"svc": {"url": "http://127.0.0.1:9", "command": ["true"]}}},
                          "test.yml", environ={})
    events: list[StateChange] = []
    lifecycle = ServiceLifecycle(config.services["svc"], FakeBackend(), Clock(), [broken, events.append])
    with capturedLogs() as captured:
        lifecycle.acquire()
    assert events and events[0].new is State.STARTING
    messages = logged(captured)
    assert "observer failed on svc" in messages
    assert any(event.get("log_failure") is not None and event["log_failure"].check(RuntimeError)
               for event in captured)


def test_an_abandoned_start_is_stopped_and_said_so_in_the_log() -> None:
    from twisted.logger import capturedLogs

    lifecycle, backend, clock, _ = make(cancel_abandoned_start=True)
    waiting = lifecycle.acquire()
    with capturedLogs() as captured:
        waiting.cancel()
    assert "svc: every request waiting for the start left: stopping it" in logged(captured)
    assert lifecycle.state is State.STOPPING and len(backend.stops) == 1


def reloaded(lifecycle: ServiceLifecycle, **overrides: Any) -> Any:
    service = {
        "url": "http://127.0.0.1:9", "command": ["true"], "idle_timeout": 60, "start_timeout": 0,
        "queue_limit": 5, "queue_timeout": 0, "stop_timeout": 3, **overrides,
    }
    return parse_config({"services": {"svc": service}}, "test.yml", environ={}).services["svc"]


def test_a_reload_that_changes_how_it_runs_builds_the_next_backend_and_logs_the_changes() -> None:
    from twisted.logger import capturedLogs

    lifecycle, backend, clock, _ = make()
    built: list[FakeBackend] = []

    def build(config: Any) -> FakeBackend:
        fresh = FakeBackend()
        built.append(fresh)
        return fresh

    lifecycle.build_backend = build
    lifecycle.reconfigure(reloaded(lifecycle, command=["serve", "b"]))
    assert lifecycle.status()["pending_changes"] == ["command"]
    with capturedLogs() as captured:
        lifecycle.acquire()
    assert len(built) == 1 and lifecycle.backend is built[0]
    assert built[0].starts and backend.starts == []  # the new run is the new backend's
    assert "svc: next run with its new settings (command)" in logged(captured)
    assert lifecycle.status()["pending_changes"] == []
    built[0].exit("crashed")  # the new backend's exits reach the lifecycle
    assert lifecycle.state is not State.STARTING


def test_retire_after_the_requests_in_flight_stops_with_reason_removed_and_refuses_the_queue() -> None:
    from hestia.errors import ServiceUnavailable

    lifecycle, backend, clock, events = make()
    first = outcome(lifecycle.acquire())
    become_ready(lifecycle, backend, clock)
    lease = first[0]
    stopped = outcome(lifecycle.retire())
    assert lifecycle.state is State.READY and backend.stops == []  # the request in flight finishes first
    lease.release()
    assert lifecycle.state is State.STOPPING and events[-1].reason == "removed"
    backend.finish_stop()
    assert stopped == [None] and lifecycle.state is State.STOPPED
    refused = outcome(lifecycle.acquire())
    assert isinstance(refused[0], Failure) and refused[0].check(ServiceUnavailable)


def test_retire_gives_up_waiting_after_stop_timeout_and_logs_the_requests_left() -> None:
    from twisted.logger import capturedLogs

    lifecycle, backend, clock, events = make(stop_timeout=3)
    first = outcome(lifecycle.acquire())
    become_ready(lifecycle, backend, clock)
    assert first
    lifecycle.retire()
    with capturedLogs() as captured:
        clock.advance(3)
    assert "svc: 1 requests still in flight after stop_timeout 3s" in logged(captured)
    assert lifecycle.state is State.STOPPING and events[-1].reason == "removed"


def test_retiring_a_starting_service_fails_its_waiters_naming_the_service() -> None:
    from hestia.errors import ServiceUnavailable

    lifecycle, backend, clock, _ = make()
    waiting = outcome(lifecycle.acquire())
    lifecycle.retire()
    assert waiting[0].check(ServiceUnavailable)
    assert waiting[0].value.service == "svc" and "removed from the configuration" in str(waiting[0].value)


# -- third round (issue 21): the survivors of the seed-11 sample -------------------------------------


def test_a_state_change_is_logged_as_a_structured_event_with_its_error() -> None:
    from twisted.logger import capturedLogs

    lifecycle, backend, clock, _ = make()
    with capturedLogs() as captured:
        fail_one_start(lifecycle, backend)
    changes = [event for event in captured if event.get("event") == "state_change"]
    failed = [event for event in changes if event["new"] == "failed"]
    assert failed and failed[0]["service"] == "svc" and "exit status 1" in failed[0]["error"]
    assert changes[0]["old"] == "stopped" and changes[0]["new"] == "starting" and changes[0]["error"] is None


def test_a_restart_after_shutdown_is_refused_naming_the_service() -> None:
    from hestia.errors import ServiceUnavailable

    lifecycle, backend, clock, _ = make()
    lifecycle.shutdown()
    refused = outcome(lifecycle.restart())
    assert refused[0].check(ServiceUnavailable) and refused[0].value.service == "svc"


def test_a_fresh_service_shows_no_cooldown() -> None:
    lifecycle, _, _, _ = make()
    assert lifecycle.status()["cooldown_until"] is None


def test_yielding_a_ready_service_without_an_idle_timer_stops_it() -> None:
    lifecycle, backend, clock, events = make(idle_timeout=0)
    first = outcome(lifecycle.acquire())
    become_ready(lifecycle, backend, clock)
    first[0].release()
    stopped = outcome(lifecycle.yield_when_drained("gpu"))
    assert lifecycle.state is State.STOPPING and events[-1].reason == "gpu"
    backend.finish_stop()
    assert stopped == [None]


def test_requests_arriving_during_a_stop_start_it_again_as_requests() -> None:
    lifecycle, backend, clock, events = make()
    first = outcome(lifecycle.acquire())
    become_ready(lifecycle, backend, clock)
    first[0].release()
    lifecycle.stop("api")
    waiting = outcome(lifecycle.acquire())
    assert lifecycle.state is State.STOPPING and waiting == []
    backend.finish_stop()
    assert lifecycle.state is State.STARTING and lifecycle.state_reason == "request"


# -- fourth round (issue 21): the survivors of the seed-23 sample -------------------------------------


def test_a_failed_start_is_cleaned_up_with_the_services_stop_timeout() -> None:
    lifecycle, backend, _, _ = make(stop_timeout=7)
    waiting = outcome(lifecycle.acquire())
    backend.starts[-1].errback(StartFailed("exit status 1"))
    assert waiting[0].check(StartFailed)
    assert backend.stop_timeouts == [7]


def test_a_start_begun_late_on_the_clock_is_probed_every_5_ms_while_young() -> None:
    # The gap grows with the time the start has taken, not with the clock's reading: a start
    # begun at t=1000 s is as young as one begun at t=0.
    lifecycle, backend, clock, _ = make(start_at=1000.0, health={"tcp": True, "interval": 2})
    lifecycle.acquire()
    backend.finish_start()
    clock.advance(0)
    assert len(backend.probes) == 1
    backend.answer_probe(False)
    clock.advance(0.005)
    assert len(backend.probes) == 2
    backend.answer_probe(False)
    clock.advance(0.005)
    assert len(backend.probes) == 3


def test_a_crash_loop_is_logged_naming_the_service() -> None:
    from twisted.logger import capturedLogs

    lifecycle, backend, clock, _ = make()
    with capturedLogs() as captured:
        for _ in range(3):
            fail_one_start(lifecycle, backend)
            clock.advance(1)
    assert "svc failed 3 times in 60s: not restarting it for 30s" in logged(captured)


def test_each_transition_is_one_log_line_service_old_new_reason() -> None:
    from twisted.logger import capturedLogs

    lifecycle, backend, clock, _ = make()
    with capturedLogs() as captured:
        outcome(lifecycle.acquire())
        become_ready(lifecycle, backend, clock)
    lines = logged(captured)
    assert "svc: stopped -> starting (request)" in lines
    assert "svc: starting -> ready (started)" in lines


def test_a_cooldown_after_failures_without_a_reason_says_start_failed() -> None:
    lifecycle, backend, clock, _ = make()
    for _ in range(3):
        waiting = outcome(lifecycle.acquire())
        backend.starts[-1].errback(StartFailed(""))  # a backend that gives no reason
        backend.finish_stop()
        assert waiting[0].check(StartFailed)
        clock.advance(1)
    refused = outcome(lifecycle.acquire())[0].value
    assert refused.reason == "start failed (failed 3 times in 60s; not retrying for 29s)"


def test_a_reload_hands_the_new_settings_to_a_reconfigurable_backend() -> None:
    from zope.interface import implementer

    from hestia.interfaces import IReconfigurableBackend

    @implementer(IReconfigurableBackend)
    class Reconfigurable(FakeBackend):
        def __init__(self) -> None:
            super().__init__()
            self.reconfigured: list[Any] = []

        def reconfigure(self, service: Any) -> None:
            self.reconfigured.append(service)

    def service(**overrides: Any) -> Any:
        raw = {"url": "http://127.0.0.1:9", "command": ["true"], **overrides}
        return parse_config({"services": {"svc": raw}}, "test.yml", environ={}).services["svc"]

    backend = Reconfigurable()
    lifecycle = ServiceLifecycle(service(), backend, Clock(), [])
    lifecycle.reconfigure(service(health={"path": "/healthz"}))  # an in-place setting
    assert [service.health.path for service in backend.reconfigured] == ["/healthz"]


def test_a_restart_after_shutdown_says_the_gateway_is_shutting_down() -> None:
    from hestia.errors import ServiceUnavailable

    lifecycle, _, _, _ = make()
    lifecycle.shutdown()
    refused = outcome(lifecycle.restart())
    assert refused[0].check(ServiceUnavailable)
    assert refused[0].value.reason == "the gateway is shutting down"


def test_the_last_second_of_a_cooldown_is_still_shown() -> None:
    lifecycle, backend, clock, _ = make()
    for _ in range(3):
        fail_one_start(lifecycle, backend)
    third = clock.seconds()
    clock.advance(ServiceLifecycle.COOLDOWN - 0.5)
    assert lifecycle.status()["cooldown_until"] == iso_time(third + ServiceLifecycle.COOLDOWN)
    clock.advance(0.5)
    assert lifecycle.status()["cooldown_until"] is None


# -- round H: the survivors of seed 31 ---------------------------------------------------------


def test_a_fresh_service_shows_an_empty_error_detail() -> None:
    lifecycle, _, _, _ = make()
    assert lifecycle.status()["last_error_detail"] == []


def test_a_fresh_service_shut_down_before_any_start_cancels_nothing() -> None:
    lifecycle, backend, _, _ = make()
    done = outcome(lifecycle.shutdown())
    assert done == [None] and backend.starts == [] and lifecycle.state is State.STOPPED


def test_a_start_timeout_of_one_second_is_kept() -> None:
    lifecycle, backend, clock, _ = make(start_timeout=1)
    waiting = outcome(lifecycle.acquire())
    backend.finish_start()  # started, but never ready
    clock.advance(1)
    assert lifecycle.state is State.FAILED
    assert waiting and "not ready after start_timeout 1s" in str(waiting[0].value)


def test_a_reload_that_turns_start_timeout_off_lets_a_start_under_way_take_its_time() -> None:
    lifecycle, backend, clock, _ = make(start_timeout=30)
    waiting = outcome(lifecycle.acquire())
    backend.finish_start()
    clock.advance(5)
    relaxed = parse_config({"services": {"svc": {"url": "http://127.0.0.1:9", "command": ["true"],
                                                 "start_timeout": 0, "queue_timeout": 0}}},
                           "test.yml", environ={}).services["svc"]
    lifecycle.reconfigure(relaxed)
    clock.advance(600)
    assert lifecycle.state is State.STARTING and not waiting
    backend.answer_probe(True)
    assert lifecycle.state is State.READY and isinstance(waiting[0], Lease)


def test_releasing_one_hold_keeps_the_service_up_while_another_holds_it() -> None:
    lifecycle, backend, clock, events = make(idle_timeout=10)
    lifecycle.hold("schedule")
    lifecycle.hold("prewarm")
    outcome(lifecycle.start())
    become_ready(lifecycle, backend, clock)
    lifecycle.release_hold("prewarm")
    clock.advance(60)
    assert lifecycle.state is State.READY  # "schedule" still holds it
    lifecycle.release_hold("schedule")
    clock.advance(10)
    assert lifecycle.state is State.STOPPING


def test_a_stop_without_a_reason_is_the_apis() -> None:
    lifecycle, backend, clock, events = make()
    outcome(lifecycle.start())
    become_ready(lifecycle, backend, clock)
    lifecycle.stop()
    assert (events[-1].new, events[-1].reason) == (State.STOPPING, "api")


def test_a_second_restart_after_the_first_ended_restarts_again() -> None:
    lifecycle, backend, clock, events = make()
    outcome(lifecycle.start())
    become_ready(lifecycle, backend, clock)
    for round_ in (1, 2):
        restarted = outcome(lifecycle.restart())
        backend.finish_stop()
        become_ready(lifecycle, backend, clock)
        assert restarted == [None], round_
    assert len(backend.starts) == 3 and len(backend.stops) == 2


def test_a_restart_of_a_service_that_is_not_ready_starts_it_without_a_drain() -> None:
    lifecycle, backend, clock, events = make()
    restarted = outcome(lifecycle.restart())
    assert lifecycle.state is State.STARTING and backend.stops == []
    become_ready(lifecycle, backend, clock)
    assert restarted == [None]


def test_a_gpu_yield_during_a_restarts_drain_is_the_restarts() -> None:
    lifecycle, backend, clock, _ = make()
    outcome(lifecycle.start())
    become_ready(lifecycle, backend, clock)
    lease = outcome(lifecycle.acquire())[0]
    outcome(lifecycle.restart())  # draining: the request in flight holds it
    yielded = outcome(lifecycle.yield_when_drained("gpu"))
    assert yielded == [None] and lifecycle.state is State.READY  # nothing of its own to do
    lease.release()
    assert lifecycle.state is State.STOPPING and len(backend.stops) == 1


def test_a_gpu_yield_waits_for_the_request_in_flight_then_stops() -> None:
    lifecycle, backend, clock, _ = make()
    outcome(lifecycle.start())
    become_ready(lifecycle, backend, clock)
    lease = outcome(lifecycle.acquire())[0]
    yielded = outcome(lifecycle.yield_when_drained("gpu"))
    assert not yielded and lifecycle.state is State.READY
    lease.release()
    assert lifecycle.state is State.STOPPING
    backend.finish_stop()
    assert yielded == [None] and lifecycle.state is State.STOPPED
