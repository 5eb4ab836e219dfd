"""
Issue 16: the simulation of bench/costs_simulation.py, shortened to 4 weeks,
as a regression test of the prewarm rules against idle-timeout only.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

BENCH = Path(__file__).resolve().parents[1] / "bench" / "costs_simulation.py"


def _bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("costs_simulation", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("costs_simulation", module)
    spec.loader.exec_module(module)
    return module


def test_predictive_hides_habitual_cold_starts_cheaply() -> None:
    bench = _bench()
    trace = bench.office(random.Random("16-office"), 4)
    policies = bench.policies(["mon-fri 08:00-18:00"])
    idle = bench.replay(trace, policies["idle-timeout only"], 4)
    predictive = bench.replay(trace, policies["predictive"], 4)
    assert idle.cold == idle.first_uses > 0  # idle only: every first request meets a cold start
    hidden = 1 - predictive.cold_after_learning / idle.cold_after_learning
    assert hidden >= 0.8
    assert predictive.cost <= 1.3 * idle.cost


def test_predictive_stays_within_budget_on_random_traffic() -> None:
    bench = _bench()
    trace = bench.uniform_random(random.Random("16-random"), 4)
    predictive = bench.replay(trace, bench.policies([])["predictive"], 4)
    assert predictive.prewarm_starts > 0  # it does guess...
    assert predictive.max_guess_spend_per_day <= bench.PREWARM["budget_per_day"] + 1e-9  # ...within budget
