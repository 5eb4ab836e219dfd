"""
Exclusive groups and dependencies: who may run together, and in what order.

Both work through one seam of L{ServiceLifecycle}, its C{start_gate}: before a
member's backend is launched the lifecycle waits for the L{Deferred} the gate
returns.  The lifecycle keeps every other rule (one start serves all waiters,
queue bounds and timeouts, crash-loop cool-down); waiting at the gate counts
against C{start_timeout} like any slow start.

Exclusive groups (C{groups: {gpu0: {exclusive: true}}} and C{group: gpu0})
==========================================================================
At most one member of the group runs (starting, ready or stopping) at a time:
the I{holder}.  The fairness rule:

  1. Members that need to start queue for the group in the order their first
     start was asked for (FIFO); the head is let in as soon as the group is free.
  2. A holder keeps the group for at least C{min_residency} seconds after it was
     let in (default 30), however much others want it: each swap costs a model
     load, so swapping per request would thrash.
  3. After that, if anyone waits, the holder I{yields}: requests already in
     flight (and streams) finish; new requests for it are held in a queue of
     its own (bounded by its C{queue_limit}, timed by its C{queue_timeout})
     instead of extending its turn; once nothing is in flight it is stopped
     with reason C{exclusive}, the next member is let in, and the held
     requests then queue for the group again, behind those already waiting.

So under alternating load every member that is wanted gets a turn within
(members - 1) turns, no member is starved by a steady stream to the holder,
nothing is dropped (requests wait, bounded), and there are at most
C{elapsed / min_residency + 1} swaps.  Deadlock needs a cycle of waits, and the
only wait -- for the holder's in-flight requests to end -- depends on no other
member.  (A dependency of another service is a poor group member: the leases
its dependents hold keep it in flight, so it yields only once they stop.)

Dependencies (C{depends_on: [db]})
==================================
Before a dependent is launched, each dependency, in the order listed, is
acquired like a request would be: started if needed and ready.  The dependent
then holds that claim (a lease) until it is stopped or failed, so a dependency
is never idle-stopped while a dependent runs; its idle clock starts when the
last dependent stopped.  At shutdown dependents are stopped first.  A
dependency that fails to start fails the dependent's start with the reason.
Cycles are a configuration error.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from hestia.config import SERVICE_NAME, Reader, ServiceConfig
from hestia.coroutines import as_deferred
from hestia.errors import GatewayError, StartFailed
from hestia.interfaces import ILease, IRoute
from hestia.lifecycle import ServiceLifecycle, State, StateChange
from hestia.queue import WaitQueue

log = Logger(namespace="hestia.groups")

GROUP_KEYS = {"exclusive", "min_residency"}
DEFAULT_MIN_RESIDENCY = 30.0


@dataclass(frozen=True)
class GroupConfig:
    """
    One entry of the top-level C{groups:} section.

    @ivar min_residency: seconds a member keeps an exclusive group once let in.
    """

    name: str
    exclusive: bool = False
    min_residency: float = DEFAULT_MIN_RESIDENCY


def parse_groups(reader: Reader, raw: Any) -> dict[str, GroupConfig]:
    """The top-level C{groups:} section; errors name C{groups.<name>.<key>}."""
    section = reader.mapping(raw, "groups")
    groups = {}
    for name, value in section.items():
        key = f"groups.{name}"
        if not isinstance(name, str) or not SERVICE_NAME.match(name):
            raise reader.fail(key, "group names must match [a-z0-9][a-z0-9_-]*")
        entry = reader.mapping(value, key)
        reader.check_keys(entry, GROUP_KEYS, key)
        groups[name] = GroupConfig(
            name=name,
            exclusive=reader.boolean(entry.get("exclusive", False), f"{key}.exclusive"),
            min_residency=reader.duration(entry.get("min_residency", DEFAULT_MIN_RESIDENCY), f"{key}.min_residency"),
        )
    return groups


def check_dependencies(reader: Reader, depends_on: Mapping[str, tuple[str, ...]]) -> None:
    """A dependency cycle would make every member wait for the others: refuse it."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = " -> ".join([*path[path.index(name):], name])
            raise reader.fail(f"services.{path[0]}.depends_on", f"dependency cycle: {cycle}")
        if name in done:
            return
        for needed in depends_on.get(name, ()):
            visit(needed, [*path, name])
        done.add(name)

    for name in depends_on:
        visit(name, [])


