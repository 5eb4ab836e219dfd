"""
Issue 13: the release rules for a crowd held through a cold start, with a Clock.

L{Admission} (the window and its queue) and L{ConnectRetry} (when a failed
connect is tried again) are tested alone, then through the proxy in memory
(L{hestia.testing.MemoryGateway}): the gateway's HTTP client is an agent the
test controls (L{hestia.testing.upstream}), time is a MemoryReactorClock,
nothing sleeps.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError, TimeoutError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from hestia.admission import CONNECT_RETRY, Admission, ConnectRetry
from hestia.config import ConfigError
from hestia.errors import QueueFull, QueueTimedOut
from hestia.loader import parse_config
from hestia.testing import FlakyAgent, MemoryGateway, StallingAgent
from hestia.upstream import ConnectTimes

pytestmark = pytest.mark.unit


def where() -> Any:
    return {"service": "svc", "state": "ready"}


def admission(clock: Clock, max_concurrency: int = 64, queue_limit: int = 1000) -> Admission:
    return Admission(clock, max_concurrency, queue_limit, where, retry_after=lambda: 7.0)


def waits(adm: Admission, count: int, deadline: float | None = None) -> list[Deferred[None]]:
    return [adm.wait(deadline) for _ in range(count)]


def watch(deferred: Deferred[Any]) -> list[Any]:
    """A list that gets the Deferred's result once it has one (C{.called} is set earlier for a chained one)."""
    seen: list[Any] = []

    def keep(result: Any) -> Any:
        seen.append(result)
        return result

    deferred.addBoth(keep)
    return seen


def fired(deferreds: list[Deferred[None]]) -> int:
    return sum(1 for d in deferreds if d.called)


# -- the window ---------------------------------------------------------------------


def test_slow_start_begins_at_four_and_doubles_per_round_of_answers() -> None:
    adm = admission(Clock(), max_concurrency=20)
    turns = waits(adm, 40)
    assert (adm.window, adm.active, fired(turns)) == (4, 4, 4)
    for _ in range(3):
        adm.answered()
    assert adm.window == 4 and fired(turns) == 4  # a round is as many answers as the window is wide
    adm.answered()
    assert (adm.window, fired(turns)) == (8, 8)
    for _ in range(8):
        adm.answered()
    assert (adm.window, fired(turns)) == (16, 16)
    for _ in range(16):
        adm.answered()
    assert (adm.window, fired(turns)) == (20, 20)  # capped at max_concurrency
    for _ in range(40):
        adm.answered()
    assert adm.window == 20 and adm.active == 20


def test_released_turns_go_to_the_oldest_waiter_first() -> None:
    adm = admission(Clock())
    turns = waits(adm, 6)
    order: list[int] = []
    for index, turn in enumerate(turns):
        turn.addCallback(lambda _, index=index: order.append(index))
    adm.release()
    adm.release()
    assert order == [0, 1, 2, 3, 4, 5]
    assert adm.active == 4 and len(adm) == 0


def test_a_request_never_jumps_the_queue() -> None:
    adm = admission(Clock())
    waits(adm, 5)  # four in progress, one waiting
    assert not adm.try_take()
    adm.release()  # the waiter gets it, not a newcomer
    assert adm.active == 4 and len(adm) == 0
    assert not adm.try_take()


def test_a_retry_goes_back_to_the_head_of_the_queue() -> None:
    adm = admission(Clock())
    waits(adm, 4)
    later = adm.wait(None)
    retry = adm.wait(None, first=True)
    adm.release()
    assert retry.called and not later.called


def test_every_start_slows_down_again() -> None:
    adm = admission(Clock(), max_concurrency=64)
    for _ in range(4 + 8 + 16 + 32):
        adm.answered()
    assert adm.window == 64
    adm.restart()
    assert adm.window == 4
    assert admission(Clock(), max_concurrency=2).window == 2


