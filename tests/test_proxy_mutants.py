"""
The proxy's exchange in memory (StubTreq in front, a Resource or a failing agent behind, a
MemoryReactorClock): the rules mutation testing (issue 21) found unpinned.  Error answers,
response headers, an upstream that cannot be reached or breaks off, the 404s of the tree.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_proxy import echoing
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, TimeoutError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from hestia.auth import AuthConfig, Authenticator
from hestia.errors import QueueFull, StartFailed
from hestia.proxy import ServiceProxyResource, write_error
from hestia.testing import MemoryGateway, RefusingAgent, StallingAgent

pytestmark = pytest.mark.unit


def dummy() -> DummyRequest:
    """A DummyRequest with the attributes of a real Request that write_error reads."""
    request = DummyRequest([b""])
    request.startedWriting = False
    return request


def after_retries(harness: MemoryGateway, deferred: Deferred[Any]) -> Any:
    """The answer once the proxy has given up its connect retries (hestia.admission's rule)."""
    box: list[Any] = []
    deferred.addBoth(box.append)
    for _ in range(1200):
        harness.settle()
        if box:
            return box[0]
        harness.reactor.advance(0.5)
    raise AssertionError("no answer after 10 minutes of retries")


# -- write_error -------------------------------------------------------------------------


def test_write_error_is_json_with_retry_after_and_the_request_id() -> None:
    request = dummy()
    request.responseHeaders.setRawHeaders(b"server", [b"TwistedWeb"])
    write_error(request, QueueFull("queue full", service="app", state="starting", retry_after=2.4), b"rid-7")
    data = b"".join(request.written)
    assert request.responseCode == 503 and request.finished
    assert json.loads(data)["error"] == "queue full" and json.loads(data)["service"] == "app"
    headers = request.responseHeaders
    assert headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert headers.getRawHeaders(b"content-length") == [str(len(data)).encode()]
    assert headers.getRawHeaders(b"retry-after") == [b"2"]
    assert headers.getRawHeaders(b"x-request-id") == [b"rid-7"]
    assert not headers.hasHeader(b"server")


def test_write_error_retry_after_is_at_least_one_second_and_absent_without_one() -> None:
    soon = dummy()
    write_error(soon, QueueFull("full", retry_after=0.3))
    assert soon.responseHeaders.getRawHeaders(b"retry-after") == [b"1"]
    assert not soon.responseHeaders.hasHeader(b"x-request-id")
    plain = dummy()
    write_error(plain, StartFailed("boom"))
    assert plain.responseCode == 502 and not plain.responseHeaders.hasHeader(b"retry-after")


def test_write_error_after_the_headers_went_out_cuts_the_connection() -> None:
    request = dummy()
    cut: list[bool] = []
    request.loseConnection = lambda: cut.append(True)  # type: ignore[method-assign]
    request.startedWriting = True
    write_error(request, StartFailed("boom"))
    assert cut == [True] and request.written == [] and not request.finished


def test_write_error_to_a_finished_or_gone_request_does_nothing() -> None:
    finished = dummy()
    finished.finished = True
    write_error(finished, StartFailed("boom"))
    assert finished.written == [] and finished.responseCode is None
    gone = dummy()
    gone._disconnected = True
    write_error(gone, StartFailed("boom"))
    assert gone.written == [] and gone.responseCode is None


# -- through the gateway ------------------------------------------------------------------


def failing(error: Exception) -> RefusingAgent:
    """An agent whose every request fails with C{error}."""
    return RefusingAgent(error=lambda: error)


class Scripted(Resource):
    """A backend whose response headers the test chooses."""

    isLeaf = True

    def __init__(self, headers: list[tuple[bytes, list[bytes]]], code: int = 200) -> None:
        super().__init__()
        self.headers = headers
        self.code = code

    def render(self, request: Any) -> bytes:
        request.setResponseCode(self.code)
        for name, values in self.headers:
            request.responseHeaders.setRawHeaders(name, values)
        return b"body"


def harness_with(backend: Resource) -> MemoryGateway:
    return MemoryGateway({"web": {"url": "http://backend:8000/base"}}, backend=backend)


def test_response_headers_keep_the_backends_own_and_drop_hop_by_hop_ones() -> None:
    # (Headers named in the backend's Connection reach the exchange through the gateway's own
    # HTTP client, which the test agent is not: test_client_headers.py covers that rule.)
    harness = harness_with(Scripted([
        (b"keep-alive", [b"timeout=5"]),
        (b"x-private", [b"secret"]),
        (b"x-public", [b"ok"]),
        (b"server", [b"backend/1.0"]),
    ], code=201))
    response = harness.result(harness.request("GET", "/services/web/x", headers={"X-Request-ID": "r-1"}))
    assert response.code == 201
    headers = response.headers
    assert not headers.hasHeader("keep-alive")
    assert headers.getRawHeaders("x-public") == ["ok"] and headers.getRawHeaders("x-private") == ["secret"]
    assert headers.getRawHeaders("server") == ["backend/1.0"]  # the backend's, not Twisted's
    assert headers.getRawHeaders("x-request-id") == ["r-1"]
    assert harness.result(response.content()) == b"body"


def test_the_backend_sees_the_path_under_its_base_url() -> None:
    seen: list[bytes] = []

    class Recorder(Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            seen.append(request.uri)
            return b""

    harness = harness_with(Recorder())
    harness.result(harness.request("GET", "/services/web/a/b?c=1"))
    assert seen == [b"/base/a/b?c=1"]



@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ConnectionRefusedError(), "backend unreachable: connection refused"),
        (TimeoutError(), "backend unreachable: connect timed out"),
        (ResponseFailed([Failure(ConnectionRefusedError())]), "backend unreachable: connection refused"),
        (ValueError("weird"), "backend unreachable: weird"),
        (ResponseFailed([Failure(ValueError("first")), Failure(ValueError("then"))]),
         "backend unreachable: first; then"),
    ],
)
def test_an_unreachable_backend_is_a_json_502_naming_why(error: Exception, reason: str) -> None:
    harness = echoing({"web": {"url": "http://backend:8000"}}, agent=lambda inner: failing(error))
    response = after_retries(harness, harness.request("GET", "/services/web/x", headers={"X-Request-ID": "r-2"}))
    assert response.code == 502
    body = harness.json(response)
    assert body["error"] == reason and body["service"] == "web" and body["state"] == "ready"
    assert response.headers.getRawHeaders("x-request-id") == ["r-2"]


