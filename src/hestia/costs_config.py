"""
The configuration keys of issue 16: costs, schedules and predictive warm-up.

Per service (and per instance): C{cost_per_hour}; per plain service:
C{schedule} and C{prewarm}; top level: C{costs: {currency: EUR}} and
C{timezone: Europe/Paris}.  Validated here, with L{hestia.config}'s reader, so
that every problem is one line naming the file, the service and the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from hestia.schedule import Window, machine_timezone, parse_window

if TYPE_CHECKING:
    from hestia.config import Reader

SERVICE_PLANNING_KEYS = {"schedule", "prewarm"}
COSTS_KEYS = {"currency"}
PREWARM_KEYS = {"lead", "min_weeks", "budget_per_day"}
DEFAULT_CURRENCY = "USD"


@dataclass(frozen=True)
class PrewarmSettings:
    """
    C{prewarm:}: start C{lead} seconds before a habitual first use, once it was
    seen in at least C{min_weeks} weeks, spending at most C{budget_per_day}
    (in the cost currency) a day on starts nobody came for.
    """

    lead: float = 600.0
    min_weeks: int = 2
    budget_per_day: float = 1.5


@dataclass(frozen=True)
class CostSettings:
    """The top-level C{costs:} and C{timezone:}."""

    currency: str = DEFAULT_CURRENCY
    timezone: ZoneInfo | None = None  # None: the machine's

    def zone(self) -> ZoneInfo:
        return self.timezone or machine_timezone()


def _number(reader: Reader, value: Any, key: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise reader.fail(key, f"expected a number >= 0, got {value!r}")
    return float(value)


def parse_service_planning(reader: Reader, section: Mapping[str, Any], key: str, composite: bool) -> dict[str, Any]:
    """The ServiceConfig fields of C{cost_per_hour}, C{schedule} and C{prewarm}."""
    fields: dict[str, Any] = {}
    if "cost_per_hour" in section:
        fields["cost_per_hour"] = _number(reader, section["cost_per_hour"], f"{key}.cost_per_hour")
    for name in SERVICE_PLANNING_KEYS & set(section):
        if composite:
            raise reader.fail(f"{key}.{name}", "not supported with instances or route_by (give it a plain service)")
    if section.get("schedule") is not None:
        fields["schedule"] = parse_schedule(reader, section["schedule"], f"{key}.schedule")
    if section.get("prewarm") not in (None, False):
        fields["prewarm"] = parse_prewarm(reader, section["prewarm"], f"{key}.prewarm")
    return fields


def parse_schedule(reader: Reader, raw: Any, key: str) -> tuple[Window, ...]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list):
        raise reader.fail(key, f"expected a list of windows such as 'mon-fri 08:30-18:00', got {raw!r}")
    windows = []
    for index, item in enumerate(items):
        try:
            windows.append(parse_window(item))
        except ValueError as error:
            message = str(error) if repr(item) in str(error) else f"{item!r}: {error}"
            raise reader.fail(f"{key}[{index}]", message) from None
    return tuple(windows)


def parse_prewarm(reader: Reader, raw: Any, key: str) -> PrewarmSettings:
    if raw is True or (isinstance(raw, str) and raw.strip().lower() in ("true", "yes", "on")):
        return PrewarmSettings()
    section = reader.mapping(raw, key)
    reader.check_keys(section, PREWARM_KEYS, key)
    settings = PrewarmSettings()
    lead = reader.duration(section.get("lead", settings.lead), f"{key}.lead")
    min_weeks = reader.integer(section.get("min_weeks", settings.min_weeks), f"{key}.min_weeks", minimum=1)
    budget = _number(reader, section.get("budget_per_day", settings.budget_per_day), f"{key}.budget_per_day")
    return PrewarmSettings(lead=lead, min_weeks=min_weeks, budget_per_day=budget)


def parse_cost_settings(reader: Reader, document: Mapping[str, Any]) -> CostSettings:
    costs = reader.mapping(document.get("costs"), "costs")
    reader.check_keys(costs, COSTS_KEYS, "costs")
    currency = reader.string(costs.get("currency", DEFAULT_CURRENCY), "costs.currency").strip().upper()
    if not currency.isalpha() or not 1 <= len(currency) <= 8:
        raise reader.fail("costs.currency", f"expected a currency code such as EUR or USD, got {currency!r}")
    zone = None
    if document.get("timezone") is not None:
        name = reader.string(document["timezone"], "timezone")
        try:
            zone = ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise reader.fail("timezone", f"unknown IANA time zone {name!r} (such as Europe/Paris or UTC)") from None
    return CostSettings(currency=currency, timezone=zone)
