"""
Issue 8: the waiting page, the event stream and the dashboard's files, against a
real ``twistd -n hestia`` with real backends (no browser: see test_ui_browser.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.backendproc import free_port
from support.hestiaproc import PYTHON, BackendSpec, HestiaProcess, stop_cleanly
from twisted.web.test.requesthelper import DummyRequest

from hestia.events_stream import sse_message
from hestia.ui import ASSETS, asset, is_browser_navigation

ROOT = Path(__file__).resolve().parents[1]
BROWSER = {"accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


# -- unit: who is a browser --------------------------------------------------------


def _request(method: bytes = b"GET", **headers: str) -> DummyRequest:
    request = DummyRequest([b""])
    request.method = method
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name.replace("_", "-").encode(), [value.encode()])
    return request


@pytest.mark.unit
@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        (b"GET", {"accept": BROWSER["accept"]}, True),
        (b"GET", {"accept": BROWSER["accept"], "sec_fetch_mode": "navigate"}, True),
        (b"GET", {"accept": BROWSER["accept"], "sec_fetch_mode": "cors"}, False),
        (b"GET", {"accept": "text/html", "x_requested_with": "XMLHttpRequest"}, False),
        (b"GET", {"accept": "application/json"}, False),
        (b"GET", {"accept": "*/*"}, False),
        (b"GET", {}, False),
        (b"POST", {"accept": BROWSER["accept"]}, False),
        (b"HEAD", {"accept": BROWSER["accept"]}, False),
    ],
)
def test_browser_navigation(method: bytes, headers: dict[str, str], expected: bool) -> None:
    assert is_browser_navigation(_request(method, **headers)) is expected


@pytest.mark.unit
def test_sse_message_is_one_event_with_json_data() -> None:
    message = sse_message("state", {"text": "two\nlines"}, 7).decode()
    assert message == 'event: state\nid: 7\ndata: {"text":"two\\nlines"}\n\n'


@pytest.mark.unit
def test_shipped_files_use_no_cdn() -> None:
    """Everything the pages load comes from the gateway itself: they work offline."""
    for name in ASSETS:
        text = asset(name).decode()
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), name
        assert "@import" not in text and "url(http" not in text, name
    with pytest.raises(KeyError):
        asset("__init__.py")


# -- integration -------------------------------------------------------------------


class Gw:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.site = tmp / "site"
        self.site.mkdir()
        (self.site / "index.html").write_text("<html><head><title>Real page</title></head><body>real</body></html>")
        self.web_port = free_port()
        self.slow = BackendSpec("slow", tmp)
        self.broken = BackendSpec("broken", tmp)
        self.held = BackendSpec("held", tmp)
        web = (
            f"sleep 0.5; exec {PYTHON} -m http.server {self.web_port} --bind 127.0.0.1 --directory {self.site}"
        )
        self.gw = HestiaProcess({
            "services": {
                "web": {"url": f"http://127.0.0.1:{self.web_port}", "command": web,
                        "health": {"path": "/"}, "idle_timeout": 0},
                "slow": self.slow.service("--start-delay", "0.6", idle_timeout=0),
                "broken": self.broken.service("--fail-start", "3", idle_timeout=0),
                "held": self.held.service("--start-delay", "0.2", idle_timeout=0, on_cold="hold"),
            },
        }, tmp / "hestia").start()
        self.http = httpx.Client(base_url=self.gw.url, trust_env=False, timeout=20)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gw]:
    tmp = tmp_path_factory.mktemp("ui")
    fixture = Gw(tmp)
    try:
        yield fixture
    finally:
        fixture.http.close()
        stop_cleanly(fixture.gw, tmp)


def page_data(html: str) -> dict[str, Any]:
    match = re.search(r'<script id="hestia-data" type="application/json">(.*?)</script>', html, re.S)
    assert match, html[:500]
    data: dict[str, Any] = json.loads(match.group(1))
    return data


@pytest.mark.integration
def test_browser_gets_waiting_page_and_page_request_starts_service(gw: Gw) -> None:
    gw.gw.http.post("/v1/services/web/stop")
    response = gw.http.get("/services/web/", headers=BROWSER)
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["x-hestia-waiting"] == "web"
    assert response.headers["cache-control"] == "no-store"
    assert "retry-after" in response.headers
    data = page_data(response.text)
    assert data["name"] == "web"
    assert data["status"]["state"] == "starting"
    assert data["stream"] == "/v1/services/web/events/stream"
    # Nothing else asked for it: the page request alone started the service.
    gw.gw.wait_state("web", "ready", timeout=15)
    real = gw.http.get("/services/web/", headers=BROWSER)
    assert real.status_code == 200
    assert "<title>Real page</title>" in real.text


@pytest.mark.integration
def test_api_clients_are_held_not_paged(gw: Gw) -> None:
    gw.gw.http.post("/v1/services/slow/stop")
    for headers in ({"accept": "application/json"}, {**BROWSER, "x-requested-with": "XMLHttpRequest"}, {}):
        gw.gw.http.post("/v1/services/slow/stop")
        response = gw.http.get("/services/slow/health", headers=headers)
        assert response.status_code == 200, (headers, response.text)
        assert "x-hestia-waiting" not in response.headers


@pytest.mark.integration
def test_on_cold_hold_keeps_holding_browsers(gw: Gw) -> None:
    gw.gw.http.post("/v1/services/held/stop")
    response = gw.http.get("/services/held/health", headers=BROWSER)
    assert response.status_code == 200
    assert "x-hestia-waiting" not in response.headers


@pytest.mark.integration
def test_failed_start_shows_reason_on_the_page(gw: Gw) -> None:
    first = gw.http.get("/services/broken/", headers=BROWSER)
    assert first.status_code == 503
    gw.gw.wait_state("broken", "failed", timeout=15)
    again = gw.http.get("/services/broken/", headers=BROWSER)
    assert again.status_code == 503
    status = page_data(again.text)["status"]
    # The new page request starts it again (or the cooldown refuses); either
    # way the page carries the last failure's reason, which it shows.
    assert status["last_error"], status
    gw.gw.wait_state("broken", "failed", timeout=15)


def read_events(response: httpx.Response, want: int) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    kind = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: ") and kind:
            events.append((kind, json.loads(line[6:])))
            if len(events) >= want:
                break
    return events


@pytest.mark.integration
def test_event_stream_reports_state_changes(gw: Gw) -> None:
    gw.gw.http.post("/v1/services/slow/stop")
    with gw.http.stream("GET", "/v1/services/slow/events/stream") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        first: list[tuple[str, dict[str, Any]]] = []
        kind = None
        for line in lines:
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                first.append((kind or "", json.loads(line[6:])))
                break
        assert first[0][0] == "status" and first[0][1]["state"] == "stopped"
        assert gw.gw.http.post("/v1/services/slow/start").status_code == 202
        changes = []
        for line in lines:
            if line.startswith("data: "):
                changes.append(json.loads(line[6:]))
                if changes[-1]["new"] == "ready":
                    break
        assert [(c["old"], c["new"]) for c in changes] == [("stopped", "starting"), ("starting", "ready")]
        assert changes[-1]["status"]["state"] == "ready"
        assert changes[-1]["duration"] > 0.5


@pytest.mark.integration
def test_event_stream_unknown_service_is_json_404(gw: Gw) -> None:
    response = gw.http.get("/v1/services/nope/events/stream")
    assert response.status_code == 404
    assert response.json()["service"] == "nope"


@pytest.mark.integration
def test_closed_streams_are_forgotten(gw: Gw) -> None:
    """A client that leaves costs nothing afterwards: the gateway keeps serving."""
    for _ in range(5):
        with gw.http.stream("GET", "/v1/services/web/events/stream") as response:
            assert response.status_code == 200
            next(response.iter_lines())
    assert gw.http.get("/v1/health").status_code == 200


@pytest.mark.integration
def test_dashboard_files(gw: Gw) -> None:
    index = gw.http.get("/v1/ui/")
    assert index.status_code == 200
    assert index.headers["content-type"].startswith("text/html")
    assert 'src="dashboard.js"' in index.text
    assert "default-src 'none'" in index.headers["content-security-policy"]
    assert gw.http.get("/v1/ui/dashboard.js").headers["content-type"].startswith("text/javascript")
    assert gw.http.get("/v1/ui/dashboard.css").status_code == 200
    assert gw.http.get("/v1/ui", follow_redirects=False).status_code in (301, 302)
    for bad in ("/v1/ui/waiting.html", "/v1/ui/__init__.py", "/v1/ui/openapi.yaml", "/v1/ui/..%2fapi.py"):
        response = gw.http.get(bad)
        assert response.status_code == 404, bad
        assert response.headers["content-type"] == "application/json"


@pytest.mark.integration
def test_services_list_has_dashboard_activity(gw: Gw) -> None:
    gw.http.get("/services/web/", headers={"accept": "application/json"})
    services = {s["name"]: s for s in gw.http.get("/v1/services").json()["services"]}
    web = services["web"]
    assert web["requests_total"] >= 1
    assert web["request_rate"] > 0
    assert any(event["new"] == "ready" for event in web["recent_events"])


@pytest.mark.integration
def test_openapi_is_served(gw: Gw) -> None:
    response = gw.http.get("/v1/openapi.yaml")
    assert response.status_code == 200
    assert response.content == (ROOT / "docs" / "openapi.yaml").read_bytes()


@pytest.mark.unit
def test_event_hub_streams_changes_beats_and_forgets_closed_streams() -> None:
    from twisted.internet.task import Clock

    from hestia.events_stream import EventHub
    from hestia.gateway import Gateway
    from hestia.loader import parse_config
    from hestia.testing import FakeBackend

    clock = Clock()
    config = parse_config({"services": {"svc": {"url": "http://127.0.0.1:9", "command": "true"}}},
                          "test.yml", environ={})
    gateway = Gateway(config, clock, agent=object(),  # type: ignore[arg-type]
                      build_backend=lambda service: FakeBackend(service.url))
    hub = EventHub(gateway)
    request = DummyRequest([b""])
    stream = hub.stream(request, "svc")
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"text/event-stream; charset=utf-8"]
    assert b"event: status" in b"".join(request.written)
    gateway.route("svc").start("api")
    text = b"".join(request.written).decode()
    assert "event: state" in text and '"new":"starting"' in text
    clock.advance(EventHub.HEARTBEAT)
    assert request.written[-1] == b": keep-alive\n\n"
    assert hub.subscriber_count("svc") == 1
    stream.cancel()  # what Klein does when the client goes away
    assert hub.subscriber_count("svc") == 0
    assert not clock.getDelayedCalls() or all(
        call.func.__name__ != "beat" for call in clock.getDelayedCalls()  # type: ignore[attr-defined]
    )
    stream.addErrback(lambda failure: None)
