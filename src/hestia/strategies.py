"""
Routing strategies: which instance of a multi-instance service gets a request.

A strategy is a plugin, like a backend: an object providing
L{IRoutingStrategy}, made by a factory registered under a name in the
C{hestia.strategies} entry-point group.  Hestia's own strategies register
there too (see C{setup.cfg}), so a third-party one is found exactly the same
way.  Every strategy is checked with L{verifyObject} when the configuration is
loaded: a plugin that is missing, cannot be imported, cannot be built with the
options given, or lacks part of the interface is a L{ConfigError} naming it and
what it lacks, at start-up rather than on the first request.

A strategy only I{chooses}.  It is given a snapshot of every instance
(L{InstanceView}: state, queue, in-flight count, cost) and the request
(L{hestia.routing.RouteRequest}), and returns one of the views; the route then
acquires that instance, starting it if cold.  Because it never touches a
lifecycle, a strategy is a pure function of what it is shown (plus its own
memory, such as a round-robin counter), and is unit-tested without a reactor.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from zope.interface import Attribute, Interface, implementer
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from hestia.plugins import PluginBroken, PluginNotFound, find_plugin

ENTRY_POINT_GROUP = "hestia.strategies"


@dataclass(frozen=True)
class InstanceView:
    """
    What a strategy may know about one instance when it chooses.

    @ivar index: the instance's position in the service's C{instances:} list.
    @ivar state: C{stopped}, C{starting}, C{ready}, C{stopping} or C{failed}.
    @ivar cooling_down: it failed repeatedly and would refuse a start now.
    """

    index: int
    name: str
    url: str
    state: str
    queued: int
    in_flight: int
    cost: float
    cooling_down: bool = False
    last_request_at: float | None = None

    @property
    def usable(self) -> bool:
        """Worth choosing: not failing in a loop."""
        return not self.cooling_down

    @property
    def pending(self) -> int:
        """Requests this instance holds now, in flight or queued."""
        return self.in_flight + self.queued


class IRoutingStrategy(Interface):
    """Chooses the instance of a multi-instance service for each request."""

    name = Attribute("The name the strategy is configured by, e.g. C{prefer-warm}.")
    retries = Attribute(
        "C{True} if, when the chosen instance fails to start, the route should "
        "ask again (showing the remaining instances) instead of failing the request."
    )

    def choose(instances: Sequence[InstanceView], request: Any) -> InstanceView:
        """
        Pick the instance for C{request}.

        @param instances: every instance not yet tried for this request, in
            configured order; never empty.
        @param request: a L{hestia.routing.RouteRequest} (method, path, model,
            C{now} in reactor seconds), or C{None} for a start without a request.
        @return: one of C{instances}.
        """


def _warm_first(instances: Sequence[InstanceView]) -> list[InstanceView]:
    usable = [instance for instance in instances if instance.usable]
    return usable or list(instances)


@implementer(IRoutingStrategy)
class RoundRobin:
    """Each request to the next instance in turn, whatever its state."""

    name = "round-robin"
    retries = False

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, instances: Sequence[InstanceView], request: Any) -> InstanceView:
        candidates = _warm_first(instances)
        return candidates[next(self._turn) % len(candidates)]


@implementer(IRoutingStrategy)
class LeastPending:
    """The instance with the fewest requests in flight and queued; ties: the cheaper, then the first."""

    name = "least-pending"
    retries = False

    def choose(self, instances: Sequence[InstanceView], request: Any) -> InstanceView:
        return min(_warm_first(instances), key=lambda instance: (instance.pending, instance.cost, instance.index))


_STATE_PREFERENCE = {"ready": 0, "starting": 1}


@implementer(IRoutingStrategy)
class PreferWarm:
    """
    A ready instance when there is one (the least busy, then the cheapest);
    else one already starting; else cold-start the one with the lowest C{cost}.

    This is "local GPU first, cloud VM only when needed": give the local
    instance cost 1 and the VM cost 10, and the VM runs only while the local
    one is unusable or when it is already up.
    """

    name = "prefer-warm"
    retries = True

    def choose(self, instances: Sequence[InstanceView], request: Any) -> InstanceView:
        return min(
            _warm_first(instances),
            key=lambda instance: (
                _STATE_PREFERENCE.get(instance.state, 2),
                instance.cost if instance.state not in _STATE_PREFERENCE else 0,
                instance.pending,
                instance.cost,
                instance.index,
            ),
        )


@implementer(IRoutingStrategy)
class Failover:
    """
    The first instance in configured order that is not failing; the next one
    when it fails to start (the route asks again, without the failed one).
    """

    name = "failover"
    retries = True

    def choose(self, instances: Sequence[InstanceView], request: Any) -> InstanceView:
        for instance in instances:
            if instance.usable and instance.state != "failed":
                return instance
        return _warm_first(instances)[0]


BUILT_IN: dict[str, Any] = {
    strategy.name: strategy for strategy in (RoundRobin, LeastPending, PreferWarm, Failover)
}


class StrategyError(Exception):
    """A strategy plugin could not be loaded; C{str()} says which and why."""


def load_strategy(name: str, options: Mapping[str, Any] | None = None) -> Any:
    """
    Build the strategy registered as C{name}, with C{options} as keyword arguments.

    A built-in name is the built-in; any other is an entry point
    (L{hestia.plugins}, the rule backends follow too).

    @raise StrategyError: no such plugin, it does not import, its factory
        refuses the options, or what it builds lacks part of L{IRoutingStrategy}.
    """
    options = dict(options or {})
    try:
        plugin = find_plugin(ENTRY_POINT_GROUP, name, BUILT_IN)
    except PluginNotFound as missing:
        raise StrategyError(
            f"no strategy plugin named {name!r} in entry-point group {ENTRY_POINT_GROUP} "
            f"(known: {', '.join(missing.known)})"
        ) from None
    except PluginBroken as broken:
        raise StrategyError(f"strategy {broken.where} {broken.error}") from None
    where = f"strategy {name!r}" if plugin.built_in else f"strategy {plugin.where}"
    factory: Any = plugin.factory
    if not callable(factory):
        raise StrategyError(f"{where} is not a class or factory: it lacks __call__")
    try:
        strategy = factory(**options)
    except TypeError as error:
        raise StrategyError(f"{where} does not accept these options: {error}") from None
    except ValueError as error:
        raise StrategyError(f"{where} rejected its options: {error}") from None
    try:
        verifyObject(IRoutingStrategy, strategy)
    except Invalid as error:
        lacks = " ".join(str(error).split())
        raise StrategyError(f"{where} does not provide IRoutingStrategy: {lacks}") from None
    return strategy
