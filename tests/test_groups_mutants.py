"""
Exclusive groups and dependencies in memory: the rules mutation testing (issue 21) found
unpinned.  A Gateway on a Clock with FakeBackends; through the routes' acquire/status and
the gateway's reload, never the group's internals.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_routing_mutants import Gw, outcome

from hestia.config import ConfigError
from hestia.errors import StartFailed
from hestia.lifecycle import State
from hestia.loader import parse_config

pytestmark = pytest.mark.unit


def member(name: str, **keys: Any) -> dict[str, Any]:
    return {"url": f"http://{name}:1", "command": [name], "group": "gpu", "idle_timeout": 0,
            "start_timeout": 0, "queue_timeout": 0, **keys}


def group_gw(**group: Any) -> Gw:
    return Gw({"groups": {"gpu": {"exclusive": True, **group}},
               "services": {"a": member("a"), "b": member("b")}})


def test_groups_section_defaults_and_errors() -> None:
    plan = parse_config({"groups": {"g": {}, "h": {"exclusive": "on", "min_residency": "1m"}}}, "t.yml", {}).routing
    assert (plan.groups["g"].exclusive, plan.groups["g"].min_residency) == (False, 30.0)
    assert (plan.groups["h"].exclusive, plan.groups["h"].min_residency) == (True, 60.0)
    for groups, key in (({"G": {}}, "groups.G"), ({"g": {"exclusiv": True}}, "groups.g.exclusiv"),
                        ({"g": {"min_residency": "x"}}, "groups.g.min_residency"), ({"g": 1}, "groups.g"),
                        ({"g": {"exclusive": "maybe"}}, "groups.g.exclusive"), ([], "groups")):
        with pytest.raises(ConfigError) as caught:
            parse_config({"groups": groups}, "t.yml", {})
        assert caught.value.key == key


def test_a_dependency_cycle_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"services": {
            "a": {"url": "http://a:1", "depends_on": ["b"]},
            "b": {"url": "http://b:1", "depends_on": ["c"]},
            "c": {"url": "http://c:1", "depends_on": ["a"]},
        }}, "t.yml", {})
    assert caught.value.key == "services.a.depends_on"
    assert caught.value.message == "dependency cycle: a -> b -> c -> a"


def test_the_group_status_names_the_holder_and_who_waits() -> None:
    gw = group_gw(min_residency=100)
    a, b = gw.gateway.route("a"), gw.gateway.route("b")
    assert a.status()["group"] == {"name": "gpu", "exclusive": True, "min_residency": 100.0, "holder": None,
                                   "yielding": False, "waiting": [], "swaps": 0}
    lease = outcome(a.acquire(None))
    gw.up("a")
    outcome(b.acquire(None))
    status = b.status()
    assert status["group"]["holder"] == "a" and status["group"]["waiting"] == ["b"]
    assert status["state"] == "starting" and gw.fakes["b"].starts == []
    # a keeps the group for its min_residency, counted from when it got it.
    lease[0].release()
    gw.clock.advance(99)
    assert a.state is State.READY
    gw.clock.advance(1.1)
    assert a.state is State.STOPPING and a.status()["state_reason"] == "exclusive"
    assert b.status()["group"]["yielding"] is True
    gw.fakes["a"].finish_stop()
    gw.clock.advance(0)
    group = b.status()["group"]
    assert group["holder"] == "b" and group["yielding"] is False and group["waiting"] == []


def test_a_held_request_counts_in_the_members_queue_and_is_bounded() -> None:
    gw = Gw({"groups": {"gpu": {"exclusive": True, "min_residency": 0}},
             "services": {"a": member("a", queue_limit=1), "b": member("b")}})
    a, b = gw.gateway.route("a"), gw.gateway.route("b")
    first = outcome(a.acquire(None))
    gw.up("a")
    outcome(b.acquire(None))  # a must yield, but has a request in flight
    held = outcome(a.acquire(None))
    assert held == [] and a.status()["queued"] == 1
    refused = outcome(a.acquire(None))[0].value
    assert refused.status == 503 and refused.service == "a"
    first[0].release()


def test_a_member_already_running_at_reload_keeps_the_group() -> None:
    raw = {"groups": {"gpu": {"exclusive": True, "min_residency": 0}},
           "services": {"a": member("a"), "b": member("b")}}
    gw = Gw(raw)
    a = gw.gateway.route("a")
    lease = outcome(a.acquire(None))
    gw.up("a")
    lease[0].release()
    gw.gateway.apply(parse_config(raw, "t.yml", {}))
    assert gw.gateway.route("b").status()["group"]["holder"] == "a"
    b = gw.gateway.route("b")
    outcome(b.acquire(None))
    assert gw.fakes["b"].starts == []  # b waits for a, which yields at once (min_residency 0)
    assert b.state is State.STARTING and a.state is State.STOPPING and a.status()["state_reason"] == "exclusive"


def test_a_failed_dependency_fails_the_dependent_naming_it() -> None:
    gw = Gw({"services": {
        "app": {"url": "http://app:1", "command": ["app"], "depends_on": ["db"]},
        "db": {"url": "http://db:1", "command": ["db"]},
    }})
    got = outcome(gw.gateway.route("app").acquire(None))
    gw.fakes["db"].starts[-1].errback(StartFailed("db exploded"))
    error = got[0].value
    assert isinstance(error, StartFailed)
    assert error.reason == "dependency db did not start: db exploded"
    assert gw.fakes["app"].starts == []


def test_a_stopped_dependent_releases_its_dependency() -> None:
    gw = Gw({"services": {
        "app": {"url": "http://app:1", "command": ["app"], "depends_on": ["db"], "idle_timeout": 10},
        "db": {"url": "http://db:1", "command": ["db"], "idle_timeout": 10},
    }})
    app, db = gw.gateway.route("app"), gw.gateway.route("db")
    lease = outcome(app.acquire(None))
    gw.up("db")
    gw.up("app")
    assert db.in_flight == 1  # app holds db
    lease[0].release()
    gw.clock.advance(10)
    gw.fakes["app"].finish_stop()
    assert app.state is State.STOPPED and db.in_flight == 0


def test_a_holder_that_becomes_ready_while_another_waits_yields_then() -> None:
    gw = group_gw(min_residency=0)
    a, b = gw.gateway.route("a"), gw.gateway.route("b")
    outcome(a.start())
    waiting = outcome(b.acquire(None))
    assert a.state is State.STARTING and b.state is State.STARTING
    gw.up("a")
    gw.clock.advance(0)
    assert a.state is State.STOPPING and a.status()["state_reason"] == "exclusive"
    gw.fakes["a"].finish_stop()
    gw.clock.advance(0)
    gw.up("b")
    assert waiting[0].url == "http://b:1"


def test_waiting_for_a_group_is_logged_with_its_holder() -> None:
    from twisted.logger import formatEvent, globalLogPublisher

    gw = group_gw(min_residency=100)
    a, b = gw.gateway.route("a"), gw.gateway.route("b")
    outcome(a.acquire(None))
    gw.up("a")
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        outcome(b.acquire(None))
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert "b waits for exclusive group gpu (held by a)" in [formatEvent(event) for event in logged]


def test_every_instance_of_a_dependent_waits_for_its_dependency() -> None:
    gw = Gw({"services": {
        "pool": {"depends_on": ["db"], "strategy": "failover",
                 "instances": [{"url": "http://p:1", "command": ["p"]}, {"url": "http://q:1", "command": ["q"]}]},
        "db": {"url": "http://db:1", "command": ["db"]},
    }})
    got = outcome(gw.gateway.route("pool").acquire(None))
    assert len(gw.fakes["db"].starts) == 1 and gw.fakes["pool.0"].starts == []
    gw.up("db")
    gw.up("pool.0")
    assert got[0].url == "http://p:1"


def test_a_holder_yielding_its_group_is_logged_naming_who_gets_it() -> None:
    from twisted.logger import capturedLogs, formatEvent

    gw = group_gw(min_residency=0)
    a, b = gw.gateway.route("a"), gw.gateway.route("b")
    outcome(a.start())
    outcome(b.acquire(None))
    with capturedLogs() as captured:
        gw.up("a")
        gw.clock.advance(0)
    assert "a yields exclusive group gpu to b" in [formatEvent(event) for event in captured]


def test_a_bad_group_name_says_what_a_name_may_be() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"groups": {"Big GPU": {}}}, "t.yml", {})
    assert caught.value.key == "groups.Big GPU"
    assert str(caught.value) == "t.yml: groups.Big GPU: group names must match [a-z0-9][a-z0-9_-]*"


def test_a_reload_that_takes_services_out_of_their_group_lets_them_start_freely() -> None:
    gw = group_gw(min_residency=100)
    a = gw.gateway.route("a")
    outcome(a.acquire(None))
    gw.up("a")
    plain = {name: {k: v for k, v in member(name).items() if k != "group"} for name in ("a", "b")}
    gw.gateway.apply(parse_config({"services": plain}, "t.yml", {}))
    gw.clock.advance(0)
    b = gw.gateway.route("b")
    got = outcome(b.acquire(None))
    assert b.state is State.STARTING and a.state is State.READY  # no group: nobody yields
    gw.up("b")
    assert got[0].url == "http://b:1"


# -- fourth round (issue 21): the survivors of the seed-23 sample ---------------------------------


def test_a_request_for_the_holder_of_an_uncontested_group_is_served_at_once() -> None:
    gw = group_gw(min_residency=0)
    a = gw.gateway.route("a")
    outcome(a.start())
    gw.up("a")
    lease = outcome(a.acquire(None))
    assert lease and lease[0].url == "http://a:1"
    assert a.status()["queued"] == 0 and a.in_flight == 1


def test_a_request_for_a_third_member_while_the_holder_yields_waits_for_the_group_itself() -> None:
    gw = Gw({"groups": {"gpu": {"exclusive": True, "min_residency": 0}},
             "services": {"a": member("a"), "b": member("b"), "c": member("c")}})
    a, c = gw.gateway.route("a"), gw.gateway.route("c")
    first = outcome(a.acquire(None))
    gw.up("a")
    outcome(gw.gateway.route("b").acquire(None))  # a must yield, but has a request in flight
    assert a.status()["group"]["yielding"] is True
    outcome(c.acquire(None))  # not a's request: c starts and queues for the group after b
    assert c.state is State.STARTING and c.status()["group"]["waiting"] == ["b", "c"]
    first[0].release()


def test_a_held_request_refused_for_a_full_queue_is_told_to_retry_after_5_seconds() -> None:
    gw = Gw({"groups": {"gpu": {"exclusive": True, "min_residency": 0}},
             "services": {"a": member("a", queue_limit=1), "b": member("b")}})
    a = gw.gateway.route("a")
    first = outcome(a.acquire(None))
    gw.up("a")
    outcome(gw.gateway.route("b").acquire(None))
    outcome(a.acquire(None))  # held while a yields
    refused = outcome(a.acquire(None))[0].value
    assert refused.status == 503 and refused.retry_after == 5.0
    first[0].release()


def test_a_holder_ready_a_second_time_while_another_waits_yields_again() -> None:
    gw = group_gw(min_residency=0)
    a, b = gw.gateway.route("a"), gw.gateway.route("b")
    outcome(a.start())
    gw.up("a")
    gw.clock.advance(0)  # ready with nobody waiting: a keeps the group
    outcome(a.stop())
    gw.fakes["a"].finish_stop()
    gw.clock.advance(0)
    outcome(a.start())  # a holds the group again
    waiting = outcome(b.acquire(None))
    gw.up("a")
    gw.clock.advance(0)
    assert a.state is State.STOPPING and a.status()["state_reason"] == "exclusive"
    gw.fakes["a"].finish_stop()
    gw.clock.advance(0)
    gw.up("b")
    assert waiting[0].url == "http://b:1"


def test_a_member_stopped_while_waiting_for_the_group_leaves_the_line() -> None:
    gw = group_gw(min_residency=100)
    a, b = gw.gateway.route("a"), gw.gateway.route("b")
    outcome(a.start())
    gw.up("a")
    outcome(b.acquire(None))
    assert a.status()["group"]["waiting"] == ["b"]
    outcome(b.stop("api"))  # its start is abandoned while it waits
    assert a.status()["group"]["waiting"] == []
    gw.clock.advance(101)  # a's residency is over, but nobody waits: it keeps running
    assert a.state is State.READY and gw.fakes["a"].stops == []


def test_a_group_members_stop_defaults_to_the_api_reason() -> None:
    gw = group_gw(min_residency=0)
    a = gw.gateway.route("a")
    outcome(a.start())
    gw.up("a")
    outcome(a.stop())
    assert a.status()["state"] == "stopping" and a.status()["state_reason"] == "api"


# -- fifth round (issue 21): the survivors of the seed-31 sample ----------------------------------


def test_a_group_members_start_defaults_to_the_api_reason_and_keeps_a_given_one() -> None:
    gw = group_gw(min_residency=0)
    a, b = gw.gateway.route("a"), gw.gateway.route("b")
    outcome(a.start())
    assert a.status()["state"] == "starting" and a.status()["state_reason"] == "api"
    gw.up("a")
    outcome(a.stop())
    gw.fakes["a"].finish_stop()
    gw.clock.advance(0)
    outcome(b.start("keep_warm"))
    assert b.status()["state"] == "starting" and b.status()["state_reason"] == "keep_warm"


def test_a_hold_on_a_group_member_ends_when_released_and_it_idles_out_again() -> None:
    gw = Gw({"groups": {"gpu": {"exclusive": True, "min_residency": 0}},
             "services": {"a": member("a", idle_timeout=10), "b": member("b")}})
    a = gw.gateway.route("a")
    outcome(a.start())
    gw.up("a")
    a.hold("schedule")
    assert a.status()["held_by"] == ["schedule"]
    gw.clock.advance(20)
    assert a.state is State.READY  # held: not idle-stopped
    a.release_hold("schedule")
    assert a.status()["held_by"] == []
    gw.clock.advance(10)
    assert a.state is State.STOPPING and a.status()["state_reason"] == "idle"


def test_a_monitors_request_to_a_group_member_is_leased_only_while_it_is_ready() -> None:
    gw = group_gw(min_residency=0)
    a = gw.gateway.route("a")
    assert a.acquire_passive(None) is None
    assert a.state is State.STOPPED and gw.fakes["a"].starts == []  # a monitor starts nothing
    outcome(a.start())
    gw.up("a")
    got = a.acquire_passive(object())
    assert got is not None
    lease = outcome(got)[0]
    assert lease.url == "http://a:1"
    lease.release()


def test_stopping_a_member_that_ran_before_a_reload_logs_no_error() -> None:
    from twisted.logger import capturedLogs, formatEvent

    raw = {"groups": {"gpu": {"exclusive": True, "min_residency": 0}},
           "services": {"a": member("a"), "b": member("b")}}
    gw = Gw(raw)
    a = gw.gateway.route("a")
    outcome(a.start())
    gw.up("a")
    gw.gateway.apply(parse_config(raw, "t.yml", {}))  # a runs on, adopted by the new wiring
    a = gw.gateway.route("a")
    with capturedLogs() as captured:
        outcome(a.stop())
        gw.fakes["a"].finish_stop()
        gw.clock.advance(0)
    assert a.state is State.STOPPED
    failures = [formatEvent(event) for event in captured if "log_failure" in event]
    assert failures == []


def test_shutting_down_some_routes_of_a_plan_with_dependencies_stops_just_those() -> None:
    from hestia.groups import Coordinator

    raw = {"services": {
        "app": {"url": "http://app:1", "command": ["app"], "depends_on": ["db"]},
        "db": {"url": "http://db:1", "command": ["db"]},
    }}
    gw = Gw(raw)
    app, db = gw.gateway.route("app"), gw.gateway.route("db")
    outcome(app.acquire(None))
    gw.up("db")
    gw.up("app")
    plan = parse_config(raw, "t.yml", {}).routing
    # Only the dependency: nothing it depends on is given, so it stops at once.
    done = outcome(Coordinator(plan, gw.clock).shutdown({"db": db}))
    assert db.state is State.STOPPING and app.state is State.READY
    gw.fakes["db"].finish_stop()
    assert done and db.state is State.STOPPED
    # Only the dependent: its dependency is not among the routes to shut down.
    done = outcome(Coordinator(plan, gw.clock).shutdown({"app": app}))
    assert app.state is State.STOPPING
    gw.fakes["app"].finish_stop()
    assert done and app.state is State.STOPPED
