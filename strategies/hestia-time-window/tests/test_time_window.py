"""The example plugin on its own: window arithmetic, choice, and its entry point."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
from hestia_time_window import TimeWindow, in_window
from zope.interface.verify import verifyObject

from hestia.strategies import InstanceView, IRoutingStrategy, load_strategy

NIGHT = 23 * 3600  # 23:00 UTC on 1 January 1970
DAY = 12 * 3600


class At:
    def __init__(self, now: float) -> None:
        self.now = now


def views() -> list[InstanceView]:
    return [
        InstanceView(0, "llm.0", "http://a", "stopped", 0, 0, cost=1),
        InstanceView(1, "llm.1", "http://b", "stopped", 0, 0, cost=10),
    ]


def test_window_wraps_past_midnight() -> None:
    start, end = 22 * 60, 6 * 60
    assert in_window(23 * 60, start, end) and in_window(5 * 60, start, end)
    assert not in_window(12 * 60, start, end) and not in_window(6 * 60, start, end)
    assert in_window(0, 0, 0) and in_window(23 * 60, 12 * 60, 12 * 60)  # start == end: all day
    assert in_window(9 * 60, 9 * 60, 17 * 60) and not in_window(17 * 60, 9 * 60, 17 * 60)


def test_prefers_listed_instances_inside_the_window_only() -> None:
    strategy = TimeWindow(prefer=[1], start="22:00", end="06:00", utc=True)
    assert strategy.choose(views(), At(NIGHT)).index == 1
    assert strategy.choose(views(), At(DAY)).index == 0


def test_falls_back_when_the_preferred_instance_is_unusable() -> None:
    strategy = TimeWindow(prefer=[1], start="22:00", end="06:00", utc=True)
    cooling = [views()[0], InstanceView(1, "llm.1", "http://b", "failed", 0, 0, cost=10, cooling_down=True)]
    assert strategy.choose(cooling, At(NIGHT)).index == 0


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError):
        TimeWindow(prefer=[1], start="25:00", end="06:00")


def test_registered_in_the_hestia_strategies_group() -> None:
    [entry] = entry_points(group="hestia.strategies", name="time-window")
    assert entry.load() is TimeWindow
    strategy = load_strategy("time-window", {"prefer": [0], "start": "09:00", "end": "17:00"})
    assert verifyObject(IRoutingStrategy, strategy)
