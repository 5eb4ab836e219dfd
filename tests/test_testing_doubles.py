"""
The test doubles of L{hestia.testing} are a product: their own behaviour is tested here.

L{MemoryGateway} (the gateway in memory behind a StubTreq client) and the
upstream doubles (agents that refuse, stall, truncate or reset), alone and
through the gateway.
"""

from __future__ import annotations

from typing import Any

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, TimeoutError
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import IAgent, IResponse
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface.verify import verifyObject

from hestia.testing import (
    FlakyAgent,
    MemoryGateway,
    MemoryHestia,
    RecordingBackend,
    RefusingAgent,
    ResettingAgent,
    StallingAgent,
    TruncatedResponse,
    TruncatingAgent,
    statuses,
)

pytestmark = pytest.mark.unit


class Body(Resource):
    """Answers every request with C{body}."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render(self, request: Request) -> bytes:
        return self.body


def outcome(deferred: Deferred[Any]) -> list[Any]:
    seen: list[Any] = []
    deferred.addBoth(seen.append)
    return seen


class Collected(Protocol):
    """A body's bytes and how it ended."""

    def __init__(self) -> None:
        self.data = b""
        self.end: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.end = reason


def traversal(body: bytes = b"0123456789") -> RequestTraversalAgent:
    return RequestTraversalAgent(Body(body))


# -- MemoryGateway -------------------------------------------------------------------


def test_the_docstring_example_runs() -> None:
    memory = MemoryGateway({"svc": {"url": "http://backend:1", "command": ["serve"]}})
    answer = memory.get("/services/svc/hello")
    memory.start("svc")
    response = memory.result(answer)
    assert response.code == 200 and memory.json(response)["uri"] == "/hello"
    assert memory.status("svc")["state"] == "ready"


def test_the_upstream_docstring_example_runs() -> None:
    memory = MemoryGateway({"web": {"url": "http://backend:8000", "response_timeout": 5}},
                           agent=lambda inner: StallingAgent(inner, times=1))
    answer = memory.get("/services/web/")
    memory.advance(5)
    assert memory.result(answer).code == 504
    assert memory.agent.cancelled == 1
    assert memory.result(memory.get("/services/web/")).code == 200


def test_the_default_services_are_two_static_ones_answered_by_a_recording_backend() -> None:
    memory = MemoryGateway()
    assert {name: fake.has_lifecycle for name, fake in memory.fakes.items()} == {"echo": False, "other": False}
    response = memory.result(memory.request("POST", "/services/other/p?status=201", data=b"hi"))
    assert response.code == 201 and response.headers.getRawHeaders("x-from-backend") == ["1"]
    assert memory.json(response) == {"uri": "/p?status=201", "body": "hi"}
    assert isinstance(memory.backend, RecordingBackend) and memory.backend.bodies == [b"hi"]
    [record] = memory.records
    assert (record.service, record.status, record.method) == ("other", 201, "POST")


def test_instances_are_named_after_their_service_and_metrics_are_kept_when_asked() -> None:
    memory = MemoryGateway({"pool": {"instances": [{"url": "http://a:1", "command": "a"},
                                                   {"url": "http://b:2", "command": "b"}]}}, metrics=True)
    assert sorted(memory.fakes) == ["pool.0", "pool.1"]
    assert memory.result(memory.get("/v1/metrics")).code == 200
    assert memory.metric("hestia_requests_total", service="pool", method="GET", code="200") == 0


def test_result_raises_the_failure_and_failure_returns_it() -> None:
    memory = MemoryGateway()
    failed: Deferred[None] = Deferred()
    failed.errback(ValueError("broken"))
    with pytest.raises(ValueError, match="broken"):
        memory.result(failed)
    again: Deferred[None] = Deferred()
    again.errback(ValueError("broken"))
    assert memory.failure(again).check(ValueError)
    with pytest.raises(AssertionError, match="no result yet"):
        memory.result(Deferred())


def test_the_agent_wrapper_gets_the_in_memory_agent() -> None:
    wrapped: list[IAgent] = []

    def wrap(inner: IAgent) -> IAgent:
        wrapped.append(inner)
        return RefusingAgent(inner, times=0)

    memory = MemoryGateway({"web": {"url": "http://backend:8000"}}, agent=wrap)
    assert wrapped == [memory.traversal] and isinstance(memory.agent, RefusingAgent)
    assert memory.result(memory.get("/services/web/")).code == 200
    assert memory.agent.asked == [b"http://backend:8000/"]


