"""
Predictive warm-up: start a service shortly before its habitual first use (issue 16).

From the first uses of a service (requests after a quiet spell, see
L{hestia.costs.FirstUseHistory}) L{habits} finds the times of the week at
which it is habitually first used: clusters of first uses at about the same
time of the week (within L{CLUSTER_WIDTH}) seen in at least C{min_weeks}
different weeks and in at least L{MIN_SHARE} of the weeks observed.  A habit
spans from the earliest to the latest of its weeks' first uses: people do not
come at the same minute every week.

L{Prewarmer} starts the service C{lead} before each habit begins, with reason
C{prewarm}, and keeps it up until the habit's span ends; then, nobody having
come, the usual idle rule stops it.  What such guesses cost (running time
until the first request) is kept within C{budget_per_day}: a guess is made
only if today's guesses plus the longest this one can run (to the end of the
habit's span, plus the idle timeout) fit.  Every decision is logged and recorded as a
C{prewarm} event.

The rules are pure functions of a history and a time; the L{Prewarmer} runs
on any L{IReactorTime} (a L{Clock} in tests and in C{bench/}).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from hestia.costs import period_start
from hestia.schedule import DAYS

if TYPE_CHECKING:
    from hestia.costs import CostLedger
    from hestia.costs_config import PrewarmSettings

log = Logger(namespace="hestia.prewarm")

WEEK = 7 * 86400.0
CLUSTER_WIDTH = 90.0 * 60  # first uses further apart than this are different habits
MIN_SHARE = 0.5  # of the weeks observed
HORIZON_WEEKS = 8  # older habits are forgotten
REPLAN_EVERY = 3600.0


@dataclass(frozen=True)
class Habit:
    """A habitual first use: at C{minute} of the week (0 = Monday 00:00, local)."""

    minute: int
    weeks: int
    observed: int
    until: int = -1  # the latest first use of its span (minute of the week)

    @property
    def length(self) -> float:
        """Seconds from the habit's first to its last minute."""
        return max(0, self.until - self.minute) * 60.0

    @property
    def label(self) -> str:
        day, minute = divmod(self.minute, 1440)
        return f"{DAYS[day].capitalize()} {minute // 60:02d}:{minute % 60:02d}"


def minute_of_week(at: float, zone: ZoneInfo) -> int:
    local = datetime.fromtimestamp(at, zone)
    return local.weekday() * 1440 + local.hour * 60 + local.minute