def test_unknown_paths_are_json_404s_that_name_what_is_served() -> None:
    harness = echoing({"web": {"url": "http://backend:8000"}})
    for path, words in (("/", "Hestia serves /services/<name>/ and /v1/"),
                        ("/other/x", "Hestia serves /services/<name>/ and /v1/"),
                        ("/services", "no service named in the path"),
                        ("/services/nope/x", "no such service")):
        response = harness.result(harness.request("GET", path, headers={"X-Request-ID": "r-3"}))
        assert response.code == 404, path
        body = harness.json(response)
        assert words in body["error"], path
    response = harness.result(harness.request("GET", "/services/nope/x", headers={"X-Request-ID": "r-4"}))
    assert response.headers.getRawHeaders("x-request-id") == ["r-4"]
    assert harness.json(response)["service"] == "nope"


def test_a_request_for_another_service_through_a_proxy_resource_is_refused() -> None:
    harness = echoing({"web": {"url": "http://backend:8000"}, "api": {"url": "http://backend:8001"}})
    resource = ServiceProxyResource(harness.gateway, "web", OPEN)
    request = dummy()
    request.uri = b"/services/api/x"
    request.method = b"GET"
    assert resource.render(request) is NOT_DONE_YET
    assert request.responseCode == 404
    assert json.loads(b"".join(request.written))["service"] == "web"


def test_the_access_record_of_an_exchange() -> None:
    harness = echoing({"web": {"url": "http://backend:8000"}})
    records: list[Any] = []
    harness.gateway.request_observers.append(records.append)  # observers receive each RequestRecord
    response = harness.result(harness.request("POST", "/services/web/p?q=1", data=b"12345",
                                              headers={"X-Request-ID": "rec-1"}))
    harness.result(response.content())
    harness.settle()
    [record] = records
    assert (record.request_id, record.service, record.method, record.path) == (
        "rec-1", "web", "POST", "/services/web/p?q=1")
    assert record.status == 200 and record.bytes > 0 and record.leased and record.error is None


# -- found by the second mutation run -------------------------------------------------------



def failover_harness(refuse: set[bytes]) -> tuple[MemoryGateway, RefusingAgent]:
    harness = echoing({"pool": {"strategy": "failover",
                                "instances": [{"url": "http://first:1"}, {"url": "http://second:2"}]}},
                      agent=lambda inner: RefusingAgent(inner, only=refuse))
    assert isinstance(harness.agent, RefusingAgent)
    return harness, harness.agent


def test_a_refused_connection_fails_over_to_the_next_instance() -> None:
    harness, agent = failover_harness({b"http://first:1"})
    response = harness.result(harness.request("GET", "/services/pool/x"))
    assert response.code == 200
    assert agent.asked == [b"http://first:1/x", b"http://second:2/x"]
    assert harness.json(response)["uri"] == "/x"


def test_when_every_instance_refuses_the_client_gets_a_502() -> None:
    harness, agent = failover_harness({b"http://first:1", b"http://second:2"})
    response = after_retries(harness, harness.request("GET", "/services/pool/x"))
    assert response.code == 502
    assert harness.json(response)["error"] == "backend unreachable: connection refused"
    assert {url for url in agent.asked} == {b"http://first:1/x", b"http://second:2/x"}


def test_an_unreachable_backends_error_carries_its_last_20_lines() -> None:
    harness = echoing({"web": {"url": "http://backend:8000"}}, agent=lambda inner: failing(ConnectionRefusedError()))
    harness.fakes["web"].output = [f"line {number}" for number in range(25)]
    body = harness.json(after_retries(harness, harness.request("GET", "/services/web/x")))
    assert body["detail"] == [f"line {number}" for number in range(5, 25)]


def test_an_absolute_form_target_to_a_host_routed_service_is_400() -> None:
    harness = echoing({"web": {"url": "http://backend:8000", "hosts": ["web.example"]}})
    resource = ServiceProxyResource(harness.gateway, "web", OPEN, host_routed=True)
    request = dummy()
    request.uri = b"http://evil.example/x"
    request.method = b"GET"
    assert resource.render(request) is NOT_DONE_YET
    assert request.responseCode == 400
    assert json.loads(b"".join(request.written))["error"] == "expected an origin-form request target"


def test_a_service_name_that_is_not_ascii_is_a_404_naming_it_readably() -> None:
    harness = echoing({"web": {"url": "http://backend:8000"}})
    response = harness.result(harness.request("GET", "/services/%C3%A9t%C3%A9/x"))
    assert response.code == 404
    assert harness.json(response)["service"] == "\ufffd\ufffdt\ufffd\ufffd"


def test_a_client_leaving_while_queued_gives_up_its_place() -> None:
    harness = echoing({"svc": {"url": "http://backend:8000", "command": "serve"}})
    waiting = harness.request("GET", "/services/svc/x")
    harness.settle()
    lifecycle = harness.gateway.route("svc")
    assert len(lifecycle.queue) == 1
    waiting.addErrback(lambda _: None)
    waiting.cancel()
    harness.settle()
    assert len(lifecycle.queue) == 0


def test_when_the_fallback_instance_fails_to_start_the_client_gets_its_error() -> None:
    harness = echoing({"pool": {"strategy": "failover", "instances": [
        {"url": "http://first:1", "command": "a"}, {"url": "http://second:2", "command": "b"}]}},
        agent=lambda inner: RefusingAgent(inner, only={b"http://first:1"}))
    answer = harness.request("GET", "/services/pool/x")
    harness.settle()
    first = harness.fakes["pool.0"]
    first.finish_start()
    harness.reactor.advance(0.01)
    first.answer_probe(True)
    harness.settle()  # first is ready but refuses: the request moves on to second, which starts
    harness.fakes["pool.1"].starts[-1].errback(StartFailed("no GPU"))
    response = harness.result(answer)
    assert response.code == 502 and harness.json(response)["error"] == "no GPU"


