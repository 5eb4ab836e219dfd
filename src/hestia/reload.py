"""
What a configuration reload does to a running service (issue 19).

Every setting of a service is either B{in place} -- it applies to the running
service at once (a timeout, a queue limit, a health interval, a strategy) --
or B{how it runs} -- it only takes effect when the service is started again
(its command, environment, working directory, url, backend section).  The
split is written once, in L{SETTINGS}; L{diff} compares two configurations of
one service by it, and L{running_settings} gives the configuration a running
service should follow: the new in-place settings on top of how it was started.

A key nobody classified counts as "how it runs" (the safe side: nothing is
restarted for it, the service just says a restart is pending), and a unit
test (tests/test_reload.py) fails until the key has a line here.

The policy for how-it-runs changes is the top-level C{reload:} section:
C{restart: next_stop} (the default) applies them at the service's next natural
stop and shows C{restart_pending} in its status; C{restart: now} stops the
service at once, as Hestia did before.  A service on a remote machine
(C{semaphore}, C{wol}, C{exec}) is never stopped by a reload itself.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any

from hestia.config import Reader, ServiceConfig


class Applies(enum.Enum):
    """When a changed setting reaches the running service."""

    IN_PLACE = "in place"
    HOW_IT_RUNS = "how it runs"


IN_PLACE = Applies.IN_PLACE
HOW_IT_RUNS = Applies.HOW_IT_RUNS

# The one table: every key a service (or an instance of one) accepts.  Keys
# that features being built alongside add (issues 13, 16, 17, 18) are here
# already, so that whoever adds them to the schema finds them classified.
SETTINGS: Mapping[str, Applies] = {
    # Lifecycle timers and the queue: read by the lifecycle at each decision.
    "idle_timeout": IN_PLACE,
    "start_timeout": IN_PLACE,
    "queue_limit": IN_PLACE,
    "queue_timeout": IN_PLACE,
    "stop_timeout": IN_PLACE,
    "keep_warm": IN_PLACE,
    # Readiness probes (path, tcp, interval, timeout): how Hestia looks, not how it runs.
    "health": IN_PLACE,
    # Response deadline and concurrency (issue 13).
    "response_timeout": IN_PLACE,
    "response_idle_timeout": IN_PLACE,
    "max_concurrency": IN_PLACE,
    # Costs, schedules, predictive warm-up (issue 16).
    "cost_per_hour": IN_PLACE,
    "schedule": IN_PLACE,
    "prewarm": IN_PLACE,
    "cost": IN_PLACE,  # an instance's routing weight
    # Routing: which instance or service a request goes to (issues 7, 17).
    "strategy": IN_PLACE,
    "targets": IN_PLACE,
    "models": IN_PLACE,
    "aliases": IN_PLACE,
    "hosts": IN_PLACE,
    "group": IN_PLACE,
    "depends_on": IN_PLACE,
    # Local AI workloads (issue 17): declared GPU memory is a scheduling rule, not
    # how the process runs; abandoned starts and in-band loading events likewise.
    "gpu": IN_PLACE,
    "cancel_abandoned_start": IN_PLACE,
    "loading_events": IN_PLACE,
    # Requests Hestia answers itself, and who may send them.
    "passive": IN_PLACE,
    "on_cold": IN_PLACE,
    "pass_authorization": IN_PLACE,
    # How it runs: the process, its surroundings and where it answers.
    "command": HOW_IT_RUNS,
    "env": HOW_IT_RUNS,
    "cwd": HOW_IT_RUNS,
    "url": HOW_IT_RUNS,
    # Backend sections: the container, the templates, the machine.
    "docker": HOW_IT_RUNS,
    "semaphore": HOW_IT_RUNS,
    "wol": HOW_IT_RUNS,
    "exec": HOW_IT_RUNS,
    # The shape of a composite service; each instance is then compared on its own.
    "instances": HOW_IT_RUNS,
    "route_by": HOW_IT_RUNS,
}

# ServiceConfig fields that are not a key of their own.
_IDENTITY = {"name"}
# Derived from which of command/docker/semaphore/... is present.
DERIVED = {"backend": HOW_IT_RUNS}
# Fields holding several keys: a mapping (key -> value) or a dataclass (one field per key).
_KEYED_MAPPINGS = {"sections", "routing"}

# Backends whose service runs on a machine of its own: a reload never stops one.
MACHINE_BACKENDS = frozenset({"semaphore", "wol", "exec"})


def applies(key: str) -> Applies:
    """How a change of C{key} is applied; an unclassified key is "how it runs"."""
    return SETTINGS.get(key, HOW_IT_RUNS)


@dataclass(frozen=True)
class Changes:
    """The keys of one service that differ between two configurations, by class."""

    in_place: tuple[str, ...] = ()
    how_it_runs: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.in_place or self.how_it_runs)


def _is_group(name: str, value: Any) -> bool:
    """A field that is a dataclass of several keys (the tunables), not a key of its own."""
    return name not in SETTINGS and name not in DERIVED and is_dataclass(value) and not isinstance(value, type)


def _keyed_values(config: ServiceConfig) -> dict[str, Any]:
    """C{config} as C{{key: value}}, one entry per setting (see L{SETTINGS})."""
    values: dict[str, Any] = {}
    for item in fields(config):
        if item.name in _IDENTITY:
            continue
        value = getattr(config, item.name)
        if item.name in _KEYED_MAPPINGS:
            values.update({str(key): part for key, part in value.items()})
        elif _is_group(item.name, value):
            # Tunables: each of its fields is a key of its own.
            values.update({sub.name: getattr(value, sub.name) for sub in fields(value)})
        else:
            values[item.name] = value
    return values


def setting_keys(config: ServiceConfig) -> set[str]:
    """The names L{diff} compares for a configuration (for the classification test)."""
    return set(_keyed_values(config))


def diff(old: ServiceConfig, new: ServiceConfig) -> Changes:
    """Which settings changed from C{old} to C{new}, split by L{SETTINGS}."""
    before, after = _keyed_values(old), _keyed_values(new)
    changed = sorted(key for key in before.keys() | after.keys() if before.get(key, _ABSENT) != after.get(key, _ABSENT))
    return Changes(
        in_place=tuple(key for key in changed if _classify(key) is IN_PLACE),
        how_it_runs=tuple(key for key in changed if _classify(key) is HOW_IT_RUNS),
    )


_ABSENT = object()


def _classify(key: str) -> Applies:
    return DERIVED.get(key) or applies(key)


def running_settings(running: ServiceConfig, desired: ServiceConfig) -> ServiceConfig:
    """
    What a running service follows after a reload to C{desired}: its in-place
    settings, and how it runs from C{running} (the configuration it was started with).
    """
    updates: dict[str, Any] = {}
    for item in fields(running):
        if item.name in _IDENTITY:
            continue
        old, new = getattr(running, item.name), getattr(desired, item.name)
        if item.name in _KEYED_MAPPINGS:
            merged = {key: value for key, value in old.items() if _classify(str(key)) is HOW_IT_RUNS}
            merged.update({key: value for key, value in new.items() if _classify(str(key)) is IN_PLACE})
            updates[item.name] = merged
        elif _is_group(item.name, old):
            updates[item.name] = replace(
                old,
                **{sub.name: getattr(new, sub.name) for sub in fields(old) if _classify(sub.name) is IN_PLACE},
            )
        elif _classify(item.name) is IN_PLACE:
            updates[item.name] = new
    return replace(running, **updates)


# -- the top-level reload: section ---------------------------------------------------

RELOAD_KEYS = {"restart"}
RESTART_POLICIES = ("next_stop", "now")


@dataclass(frozen=True)
class ReloadPolicy:
    """
    @ivar restart: C{next_stop} (a how-it-runs change waits for the service's
        next natural stop, or C{POST /v1/services/<name>/restart}) or C{now}
        (the service is stopped at once; a machine backend still is not).
    """

    restart: str = "next_stop"


def parse_reload_section(reader: Reader, raw: Any) -> ReloadPolicy:
    section = reader.mapping(raw, "reload")
    reader.check_keys(section, RELOAD_KEYS, "reload")
    restart = section.get("restart", ReloadPolicy.restart)
    if restart not in RESTART_POLICIES:
        raise reader.fail("reload.restart", f"expected next_stop or now, got {restart!r}")
    return ReloadPolicy(restart=restart)


def reload_policy(sections: Mapping[str, Any]) -> ReloadPolicy:
    policy = sections.get("reload")
    return policy if isinstance(policy, ReloadPolicy) else ReloadPolicy()


def runs_on_a_machine(config: ServiceConfig) -> bool:
    """A service whose backend is a machine of its own: a reload never stops it."""
    return config.backend in MACHINE_BACKENDS


# -- what a reload did ------------------------------------------------------------


@dataclass
class ReloadSummary:
    """
    What one reload did, by service, for the log line and C{POST /v1/reload}.

    @ivar in_place: service -> the in-place keys that changed (applied at once).
    @ivar restart_pending: service -> the how-it-runs keys waiting for its next
        start (its next natural stop, or C{POST /v1/services/<name>/restart}).
    @ivar restarted: service -> the how-it-runs keys it was stopped for at once
        (C{reload: {restart: now}}).
    @ivar replaced: service -> the keys of a route with nothing running of its
        own (a static url, a model router) or whose kind changed: built anew.
    """

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    in_place: dict[str, list[str]] = field(default_factory=dict)
    restart_pending: dict[str, list[str]] = field(default_factory=dict)
    restarted: dict[str, list[str]] = field(default_factory=dict)
    replaced: dict[str, list[str]] = field(default_factory=dict)

    def record(self, name: str, changes: Changes, restarted: bool) -> None:
        if changes.in_place:
            self.in_place[name] = list(changes.in_place)
        if changes.how_it_runs:
            (self.restarted if restarted else self.restart_pending)[name] = list(changes.how_it_runs)
        if not changes:
            self.unchanged.append(name)

    @property
    def changed(self) -> list[str]:
        names = {*self.in_place, *self.restart_pending, *self.restarted, *self.replaced}
        return sorted(names)

    def as_json(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
            "unchanged": self.unchanged,
            "in_place": self.in_place,
            "restart_pending": self.restart_pending,
            "restarted": self.restarted,
            "replaced": self.replaced,
        }


def describe_summary(summary: Mapping[str, Any]) -> str:
    """One line: C{changed in place: a (idle_timeout); restart pending: b (command); ...}."""

    def keyed(items: Mapping[str, list[str]]) -> str:
        return ", ".join(f"{name} ({', '.join(keys)})" for name, keys in sorted(items.items()))

    parts = []
    for label, key in (("added", "added"), ("removed (stopping once idle)", "removed")):
        if summary.get(key):
            parts.append(f"{label}: {', '.join(summary[key])}")
    for label, key in (
        ("changed in place", "in_place"),
        ("restart pending", "restart_pending"),
        ("restarted now", "restarted"),
        ("rebuilt", "replaced"),
    ):
        if summary.get(key):
            parts.append(f"{label}: {keyed(summary[key])}")
    parts.append(f"unchanged: {len(summary.get('unchanged', []))}")
    return "; ".join(parts)