def test_a_failed_connect_halves_the_window_then_it_grows_by_one_per_round() -> None:
    adm = admission(Clock())
    for _ in range(4 + 8):
        adm.answered()
    assert adm.window == 16
    adm.answered()
    adm.connect_failed()
    assert (adm.window, adm.threshold) == (8, 8)
    for _ in range(7):
        adm.answered()
    assert adm.window == 8  # the answer before the failure does not count
    adm.answered()
    assert adm.window == 9  # above the threshold: one more per round, not twice
    for _ in range(9):
        adm.answered()
    assert adm.window == 10
    for _ in range(10):
        adm.connect_failed()
    assert adm.window == 1
    adm.restart()
    assert (adm.window, adm.threshold) == (4, 64)  # a new start forgets it


def test_the_queue_is_bounded_by_queue_limit_with_retry_after() -> None:
    adm = admission(Clock(), queue_limit=3)
    waits(adm, 4 + 3)
    with pytest.raises(QueueFull) as refused:
        adm.wait(None)
    assert refused.value.retry_after == 7.0
    assert refused.value.status == 503
    adm.wait(None, first=True)  # a retry was counted already: never refused


def test_a_waiter_times_out_at_its_deadline() -> None:
    clock = Clock()
    adm = admission(clock)
    waits(adm, 4)
    late = adm.wait(deadline=10.0)
    errors: list[Failure] = []
    late.addErrback(errors.append)
    clock.advance(9.9)
    assert not errors
    clock.advance(0.1)
    assert len(errors) == 1 and isinstance(errors[0].value, QueueTimedOut)
    assert errors[0].value.status == 504 and errors[0].value.service == "svc"
    assert len(adm) == 0
    assert not clock.getDelayedCalls()


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    clock = Clock()
    adm = admission(clock)
    waits(adm, 4)
    gone = adm.wait(deadline=10.0)
    gone.addErrback(lambda failure: None)
    gone.cancel()
    assert len(adm) == 0 and not clock.getDelayedCalls()
    adm.release()
    assert adm.active == 3


def test_a_smaller_limit_on_reload_clips_the_window() -> None:
    adm = admission(Clock())
    for _ in range(4 + 8):
        adm.answered()
    adm.configure(max_concurrency=5, queue_limit=10)
    assert adm.window == 5
    assert adm.status() == {"window": 5, "threshold": 5, "max_concurrency": 5, "active": 0, "waiting": 0}


# -- the connect retry rule -------------------------------------------------------


def test_connect_timeouts_start_short_and_grow() -> None:
    rule = ConnectRetry()
    assert [rule.timeout(n) for n in range(6)] == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0]
    assert rule.timeout(1000) == 5.0


def test_the_first_connect_timeout_follows_the_backends_connect_times() -> None:
    rule = ConnectRetry()
    # Loopback: a dropped SYN costs 50 ms (not less: after a stall of the
    # reactor a timer fires before the connect's own event is read).
    assert rule.timeout(0, slowest=0.0001) == 0.05
    assert rule.timeout(1, slowest=0.0001) == 0.1
    assert rule.timeout(0, slowest=0.02) == 0.16
    assert rule.timeout(0, slowest=0.2) == 0.25  # never longer than without knowledge
    times = ConnectTimes()
    assert times.slowest(("h", 1)) is None
    for seconds in [0.5] + [0.001] * ConnectTimes.SAMPLES:
        times.record(("h", 1), seconds)
    assert times.slowest(("h", 1)) == 0.001  # only the recent ones count
    assert [rule.pause(n) for n in range(3)] == [0.005, 0.01, 0.02]
    assert rule.pause(1000) == 0.5


def test_connects_are_retried_while_the_queue_time_lasts() -> None:
    rule = ConnectRetry()
    assert rule.next_attempt(0, now=5.0, deadline=10.0) == 0.005
    assert rule.next_attempt(20, now=9.0, deadline=10.0) == 0.5
    assert rule.next_attempt(20, now=9.6, deadline=10.0) is None
    assert rule.next_attempt(20, now=1e6, deadline=None) == 0.5  # queue_timeout 0: no end


def test_a_refusing_backend_is_retried_only_briefly() -> None:
    rule = ConnectRetry(refused_for=1.0)
    assert rule.next_attempt(3, now=100.5, deadline=200.0, refused_since=100.0) == 0.04
    assert rule.next_attempt(3, now=101.0, deadline=200.0, refused_since=100.0) is None


# -- through the proxy, in memory --------------------------------------------------------


