"""
Routing (instances, route_by: model, hosts, groups, depends_on) in memory: the rules mutation
testing (issue 21) found unpinned.  A Gateway on a Clock with FakeBackends, or the in-memory
proxy harness; configuration errors judged by their key and message.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_proxy import echoing
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from hestia.config import ConfigError
from hestia.gateway import Gateway
from hestia.loader import parse_config
from hestia.testing import FakeBackend, MemoryGateway

pytestmark = pytest.mark.unit


class Gw:
    """A Gateway on a Clock whose backends are FakeBackends, by lifecycle name."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.fakes: dict[str, FakeBackend] = {}

        def build(service: Any) -> FakeBackend:
            fake = FakeBackend(url=service.url)
            self.fakes[service.name] = fake
            return fake

        self.gateway = Gateway(parse_config(raw, "t.yml", {}), self.clock, agent=object(),  # type: ignore[arg-type]
                               build_backend=build)

    def up(self, name: str) -> None:
        fake = self.fakes[name]
        fake.finish_start()
        self.clock.advance(0.01)
        fake.answer_probe(True)


def outcome(deferred: Deferred[Any]) -> list[Any]:
    box: list[Any] = []
    deferred.addBoth(box.append)
    return box


def refused(services: dict[str, Any], groups: Any = None) -> ConfigError:
    raw: dict[str, Any] = {"services": services}
    if groups is not None:
        raw["groups"] = groups
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, "t.yml", {})
    return caught.value


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("services", "key", "message"),
    [
        ({"a": {"instances": [{}]}}, "services.a.instances[0]", "an instance needs at least a url"),
        ({"a": {"url": "http://a:1", "models": ["m", "m"]}}, "services.a.models", "lists a name twice"),
        ({"a": {"url": "http://a:1", "models": []}}, "services.a.models", "lists no model"),
        ({"a": {"url": "http://a:1", "models": [""]}}, "services.a.models", "expected a list of names"),
        ({"a": {"url": "http://a:1", "strategy": "failover"}}, "services.a.strategy",
         "only a service with instances has a strategy"),
        ({"a": {"instances": [{"url": "http://a:1"}], "strategy": {"options": 1}}}, "services.a.strategy",
         "expected a strategy name, or a mapping with name: and its options"),
        ({"a": {"instances": [{"url": "http://a:1"}], "strategy": 7}}, "services.a.strategy",
         "expected a strategy name, or a mapping with name: and its options"),
        ({"a": {"url": "http://a:1", "depends_on": ["a"]}}, "services.a.depends_on",
         "a service cannot depend on itself"),
        ({"a": {"url": "http://a:1", "depends_on": ["ghost"]}}, "services.a.depends_on",
         "no service named 'ghost' to depend on"),
        ({"r": {"route_by": "model", "group": "g"}, "m": {"url": "http://m:1", "models": ["x"]}},
         "services.r.group", "not for a route_by service (set it on its targets)"),
        ({"r": {"route_by": "model", "models": ["x"]}, "m": {"url": "http://m:1", "models": ["y"]}},
         "services.r.models", "not for a route_by service (set it on its targets)"),
        ({"r": {"route_by": "model", "depends_on": ["m"]}, "m": {"url": "http://m:1", "models": ["y"]}},
         "services.r.depends_on", "not for a route_by service (set it on its targets)"),
        ({"r": {"route_by": "host"}}, "services.r.route_by", "expected model, got 'host'"),
        ({"r": {"route_by": "model"}}, "services.r.route_by", "no service lists models: give targets models: [...]"),
        ({"r": {"route_by": "model", "targets": ["m"]}, "m": {"url": "http://m:1"}}, "services.r.targets",
         "'m' cannot be a target: it lists no models"),
        ({"r": {"route_by": "model", "targets": ["z"]}, "m": {"url": "http://m:1", "models": ["y"]}},
         "services.r.targets", "'z' cannot be a target: no such service"),
        ({"a": {"url": "http://a:1", "targets": ["b"]}}, "services.a.targets",
         "only a route_by: model service has targets"),
        ({"a": {"url": "http://a:1", "hosts": ["A.lan."]}, "b": {"url": "http://b:1", "hosts": ["a.lan"]}},
         "services.b.hosts", "a.lan is already routed to a"),
        ({"a": {"instances": [{"url": "http://a:1"}], "route_by": "model"}}, "services.a",
         "give either instances or route_by, not both"),
        ({"a": {"url": "http://a:1", "group": "none"}}, "services.a.group",
         "no group named 'none' (groups: none: add a top-level groups: section)"),
    ],
)
def test_routing_errors(services: dict[str, Any], key: str, message: str) -> None:
    error = refused(services)
    assert (error.key, error.message) == (key, message)


