"""
C{time-window}: an example third-party routing strategy for Hestia.

Prefers some instances inside a daily time window (a machine that is cheap or
idle at night, a lab GPU that is free after hours) and the others outside
it; within the preferred set it behaves like C{prefer-warm}: a ready instance
first, else the cheapest one to start.  When no preferred instance is usable
it falls back to the rest, so a request is never refused for the hour.

Configured as::

    strategy: {name: time-window, prefer: [1], start: "22:00", end: "06:00", utc: true}

It is found by Hestia through the C{hestia.strategies} entry point in this
package's C{setup.cfg}; nothing in Hestia names it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from zope.interface import implementer

from hestia.strategies import InstanceView, IRoutingStrategy, PreferWarm

__all__ = ["TimeWindow", "in_window"]


def _minutes(text: str) -> int:
    hours, _, minutes = text.partition(":")
    value = int(hours) * 60 + int(minutes or 0)
    if not 0 <= value < 24 * 60:
        raise ValueError(f"not a time of day: {text!r}")
    return value


def in_window(minute_of_day: int, start: int, end: int) -> bool:
    """
    C{start <= minute < end}, where a window may wrap past midnight
    (22:00-06:00); C{start == end} is the whole day.
    """
    if start == end:
        return True
    if start < end:
        return start <= minute_of_day < end
    return minute_of_day >= start or minute_of_day < end


@implementer(IRoutingStrategy)
class TimeWindow:
    """Prefer the instances listed in C{prefer} between C{start} and C{end}; the others outside."""

    name = "time-window"
    retries = True

    def __init__(self, prefer: Sequence[int], start: str, end: str, utc: bool = False) -> None:
        if not prefer or not all(isinstance(index, int) for index in prefer):
            raise ValueError("prefer: give the indexes of the preferred instances, e.g. [1]")
        self.prefer = frozenset(prefer)
        self.start = _minutes(start)
        self.end = _minutes(end)
        self.utc = utc
        self._within = PreferWarm()

    def minute_of_day(self, now: float) -> int:
        moment = time.gmtime(now) if self.utc else time.localtime(now)
        return moment.tm_hour * 60 + moment.tm_min

    def choose(self, instances: Sequence[InstanceView], request: Any) -> InstanceView:
        now = getattr(request, "now", None)
        inside = in_window(self.minute_of_day(time.time() if now is None else now), self.start, self.end)
        wanted = [i for i in instances if (i.index in self.prefer) == inside and i.usable]
        return self._within.choose(wanted or list(instances), request)
