"""
What each service costs: running time accounted in SQLite (issue 16).

A I{span} is one stretch of a service (or an instance: a I{unit}) being
ready, from its C{ready} transition to the transition that leaves C{ready}.
Spans are written to the C{running_spans} table as they open and close, and
every L{CHECKPOINT_EVERY} seconds the open ones get a fresh C{checkpoint_at}:
after a SIGKILL the next gateway closes them at their last checkpoint
(L{CostLedger.start}), so at most that many seconds are lost.  A service the
next gateway adopts or resumes opens a new span from then on.

Each span records the price of an hour (C{cost_per_hour}) when it opened and
why the service was started: C{request} is a cold start (somebody waited),
C{prewarm} a guess by L{hestia.prewarm}, C{schedule} a schedule window.  A
prewarm span is a I{guess} until its first request arrives; what a guess
cost (C{guess_seconds}) is what L{hestia.prewarm} keeps within its budget.

L{CostLedger} is both a state observer and a request observer of the
gateway; without a store (C{bench/}) it keeps everything in memory.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from hestia.lifecycle import State, StateChange, iso_time
from hestia.records import RequestRecord
from hestia.state import StateStoreError, StoreClosed

if TYPE_CHECKING:
    from hestia.config import Config
    from hestia.state import StateStore

log = Logger(namespace="hestia.costs")

CHECKPOINT_EVERY = 5.0
PERIODS = ("day", "week", "month", "all")
# How far back first uses are kept for learning (hestia.prewarm).
HISTORY_KEPT = 12 * 7 * 86400.0
DEFAULT_QUIET = 300.0
GUESSES_KEPT = 2 * 86400.0


def unit_service(unit: str) -> str:
    """C{ollama.1} (an instance) -> C{ollama}; service names have no dot."""
    return unit.split(".", 1)[0]


def unit_rate(config: Config, unit: str) -> float:
    """The C{cost_per_hour} of a unit: the instance's own, else its service's, else 0."""
    service, _, index = unit.partition(".")
    parent = config.services.get(service)
    if parent is None:
        return 0.0
    multi = getattr(config.routing, "multi", {}) or {}
    if index.isdigit() and service in multi and int(index) < len(multi[service].instances):
        own = multi[service].instances[int(index)].service.cost_per_hour
        if own is not None:
            return float(own)
    return float(parent.cost_per_hour or 0.0)


def units_of(config: Config, service: str) -> list[str]:
    """The units that run for C{service}: itself, or each of its instances."""
    multi = getattr(config.routing, "multi", {}) or {}
    if service in multi:
        return [f"{service}.{index}" for index in range(len(multi[service].instances))]
    parent = config.services.get(service)
    if parent is None or parent.backend == "route":
        return []
    return [service]


def period_start(period: str, now: float, zone: ZoneInfo) -> float | None:
    """Local midnight today, Monday 00:00 this week, the 1st this month; C{None} for all."""
    if period == "all":
        return None
    local = datetime.fromtimestamp(now, zone).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "week":
        local = (local - timedelta(days=local.weekday())).replace(tzinfo=zone)
    elif period == "month":
        local = local.replace(day=1)
    return local.timestamp()


@dataclass
class Span:
    """One open stretch of a unit being ready."""

    service: str
    unit: str
    started_at: float
    rate: float
    reason: str
    awaiting_waker: bool = False
    guess: bool = False
    guess_seconds: float | None = None


@dataclass
class FirstUseHistory:
    """
    When each service was first used after a quiet spell: what L{hestia.prewarm}
    learns habits from.  A request is a first use when the service had none
    for C{quiet} seconds (its idle timeout): the request that, with the idle
    rule alone, would meet a cold start.
    """

    uses: dict[str, list[float]] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)

    def note(self, service: str, began: float, ended: float, quiet: float) -> bool:
        last = self.last.get(service)
        first = last is None or began - last >= quiet
        if first:
            self.uses.setdefault(service, []).append(began)
        self.last[service] = max(ended, last if last is not None else ended)
        return first

    def of(self, service: str) -> list[float]:
        return self.uses.get(service, [])


class CostLedger:
    """
    Running spans, totals and first uses, fed by the gateway's observers.

    @param config: the current configuration (prices, units, time zone).
    """

    def __init__(self, reactor: IReactorTime, config: Callable[[], Config], store: StateStore | None = None) -> None:
        self._reactor = reactor
        self._config = config
        self.store = store
        self.history = FirstUseHistory()
        self._open: dict[str, Span] = {}
        self._start_reason: dict[str, str] = {}
        # service -> [seconds, cost] of its closed spans (all time).
        self._closed: dict[str, list[float]] = {}
        # Closed prewarm spans of the last two days: (service, started_at, guess cost).
        self._guesses: list[tuple[str, float, float]] = []
        # Everything, in memory, when there is no store (bench/): the span rows.
        self._rows: list[dict[str, Any]] = []
        # Services with a span waiting for its first request (who woke it, a
        # guess): only their requests need a look at the open spans.
        self._watching: set[str] = set()
        self.since = reactor.seconds()
        self._checkpoints: LoopingCall | None = None

    # -- configuration ------------------------------------------------------------

    @property
    def currency(self) -> str:
        costs = self._config().costs
        return costs.currency if costs is not None else "USD"

    def zone(self) -> ZoneInfo:
        from hestia.schedule import machine_timezone

        costs = self._config().costs
        return costs.zone() if costs is not None else machine_timezone()

    def rate(self, unit: str) -> float:
        return unit_rate(self._config(), unit)

    def quiet(self, service: str) -> float:
        config = self._config().services.get(service)
        if config is None or config.idle_timeout <= 0:
            return DEFAULT_QUIET
        return config.idle_timeout

    # -- start and stop -----------------------------------------------------------------

    def start(self) -> Deferred[Any]:
        """
        Close what a killed gateway left open, load the totals, start checkpoints.

        Done at once, on a connection of its own, blocking the reactor for the
        few milliseconds it takes: the status must show the history from the
        first request on, and no span of this run may be written before the
        old ones are closed.  (An in-memory store has nothing to recover.)
        """
        if self.store is None:
            return succeed(None)
        now = self._reactor.seconds()
        if self.store.path == ":memory:":
            loading = self.store.interact(_recover, now)
        else:
            loading = maybeDeferred(_recover_now, self.store.path, now)
        loading.addCallback(self._loaded)
        loading.addErrback(lambda failure: log.failure("cannot load the running history", failure))
        self._checkpoints = LoopingCall(self.checkpoint)
        self._checkpoints.clock = self._reactor
        self._checkpoints.start(CHECKPOINT_EVERY, now=False).addErrback(
            lambda failure: log.failure("checkpoints stopped", failure)
        )
        return loading

    def _loaded(self, loaded: dict[str, Any]) -> None:
        self.since = min(self.since, loaded["since"])
        for service, (seconds, cost) in loaded["totals"].items():
            totals = self._closed.setdefault(service, [0.0, 0.0])
            totals[0] += seconds
            totals[1] += cost
        self._guesses = loaded["guesses"] + self._guesses
        for service, uses in loaded["first_uses"].items():
            known = self.history.uses.setdefault(service, [])
            known[:0] = [at for at in uses if not known or at < known[0]]
            if uses and service not in self.history.last:
                self.history.last[service] = uses[-1]

    def stop(self) -> None:
        """The gateway stops: a last checkpoint (spans of machines that outlive it stay open)."""
        self.checkpoint()
        if self._checkpoints is not None and self._checkpoints.running:
            self._checkpoints.stop()

    def checkpoint(self) -> None:
        if self.store is not None and self._open:
            self._write(_checkpoint, self._reactor.seconds())

    def _write(self, work: Callable[..., Any], *args: Any) -> None:
        if self.store is None:
            return
        # Tracked like the state writes, so that shutdown's flush waits for
        # the spans its stops close (within shutdown_timeout).
        writing = self.store.track(self.store.interact(work, *args))
        writing.addErrback(_log_write_failure)
        self.store.track(writing)

    # -- observers ------------------------------------------------------------------------

    def state_changed(self, change: StateChange) -> None:
        unit = change.service
        if change.new is State.STARTING:
            self._start_reason[unit] = change.reason
        if change.new is State.READY and change.old is not State.READY:
            reason = self._start_reason.pop(unit, change.reason)
            if change.old is State.STOPPED and change.reason.startswith("resumed"):
                reason = "resumed"
            self._open_span(unit, change.at, reason)
        elif change.old is State.READY and change.new is not State.READY:
            self._close_span(unit, change.at)

    def _open_span(self, unit: str, at: float, reason: str) -> None:
        if unit in self._open:
            self._close_span(unit, at)
        span = Span(unit_service(unit), unit, at, self.rate(unit), reason,
                    awaiting_waker=reason == "request", guess=reason == "prewarm")
        self._open[unit] = span
        if span.awaiting_waker or span.guess:
            self._watching.add(span.service)
        self._write(_insert_span, span.service, unit, at, span.rate, reason)
        if self.store is None:
            self._rows.append({"service": span.service, "unit": unit, "started_at": at, "ended_at": None,
                               "rate": span.rate, "reason": reason, "woken_by": None})

    def _close_span(self, unit: str, at: float) -> None:
        span = self._open.pop(unit, None)
        if span is None:
            return
        seconds = max(0.0, at - span.started_at)
        totals = self._closed.setdefault(span.service, [0.0, 0.0])
        totals[0] += seconds
        totals[1] += seconds * span.rate / 3600
        if span.guess:
            span.guess_seconds = seconds
            span.guess = False
        if span.reason == "prewarm":
            # Only today's count for the budget: two days are kept, whatever the time zone.
            self._guesses = [guess for guess in self._guesses if guess[1] >= at - GUESSES_KEPT]
            self._guesses.append((span.service, span.started_at, (span.guess_seconds or 0.0) * span.rate / 3600))
        self._write(_close_span, unit, span.started_at, at, span.guess_seconds)
        if self.store is None:
            for row in reversed(self._rows):
                if row["unit"] == unit and row["started_at"] == span.started_at:
                    row["ended_at"] = at
                    break

    def request_finished(self, record: RequestRecord) -> None:
        """A request observer: who woke a service, when guesses ended, first uses."""
        who = record.token_name or record.client
        self.note_request(record.service, record.began, self._reactor.seconds(), who)

    def note_request(self, service: str, began: float, ended: float, who: str) -> bool:
        """
        One request for C{service} from C{who}, from C{began} to C{ended}.

        @return: whether it was a first use (see L{FirstUseHistory}).
        """
        for span in self._open.values() if service in self._watching else ():
            if span.service != service:
                continue
            if span.awaiting_waker and began <= span.started_at:
                span.awaiting_waker = False
                self._write(_set_waker, span.unit, span.started_at, who)
                if self.store is None:
                    for row in self._rows:
                        if row["unit"] == span.unit and row["started_at"] == span.started_at:
                            row["woken_by"] = who
            if span.guess:
                # Somebody came: from now on the prewarmed service is in use.
                span.guess = False
                span.guess_seconds = max(0.0, began - span.started_at)
                self._write(_set_guess, span.unit, span.started_at, span.guess_seconds)
        if service in self._watching and not any(
            span.service == service and (span.awaiting_waker or span.guess) for span in self._open.values()
        ):
            self._watching.discard(service)
        first = self.history.note(service, began, ended, self.quiet(service))
        if first:
            self._write(_insert_first_use, service, began, began - HISTORY_KEPT)
        return first

    # -- what it cost -------------------------------------------------------------------------

    def totals(self, service: str) -> tuple[float, float]:
        """All-time running seconds and cost of C{service}, open spans included."""
        now = self._reactor.seconds()
        seconds, cost = self._closed.get(service, (0.0, 0.0))
        for span in self._open.values():
            if span.service == service:
                running = max(0.0, now - span.started_at)
                seconds += running
                cost += running * span.rate / 3600
        return seconds, cost

    def status_fields(self, service: str) -> dict[str, Any]:
        seconds, cost = self.totals(service)
        return {"running_seconds_total": round(seconds, 3), "cost_total": round(cost, 6),
                "currency": self.currency}

    def guess_spent(self, service: str, since: float) -> float:
        """What prewarm guesses for C{service} that began after C{since} cost (open ones so far)."""
        now = self._reactor.seconds()
        spent = sum(cost for name, began, cost in self._guesses if name == service and began >= since)
        for span in self._open.values():
            if span.service == service and span.reason == "prewarm" and span.started_at >= since:
                seconds = span.guess_seconds if not span.guess else now - span.started_at
                spent += (seconds or 0.0) * span.rate / 3600
        return spent

    def rows(self, since: float, now: float) -> Deferred[list[dict[str, Any]]]:
        """The spans that overlap [since, now], open ones ending now."""
        if self.store is None:
            found = [dict(row) for row in self._rows if (row["ended_at"] or now) > since]
            return succeed(found)
        return self.store.interact(_spans_since, since, now)

    def report(self, period: str) -> Deferred[dict[str, Any]]:
        """The C{GET /v1/costs} document for C{period} (day, week, month, all)."""
        now = self._reactor.seconds()
        begin = period_start(period, now, self.zone())
        since = self.since if begin is None else max(begin, self.since)
        return self.rows(since, now).addCallback(self._report, since, now)

    def _report(self, rows: list[dict[str, Any]], since: float, now: float) -> dict[str, Any]:
        config = self._config()
        names = sorted(set(config.services) | {row["service"] for row in rows})
        services = []
        for name in names:
            mine = [row for row in rows if row["service"] == name]
            seconds = cost = 0.0
            woken: dict[str, int] = {}
            for row in mine:
                end = now if row["ended_at"] is None else min(row["ended_at"], now)
                running = max(0.0, end - max(row["started_at"], since))
                seconds += running
                cost += running * row["rate"] / 3600
                if row["started_at"] >= since and row["woken_by"]:
                    woken[row["woken_by"]] = woken.get(row["woken_by"], 0) + 1
            started = [row for row in mine if row["started_at"] >= since]
            always_on = sum(unit_rate(config, unit) for unit in units_of(config, name)) * (now - since) / 3600
            services.append({
                "name": name,
                "running_seconds": round(seconds, 3),
                "cost": round(cost, 6),
                "always_on_cost": round(always_on, 6),
                "saved": round(max(0.0, always_on - cost), 6),
                "starts": len(started),
                "cold_starts": sum(1 for row in started if row["reason"] == "request"),
                "prewarm_starts": sum(1 for row in started if row["reason"] == "prewarm"),
                "woken_by": woken,
            })
        return {"currency": self.currency, "since": iso_time(since), "services": services}

    def timeline(self, days: float = 7.0) -> Deferred[dict[str, Any]]:
        """Each service's running spans of the last C{days}, for the dashboard."""
        now = self._reactor.seconds()
        since = now - days * 86400
        return self.rows(since, now).addCallback(self._timeline, since, now)

    def _timeline(self, rows: list[dict[str, Any]], since: float, now: float) -> dict[str, Any]:
        names = sorted(set(self._config().services) | {row["service"] for row in rows})
        return {
            "since": iso_time(since),
            "until": iso_time(now),
            "services": [
                {
                    "name": name,
                    "spans": [
                        {"unit": row["unit"], "start": iso_time(row["started_at"]),
                         "end": iso_time(row["ended_at"]), "reason": row["reason"]}
                        for row in rows if row["service"] == name
                    ],
                }
                for name in names
            ],
        }