class FakeResponse:
    """An IResponse whose body the test scripts: some bytes, then the end it is given."""

    code, phrase, length = 200, b"OK", UNKNOWN_LENGTH

    def __init__(self, end: Failure) -> None:
        self.headers = Headers({b"content-type": [b"text/plain"]})
        self.end = end
        self.protocols: list[Any] = []

    def deliverBody(self, protocol: Any) -> None:  # noqa: N802 -- Twisted's name
        self.protocols.append(protocol)
        if protocol is None:
            return
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"part")
        protocol.connectionLost(self.end)



def recording(harness: MemoryGateway) -> list[Any]:
    records: list[Any] = []
    harness.gateway.request_observers.append(records.append)  # observers receive each RequestRecord
    return records


def test_a_backend_breaking_off_mid_body_cuts_the_client_and_is_recorded() -> None:
    agent = StallingAgent()
    harness = echoing({"web": {"url": "http://backend:8000"}}, agent=lambda inner: agent)
    records = recording(harness)
    answer = harness.request("GET", "/services/web/x")
    harness.settle()
    agent.sent[0].callback(FakeResponse(Failure(ResponseFailed([Failure(ConnectionLost("reset"))]))))
    harness.settle()
    response = harness.result(answer)
    assert response.code == 200
    body = outcome_of(harness, response.content())
    assert isinstance(body, Failure)  # the client sees a cut connection, not a whole body
    [record] = records
    assert record.error_kind == "truncated" and record.error.startswith("backend broke off the response: ")
    assert record.bytes == 4


def test_a_client_leaving_during_the_backend_request_cancels_it() -> None:
    agent = StallingAgent()
    harness = echoing({"web": {"url": "http://backend:8000"}}, agent=lambda inner: agent)
    records = recording(harness)
    answer = harness.request("GET", "/services/web/x")
    harness.settle()
    answer.addErrback(lambda _: None)
    answer.cancel()
    harness.settle()
    assert agent.sent[0].called  # the exchange cancelled its backend request
    [record] = records
    assert record.error_kind == "client_gone" and record.error == "client went away"


def outcome_of(harness: MemoryGateway, deferred: Deferred[Any]) -> Any:
    harness.settle()
    box: list[Any] = []
    deferred.addBoth(box.append)
    return box[0] if box else None


def test_a_unix_socket_client_is_recorded_and_forwarded_as_unix() -> None:
    agent = StallingAgent()
    harness = echoing({"web": {"url": "http://backend:8000"}}, agent=lambda inner: agent)
    sent: list[Any] = []
    agent.request = lambda method, url, headers, body: sent.append(headers) or Deferred()  # type: ignore[method-assign]
    request = dummy()
    request.uri, request.method = b"/services/web/x", b"GET"
    request.client = UNIXAddress(b"/run/hestia.sock")
    request.getClientAddress = lambda: request.client  # type: ignore[method-assign]
    request.isSecure = lambda: False  # type: ignore[method-assign]
    ServiceProxyResource(harness.gateway, "web", OPEN).render(request)
    harness.settle()
    assert sent and sent[0].getRawHeaders(b"x-forwarded-for") == [b"unix"]


# -- second round (issue 21): a monitor's request, the request id on a 504 --------------------------


def test_a_monitor_of_a_ready_service_is_proxied_with_the_prefix_and_its_request_id() -> None:
    harness = echoing({"web": {"url": "http://backend:8000", "passive": {"paths": ["/healthz"]}}})
    response = harness.result(harness.request("GET", "/services/web/healthz", headers={"X-Request-ID": "req-7"}))
    assert response.code == 200
    echoed = harness.json(response)
    headers = {name.lower(): values for name, values in echoed["headers"]}
    assert echoed["uri"] == "/healthz"
    assert headers["x-forwarded-prefix"] == ["/services/web"] and headers["x-request-id"] == ["req-7"]
    assert response.headers.getRawHeaders("x-request-id") == ["req-7"]


def test_a_monitor_of_a_stopped_service_is_answered_without_starting_it() -> None:
    harness = echoing({"app": {"url": "http://backend:8000", "command": ["serve"], "passive": {"paths": ["/healthz"]}}})
    response = harness.result(harness.request("GET", "/services/app/healthz"))
    assert harness.fakes["app"].starts == []
    assert response.code == 200 and response.headers.getRawHeaders("x-hestia-state") == ["stopped"]
    assert harness.json(response) == {"service": "app", "state": "stopped"}


def test_a_response_timeout_504_carries_the_clients_request_id() -> None:
    from test_admission import holding

    harness = holding({"url": "http://127.0.0.1:9", "response_timeout": 5}, agent=lambda traversal: StallingAgent())
    hung = harness.get("/services/svc/hung", headers={"X-Request-ID": "req-504"})
    harness.settle()
    harness.reactor.advance(5)
    response = harness.result(hung)
    assert response.code == 504 and response.headers.getRawHeaders("x-request-id") == ["req-504"]


def _streaming_body(response_idle_timeout: float) -> tuple[Any, Any, list[Any]]:
    """A GET whose backend sent b"first" and then holds the body open; the body's outcome is collected."""
    from test_admission import holding

    harness = holding({"url": "http://127.0.0.1:9", "response_idle_timeout": response_idle_timeout})
    answer = harness.get("/services/svc/stream")
    harness.settle()
    [held] = harness.backend.held
    held.write(b"first")
    response = harness.result(answer)
    body: list[Any] = []
    response.content().addBoth(body.append)
    harness.settle()
    return harness, held, body


def test_a_silent_response_body_is_cut_exactly_at_response_idle_timeout() -> None:
    harness, held, body = _streaming_body(response_idle_timeout=4)
    harness.reactor.advance(4)  # exactly the timeout since the last byte (whole seconds: no rounding)
    harness.settle()
    assert len(body) == 1 and isinstance(body[0], Failure)
    body[0].trap(Exception)


def test_a_services_output_in_an_error_is_shown_only_where_auth_allows_it() -> None:
    from test_auth_mutants import ADMIN, auth_config
    from twisted.internet.task import Clock

    from hestia.auth import Authenticator

    failed = StartFailed("exit status 1", detail=["token=abc"])
    guarding = Authenticator(auth_config(), Clock().seconds)

    def error_seen_by(authenticator: Authenticator, **headers: str) -> dict[str, Any]:
        request = dummy()
        for name, value in headers.items():
            request.requestHeaders.setRawHeaders(name.encode(), [value.encode()])
        authenticator.check_service(request, "web")
        write_error(request, failed)
        return json.loads(b"".join(request.written))  # type: ignore[no-any-return]

    assert error_seen_by(OPEN)["detail"] == ["token=abc"]  # auth off
    assert error_seen_by(guarding, authorization=f"Bearer {ADMIN}")["detail"] == ["token=abc"]
    refused = error_seen_by(guarding)  # auth on, no admin token
    assert "detail" not in refused and refused["error"] == "exit status 1"
    unchecked = dummy()  # an error written before the authenticator looked shows no output either
    write_error(unchecked, failed)
    assert "detail" not in json.loads(b"".join(unchecked.written))