def habits(first_uses: Sequence[float], now: float, zone: ZoneInfo, min_weeks: int) -> list[Habit]:
    """The habitual first uses in C{first_uses} (epoch seconds) as of C{now}."""
    recent = [at for at in first_uses if now - HORIZON_WEEKS * WEEK <= at < now]
    if not recent:
        return []
    observed = min(HORIZON_WEEKS, int((now - min(recent)) // WEEK) + 1)
    points = sorted((minute_of_week(at, zone), int((now - at) // WEEK)) for at in recent)
    clusters: list[list[tuple[int, int]]] = []
    for point in points:
        if clusters and point[0] - clusters[-1][0][0] <= CLUSTER_WIDTH / 60:
            clusters[-1].append(point)
        else:
            clusters.append([point])
    found = []
    for cluster in clusters:
        earliest: dict[int, int] = {}
        for minute, week in cluster:
            earliest[week] = min(minute, earliest.get(week, minute))
        weeks = len(earliest)
        if weeks >= min_weeks and weeks >= MIN_SHARE * observed:
            found.append(Habit(minute=min(earliest.values()), weeks=weeks, observed=observed,
                               until=max(earliest.values())))
    return found


def next_occurrence(minute: int, after: float, zone: ZoneInfo) -> float:
    """The first instant after C{after} at minute C{minute} of the (local) week."""
    monday = datetime.fromtimestamp(period_start("week", after, zone) or after, zone)
    for weeks in (0, 1, 2):
        candidate = (monday + timedelta(days=7 * weeks, minutes=minute)).replace(tzinfo=zone).timestamp()
        if candidate > after:
            return candidate
    return after + WEEK


class Prewarmer:
    """
    Starts services with C{prewarm:} ahead of their habits.

    @param routes: the gateway's name -> route mapping (read at every decision).
    @param settings_of: a service's L{PrewarmSettings}, or C{None}.
    @param record: called with (service, message) for each decision, to
        become an event.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        routes: Mapping[str, Any],
        settings_of: Callable[[str], PrewarmSettings | None],
        ledger: CostLedger,
        record: Callable[[str, str], None] | None = None,
    ) -> None:
        self._reactor = reactor
        self._routes = routes
        self._settings_of = settings_of
        self._ledger = ledger
        self._record = record
        self._calls: dict[str, IDelayedCall] = {}
        self._fired: dict[tuple[str, int], float] = {}
        self._stopped = False
        self.decisions: list[tuple[float, str, str]] = []

    def start(self) -> None:
        for name in list(self._routes):
            self.plan(name)
        for name in list(self._calls):
            if name not in self._routes:
                self._cancel(name)

    def stop(self) -> None:
        self._stopped = True
        for name in list(self._calls):
            self._cancel(name)

    def _cancel(self, name: str) -> None:
        call = self._calls.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def plan(self, name: str) -> None:
        """Arm the next prewarm of C{name} (or a re-plan within the hour)."""
        self._cancel(name)
        settings = self._settings_of(name) if name in self._routes else None
        if self._stopped or settings is None:
            return
        now = self._reactor.seconds()
        zone = self._ledger.zone()
        soonest: tuple[float, Habit, float] | None = None
        for habit in habits(self._ledger.history.of(name), now, zone, settings.min_weeks):
            habit_at = next_occurrence(habit.minute, now, zone)
            if self._fired.get((name, habit.minute), float("-inf")) > now - 86400:
                habit_at = next_occurrence(habit.minute, now + 86400, zone)  # this one is done
            due = max(now, habit_at - settings.lead)  # within the lead already: now
            if soonest is None or due < soonest[0]:
                soonest = (due, habit, habit_at)
        delay = REPLAN_EVERY
        if soonest is not None and soonest[0] - now <= REPLAN_EVERY:
            delay = max(0.0, soonest[0] - now)
            self._calls[name] = self._reactor.callLater(delay, self._due, name, soonest[1], soonest[2])
            return
        self._calls[name] = self._reactor.callLater(delay, self.plan, name)

    def _due(self, name: str, habit: Habit, habit_at: float) -> None:
        self._calls.pop(name, None)
        self._fired[(name, habit.minute)] = self._reactor.seconds()
        try:
            self.decide(name, habit, habit_at)
        finally:
            self.plan(name)

    def decide(self, name: str, habit: Habit, habit_at: float) -> bool:
        """
        Start C{name} ahead of C{habit} (beginning at C{habit_at}) if it is
        down and the budget allows; say why.
        """
        route = self._routes.get(name)
        settings = self._settings_of(name)
        if route is None or settings is None:
            return False
        if route.state.value in ("ready", "starting"):
            log.info("{service}: prewarm not needed, already {state}", service=name, state=route.state.value)
            return False
        now = self._reactor.seconds()
        idle = route.config.idle_timeout
        if idle <= 0:
            self._tell(name, f"prewarm: skipped, habitually used {habit.label}, but idle_timeout 0 would keep it up")
            return False
        rate = self._ledger.rate(name)  # prewarm is for plain services (hestia.costs_config)
        # Held up to the habit's end, then idle_timeout more: the longest a guess runs.
        hold_until = habit_at + habit.length
        worst = rate * (max(0.0, hold_until - now) + idle) / 3600
        today = period_start("day", now, self._ledger.zone()) or now
        spent = self._ledger.guess_spent(name, today)
        if spent + worst > settings.budget_per_day + 1e-9:
            self._tell(name, f"prewarm: skipped, habitually used {habit.label}, but today's guesses cost "
                             f"{spent:.2f} of {settings.budget_per_day:.2f} {self._ledger.currency} "
                             f"and this one may cost {worst:.2f}")
            return False
        self._tell(name, f"prewarm: started, habitually used {habit.label} "
                         f"({habit.weeks} of the last {habit.observed} weeks)")
        route.start("prewarm").addErrback(lambda failure: None)  # Seen in status and the log.
        route.hold("prewarm")
        self._reactor.callLater(max(0.0, hold_until - now), route.release_hold, "prewarm")
        return True

    def _tell(self, name: str, message: str) -> None:
        self.decisions.append((self._reactor.seconds(), name, message))
        log.info("{service}: {message}", service=name, message=message)
        if self._record is not None:
            self._record(name, message)

