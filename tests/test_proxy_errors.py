"""
The proxy's error paths, in memory, for every route type (issue 15, step 5).

Each route type a service can be (a static URL, a process with a lifecycle,
C{instances:}, a C{route_by: model} router in front of its target, a member of
an exclusive group) meets the same failures of its backend, through the same
L{MemoryGateway} and the upstream doubles of L{hestia.testing.upstream}: a
refused connect, a reset connection, a stall past C{response_timeout}, a body
cut short, a start that fails or times out, a full queue.  What the client
gets (status, JSON, C{Retry-After}) and what the request record and the
metrics say are asserted exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.web.client import ResponseFailed
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from hestia.admission import CONNECT_RETRY
from hestia.testing import MemoryGateway, RefusingAgent, ResettingAgent, StallingAgent, TruncatingAgent

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class RouteType:
    """
    One kind of route, its request, and where a user puts a service's settings.

    @ivar section: the C{services:} section with C{settings} (C{response_timeout},
        C{queue_limit}, ...) where the configuration reference says they go.
    @ivar named: the service the proxy's own errors name (unreachable, response timeout).
    @ivar lifecycles: the lifecycles a request may be held by, in the order the
        route tries them: their queues and starts raise the errors that name them.
    """

    id: str
    section: Callable[[dict[str, Any]], dict[str, Any]]
    path: str
    named: str
    lifecycles: tuple[str, ...]
    method: str = "GET"
    body: bytes | None = None
    groups: dict[str, Any] = field(default_factory=dict)
    starts: bool = True

    def naming(self, lifecycle: str) -> dict[str, str]:
        """How an error raised by C{lifecycle} names where it happened: an instance names its service too."""
        if self.id == "instances":
            return {"service": self.named, "instance": lifecycle}
        return {"service": lifecycle}

    def gateway(self, settings: dict[str, Any] | None = None, agent: Callable[[IAgent], IAgent] | None = None,
                ) -> MemoryGateway:
        return MemoryGateway(self.section(settings or {}), groups=self.groups, agent=agent, metrics=True)

    def send(self, memory: MemoryGateway) -> Deferred[Any]:
        return memory.request(self.method, self.path, data=self.body)


STATIC = RouteType("static", lambda settings: {"web": {"url": "http://backend:8000", **settings}},
                   "/services/web/x", "web", ("web",), starts=False)
PROCESS = RouteType("process", lambda settings: {"svc": {"url": "http://backend:1", "command": ["serve"], **settings}},
                    "/services/svc/x", "svc", ("svc",))
INSTANCES = RouteType(
    "instances",
    lambda settings: {"pool": {"instances": [{"url": "http://first:1", "command": ["a"]},
                                             {"url": "http://second:2", "command": ["b"]}], **settings}},
    # prefer-warm (the default strategy) moves on to the next instance when a start fails.
    "/services/pool/x", "pool", ("pool.0", "pool.1"))
MODEL = RouteType(
    "model",
    # The settings go on the target, the service that runs the model: the router runs nothing, and
    # hestia.routing.ModelRoute hands each request to "the target's own route, so the target's queue,
    # idle clock and group rules apply unchanged".
    lambda settings: {"ai": {"route_by": "model"},
                      "qwen": {"url": "http://qwen:1", "command": ["qwen"], "models": ["qwen2.5:7b"], **settings}},
    "/services/ai/api/chat", "ai", ("qwen",), method="POST", body=b'{"model": "qwen2.5:7b"}')
GROUP_MEMBER = RouteType(
    "group member",
    lambda settings: {"a": {"url": "http://a:1", "command": ["a"], "group": "gpu", **settings},
                      "b": {"url": "http://b:2", "command": ["b"], "group": "gpu"}},
    "/services/a/x", "a", ("a",), groups={"gpu": {"exclusive": True}})

EVERY_ROUTE = [STATIC, PROCESS, INSTANCES, MODEL, GROUP_MEMBER]
STARTING_ROUTES = [route for route in EVERY_ROUTE if route.starts]


def each(routes: list[RouteType]) -> Any:
    return pytest.mark.parametrize("route", routes, ids=lambda route: route.id)


def pending_starts(memory: MemoryGateway) -> list[str]:
    """The services whose fake was asked to start and has not finished."""
    return [name for name, fake in memory.fakes.items() if fake.starts and not fake.starts[-1].called]


def bring_up(memory: MemoryGateway) -> None:
    """Finish every start asked for (and answer its probe), however the route chose what to start."""
    memory.settle()
    for name in pending_starts(memory):
        memory.start(name)


def answered(memory: MemoryGateway, deferred: Deferred[Any], seconds: float = 10.0, step: float = 0.05) -> Any:
    """C{deferred}'s result once it has one, letting reactor time pass (connect retries) and starts finish."""
    box = outcome(deferred)
    began = memory.reactor.seconds()
    while memory.reactor.seconds() - began < seconds:
        bring_up(memory)  # an instance failed over to is started on the way
        if box:
            return memory.result(deferred)
        memory.reactor.advance(step)
    raise AssertionError(f"no answer within {seconds}s")