def test_a_request_with_a_body_and_no_token_is_refused_from_its_head_before_100_continue() -> None:
    from test_auth_mutants import auth_config
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock

    from hestia.auth import Authenticator
    from hestia.guard import GuardedSite, Limits
    from hestia.proxy import GatewayRoot

    harness = echoing({"app": {"url": "http://backend:8000"}})
    site = GuardedSite(GatewayRoot(harness.gateway, Resource(), Authenticator(auth_config(), Clock().seconds)), Limits())
    protocol = site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 5000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5000))
    protocol.makeConnection(transport)
    protocol.dataReceived(b"POST /services/app/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n"
                          b"Expect: 100-continue\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ") and b"100 Continue" not in head
    assert json.loads(body)["service"] == "app"
    protocol.connectionLost(Failure(ConnectionLost()))


def test_a_refusal_wrapped_in_response_failed_is_retried_only_briefly() -> None:
    harness = echoing({"web": {"url": "http://backend:8000", "queue_timeout": 30}}, agent=lambda inner: failing(ResponseFailed([Failure(ConnectionRefusedError())])))
    answer: list[Any] = []
    harness.request("GET", "/services/web/x").addBoth(answer.append)
    began = harness.reactor.seconds()
    while not answer and harness.reactor.seconds() - began < 60:
        harness.settle()
        harness.reactor.advance(0.05)
    assert answer and answer[0].code == 502
    assert harness.reactor.seconds() - began < 3  # refused_for (1 s), not the 30 s of queue_timeout


def test_a_request_to_a_service_removed_by_a_reload_meanwhile_is_a_json_404() -> None:
    from hestia.loader import parse_config

    harness = echoing({"web": {"url": "http://backend:8000"}, "other": {"url": "http://backend:8001"}})
    resource = ServiceProxyResource(harness.gateway, "web", OPEN)  # found before the reload removed it
    harness.gateway.apply(parse_config({"services": {"other": {"url": "http://backend:8001"}}}, "t.yml", {}))
    harness.settle()
    request = dummy()
    request.uri, request.method = b"/services/web/x", b"GET"
    request.requestHeaders.setRawHeaders(b"x-request-id", [b"req-gone"])
    assert resource.render(request) is NOT_DONE_YET
    assert request.responseCode == 404
    assert json.loads(b"".join(request.written)) == {"error": "no such service", "service": "web"}
    assert request.responseHeaders.getRawHeaders(b"x-request-id") == [b"req-gone"]


def test_a_connect_failure_wrapped_in_response_never_received_is_retried_then_502() -> None:
    agent = failing(ResponseNeverReceived([Failure(ConnectionRefusedError())]))
    harness = echoing({"web": {"url": "http://backend:8000", "queue_timeout": 30}}, agent=lambda inner: agent)
    response = after_retries(harness, harness.request("GET", "/services/web/x"))
    assert response.code == 502
    assert harness.json(response)["error"] == "backend unreachable: connection refused"
    assert agent.spoiled > 1  # the request never reached the backend: trying again is safe


# -- loading events (an early-opened stream) ------------------------------------------------


def loading_harness(**options: Any) -> MemoryGateway:
    return echoing({
        "ai": {"route_by": "model", "loading_events": True},
        "qwen": {"url": "http://qwen:1", "command": ["qwen"], "models": ["qwen2.5:7b"]},
    }, **options)


# Authentication off: every request may reach the service (hestia.auth).
OPEN = Authenticator(AuthConfig(), lambda: 0.0)
STREAM = b'{"model": "qwen2.5:7b", "stream": true}'


def test_a_held_stream_gets_its_headers_and_keep_alives_then_the_backends_body() -> None:
    harness = loading_harness()
    response = harness.result(harness.request("POST", "/services/ai/v1/chat/completions", data=STREAM))
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    assert response.headers.getRawHeaders("cache-control") == ["no-cache"]
    assert response.headers.getRawHeaders("x-hestia-state") == ["starting"]
    assert not response.headers.hasHeader("server")
    chunks: list[bytes] = []
    done = response.collect(chunks.append)
    harness.settle()
    assert b"".join(chunks) == b": hestia: the model is loading\n\n"
    harness.reactor.advance(1.9)
    harness.settle()
    assert b"".join(chunks) == b": hestia: the model is loading\n\n"
    harness.reactor.advance(0.1)
    harness.settle()
    assert b"".join(chunks).endswith(b": hestia: still loading\n\n")
    fake = harness.fakes["qwen"]
    fake.finish_start()
    harness.reactor.advance(0.01)
    harness.settle()
    fake.answer_probe(True)
    harness.settle()
    harness.result(done)
    body = b"".join(chunks)
    assert body.count(b"still loading") == 1
    echoed = json.loads(body.split(b"\n\n")[-1])
    assert echoed["uri"] == "/v1/chat/completions" and json.loads(echoed["body"])["stream"] is True
    harness.reactor.advance(10)
    harness.settle()
    assert body == b"".join(chunks)  # no keep-alive after the stream ended


def test_a_failed_start_ends_a_held_stream_with_an_openai_error_event() -> None:
    harness = loading_harness()
    response = harness.result(harness.request("POST", "/services/ai/v1/chat/completions", data=STREAM))
    chunks: list[bytes] = []
    done = response.collect(chunks.append)
    harness.fakes["qwen"].starts[-1].errback(RuntimeError("no GPU"))
    harness.settle()
    harness.result(done)
    last = b"".join(chunks).split(b"\n\n")[-2]
    assert last.startswith(b"data: ")
    error = json.loads(last[len(b"data: "):])["error"]
    assert error["type"] == "server_error" and error["param"] is None and error["code"] == "StartFailed"
    assert error["message"].startswith("qwen: ")


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/chat/completions", b'{"model": "qwen2.5:7b"}'),   # not streaming
    ("POST", "/v1/embeddings", STREAM),                             # not a completion
    ("PUT", "/v1/chat/completions", STREAM),                        # not a POST
])
def test_only_a_streaming_completion_post_gets_an_early_stream(method: str, path: str, body: bytes) -> None:
    harness = loading_harness()
    pending = harness.request(method, "/services/ai" + path, data=body)
    harness.settle()
    box: list[Any] = []
    pending.addBoth(box.append)
    assert box == []  # no headers before the model is up
    assert len(harness.fakes["qwen"].starts) == 1