@pytest.mark.parametrize("cost", [-1, True, "1"])
def test_a_bad_instance_cost_names_the_instance(cost: Any) -> None:
    error = refused({"a": {"instances": [{"url": "http://a:1", "cost": cost}]}})
    assert error.key == "services.a.instances[0].cost" and error.message.startswith("expected a number")
    assert error.message.endswith(f"got {cost!r}")


def test_model_listed_by_two_targets_and_groups_for_composites() -> None:
    error = refused({"r": {"route_by": "model"}, "m": {"url": "http://m:1", "models": ["x"]},
                     "n": {"url": "http://n:1", "models": ["x"]}})
    assert (error.key, error.message) == ("services.r.targets", "model 'x' is listed by both m and n")
    error = refused({"a": {"instances": [{"url": "http://a:1"}], "group": "g"}}, {"g": {"exclusive": True}})
    assert (error.key, error.message) == ("services.a.group", "only a single-instance service can be in a group")
    error = refused({"a": {"url": "http://a:1", "group": "x"}}, {"g": {}, "h": {}})
    assert error.message == "no group named 'x' (groups: g, h)"


def test_a_strategy_given_as_a_mapping_with_options() -> None:
    plan = parse_config({"services": {"a": {"strategy": {"name": "round-robin"},
                                            "instances": [{"url": "http://a:1"}, {"url": "http://b:1", "cost": 2}]}}},
                        "t.yml", {}).routing
    multi = plan.multi["a"]
    assert multi.strategy == "round-robin" and multi.strategy_options == {}
    assert [i.cost for i in multi.instances] == [1.0, 2.0]
    assert [i.service.name for i in multi.instances] == ["a.0", "a.1"]


def test_instances_inherit_the_parents_settings() -> None:
    plan = parse_config({"services": {"a": {
        "idle_timeout": 7, "keep_warm": True, "health": {"path": "/h"}, "env": {"K": "v"}, "cwd": "/srv",
        "instances": [{"url": "http://a:1", "command": "x"}, {"url": "http://b:1", "command": "y", "cwd": "/own"}]}}},
        "t.yml", {}).routing
    first, second = (i.service for i in plan.multi["a"].instances)
    assert first.idle_timeout == 7 and first.keep_warm and first.health.path == "/h" and dict(first.env) == {"K": "v"}
    assert first.cwd == "/srv" and second.cwd == "/own"


def test_instance_errors_name_the_instance() -> None:
    error = refused({"a": {"instances": [{"url": "http://a:1"}, {"url": "ftp://b"}]}})
    assert error.key == "services.a.instances[1].url"


# -- multi-instance routes ------------------------------------------------------------------


def test_multi_instance_status_and_stop_and_shutdown() -> None:
    gw = Gw({"services": {"web": {"strategy": "round-robin", "idle_timeout": 10, "instances": [
        {"url": "http://a:1", "command": ["a"]}, {"url": "http://b:1", "command": ["b"], "cost": 3}]}}})
    route = gw.gateway.route("web")
    lease = outcome(route.acquire(None))
    gw.clock.advance(2)
    gw.up("web.0")
    status = route.status()
    assert status["state"] == "ready" and status["strategy"] == "round-robin" and status["url"] is None
    assert status["state_since"] == route.instances[0].status()["state_since"]
    assert [i["cost"] for i in status["instances"]] == [1.0, 3.0]
    assert status["last_request_at"] is not None and status["in_flight"] == 1
    lease[0].release()
    stopped = outcome(route.stop("api"))
    assert stopped == []
    gw.fakes["web.0"].finish_stop()
    assert stopped == [None]
    assert outcome(route.shutdown()) == [None]


def test_a_failed_instance_shows_its_error_on_the_route() -> None:
    gw = Gw({"services": {"web": {"strategy": "failover", "instances": [
        {"url": "http://a:1", "command": ["a"]}, {"url": "http://b:1", "command": ["b"]}]}}})
    route = gw.gateway.route("web")
    got = outcome(route.acquire(None))
    gw.fakes["web.0"].starts[-1].errback(Exception("no disk"))
    gw.up("web.1")
    assert got[0].url == "http://b:1"
    assert route.status()["last_error"] == "start failed: no disk"


