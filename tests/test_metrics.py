"""
Issue 5, "Metrics": C{/v1/metrics} of a real ``twistd -n hestia`` after known traffic.

One gateway for the module, run with C{--log-format json} (its log is checked
by C{test_logging.py}'s twin tests below and in that module), and real
C{tests/support/backend.py} processes:

  - C{echo} starts in 1 s (slow enough to queue requests on a busy machine) with a queue of 2: two requests are held during
    its cold start, a third is refused (503 queue full); two more are served
    warm; an API stop and one more request make a second cold start;
  - C{idler} is stopped by its 0.3 s idle timeout after one request;
  - C{broken} exits during its start (502);
  - C{gone} is a static upstream on a closed port (502, a connect error).

Then the exposition is parsed with C{prometheus_client.parser} and every
count and state is checked exactly, and C{promtool check metrics} lints it.
Unit tests at the end drive L{hestia.metrics.HestiaMetrics} with a Clock for
the stop reasons a live run cannot show cheaply (shutdown, failure, reload).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import IN_CI, require
from prometheus_client.parser import text_string_to_metric_families
from support.backendproc import free_port
from support.hestiaproc import BackendSpec, HestiaProcess, stop_cleanly
from twisted.web.resource import Resource

from hestia.testing import MemoryGateway

START_DELAY = 1.0


class Traffic:
    """The gateway, its backends, and what the test sent and got."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.echo = BackendSpec("echo", tmp)
        self.idler = BackendSpec("idler", tmp)
        self.broken = BackendSpec("broken", tmp)
        self.closed_port = free_port()
        self.gw = HestiaProcess(
            {
                "services": {
                    "echo": self.echo.service(
                        "--start-delay", str(START_DELAY), "--verbose", idle_timeout=0, queue_limit=2
                    ),
                    "idler": self.idler.service(idle_timeout=0.3),
                    "broken": self.broken.service("--fail-start", "3", idle_timeout=0),
                    "gone": {"url": f"http://127.0.0.1:{self.closed_port}"},
                },
            },
            tmp / "hestia",
            args=["--log-format", "json"],
        ).start()
        self.http = httpx.Client(base_url=self.gw.url, trust_env=False, timeout=20)
        self.statuses: dict[str, list[int]] = {}
        self.traced_id = "trace-5f0c1d2e-metrics-and-logs"
        self.generated_id = ""

    def get(self, service: str, path: str = "/echo/hello", **kwargs: Any) -> httpx.Response:
        response = self.http.get(f"/services/{service}{path}", **kwargs)
        self.statuses.setdefault(service, []).append(response.status_code)
        return response

    def run(self) -> None:
        gw = self.gw
        # Cold start of echo: two held, the third refused at once.
        held: list[httpx.Response] = []
        threads = [
            threading.Thread(target=lambda: held.append(self.get("echo", "/echo/held"))) for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        gw.wait_status("echo", "queued", 2)
        full = self.get("echo", "/echo/overflow")
        assert full.status_code == 503, full.text
        for thread in threads:
            thread.join(20)
        assert sorted(r.status_code for r in held) == [200, 200]
        # Warm: one with the client's request id, one with a generated one.
        traced = self.get("echo", "/echo/traced", headers={"X-Request-ID": self.traced_id})
        assert traced.status_code == 200 and traced.headers["x-request-id"] == self.traced_id
        generated = self.get("echo", "/echo/generated")
        assert generated.status_code == 200
        self.generated_id = generated.headers["x-request-id"]
        # An explicit stop, then a second cold start.
        assert self.http.post("/v1/services/echo/stop").status_code == 200
        assert self.get("echo", "/echo/again").status_code == 200
        # Idle stop.
        assert self.get("idler").status_code == 200
        gw.wait_state("idler", "stopped", timeout=10)
        # A failed start and an unreachable upstream.
        assert self.get("broken").status_code == 502
        assert self.get("gone").status_code == 502


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traffic]:
    tmp = tmp_path_factory.mktemp("metrics")
    fixture = Traffic(tmp)
    try:
        fixture.run()
        yield fixture
    finally:
        fixture.http.close()
        stop_cleanly(fixture.gw, tmp)