def outcome(deferred: Deferred[Any]) -> list[Any]:
    """A list that gets C{deferred}'s result once it has one; the result stays C{deferred}'s."""
    box: list[Any] = []

    def keep(result: Any) -> Any:
        box.append(result)
        return result

    deferred.addBoth(keep)
    return box


def last_record(memory: MemoryGateway) -> Any:
    memory.settle()
    assert memory.records, "no request record"
    return memory.records[-1]


# -- the backend refuses the connection --------------------------------------------------------


@each(EVERY_ROUTE)
def test_a_refusing_backend_is_a_json_502_after_a_second_of_retries(route: RouteType) -> None:
    memory = route.gateway(agent=RefusingAgent)
    began = memory.reactor.seconds()
    response = answered(memory, route.send(memory))
    assert response.code == 502
    assert memory.json(response) == {"error": "backend unreachable: connection refused", "service": route.named,
                                     "state": "ready"}
    assert memory.reactor.seconds() - began <= CONNECT_RETRY.refused_for + 0.1  # retried briefly, then told
    assert memory.agent.spoiled > 1
    record = last_record(memory)
    assert (record.status, record.error_kind) == (502, "connect")
    assert memory.metric("hestia_upstream_errors_total", service=route.named, kind="connect") == 1


# -- the backend resets the connection before answering ----------------------------------------


@each(EVERY_ROUTE)
def test_a_reset_before_the_response_is_a_json_502_and_never_retried(route: RouteType) -> None:
    memory = route.gateway(agent=ResettingAgent)
    response = answered(memory, route.send(memory))
    assert response.code == 502
    body = memory.json(response)
    assert body == {"error": "backend unreachable: Connection to the other side was lost in a non-clean fashion: "
                             "Connection reset by peer.", "service": route.named, "state": "ready"}
    assert memory.agent.spoiled == 1  # the request may have reached the backend: not sent twice
    record = last_record(memory)
    assert (record.status, record.error_kind) == (502, "upstream")
    assert memory.metric("hestia_upstream_errors_total", service=route.named, kind="upstream") == 1


# -- the backend stalls past response_timeout --------------------------------------------------


@pytest.mark.parametrize("route", [STATIC, PROCESS, INSTANCES, MODEL,
                                   GROUP_MEMBER], ids=lambda route: route.id)
def test_a_backend_stalling_past_response_timeout_is_a_json_504_and_frees_the_slot(route: RouteType) -> None:
    memory = route.gateway({"response_timeout": 30, "max_concurrency": 1},
                           agent=lambda inner: StallingAgent(inner, times=1))
    stalling = memory.agent
    first = route.send(memory)
    bring_up(memory)
    first_seen = outcome(first)
    second = outcome(route.send(memory))  # waits for the one slot
    memory.settle()
    assert stalling.pending == 1 and len(stalling.asked) == 1
    memory.advance(29.9, step=0.1)
    assert not first_seen and not second
    memory.advance(0.1, step=0.1)
    response = memory.result(first)
    assert response.code == 504
    assert memory.json(response) == {"error": "backend sent no response within response_timeout 30s",
                                     "service": route.named, "state": "ready"}
    assert stalling.cancelled == 1  # the backend request is dropped, not left open
    memory.settle()
    assert second and second[0].code == 200  # the freed slot went to the waiting request
    records = {record.status: record for record in memory.records}
    assert records[504].error_kind == "response_timeout"
    assert memory.metric("hestia_response_timeouts_total", service=route.named) == 1


