"""
Issue 16: the cost ledger and predictive warm-up, on a Clock; the ledger's
SQLite records across a simulated SIGKILL (trial runs the reactor for the
store's thread).
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from twisted.internet import task
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from hestia.costs import CostLedger
from hestia.lifecycle import State, StateChange
from hestia.loader import parse_config
from hestia.prewarm import habits, minute_of_week
from hestia.simulation import SimulatedGateway, run_until
from hestia.state import StateStore

pytestmark = pytest.mark.unit

UTC = ZoneInfo("UTC")


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


MONDAY = at("2026-01-05 00:00")


def test_cost_follows_running_time_and_the_idle_rule() -> None:
    sim = SimulatedGateway({"idle_timeout": "10m", "cost_per_hour": 3.0}, MONDAY, start_time=60,
                           top={"timezone": "UTC", "costs": {"currency": "EUR"}})
    sim.request(MONDAY + 3600, 1.0)
    run_until(sim.clock, MONDAY + 3600 + 30 * 60)
    # Ready at +60 s, last request ends at +61 s, idle-stopped 10 min later.
    seconds, cost = sim.ledger.totals("svc")
    assert seconds == pytest.approx(601, abs=1)
    assert cost == pytest.approx(601 / 3600 * 3.0, rel=1e-3)
    report = sim.ledger.report("all").result
    [entry] = report["services"]
    assert report["currency"] == "EUR"
    assert entry["running_seconds"] == pytest.approx(seconds, abs=0.01)
    assert entry["starts"] == 1 and entry["cold_starts"] == 1 and entry["prewarm_starts"] == 0
    assert entry["always_on_cost"] == pytest.approx(1.5 * 3.0, rel=1e-3)  # 1.5 h since the ledger began
    assert entry["saved"] == pytest.approx(entry["always_on_cost"] - entry["cost"], abs=1e-5)


def test_periods_are_local_calendar_periods() -> None:
    sim = SimulatedGateway({"idle_timeout": "10m", "cost_per_hour": 1.0}, MONDAY, start_time=0,
                           top={"timezone": "UTC"})
    sim.request(at("2026-01-05 10:00"), 1.0)  # Monday
    sim.request(at("2026-01-07 10:00"), 1.0)  # Wednesday
    run_until(sim.clock, at("2026-01-07 12:00"))
    day = sim.ledger.report("day").result
    week = sim.ledger.report("week").result
    assert day["since"] == "2026-01-07T00:00:00.000Z"
    assert day["services"][0]["starts"] == 1
    assert week["services"][0]["starts"] == 2
    assert week["services"][0]["running_seconds"] == pytest.approx(sim.ledger.totals("svc")[0], abs=0.01)
    assert day["services"][0]["running_seconds"] == pytest.approx(sim.ledger.totals("svc")[0] / 2, abs=0.01)


def test_instances_have_their_own_price() -> None:
    config = parse_config({"services": {"llm": {"cost_per_hour": 2.0, "instances": [
        {"url": "http://127.0.0.1:9", "command": "true"},
        {"url": "http://127.0.0.1:10", "command": "true", "cost_per_hour": 0.5},
    ]}}}, "f", {})
    clock = task.Clock()
    ledger = CostLedger(clock, lambda: config)
    for unit in ("llm.0", "llm.1"):
        ledger.state_changed(StateChange(unit, State.STOPPED, State.STARTING, "request", 0.0))
        ledger.state_changed(StateChange(unit, State.STARTING, State.READY, "started", 0.0))
    clock.advance(3600)
    seconds, cost = ledger.totals("llm")
    assert seconds == pytest.approx(7200)
    assert cost == pytest.approx(2.5)
    assert ledger.report("all").result["services"][0]["always_on_cost"] == pytest.approx(2.5)


def _office_history(weeks: int, minute: int = 9 * 60) -> list[float]:
    return [MONDAY + week * 7 * 86400 + minute * 60 for week in range(weeks)]


def test_habits_need_min_weeks_and_a_majority_of_weeks() -> None:
    now = MONDAY + 3 * 7 * 86400
    assert habits(_office_history(1), now, UTC, min_weeks=2) == []
    [habit] = habits(_office_history(3), now, UTC, min_weeks=2)
    assert habit.label == "Mon 09:00" and habit.weeks == 3
    assert minute_of_week(MONDAY + 9 * 3600, UTC) == habit.minute
    # Seen in 2 of 8 weeks is not a habit, even with min_weeks 2.
    assert habits(_office_history(2), MONDAY + 8 * 7 * 86400, UTC, min_weeks=2) == []


def test_prewarm_starts_before_the_habit_and_hides_the_cold_start() -> None:
    sim = SimulatedGateway({"idle_timeout": "15m", "cost_per_hour": 1.0, "prewarm": {"lead": "10m"}},
                           MONDAY, start_time=30, top={"timezone": "UTC"})
    cold = []
    for week in range(4):
        before = sim.outcome.cold_first_uses
        sim.request(MONDAY + week * 7 * 86400 + 9 * 3600, 1.0)
        cold.append(sim.outcome.cold_first_uses - before)
    # Two weeks to learn, then the Monday 09:00 user finds it ready.
    assert cold == [1, 1, 0, 0]
    started = [message for _, _, message in sim.prewarmer.decisions if "started" in message]
    assert started[0].startswith("prewarm: started, habitually used Mon 09:00")
    assert sim.ledger.report("all").result["services"][0]["prewarm_starts"] == 2


def test_prewarm_never_spends_more_than_its_budget() -> None:
    # A habit every day at 09:00 (learned), then nobody comes any more.
    sim = SimulatedGateway(
        {"idle_timeout": "30m", "cost_per_hour": 2.0, "prewarm": {"lead": "10m", "budget_per_day": 0.5}},
        MONDAY, start_time=30, top={"timezone": "UTC"},
    )
    for week in range(3):
        for hour in (9, 11, 14, 16):
            sim.request(MONDAY + week * 7 * 86400 + hour * 3600, 1.0)
    run_until(sim.clock, MONDAY + 4 * 7 * 86400)
    # Each guess may cost 2.0 * (10 + 30 min) / 60 = 1.33 > 0.5: every one is refused, and said so.
    decisions = [message for _, _, message in sim.prewarmer.decisions]
    assert decisions and all("skipped" in message for message in decisions)
    assert "today's guesses cost 0.00 of 0.50 USD and this one may cost 1.33" in decisions[0]
    assert sim.ledger.guess_spent("svc", MONDAY) == 0.0


def test_prewarm_budget_allows_cheap_guesses_and_counts_them() -> None:
    sim = SimulatedGateway(
        {"idle_timeout": "10m", "cost_per_hour": 1.0, "prewarm": {"lead": "5m", "budget_per_day": 0.3}},
        MONDAY, start_time=10, top={"timezone": "UTC"},
    )
    for week in range(3):
        for hour in (9, 14):
            sim.request(MONDAY + week * 7 * 86400 + hour * 3600, 1.0)
    run_until(sim.clock, MONDAY + 3 * 7 * 86400 + 20 * 3600)  # week 4, Monday: nobody comes
    monday = MONDAY + 3 * 7 * 86400
    spent = sim.ledger.guess_spent("svc", monday)
    # One guess (5 + 10 minutes, 0.25) fits; a second would not: 0.25 + 0.25 > 0.3.
    assert spent == pytest.approx(0.25 - 10 / 3600, abs=0.01)
    assert spent <= 0.3
    skipped = [m for t, _, m in sim.prewarmer.decisions if t >= monday and "skipped" in m]
    assert skipped and "today's guesses cost 0.25 of 0.30" in skipped[0]


class LedgerStoreTests(TestCase):
    """The spans in SQLite: a killed gateway loses at most the last checkpoint interval."""

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="hestia-costs-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.path = str(Path(directory) / "hestia.db")
        self.config = parse_config({"services": {"gpu": {"url": "http://x:1", "command": "true",
                                                         "cost_per_hour": 36.0}}}, "f", {})

    def ledger(self, clock: task.Clock) -> tuple[CostLedger, StateStore]:
        store = StateStore(self.path)
        self.addCleanup(store.close)
        return CostLedger(clock, lambda: self.config, store), store

    @inlineCallbacks
    def test_spans_survive_a_kill_up_to_the_last_checkpoint(self):  # type: ignore[no-untyped-def]
        clock = task.Clock()
        clock.advance(1000)
        ledger, store = self.ledger(clock)
        yield ledger.start()
        ledger.state_changed(StateChange("gpu", State.STOPPED, State.STARTING, "request", 1000.0))
        ledger.state_changed(StateChange("gpu", State.STARTING, State.READY, "started", 1000.0))
        for _ in range(20):  # 100 s of checkpoints
            clock.advance(5)
        clock.advance(3)  # and 3 s more that no checkpoint saw
        yield store.flush()
        store.close()  # SIGKILL: no last checkpoint, the span is never closed
        rows = sqlite3.connect(self.path).execute("SELECT ended_at, checkpoint_at FROM running_spans").fetchall()
        self.assertEqual(rows, [(None, 1100.0)])

        later = task.Clock()
        later.advance(5000)
        again, store2 = self.ledger(later)
        yield again.start()
        seconds, cost = again.totals("gpu")
        self.assertAlmostEqual(seconds, 100.0)
        self.assertAlmostEqual(cost, 1.0)
        report = yield again.report("all")
        self.assertEqual(report["services"][0]["running_seconds"], 100.0)
        self.assertEqual(report["since"], "1970-01-01T00:16:40.000Z")  # accounting began with the first run
        again.stop()
        yield store2.flush()

    @inlineCallbacks
    def test_woken_by_and_first_uses_are_recorded(self):  # type: ignore[no-untyped-def]
        clock = task.Clock()
        ledger, store = self.ledger(clock)
        yield ledger.start()
        ledger.state_changed(StateChange("gpu", State.STOPPED, State.STARTING, "request", 0.0))
        clock.advance(20)
        ledger.state_changed(StateChange("gpu", State.STARTING, State.READY, "started", 20.0))
        self.assertTrue(ledger.note_request("gpu", 0.0, 21.0, "alice"))
        self.assertFalse(ledger.note_request("gpu", 22.0, 23.0, "bob"))  # not after a quiet spell
        yield store.flush()
        report = yield ledger.report("all")
        self.assertEqual(report["services"][0]["woken_by"], {"alice": 1})
        uses = sqlite3.connect(self.path).execute("SELECT service, at FROM first_uses").fetchall()
        self.assertEqual(uses, [("gpu", 0.0)])
        ledger.stop()


def test_adopted_and_resumed_services_are_accounted_from_then_on() -> None:
    config = parse_config({"services": {
        "box": {"url": "http://x:1", "command": "true", "cost_per_hour": 1.0},
        "vm": {"url": "http://x:2", "command": "true", "cost_per_hour": 2.0},
    }}, "f", {})
    clock = task.Clock()
    ledger = CostLedger(clock, lambda: config)
    # Found already running (a container): started through the lifecycle as "adopted".
    ledger.state_changed(StateChange("box", State.STOPPED, State.STARTING, "adopted", 0.0))
    ledger.state_changed(StateChange("box", State.STARTING, State.READY, "started", 0.0))
    # A remote machine a previous gateway left ready (hestia.reconcile): straight to ready.
    ledger.state_changed(StateChange("vm", State.STOPPED, State.READY, "resumed after a gateway restart", 0.0))
    clock.advance(1800)
    ledger.state_changed(StateChange("vm", State.READY, State.STOPPING, "idle", 1800.0))
    assert ledger.totals("box") == pytest.approx((1800, 0.5))
    assert ledger.totals("vm") == pytest.approx((1800, 1.0))
    entries = {entry["name"]: entry for entry in ledger.report("all").result["services"]}
    assert entries["box"]["starts"] == 1 and entries["box"]["cold_starts"] == 0
    rows = ledger.rows(0, clock.seconds()).result
    assert sorted(row["reason"] for row in rows) == ["adopted", "resumed"]