def scrape(traffic: Traffic) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    response = traffic.http.get("/v1/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return response.text, samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"no sample {name}{labels}"
    return samples[key]


def series(samples: dict[Any, float], name: str, **fixed: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of C{name} whose labels include C{fixed}, keyed by the other labels."""
    found = {}
    for (sample_name, labels), sample_value in samples.items():
        as_dict = dict(labels)
        if sample_name == name and all(as_dict.get(k) == v for k, v in fixed.items()):
            found[tuple((k, v) for k, v in labels if k not in fixed)] = sample_value
    return found


@pytest.mark.integration
def test_request_counts_are_exact(traffic: Traffic) -> None:
    _, samples = scrape(traffic)
    requests = series(samples, "hestia_requests_total")
    assert requests == {
        (("code", "200"), ("method", "GET"), ("service", "echo")): 5.0,
        (("code", "503"), ("method", "GET"), ("service", "echo")): 1.0,
        (("code", "200"), ("method", "GET"), ("service", "idler")): 1.0,
        (("code", "502"), ("method", "GET"), ("service", "broken")): 1.0,
        (("code", "502"), ("method", "GET"), ("service", "gone")): 1.0,
    }
    # Every request has a duration; only those that got a lease waited in a queue.
    assert value(samples, "hestia_request_duration_seconds_count", service="echo") == 6
    assert value(samples, "hestia_queue_wait_seconds_count", service="echo") == 5
    assert value(samples, "hestia_queue_wait_seconds_count", service="broken") == 0
    # The two held during the first cold start and the one of the second waited a start each.
    assert value(samples, "hestia_queue_wait_seconds_sum", service="echo") >= 3 * START_DELAY * 0.9
    assert value(samples, "hestia_queue_wait_seconds_bucket", service="echo", le="0.1") == 2
    assert series(samples, "hestia_upstream_errors_total") == {(("kind", "connect"), ("service", "gone")): 1.0}


@pytest.mark.integration
def test_starts_stops_and_states_are_exact(traffic: Traffic) -> None:
    _, samples = scrape(traffic)
    starts = {labels: v for labels, v in series(samples, "hestia_service_starts_total").items() if v}
    assert starts == {
        (("result", "success"), ("service", "echo")): 2.0,
        (("result", "success"), ("service", "idler")): 1.0,
        (("result", "failure"), ("service", "broken")): 1.0,
    }
    # Every reason exists (at zero) for every service with a lifecycle, and no other reason.
    for service in ("echo", "idler", "broken"):
        reasons = series(samples, "hestia_service_stops_total", service=service)
        assert {dict(labels)["reason"] for labels in reasons} == {"idle", "api", "shutdown", "failure", "exclusive"}
    stops = {labels: v for labels, v in series(samples, "hestia_service_stops_total").items() if v}
    assert stops == {
        (("reason", "api"), ("service", "echo")): 1.0,
        (("reason", "idle"), ("service", "idler")): 1.0,
    }
    assert value(samples, "hestia_service_start_duration_seconds_count", service="echo") == 2
    assert value(samples, "hestia_service_start_duration_seconds_sum", service="echo") >= 2 * START_DELAY
    expected_state = {"echo": "ready", "idler": "stopped", "broken": "failed", "gone": "ready"}
    for service, state in expected_state.items():
        states = {dict(labels)["state"]: v for labels, v in series(samples, "hestia_service_state", service=service).items()}
        assert states == {s: (1.0 if s == state else 0.0) for s in ("stopped", "starting", "ready", "stopping", "failed")}
        assert value(samples, "hestia_requests_in_flight", service=service) == 0
        assert value(samples, "hestia_requests_queued", service=service) == 0


@pytest.mark.integration
def test_gauges_show_a_request_held_now(traffic: Traffic) -> None:
    """In-flight and queued are read at scrape time: a held request shows at once."""
    assert traffic.http.post("/v1/services/echo/stop").status_code == 200
    done: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: done.append(traffic.http.get("/services/echo/echo/late")))
    thread.start()
    try:
        traffic.gw.wait_status("echo", "queued", 1)
        _, samples = scrape(traffic)
        assert value(samples, "hestia_requests_queued", service="echo") == 1
        assert value(samples, "hestia_service_state", service="echo", state="starting") == 1
    finally:
        thread.join(20)
    assert done and done[0].status_code == 200
    _, samples = scrape(traffic)
    assert value(samples, "hestia_requests_queued", service="echo") == 0
    assert value(samples, "hestia_service_stops_total", service="echo", reason="api") == 2
    assert value(samples, "hestia_service_starts_total", service="echo", result="success") == 3


@pytest.mark.integration
def test_promtool_accepts_the_live_output(traffic: Traffic) -> None:
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool (Debian package prometheus) is not installed")
    assert promtool is not None
    text, _ = scrape(traffic)
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == "", checked.stdout + checked.stderr


@pytest.mark.unit
def test_promtool_is_required_under_ci() -> None:
    """The CI must install promtool: under CI=true its absence is a failure, not a skip."""
    if IN_CI:
        assert shutil.which("promtool"), "promtool missing: scripts/install-system-deps.sh installs prometheus"
    assert "prometheus" in Path(__file__).parents[1].joinpath("scripts", "install-system-deps.sh").read_text()


@pytest.mark.integration
def test_metrics_answer_head_and_refuse_other_methods(traffic: Traffic) -> None:
    assert traffic.http.head("/v1/metrics").status_code == 200
    refused = traffic.http.post("/v1/metrics")
    assert refused.status_code in (404, 405)


# ---- unit: the observers with a Clock and FakeBackends ---------------------------------


class Unit(MemoryGateway):
    """A gateway of FakeBackends on a MemoryReactorClock, its metrics, and a client (L{MemoryGateway})."""

    def __init__(self, services: dict[str, Any] | None = None, groups: dict[str, Any] | None = None) -> None:
        class Ok(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                return b"ok"

        self.services = services or {"svc": {"url": "http://backend:1", "command": ["x"], "idle_timeout": 10}}
        super().__init__(self.services, groups=groups, backend=Ok(), metrics=True)

    def sample(self, name: str, **labels: str) -> float | None:
        assert self.metrics is not None
        return self.metrics.registry.get_sample_value(name, labels)

    def ready(self, name: str = "svc") -> None:
        fake = self.fakes[name]
        fake.finish_start()
        self.reactor.advance(0)
        fake.answer_probe(True)


def outcome(deferred: Any) -> list[Any]:
    """A list that gets C{deferred}'s result once it has one."""
    box: list[Any] = []
    deferred.addBoth(box.append)
    return box


@pytest.mark.unit
def test_unit_request_timings_come_from_the_request_record() -> None:
    unit = Unit()
    answer = outcome(unit.get("/services/svc/x"))
    unit.settle()
    unit.reactor.advance(2.5)  # A 2.5 s cold start.
    unit.ready()
    unit.settle()
    assert answer and answer[0].code == 200
    assert unit.sample("hestia_requests_total", service="svc", method="GET", code="200") == 1
    assert unit.sample("hestia_queue_wait_seconds_sum", service="svc") == pytest.approx(2.5)
    assert unit.sample("hestia_queue_wait_seconds_bucket", service="svc", le="2.5") == 1
    assert unit.sample("hestia_queue_wait_seconds_bucket", service="svc", le="1.0") == 0
    assert unit.sample("hestia_request_duration_seconds_sum", service="svc") == pytest.approx(2.5)
    assert unit.sample("hestia_service_start_duration_seconds_sum", service="svc") == pytest.approx(2.5)
    assert unit.sample("hestia_service_starts_total", service="svc", result="success") == 1


@pytest.mark.unit
def test_unit_methods_outside_the_standard_set_are_folded() -> None:
    unit = Unit({"web": {"url": "http://backend:1"}})
    box: list[Any] = []
    unit.client.request("BREW", "http://gw:8080/services/web/pot").addBoth(box.append)
    unit.settle()
    assert unit.sample("hestia_requests_total", service="web", method="other", code="200") == 1


@pytest.mark.unit
@pytest.mark.parametrize(
    ("how", "reason"),
    [("idle", "idle"), ("api", "api"), ("shutdown", "shutdown"), ("exited", "failure"), ("reload", "api")],
)
def test_unit_stop_reasons(how: str, reason: str) -> None:
    from hestia.loader import parse_config
    from hestia.metrics import STOP_REASONS

    unit = Unit()
    lifecycle = unit.gateway.route("svc")
    lifecycle.start("api")
    unit.ready()
    if how == "idle":
        unit.reactor.advance(10)
    elif how == "api":
        lifecycle.stop("api")
    elif how == "shutdown":
        unit.gateway.shutdown()
    elif how == "exited":
        unit.fakes["svc"].exit("exit status 4")
    else:
        # A reload stops a service only when told to (issue 19): a new command, restart: now.
        changed = dict(unit.services["svc"], command=["y"])
        unit.gateway.apply(parse_config({"services": {"svc": changed}, "reload": {"restart": "now"}},
                                        "test.yml", environ={}))
    counts = {each: unit.sample("hestia_service_stops_total", service="svc", reason=each) for each in STOP_REASONS}
    assert counts == {each: (1.0 if each == reason else 0.0) for each in STOP_REASONS}


@pytest.mark.unit
def test_unit_start_results_and_the_exposition() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    unit = Unit()
    lifecycle = unit.gateway.route("svc")
    lifecycle.start("api").addErrback(lambda failure: None)
    unit.fakes["svc"].starts[-1].errback(RuntimeError("no such binary"))
    assert unit.sample("hestia_service_starts_total", service="svc", result="failure") == 1
    lifecycle.start("api").addErrback(lambda failure: None)
    unit.reactor.advance(0)
    lifecycle.stop("api")
    assert unit.sample("hestia_service_starts_total", service="svc", result="cancelled") == 1
    assert unit.sample("hestia_service_stops_total", service="svc", reason="api") == 0  # Never served.
    answer = outcome(unit.get("/v1/metrics"))
    unit.settle()
    response = answer[0]
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain; version=")
    body: list[bytes] = []
    response.content().addCallback(body.append)
    unit.settle()
    names = {family.name for family in text_string_to_metric_families(body[0].decode())}
    assert {
        "hestia_requests", "hestia_request_duration_seconds", "hestia_queue_wait_seconds",
        "hestia_requests_in_flight", "hestia_requests_queued", "hestia_service_state",
        "hestia_service_starts", "hestia_service_start_duration_seconds", "hestia_service_stops",
        "hestia_upstream_errors",
    } <= names



@pytest.mark.unit
def test_unit_exclusive_group_stop_reason() -> None:
    """A member stopped to make room in its exclusive group counts as C{exclusive}."""
    services = {
        name: {"url": f"http://backend:{port}", "command": ["x"], "idle_timeout": 0, "group": "gpu0"}
        for name, port in (("a", 1), ("b", 2))
    }
    unit = Unit(services, groups={"gpu0": {"exclusive": True, "min_residency": 0}})
    unit.gateway.route("a").start("api")
    unit.ready("a")
    unit.gateway.route("b").start("api").addErrback(lambda failure: None)
    unit.reactor.advance(0)
    assert unit.gateway.route("a").state.value == "stopping"
    assert unit.sample("hestia_service_stops_total", service="a", reason="exclusive") == 1
    assert unit.sample("hestia_service_stops_total", service="a", reason="api") == 0