def test_the_fallback_keeps_the_request_for_the_strategy() -> None:
    seen: list[Any] = []
    gw = Gw({"services": {"web": {"strategy": "failover", "instances": [
        {"url": "http://a:1"}, {"url": "http://b:1"}]}}})
    route = gw.gateway.route("web")
    strategy = route.strategy
    original = strategy.choose

    def choose(views: Any, request: Any) -> Any:
        seen.append(request)
        return original(views, request)

    strategy.choose = choose
    marker = object()
    waiting = outcome(route.acquire(marker))
    gw.up("web.0")
    first = waiting[0]
    assert first.url == "http://a:1" and first.fallback is not None
    waiting = outcome(first.fallback())
    gw.up("web.1")
    second = waiting[0]
    assert second.url == "http://b:1" and second.fallback is None
    assert seen == [marker, marker]


# -- model routes ---------------------------------------------------------------------------


def model_harness() -> MemoryGateway:
    return echoing({
        "ai": {"route_by": "model"},
        "llama": {"url": "http://llama:1", "command": ["llama"], "models": ["llama3:latest", "llama3:8b"]},
        "qwen": {"url": "http://qwen:1", "command": ["qwen"], "models": ["qwen2.5:7b"]},
    })


def test_a_bare_model_name_means_its_latest_tag() -> None:
    harness = model_harness()
    route = harness.gateway.route("ai")
    assert route.target_for("llama3").name == "llama"
    assert route.target_for("qwen2.5") is None  # no qwen2.5:latest
    assert route.target_for("llama3:70b") is None
    assert route.target_for(None) is None and route.target_for("") is None


def test_model_route_status_lists_each_targets_models() -> None:
    harness = model_harness()
    status = harness.gateway.route("ai").status()
    assert status["targets"] == [
        {"name": "llama", "state": "stopped", "models": ["llama3:latest", "llama3:8b"]},
        {"name": "qwen", "state": "stopped", "models": ["qwen2.5:7b"]},
    ]
    assert status["state"] == "stopped" and status["backend"] == "route"


def test_model_lists_with_a_trailing_slash_and_by_head() -> None:
    harness = model_harness()
    tags = harness.result(harness.request("GET", "/services/ai/api/tags/"))
    assert tags.code == 200
    assert [m["name"] for m in harness.json(tags)["models"]] == ["llama3:latest", "llama3:8b", "qwen2.5:7b"]
    head = harness.result(harness.request("HEAD", "/services/ai/v1/models"))
    assert head.code == 200 and harness.result(head.content()) == b""
    assert harness.fakes["llama"].starts == []


def test_a_path_naming_no_model_is_404_and_a_model_path_without_one_400() -> None:
    harness = model_harness()
    other = harness.result(harness.request("GET", "/services/ai/metrics?x=1"))
    assert other.code == 404
    assert harness.json(other)["error"] == (
        "/metrics names no model: ai routes by model (JSON body 'model' or ?model=)")
    openai = harness.result(harness.request("POST", "/services/ai/v1/chat/completions", data=b"{}"))
    assert openai.code == 400
    assert harness.json(openai)["error"] == {"message": "model is required", "type": "invalid_request_error",
                                             "param": "model", "code": None}


def test_model_route_stop_stops_every_target_and_start_starts_none() -> None:
    harness = model_harness()
    route = harness.gateway.route("ai")
    assert outcome(route.start()) == [None] and harness.fakes["llama"].starts == []
    assert outcome(route.stop("api")) == [None]
    assert outcome(route.shutdown()) == [None]


def test_model_list_paths_are_exact_and_untagged_models_match_themselves() -> None:
    harness = echoing({
        "ai": {"route_by": "model"},
        "phi": {"url": "http://phi:1", "command": ["phi"], "models": ["phi"]},
    })
    route = harness.gateway.route("ai")
    assert route.target_for("phi").name == "phi"  # listed without a tag: found as written
    near = harness.result(harness.request("GET", "/services/ai/api/tagsX"))
    assert near.code == 404 and "names no model" in harness.json(near)["error"]


def test_route_statuses_say_what_they_are() -> None:
    harness = model_harness()
    assert harness.gateway.route("ai").status()["route_by"] == "model"
    gw = Gw({"services": {"web": {"instances": [{"url": "http://a:1", "command": ["a"]}]}}})
    status = gw.gateway.route("web").status()
    assert status["restart_pending"] is False and status["pending_changes"] == []