def test_memory_hestia_is_built_on_a_memory_gateway() -> None:
    hestia = MemoryHestia()
    assert hestia.reactor is hestia.memory.reactor and hestia.fakes is hestia.memory.fakes
    assert hestia.gateway is hestia.memory.gateway
    client = hestia.request(b"GET /services/echo/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert statuses(client.received()) == [200]


# -- the upstream doubles, alone ---------------------------------------------------------


@pytest.mark.parametrize("double", [
    RefusingAgent(), FlakyAgent(traversal(), []), StallingAgent(), ResettingAgent(),
    TruncatingAgent(traversal(), after=1),
], ids=lambda double: type(double).__name__)
def test_every_upstream_double_is_an_agent(double: IAgent) -> None:
    assert verifyObject(IAgent, double)


def test_a_refusing_agent_refuses_times_then_passes_on() -> None:
    inner = traversal()
    agent = RefusingAgent(inner, times=2)
    first, second = outcome(agent.request(b"GET", b"http://x/")), outcome(agent.request(b"GET", b"http://x/"))
    assert first[0].check(ConnectionRefusedError) and second[0].check(ConnectionRefusedError)
    third = outcome(agent.request(b"GET", b"http://x/"))
    inner.flush()
    assert IResponse.providedBy(third[0]) and third[0].code == 200
    assert agent.spoiled == 2 and len(agent.asked) == 3


def test_a_refusing_agent_without_an_inner_one_refuses_forever_and_only_where_told() -> None:
    always = RefusingAgent()
    assert all(outcome(always.request(b"GET", b"http://x/"))[0].check(ConnectionRefusedError) for _ in range(5))
    with pytest.raises(ValueError, match="inner agent"):
        RefusingAgent(times=1)
    inner = StallingAgent()
    some = RefusingAgent(inner, only=["http://first:1"], error=lambda: TimeoutError("dropped"))
    assert outcome(some.request(b"GET", b"http://first:1/x"))[0].check(TimeoutError)
    assert outcome(some.request(b"GET", b"http://second:2/x")) == []
    assert inner.asked == [b"http://second:2/x"]


def test_a_flaky_agent_fails_with_each_error_once_in_order() -> None:
    inner = StallingAgent()
    agent = FlakyAgent(inner, [lambda: TimeoutError("a"), lambda: ConnectionRefusedError("b")])
    results = [outcome(agent.request(b"GET", b"http://x/")) for _ in range(3)]
    assert results[0][0].check(TimeoutError) and results[1][0].check(ConnectionRefusedError)
    assert results[2] == [] and agent.attempts == 3 and len(inner.sent) == 1


def test_a_stalled_request_fires_only_when_cancelled() -> None:
    agent = StallingAgent(traversal(), times=1)
    stalled = outcome(agent.request(b"GET", b"http://x/"))
    assert stalled == [] and agent.pending == 1
    agent.sent[0].cancel()
    assert stalled[0].check(CancelledError) and agent.cancelled == 1 and agent.pending == 0
    assert agent.request(b"GET", b"http://x/") is not None and len(agent.sent) == 1  # the second passes on


def test_a_reset_is_a_response_never_received() -> None:
    [failure] = outcome(ResettingAgent().request(b"GET", b"http://x/"))
    assert failure.check(ResponseNeverReceived)
    assert failure.value.reasons[0].check(ConnectionLost)


def test_a_truncated_body_has_the_head_and_the_first_bytes_then_fails() -> None:
    inner = traversal(b"0123456789")
    agent = TruncatingAgent(inner, after=4)
    answer = outcome(agent.request(b"GET", b"http://x/"))
    inner.flush()
    [response] = answer
    assert isinstance(response, TruncatedResponse) and response.code == 200
    body = Collected()
    response.deliverBody(body)
    inner.flush()
    assert body.data == b"0123"
    assert body.end is not None and body.end.check(ResponseFailed)
    assert agent.cut == [b"0123"]


def test_a_truncation_may_end_as_potential_data_loss_and_a_short_body_ends_as_it_did() -> None:
    inner = traversal(b"0123456789")
    lossy = TruncatingAgent(inner, after=2, error=lambda after: PotentialDataLoss())
    cut = Collected()
    lossy.request(b"GET", b"http://x/").addCallback(lambda response: response.deliverBody(cut))
    inner.flush()
    inner.flush()
    assert cut.data == b"01" and cut.end is not None and cut.end.check(PotentialDataLoss)
    short = TruncatingAgent(inner, after=100)
    whole = Collected()
    short.request(b"GET", b"http://x/").addCallback(lambda response: response.deliverBody(whole))
    inner.flush()
    inner.flush()
    assert whole.data == b"0123456789" and whole.end is not None and whole.end.check(ResponseDone)