# -- the backend cuts the body short -----------------------------------------------------------


@each(EVERY_ROUTE)
def test_a_body_cut_short_cuts_the_clients_response_and_is_recorded_as_truncated(route: RouteType) -> None:
    memory = route.gateway(agent=lambda inner: TruncatingAgent(inner, after=4))
    response = answered(memory, route.send(memory))
    assert response.code == 200  # the head went out before the body broke off
    cut = memory.failure(response.content())
    assert cut.check(ResponseFailed)  # the client sees a broken response, not a whole short one
    record = last_record(memory)
    assert (record.status, record.bytes, record.error_kind) == (200, 4, "truncated")
    assert record.error.startswith("backend broke off the response: ")
    assert memory.metric("hestia_upstream_errors_total", service=route.named, kind="truncated") == 1


# -- a start that fails ------------------------------------------------------------------------


def fail_starts(memory: MemoryGateway, deferred: Deferred[Any]) -> Any:
    """Fail every start asked for (the command exits) until C{deferred} is answered."""
    box = outcome(deferred)
    for _ in range(10):
        memory.settle()
        if box:
            break
        for name in pending_starts(memory):
            memory.fakes[name].output = [f"{name}: fatal: no GPU"]
            memory.fakes[name].exit("exit status 1")
    return memory.result(deferred)


@each(STARTING_ROUTES)
def test_a_start_that_fails_answers_the_held_request_502_with_the_reason(route: RouteType) -> None:
    memory = route.gateway()
    response = fail_starts(memory, route.send(memory))
    assert response.code == 502
    # The last lifecycle tried is named: for instances:, each instance was tried in turn, and the
    # error names the service the client asked for and the instance.
    # docs/troubleshooting.md: 502 {"error": "exited during start: exit status 1", "detail": [...]}, detail
    # being this attempt's last output lines (shown with auth off, as here).
    last = route.lifecycles[-1]
    assert memory.json(response) == {"error": "exited during start: exit status 1", **route.naming(last),
                                     "state": "failed", "detail": [f"{last}: fatal: no GPU"]}
    assert [memory.fakes[name].starts != [] for name in route.lifecycles] == [True] * len(route.lifecycles)
    record = last_record(memory)
    assert (record.status, record.error_kind, record.leased) == (502, "StartFailed", False)


@each(STARTING_ROUTES)
def test_a_start_past_start_timeout_answers_the_held_request_504(route: RouteType) -> None:
    memory = route.gateway({"start_timeout": 10})
    answer = outcome(route.send(memory))
    for tried in route.lifecycles:  # each start takes its whole start_timeout
        memory.settle()
        [starting] = pending_starts(memory)
        assert starting == tried
        memory.fakes[starting].finish_start()  # started, but its probe never says ready
        memory.advance(9.5, step=0.5)
        assert not answer
        memory.advance(0.5, step=0.5)
    [response] = answer
    assert response.code == 504
    assert memory.json(response) == {"error": "not ready after start_timeout 10s",
                                     **route.naming(route.lifecycles[-1]), "state": "failed"}


# -- a full queue --------------------------------------------------------------------------------


@each(STARTING_ROUTES)
def test_a_full_start_queue_is_a_json_503_with_retry_after(route: RouteType) -> None:
    memory = route.gateway({"queue_limit": 1})
    held = outcome(route.send(memory))
    response = memory.result(route.send(memory))
    assert response.code == 503
    assert response.headers.getRawHeaders("retry-after") == ["5"]  # about one start: none finished yet
    assert memory.json(response) == {"error": "queue full: 1 requests already waiting",
                                     **route.naming(route.lifecycles[0]), "state": "starting", "retry_after": 5}
    assert not held  # the one held is still held
    bring_up(memory)
    assert held and held[0].code == 200


