"""
Issue 17: monitors look without waking (hestia.passive).

Rules with a Clock; the "must show" against a real ``twistd -n hestia``: a
monitor's request does not start a stopped service and does not keep a ready
one from idling.
"""

from __future__ import annotations

import time
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from conftest import StartHestia
from support.hestiaproc import BackendSpec
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from hestia.config import ConfigError
from hestia.lifecycle import PassiveLease, ServiceLifecycle, State
from hestia.loader import parse_config
from hestia.passive import PassiveRule
from hestia.testing import FakeBackend


def parse(document: dict[str, Any]) -> Any:
    return parse_config(document, "hestia_config.yml", environ={})


def error_of(document: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(document)
    assert "\n" not in str(caught.value)
    return str(caught.value)


SERVICE = {"url": "http://127.0.0.1:9", "command": ["true"]}


def request(agent: str | None = None) -> DummyRequest:
    dummy = DummyRequest([b""])
    if agent is not None:
        dummy.requestHeaders.setRawHeaders(b"user-agent", [agent.encode()])
    return dummy


@pytest.mark.unit
def test_common_monitors_are_passive_by_default() -> None:
    rule = parse({"services": {"svc": SERVICE}}).services["svc"].passive
    assert isinstance(rule, PassiveRule)
    for agent in ("Uptime-Kuma/1.23.11", "Prometheus/2.51.0", "kube-probe/1.29", "Blackbox Exporter/0.25.0"):
        assert rule.matches(request(agent), b"/health"), agent
    assert not rule.matches(request("curl/8.5.0"), b"/health")
    assert not rule.matches(request("python-httpx/0.27"), b"/api/tags")
    assert not rule.matches(request(None), b"/")


@pytest.mark.unit
def test_passive_false_and_lists_of_ones_own() -> None:
    config = parse({
        "passive": {"user_agents": ["my-checker"], "paths": ["/healthz", "/status/*"]},
        "services": {"a": SERVICE, "b": {**SERVICE, "passive": False}, "c": {**SERVICE, "passive": True}},
    })
    a, b, c = (config.services[name].passive for name in "abc")
    assert b is None
    assert a.matches(request("My-Checker/2"), b"/x") and not a.matches(request("Prometheus/2"), b"/x")
    assert a.matches(request(), b"/healthz?verbose=1") and a.matches(request(), b"/status/db")
    assert not a.matches(request(), b"/healthz/deeper") and not a.matches(request(), b"/")
    assert c == PassiveRule()  # true: the defaults, not the top level's lists
    assert parse({"passive": False, "services": {"a": SERVICE}}).services["a"].passive is None


@pytest.mark.unit
@pytest.mark.parametrize(("document", "expected"), [
    ({"passive": {"agents": []}}, "hestia_config.yml: passive.agents: unknown key (did you mean user_agents?)"),
    ({"passive": 3}, "hestia_config.yml: passive: expected a mapping"),
    ({"services": {"svc": {**SERVICE, "passive": {"paths": ["healthz"]}}}},
     "hestia_config.yml: services.svc.passive.paths: 'healthz': a path starts with /"),
    ({"services": {"svc": {**SERVICE, "passive": {"user_agents": "kuma"}}}},
     "hestia_config.yml: services.svc.passive.user_agents: expected a list of non-empty strings"),
])
def test_passive_errors_name_the_key(document: dict[str, Any], expected: str) -> None:
    document = {"services": {"svc": SERVICE}, **document} if "services" not in document else document
    assert error_of(document).startswith(expected)


def lifecycle(idle_timeout: float = 60) -> tuple[ServiceLifecycle, FakeBackend, Clock]:
    config = parse({"services": {"svc": {**SERVICE, "idle_timeout": idle_timeout}}})
    clock = Clock()
    backend = FakeBackend(has_lifecycle=True)
    return ServiceLifecycle(config.services["svc"], backend, clock), backend, clock


@pytest.mark.unit
def test_a_passive_acquire_never_starts_a_service() -> None:
    service, backend, _ = lifecycle()
    assert service.acquire_passive() is None
    assert service.state is State.STOPPED and backend.starts == []
    service.acquire()
    assert service.state is State.STARTING
    assert service.acquire_passive() is None  # starting is not ready either


@pytest.mark.unit
def test_a_passive_lease_does_not_keep_a_ready_service_from_idling() -> None:
    service, backend, clock = lifecycle(idle_timeout=60)
    service.start()
    backend.finish_start()
    clock.advance(0)
    backend.answer_probe(True)
    assert service.state is State.READY
    for _ in range(12):  # a monitor every 10 s, each taking 1 s
        clock.advance(9)
        leased = service.acquire_passive()
        assert leased is not None
        lease = leased.result
        assert isinstance(lease, PassiveLease) and lease.url == backend.url
        assert service.in_flight == 0 and service.last_request_at is None
        clock.advance(1)
        lease.release()
        lease.release()
        if service.state is not State.READY:
            break
    assert service.state is State.STOPPING
    assert clock.seconds() == 60  # idle_timeout after the start, as if no monitor had come


# -- the live "must show" ------------------------------------------------------------

KUMA = {"User-Agent": "Uptime-Kuma/1.23.11"}


def wait_until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


@pytest.mark.integration
def test_a_monitor_does_not_start_a_stopped_service(hestia: StartHestia, tmp_path: Path) -> None:
    app, plain = BackendSpec("app", tmp_path), BackendSpec("plain", tmp_path)
    gw = hestia({"services": {
        "app": {**app.service(), "passive": {"paths": ["/healthz"]}},
        "plain": {**plain.service(), "passive": False},
    }})
    for _ in range(3):
        answer = gw.http.get("/services/app/health", headers=KUMA)
        assert answer.status_code == 200
        assert answer.json() == {"service": "app", "state": "stopped"}
        assert answer.headers["x-hestia-state"] == "stopped"
    answer = gw.http.get("/services/app/healthz", headers={"User-Agent": "curl/8"})  # by path
    assert answer.status_code == 200 and answer.json()["state"] == "stopped"
    assert gw.http.head("/services/app/health", headers=KUMA).status_code == 200
    assert app.starts() == 0 and gw.state("app") == "stopped"

    # passive: false: a monitor is a client like any other.
    answer = gw.http.get("/services/plain/health", headers=KUMA)
    assert answer.status_code == 200 and answer.json()["name"] == "plain"
    assert plain.starts() == 1


@pytest.mark.integration
def test_a_monitor_does_not_keep_a_ready_service_from_idling(hestia: StartHestia, tmp_path: Path) -> None:
    app = BackendSpec("app", tmp_path)
    gw = hestia({"services": {"app": app.service(idle_timeout=1.5)}})
    answer = gw.http.get("/services/app/health")  # a real user: starts it
    assert answer.status_code == 200 and answer.json()["name"] == "app"
    used_at = time.monotonic()
    seen: list[int] = []

    def stopped() -> bool:
        # Meanwhile a monitor asks five times a second, and is proxied while ready.
        answer = gw.http.get("/services/app/health", headers=KUMA)
        seen.append(answer.status_code)
        if answer.headers.get("x-hestia-state") is None:
            assert answer.json()["name"] == "app"  # the backend's own answer
        return gw.state("app") == "stopped"

    assert wait_until(stopped, timeout=20), gw.status("app")
    idled_after = time.monotonic() - used_at
    assert idled_after < 10, idled_after  # stopped about 1.5 s after the last real use
    assert set(seen) == {200}
    assert len(app.requests("/health")) >= 2  # the monitor did reach the ready backend
    assert app.starts() == 1
    answer = gw.http.get("/services/app/health", headers=KUMA)
    assert answer.json() == {"service": "app", "state": "stopped"} and app.starts() == 1


@pytest.mark.unit
def test_the_reference_documents_every_passive_key() -> None:
    from hestia.passive import DEFAULT_USER_AGENTS, PASSIVE_KEYS

    reference = (Path(__file__).resolve().parents[1] / "docs" / "configuration-reference.md").read_text()
    section = reference.split("## `passive:`", 1)[1].split("\n## ", 1)[0]
    for key in PASSIVE_KEYS:
        assert f"| `{key}` |" in section, key
    for agent in DEFAULT_USER_AGENTS:
        assert f"`{agent}`" in section, agent


@pytest.mark.unit
def test_composite_routes_answer_monitors_without_starting_anything() -> None:
    from hestia.gateway import Gateway
    from hestia.routing import RouteRequest

    clock = Clock()
    backends: dict[str, FakeBackend] = {}

    def build(service: Any) -> FakeBackend:
        backends[service.name] = FakeBackend()
        return backends[service.name]

    config = parse({"services": {
        "ai": {"route_by": "model"},
        "llama": {**SERVICE, "models": ["llama3:8b"]},
        "pool": {"instances": [SERVICE, SERVICE]},
    }})
    gateway = Gateway(config, clock, agent=object(), build_backend=build)  # type: ignore[arg-type]
    chat = DummyRequest([b""])
    chat.method = b"POST"
    chat.content = BytesIO(b'{"model": "llama3:8b"}')
    routed = RouteRequest(chat, b"/api/chat", 0.0)
    assert gateway.route("ai").acquire_passive(routed) is None
    assert gateway.route("pool").acquire_passive(None) is None
    assert all(backend.starts == [] for backend in backends.values())
    # Once the model's service is ready, the monitor is forwarded to it (on a lease that is not use).
    llama = gateway.route("llama")
    llama.start()
    backends["llama"].finish_start()
    clock.advance(0)
    backends["llama"].answer_probe(True)
    leased = gateway.route("ai").acquire_passive(RouteRequest(chat, b"/api/chat", 0.0))
    assert leased is not None and isinstance(leased.result, PassiveLease) and llama.in_flight == 0
    pool = gateway.route("pool").instances
    pool[1].start()
    backends["pool.1"].finish_start()
    clock.advance(0)
    backends["pool.1"].answer_probe(True)
    leased = gateway.route("pool").acquire_passive(None)
    assert leased is not None and leased.result.url == pool[1].backend.url


@pytest.mark.unit
@pytest.mark.parametrize(("top_level", "expected"), [(None, PassiveRule()), (False, None),
                                                     ({"paths": ["/ping"]}, PassiveRule(paths=("/ping",)))])
def test_a_labelled_container_answers_monitors_by_the_top_level_rule(top_level: Any, expected: Any) -> None:
    from hestia.backends.docker.discovery import DiscoverySettings, DockerDiscovery
    from hestia.gateway import Gateway

    document: dict[str, Any] = {"services": {}}
    if top_level is not None:
        document["passive"] = top_level
    clock = Clock()
    gateway = Gateway(parse(document), clock, agent=object(),  # type: ignore[arg-type]
                      build_backend=lambda service: FakeBackend(service.url))
    discovery = DockerDiscovery(gateway, DiscoverySettings(discover=True), clock, engine=object())  # type: ignore[arg-type]
    discovery._apply([{"Id": "id-web", "Names": ["/web"], "Labels": {"hestia.port": "8000"}}])
    assert gateway.route("web").config.passive == expected
