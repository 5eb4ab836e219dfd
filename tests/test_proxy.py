"""
The proxy and the /v1 API in memory (L{hestia.testing.MemoryGateway}): StubTreq in
front, an echoing Resource behind, a MemoryReactorClock: no sockets, no sleeps.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.web.resource import Resource
from twisted.web.server import Request

from hestia.testing import MemoryGateway

pytestmark = pytest.mark.unit


class EchoBackend(Resource):
    """Answers with what it received, and two Set-Cookie headers."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Request] = []

    def render(self, request: Request) -> bytes:
        self.seen.append(request)
        request.responseHeaders.setRawHeaders(b"set-cookie", [b"a=1", b"b=2"])
        request.responseHeaders.setRawHeaders(b"keep-alive", [b"timeout=5"])
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        return json.dumps(
            {
                "method": request.method.decode(),
                "uri": request.uri.decode(),
                "headers": [[k.decode(), [v.decode() for v in vs]] for k, vs in
                            request.requestHeaders.getAllRawHeaders()],
                "body": request.content.read().decode(),
            }
        ).encode()


def echoing(services: dict[str, Any], **options: Any) -> MemoryGateway:
    """A L{MemoryGateway} whose backend answers with what it received (L{EchoBackend}) unless C{backend=} says otherwise."""
    return MemoryGateway(services, **{"backend": EchoBackend(), **options})


@pytest.fixture
def static() -> MemoryGateway:
    return echoing({"web": {"url": "http://backend:8000"}})


def test_forwards_path_query_method_body_and_headers(static: MemoryGateway) -> None:
    response = static.result(
        static.request(
            "POST",
            "/services/web/a%20b/c?q=1&q=2",
            data=b"payload",
            headers={"X-Multi": ["1", "2"], "X-Forwarded-For": "1.2.3.4", "Connection": "keep-alive, X-Drop",
                     "X-Drop": "secret", "X-Request-ID": "req-42"},
        )
    )
    assert response.code == 200
    echoed = static.json(response)
    assert echoed["method"] == "POST" and echoed["uri"] == "/a%20b/c?q=1&q=2" and echoed["body"] == "payload"
    headers = {name.lower(): values for name, values in echoed["headers"]}
    assert headers["x-multi"] == ["1", "2"]
    assert "x-drop" not in headers
    # The client's Connection header is not forwarded (the test agent adds its own "close").
    assert headers.get("connection", ["close"]) == ["close"]
    assert headers["x-forwarded-for"][0].startswith("1.2.3.4, ")
    assert headers["x-forwarded-prefix"] == ["/services/web"]
    assert headers["x-forwarded-host"] == ["gw:8080"]
    assert headers["x-request-id"] == ["req-42"]
    assert response.headers.getRawHeaders("set-cookie") == ["a=1", "b=2"]
    assert response.headers.getRawHeaders("x-request-id") == ["req-42"]
    assert not response.headers.hasHeader("keep-alive")


def test_unknown_service_is_a_json_404(static: MemoryGateway) -> None:
    response = static.result(static.request("GET", "/services/nope/x"))
    assert response.code == 404
    assert static.json(response) == {"error": "no such service", "service": "nope"}
    assert static.backend.seen == []


@pytest.mark.parametrize("path", ["/services/web/../../v1/services", "/services/web/%2e%2e/x"])
def test_escaping_paths_are_refused_and_never_forwarded(static: MemoryGateway, path: str) -> None:
    response = static.result(static.request("GET", path))
    assert response.code in (400, 404)
    assert static.backend.seen == []


def test_requests_are_held_until_the_service_is_ready() -> None:
    harness = echoing({"svc": {"url": "http://backend:1", "command": ["x"]}})
    pending = [harness.request("GET", f"/services/svc/{i}") for i in range(3)]
    harness.settle()
    fake = harness.fakes["svc"]
    assert len(fake.starts) == 1 and harness.backend.seen == []
    status = harness.json(harness.result(harness.request("GET", "/v1/services/svc/status")))
    assert status["state"] == "starting" and status["queued"] == 3
    fake.finish_start()
    harness.settle()
    fake.answer_probe(True)
    responses = [harness.result(p) for p in pending]
    assert [r.code for r in responses] == [200, 200, 200]
    assert sorted(r.uri.decode() for r in harness.backend.seen) == ["/0", "/1", "/2"]


def test_start_failure_is_a_502_with_the_output() -> None:
    harness = echoing({"svc": {"url": "http://backend:1", "command": ["x"]}})
    pending = harness.request("GET", "/services/svc/")
    harness.settle()
    fake = harness.fakes["svc"]
    fake.output = ["fatal: no GPU"]
    from hestia.errors import StartFailed

    fake.starts[0].errback(StartFailed("exited during start: exit status 1"))
    response = harness.result(pending)
    assert response.code == 502
    assert harness.json(response) == {
        "error": "exited during start: exit status 1",
        "service": "svc",
        "state": "failed",
        "detail": ["fatal: no GPU"],
    }


def test_queue_full_is_a_503_with_retry_after() -> None:
    harness = echoing({"svc": {"url": "http://backend:1", "command": ["x"], "queue_limit": 1}})
    harness.request("GET", "/services/svc/")
    response = harness.result(harness.request("GET", "/services/svc/"))
    assert response.code == 503
    assert response.headers.getRawHeaders("retry-after") == ["5"]
    assert harness.json(response)["error"].startswith("queue full")


def test_api_routes() -> None:
    harness = echoing({"svc": {"url": "http://backend:1", "command": ["x"]}, "web": {"url": "http://b:2"}})
    assert harness.json(harness.result(harness.request("GET", "/v1/health")))["status"] == "ok"
    services = harness.json(harness.result(harness.request("GET", "/v1/services")))["services"]
    assert {s["name"]: s["state"] for s in services} == {"svc": "stopped", "web": "ready"}
    started = harness.result(harness.request("POST", "/v1/services/svc/start"))
    assert started.code == 202
    harness.fakes["svc"].finish_start()
    harness.settle()
    harness.fakes["svc"].answer_probe(True)
    again = harness.result(harness.request("POST", "/v1/services/svc/start"))
    assert again.code == 200
    stopping = harness.request("POST", "/v1/services/svc/stop")
    harness.settle()
    harness.fakes["svc"].finish_stop()
    stopped = harness.result(stopping)
    assert stopped.code == 200 and harness.json(stopped)["state"] == "stopped"
    missing = harness.result(harness.request("GET", "/v1/services/nope/status"))
    assert missing.code == 404 and harness.json(missing)["service"] == "nope"
    assert harness.result(harness.request("POST", "/v1/services/nope/start")).code == 404


def test_api_start_wait_reports_the_failure() -> None:
    harness = echoing({"svc": {"url": "http://backend:1", "command": ["x"]}})
    waiting = harness.request("POST", "/v1/services/svc/start?wait=true")
    harness.settle()
    from hestia.errors import StartTimedOut

    harness.fakes["svc"].starts[0].errback(StartTimedOut("not ready"))
    response = harness.result(waiting)
    assert response.code == 504 and harness.json(response)["error"] == "not ready"