@each(EVERY_ROUTE)
def test_a_full_admission_queue_is_a_json_503_with_retry_after(route: RouteType) -> None:
    memory = route.gateway({"max_concurrency": 1, "queue_limit": 1},
                           agent=lambda inner: StallingAgent(inner, times=1))
    in_progress = route.send(memory)
    bring_up(memory)
    waiting = outcome(route.send(memory))
    response = memory.result(route.send(memory))
    assert response.code == 503
    assert response.headers.getRawHeaders("retry-after") == ["1"]
    # The backend's admission window belongs to the lifecycle that owns its URL (an instance is named as such).
    assert memory.json(response) == {"error": "queue full: 1 requests already waiting for the backend",
                                     **route.naming(route.lifecycles[0]), "state": "ready", "retry_after": 1}
    assert not waiting and not outcome(in_progress)


# -- a body that goes silent -------------------------------------------------------------------


class Trickling(Resource):
    """Sends the head and a first piece of every body, then holds the rest."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Request] = []

    def render(self, request: Request) -> int:
        request.write(b"first")
        self.held.append(request)
        return NOT_DONE_YET



@pytest.mark.parametrize("route", [STATIC, PROCESS, INSTANCES, MODEL,
                                   GROUP_MEMBER], ids=lambda route: route.id)
def test_a_body_silent_past_response_idle_timeout_is_cut_and_recorded(route: RouteType) -> None:
    backend = Trickling()
    memory = MemoryGateway(route.section({"response_idle_timeout": 5}), groups=route.groups, backend=backend,
                           metrics=True)
    answer = route.send(memory)
    bring_up(memory)
    response = memory.result(answer)
    assert response.code == 200
    body = outcome(response.content())
    memory.advance(4.5, step=0.5)
    assert not body
    memory.advance(0.5, step=0.5)
    assert body and body[0].check(ResponseFailed)  # cut, not taken for a whole body
    body[0].trap(ResponseFailed)
    record = last_record(memory)
    assert (record.error, record.error_kind) == ("response body silent for response_idle_timeout 5s", "truncated")
    assert memory.metric("hestia_upstream_errors_total", service=route.named, kind="truncated") == 1


# -- which service an error names ----------------------------------------------------------------


def test_every_error_of_an_instances_service_names_a_service_the_api_knows() -> None:
    memory = INSTANCES.gateway({"queue_limit": 1})
    outcome(INSTANCES.send(memory))
    refused = memory.result(INSTANCES.send(memory))
    assert refused.code == 503
    document = memory.json(refused)
    named = document["service"]
    # Before, it named the instance (pool.0), which /v1/services/ does not know (a finding of this file).
    assert named == "pool" and document["instance"] == "pool.0"
    assert memory.result(memory.get(f"/v1/services/{named}/status")).code == 200


def test_through_a_model_router_the_serving_targets_response_timeout_applies_not_the_routers() -> None:
    """
    The per-request rules are the target's, the service that runs the model (they came from the
    router's config before, a default 300 s, whatever the target said: a finding of this file).
    """
    memory = MemoryGateway({"ai": {"route_by": "model", "response_timeout": 5},
                            "qwen": {"url": "http://qwen:1", "command": ["qwen"], "models": ["qwen2.5:7b"],
                                     "response_timeout": 30}},
                           agent=lambda inner: StallingAgent(inner))
    answer = outcome(MODEL.send(memory))
    bring_up(memory)
    memory.advance(29.5, step=0.5)
    assert not answer  # the router's 5 s does not cut a model that may take its 30 s
    memory.advance(0.5, step=0.5)
    assert answer and answer[0].code == 504
    assert memory.json(answer[0]) == {"error": "backend sent no response within response_timeout 30s",
                                      "service": "ai", "state": "ready"}