@implementer(ILease)
class _GroupLease:
    """A member's lease that tells its group when it ends (the holder may then yield)."""

    __slots__ = ("_group", "_lease", "config", "url")

    def __init__(self, lease: ILease, group: ExclusiveGroup) -> None:
        self._lease = lease
        self._group = group
        self.url = lease.url
        self.config = lease.config

    @property
    def fallback(self) -> Callable[[], Deferred[ILease]] | None:
        """The member's own fallback, if it has one, leasing through the group again."""
        inner = self._lease.fallback
        if inner is None:
            return None
        group = self._group
        return lambda: inner().addCallback(lambda lease: _GroupLease(lease, group))

    def release(self) -> None:
        self._lease.release()
        self._group.consider()


class ExclusiveGroup:
    """
    The members of one exclusive group and whose turn it is (see the module docstring).

    @ivar swaps: how many times the holder was stopped to let another in.
    """

    def __init__(self, config: GroupConfig, reactor: IReactorTime) -> None:
        self.config = config
        self._reactor = reactor
        self.members: dict[str, ServiceLifecycle] = {}
        self.holder: ServiceLifecycle | None = None
        self.granted_at = 0.0
        self.yielding = False
        self.swaps = 0
        self._contenders: deque[tuple[ServiceLifecycle, Deferred[None]]] = deque()
        self._held: dict[str, WaitQueue] = {}
        self._timer: IDelayedCall | None = None
        self._soon: IDelayedCall | None = None

    @property
    def name(self) -> str:
        return self.config.name

    def add(self, lifecycle: ServiceLifecycle) -> None:
        self.members[lifecycle.name] = lifecycle
        self._held[lifecycle.name] = WaitQueue(
            self._reactor, lifecycle.config.queue_limit,
            lambda: {"service": lifecycle.name, "state": lifecycle.state.value},
        )
        if self.holder is None and lifecycle.state in (State.STARTING, State.READY, State.STOPPING):
            # Adopted on reload: whoever runs already holds the group.
            self.holder = lifecycle
            self.granted_at = self._reactor.seconds()

    def waiting(self) -> list[str]:
        return [lifecycle.name for lifecycle, _ in self._contenders]

    def held(self, name: str) -> int:
        return len(self._held[name])

    # -- the start gate --------------------------------------------------------------

    def enter(self, lifecycle: ServiceLifecycle) -> Deferred[None]:
        """Fires when C{lifecycle} may launch: the group is free, or already its."""
        if self.holder is None or self.holder is lifecycle:
            self._grant(lifecycle)
            return succeed(None)
        admitted: Deferred[None] = Deferred(lambda d: self._withdraw(lifecycle))
        self._contenders.append((lifecycle, admitted))
        log.info("{service} waits for exclusive group {group} (held by {holder})", service=lifecycle.name,
                 group=self.name, holder=self.holder.name)
        self.consider()
        return admitted

    def _withdraw(self, lifecycle: ServiceLifecycle) -> None:
        self._contenders = deque((lc, d) for lc, d in self._contenders if lc is not lifecycle)

    def _grant(self, lifecycle: ServiceLifecycle) -> None:
        self.holder = lifecycle
        self.granted_at = self._reactor.seconds()
        self.yielding = False

    # -- requests ----------------------------------------------------------------------

    def acquire(self, lifecycle: ServiceLifecycle, request: object) -> Deferred[Any]:
        """A request for C{lifecycle}: held while it yields the group, then queued as usual."""
        if self.yielding and self.holder is lifecycle:
            try:
                held = self._held[lifecycle.name].wait(lifecycle.config.queue_timeout, retry_after=5.0)
            except GatewayError as error:
                failed: Deferred[Any] = Deferred()
                failed.errback(error)
                return failed
            acquired: Deferred[Any] = held.addCallback(lambda _: lifecycle.acquire(request))
        else:
            acquired = lifecycle.acquire(request)
        return acquired.addCallback(lambda lease: _GroupLease(lease, self))

    # -- deciding -----------------------------------------------------------------------

    def consider(self) -> None:
        """Let the next member in, or ask the holder to yield, when the rules say so."""
        holder = self.holder
        if holder is None:
            while self._contenders:
                lifecycle, admitted = self._contenders.popleft()
                if not admitted.called:
                    self._grant(lifecycle)
                    admitted.callback(None)
                    return
            return
        if not self._contenders:
            return
        remaining = self.granted_at + self.config.min_residency - self._reactor.seconds()
        if remaining > 0:
            if self._timer is None or not self._timer.active():
                self._timer = self._reactor.callLater(remaining, self._residency_over)
            return
        self.yielding = True
        if holder.state is State.READY and holder.in_flight == 0 and not len(holder.queue):
            log.info("{holder} yields exclusive group {group} to {next}", holder=holder.name, group=self.name,
                     next=self._contenders[0][0].name)
            holder.stop("exclusive").addErrback(lambda failure: log.failure("stopping {s}", failure, s=holder.name))
        elif holder.state in (State.STOPPED, State.FAILED):
            self._free(holder)

    def _residency_over(self) -> None:
        self._timer = None
        self.consider()

    def observe(self, change: StateChange) -> None:
        """A member changed state: a stopped or failed holder frees the group."""
        lifecycle = self.members.get(change.service)
        if lifecycle is None:
            return
        if change.new in (State.STOPPED, State.FAILED):
            self._withdraw(lifecycle)
            if self.holder is lifecycle:
                if change.reason == "exclusive":
                    self.swaps += 1
                self._free(lifecycle)
        elif change.new is State.READY:
            self._later()

    def _free(self, lifecycle: ServiceLifecycle) -> None:
        self.holder = None
        self.yielding = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

        # Not from inside the state change being observed: the next member's
        # start and the held requests' new start are transitions of their own.
        def next_turn() -> None:
            self.consider()
            self._held[lifecycle.name].release_all()

        self._reactor.callLater(0, next_turn)

    def _later(self) -> None:
        if self._soon is None or not self._soon.active():
            self._soon = self._reactor.callLater(0, self.consider)

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "exclusive": True,
            "min_residency": self.config.min_residency,
            "holder": self.holder.name if self.holder else None,
            "yielding": self.yielding,
            "waiting": self.waiting(),
            "swaps": self.swaps,
        }