def test_a_plain_http_request_is_forwarded_as_http_and_recorded_with_its_duration() -> None:
    harness = echoing({"web": {"url": "http://backend:8000"}})
    harness.reactor.advance(500)
    records: list[Any] = []
    harness.gateway.request_observers.append(records.append)  # observers receive each RequestRecord
    response = harness.result(harness.request("GET", "/services/web/p"))
    echoed = harness.json(response)
    headers = {name.lower(): values for name, values in echoed["headers"]}
    assert headers["x-forwarded-proto"] == ["http"]
    harness.settle()
    [record] = records
    assert record.duration == 0.0


def test_a_request_for_another_service_is_refused_from_its_head_saying_why() -> None:
    harness = echoing({"web": {"url": "http://backend:8000"}, "api": {"url": "http://backend:8001"}})
    resource = ServiceProxyResource(harness.gateway, "web", OPEN)
    request = dummy()
    request.uri, request.method = b"/services/api/x", b"POST"
    denied = resource.check_head(request)
    assert (denied.status, denied.reason, denied.service) == (404, "no such service", "web")
    resource.render(request)
    assert json.loads(b"".join(request.written))["error"] == "no such service"


# -- issue 21, seed 11 survivors: connect failures wrapped, logs, the phrase, a client gone mid-body ----


@pytest.mark.parametrize("wrapper", [ResponseNeverReceived, ResponseFailed])
def test_a_connect_failure_wrapped_either_way_is_retried_and_recorded_as_a_connect_failure(wrapper: Any) -> None:
    agent = failing(wrapper([Failure(TimeoutError())]))
    harness = echoing({"web": {"url": "http://backend:8000", "queue_timeout": 30}}, agent=lambda inner: agent)
    records = recording(harness)
    response = after_retries(harness, harness.request("GET", "/services/web/x"))
    assert response.code == 502
    assert harness.json(response)["error"] == "backend unreachable: connect timed out"
    assert agent.spoiled > 1
    harness.settle()
    [record] = records
    assert record.error_kind == "connect" and record.connect_retries == agent.spoiled - 1


def test_a_reply_that_broke_off_is_not_retried_and_is_recorded_as_upstream() -> None:
    agent = failing(ResponseFailed([Failure(ConnectionLost("reset"))]))
    harness = echoing({"web": {"url": "http://backend:8000", "queue_timeout": 30}}, agent=lambda inner: agent)
    records = recording(harness)
    response = after_retries(harness, harness.request("POST", "/services/web/x", data=b"once"))
    assert response.code == 502 and agent.spoiled == 1
    harness.settle()
    assert [record.error_kind for record in records] == ["upstream"]


def test_failing_over_is_logged_with_the_service_and_the_refusing_url() -> None:
    from twisted.logger import capturedLogs, formatEvent

    harness, _ = failover_harness({b"http://first:1"})
    with capturedLogs() as captured:
        response = harness.result(harness.request("GET", "/services/pool/x"))
    assert response.code == 200
    assert "pool: http://first:1 refused the connection, trying the next instance" in [
        formatEvent(event) for event in captured]


def test_a_cut_silent_body_is_logged_with_the_method_and_path() -> None:
    from test_admission import holding
    from twisted.logger import capturedLogs, formatEvent

    harness = holding({"url": "http://127.0.0.1:9", "response_idle_timeout": 4})
    answer = harness.get("/services/svc/stream")
    harness.settle()
    [held] = harness.backend.held
    held.write(b"first")
    response = harness.result(answer)
    response.content().addErrback(lambda _: None)
    harness.settle()
    with capturedLogs() as captured:
        harness.reactor.advance(4)
        harness.settle()
    lines = [formatEvent(event) for event in captured]
    assert "svc: response body to GET /services/svc/stream silent for 4.0s: cut" in lines


def test_a_zero_response_idle_timeout_never_cuts_a_slow_body() -> None:
    harness, held, body = _streaming_body(response_idle_timeout=0)
    harness.reactor.advance(3600)
    harness.settle()
    assert body == []
    held.write(b" then")
    held.finish()
    harness.settle()
    assert body == [b"first then"]