class HeldBackend(Resource):
    """Holds every request until the test finishes it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Request] = []

    def render(self, request: Request) -> int:
        self.held.append(request)
        return NOT_DONE_YET

    def finish(self, count: int) -> None:
        for request in self.held[:count]:
            request.write(b"ok")
            request.finish()
        del self.held[:count]


def holding(service: dict[str, Any], agent: Callable[[IAgent], IAgent] | None = None) -> MemoryGateway:
    """One service, C{svc}, whose backend holds every request (L{HeldBackend}); metrics kept."""
    return MemoryGateway({"svc": service}, backend=HeldBackend(), agent=agent, metrics=True)


PROCESS = {"url": "http://127.0.0.1:9", "command": ["true"], "queue_limit": 1000, "idle_timeout": 0}


def test_a_crowd_held_through_a_start_is_released_four_first_then_per_answers() -> None:
    h = holding({**PROCESS, "max_concurrency": 16})
    answers = [h.get(f"/services/svc/x{i}") for i in range(40)]
    h.start("svc")
    assert len(h.backend.held) == 4  # not 40 connection attempts at a fresh backend
    assert h.status("svc")["concurrency"] == {"window": 4, "threshold": 16, "max_concurrency": 16, "active": 4,
                                         "waiting": 36}
    h.backend.finish(4)
    h.settle()
    assert len(h.backend.held) == 8  # a round of 4 answers: window 8
    h.backend.finish(8)
    h.settle()
    assert len(h.backend.held) == 16
    h.backend.finish(16)
    h.settle()
    assert len(h.backend.held) == 12  # the rest; never more than max_concurrency
    h.backend.finish(12)
    h.settle()
    assert [h.result(a).code for a in answers] == [200] * 40
    assert h.metric("hestia_slot_wait_seconds_count", service="svc") == 40


def test_the_window_starts_small_again_after_a_restart() -> None:
    h = holding({**PROCESS, "max_concurrency": 8})
    first = [h.get("/services/svc/a") for _ in range(20)]
    h.start("svc")
    while h.backend.held:
        h.backend.finish(len(h.backend.held))
        h.settle()
    assert [h.result(a).code for a in first] == [200] * 20
    assert h.status("svc")["concurrency"]["window"] == 8
    h.fakes["svc"].exit("killed")  # the backend died; the next request starts it again
    again = [h.get("/services/svc/b") for _ in range(20)]
    h.start("svc")
    assert h.status("svc")["concurrency"]["window"] == 4
    assert len(h.backend.held) == 4
    while h.backend.held:
        h.backend.finish(len(h.backend.held))
        h.settle()
    assert [h.result(a).code for a in again] == [200] * 20


def test_a_dropped_syn_is_retried_with_a_short_timeout_for_any_method() -> None:
    failures: list[Callable[[], Exception]] = [lambda: TimeoutError("connect timed out")] * 3
    h = holding({**PROCESS}, agent=lambda traversal: FlakyAgent(traversal, failures))
    answer = h.request("POST", "/services/svc/p", data=b"payload")
    h.start("svc")
    assert not h.backend.held
    # Pauses 5, 10 and 20 ms of reactor time, no sleeping.
    for _ in range(3):
        h.reactor.advance(CONNECT_RETRY.max_pause)
        h.settle()
    assert len(h.backend.held) == 1
    assert h.backend.held[0].content.read() == b"payload"
    h.backend.finish(1)
    assert h.result(answer).code == 200
    assert h.metric("hestia_connect_retries_total", service="svc") == 3
    assert h.gateway.upstream.admission("http://127.0.0.1:9", h.gateway.route("svc")).window == 2  # 4 halved to 1, then one answer


def test_a_backend_that_keeps_refusing_gets_502_after_a_second() -> None:
    refused: list[Callable[[], Exception]] = [lambda: ConnectionRefusedError("refused")] * 1000
    h = holding({"url": "http://127.0.0.1:9"}, agent=lambda traversal: FlakyAgent(traversal, refused))
    answer = h.get("/services/svc/x")
    answered: list[float] = []
    answer.addCallback(lambda response: answered.append(h.reactor.seconds()) or response)
    h.settle()
    while not answered and h.reactor.seconds() < 10:
        h.reactor.advance(0.01)
        h.settle()
    [answered_at] = answered
    response = h.result(answer)
    assert response.code == 502
    assert "refused" in json.loads(h.result(response.content()))["error"]
    # Retried for a while (a backend re-binding its socket), then told at once.
    assert 0.3 < answered_at <= CONNECT_RETRY.refused_for
    assert h.metric("hestia_connect_retries_total", service="svc") >= 5
    assert h.gateway.upstream.admission("http://127.0.0.1:9", h.gateway.route("svc")).active == 0


def test_no_response_within_response_timeout_is_504_and_frees_the_slot() -> None:
    silent = StallingAgent()
    h = holding({"url": "http://127.0.0.1:9", "response_timeout": 30, "max_concurrency": 1},
                agent=lambda traversal: silent)
    hung = h.get("/services/svc/hung")
    hung_seen = watch(hung)
    second = h.get("/services/svc/other")
    h.settle()
    assert len(silent.sent) == 1  # max_concurrency 1: the second waits for the slot
    h.reactor.advance(29.9)
    h.settle()
    assert not hung_seen
    h.reactor.advance(0.1)
    response = h.result(hung)
    assert response.code == 504
    body = json.loads(h.result(response.content()))
    assert body["service"] == "svc" and "response_timeout 30s" in body["error"]
    assert silent.cancelled == 1
    assert len(silent.sent) == 2  # the freed slot went to the waiting request
    assert h.metric("hestia_response_timeouts_total", service="svc") == 1
    h.reactor.advance(30)
    assert h.result(second).code == 504


def test_response_timeout_zero_means_no_deadline() -> None:
    silent = StallingAgent()
    h = holding({"url": "http://127.0.0.1:9", "response_timeout": 0}, agent=lambda traversal: silent)
    hung = watch(h.get("/services/svc/hung"))
    h.settle()
    h.reactor.advance(10 * 86400)
    h.settle()
    assert not hung and not silent.cancelled


def test_a_response_body_silent_for_response_idle_timeout_is_cut_and_frees_the_slot() -> None:
    h = holding({"url": "http://127.0.0.1:9", "response_idle_timeout": 5})
    answer = h.get("/services/svc/stream")
    h.settle()
    [held] = h.backend.held
    held.write(b"first")  # the head goes out with the first piece
    response = h.result(answer)
    assert response.code == 200
    body = watch(response.content())
    h.reactor.advance(4)
    held.write(b"second")  # progress: the silence starts again
    h.settle()
    h.reactor.advance(4)
    h.settle()
    assert not body
    h.reactor.advance(1.1)
    h.settle()
    assert len(body) == 1 and isinstance(body[0], Failure)  # truncated, not taken for a whole body
    body[0].trap(Exception)
    assert h.gateway.upstream.admission("http://127.0.0.1:9", h.gateway.route("svc")).active == 0


def test_a_reload_in_place_applies_the_new_max_concurrency() -> None:
    h = holding({**PROCESS, "max_concurrency": 16})
    reloaded = parse_config({"services": {"svc": {**PROCESS, "max_concurrency": 2}}}, "test.yml", environ={})
    h.gateway.route("svc").reconfigure(reloaded.services["svc"])
    answers = [h.get(f"/services/svc/x{i}") for i in range(5)]
    h.start("svc")
    assert len(h.backend.held) == 2
    assert h.status("svc")["concurrency"]["max_concurrency"] == 2
    while h.backend.held:
        h.backend.finish(len(h.backend.held))
        h.settle()
    assert [h.result(a).code for a in answers] == [200] * 5


@pytest.mark.parametrize(("key", "value"), [("max_concurrency", 0), ("max_concurrency", "many"),
                                            ("response_timeout", -1), ("response_idle_timeout", float("nan"))])
def test_bad_settings_are_one_line_config_errors(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config({"services": {"svc": {"url": "http://127.0.0.1:9", key: value}}}, "test.yml", environ={})
    message = str(refused.value)
    assert "\n" not in message and "test.yml" in message and f"services.svc.{key}" in message


def test_the_defaults() -> None:
    service = parse_config({"services": {"svc": {"url": "http://127.0.0.1:9"}}}, "t.yml", environ={}).services["svc"]
    assert (service.max_concurrency, service.response_timeout, service.response_idle_timeout) == (64, 300.0, 300.0)