@implementer(IRoute)
class GroupMemberRoute:
    """
    A group member as the proxy and the API see it: its lifecycle, with
    requests passing through the group (held while it yields, see L{ExclusiveGroup}).
    """

    def __init__(self, lifecycle: ServiceLifecycle, group: ExclusiveGroup) -> None:
        self.lifecycle = lifecycle
        self.group = group

    # The route surface (hestia.routing.Route), spelled out rather than forwarded with
    # __getattr__: what a member route offers is what the interface says, nothing more.

    @property
    def name(self) -> str:
        return self.lifecycle.name

    @property
    def config(self) -> ServiceConfig:
        return self.lifecycle.config

    @property
    def state(self) -> State:
        return self.lifecycle.state

    @property
    def backend(self) -> Any:
        return self.lifecycle.backend

    @property
    def in_flight(self) -> int:
        return self.lifecycle.in_flight

    @property
    def state_since(self) -> float:
        return self.lifecycle.state_since

    @property
    def queue(self) -> WaitQueue:
        return self.lifecycle.queue

    @property
    def last_request_at(self) -> float | None:
        return self.lifecycle.last_request_at

    def acquire(self, request: object = None) -> Deferred[Any]:
        return self.group.acquire(self.lifecycle, request)

    def acquire_passive(self, request: object = None) -> Deferred[Any] | None:
        return self.lifecycle.acquire_passive(request)

    def start(self, reason: str = "api") -> Deferred[None]:
        return self.lifecycle.start(reason)

    def stop(self, reason: str = "api") -> Deferred[None]:
        return self.lifecycle.stop(reason)

    def shutdown(self) -> Deferred[None]:
        return self.lifecycle.shutdown()

    def add_observer(self, observer: Callable[[Any], None]) -> None:
        self.lifecycle.add_observer(observer)

    # A schedule or a pre-warm keeps a member running (hestia.schedule.Holdable).
    def hold(self, reason: str) -> None:
        self.lifecycle.hold(reason)

    def release_hold(self, reason: str) -> None:
        self.lifecycle.release_hold(reason)

    def lifecycles(self) -> list[ServiceLifecycle]:
        return [self.lifecycle]

    def status(self) -> dict[str, Any]:
        status = self.lifecycle.status()
        status["queued"] += self.group.held(self.lifecycle.name)
        status["group"] = self.group.status()
        return status


