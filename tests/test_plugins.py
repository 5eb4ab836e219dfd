"""
The one plugin lookup (hestia.plugins): backends and strategies follow the same rule.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from hestia import plugins
from hestia.backends import BackendNotFound, find_backend
from hestia.backends.process import ProcessBackendFactory
from hestia.plugins import PluginBroken, PluginNotFound, find_plugin
from hestia.strategies import RoundRobin, StrategyError, load_strategy

pytestmark = pytest.mark.unit


def registered(monkeypatch: pytest.MonkeyPatch, *entries: EntryPoint) -> None:
    def fake(group: str, name: str | None = None) -> list[EntryPoint]:
        return [entry for entry in entries if entry.group == group and (name is None or entry.name == name)]

    monkeypatch.setattr(plugins, "entry_points", fake)


def test_a_built_in_name_is_never_replaced_by_an_installed_package(monkeypatch: pytest.MonkeyPatch) -> None:
    registered(monkeypatch,
               EntryPoint("process", "os:getcwd", "hestia.backends"),
               EntryPoint("round-robin", "os:getcwd", "hestia.strategies"))
    assert find_backend("process") is ProcessBackendFactory
    assert isinstance(load_strategy("round-robin"), RoundRobin)


def test_a_name_registered_twice_is_an_error_naming_both(monkeypatch: pytest.MonkeyPatch) -> None:
    registered(monkeypatch,
               EntryPoint("gpu", "one:Factory", "hestia.backends"),
               EntryPoint("gpu", "two:Factory", "hestia.backends"),
               EntryPoint("lucky", "one:Pick", "hestia.strategies"),
               EntryPoint("lucky", "two:Pick", "hestia.strategies"))
    with pytest.raises(PluginBroken, match="one:Factory, two:Factory"):
        find_plugin("hestia.backends", "gpu", {})
    with pytest.raises(BackendNotFound, match="registered more than once"):
        find_backend("gpu")
    with pytest.raises(StrategyError, match="registered more than once"):
        load_strategy("lucky")


def test_an_unknown_name_lists_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    registered(monkeypatch, EntryPoint("extra", "os:getcwd", "hestia.strategies"))
    with pytest.raises(PluginNotFound) as missing:
        find_plugin("hestia.strategies", "nope", {"round-robin": RoundRobin})
    assert missing.value.known == ["extra", "round-robin"]
    with pytest.raises(BackendNotFound, match="no backend plugin named 'nope'"):
        find_backend("nope")


def test_an_entry_point_that_does_not_import_is_broken_not_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    registered(monkeypatch, EntryPoint("ghost", "no_such_module_anywhere:Factory", "hestia.backends"))
    with pytest.raises(BackendNotFound, match="ghost.*cannot be loaded: ModuleNotFoundError"):
        find_backend("ghost")
