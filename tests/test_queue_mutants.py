"""
The wait queue's rules that mutation testing (issue 21) found unpinned: oldest_wait(), the
batched release beyond RELEASE_BATCH waiters, a cancelled or released waiter's timer, and what
a refused or timed-out request is told.  A Clock drives time; no processes, no sleeps.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from hestia.errors import QueueFull, QueueTimedOut, StartFailed, Where
from hestia.queue import WaitQueue

pytestmark = pytest.mark.unit


def make(limit: int = 5) -> tuple[WaitQueue, Clock]:
    clock = Clock()
    clock.advance(100)

    def describe() -> Where:
        return {"service": "svc", "state": "starting"}

    return WaitQueue(clock, limit, describe), clock


def outcome(deferred: Deferred[Any]) -> list[Any]:
    box: list[Any] = []
    deferred.addBoth(box.append)
    return box


def test_oldest_wait_is_the_first_waiters_time_and_zero_when_empty() -> None:
    queue, clock = make()
    assert queue.oldest_wait() == 0.0
    first = queue.wait(0, retry_after=5)
    clock.advance(3)
    queue.wait(0, retry_after=5)
    clock.advance(1.5)
    assert queue.oldest_wait() == 4.5
    first.addErrback(lambda _: None)
    first.cancel()  # the oldest leaves: the next one is now the oldest
    assert queue.oldest_wait() == 1.5
    queue.release_all()
    assert queue.oldest_wait() == 0.0


def test_release_lets_a_batch_through_per_reactor_turn_oldest_first() -> None:
    queue, clock = make(limit=1000)
    batch = WaitQueue.RELEASE_BATCH
    order: list[int] = []
    boxes = []
    for number in range(batch * 2 + 10):
        waiting = queue.wait(0, retry_after=1)
        waiting.addCallback(lambda _, number=number: order.append(number))
        boxes.append(outcome(waiting))
    queue.release_all()
    assert len(queue) == 0  # nobody waits any more, even those released later
    assert order == list(range(batch))
    # The rest waits for the next reactor turn (Clock runs the chained turns in one advance).
    assert [call.getTime() for call in clock.getDelayedCalls()] == [clock.seconds()]
    clock.advance(0)
    assert order == list(range(batch * 2 + 10))
    assert all(box == [None] for box in boxes)
    assert clock.getDelayedCalls() == []


def test_a_client_leaving_after_the_release_began_is_skipped() -> None:
    queue, clock = make(limit=1000)
    waiting = [queue.wait(0, retry_after=1) for _ in range(WaitQueue.RELEASE_BATCH + 1)]
    last = waiting[-1]
    last.addErrback(lambda _: None)
    queue.release_all()
    last.cancel()  # it was taken, but its turn had not come
    clock.advance(0)  # no AlreadyCalledError: the cancelled one is left alone
    assert last.called


def test_a_cancelled_waiter_has_no_timer_left() -> None:
    queue, clock = make()
    waiting = queue.wait(10, retry_after=1)
    assert len(clock.getDelayedCalls()) == 1
    box = outcome(waiting)
    waiting.cancel()
    assert clock.getDelayedCalls() == [] and len(queue) == 0
    clock.advance(20)
    assert len(box) == 1 and not isinstance(box[0].value, QueueTimedOut)


def test_released_and_failed_waiters_have_no_timer_left() -> None:
    queue, clock = make()
    released = outcome(queue.wait(10, retry_after=1))
    queue.release_all()
    failed = outcome(queue.wait(10, retry_after=1))
    queue.fail_all(StartFailed("boom", service="svc", state="failed"))
    assert clock.getDelayedCalls() == []
    clock.advance(20)
    assert released == [None]
    assert isinstance(failed[0].value, StartFailed) and failed[0].value.reason == "boom"


def test_timeout_fails_only_that_waiter_and_says_how_long() -> None:
    queue, clock = make()
    short = outcome(queue.wait(2, retry_after=1))
    patient = outcome(queue.wait(0, retry_after=1))  # 0: never times out
    clock.advance(2)
    error = short[0].value
    assert isinstance(error, QueueTimedOut)
    assert error.reason == "request waited 2s for the service to start"
    assert error.service == "svc" and error.state == "starting"
    assert len(queue) == 1 and patient == []
    clock.advance(10_000)
    assert patient == []
    queue.release_all()
    assert patient == [None]


def test_the_bound_refuses_the_one_beyond_with_its_retry_after() -> None:
    queue, clock = make(limit=2)
    queue.wait(0, retry_after=1)
    queue.wait(0, retry_after=1)
    with pytest.raises(QueueFull) as refused:
        queue.wait(0, retry_after=7.5)
    assert refused.value.retry_after == 7.5
    assert refused.value.reason == "queue full: 2 requests already waiting"
    assert refused.value.service == "svc" and refused.value.state == "starting"
    assert len(queue) == 2
    queue.release_all()
    queue.wait(0, retry_after=1)  # room again
    assert len(queue) == 1


def test_a_timeout_under_a_second_still_times_out() -> None:
    queue, clock = make()
    waiting = outcome(queue.wait(0.5, retry_after=1))
    clock.advance(0.5)
    assert isinstance(waiting[0].value, QueueTimedOut)
    assert waiting[0].value.reason == "request waited 0.5s for the service to start"
