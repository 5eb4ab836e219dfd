"""
hestia.coroutines: the one async style (as_deferred) and Outcome, one piece of work's result for
many waiters (the state store's schema check, a backend's recalled record, a restart a client waits on).
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from hestia.coroutines import Outcome, as_deferred, shielded

pytestmark = pytest.mark.unit


def box(deferred: Deferred[Any]) -> list[Any]:
    got: list[Any] = []
    deferred.addBoth(got.append)
    return got


def test_a_waiter_that_gives_up_cancels_neither_the_work_nor_the_others() -> None:
    cancelled: list[bool] = []
    work: Deferred[int] = Deferred(lambda _: cancelled.append(True))
    outcome = Outcome(work)
    leaving, staying = outcome.wait(), outcome.wait()
    left = box(leaving)
    leaving.cancel()
    assert left[0].check(CancelledError) and cancelled == []
    work.callback(7)
    assert box(staying) == [7] and box(outcome.wait()) == [7]  # a late waiter gets it at once


def test_a_failure_reaches_every_waiter_and_a_late_one() -> None:
    work: Deferred[int] = Deferred()
    outcome = Outcome(work)
    early = box(outcome.wait())
    work.errback(RuntimeError("locked"))
    late = box(outcome.wait())
    assert [type(got) for got in early + late] == [Failure, Failure]
    assert all(got.check(RuntimeError) for got in early + late)


def test_a_shielded_restart_goes_on_when_its_waiter_leaves() -> None:
    cancelled: list[bool] = []
    restart: Deferred[None] = Deferred(lambda _: cancelled.append(True))
    waiting = shielded(restart)
    waiting.addErrback(lambda failure: failure.trap(CancelledError))
    waiting.cancel()
    restart.callback(None)
    assert cancelled == []


def test_as_deferred_runs_at_once_and_cancelling_it_cancels_what_it_awaits() -> None:
    inner: Deferred[int] = Deferred()
    steps: list[str] = []

    @as_deferred
    async def work() -> int:
        steps.append("began")
        return await inner + 1

    running = work()
    assert steps == ["began"]  # as inlineCallbacks did: up to the first wait, at once
    got = box(running)
    running.cancel()
    assert inner.called and got[0].check(CancelledError)