def test_a_request_leaving_a_multi_instance_route_leaves_the_instances_queue() -> None:
    gw = Gw({"services": {"web": {"instances": [{"url": "http://a:1", "command": ["a"]}]}}})
    route = gw.gateway.route("web")
    waiting = route.acquire(None)
    assert len(route.instances[0].queue) == 1
    waiting.addErrback(lambda _: None)
    waiting.cancel()
    assert len(route.instances[0].queue) == 0


# -- second round (issue 21): the exact shapes of the answers a model route gives itself -----------


def test_model_lists_have_the_shapes_ollama_and_openai_clients_read() -> None:
    harness = model_harness()
    tags = harness.json(harness.result(harness.request("GET", "/services/ai/api/tags")))
    assert tags["models"][0] == {"name": "llama3:latest", "model": "llama3:latest",
                                 "modified_at": "1970-01-01T00:00:00Z", "size": 0, "digest": "", "details": {}}
    models = harness.json(harness.result(harness.request("GET", "/services/ai/v1/models")))
    assert models["object"] == "list"
    assert models["data"][2] == {"id": "qwen2.5:7b", "object": "model", "created": 0, "owned_by": "qwen"}


def test_an_unknown_model_on_the_anthropic_api_is_one_anthropic_error_and_starts_nothing() -> None:
    harness = model_harness()
    response = harness.result(harness.request("POST", "/services/ai/v1/messages", data=b'{"model": "gpt-9"}'))
    assert response.code == 404
    body = harness.result(response.content())
    assert json.loads(body) == {"type": "error", "error": {"type": "not_found_error",
                                                           "message": "model 'gpt-9' not found"}}
    assert all(fake.starts == [] for fake in harness.fakes.values())


def test_a_strategy_that_chooses_no_instance_is_a_start_failure_naming_the_service() -> None:
    from hestia.errors import StartFailed

    gw = Gw({"services": {"pool": {"strategy": "failover", "instances": [
        {"url": "http://p:1", "command": ["p"]}, {"url": "http://q:1", "command": ["q"]}]}}})
    route = gw.gateway.route("pool")

    class Nobody:
        def choose(self, views: Any, request: Any) -> Any:
            return object()

    route.strategy = Nobody()
    got = outcome(route.acquire(None))
    assert got[0].check(StartFailed)
    assert got[0].value.service == "pool" and "chose no instance" in str(got[0].value)


def test_an_instance_may_cost_nothing() -> None:
    # The range is 0..MAX_COST: a free instance (a machine already paid for) is valid, no ConfigError.
    parse_config({"services": {"a": {"instances": [{"url": "http://a:1", "cost": 0},
                                                   {"url": "http://b:1", "cost": 0.5}]}}}, "t.yml", {})


def test_the_anthropic_model_list_has_anthropics_shape() -> None:
    harness = model_harness()
    response = harness.result(harness.request("GET", "/services/ai/v1/models",
                                              headers={"anthropic-version": "2023-06-01"}))
    listed = harness.json(response)
    assert listed["data"][0] == {"type": "model", "id": "llama3:latest", "display_name": "llama3:latest",
                                 "created_at": "1970-01-01T00:00:00Z"}
    assert harness.fakes["llama"].starts == []


def test_a_multi_instance_route_status_is_named() -> None:
    gw = Gw({"services": {"web": {"instances": [{"url": "http://a:1", "command": ["a"]}]}}})
    assert gw.gateway.route("web").status()["name"] == "web"


def alias_harness() -> MemoryGateway:
    return echoing({
        "ai": {"route_by": "model", "aliases": {"gpt-4o-mini": "qwen2.5:7b"}},
        "llama": {"url": "http://llama:1", "models": ["llama3:8b"]},
        "qwen": {"url": "http://qwen:1", "models": ["qwen2.5:7b"]},
    })


def test_an_alias_is_listed_after_the_models_and_owned_by_its_models_target() -> None:
    harness = alias_harness()
    models = harness.json(harness.result(harness.request("GET", "/services/ai/v1/models")))
    assert [(m["id"], m["owned_by"]) for m in models["data"]] == [
        ("llama3:8b", "llama"), ("qwen2.5:7b", "qwen"), ("gpt-4o-mini", "qwen")]
    tags = harness.json(harness.result(harness.request("GET", "/services/ai/api/tags")))
    assert [m["name"] for m in tags["models"]] == ["llama3:8b", "qwen2.5:7b", "gpt-4o-mini"]


