"""
Schedules: windows of the week in which a service is kept running (issue 16).

A service's C{schedule:} is a list of windows such as C{"mon-fri 08:30-18:00"},
C{"sat,sun 10:00-12:00"} or C{"22:00-02:00"} (no days: every day; an end
before the start runs past midnight into the next day).  Times are read in the
top-level C{timezone:} (an IANA name), so a window follows daylight saving.

Inside a window the service is started without waiting for a request and is
not idle-stopped (L{ServiceLifecycle.hold}); when the window closes the hold
is released and the usual idle rule applies again.

The rules (L{parse_window}, L{covers}, L{next_change}) are pure functions of a
time, tested without a reactor; L{ScheduleKeeper} applies them to a gateway
on any L{IReactorTime} (a L{Clock} in tests and in C{bench/}).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from hestia.lifecycle import State

log = Logger(namespace="hestia.schedule")

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(r"^\s*(?:(?P<days>[a-z,\-\s]+?)\s+)?(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s*$")
# A failed start inside a window is tried again after this long.
RETRY_AFTER = 30.0
# Timers are re-checked at least this often, so that a clock jump (suspend,
# NTP) is caught up with within minutes.
RECHECK_EVERY = 600.0


@dataclass(frozen=True)
class Window:
    """
    One window: on C{days} (0 = Monday), from C{start} to C{end} minutes after
    local midnight.  C{end <= start} means it ends on the next day.
    """

    text: str
    days: frozenset[int]
    start: int
    end: int

    @property
    def overnight(self) -> bool:
        return self.end <= self.start


def _minutes(text: str) -> int:
    hours, minutes = (int(part) for part in text.split(":"))
    if minutes > 59 or hours > 24 or (hours == 24 and minutes):
        raise ValueError(f"{text} is not a time of day (00:00 to 24:00)")
    return hours * 60 + minutes


def _days(text: str) -> frozenset[int]:
    days: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if "-" in part:
            first, _, last = part.partition("-")
            if first not in DAYS or last not in DAYS:
                raise ValueError(f"unknown day in {part!r} (use mon, tue, wed, thu, fri, sat, sun)")
            begin, end = DAYS.index(first), DAYS.index(last)
            span = range(begin, end + 1) if begin <= end else [*range(begin, 7), *range(0, end + 1)]
            days.update(span)
        elif part in DAYS:
            days.add(DAYS.index(part))
        else:
            raise ValueError(f"unknown day {part!r} (use mon, tue, wed, thu, fri, sat, sun)")
    return frozenset(days)


def parse_window(text: Any) -> Window:
    """
    C{"mon-fri 08:30-18:00"} -> L{Window}.

    @raise ValueError: with a message for the person who wrote it.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a window such as 'mon-fri 08:30-18:00', got {text!r}")
    match = _WINDOW.match(text.lower())
    if match is None:
        raise ValueError(
            f"{text!r} is not a window such as 'mon-fri 08:30-18:00', 'sat,sun 10:00-12:00' or '22:00-02:00'"
        )
    start, end = _minutes(match.group("start")), _minutes(match.group("end"))
    if start == end:
        raise ValueError(f"{text!r} starts and ends at the same time")
    if start == 24 * 60:
        raise ValueError(f"{text!r} starts at 24:00")
    days = _days(match.group("days")) if match.group("days") else frozenset(range(7))
    return Window(text=text, days=days, start=start, end=end % (24 * 60) if end == 24 * 60 else end)