# -- SQL, run on the store's thread --------------------------------------------------------


def _recover(cursor: Any, now: float) -> dict[str, Any]:
    # A span a killed gateway left open ran until its last checkpoint.
    cursor.execute("UPDATE running_spans SET ended_at = checkpoint_at WHERE ended_at IS NULL")
    cursor.execute("INSERT OR IGNORE INTO accounting (key, value) VALUES ('since', ?)", (now,))
    since = cursor.execute(
        "SELECT MIN(value, COALESCE((SELECT MIN(started_at) FROM running_spans), value))"
        " FROM accounting WHERE key = 'since'"
    ).fetchone()[0]
    totals = {
        row[0]: (row[1] or 0.0, row[2] or 0.0)
        for row in cursor.execute(
            "SELECT service, SUM(ended_at - started_at), SUM((ended_at - started_at) * rate / 3600.0)"
            " FROM running_spans GROUP BY service"
        ).fetchall()
    }
    guesses = [
        (row[0], row[1], (row[2] or 0.0) * row[3] / 3600.0)
        for row in cursor.execute(
            "SELECT service, started_at, COALESCE(guess_seconds, ended_at - started_at), rate FROM running_spans"
            " WHERE reason = 'prewarm' AND started_at >= ?",
            (now - GUESSES_KEPT,),
        ).fetchall()
    ]
    first_uses: dict[str, list[float]] = {}
    for service, at in cursor.execute(
        "SELECT service, at FROM first_uses WHERE at >= ? ORDER BY at", (now - HISTORY_KEPT,)
    ).fetchall():
        first_uses.setdefault(service, []).append(at)
    return {"since": since, "totals": totals, "guesses": guesses, "first_uses": first_uses}