def test_a_request_naming_an_alias_reaches_the_real_model_with_the_real_name() -> None:
    harness = alias_harness()
    response = harness.result(harness.request(
        "POST", "/services/ai/v1/chat/completions", data=b'{"model": "gpt-4o-mini", "stream": false}'))
    assert response.code == 200
    echoed = harness.json(response)
    assert json.loads(echoed["body"]) == {"model": "qwen2.5:7b", "stream": False}
    headers = {name.lower(): values for name, values in echoed["headers"]}
    assert headers["content-length"] == [str(len(echoed["body"]))]


def test_a_request_naming_the_real_model_is_forwarded_unchanged() -> None:
    harness = alias_harness()
    body = b'{"model":"qwen2.5:7b"}'
    echoed = harness.json(harness.result(harness.request("POST", "/services/ai/api/generate", data=body)))
    assert echoed["body"] == body.decode()


# -- fourth round (issue 21): the survivors of the seed-23 sample, on the routes themselves --------


def model_gateway(**route: Any) -> Gw:
    return Gw({"services": {
        "ai": {"route_by": "model", **route},
        "llama": {"url": "http://llama:1", "command": ["llama"], "models": ["llama3:latest", "llama3:8b"]},
        "qwen": {"url": "http://qwen:1", "command": ["qwen"], "models": ["qwen2.5:7b"]},
    }})


def dummy(method: bytes, body: bytes | None = None, **headers: str) -> Any:
    from io import BytesIO

    from twisted.web.test.requesthelper import DummyRequest

    request: Any = DummyRequest([])
    request.method = method
    request.content = BytesIO(body) if body is not None else None
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name.replace("_", "-"), [value])
    return request


def answered(route: Any, request: Any, rest: bytes) -> tuple[int, Any]:
    assert route.intercept(request, rest) is True
    return request.responseCode, json.loads(b"".join(request.written))


def test_the_anthropic_model_list_is_one_whole_page_from_the_first_to_the_last_model() -> None:
    route = model_gateway().gateway.route("ai")
    code, listed = answered(route, dummy(b"GET", anthropic_version="2023-06-01"), b"/v1/models")
    assert code == 200
    assert {key: value for key, value in listed.items() if key != "data"} == {
        "has_more": False, "first_id": "llama3:latest", "last_id": "qwen2.5:7b"}


def test_a_query_that_is_not_utf8_is_read_with_replacement_characters() -> None:
    route = model_gateway().gateway.route("ai")
    code, error = answered(route, dummy(b"GET"), b"/api/show?model=caf\xe9")
    assert (code, error) == (404, {"error": "model 'caf\ufffd' not found"})


def test_the_model_lists_are_answered_whatever_the_query_holds() -> None:
    route = model_gateway().gateway.route("ai")
    code, tags = answered(route, dummy(b"GET"), b"/api/tags?a=1?b=2")
    assert code == 200 and [model["name"] for model in tags["models"]] == ["llama3:latest", "llama3:8b", "qwen2.5:7b"]


def test_loading_events_are_off_unless_the_route_asks_for_them() -> None:
    streaming = b'{"model": "qwen2.5:7b", "stream": true}'
    off: Any = model_gateway().gateway.route("ai")
    assert off.wants_loading_events(dummy(b"POST", streaming), b"/v1/chat/completions") is False
    on: Any = model_gateway(loading_events=True).gateway.route("ai")
    assert on.wants_loading_events(dummy(b"POST", streaming), b"/v1/chat/completions") is True


def test_a_multi_instance_status_numbers_its_instances() -> None:
    gw = Gw({"services": {"web": {"instances": [{"url": "http://a:1", "command": ["a"]},
                                               {"url": "http://b:1", "command": ["b"]}]}}})
    assert [i["index"] for i in gw.gateway.route("web").status()["instances"]] == [0, 1]


def test_a_strategy_passes_over_an_instance_that_is_cooling_down() -> None:
    from hestia.errors import StartFailed

    gw = Gw({"services": {"web": {"strategy": "least-pending", "instances": [
        {"url": "http://a:1", "command": ["a"]}, {"url": "http://b:1", "command": ["b"]}]}}})
    route: Any = gw.gateway.route("web")
    for _ in range(3):  # three failed starts in a row: web.0 cools down
        waiting = outcome(route.acquire(None))
        gw.fakes["web.0"].starts[-1].errback(StartFailed("exit status 1"))
        gw.fakes["web.0"].finish_stop()
        assert waiting[0].check(StartFailed)
        gw.clock.advance(1)
    assert [view.cooling_down for view in route.views()] == [True, False]
    outcome(route.acquire(None))
    assert len(gw.fakes["web.0"].starts) == 3 and len(gw.fakes["web.1"].starts) == 1
