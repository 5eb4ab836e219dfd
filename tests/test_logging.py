"""
Issue 5, "Logs": JSON lines, request tracing, service output and its follow stream.

The integration tests reuse C{test_metrics.py}'s module gateway (run with
C{--log-format json}) and its known traffic: every line the gateway wrote to
stdout must be one JSON object, and the request ids the client saw are
followed through the access log to what the backend received.
"""

from __future__ import annotations

import io
import json
import threading
from typing import Any

import httpx
import pytest
from support.hestiaproc import BackendSpec, HestiaProcess, read_request_log, wait_for
from test_metrics import START_DELAY, Traffic, traffic  # noqa: F401  (the module fixture, shared)
from twisted.application.service import Application
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.web.test.requesthelper import DummyRequest

from hestia.logs import (
    FollowResource,
    JSONLinesObserver,
    OutputBuffer,
    ServiceOutput,
    event_as_json,
    install_log_observer,
)


def json_log(gw: HestiaProcess) -> list[dict[str, Any]]:
    """Every stdout line of the gateway, each of which must be a JSON object."""
    lines = []
    for number, line in enumerate(gw.stdout_path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            value = json.loads(line)
        except ValueError:
            raise AssertionError(f"stdout line {number} is not JSON: {line!r}") from None
        assert isinstance(value, dict), line
        lines.append(value)
    return lines


# ---- integration: the module gateway's log ---------------------------------------------


@pytest.mark.integration
def test_every_line_is_json_with_the_base_fields(traffic: Traffic) -> None:  # noqa: F811
    lines = json_log(traffic.gw)
    assert len(lines) > 20
    for line in lines:
        assert {"time", "level", "event", "namespace", "message"} <= line.keys(), line
        assert line["level"] in ("debug", "info", "warn", "error", "critical"), line
        assert line["time"].endswith("Z")
    assert any(line["namespace"] == "hestia.server" and "listening" in line["message"] for line in lines)


@pytest.mark.integration
def test_one_access_line_per_proxied_request(traffic: Traffic) -> None:  # noqa: F811
    requests = [line for line in json_log(traffic.gw) if line["event"] == "request"]
    fields = {"request_id", "service", "method", "path", "status", "duration_ms", "queued_ms",
              "upstream_ms", "bytes", "client"}
    for line in requests:
        assert fields <= line.keys(), line
        assert line["client"] == "127.0.0.1"
    by_service: dict[str, list[int]] = {}
    for line in requests:
        if line["path"].startswith(("/services/echo/echo/follow-me", "/services/echo/echo/late")):
            continue  # Traffic of other tests in this module.
        by_service.setdefault(line["service"], []).append(line["status"])
    # Exactly what the client got, request for request.
    assert {service: sorted(s) for service, s in by_service.items()} == {
        service: sorted(s) for service, s in traffic.statuses.items()
    }
    overflow = next(line for line in requests if line["path"] == "/services/echo/echo/overflow")
    assert overflow["status"] == 503 and overflow["level"] == "warn" and overflow["upstream_ms"] is None
    held = [line for line in requests if line["path"] == "/services/echo/echo/held"]
    assert len(held) == 2
    for line in held:
        assert line["queued_ms"] >= 900 * START_DELAY  # Held for the cold start.
        assert line["upstream_ms"] is not None and line["upstream_ms"] < line["duration_ms"]
        assert line["bytes"] > 0
    failed = next(line for line in requests if line["service"] == "broken")
    assert failed["status"] == 502 and failed["error"]


@pytest.mark.integration
@pytest.mark.parametrize("which", ["traced", "generated"])
def test_a_request_id_is_followed_from_client_to_log_to_backend(traffic: Traffic, which: str) -> None:  # noqa: F811
    request_id = traffic.traced_id if which == "traced" else traffic.generated_id
    assert request_id
    lines = json_log(traffic.gw)
    about = [line for line in lines if request_id in json.dumps(line)]
    assert len(about) == 1, about
    (line,) = about
    assert line["event"] == "request" and line["request_id"] == request_id
    assert line["path"] == f"/services/echo/echo/{which}" and line["status"] == 200
    received = [entry for entry in read_request_log(traffic.echo.request_log) if entry["path"] == f"/echo/{which}"]
    assert len(received) == 1
    headers = {name.lower(): value for name, value in received[0]["headers"]}
    assert headers["x-request-id"] == request_id


@pytest.mark.integration
def test_lifecycle_events_carry_the_change_reason_and_start_duration(traffic: Traffic) -> None:  # noqa: F811
    changes = [line for line in json_log(traffic.gw) if line["event"] == "state_change"]
    echo = [(c["old"], c["new"], c["reason"]) for c in changes if c["service"] == "echo"]
    assert echo[:5] == [
        ("stopped", "starting", "request"),
        ("starting", "ready", "started"),
        ("ready", "stopping", "api"),
        ("stopping", "stopped", "api"),
        ("stopped", "starting", "request"),
    ]
    ready = [c for c in changes if c["service"] == "echo" and c["new"] == "ready"]
    assert all(c["duration"] >= START_DELAY for c in ready)
    idler = [(c["new"], c["reason"]) for c in changes if c["service"] == "idler"]
    assert ("stopping", "idle") in idler
    broken = next(c for c in changes if c["service"] == "broken" and c["new"] == "failed")
    assert broken["reason"] == "start failed" and "exit" in broken["error"] and broken["level"] == "info"


@pytest.mark.integration
def test_service_output_goes_to_the_log_under_its_name(traffic: Traffic) -> None:  # noqa: F811
    output = [line for line in json_log(traffic.gw) if line["event"] == "service_output"]
    broken = [line for line in output if line["service"] == "broken"]
    assert any("cannot load model weights" in line["line"] and line["stream"] == "stderr" for line in broken)
    assert all(line["namespace"] == "hestia.service.broken" for line in broken)
    assert any(line["service"] == "echo" and line["line"] == "starting echo" for line in output)


@pytest.mark.integration
def test_logs_tail_over_the_api(traffic: Traffic) -> None:  # noqa: F811
    lines = traffic.http.get("/v1/services/broken/logs").json()["lines"]
    assert "error: cannot load model weights" in [entry["line"] for entry in lines if entry["stream"] == "stderr"]
    assert all({"seq", "time", "stream", "line"} <= entry.keys() for entry in lines)
    one = traffic.http.get("/v1/services/echo/logs", params={"tail": "1"}).json()["lines"]
    assert len(one) == 1
    assert traffic.http.get("/v1/services/nope/logs").status_code == 404
    bad = traffic.http.get("/v1/services/echo/logs", params={"tail": "x"})
    assert bad.status_code == 400 and bad.json()["service"] == "echo"


@pytest.mark.integration
def test_logs_follow_streams_new_lines_as_sse(traffic: Traffic) -> None:  # noqa: F811
    """C{--verbose} makes the echo backend write a line per request: follow sees it arrive."""
    seen: list[dict[str, Any]] = []
    connected = threading.Event()
    marker = "/echo/follow-me-please"

    def follow() -> None:
        with httpx.Client(base_url=traffic.gw.url, trust_env=False, timeout=20) as client:
            with client.stream("GET", "/v1/services/echo/logs", params={"follow": "true", "tail": "0"}) as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                for line in stream.iter_lines():
                    connected.set()
                    if line.startswith("data: "):
                        seen.append(json.loads(line[6:]))
                        if marker in seen[-1]["line"]:
                            return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    assert connected.wait(10)
    assert traffic.http.get(f"/services/echo{marker}").status_code == 200
    thread.join(10)
    assert not thread.is_alive()
    assert seen and marker in seen[-1]["line"] and seen[-1]["stream"] == "stderr"


@pytest.mark.integration
def test_events_api_lists_history_with_durations(traffic: Traffic) -> None:  # noqa: F811
    events = traffic.http.get("/v1/services/echo/events").json()["events"]
    kinds = [event["kind"] for event in reversed(events)]
    assert kinds[:5] == ["start", "ready", "stop", "stopped", "start"]
    assert all(event["duration"] >= START_DELAY for event in events if event["kind"] == "ready")


@pytest.mark.integration
def test_log_format_json_from_the_config_file_and_text_by_default(hestia: Any, tmp_path: Any) -> None:
    echo = BackendSpec("echo", tmp_path)
    gw = hestia({"server": {"log_format": "json"}, "services": {"echo": echo.service()}})
    assert gw.http.get("/services/echo/echo/x", headers={"X-Request-ID": "from-config"}).status_code == 200
    assert wait_for(lambda: any(line.get("request_id") == "from-config" for line in json_log(gw)), 5)
    plain = hestia({"services": {}})
    assert plain.http.get("/v1/health").status_code == 200
    assert wait_for(lambda: "listening" in plain.log_text(), 5)
    first = plain.stdout_path.read_text().splitlines()[0]
    with pytest.raises(ValueError):
        json.loads(first)


# ---- unit -----------------------------------------------------------------------------------

@pytest.mark.unit
def test_json_observer_writes_one_object_per_line() -> None:
    out = io.StringIO()
    observer = JSONLinesObserver(out)
    log = Logger(namespace="hestia.test", observer=observer)
    log.info("hello {who}", who="world", event="greeting", count=3, state=LogLevel.warn)
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("it broke on {service}", service="svc")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["event"] == "greeting" and first["message"] == "hello world" and first["level"] == "info"
    assert first["namespace"] == "hestia.test" and first["who"] == "world" and first["count"] == 3
    assert not any(key.startswith("log_") for key in first)
    assert second["level"] == "critical" and second["event"] == "log" and "ZeroDivisionError" in second["traceback"]


@pytest.mark.unit
def test_unserialisable_fields_do_not_lose_the_line() -> None:
    class Odd:
        def __str__(self) -> str:
            return "odd thing"

    line = json.loads(event_as_json({"log_format": "x", "log_time": 0.0, "thing": Odd(), "nested": {1: (Odd(),)}}))
    assert line["thing"] == "odd thing" and line["nested"] == {"1": ["odd thing"]}
    assert line["time"] == "1970-01-01T00:00:00.000Z"


@pytest.mark.unit
def test_install_log_observer_sets_twistds_component_only_for_json() -> None:
    from twisted.application.service import Service

    app = Application("hestia")
    install_log_observer(Service(), app, "text")
    assert app.getComponent(ILogObserver, None) is None
    install_log_observer(Service(), app, "json")
    assert isinstance(app.getComponent(ILogObserver, None), JSONLinesObserver)


@pytest.mark.unit
def test_output_buffer_tail_and_sequence_numbers() -> None:
    buffer = OutputBuffer("svc", size=3)
    for number in range(5):
        buffer.append("stdout", f"line {number}", 10.0 + number)
    assert [entry["line"] for entry in buffer.tail(10)] == ["line 2", "line 3", "line 4"]
    assert [entry["seq"] for entry in buffer.tail(2)] == [4, 5]
    assert [entry["seq"] for entry in buffer.tail(10, after=4)] == [5]
    assert buffer.tail(0) == []


@pytest.mark.unit
def test_follow_resource_streams_and_unfollows_when_the_client_leaves() -> None:
    from twisted.internet.task import Clock

    from hestia.gateway import Gateway
    from hestia.loader import parse_config
    from hestia.testing import FakeBackend

    class Listening(FakeBackend):
        def __init__(self) -> None:
            super().__init__()
            self.listeners: list[Any] = []

        def add_line_listener(self, listener: Any) -> None:
            self.listeners.append(listener)

    backend = Listening()
    clock = Clock()
    config = parse_config({"services": {"svc": {"url": "http://x:1", "command": ["x"]}}}, "t.yml", environ={})
    gateway = Gateway(config, clock, agent=object(), build_backend=lambda service: backend)  # type: ignore[arg-type]
    output = ServiceOutput(gateway)
    gateway.add_state_observer(output.state_changed)
    gateway.route("svc").start("api")
    assert len(backend.listeners) == 1  # Attached on "starting", before the process runs.
    backend.listeners[0]("stdout", "old line")
    request = DummyRequest([b""])
    FollowResource(output, "svc", 10).render_GET(request)
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"text/event-stream; charset=utf-8"]
    backend.listeners[0]("stderr", "new line")
    clock.advance(FollowResource.KEEPALIVE)
    written = b"".join(request.written).decode()
    assert written.index("old line") < written.index("new line") < written.index(": keepalive")
    assert "id: 2\nevent: line\n" in written
    assert output.buffer("svc").followers == 1
    request.finish()
    assert output.buffer("svc").followers == 0
    resumed = DummyRequest([b""])
    resumed.requestHeaders.setRawHeaders(b"last-event-id", [b"1"])
    FollowResource(output, "svc", 0).render_GET(resumed)
    assert "new line" in b"".join(resumed.written).decode() and "old line" not in b"".join(resumed.written).decode()
