"""
The one retry rule after a lost event stream (hestia.backends.docker.reconnect), which the docker
backend and label discovery share: quick at first, doubling, capped, reset once the stream is up.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from hestia.backends.docker.reconnect import RECONNECT_FIRST, RECONNECT_MAX, Reconnect

pytestmark = pytest.mark.unit


def attempts_at(clock: Clock, reconnect: Reconnect, fired: list[float], failures: int) -> list[float]:
    for _ in range(failures):
        reconnect.schedule()
        clock.advance(RECONNECT_MAX)
    return fired


def test_the_wait_doubles_from_a_quarter_second_up_to_ten() -> None:
    clock, fired = Clock(), []
    reconnect = Reconnect(clock, lambda: fired.append(clock.seconds()))
    waits = []
    for _ in range(8):
        reconnect.schedule()
        [due] = clock.getDelayedCalls()
        waits.append(due.getTime() - clock.seconds())
        clock.advance(RECONNECT_MAX)
    assert waits == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert len(fired) == 8
    assert RECONNECT_FIRST == 0.25


def test_a_stream_that_is_up_again_is_retried_quickly_next_time() -> None:
    clock, fired = Clock(), []
    reconnect = Reconnect(clock, lambda: fired.append(clock.seconds()))
    attempts_at(clock, reconnect, fired, 5)
    reconnect.succeeded()
    reconnect.schedule()
    [due] = clock.getDelayedCalls()
    assert due.getTime() - clock.seconds() == 0.25


def test_scheduling_again_replaces_the_pending_retry_and_cancel_drops_it() -> None:
    clock, fired = Clock(), []
    reconnect = Reconnect(clock, lambda: fired.append(clock.seconds()))
    reconnect.schedule()
    reconnect.schedule()  # two losses reported at once: still one retry
    assert reconnect.pending and len(clock.getDelayedCalls()) == 1
    clock.advance(RECONNECT_MAX)
    assert len(fired) == 1 and not reconnect.pending
    reconnect.schedule()
    reconnect.cancel()
    clock.advance(RECONNECT_MAX)
    assert len(fired) == 1 and clock.getDelayedCalls() == []
