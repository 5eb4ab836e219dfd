"""
The gateway: the registry of every service's route, reloads, drain and shutdown.

One L{Gateway} per running Hestia.  It builds a lifecycle (with its backend
plugin) for each configured service, wraps it in the route its kind needs, and
swaps configurations on reload without dropping the services that did not
change.  How backends are reached (the client, its pool, the per-backend
admission windows) is its L{Upstream} (L{hestia.upstream}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool
from twisted.web.iweb import IAgent

from hestia.backends import find_backend
from hestia.config import Config, ServiceConfig
from hestia.errors import UnknownService
from hestia.groups import Coordinator, GroupMemberRoute
from hestia.interfaces import IAdoptableBackend, IBackend, IPersistentBackend, IRequestExchange, IStateStore
from hestia.lifecycle import Observer, ServiceLifecycle, State
from hestia.records import RequestRecord
from hestia.reload import Changes, ReloadPolicy, ReloadSummary, diff, reload_policy, runs_on_a_machine
from hestia.routing import ModelRoute, MultiInstanceRoute, Route, persistent_lifecycles
from hestia.upstream import Upstream

log = Logger(namespace="hestia.gateway")

RequestObserver = Callable[[RequestRecord], None]


def _runs_itself(lifecycle: ServiceLifecycle, service: ServiceConfig) -> bool:
    """Both the running and the new configuration start and stop something of their own."""
    return lifecycle.backend.has_lifecycle and service.backend not in ("static", "instances", "route")


class Gateway:
    """
    The services Hestia manages, by name, and what a reload does to them.

    @ivar request_observers: called with each finished L{Exchange} (access
        log, metrics).
    """

    def __init__(
        self,
        config: Config,
        reactor: IReactorTime,
        agent: IAgent | None = None,
        pool: HTTPConnectionPool | None = None,
        cooperator: task.Cooperator | None = None,
        build_backend: Callable[[ServiceConfig], IBackend] | None = None,
        upstream: Upstream | None = None,
    ) -> None:
        """
        @param build_backend: makes each service's backend; by default the
            backend plugin named by the service's configuration.  Tests pass
            one that returns L{hestia.testing.FakeBackend}s.
        @param upstream: how backends are reached; by default an L{Upstream}
            over C{agent} and C{pool} (its own client if C{agent} is C{None}).
        """
        self.config = config
        self.reactor = reactor
        self.upstream = upstream or Upstream(reactor, config.server, agent, pool)
        self.cooperator = cooperator or task.Cooperator(scheduler=lambda work: reactor.callLater(0, work))
        self._build_backend = build_backend or (
            lambda service: find_backend(service.backend).build(service, reactor, self.upstream.agent)
        )
        # name -> route (hestia.routing.Route): for a plain service its
        # ServiceLifecycle; for instances:/route_by: services a composite route;
        # for an exclusive group's member a GroupMemberRoute around its lifecycle.
        self.services: dict[str, Route] = {}
        self.state_observers: list[Observer] = []
        self.request_observers: list[RequestObserver] = []
        self._in_flight_requests = 0
        self._drained: list[Deferred[None]] = []
        # Lifecycles removed by a reload that have not stopped yet, by name (issue 19).
        self._retiring: dict[str, Deferred[Any]] = {}
        # Services added at run time (container label discovery): a reload keeps them.
        self.discovered: set[str] = set()
        self._shutting_down = False
        for service in config.services.values():
            self._add(service)
        self._coordinator = Coordinator(config.routing, reactor)
        self._coordinator.attach(self.services)
        self._gpus = self._attach_gpus()

    # -- services ----------------------------------------------------------------

    def route(self, name: str) -> Route:
        """The L{IRoute} of service C{name} (see C{services}); L{UnknownService} if none."""
        try:
            return self.services[name]
        except KeyError:
            raise UnknownService("no such service", service=name) from None


    def add_state_observer(self, observer: Observer) -> None:
        """Tell C{observer} of every transition of every service, present and future."""
        self.state_observers.append(observer)
        for lifecycle in self.services.values():
            lifecycle.add_observer(observer)

    def _build(self, service: ServiceConfig) -> ServiceLifecycle:
        lifecycle = ServiceLifecycle(service, self._backend_for(service), self.reactor, list(self.state_observers))
        lifecycle.build_backend = self._backend_for  # for a restart with new settings (issue 19)
        previous = self._retiring.get(service.name)
        if previous is not None:
            lifecycle.start_after(previous)  # its predecessor of the same name still drains
        self.upstream.watch(lifecycle)
        return lifecycle

    def _backend_for(self, service: ServiceConfig) -> IBackend:
        backend = self._build_backend(service)
        if self.store is not None and IPersistentBackend.providedBy(backend):
            backend.use_store(self.store)
        return backend

    # The state store, for backends that record facts of their own (remote VMs).
    store: IStateStore | None = None

    def use_store(self, store: IStateStore) -> None:
        """Give every L{IPersistentBackend}, present and future, the state store."""
        self.store = store
        for lifecycle in persistent_lifecycles(self.services):
            IPersistentBackend(lifecycle.backend).use_store(store)

    def _add(self, service: ServiceConfig) -> Any:
        if service.backend in ("instances", "route"):
            from hestia.routing import build_route

            route = build_route(service, self.config.routing, self._build, self.route, self.reactor.seconds)
        else:
            route = self._build(service)
        self.services[service.name] = route
        return route

    def host_route(self, host: bytes | None) -> str | None:
        """The service whose C{hosts:} list C{host} (a C{Host} header value), if any."""
        routing = self.config.routing
        if not host or routing is None or not routing.hosts:
            return None
        name = host.decode("ascii", "replace").lower()
        if not name.startswith("["):
            name = name.rsplit(":", 1)[0]
        service: str | None = routing.hosts.get(name.rstrip("."))
        return service if service in self.services else None

    def add_service(self, service: ServiceConfig) -> bool:
        """
        Add (or replace) a service found at run time, such as a labelled container.

        An unchanged one is left alone; a changed one is stopped and rebuilt,
        as on reload.  The configuration file's own services are never touched.

        @return: C{True} when something was added or replaced.
        """
        current = self.services.get(service.name)
        if self._shutting_down or (current is not None and service.name not in self.discovered):
            return False
        if current is not None:
            if current.config == service:
                return False
            current.stop("reload")
        self.discovered.add(service.name)
        self._add(service)
        self.adopt_running([service.name])
        return True

    def remove_service(self, name: str) -> None:
        """Stop and forget a service added by L{add_service}."""
        if name in self.discovered:
            self.discovered.discard(name)
            self.services.pop(name).stop("removed")

    def adopt_running(self, names: list[str] | None = None) -> None:
        """
        Take services that already run (started outside Hestia) as ready.

        Asks each L{IAdoptableBackend} whether its service runs; if so it is
        "started" through the lifecycle (which probes it), then idle-stopped
        like any other.
        """
        for name in list(self.services) if names is None else names:
            lifecycle = self.services.get(name)
            if lifecycle is None or not IAdoptableBackend.providedBy(lifecycle.backend):
                continue
            if lifecycle.state is not State.STOPPED:
                continue

            def adopt(running: bool, lifecycle: Route = lifecycle) -> None:
                if running and lifecycle.state is State.STOPPED and self.services.get(lifecycle.name) is lifecycle:
                    log.info("{service} is already running: adopting it", service=lifecycle.name)
                    lifecycle.start("adopted").addErrback(lambda failure: None)

            maybeDeferred(lifecycle.backend.running_already).addCallback(adopt).addErrback(
                lambda failure: log.failure("checking whether a service already runs", failure)
            )

    def start_keep_warm(self) -> None:
        """Start every C{keep_warm} service now: they are wanted before any request."""
        for lifecycle in self.services.values():
            if lifecycle.config.keep_warm and lifecycle.state is State.STOPPED:
                lifecycle.start("keep_warm").addErrback(lambda failure: None)

    # -- reloading (issue 19: see hestia.reload) -------------------------------------

    def apply(self, config: Config) -> dict[str, Any]:
        """
        Switch to C{config}, touching only the services that changed.

        In-place settings reach the running service at once.  A change of how
        a service runs waits for its next natural stop (or an explicit
        restart), unless C{reload: {restart: now}}; a removed service is
        stopped once its requests in flight have finished.

        @return: the summary for the log and C{POST /v1/reload} (L{ReloadSummary}).
        """
        policy = reload_policy(config.sections)
        summary = ReloadSummary()
        self._gpus.detach()
        self._coordinator.detach()
        Coordinator.unwrap(self.services)
        self.config = config  # composite routes are built from the new routing plan
        self.upstream.configure(config.server)
        for name in list(self.services):
            if name not in config.services and name not in self.discovered:
                self._retire(self.services.pop(name))
                summary.removed.append(name)
        for name, service in config.services.items():
            current = self.services.get(name)
            if name in self.discovered:
                # The file now defines it: the file wins over a container label.
                self.discovered.discard(name)
                if current is not None:
                    self._retire(current)
                current = None
            if current is None:
                self._add(service)
                summary.added.append(name)
            else:
                self._update(current, service, policy, summary)
        self._coordinator = Coordinator(config.routing, self.reactor)
        self._coordinator.attach(self.services)
        self._gpus = self._attach_gpus()
        self.start_keep_warm()
        self.adopt_running(summary.added + list(summary.replaced))
        return summary.as_json()

    def _update(self, current: Route, service: ServiceConfig, policy: ReloadPolicy, summary: ReloadSummary) -> None:
        """Bring one existing service to C{service}, in place where its kind allows."""
        name = service.name
        if isinstance(current, ServiceLifecycle) and _runs_itself(current, service):
            changes = diff(current.config, service)
            if not changes:
                summary.unchanged.append(name)
                return
            summary.record(name, changes, self._reconfigure(current, service, policy))
            return
        if isinstance(current, MultiInstanceRoute) and service.backend == "instances":
            if current.config == service:
                summary.unchanged.append(name)
                return
            self._update_instances(current, service, policy, summary)
            return
        if isinstance(current, ModelRoute) and service.backend == "route":
            # A router holds nothing but the plan, and its targets' models may have
            # changed without its own keys: always the new plan, at once.
            route = self._add(service)
            if current.config == service and route.plan == current.plan and route.models() == current.models():
                summary.unchanged.append(name)
            else:
                summary.replaced[name] = list(diff(current.config, service).in_place) or ["models"]
            return
        if current.config == service:
            summary.unchanged.append(name)
            return
        # Nothing of its own runs (a static url, a model router), or its kind
        # changed: a new route from now on, the old one retired gracefully.
        changes = diff(current.config, service)
        self._retire(current)
        self._add(service)
        summary.replaced[name] = list(changes.in_place + changes.how_it_runs)

    def _reconfigure(self, lifecycle: ServiceLifecycle, service: ServiceConfig, policy: ReloadPolicy) -> bool:
        """
        Apply C{service} to a running lifecycle.

        @return: C{True} when it was stopped at once (C{reload: {restart: now}}).
        """
        machine = runs_on_a_machine(lifecycle.built_from) or runs_on_a_machine(service) or (
            IPersistentBackend.providedBy(lifecycle.backend)
        )
        lifecycle.reconfigure(service)
        if lifecycle.pending_changes and policy.restart == "now" and not machine:
            # The old behaviour, asked for: cut it now, start on the next request.
            lifecycle.stop("reload").addErrback(lambda failure: None)
            return True
        return False

    def _update_instances(
        self, route: MultiInstanceRoute, service: ServiceConfig, policy: ReloadPolicy, summary: ReloadSummary
    ) -> None:
        """A multi-instance service: each instance kept and reconfigured by name, as a service is."""
        from hestia.routing import build_route

        old = {lifecycle.name: lifecycle for lifecycle in route.instances}
        parent = diff(route.config, service)
        in_place = set(parent.in_place)
        how = set(parent.how_it_runs) - {"instances"}
        restarted = False

        def reuse(instance: ServiceConfig) -> ServiceLifecycle:
            nonlocal restarted
            lifecycle = old.pop(instance.name, None)
            if lifecycle is None or not _runs_itself(lifecycle, instance):
                if lifecycle is not None:
                    self._retire_lifecycle(lifecycle)
                in_place.add("instances")
                return self._build(instance)
            changes = diff(lifecycle.config, instance)
            in_place.update(changes.in_place)
            how.update(changes.how_it_runs)
            if changes:
                restarted = self._reconfigure(lifecycle, instance, policy) or restarted
            return lifecycle

        self.services[service.name] = build_route(
            service, self.config.routing, reuse, self.route, self.reactor.seconds
        )
        for leftover in old.values():
            in_place.add("instances")
            self._retire_lifecycle(leftover)
        summary.record(service.name, Changes(tuple(sorted(in_place)), tuple(sorted(how))), restarted)

    def _retire(self, route: Route) -> None:
        """Stop what a route runs once its requests in flight have finished (a model route runs nothing)."""
        for lifecycle in route.lifecycles():
            self._retire_lifecycle(lifecycle)

    def _retire_lifecycle(self, lifecycle: ServiceLifecycle) -> None:
        """
        Retire one lifecycle, and remember it until it has stopped: a service
        of the same name added meanwhile (removed and put back) must not start
        a second process on the same port while the old one still drains.
        """
        name = lifecycle.name
        stopped = lifecycle.retire("removed").addErrback(lambda failure: None)
        if stopped.called:
            return
        self._retiring[name] = stopped

        def forget(result: object) -> object:
            if self._retiring.get(name) is stopped:
                del self._retiring[name]
            return result

        stopped.addBoth(forget)

    def restart(self, name: str) -> Deferred[None]:
        """
        Restart service C{name} with its current configuration (C{POST
        /v1/services/<name>/restart}): drained, stopped, started, its waiting
        requests held through the start.  A multi-instance service restarts one
        instance after the other, so that the rest keep serving.
        """
        route = self.route(name)
        if isinstance(route, GroupMemberRoute):  # a group member's route wraps its lifecycle
            route = route.lifecycle
        if isinstance(route, ServiceLifecycle):
            return route.restart("restart")
        if isinstance(route, MultiInstanceRoute):
            instances = list(route.instances)

            def next_instance(_: object = None) -> Deferred[None]:
                if not instances:
                    return succeed(None)
                return instances.pop(0).restart("restart").addCallback(next_instance)

            return next_instance()
        return succeed(None)  # a model router runs nothing of its own

    def _attach_gpus(self) -> Any:
        """Issue 17: the GPU claims of this configuration on the claimants' lifecycles (hestia.gpu)."""
        from hestia.gpu import GpuCoordinator, NvidiaSmi

        gpus = GpuCoordinator(self.config.sections.get("gpus") or {}, self.reactor,
                              NvidiaSmi(self.reactor) if self.config.sections.get("gpus") else None)
        claimants = {}
        for name, route in self.services.items():
            lifecycle = route.lifecycle if isinstance(route, GroupMemberRoute) else route
            if isinstance(lifecycle, ServiceLifecycle) and lifecycle.config.gpu is not None:
                claimants[name] = lifecycle
        gpus.attach(claimants)
        return gpus

    # -- requests ----------------------------------------------------------------------

    def request_began(self, exchange: IRequestExchange) -> None:
        self._in_flight_requests += 1

    def request_ended(self, exchange: IRequestExchange) -> None:
        self._in_flight_requests -= 1
        record: RequestRecord = exchange.record
        for observer in self.request_observers:
            try:
                observer(record)
            except Exception:
                log.failure("request observer failed")
        if self._in_flight_requests == 0:
            drained, self._drained = self._drained, []
            for waiter in drained:
                if not waiter.called:
                    waiter.callback(None)

    @property
    def in_flight_requests(self) -> int:
        return self._in_flight_requests

    def drain(self, timeout: float) -> Deferred[None]:
        """Fires when no proxied request is in flight, or after C{timeout}."""
        if self._in_flight_requests == 0:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._drained.append(waiter)

        def give_up() -> None:
            if not waiter.called:
                waiter.callback(None)

        timer = self.reactor.callLater(timeout, give_up)

        def cancel_timer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        waiter.addBoth(cancel_timer)
        return waiter

    def shutdown(self) -> Deferred[Any]:
        """Stop every service Hestia started, and close the pool."""
        self._shutting_down = True
        # Dependents first, then what they depend on (hestia.groups).
        done = self._coordinator.shutdown(self.services)
        done.addBoth(lambda result: self.upstream.close())
        return done