def _local(at: float, zone: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(at, zone)


def covers(windows: Iterable[Window], at: float, zone: ZoneInfo) -> bool:
    """Whether the instant C{at} (epoch seconds) lies in one of C{windows}."""
    local = _local(at, zone)
    minute = local.hour * 60 + local.minute
    day = local.weekday()
    for window in windows:
        if window.overnight:
            if (day in window.days and minute >= window.start) or (
                (day - 1) % 7 in window.days and minute < window.end
            ):
                return True
        elif day in window.days and window.start <= minute < window.end:
            return True
    return False


def _boundaries(windows: Iterable[Window], at: float, zone: ZoneInfo) -> list[float]:
    """Every window opening and closing from the day before C{at} to 8 days after."""
    midnight = _local(at, zone).replace(hour=0, minute=0, second=0, microsecond=0)
    found: list[float] = []
    for offset in range(-1, 9):
        day = (midnight + timedelta(days=offset)).replace(tzinfo=zone)
        for window in windows:
            if day.weekday() not in window.days:
                continue
            opening = day.replace(hour=window.start // 60, minute=window.start % 60)
            end_day = day + timedelta(days=1) if window.overnight else day
            closing = end_day.replace(hour=window.end // 60, minute=window.end % 60)
            found += [opening.timestamp(), closing.timestamp()]
    return sorted(found)


def next_change(windows: Iterable[Window], at: float, zone: ZoneInfo) -> float | None:
    """The first instant after C{at} at which L{covers} changes; C{None} if never."""
    windows = list(windows)
    now = covers(windows, at, zone)
    for boundary in _boundaries(windows, at, zone):
        if boundary > at and covers(windows, boundary, zone) != now:
            return boundary
    return None


def machine_timezone() -> ZoneInfo:
    """The machine's zone: C{$TZ}, else C{/etc/localtime}, else UTC."""
    import os

    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ValueError, OSError):
            pass
    try:
        target = os.path.realpath("/etc/localtime")
        if "zoneinfo/" in target:
            return ZoneInfo(target.split("zoneinfo/", 1)[1])
    except (ValueError, OSError):
        pass
    return ZoneInfo("UTC")


class Holdable(Protocol):
    """What a schedule needs of a route: a L{hestia.lifecycle.ServiceLifecycle}."""

    @property
    def state(self) -> State: ...

    def start(self, reason: str = "api") -> Deferred[None]: ...

    def hold(self, reason: str) -> None: ...

    def release_hold(self, reason: str) -> None: ...


class ScheduleKeeper:
    """
    Applies every service's C{schedule:} to the routes of a gateway.

    @param routes: the gateway's name -> route mapping, read at every tick so
        that a service rebuilt by a reload is the one held.
    @param windows_of: the windows of a service (from its configuration).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        routes: Mapping[str, Any],
        windows_of: Callable[[str], tuple[Window, ...]],
        zone: Callable[[], ZoneInfo],
    ) -> None:
        self._reactor = reactor
        self._routes = routes
        self._windows_of = windows_of
        self._zone = zone
        self._calls: dict[str, IDelayedCall] = {}
        self._held: dict[str, Any] = {}
        self._stopped = False

    def start(self) -> None:
        """Evaluate every service now and arm its next change."""
        for name in list(self._routes):
            self.check(name)
        for name in list(self._held):
            if name not in self._routes or not self._windows_of(name):
                self._release(name)

    def stop(self) -> None:
        self._stopped = True
        for call in self._calls.values():
            if call.active():
                call.cancel()
        self._calls.clear()

    def inside(self, name: str) -> bool:
        """Whether C{name}'s schedule covers now."""
        return covers(self._windows_of(name), self._reactor.seconds(), self._zone())

    def check(self, name: str) -> None:
        """Hold or release C{name} for the current time, and arm the next check."""
        call = self._calls.pop(name, None)
        if call is not None and call.active():
            call.cancel()
        route: Holdable | None = self._routes.get(name)
        windows = self._windows_of(name) if route is not None else ()
        if route is None or self._stopped or not windows:
            self._release(name)
            return
        now = self._reactor.seconds()
        zone = self._zone()
        delay = RECHECK_EVERY
        if covers(windows, now, zone):
            held = self._held.get(name)
            already = held is route  # (a flag: comparing would narrow route to None for mypy)
            if not already:
                if held is not None:
                    held.release_hold("schedule")
                route.hold("schedule")
                self._held[name] = route
                log.info("{service}: schedule window open, keeping it running", service=name)
            # Started as the window opens, and again after a failed start; a
            # service stopped on purpose inside the window (the API, an
            # exclusive group's rival) stays stopped until the next window.
            if (not already and route.state.value in ("stopped", "failed")) or route.state.value == "failed":
                route.start("schedule").addErrback(lambda failure: None)  # Seen in status and the log.
            if route.state.value in ("starting", "failed"):
                delay = RETRY_AFTER  # A start that may fail: look again soon.
        else:
            self._release(name)
        change = next_change(windows, now, zone)
        if change is not None:
            delay = min(delay, max(0.0, change - now))
        self._calls[name] = self._reactor.callLater(delay, self.check, name)

    def _release(self, name: str) -> None:
        held = self._held.pop(name, None)
        if held is not None:
            held.release_hold("schedule")
            log.info("{service}: schedule window closed, the idle rule applies", service=name)