class Coordinator:
    """
    Wires a configuration's groups and dependencies into the gateway's routes.

    Built anew on every (re)load; L{detach} undoes the wiring of the old one.
    """

    def __init__(self, plan: Any, reactor: IReactorTime) -> None:
        self.plan = plan
        self._reactor = reactor
        self.groups: dict[str, ExclusiveGroup] = {}
        self._dependency_leases: dict[int, list[Any]] = {}
        self._gated: list[ServiceLifecycle] = []
        self._routes: MutableMapping[str, Any] = {}
        self._attached = False

    @staticmethod
    def unwrap(routes: MutableMapping[str, Any]) -> None:
        for name, route in list(routes.items()):
            if isinstance(route, GroupMemberRoute):
                routes[name] = route.lifecycle

    def attach(self, routes: MutableMapping[str, Any]) -> None:
        """Gate every member and dependent in C{routes}, wrapping group members' routes."""
        self._routes = routes
        self._attached = True
        if self.plan is None:
            return
        for name, group_name in self.plan.membership.items():
            config = self.plan.groups[group_name]
            lifecycle = routes[name]
            if not config.exclusive or not isinstance(lifecycle, ServiceLifecycle):
                continue
            group = self.groups.get(group_name)
            if group is None:
                group = self.groups[group_name] = ExclusiveGroup(config, self._reactor)
            group.add(lifecycle)
            routes[name] = GroupMemberRoute(lifecycle, group)
        for name in set(self.plan.depends_on) | set(self.plan.membership):
            route = routes.get(name)
            for lifecycle in route.lifecycles() if route is not None else []:
                lifecycle.start_gate = self._gate
                lifecycle.add_observer(self._observe)
                self._gated.append(lifecycle)

    def detach(self) -> None:
        self._attached = False
        for lifecycle in self._gated:
            if lifecycle.start_gate == self._gate:
                lifecycle.start_gate = None
        for leases in self._dependency_leases.values():
            for lease in leases:
                lease.release()
        self._dependency_leases.clear()

    def _group_of(self, lifecycle: ServiceLifecycle) -> ExclusiveGroup | None:
        for group in self.groups.values():
            if group.members.get(lifecycle.name) is lifecycle:
                return group
        return None

    def _owner(self, lifecycle: ServiceLifecycle) -> str:
        for name, route in self._routes.items():
            if lifecycle in route.lifecycles():
                return name
        return lifecycle.name

    def _gate(self, lifecycle: ServiceLifecycle) -> Deferred[None]:
        ready = self._dependencies(lifecycle)
        group = self._group_of(lifecycle)
        if group is not None:
            ready.addCallback(lambda _: group.enter(lifecycle))
        return ready

    @as_deferred
    async def _dependencies(self, lifecycle: ServiceLifecycle) -> None:
        needed = self.plan.depends_on.get(self._owner(lifecycle), ()) if self.plan else ()
        leases = self._dependency_leases.setdefault(id(lifecycle), [])
        for dependency in needed:
            route = self._routes.get(dependency)
            if route is None:
                continue
            try:
                lease = await route.acquire(None)
            except CancelledError:
                raise
            except GatewayError as error:
                raise StartFailed(f"dependency {dependency} did not start: {error.reason}",
                                  detail=error.detail) from None
            if not self._attached or lifecycle.state is not State.STARTING:
                lease.release()
                return
            leases.append(lease)

    def _observe(self, change: StateChange) -> None:
        if not self._attached:
            return
        for group in self.groups.values():
            group.observe(change)
        if change.new in (State.STOPPED, State.FAILED):
            for lifecycle in self._gated:
                if lifecycle.name == change.service:
                    for lease in self._dependency_leases.pop(id(lifecycle), []):
                        lease.release()

    def shutdown(self, routes: Mapping[str, Any]) -> Deferred[Any]:
        """
        Shut every route down, each dependency only after its dependents.
        """
        dependents: dict[str, list[str]] = {name: [] for name in routes}
        if self.plan is not None:
            for name, needed in self.plan.depends_on.items():
                for dependency in needed:
                    if dependency in dependents and name in routes:
                        dependents[dependency].append(name)
        done: dict[str, Deferred[Any]] = {}

        def shut(name: str) -> Deferred[Any]:
            if name not in done:
                before = [shut(dependent) for dependent in dependents[name]]
                if before:
                    done[name] = DeferredList(before, consumeErrors=True).addCallback(
                        lambda _: routes[name].shutdown())
                else:
                    done[name] = routes[name].shutdown()
            return done[name]

        return DeferredList([shut(name) for name in routes], consumeErrors=True)




GateFactory = Callable[[ServiceLifecycle], Deferred[None]]