def _recover_now(path: str, now: float) -> dict[str, Any]:
    from hestia.state import migrate

    connection = sqlite3.connect(path, timeout=5.0)
    try:
        migrate(connection)
        loaded = _recover(connection.cursor(), now)
        connection.commit()
        return loaded
    finally:
        connection.close()


def _log_write_failure(failure: Failure) -> None:
    """A locked file or a closing store is one line (as for state writes); anything else its traceback."""
    if failure.check(StateStoreError, StoreClosed):
        log.error("cannot record running time: {problem}", problem=failure.value)
        return
    log.failure("cannot record running time", failure)


def _checkpoint(cursor: Any, now: float) -> None:
    cursor.execute("UPDATE running_spans SET checkpoint_at = ? WHERE ended_at IS NULL", (now,))


def _insert_span(cursor: Any, service: str, unit: str, at: float, rate: float, reason: str) -> None:
    cursor.execute(
        "INSERT OR REPLACE INTO running_spans (service, unit, started_at, checkpoint_at, rate, reason)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (service, unit, at, at, rate, reason),
    )


def _close_span(cursor: Any, unit: str, started_at: float, at: float, guess_seconds: float | None) -> None:
    cursor.execute(
        "UPDATE running_spans SET ended_at = ?, checkpoint_at = ?, guess_seconds = COALESCE(guess_seconds, ?)"
        " WHERE unit = ? AND started_at = ?",
        (at, at, guess_seconds, unit, started_at),
    )


