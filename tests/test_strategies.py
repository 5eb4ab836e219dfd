"""
Issue 7 in memory: strategies, multi-instance routes, model routes, host
routing, exclusive groups and dependencies, with FakeBackends and a Clock.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
from test_proxy import echoing
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from hestia import plugins
from hestia.config import ConfigError
from hestia.gateway import Gateway
from hestia.lifecycle import State
from hestia.loader import parse_config
from hestia.strategies import (
    Failover,
    InstanceView,
    LeastPending,
    PreferWarm,
    RoundRobin,
    StrategyError,
    load_strategy,
)
from hestia.testing import FakeBackend, MemoryGateway

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parent.parent


def view(index: int, state: str = "stopped", cost: float = 1, in_flight: int = 0, queued: int = 0,
         cooling: bool = False) -> InstanceView:
    return InstanceView(index, f"svc.{index}", f"http://h{index}", state, queued, in_flight, cost, cooling)


# -- the built-in strategies ---------------------------------------------------------


def test_round_robin_takes_turns() -> None:
    strategy = RoundRobin()
    views = [view(0), view(1), view(2)]
    assert [strategy.choose(views, None).index for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_least_pending_counts_in_flight_and_queued() -> None:
    views = [view(0, "ready", in_flight=2), view(1, "starting", queued=1), view(2, "ready", in_flight=3)]
    assert LeastPending().choose(views, None).index == 1


def test_prefer_warm_uses_a_ready_instance_else_starts_the_cheapest() -> None:
    strategy = PreferWarm()
    assert strategy.choose([view(0, cost=5), view(1, cost=1), view(2, cost=3)], None).index == 1
    assert strategy.choose([view(0, cost=1), view(1, "ready", cost=10)], None).index == 1
    assert strategy.choose([view(0, cost=1), view(1, "starting", cost=10)], None).index == 1
    # A cheap instance cooling down after crash loops is passed over.
    assert strategy.choose([view(0, "failed", cost=1, cooling=True), view(1, cost=9)], None).index == 1


def test_failover_goes_in_order_skipping_failed_ones() -> None:
    strategy = Failover()
    assert strategy.choose([view(0), view(1)], None).index == 0
    assert strategy.choose([view(0, "failed"), view(1)], None).index == 1
    assert strategy.choose([view(0, cooling=True), view(1, cooling=True)], None).index == 0


# -- loading plugins -----------------------------------------------------------------


def test_builtins_are_found_through_the_entry_point_group() -> None:
    from importlib.metadata import entry_points

    names = {entry.name for entry in entry_points(group="hestia.strategies")}
    assert {"round-robin", "least-pending", "prefer-warm", "failover"} <= names
    assert isinstance(load_strategy("prefer-warm"), PreferWarm)


@pytest.fixture
def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real module of strategy plugins, good and broken, importable from tmp_path."""
    (tmp_path / "some_plugins.py").write_text(textwrap.dedent("""
        from zope.interface import implementer
        from hestia.strategies import IRoutingStrategy

        class NoChoose:
            name = "no-choose"
            retries = False

        @implementer(IRoutingStrategy)
        class Declared:
            name = "declared"
            def choose(self, instances, request):
                return instances[-1]

        @implementer(IRoutingStrategy)
        class Good:
            name = "good"
            retries = False
            def __init__(self, pick=0):
                self.pick = pick
            def choose(self, instances, request):
                return instances[self.pick]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    real = plugins.entry_points

    def fake_entry_points(group: str, name: str | None = None) -> list[EntryPoint]:
        extra = [
            EntryPoint("no-choose", "some_plugins:NoChoose", group),
            EntryPoint("declared", "some_plugins:Declared", group),
            EntryPoint("good", "some_plugins:Good", group),
            EntryPoint("missing-module", "no_such_module_anywhere:Thing", group),
        ]
        found = [entry for entry in extra if name in (None, entry.name)]
        return found + list(real(group=group, **({"name": name} if name else {})))

    monkeypatch.setattr(plugins, "entry_points", fake_entry_points)
    return "some_plugins"


def test_a_broken_plugin_is_an_error_naming_it_and_what_it_lacks(plugin_module: str) -> None:
    with pytest.raises(StrategyError, match=r"'no-choose'.*does not provide IRoutingStrategy.*choose"):
        load_strategy("no-choose")
    with pytest.raises(StrategyError, match=r"'declared'.*retries"):
        load_strategy("declared")
    with pytest.raises(StrategyError, match=r"'missing-module'.*cannot be loaded.*ModuleNotFoundError"):
        load_strategy("missing-module")
    with pytest.raises(StrategyError, match=r"'good'.*does not accept these options.*colour"):
        load_strategy("good", {"colour": "red"})
    assert load_strategy("good", {"pick": 1}).pick == 1


def test_config_errors_name_file_service_key_and_plugin(plugin_module: str) -> None:
    def config(strategy: Any) -> dict[str, Any]:
        return {"services": {"llm": {"strategy": strategy, "instances": [{"url": "http://a:1"}]}}}

    with pytest.raises(ConfigError) as caught:
        parse_config(config("nope"), "h.yml", {})
    assert str(caught.value).startswith("h.yml: services.llm.strategy: no strategy plugin named 'nope'")
    with pytest.raises(ConfigError, match=r"^h.yml: services.llm.strategy: strategy plugin 'no-choose'.*choose"):
        parse_config(config("no-choose"), "h.yml", {})


@pytest.mark.parametrize(("services", "message"), [
    ({"llm": {"instances": [{"url": "ftp://x"}]}}, "services.llm.instances[0].url: expected an http"),
    ({"llm": {"instances": [{"url": "http://a:1", "cost": -1}]}}, "services.llm.instances[0].cost"),
    ({"llm": {"instances": [{"url": "http://a:1", "colour": 1}]}}, "services.llm.instances[0].colour: unknown"),
    ({"llm": {"instances": []}}, "services.llm.instances: expected a non-empty list"),
    ({"llm": {"url": "http://a:1", "instances": [{"url": "http://a:1"}]}}, "services.llm.url: a service with"),
    ({"ai": {"route_by": "model"}}, "services.ai.route_by: no service lists models"),
    ({"ai": {"route_by": "model", "targets": ["x"]}, "x": {"url": "http://a:1"}},
     "services.ai.targets: 'x' cannot be a target: it lists no models"),
    ({"ai": {"route_by": "model"}, "a": {"url": "http://a:1", "models": ["m"]},
      "b": {"url": "http://b:1", "models": ["m"]}}, "model 'm' is listed by both a and b"),
    ({"a": {"url": "http://a:1", "group": "gpu"}}, "services.a.group: no group named 'gpu'"),
    ({"a": {"url": "http://a:1", "depends_on": ["b"]}, "b": {"url": "http://b:1", "depends_on": ["a"]}},
     "dependency cycle: a -> b -> a"),
    ({"a": {"url": "http://a:1", "hosts": ["x.lan"]}, "b": {"url": "http://b:1", "hosts": ["X.lan"]}},
     "services.b.hosts: x.lan is already routed to a"),
])
def test_routing_config_errors(services: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config({"services": services}, "h.yml", {})


def test_example_plugin_package_tests_pass() -> None:
    """The third-party example is installed (dev.sh setup) and its own tests pass."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "strategies/hestia-time-window")],
        capture_output=True, text=True, timeout=120, cwd=ROOT / "strategies/hestia-time-window", check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- multi-instance routes with a Clock ----------------------------------------------


class Gw:
    """A Gateway on a Clock whose backends are FakeBackends, by lifecycle name."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.clock = Clock()
        self.fakes: dict[str, FakeBackend] = {}

        def build(service: Any) -> FakeBackend:
            fake = FakeBackend(url=service.url)
            self.fakes[service.name] = fake
            return fake

        self.gateway = Gateway(parse_config(raw, "t.yml", {}), self.clock, agent=object(),  # type: ignore[arg-type]
                               build_backend=build)

    def up(self, name: str) -> None:
        """Let the fake named C{name} finish starting and answer its probe."""
        fake = self.fakes[name]
        fake.finish_start()
        self.clock.advance(0.01)
        fake.answer_probe(True)

    def down(self, name: str) -> None:
        self.fakes[name].finish_stop()


def results(deferred: Deferred[Any]) -> list[Any]:
    box: list[Any] = []
    deferred.addBoth(box.append)
    return box


def test_prefer_warm_cold_starts_the_cheapest_and_fails_over_to_the_next() -> None:
    gw = Gw({"services": {"llm": {"strategy": "prefer-warm", "instances": [
        {"url": "http://gpu-vm:1", "cost": 10, "command": ["vm"]},
        {"url": "http://local:1", "cost": 1, "command": ["local"]},
    ]}}})
    route = gw.gateway.route("llm")
    got = results(route.acquire(None))
    assert route.instances[1].state is State.STARTING and route.instances[0].state is State.STOPPED
    gw.fakes["llm.1"].starts[-1].errback(Exception("no GPU"))  # the cheap one fails to start...
    assert route.instances[0].state is State.STARTING  # ...so the request moves on
    gw.up("llm.0")
    assert got and got[0].url == "http://gpu-vm:1"
    status = route.status()
    assert [(i["name"], i["state"], i["cost"]) for i in status["instances"]] == [
        ("llm.0", "ready", 10.0), ("llm.1", "failed", 1.0)]
    assert status["state"] == "ready" and status["in_flight"] == 1
    got[0].release()
    # The next request goes to the warm instance, not the cheap cold one.
    again = results(route.acquire(None))
    assert again[0].url == "http://gpu-vm:1"


def test_round_robin_spreads_and_each_instance_has_its_own_idle_clock() -> None:
    gw = Gw({"services": {"web": {"strategy": "round-robin", "idle_timeout": 10, "instances": [
        {"url": "http://a:1", "command": ["a"]}, {"url": "http://b:1", "command": ["b"]}]}}})
    route = gw.gateway.route("web")
    first, second = results(route.acquire(None)), results(route.acquire(None))
    gw.up("web.0")
    gw.up("web.1")
    assert (first[0].url, second[0].url) == ("http://a:1", "http://b:1")
    first[0].release()
    gw.clock.advance(5)
    second[0].release()
    gw.clock.advance(5.5)
    assert [i.state for i in route.instances] == [State.STOPPING, State.READY]


# -- model routes and host routing through the proxy ------------------------------------


def model_harness() -> MemoryGateway:
    return echoing({
        "ai": {"route_by": "model"},
        "llama": {"url": "http://llama:1", "command": ["llama"], "models": ["llama3:8b"], "hosts": ["llama.lan"]},
        "qwen": {"url": "http://qwen:1", "command": ["qwen"], "models": ["qwen2.5:7b"]},
    })


def test_model_lists_answer_the_union_without_starting_anything() -> None:
    h = model_harness()
    tags = h.json(h.result(h.request("GET", "/services/ai/api/tags")))
    assert [m["name"] for m in tags["models"]] == ["llama3:8b", "qwen2.5:7b"]
    models = h.json(h.result(h.request("GET", "/services/ai/v1/models")))
    assert [(m["id"], m["owned_by"]) for m in models["data"]] == [("llama3:8b", "llama"), ("qwen2.5:7b", "qwen")]
    assert h.fakes["llama"].starts == [] and h.fakes["qwen"].starts == []


def test_unknown_model_gets_each_apis_own_error_shape() -> None:
    h = model_harness()
    ollama = h.result(h.request("POST", "/services/ai/api/chat", data=json.dumps({"model": "nope"}).encode()))
    assert ollama.code == 404 and h.json(ollama) == {"error": "model 'nope' not found"}
    openai = h.result(h.request("POST", "/services/ai/v1/chat/completions", data=b'{"model": "nope"}'))
    body = h.json(openai)
    assert openai.code == 404 and body["error"]["code"] == "model_not_found" and "nope" in body["error"]["message"]
    missing = h.result(h.request("POST", "/services/ai/api/generate", data=b"{}"))
    assert missing.code == 400
    assert h.fakes["llama"].starts == [] and h.fakes["qwen"].starts == []


def test_a_request_goes_to_the_target_listing_its_model() -> None:
    h = model_harness()
    answer = h.request("POST", "/services/ai/api/chat?x=1", data=b'{"model": "qwen2.5:7b"}')
    h.settle()
    assert len(h.fakes["qwen"].starts) == 1 and h.fakes["llama"].starts == []
    h.fakes["qwen"].finish_start()
    h.reactor.advance(0.01)
    h.fakes["qwen"].answer_probe(True)
    response = h.result(answer)
    assert response.code == 200
    echoed = h.json(response)
    assert echoed["uri"] == "/api/chat?x=1" and json.loads(echoed["body"]) == {"model": "qwen2.5:7b"}
    by_query = h.result(h.request("GET", "/services/ai/api/show?model=qwen2.5:7b"))
    assert by_query.code == 200


def test_host_routing_sends_the_whole_path_unprefixed() -> None:
    h = model_harness()
    h.fakes["llama"].has_lifecycle = True
    answer = h.client.request("GET", "http://llama.lan:8080/api/tags?a=b")
    h.settle()
    h.fakes["llama"].finish_start()
    h.reactor.advance(0.01)
    h.fakes["llama"].answer_probe(True)
    echoed = h.json(h.result(answer))
    headers = {name.lower(): values for name, values in echoed["headers"]}
    assert echoed["uri"] == "/api/tags?a=b" and "x-forwarded-prefix" not in headers
    # Another Host still gets the gateway's own tree.
    other = h.result(h.client.request("GET", "http://gw:8080/v1/health"))
    assert other.code == 200


# -- exclusive groups and dependencies ---------------------------------------------------


def group_gw(min_residency: float = 5) -> Gw:
    return Gw({
        "groups": {"gpu0": {"exclusive": True, "min_residency": min_residency}},
        "services": {
            "a": {"url": "http://a:1", "command": ["a"], "group": "gpu0", "idle_timeout": 0, "start_timeout": 0,
                  "queue_timeout": 0},
            "b": {"url": "http://b:1", "command": ["b"], "group": "gpu0", "idle_timeout": 0, "start_timeout": 0,
                  "queue_timeout": 0},
        },
    })


def test_exclusive_group_swaps_only_after_in_flight_requests_finish() -> None:
    gw = group_gw(min_residency=0)
    a, b = gw.gateway.route("a"), gw.gateway.route("b")
    lease_a = results(a.acquire(None))
    gw.up("a")
    got_b = results(b.acquire(None))
    gw.clock.advance(1)
    # b waits at the gate: a keeps running while its request is in flight.
    assert b.state is State.STARTING and gw.fakes["b"].starts == [] and a.state is State.READY
    held_a = results(a.acquire(None))  # a new request for the yielding a is held, not served
    assert held_a == [] and a.status()["queued"] == 1
    lease_a[0].release()
    assert a.state is State.STOPPING and a.status()["state_reason"] == "exclusive"
    gw.down("a")
    gw.clock.advance(0)
    gw.up("b")
    assert got_b[0].url == "http://b:1"
    assert a.state is State.STARTING and gw.fakes["a"].starts[1:] == []  # queued again, behind b
    assert b.status()["group"]["swaps"] == 1


def test_alternating_load_loses_nothing_and_swaps_are_bounded_by_residency() -> None:
    gw = group_gw(min_residency=5)
    routes = {name: gw.gateway.route(name) for name in "ab"}
    answered = {"a": 0, "b": 0}
    failed: list[Any] = []
    sent = 0

    def serve(name: str) -> Any:
        def leased(lease: Any) -> None:
            answered[name] += 1
            gw.clock.callLater(0.3, lease.release)  # each request takes 0.3 s

        return leased

    def backends() -> None:
        # The fakes start and stop as soon as they are asked to.
        for name, route in routes.items():
            fake = gw.fakes[name]
            if route.state is State.STARTING and len(fake.starts) > len(fake.probes):
                gw.up(name)
            if route.state is State.STOPPING and fake.stops and not fake.stops[-1].called:
                gw.down(name)

    def run(seconds: float, send: bool) -> None:
        nonlocal sent
        for _ in range(int(seconds / 0.1)):
            if send and round(gw.clock.seconds() * 10) % 5 == 0:  # each member every 0.5 s
                for name in "ab":
                    sent += 1
                    routes[name].acquire(None).addCallbacks(serve(name), failed.append)
            gw.clock.advance(0.1)
            backends()

    run(60, send=True)
    run(30, send=False)
    assert not failed
    assert answered["a"] + answered["b"] == sent >= 240
    swaps = routes["a"].status()["group"]["swaps"]
    assert 2 <= swaps <= 60 / 5 + 2  # it did alternate, and never faster than min_residency
    assert all(route.in_flight == 0 and not len(route.queue) for route in routes.values())


def test_dependency_is_ready_before_the_dependent_and_outlives_it() -> None:
    gw = Gw({"services": {
        "app": {"url": "http://app:1", "command": ["app"], "depends_on": ["db"], "idle_timeout": 10},
        "db": {"url": "http://db:1", "command": ["db"], "idle_timeout": 10},
    }})
    app, db = gw.gateway.route("app"), gw.gateway.route("db")
    got = results(app.acquire(None))
    assert db.state is State.STARTING and gw.fakes["app"].starts == []  # db first
    gw.up("db")
    assert len(gw.fakes["app"].starts) == 1
    gw.up("app")
    got[0].release()
    gw.clock.advance(60)  # db's idle timeout passes many times: app still runs, so db stays
    assert app.state is State.STOPPING and db.state is State.READY
    gw.down("app")
    gw.clock.advance(10.5)
    assert db.state is State.STOPPING  # only after its dependent stopped


def test_shutdown_stops_dependents_first() -> None:
    gw = Gw({"services": {
        "app": {"url": "http://app:1", "command": ["app"], "depends_on": ["db"]},
        "db": {"url": "http://db:1", "command": ["db"]},
    }})
    results(gw.gateway.route("app").acquire(None))
    gw.up("db")
    gw.up("app")
    done = results(gw.gateway.shutdown())
    assert len(gw.fakes["app"].stops) == 1 and gw.fakes["db"].stops == []
    gw.down("app")
    assert len(gw.fakes["db"].stops) == 1 and not done
    gw.down("db")
    assert done
