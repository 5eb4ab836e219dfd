"""
Issue 19, "A reload restarts only what must restart": the classification of
every setting (against the configuration schema and the reference), the diff,
and the lifecycle and gateway rules, step by step with a Clock and FakeBackends.

The live behaviour (a real twistd, real processes) is in tests/test_reload_live.py.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

import hestia.config as config_module
from hestia.config import ConfigError, ServiceConfig
from hestia.errors import QueueFull, ServiceUnavailable
from hestia.gateway import Gateway
from hestia.lifecycle import Lease, ServiceLifecycle, State
from hestia.loader import parse_config
from hestia.reload import (
    DERIVED,
    HOW_IT_RUNS,
    IN_PLACE,
    RELOAD_KEYS,
    SETTINGS,
    diff,
    reload_policy,
    running_settings,
    setting_keys,
)
from hestia.routing import INSTANCE_KEYS
from hestia.testing import FakeBackend

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "configuration-reference.md"


def unclassified(keys: set[str]) -> set[str]:
    return {key for key in keys if key not in SETTINGS and key not in DERIVED}


def schema_keys() -> set[str]:
    """Every key a service or an instance accepts, read from the schema at run time."""
    return set(config_module.SERVICE_KEYS) | set(config_module.BACKEND_SECTIONS) | set(INSTANCE_KEYS)


# -- the table against the schema ------------------------------------------------------


def test_every_key_of_the_schema_is_classified() -> None:
    missing = unclassified(schema_keys())
    assert not missing, f"keys of the schema not classified in hestia.reload.SETTINGS: {sorted(missing)}"


def test_a_new_key_left_out_would_fail() -> None:
    """The check above is not vacuous: a key the table lacks is reported."""
    assert unclassified(schema_keys() | {"brand_new_key"}) == {"brand_new_key"}


def every_kind_of_service() -> list[ServiceConfig]:
    raw = {
        "services": {
            "proc": {"url": "http://127.0.0.1:9", "command": ["true"], "env": {"A": "1"}, "cwd": "/",
                     "health": {"path": "/h"}, "keep_warm": True, "on_cold": "hold", "pass_authorization": True,
                     "models": ["m"], "hosts": ["proc.test"]},
            "box": {"url": "http://127.0.0.1:9", "docker": {"container": "box"}},
            "multi": {"strategy": "prefer-warm", "instances": [{"url": "http://127.0.0.1:8", "cost": 2}]},
            "router": {"route_by": "model"},
            "plain": {"url": "http://127.0.0.1:7"},
        }
    }
    config = parse_config(raw, "t.yml", {})
    instances = [item.service for plan in config.routing.multi.values() for item in plan.instances]
    return [*config.services.values(), *instances]


def test_every_field_of_a_parsed_service_maps_to_a_classified_key() -> None:
    """
    The diff walks ServiceConfig's fields: a field added to it (or to its
    tunables) without a line in the table is caught here, not only a key.
    """
    for service in every_kind_of_service():
        missing = unclassified(setting_keys(service))
        assert not missing, f"{service.name}: ServiceConfig fields not classified in hestia.reload.SETTINGS: {missing}"


def test_a_new_field_left_out_would_fail() -> None:
    extended = dataclasses.make_dataclass(
        "Extended", [("brand_new_field", int, dataclasses.field(default=0))], bases=(ServiceConfig,), frozen=True
    )
    [service, *_] = every_kind_of_service()
    copy = extended(**{item.name: getattr(service, item.name) for item in dataclasses.fields(service)})
    assert unclassified(setting_keys(copy)) == {"brand_new_field"}


def test_unclassified_changes_are_how_it_runs() -> None:
    """The safe side: a key nobody classified never restarts anything by surprise, it waits."""
    [service, *_] = every_kind_of_service()
    changed = dataclasses.replace(service, sections={**service.sections, "someday": {"x": 1}})
    assert diff(service, changed).how_it_runs == ("someday",)


def documented(marker: str) -> dict[str, str]:
    """The rows of the table after C{<!-- marker -->}: first cell -> second cell."""
    rows: dict[str, str] = {}
    current = False
    for line in REFERENCE.read_text(encoding="utf-8").splitlines():
        if line.strip() == f"<!-- {marker} -->":
            current = True
        elif current and (row := re.match(r"\|\s*`([^`]+)`\s*\|\s*([^|]+?)\s*\|", line)):
            rows[row.group(1)] = row.group(2)
        elif current and (line.startswith("#") or (rows and not line.startswith("|"))):
            break
    return rows


def test_the_reference_shows_the_same_table() -> None:
    rows = documented("reload-settings")
    assert rows, "docs/configuration-reference.md has no <!-- reload-settings --> table"
    assert rows == {key: applies.value for key, applies in SETTINGS.items()}
    assert set(documented("reload-keys")) == RELOAD_KEYS


def test_classes_of_the_keys_the_issue_names() -> None:
    for key in ("idle_timeout", "start_timeout", "queue_timeout", "stop_timeout", "queue_limit", "keep_warm",
                "health", "response_timeout", "max_concurrency", "cost_per_hour", "schedule", "prewarm",
                "strategy", "aliases", "passive", "pass_authorization"):
        assert SETTINGS[key] is IN_PLACE, key
    for key in ("command", "env", "cwd", "url", "docker", "semaphore", "wol", "exec"):
        assert SETTINGS[key] is HOW_IT_RUNS, key


# -- the diff -------------------------------------------------------------------------------


def service(**overrides: Any) -> ServiceConfig:
    raw = {"url": "http://127.0.0.1:9", "command": ["serve", "a"], "idle_timeout": 60, "stop_timeout": 3,
           "queue_timeout": 20, **overrides}
    return parse_config({"services": {"svc": raw}}, "t.yml", {}).services["svc"]


def test_diff_splits_the_changes() -> None:
    old = service()
    assert not diff(old, service())
    changes = diff(old, service(idle_timeout=5, command=["serve", "b"], env={"X": "1"}, health={"path": "/h"}))
    assert changes.in_place == ("health", "idle_timeout")
    assert changes.how_it_runs == ("command", "env")


def test_running_settings_take_the_new_in_place_settings_only() -> None:
    old, new = service(), service(idle_timeout=5, command=["serve", "b"], health={"path": "/h"})
    running = running_settings(old, new)
    assert running.idle_timeout == 5 and running.health.path == "/h"
    assert running.command == old.command
    assert diff(running, new).how_it_runs == ("command",) and not diff(running, new).in_place


def test_reload_section() -> None:
    config = parse_config({"reload": {"restart": "now"}, "services": {}}, "t.yml", {})
    assert reload_policy(config.sections).restart == "now"
    assert reload_policy(parse_config({"services": {}}, "t.yml", {}).sections).restart == "next_stop"
    with pytest.raises(ConfigError, match=r"t.yml: reload.restart: expected next_stop or now"):
        parse_config({"reload": {"restart": "later"}}, "t.yml", {})
    with pytest.raises(ConfigError, match=r"reload.restrat: unknown key \(did you mean restart\?\)"):
        parse_config({"reload": {"restrat": "now"}}, "t.yml", {})


# -- the lifecycle ---------------------------------------------------------------------------


class Built:
    """A lifecycle with a FakeBackend, and every backend built for it later."""

    def __init__(self, **overrides: Any) -> None:
        self.clock = Clock()
        self.backends = [FakeBackend()]
        self.lifecycle = ServiceLifecycle(service(**overrides), self.backends[0], self.clock)
        self.lifecycle.build_backend = self._build

    def _build(self, config: ServiceConfig) -> FakeBackend:
        backend = FakeBackend()
        backend.built_for = config  # type: ignore[attr-defined]
        self.backends.append(backend)
        return backend

    @property
    def backend(self) -> FakeBackend:
        return self.backends[-1]

    def make_ready(self) -> None:
        started = self.lifecycle.start()
        self.backend.finish_start()
        self.clock.advance(0)
        self.backend.answer_probe(True)
        assert self.lifecycle.state is State.READY
        assert started.called


def outcome(deferred: Deferred[Any]) -> list[Any]:
    seen: list[Any] = []
    deferred.addBoth(seen.append)
    return seen


def test_a_new_idle_timeout_applies_to_the_running_service() -> None:
    built = Built(idle_timeout=60)
    built.make_ready()
    built.clock.advance(10)
    built.lifecycle.reconfigure(service(idle_timeout=20))
    built.clock.advance(9.9)
    assert built.lifecycle.state is State.READY
    built.clock.advance(0.2)  # 20 s after it became ready, not 60
    assert built.lifecycle.state is State.STOPPING
    assert len(built.backends) == 1 and not built.lifecycle.status()["restart_pending"]


def test_a_new_idle_timeout_counts_once_the_requests_in_flight_end() -> None:
    built = Built(idle_timeout=60)
    built.make_ready()
    lease = outcome(built.lifecycle.acquire())[0]
    built.lifecycle.reconfigure(service(idle_timeout=5))
    built.clock.advance(100)
    assert built.lifecycle.state is State.READY  # never idle-stopped with a request in flight
    lease.release()
    built.clock.advance(5.1)
    assert built.lifecycle.state is State.STOPPING


def test_a_new_command_waits_for_the_next_natural_stop() -> None:
    built = Built(idle_timeout=30)
    built.make_ready()
    first = built.backends[0]
    built.lifecycle.reconfigure(service(idle_timeout=30, command=["serve", "b"]))
    status = built.lifecycle.status()
    assert status["restart_pending"] is True and status["pending_changes"] == ["command"]
    assert built.lifecycle.state is State.READY and not first.stops  # not stopped by the reload
    built.clock.advance(30)  # the idle stop
    first.finish_stop()
    assert built.lifecycle.state is State.STOPPED
    assert len(built.backends) == 2 and built.backends[1].built_for.command == ("serve", "b")
    assert built.lifecycle.status()["restart_pending"] is False
    built.make_ready()
    assert built.backend is built.backends[1] and built.backend.starts


def test_restart_drains_holds_new_requests_and_serves_them_from_the_new_run() -> None:
    built = Built()
    built.make_ready()
    first = built.backends[0]
    in_flight = outcome(built.lifecycle.acquire())[0]
    built.lifecycle.reconfigure(service(command=["serve", "b"]))
    restarted = outcome(built.lifecycle.restart())
    waiting = outcome(built.lifecycle.acquire())
    assert not waiting and not first.stops  # held; the request in flight goes on
    in_flight.release()
    assert first.stops and built.lifecycle.state is State.STOPPING
    first.finish_stop()
    assert built.lifecycle.state is State.STARTING
    assert len(built.backends) == 2
    built.backend.finish_start()
    built.clock.advance(0)
    built.backend.answer_probe(True)
    assert isinstance(waiting[0], Lease) and restarted == [None]
    assert len(built.backend.starts) == 1  # one start, not two


def test_restart_gives_the_requests_in_flight_up_to_stop_timeout() -> None:
    built = Built(stop_timeout=3)
    built.make_ready()
    outcome(built.lifecycle.acquire())
    built.lifecycle.restart()
    built.clock.advance(2.9)
    assert not built.backends[0].stops
    built.clock.advance(0.2)
    assert built.backends[0].stops  # nothing waits forever


def test_restart_of_a_stopped_service_starts_it() -> None:
    built = Built()
    restarted = outcome(built.lifecycle.restart())
    assert built.lifecycle.state is State.STARTING
    built.backend.finish_start()
    built.clock.advance(0)
    built.backend.answer_probe(True)
    assert restarted == [None]


def test_retire_waits_for_the_requests_in_flight_then_stops_for_good() -> None:
    built = Built(stop_timeout=30)
    built.make_ready()
    lease = outcome(built.lifecycle.acquire())[0]
    built.lifecycle.retire()
    built.clock.advance(10)
    assert not built.backends[0].stops
    lease.release()
    assert built.backends[0].stops
    built.backends[0].finish_stop()
    assert built.lifecycle.state is State.STOPPED
    assert outcome(built.lifecycle.acquire())[0].check(Exception)  # never starts again


# -- the gateway --------------------------------------------------------------------------------


class Fleet:
    def __init__(self, services: dict[str, Any], **top: Any) -> None:
        self.clock = Clock()
        self.built: dict[str, list[FakeBackend]] = {}
        self.gateway = Gateway(self.config(services, **top), self.clock, agent=object(),  # type: ignore[arg-type]
                               build_backend=self._build)

    @staticmethod
    def config(services: dict[str, Any], **top: Any) -> Any:
        return parse_config({"services": services, **top}, "t.yml", {})

    def _build(self, config: ServiceConfig) -> FakeBackend:
        backend = FakeBackend(has_lifecycle=config.backend != "static")
        self.built.setdefault(config.name, []).append(backend)
        return backend

    def ready(self, name: str) -> ServiceLifecycle:
        lifecycle: ServiceLifecycle = self.gateway.route(name)
        lifecycle.start()
        self.built[name][-1].finish_start()
        self.clock.advance(0)
        self.built[name][-1].answer_probe(True)
        assert lifecycle.state is State.READY
        return lifecycle


def proc(command: str = "a", **settings: Any) -> dict[str, Any]:
    return {"url": "http://127.0.0.1:9", "command": ["serve", command], **settings}


def test_apply_keeps_the_lifecycle_and_reports_what_changed() -> None:
    fleet = Fleet({"a": proc(idle_timeout=60), "b": proc(), "c": proc()})
    a, b = fleet.ready("a"), fleet.ready("b")
    summary = fleet.gateway.apply(fleet.config({"a": proc(idle_timeout=5), "b": proc("new"), "c": proc()}))
    assert summary["in_place"] == {"a": ["idle_timeout"]}
    assert summary["restart_pending"] == {"b": ["command"]}
    assert summary["unchanged"] == ["c"] and summary["changed"] == ["a", "b"]
    assert fleet.gateway.route("a") is a and fleet.gateway.route("b") is b
    assert a.state is State.READY and b.state is State.READY
    assert not fleet.built["a"][0].stops and not fleet.built["b"][0].stops


def test_restart_now_is_the_old_behaviour() -> None:
    fleet = Fleet({"b": proc()})
    fleet.ready("b")
    summary = fleet.gateway.apply(fleet.config({"b": proc("new")}, reload={"restart": "now"}))
    assert summary["restarted"] == {"b": ["command"]}
    assert fleet.built["b"][0].stops


def test_a_removed_service_finishes_its_requests_first() -> None:
    fleet = Fleet({"a": proc(stop_timeout=30), "b": proc()})
    a = fleet.ready("a")
    lease = outcome(a.acquire())[0]
    summary = fleet.gateway.apply(fleet.config({"b": proc()}))
    assert summary["removed"] == ["a"]
    assert "a" not in fleet.gateway.services
    assert not fleet.built["a"][0].stops
    lease.release()
    assert fleet.built["a"][0].stops


def test_instances_are_reconfigured_one_by_one() -> None:
    two = [proc("x"), proc("y")]
    fleet = Fleet({"m": {"instances": two, "idle_timeout": 60}})
    first = list(fleet.gateway.route("m").instances)
    summary = fleet.gateway.apply(fleet.config({"m": {"instances": [proc("x"), proc("z")], "idle_timeout": 9}}))
    after = list(fleet.gateway.route("m").instances)
    assert after == first  # the same lifecycles
    assert [lifecycle.config.idle_timeout for lifecycle in after] == [9, 9]
    assert after[1].pending_changes == ("command",) and not after[0].pending_changes
    assert summary["restart_pending"] == {"m": ["command"]}
    status = fleet.gateway.route("m").status()
    assert status["restart_pending"] is True and status["pending_changes"] == ["command"]


def test_a_multi_instance_restart_goes_one_instance_at_a_time() -> None:
    fleet = Fleet({"m": {"instances": [proc("x"), proc("y")]}})
    first, second = fleet.gateway.route("m").instances
    one, two = fleet.built["m.0"][0], fleet.built["m.1"][0]
    for lifecycle, backend in ((first, one), (second, two)):
        lifecycle.start()
        backend.finish_start()
        fleet.clock.advance(0)
        backend.answer_probe(True)
    restarted = outcome(fleet.gateway.restart("m"))
    assert first.state is State.STOPPING and second.state is State.READY  # the other one keeps serving
    one.finish_stop()
    one.starts[-1].callback(None)
    fleet.clock.advance(0)
    one.answer_probe(True)
    assert first.state is State.READY and second.state is State.STOPPING
    two.finish_stop()
    two.starts[-1].callback(None)
    fleet.clock.advance(0)
    two.answer_probe(True)
    assert second.state is State.READY and restarted == [None]


def test_a_start_under_way_gets_the_new_start_timeout() -> None:
    built = Built(start_timeout=30)
    built.lifecycle.start().addErrback(lambda failure: None)
    built.clock.advance(5)
    built.lifecycle.reconfigure(service(start_timeout=10))
    built.clock.advance(4.9)
    assert built.lifecycle.state is State.STARTING
    built.clock.advance(0.2)
    assert built.lifecycle.state is State.FAILED
    assert "start_timeout 10s" in (built.lifecycle.last_error or "")


def test_a_new_queue_limit_applies_to_waiting_requests() -> None:
    built = Built(queue_limit=5)
    for _ in range(2):
        built.lifecycle.acquire().addErrback(lambda failure: None)
    built.lifecycle.reconfigure(service(queue_limit=2))
    refused = outcome(built.lifecycle.acquire())
    assert refused and refused[0].check(QueueFull)


def test_a_shutdown_during_a_restart_ends_it() -> None:
    built = Built(stop_timeout=3)
    built.make_ready()
    outcome(built.lifecycle.acquire())
    restarted = outcome(built.lifecycle.restart())
    built.lifecycle.shutdown()
    built.backends[0].finish_stop()
    built.clock.advance(5)
    assert built.lifecycle.state is State.STOPPED
    assert len(built.backends[0].starts) == 1  # not started again
    assert restarted and restarted[0].check(ServiceUnavailable)


def test_a_second_restart_joins_the_first() -> None:
    built = Built()
    built.make_ready()
    lease = outcome(built.lifecycle.acquire())[0]
    first, second = outcome(built.lifecycle.restart()), outcome(built.lifecycle.restart())
    assert not first and not second  # both wait for the drain
    lease.release()
    built.backend.finish_stop()
    built.backend.starts[-1].callback(None)
    built.clock.advance(0)
    built.backend.answer_probe(True)
    assert first == [None] and second == [None]
    assert len(built.backend.starts) == 2 and len(built.backend.stops) == 1


def test_a_static_url_change_takes_effect_at_once() -> None:
    fleet = Fleet({"s": {"url": "http://127.0.0.1:7"}})
    old = fleet.gateway.route("s")
    summary = fleet.gateway.apply(fleet.config({"s": {"url": "http://127.0.0.1:8"}}))
    assert summary["replaced"] == {"s": ["url"]}
    assert fleet.gateway.route("s") is not old
    assert old.state is State.READY and not fleet.built["s"][0].stops  # nothing to stop, nothing stopped


def test_a_model_router_change_stops_none_of_its_targets() -> None:
    services = {"t": proc(models=["m"]), "r": {"route_by": "model", "targets": ["t"]}}
    fleet = Fleet(services)
    target = fleet.ready("t")
    fleet.gateway.apply(fleet.config({**services, "t": proc(models=["m", "n"])}))
    assert target.state is State.READY and not fleet.built["t"][0].stops
    assert fleet.gateway.route("r").models() == ["m", "n"]


def test_a_service_put_back_while_its_old_run_drains_waits_for_it() -> None:
    """Removed, then put back before its stream ended: no second process on the same port."""
    fleet = Fleet({"a": proc(stop_timeout=30)})
    old = fleet.ready("a")
    lease = outcome(old.acquire())[0]
    fleet.gateway.apply(fleet.config({}))
    fleet.gateway.apply(fleet.config({"a": proc(stop_timeout=30)}))
    new = fleet.gateway.route("a")
    assert new is not old
    waiting = outcome(new.acquire())
    fleet.clock.advance(0)
    assert not fleet.built["a"][1].starts  # not launched while the old one serves
    lease.release()
    fleet.built["a"][0].finish_stop()
    assert len(fleet.built["a"][1].starts) == 1
    fleet.built["a"][1].finish_start()
    fleet.clock.advance(0)
    fleet.built["a"][1].answer_probe(True)
    assert isinstance(waiting[0], Lease)


def test_a_group_member_restarts_through_its_group() -> None:
    fleet = Fleet({"a": proc(group="gpu"), "b": proc("b", group="gpu")}, groups={"gpu": {"exclusive": True}})
    a = fleet.ready("a")
    fleet.gateway.apply(fleet.config({"a": proc("new", group="gpu"), "b": proc("b", group="gpu")},
                                     groups={"gpu": {"exclusive": True}}))
    restarted = outcome(fleet.gateway.restart("a"))
    fleet.built["a"][0].finish_stop()
    assert a.state is State.STARTING and a.backend is fleet.built["a"][1]
    assert a.lifecycle.built_from.command == ("serve", "new")
    fleet.built["a"][1].finish_start()
    fleet.clock.advance(0)
    fleet.built["a"][1].answer_probe(True)
    assert restarted == [None] and a.state is State.READY


@pytest.mark.parametrize("section", [
    {"exec": {"start": ["wake", "a"], "stop": ["sleep", "a"]}},
    {"wol": {"mac": "52:54:00:ab:cd:ef", "stop_command": ["ssh", "box", "suspend"]}},
])
def test_a_machine_is_never_stopped_by_a_reload(section: dict[str, Any]) -> None:
    """exec and wol: new commands wait for the machine's next stop, even with restart: now."""
    kind = next(iter(section))
    first = {"url": "http://127.0.0.1:9", **section}
    fleet = Fleet({"m": first})
    machine = fleet.ready("m")
    changed = {"url": "http://127.0.0.1:9", kind: {**section[kind], "stop_command" if kind == "wol" else "stop":
                                                   ["poweroff", "m"]}}
    summary = fleet.gateway.apply(fleet.config({"m": changed}, reload={"restart": "now"}))
    assert summary["restart_pending"] == {"m": [kind]} and not summary["restarted"]
    assert machine.state is State.READY and not fleet.built["m"][0].stops