def _set_waker(cursor: Any, unit: str, started_at: float, who: str) -> None:
    cursor.execute("UPDATE running_spans SET woken_by = ? WHERE unit = ? AND started_at = ?", (who, unit, started_at))


def _set_guess(cursor: Any, unit: str, started_at: float, seconds: float) -> None:
    cursor.execute(
        "UPDATE running_spans SET guess_seconds = ? WHERE unit = ? AND started_at = ?", (seconds, unit, started_at)
    )


def _insert_first_use(cursor: Any, service: str, at: float, forget_before: float) -> None:
    cursor.execute("INSERT OR IGNORE INTO first_uses (service, at) VALUES (?, ?)", (service, at))
    cursor.execute("DELETE FROM first_uses WHERE at < ?", (forget_before,))


def _spans_since(cursor: Any, since: float, now: float) -> list[dict[str, Any]]:
    rows = cursor.execute(
        "SELECT service, unit, started_at, ended_at, rate, reason, woken_by FROM running_spans"
        " WHERE COALESCE(ended_at, ?) > ? AND started_at <= ? ORDER BY started_at",
        (now, since, now),
    ).fetchall()
    keys = ("service", "unit", "started_at", "ended_at", "rate", "reason", "woken_by")
    return [dict(zip(keys, row, strict=True)) for row in rows]


class CostCollector(Collector):
    """C{hestia_service_running_seconds_total} and C{hestia_service_cost_total}, read at scrape time."""

    def __init__(self, ledger: CostLedger, services: Callable[[], list[str]]) -> None:
        self.ledger = ledger
        self.services = services

    def collect(self) -> Iterator[Metric]:
        seconds = CounterMetricFamily(
            "hestia_service_running_seconds",
            "Seconds the service has been ready (running), all time, as accounted in the state database.",
            labels=["service"],
        )
        cost = CounterMetricFamily(
            "hestia_service_cost",
            "What the service's running time cost (cost_per_hour), all time, in the configured currency.",
            labels=["service", "currency"],
        )
        currency = self.ledger.currency
        for name in sorted(self.services()):
            running, spent = self.ledger.totals(name)
            seconds.add_metric([name], running)
            cost.add_metric([name, currency], spent)
        yield seconds
        yield cost

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily("hestia_service_running_seconds", "", labels=["service"])
        yield CounterMetricFamily("hestia_service_cost", "", labels=["service", "currency"])

