"""
Issue 16: schedule windows, as pure rules and applied to a lifecycle on a Clock.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from hestia.config import ConfigError
from hestia.lifecycle import State
from hestia.loader import load_config, parse_config
from hestia.schedule import covers, next_change, parse_window
from hestia.simulation import SimulatedGateway, run_until

pytestmark = pytest.mark.unit

UTC = ZoneInfo("UTC")
PARIS = ZoneInfo("Europe/Paris")


def at(text: str, zone: ZoneInfo = UTC) -> float:
    """'2026-01-05 08:30' (a Monday) in C{zone}, as epoch seconds."""
    return datetime.fromisoformat(text).replace(tzinfo=zone).timestamp()


def test_day_range_window() -> None:
    window = parse_window("mon-fri 08:30-18:00")
    assert window.days == frozenset(range(5))
    assert covers([window], at("2026-01-05 08:30"), UTC)  # Monday, as it opens
    assert covers([window], at("2026-01-09 17:59"), UTC)  # Friday
    assert not covers([window], at("2026-01-09 18:00"), UTC)  # closed at 18:00
    assert not covers([window], at("2026-01-05 08:29"), UTC)
    assert not covers([window], at("2026-01-10 12:00"), UTC)  # Saturday


def test_day_list_window() -> None:
    window = parse_window("sat,sun 10:00-12:00")
    assert window.days == frozenset({5, 6})
    assert covers([window], at("2026-01-10 10:00"), UTC)
    assert covers([window], at("2026-01-11 11:59"), UTC)
    assert not covers([window], at("2026-01-12 11:00"), UTC)  # Monday


def test_overnight_window_runs_into_the_next_day() -> None:
    window = parse_window("22:00-02:00")
    assert window.overnight and window.days == frozenset(range(7))
    assert covers([window], at("2026-01-05 23:30"), UTC)
    assert covers([window], at("2026-01-06 01:59"), UTC)
    assert not covers([window], at("2026-01-06 02:00"), UTC)
    assert not covers([window], at("2026-01-05 21:59"), UTC)
    # With days, the night belongs to the day it starts on: Friday night runs into Saturday.
    friday = parse_window("fri 22:00-02:00")
    assert covers([friday], at("2026-01-10 01:00"), UTC)  # Saturday 01:00
    assert not covers([friday], at("2026-01-09 01:00"), UTC)  # Friday 01:00 is Thursday's night


def test_wrapping_day_range_and_24_00() -> None:
    window = parse_window("fri-mon 00:00-24:00")
    assert window.days == frozenset({4, 5, 6, 0})
    assert covers([window], at("2026-01-11 23:59"), UTC)  # Sunday
    assert not covers([window], at("2026-01-07 12:00"), UTC)  # Wednesday


def test_next_change_follows_the_time_zone() -> None:
    window = parse_window("mon-fri 08:30-18:00")
    monday_morning = at("2026-01-05 07:00", PARIS)
    assert next_change([window], monday_morning, PARIS) == at("2026-01-05 08:30", PARIS)
    assert next_change([window], at("2026-01-05 09:00", PARIS), PARIS) == at("2026-01-05 18:00", PARIS)
    # Friday evening: the next opening is Monday's.
    assert next_change([window], at("2026-01-09 19:00", PARIS), PARIS) == at("2026-01-12 08:30", PARIS)
    # Across the spring change of time (29 March 2026 in Paris) the local time is kept.
    assert next_change([window], at("2026-03-28 12:00", PARIS), PARIS) == at("2026-03-30 08:30", PARIS)


@pytest.mark.parametrize("text", ["mon-fry 08:00-09:00", "25:00-01:00", "08:00-08:00", "8-9", "monday", ""])
def test_a_bad_window_is_one_config_line_naming_service_and_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "hestia.yml"
    path.write_text(f"services:\n  gpu:\n    url: http://127.0.0.1:9\n    schedule: ['{text}']\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), environ={})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: services.gpu.schedule[0]: ")
    assert repr(text) in message


def test_timezone_and_currency_are_validated() -> None:
    with pytest.raises(ConfigError, match="timezone: unknown IANA time zone 'Mars/Olympus'"):
        parse_config({"timezone": "Mars/Olympus", "services": {}}, "f", {})
    with pytest.raises(ConfigError, match="costs.curency: unknown key"):
        parse_config({"costs": {"curency": "EUR"}, "services": {}}, "f", {})
    with pytest.raises(ConfigError, match=r"services.a.cost_per_hour: expected a number >= 0"):
        parse_config({"services": {"a": {"url": "http://x:1", "cost_per_hour": -1}}}, "f", {})
    with pytest.raises(ConfigError, match=r"services.a.schedule: not supported with instances"):
        parse_config({"services": {"a": {"schedule": ["08:00-09:00"],
                                          "instances": [{"url": "http://x:1"}]}}}, "f", {})
    config = parse_config({"costs": {"currency": "eur"}, "timezone": "Europe/Paris", "services": {}}, "f", {})
    assert config.costs.currency == "EUR" and config.costs.zone() == PARIS
    assert parse_config({"services": {}}, "f", {}).costs.currency == "USD"


def test_a_window_starts_the_service_without_a_request_and_keeps_it_from_idling() -> None:
    sim = SimulatedGateway({"idle_timeout": "5m", "schedule": ["mon-fri 08:30-18:00"]},
                           at("2026-01-05 07:00"), start_time=10, top={"timezone": "UTC"})
    assert sim.lifecycle.state is State.STOPPED
    run_until(sim.clock, at("2026-01-05 08:30"))
    assert sim.lifecycle.state is State.STARTING
    assert sim.lifecycle.state_reason == "schedule"
    run_until(sim.clock, at("2026-01-05 08:31"))
    assert sim.lifecycle.state is State.READY
    # No request all day: still up at 17:59, far beyond the 5-minute idle timeout.
    run_until(sim.clock, at("2026-01-05 17:59"))
    assert sim.lifecycle.state is State.READY
    assert sim.lifecycle.status()["held_by"] == ["schedule"]
    # The window closes: the usual idle rule applies from then on.
    run_until(sim.clock, at("2026-01-05 18:04"))
    assert sim.lifecycle.state is State.READY
    run_until(sim.clock, at("2026-01-05 18:06"))
    assert sim.lifecycle.state is State.STOPPED
    assert sim.lifecycle.state_reason == "idle"
    # And the next morning it starts again.
    run_until(sim.clock, at("2026-01-06 08:31"))
    assert sim.lifecycle.state is State.READY


def test_outside_the_window_the_idle_rule_applies() -> None:
    sim = SimulatedGateway({"idle_timeout": "5m", "schedule": ["sat,sun 10:00-12:00"]},
                           at("2026-01-05 07:00"), start_time=10, top={"timezone": "UTC"})
    run_until(sim.clock, at("2026-01-09 23:00"))  # all week: no window
    assert sim.lifecycle.state is State.STOPPED
    sim.request(at("2026-01-09 23:00"), 1.0)
    run_until(sim.clock, at("2026-01-09 23:01"))
    assert sim.lifecycle.state is State.READY
    run_until(sim.clock, at("2026-01-09 23:07"))
    assert sim.lifecycle.state is State.STOPPED


def test_an_overnight_window_on_a_clock() -> None:
    sim = SimulatedGateway({"idle_timeout": "1m", "schedule": ["22:00-02:00"]},
                           at("2026-01-05 21:00"), start_time=5, top={"timezone": "UTC"})
    run_until(sim.clock, at("2026-01-05 22:01"))
    assert sim.lifecycle.state is State.READY
    run_until(sim.clock, at("2026-01-06 01:59"))
    assert sim.lifecycle.state is State.READY  # past midnight, still held
    run_until(sim.clock, at("2026-01-06 02:02"))
    assert sim.lifecycle.state is State.STOPPED
    hours = sim.running_seconds() / 3600
    assert 4.0 < hours < 4.1  # 22:00:05 to 02:01:00, and the cost follows it


@pytest.mark.parametrize(("service", "key"), [
    ({"cost_per_hour": float("nan")}, "services.a.cost_per_hour"),
    ({"cost_per_hour": True}, "services.a.cost_per_hour"),
    ({"prewarm": {"budget_per_day": float("inf")}}, "services.a.prewarm.budget_per_day"),
    ({"prewarm": {"lead": "-5m"}}, "services.a.prewarm.lead"),
    ({"prewarm": {"min_weeks": 0}}, "services.a.prewarm.min_weeks"),
    ({"prewarm": {"leed": "5m"}}, "services.a.prewarm.leed"),
    ({"prewarm": "sometimes"}, "services.a.prewarm"),
    ({"schedule": {"mon": "08:00-09:00"}}, "services.a.schedule"),
    ({"schedule": ["mon-fri\t08:00-09:00", 42]}, "services.a.schedule[1]"),
])
def test_bad_cost_and_prewarm_values_are_one_line_naming_the_key(service: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"services": {"a": {"url": "http://x:1", **service}}}, "f.yml", {})
    assert str(caught.value).startswith(f"f.yml: {key}: ")
    assert "\n" not in str(caught.value)


def test_prewarm_true_means_the_defaults_and_instances_may_have_their_own_price() -> None:
    config = parse_config({"services": {
        "a": {"url": "http://x:1", "prewarm": True, "schedule": "sat 10:00-12:00"},
        "b": {"cost_per_hour": 2, "instances": [{"url": "http://x:2", "cost_per_hour": "0.5"}]},
    }}, "f", {})
    prewarm = config.services["a"].prewarm
    assert (prewarm.lead, prewarm.min_weeks, prewarm.budget_per_day) == (600.0, 2, 1.5)
    assert [window.text for window in config.services["a"].schedule] == ["sat 10:00-12:00"]
    assert config.routing.multi["b"].instances[0].service.cost_per_hour == 0.5
    with pytest.raises(ConfigError, match=r"instances\[0\].schedule: unknown key"):
        parse_config({"services": {"b": {"instances": [{"url": "http://x:2", "schedule": ["08:00-09:00"]}]}}},
                     "f", {})


def test_a_schedule_holds_a_member_of_an_exclusive_group_through_the_gateway() -> None:
    from twisted.internet.task import Clock

    from hestia.gateway import Gateway
    from hestia.schedule import ScheduleKeeper
    from hestia.simulation import SimulatedBackend

    clock = Clock()
    clock.advance(at("2026-01-05 07:59"))
    config = parse_config({
        "timezone": "UTC",
        "groups": {"gpu0": {"exclusive": True}},
        "services": {
            name: {"url": f"http://127.0.0.1:{port}", "command": "true", "group": "gpu0", "idle_timeout": 60,
                   **({"schedule": ["08:00-09:00"]} if name == "a" else {})}
            for name, port in (("a", 9), ("b", 10))
        },
    }, "f", {})
    gateway = Gateway(config, clock, agent=object(),  # type: ignore[arg-type]
                      build_backend=lambda service: SimulatedBackend(clock, 1.0))
    keeper = ScheduleKeeper(clock, gateway.services, lambda name: gateway.config.services[name].schedule,
                            lambda: UTC)
    keeper.start()
    run_until(clock, at("2026-01-05 08:00:05"))
    assert gateway.services["a"].state is State.READY
    run_until(clock, at("2026-01-05 08:30"))
    assert gateway.services["a"].state is State.READY  # far past its idle timeout
    run_until(clock, at("2026-01-05 09:01:01"))
    assert gateway.services["a"].state is State.STOPPED


def test_a_service_stopped_on_purpose_inside_its_window_stays_stopped_until_the_next() -> None:
    sim = SimulatedGateway({"idle_timeout": "5m", "schedule": ["08:00-09:00"]},
                           at("2026-01-05 07:59"), start_time=1, top={"timezone": "UTC"})
    run_until(sim.clock, at("2026-01-05 08:00:02"))
    assert sim.lifecycle.state is State.READY
    sim.lifecycle.stop("api")
    run_until(sim.clock, at("2026-01-05 08:59"))
    assert sim.lifecycle.state is State.STOPPED and sim.lifecycle.state_reason == "api"
    run_until(sim.clock, at("2026-01-06 08:00:02"))
    assert sim.lifecycle.state is State.READY  # the next window starts it again


def test_a_failed_start_inside_a_window_is_retried() -> None:
    from hestia.errors import StartFailed

    sim = SimulatedGateway({"idle_timeout": "5m", "schedule": ["08:00-09:00"]},
                           at("2026-01-05 07:59"), start_time=1, top={"timezone": "UTC"})
    attempts = []
    working_start = sim.backend.start

    def failing_start():  # type: ignore[no-untyped-def]
        attempts.append(sim.clock.seconds())
        if len(attempts) < 3:
            from twisted.internet.defer import fail

            return fail(StartFailed("no capacity"))
        return working_start()

    sim.backend.start = failing_start  # type: ignore[method-assign]
    run_until(sim.clock, at("2026-01-05 08:05"))
    assert len(attempts) == 3
    assert attempts[1] - attempts[0] == pytest.approx(30, abs=1)
    assert sim.lifecycle.state is State.READY