def test_the_backends_reason_phrase_reaches_the_client() -> None:
    class Phrased(Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            request.setResponseCode(299, b"Quite Fine")
            return b"ok"

    harness = harness_with(Phrased())
    response = harness.result(harness.request("GET", "/services/web/x"))
    assert response.code == 299 and response.phrase == b"Quite Fine"


def test_the_root_and_unknown_paths_say_exactly_what_is_served() -> None:
    from hestia.proxy import GatewayRoot

    harness = echoing({"web": {"url": "http://backend:8000"}})
    response = harness.result(harness.request("GET", "/elsewhere"))
    assert harness.json(response) == {"error": "not found: Hestia serves /services/<name>/ and /v1/"}
    root = GatewayRoot(harness.gateway, Resource())
    request = dummy()
    request.requestHeaders.setRawHeaders(b"x-request-id", [b"root-1"])
    assert root.render(request) is NOT_DONE_YET
    assert request.responseCode == 404
    assert json.loads(b"".join(request.written))["error"] == "not found: Hestia serves /services/<name>/ and /v1/"
    assert request.responseHeaders.getRawHeaders(b"x-request-id") == [b"root-1"]


def test_a_method_that_is_not_ascii_is_recorded_readably() -> None:
    agent = StallingAgent()
    harness = echoing({"web": {"url": "http://backend:8000"}}, agent=lambda inner: agent)
    records = recording(harness)
    request = dummy()
    request.uri, request.method = b"/services/web/x", b"G\xffT"
    request.isSecure = lambda: False  # type: ignore[method-assign]
    ServiceProxyResource(harness.gateway, "web", OPEN).render(request)
    harness.settle()
    request.processingFailed(Failure(ConnectionLost()))
    harness.settle()
    [record] = records
    assert record.method == "G\ufffdT"


class HeldResponse:
    """An IResponse whose body protocol the test drives by hand."""

    code, phrase, length = 200, b"OK", UNKNOWN_LENGTH

    def __init__(self) -> None:
        self.headers = Headers({b"content-type": [b"text/plain"]})
        self.protocol: Any = None
        self.transport = StringTransport()

    def deliverBody(self, protocol: Any) -> None:  # noqa: N802 -- Twisted's name
        self.protocol = protocol
        protocol.makeConnection(self.transport)


def test_a_client_gone_mid_body_stops_the_backend_and_counts_nothing_more() -> None:
    agent = StallingAgent()
    harness = echoing({"web": {"url": "http://backend:8000"}}, agent=lambda inner: agent)
    records = recording(harness)
    request = dummy()
    request.uri, request.method = b"/services/web/x", b"GET"
    request.isSecure = lambda: False  # type: ignore[method-assign]
    producers: list[Any] = []
    request.registerProducer = lambda producer, streaming: producers.append(producer)  # type: ignore[method-assign]
    request.unregisterProducer = lambda: producers.clear()  # type: ignore[method-assign]
    ServiceProxyResource(harness.gateway, "web", OPEN).render(request)
    harness.settle()
    backend = HeldResponse()
    agent.sent[0].callback(backend)
    backend.protocol.dataReceived(b"part")
    assert request.written == [b"part"]
    request.processingFailed(Failure(ConnectionLost()))
    assert backend.transport.producerState == "stopped"  # the backend connection is dropped
    backend.protocol.dataReceived(b"late")  # what was in flight still arrives
    backend.protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
    harness.settle()
    assert request.written == [b"part"]
    [record] = records
    assert record.bytes == 4
    assert (record.error, record.error_kind) == ("client went away", "client_gone")


def test_an_early_stream_the_backend_refuses_ends_with_its_answer_as_an_error_event() -> None:
    harness = loading_harness(backend=Scripted([(b"content-type", [b"text/plain"])], code=500))
    response = harness.result(harness.request("POST", "/services/ai/v1/chat/completions", data=STREAM))
    chunks: list[bytes] = []
    done = response.collect(chunks.append)
    fake = harness.fakes["qwen"]
    fake.finish_start()
    harness.reactor.advance(0.01)
    harness.settle()
    fake.answer_probe(True)
    harness.settle()
    harness.result(done)
    last = b"".join(chunks).split(b"\n\n")[-2]
    error = json.loads(last[len(b"data: "):])["error"]
    assert error == {"message": "backend answered 500: body", "type": "server_error", "param": None, "code": None}


def test_an_upgrade_the_backend_never_answers_is_a_504_at_response_timeout() -> None:
    from test_request_hardening import UPGRADE

    from hestia.testing import MemoryHestia, statuses

    hestia = MemoryHestia({"echo": {"url": "http://backend:8000", "response_timeout": 5}})
    client = hestia.request(UPGRADE)
    [upgrade] = hestia.upgrades.connections
    hestia.advance(4)
    assert statuses(client.received()) == [] and not upgrade.transport.disconnecting
    hestia.advance(1)
    assert statuses(client.received()) == [504]
    assert upgrade.transport.disconnecting
    assert hestia.gateway.route("echo").in_flight == 0


# -- round G (issue 21): the proxy package's survivors, seeds 23 and 11 --------------------------


class Answer:
    """An IResponse with the headers (and the connection headers) the test chooses, and a body it drives."""

    phrase, length = b"OK", UNKNOWN_LENGTH

    def __init__(self, headers: dict[bytes, list[bytes]], connection: dict[bytes, list[bytes]] | None = None,
                 code: int = 200) -> None:
        self.code = code
        self.headers = Headers(headers)
        if connection is not None:
            self.connection_headers = Headers(connection)
        self.protocol: Any = None
        self.transport = StringTransport()

    def deliverBody(self, protocol: Any) -> None:  # noqa: N802 -- Twisted's name
        self.protocol = protocol
        protocol.makeConnection(self.transport)


def rendered(answer: Answer) -> tuple[DummyRequest, list[Any]]:
    """A GET to web rendered on a DummyRequest, answered by C{answer}: the request and its registered producers."""
    agent = StallingAgent()
    harness = echoing({"web": {"url": "http://backend:8000"}}, agent=lambda inner: agent)
    request = dummy()
    request.uri, request.method = b"/services/web/x", b"GET"
    request.isSecure = lambda: False  # type: ignore[method-assign]
    producers: list[Any] = []
    request.registerProducer = lambda producer, streaming: producers.append(producer)  # type: ignore[method-assign]
    request.unregisterProducer = lambda: producers.clear()  # type: ignore[method-assign]
    ServiceProxyResource(harness.gateway, "web", OPEN).render(request)
    harness.settle()
    agent.sent[0].callback(answer)
    return request, producers


def test_headers_the_backends_connection_header_names_are_dropped() -> None:
    request, _ = rendered(Answer({b"connection": [b"x-private"], b"x-private": [b"secret"], b"x-public": [b"ok"]}))
    headers = request.responseHeaders
    assert not headers.hasHeader(b"x-private") and not headers.hasHeader(b"connection")
    assert headers.getRawHeaders(b"x-public") == [b"ok"]


def test_a_content_length_filed_with_the_connection_headers_reaches_the_client_once() -> None:
    # Hestia's own client (hestia.upstream._ClientProtocol) files Content-Length with them.
    request, _ = rendered(Answer({b"x-public": [b"ok"]}, connection={b"content-length": [b"3", b"4"]}))
    assert request.responseHeaders.getRawHeaders(b"content-length") == [b"4"]


def test_a_client_that_cannot_keep_up_pauses_the_backend_connection() -> None:
    answer = Answer({b"content-type": [b"text/plain"]})
    request, producers = rendered(answer)
    assert producers == [answer.transport]  # the client's channel pauses it when its buffer fills
    producers[0].pauseProducing()
    assert answer.transport.producerState == "paused"


def test_a_tcp_clients_address_is_recorded_and_forwarded() -> None:
    harness = echoing({"web": {"url": "http://backend:8000"}})
    records = recording(harness)
    response = harness.result(harness.request("GET", "/services/web/x"))
    echoed = harness.json(response)
    forwarded = {name.lower(): values for name, values in echoed["headers"]}["x-forwarded-for"]
    harness.settle()
    [record] = records
    assert record.client != "unix" and forwarded == [record.client]


def test_the_record_names_the_token_a_request_came_with() -> None:
    from hestia.testing import ECHO_TOKEN, MemoryHestia, statuses

    hestia = MemoryHestia({"echo": {"url": "http://backend:8000"}}, auth=True)
    client = hestia.request(b"GET /services/echo/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
                            + ECHO_TOKEN.encode() + b"\r\n\r\n")
    hestia.settle()
    assert statuses(client.received()) == [200]
    assert [record.token_name for record in hestia.memory.records] == ["echo"]


def test_a_request_without_a_token_is_a_401_naming_the_service() -> None:
    from hestia.testing import MemoryHestia, statuses

    hestia = MemoryHestia({"echo": {"url": "http://backend:8000"}}, auth=True)
    client = hestia.request(b"GET /services/echo/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    hestia.settle()
    received = client.received()
    assert statuses(received) == [401]
    assert json.loads(received.split(b"\r\n\r\n", 1)[1])["service"] == "echo"


def test_a_response_timeout_is_recorded_and_logged_with_the_service_method_and_path() -> None:
    from test_admission import holding
    from twisted.logger import capturedLogs, formatEvent

    harness = holding({"url": "http://127.0.0.1:9", "response_timeout": 5}, agent=lambda traversal: StallingAgent())
    hung = harness.get("/services/svc/hung")
    harness.settle()
    with capturedLogs() as captured:
        harness.reactor.advance(5)
    assert harness.result(hung).code == 504
    harness.settle()
    [record] = harness.records
    assert (record.status, record.error_kind) == (504, "response_timeout")
    assert "svc: no response within 5.0s to GET /services/svc/hung: answered 504" in [
        formatEvent(event) for event in captured]


def started_stream(harness: MemoryGateway) -> tuple[list[bytes], Deferred[Any]]:
    """A held loading-events stream to qwen, whose start then completes: its chunks and its end."""
    response = harness.result(harness.request("POST", "/services/ai/v1/chat/completions", data=STREAM))
    chunks: list[bytes] = []
    done = response.collect(chunks.append)
    fake = harness.fakes["qwen"]
    fake.finish_start()
    harness.reactor.advance(0.01)
    harness.settle()
    fake.answer_probe(True)
    harness.settle()
    return chunks, done


def last_error_event(chunks: list[bytes]) -> Any:
    last = b"".join(chunks).split(b"\n\n")[-2]
    assert last.startswith(b"data: ")
    return json.loads(last[len(b"data: "):])["error"]


def test_an_early_stream_the_backend_never_answers_ends_with_a_response_timeout_event() -> None:
    harness = echoing({
        "ai": {"route_by": "model", "loading_events": True},
        "qwen": {"url": "http://qwen:1", "command": ["qwen"], "models": ["qwen2.5:7b"], "response_timeout": 5},
    }, agent=lambda inner: StallingAgent())
    chunks, done = started_stream(harness)
    harness.reactor.advance(5)
    harness.settle()
    harness.result(done)
    assert last_error_event(chunks) == {"message": "backend sent no response within response_timeout 5s",
                                        "type": "server_error", "param": None, "code": "ResponseTimedOut"}


class Refusing(Resource):
    """A backend that answers every request with C{code} and C{body}."""

    isLeaf = True

    def __init__(self, code: int, body: bytes) -> None:
        super().__init__()
        self.code, self.body = code, body

    def render(self, request: Any) -> bytes:
        request.setResponseCode(self.code)
        return self.body


def test_an_early_stream_refused_with_an_openai_error_passes_that_error_on() -> None:
    error = {"message": "bad model", "type": "invalid_request_error", "param": "model", "code": "nope"}
    harness = loading_harness(backend=Refusing(400, json.dumps({"error": error}).encode()))
    chunks, done = started_stream(harness)
    harness.result(done)
    assert last_error_event(chunks) == error


def test_an_early_streams_refusal_that_is_not_utf8_is_shown_readably() -> None:
    harness = loading_harness(backend=Refusing(500, b"\xff\xfe bad"))
    chunks, done = started_stream(harness)
    harness.result(done)
    assert last_error_event(chunks)["message"] == "backend answered 500: \ufffd\ufffd bad"


def test_an_early_streams_refusal_whose_body_breaks_off_says_its_status() -> None:
    agent = StallingAgent()
    harness = loading_harness(agent=lambda inner: agent)
    chunks, done = started_stream(harness)
    refusal = FakeResponse(Failure(ResponseFailed([Failure(ConnectionLost("reset"))])))
    refusal.code = 503
    agent.sent[-1].callback(refusal)
    harness.settle()
    harness.result(done)
    assert last_error_event(chunks) == {"message": "backend answered 503: ", "type": "server_error", "param": None,
                                        "code": None}


def test_a_connect_timeout_fails_over_to_the_next_instance() -> None:
    harness = echoing({"pool": {"strategy": "failover",
                                "instances": [{"url": "http://first:1"}, {"url": "http://second:2"}]}},
                      agent=lambda inner: RefusingAgent(inner, only={b"http://first:1"}, error=TimeoutError))
    response = harness.result(harness.request("GET", "/services/pool/x"))
    assert response.code == 200
    assert harness.agent.asked == [b"http://first:1/x", b"http://second:2/x"]  # type: ignore[attr-defined]


def test_with_no_queue_timeout_a_request_waits_for_its_turn_as_long_as_it_takes() -> None:
    from test_admission import holding

    harness = holding({"url": "http://127.0.0.1:9", "max_concurrency": 1, "queue_timeout": 0})
    first, second = harness.get("/services/svc/1"), harness.get("/services/svc/2")
    harness.settle()
    harness.reactor.advance(3600)
    harness.settle()
    assert len(harness.backend.held) == 1  # type: ignore[attr-defined]
    assert harness.status("svc")["concurrency"]["waiting"] == 1  # still waiting: no 503, no 504
    harness.backend.finish(1)  # type: ignore[attr-defined]
    harness.settle()
    harness.backend.finish(1)  # type: ignore[attr-defined]
    assert harness.result(first).code == 200 and harness.result(second).code == 200


def test_a_model_routes_body_is_cut_at_the_serving_services_idle_timeout() -> None:
    from test_admission import HeldBackend

    harness = MemoryGateway({
        "ai": {"route_by": "model"},
        "qwen": {"url": "http://qwen:1", "models": ["qwen2.5:7b"], "response_idle_timeout": 3},
    }, backend=HeldBackend())
    answer = harness.request("POST", "/services/ai/v1/chat/completions", data=b'{"model": "qwen2.5:7b"}')
    harness.settle()
    [held] = harness.backend.held  # type: ignore[attr-defined]
    held.write(b"first")
    response = harness.result(answer)
    body: list[Any] = []
    response.content().addBoth(body.append)
    harness.reactor.advance(3)  # qwen's 3 s, not the router's default of 300
    harness.settle()
    assert len(body) == 1 and isinstance(body[0], Failure)
    body[0].trap(Exception)


def test_each_connect_retry_uses_the_next_attempts_client_in_the_same_window() -> None:
    from test_admission import HeldBackend

    harness = MemoryGateway({"svc": {"url": "http://127.0.0.1:9", "queue_timeout": 30}}, backend=HeldBackend(),
                            agent=lambda inner: RefusingAgent(inner, times=2, error=TimeoutError))
    upstream = harness.gateway.upstream
    attempts: list[int] = []
    agent_for = upstream.agent_for_attempt
    upstream.agent_for_attempt = lambda attempt: attempts.append(attempt) or agent_for(attempt)  # type: ignore[method-assign]
    answer = harness.get("/services/svc/x")
    for _ in range(40):
        harness.settle()
        harness.reactor.advance(0.05)
    assert attempts == [0, 1, 2]  # the connect timeout grows by attempt (hestia.upstream)
    assert len(harness.backend.held) == 1  # type: ignore[attr-defined]
    assert harness.status("svc")["concurrency"]["active"] == 1  # the retry's turn is in svc's window
    harness.backend.finish(1)  # type: ignore[attr-defined]
    assert harness.result(answer).code == 200


def test_a_client_leaving_during_the_connect_retry_pause_gives_up_its_retry() -> None:
    from test_admission import HeldBackend

    harness = MemoryGateway({"svc": {"url": "http://127.0.0.1:9", "max_concurrency": 1, "queue_timeout": 30}},
                            backend=HeldBackend(),
                            agent=lambda inner: RefusingAgent(inner, only={b"http://127.0.0.1:9/a"}, error=TimeoutError))
    leaving = harness.get("/services/svc/a")
    waiting = harness.get("/services/svc/b")
    harness.settle()  # a's connect failed: b has the turn, a waits out its pause
    assert len(harness.backend.held) == 1  # type: ignore[attr-defined]
    leaving.addErrback(lambda _: None)
    leaving.cancel()
    harness.settle()
    harness.reactor.advance(1)
    harness.settle()
    assert harness.status("svc")["concurrency"]["waiting"] == 0  # a's retry did not come back for a turn
    harness.backend.finish(1)  # type: ignore[attr-defined]
    assert harness.result(waiting).code == 200


def test_an_upgrade_goes_with_the_backends_host_and_a_refused_one_is_recorded() -> None:
    from test_request_hardening import UPGRADE

    from hestia.testing import MemoryHestia, statuses

    hestia = MemoryHestia({"echo": {"url": "http://backend:8000"}})
    hestia.reactor.advance(100)  # times are differences, not reactor times
    client = hestia.request(UPGRADE)
    [upgrade] = hestia.upgrades.connections
    assert b"\r\nHost: backend:8000\r\n" in upgrade.sent()
    hestia.advance(2)
    upgrade.answer(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
    hestia.settle()
    upgrade.close()
    hestia.settle()
    assert statuses(client.received()) == [403]
    [record] = hestia.memory.records
    assert (record.status, record.upstream) == (403, 2.0)
    assert record.bytes == 2  # the refusal's body, relayed


def test_a_path_escaping_its_service_is_a_400_saying_so() -> None:
    harness = echoing({"web": {"url": "http://backend:8000"}})
    request = dummy()
    request.uri, request.method = b"/services/web/..%2f..%2fv1/services", b"GET"
    ServiceProxyResource(harness.gateway, "web", OPEN).render(request)
    assert request.responseCode == 400
    assert json.loads(b"".join(request.written))["error"] == "path escapes /services/web/"


def test_a_host_routed_monitor_request_goes_without_a_prefix() -> None:
    harness = echoing({"web": {"url": "http://backend:8000", "hosts": ["web.example"],
                               "passive": {"paths": ["/healthz"]}}})
    request = dummy()
    request.uri, request.method = b"/healthz", b"GET"
    request.isSecure = lambda: False  # type: ignore[method-assign]
    request.registerProducer = lambda producer, streaming: None  # type: ignore[method-assign]
    request.unregisterProducer = lambda: None  # type: ignore[method-assign]
    ServiceProxyResource(harness.gateway, "web", OPEN, host_routed=True).render(request)
    harness.settle()
    echoed = json.loads(b"".join(request.written))
    headers = {name.lower() for name, _ in echoed["headers"]}
    assert echoed["uri"] == "/healthz" and "x-forwarded-prefix" not in headers


def test_the_head_check_of_an_unknown_service_names_it() -> None:
    from hestia.proxy import GatewayRoot

    harness = echoing({"web": {"url": "http://backend:8000"}})
    request = dummy()
    services = GatewayRoot(harness.gateway, Resource()).getChildWithDefault(b"services", request)
    denied = services.getChild(b"nope", request).check_head(request)
    assert (denied.status, denied.reason, denied.service) == (404, "no such service", "nope")


def test_a_services_proxy_resource_is_built_once_per_route() -> None:
    from hestia.loader import parse_config
    from hestia.proxy import GatewayRoot

    harness = echoing({"web": {"url": "http://backend:8000"}})
    resources = GatewayRoot(harness.gateway, Resource()).resources
    first = resources.get("web")
    assert resources.get("web") is first and resources.get("web", host_routed=True) is not first
    harness.gateway.apply(parse_config({"services": {"web": {"url": "http://backend:9000"}}}, "t.yml", {}))
    harness.settle()
    assert resources.get("web") is not first  # a reload's new route: a new resource
