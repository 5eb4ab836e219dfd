"""
Routes: what a service name in C{/services/<name>/} leads to (issue 7).

The proxy and the API talk to one I{route} per service name (the L{Route}
surface: C{acquire()}, C{status()}, C{start()}, C{stop()}, ...).  For a plain
service the route I{is} its L{ServiceLifecycle}: nothing is added on the hot
path.  Two other kinds share that surface:

  - L{MultiInstanceRoute} (C{instances:}): several lifecycles, each with its
    own backend, idle clock and status, and an L{IRoutingStrategy} that picks
    one per request (the instance's own queue holds the request if it is cold);
  - L{ModelRoute} (C{route_by: model}): one endpoint for many models; each
    request goes to the target service that lists the request's model.
    C{/api/tags} and C{/v1/models} are answered from configuration, without
    starting anything, and an unknown model gets the client API's own error.

Host routing (C{hosts: [ollama.home.lan]}) sends a request with that C{Host}
straight to the service at C{/} (see L{hestia.proxy.GatewayRoot}).

This module also parses the routing keys (L{parse_routing}) into a
L{RoutingPlan} that the gateway builds routes from.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field, replace
from io import BytesIO
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, succeed
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from hestia.config import (
    BACKEND_SECTIONS,
    ROUTING_KEYS,
    SERVICE_KEYS,
    ConfigError,
    Reader,
    ServiceConfig,
    ServiceParser,
    parse_service,
)
from hestia.errors import GatewayError, ServiceUnavailable, StartFailed, StartTimedOut, write_json
from hestia.interfaces import IInterceptingRoute, IPersistentBackend, IRoute
from hestia.lifecycle import Lease, Observer, ServiceLifecycle, State, iso_time
from hestia.strategies import InstanceView, StrategyError, load_strategy

# -- configuration ---------------------------------------------------------------

# An instance answers monitors as its parent service does (passive: is the parent's);
# GPU claims (hestia.gpu) are for single-instance services; schedule and prewarm
# belong to the service (hestia.costs_config), not to one instance.
INSTANCE_KEYS = (SERVICE_KEYS - ROUTING_KEYS - {"passive", "gpu", "schedule", "prewarm"}) | BACKEND_SECTIONS | {"cost"}
MAX_COST = 1e9  # finite, so that sums and comparisons of costs stay numbers
# Paths whose request names a model, per client API.
OLLAMA_MODEL_PATHS = frozenset(
    {"/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show", "/api/pull", "/api/push",
     "/api/create", "/api/copy", "/api/delete"}
)
OPENAI_MODEL_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"})
# The Anthropic Messages API (issue 17): same /v1 prefix, its own error shape.
ANTHROPIC_MODEL_PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})


@dataclass(frozen=True)
class InstanceConfig:
    """One entry of C{instances:}: a complete service configuration of its own, and its cost."""

    service: ServiceConfig
    cost: float


@dataclass(frozen=True)
class MultiInstancePlan:
    name: str
    strategy: str
    strategy_options: Mapping[str, Any]
    instances: tuple[InstanceConfig, ...]


@dataclass(frozen=True)
class ModelRoutePlan:
    name: str
    targets: tuple[str, ...]
    # model -> target service, in the targets' order.
    models: Mapping[str, str]
    # alias -> the real model it stands for (issue 17): routed to that model's
    # service, with the body's model rewritten to the real name.
    aliases: Mapping[str, str] = field(default_factory=dict)
    # Streaming OpenAI requests held through a cold start get their headers
    # and SSE keep-alive comments at once (issue 17, hestia.proxy.Exchange).
    loading_events: bool = False


@dataclass(frozen=True)
class RoutingPlan:
    """
    Everything the routing keys of a configuration say, validated.

    @ivar hosts: C{Host} name (lower case) -> service.
    @ivar groups: L{hestia.groups.GroupConfig} by group name.
    @ivar membership: service -> its group.
    @ivar depends_on: service -> the services it needs running first.
    """

    multi: Mapping[str, MultiInstancePlan] = field(default_factory=dict)
    model_routes: Mapping[str, ModelRoutePlan] = field(default_factory=dict)
    models: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    hosts: Mapping[str, str] = field(default_factory=dict)
    groups: Mapping[str, Any] = field(default_factory=dict)
    membership: Mapping[str, str] = field(default_factory=dict)
    depends_on: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def _names(reader: Reader, value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise reader.fail(key, "expected a list of names")
    if len(set(value)) != len(value):
        raise reader.fail(key, "lists a name twice")
    return tuple(value)


def _strategy(reader: Reader, raw: Any, key: str) -> tuple[str, dict[str, Any]]:
    if isinstance(raw, str):
        name, options = raw, {}
    elif isinstance(raw, dict) and isinstance(raw.get("name"), str):
        options = {k: v for k, v in raw.items() if k != "name"}
        name = raw["name"]
    else:
        raise reader.fail(key, "expected a strategy name, or a mapping with name: and its options")
    try:
        load_strategy(name, options)  # Loaded now so that a broken plugin stops start-up.
    except StrategyError as error:
        raise reader.fail(key, str(error)) from None
    return name, options


def _instances(
    reader: Reader, parent: ServiceConfig, raw: Any, parse: ServiceParser
) -> tuple[InstanceConfig, ...]:
    key = f"services.{parent.name}.instances"
    if not isinstance(raw, list) or not raw:
        raise reader.fail(key, "expected a non-empty list of instances ({url: ..., command: ..., cost: ...})")
    instances = []
    for index, item in enumerate(raw):
        where = f"{key}[{index}]"
        section = dict(reader.mapping(item, where))
        if not section:
            raise reader.fail(where, "an instance needs at least a url")
        reader.check_keys(section, INSTANCE_KEYS, where)
        if "semaphore" in section:
            # The Semaphore backend records its machine under the service's
            # name and is resolved per service (hestia.backends.semaphore.settings); an instance
            # has neither, so it would crash at start: refuse it here.
            raise reader.fail(f"{where}.semaphore", "instances cannot use the semaphore backend: "
                              "make the machine a service of its own")
        cost = section.pop("cost", 1)
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not 0 <= cost <= MAX_COST:
            raise reader.fail(f"{where}.cost", f"expected a number from 0 to {MAX_COST:.0e}, got {cost!r}")
        try:
            # An instance is parsed like a service of its own, inheriting the
            # parent's settings (tunables, health, env, cwd) unless it sets them.
            service = parse(reader, parent.name, section, parent.tunables, {})
        except ConfigError as error:
            sub = error.key.replace(f"services.{parent.name}", where, 1)
            raise ConfigError(error.source, sub, error.message) from None
        inherited: dict[str, Any] = {"name": f"{parent.name}.{index}", "keep_warm": parent.keep_warm}
        for name in ("health", "env", "cwd", "cancel_abandoned_start"):
            if name not in section:
                inherited[name] = getattr(parent, name)
        instances.append(InstanceConfig(service=replace(service, **inherited), cost=float(cost)))
    return tuple(instances)


def _aliases(reader: Reader, raw: Any, owner: Mapping[str, str], key: str) -> dict[str, str]:
    """C{aliases: {gpt-4o-mini: qwen2.5:7b}}: each alias names a model a target lists."""
    aliases: dict[str, str] = {}
    for alias, real in reader.mapping(raw, key).items():
        if not isinstance(alias, str) or not alias or not isinstance(real, str) or not real:
            raise reader.fail(key, f"expected alias: model names, got {alias!r}: {real!r}")
        if alias in owner:
            raise reader.fail(f"{key}.{alias}", f"{alias!r} is a model {owner[alias]} lists, not an alias")
        if real not in owner:
            known = ", ".join(owner) or "none"
            raise reader.fail(f"{key}.{alias}", f"{real!r} is not a model of the targets (models: {known})")
        aliases[alias] = real
    return aliases


def parse_routing(
    source: str, services: Mapping[str, ServiceConfig], groups_raw: Any, parse: ServiceParser = parse_service,
) -> RoutingPlan:
    """
    Validate the routing keys of every service and the top-level C{groups:}.

    @raise ConfigError: naming file, service and key, like every config error.
    """
    from hestia.groups import check_dependencies, parse_groups

    reader = Reader(source)
    groups = parse_groups(reader, groups_raw)
    multi: dict[str, MultiInstancePlan] = {}
    models: dict[str, tuple[str, ...]] = {}
    hosts: dict[str, str] = {}
    membership: dict[str, str] = {}
    depends_on: dict[str, tuple[str, ...]] = {}
    routed: list[ServiceConfig] = []
    for name, service in services.items():
        raw = service.routing
        key = f"services.{name}"
        if "instances" in raw and "route_by" in raw:
            raise reader.fail(key, "give either instances or route_by, not both")
        if "instances" in raw:
            strategy, options = _strategy(reader, raw.get("strategy", "prefer-warm"), f"{key}.strategy")
            multi[name] = MultiInstancePlan(name, strategy, options, _instances(reader, service, raw["instances"],
                                                                                parse))
        elif "strategy" in raw:
            raise reader.fail(f"{key}.strategy", "only a service with instances has a strategy")
        if "route_by" in raw:
            if raw["route_by"] != "model":
                raise reader.fail(f"{key}.route_by", f"expected model, got {raw['route_by']!r}")
            for forbidden in ("models", "group", "depends_on"):
                if forbidden in raw:
                    raise reader.fail(f"{key}.{forbidden}", "not for a route_by service (set it on its targets)")
            routed.append(service)
        elif "targets" in raw:
            raise reader.fail(f"{key}.targets", "only a route_by: model service has targets")
        elif "aliases" in raw:
            raise reader.fail(f"{key}.aliases", "only a route_by: model service has aliases")
        elif "loading_events" in raw:
            raise reader.fail(f"{key}.loading_events", "only a route_by: model service has loading events")
        if "models" in raw:
            listed = _names(reader, raw["models"], f"{key}.models")
            if not listed:
                raise reader.fail(f"{key}.models", "lists no model")
            models[name] = listed
        if "hosts" in raw:
            for host in _names(reader, raw["hosts"], f"{key}.hosts"):
                host = host.lower().rstrip(".")
                if host in hosts:
                    raise reader.fail(f"{key}.hosts", f"{host} is already routed to {hosts[host]}")
                hosts[host] = name
        if "group" in raw:
            group = raw["group"]
            if not isinstance(group, str) or group not in groups:
                known = ", ".join(sorted(groups)) or "none: add a top-level groups: section"
                raise reader.fail(f"{key}.group", f"no group named {group!r} (groups: {known})")
            if service.backend in ("instances", "route"):
                raise reader.fail(f"{key}.group", "only a single-instance service can be in a group")
            if groups[group].exclusive and service.backend == "static":
                # It is always up, so it would hold the group for ever: the
                # others would wait at the gate until their start timed out.
                raise reader.fail(f"{key}.group", "an always-on service (no command, docker or semaphore) "
                                  "cannot take turns in an exclusive group: Hestia cannot stop it")
            membership[name] = group
        if "depends_on" in raw:
            needed = _names(reader, raw["depends_on"], f"{key}.depends_on")
            for other in needed:
                if other == name:
                    raise reader.fail(f"{key}.depends_on", "a service cannot depend on itself")
                if other not in services or services[other].backend == "route":
                    raise reader.fail(f"{key}.depends_on", f"no service named {other!r} to depend on")
            depends_on[name] = needed
    check_dependencies(reader, depends_on)
    model_routes = {}
    for service in routed:
        key = f"services.{service.name}"
        if "targets" in service.routing:
            targets = _names(reader, service.routing["targets"], f"{key}.targets")
            for target in targets:
                if target not in models:
                    why = "no such service" if target not in services else "it lists no models"
                    raise reader.fail(f"{key}.targets", f"{target!r} cannot be a target: {why}")
        else:
            targets = tuple(models)
            if not targets:
                raise reader.fail(f"{key}.route_by", "no service lists models: give targets models: [...]")
        owner: dict[str, str] = {}
        for target in targets:
            for model in models[target]:
                if model in owner:
                    raise reader.fail(
                        f"{key}.targets", f"model {model!r} is listed by both {owner[model]} and {target}"
                    )
                owner[model] = target
        aliases = _aliases(reader, service.routing.get("aliases"), owner, f"{key}.aliases")
        loading_events = reader.boolean(service.routing.get("loading_events", False), f"{key}.loading_events")
        model_routes[service.name] = ModelRoutePlan(service.name, targets, owner, aliases, loading_events)
    return RoutingPlan(multi, model_routes, models, hosts, groups, membership, depends_on)


# -- the route surface -----------------------------------------------------------


class Route(Protocol):
    """
    What the proxy and the API use of a service: a L{ServiceLifecycle} has it all.

    The static type of L{hestia.interfaces.IRoute}: every route class declares
    that interface (tests/test_routes.py verifies them) and has this shape (mypy).
    """

    @property
    def name(self) -> str: ...

    @property
    def config(self) -> ServiceConfig: ...

    @property
    def state(self) -> State: ...

    @property
    def backend(self) -> Any: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def state_since(self) -> float: ...

    @property
    def queue(self) -> Sized: ...

    @property
    def last_request_at(self) -> float | None: ...

    def acquire(self, request: object = None) -> Deferred[Lease]: ...

    def acquire_passive(self, request: object = None) -> Deferred[Lease] | None:
        """A monitor's lease when ready, else C{None}: nothing starts (L{hestia.passive})."""

    def start(self, reason: str = "api") -> Deferred[None]: ...

    def stop(self, reason: str = "api") -> Deferred[None]: ...

    def shutdown(self) -> Deferred[None]: ...

    def status(self) -> dict[str, Any]: ...

    def add_observer(self, observer: Observer) -> None: ...

    def lifecycles(self) -> list[ServiceLifecycle]: ...


class RouteRequest:
    """
    The facts of one request a route may route on, computed only when asked.

    @ivar rest: the path below the service (with its query), as forwarded.
    @ivar now: reactor seconds when it arrived (strategies use it, not the wall clock).
    """

    __slots__ = ("_model", "now", "request", "rest")

    def __init__(self, request: Request, rest: bytes, now: float) -> None:
        self.request = request
        self.rest = rest
        self.now = now
        self._model: str | bool | None = False

    @property
    def method(self) -> str:
        return self.request.method.decode("ascii", "replace")

    @property
    def path(self) -> str:
        return self.rest.split(b"?", 1)[0].decode("utf-8", "replace")

    @property
    def model(self) -> str | None:
        """The C{model} of a JSON body, else C{?model=}; C{None} when neither names one."""
        if self._model is False:
            self._model = _model_of(self.request, self.rest)
        return self._model  # type: ignore[return-value]


def _model_of(request: Request, rest: bytes) -> str | None:
    content = request.content
    if content is not None:
        content.seek(0)
        body = content.read()
        content.seek(0)
        if body[:1].strip() in (b"{", b"") and body.strip():
            try:
                document = json.loads(body)
            except ValueError:
                document = None
            if isinstance(document, dict) and isinstance(document.get("model"), str) and document["model"]:
                return str(document["model"])
    query = urlsplit(rest.decode("utf-8", "replace")).query
    values = parse_qs(query).get("model")
    return values[0] if values else None


class _QueueView:
    """C{len()} of several queues together: what the status and metrics read."""

    def __init__(self, queues: Callable[[], Sequence[Sized]]) -> None:
        self._queues = queues

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._queues())


class _CompositeBackend:
    """What a route with no backend of its own shows where a lifecycle shows its backend."""

    has_lifecycle = True

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.url = ""

    def recent_output(self) -> list[str]:
        return []

    def describe(self) -> dict[str, Any]:
        return {}


def aggregate_state(states: Sequence[State]) -> State:
    """One state for several: ready if any is ready, else the most hopeful."""
    for state in (State.READY, State.STARTING, State.STOPPING, State.STOPPED):
        if state in states:
            return state
    return State.FAILED if states else State.STOPPED


_RETRYABLE = (StartFailed, StartTimedOut, ServiceUnavailable)


@implementer(IRoute)
class MultiInstanceRoute:
    """
    A service with several instances, each its own L{ServiceLifecycle}.

    The strategy chooses per request; a strategy with C{retries} (failover,
    prefer-warm) is asked again, without the instance that failed, when the
    chosen one cannot start, so the request is lost only when every instance failed.
    """

    def __init__(
        self, config: ServiceConfig, plan: MultiInstancePlan, lifecycles: Sequence[ServiceLifecycle],
        strategy: Any, now: Callable[[], float],
    ) -> None:
        self.config = config
        self.plan = plan
        self.instances = list(lifecycles)
        self.strategy = strategy
        self._now = now
        self.backend = _CompositeBackend("instances")
        self.queue = _QueueView(lambda: [lifecycle.queue for lifecycle in self.instances])

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def state(self) -> State:
        return aggregate_state([lifecycle.state for lifecycle in self.instances])

    @property
    def in_flight(self) -> int:
        return sum(lifecycle.in_flight for lifecycle in self.instances)

    @property
    def state_since(self) -> float:
        return max(lifecycle.state_since for lifecycle in self.instances)

    @property
    def last_request_at(self) -> float | None:
        return max((lc.last_request_at for lc in self.instances if lc.last_request_at is not None), default=None)

    def views(self, exclude: set[int] = frozenset()) -> list[InstanceView]:  # type: ignore[assignment]
        return [
            InstanceView(
                index=index,
                name=lifecycle.name,
                url=lifecycle.backend.url,
                state=lifecycle.state.value,
                queued=len(lifecycle.queue),
                in_flight=lifecycle.in_flight,
                cost=self.plan.instances[index].cost,
                cooling_down=bool(lifecycle.cooldown_until and lifecycle.cooldown_until > self._now()),
                last_request_at=lifecycle.last_request_at,
            )
            for index, lifecycle in enumerate(self.instances)
            if index not in exclude
        ]

    def choose(self, request: object, exclude: set[int] = frozenset()) -> ServiceLifecycle:  # type: ignore[assignment]
        views = self.views(exclude)
        chosen = self.strategy.choose(views, request)
        if chosen not in views:
            raise StartFailed(f"strategy {self.plan.strategy} chose no instance of this service",
                              service=self.name, state=self.state.value)
        return self.instances[chosen.index]

    def acquire(self, request: object = None) -> Deferred[Lease]:
        return self._acquire(request, set())

    def _acquire(self, request: object, tried: set[int]) -> Deferred[Lease]:
        """
        A lease on an instance not in C{tried}, moving on when a start fails.

        With a retrying strategy the lease carries a C{fallback} that goes on
        with the instances not tried yet, for when the chosen one, although
        ready, refuses the connection (the proxy calls it).
        """
        current: list[Deferred[Lease]] = []

        def cancel(outer: Deferred[Lease]) -> None:
            if current:
                current[-1].cancel()

        outer: Deferred[Lease] = Deferred(cancel)

        def attempt() -> None:
            try:
                lifecycle = self.choose(request, tried)
            except GatewayError as error:
                outer.errback(error)
                return
            tried.add(self.instances.index(lifecycle))
            waiting = lifecycle.acquire(request)
            current.append(waiting)
            waiting.addCallbacks(leased, failed)

        def leased(lease: Lease) -> None:
            if self.strategy.retries and len(tried) < len(self.instances):
                lease.fallback = lambda: self._acquire(request, tried)
            outer.callback(lease)

        def failed(failure: Failure) -> None:
            if failure.check(CancelledError) or outer.called:
                return
            if self.strategy.retries and failure.check(*_RETRYABLE) and len(tried) < len(self.instances):
                attempt()
            else:
                outer.errback(failure)

        attempt()
        return outer

    def acquire_passive(self, request: object = None) -> Deferred[Lease] | None:
        # Any ready instance answers a monitor; the strategy is for real use.
        for lifecycle in self.instances:
            if (leased := lifecycle.acquire_passive(request)) is not None:
                return leased
        return None

    def start(self, reason: str = "api") -> Deferred[None]:
        return self.choose(None).start(reason)

    def stop(self, reason: str = "api") -> Deferred[None]:
        stops = [lifecycle.stop(reason) for lifecycle in self.instances]
        return DeferredList(stops, consumeErrors=True).addCallback(lambda _: None)

    def shutdown(self) -> Deferred[None]:
        stops = [lifecycle.shutdown() for lifecycle in self.instances]
        return DeferredList(stops, consumeErrors=True).addCallback(lambda _: None)

    def add_observer(self, observer: Observer) -> None:
        for lifecycle in self.instances:
            lifecycle.add_observer(observer)

    def lifecycles(self) -> list[ServiceLifecycle]:
        return list(self.instances)

    def status(self) -> dict[str, Any]:
        instances = []
        for index, lifecycle in enumerate(self.instances):
            instances.append({"index": index, "cost": self.plan.instances[index].cost, **lifecycle.status()})
        last = [lifecycle.last_request_at for lifecycle in self.instances if lifecycle.last_request_at]
        return {
            "name": self.name,
            "state": self.state.value,
            "backend": "instances",
            "url": None,
            "strategy": self.plan.strategy,
            "in_flight": self.in_flight,
            "queued": len(self.queue),
            "keep_warm": self.config.keep_warm,
            "idle_timeout": self.config.idle_timeout,
            "state_since": max((i["state_since"] for i in instances if i["state_since"]), default=None),
            "last_request_at": iso_time(max(last)) if last else None,
            "last_error": next((i["last_error"] for i in instances if i["last_error"]), None),
            # A reload changed how some instance runs (issue 19): each says which keys.
            "restart_pending": any(i["restart_pending"] for i in instances),
            "pending_changes": sorted({key for i in instances for key in i["pending_changes"]}),
            "instances": instances,
        }


@implementer(IRoute, IInterceptingRoute)
class ModelRoute:
    """
    C{route_by: model}: one endpoint in front of the services that serve each model.

    It holds no lifecycle: every request is handed to the target's own route,
    so the target's queue, idle clock and group rules apply unchanged.
    """

    def __init__(self, config: ServiceConfig, plan: ModelRoutePlan, lookup: Callable[[str], Route],
                 models: Mapping[str, tuple[str, ...]]) -> None:
        self.config = config
        self.plan = plan
        self._lookup = lookup
        self._models = models
        self.backend = _CompositeBackend("route")
        self.queue = _QueueView(lambda: [self._lookup(target).queue for target in self.plan.targets])

    @property
    def name(self) -> str:
        return self.config.name

    def targets(self) -> list[Route]:
        return [self._lookup(target) for target in self.plan.targets]

    @property
    def last_request_at(self) -> float | None:
        return max((t.last_request_at for t in self.targets() if t.last_request_at is not None), default=None)

    @property
    def state(self) -> State:
        return aggregate_state([target.state for target in self.targets()])

    @property
    def in_flight(self) -> int:
        return sum(target.in_flight for target in self.targets())

    @property
    def state_since(self) -> float:
        return max((target.state_since for target in self.targets()), default=0.0)

    def models(self) -> list[str]:
        """The names a client may ask for: the targets' models, then the aliases."""
        return [*self.plan.models, *self.plan.aliases]

    def owner_of(self, name: str) -> str:
        return self.plan.models[self.plan.aliases.get(name, name)]

    def target_for(self, model: str | None) -> Route | None:
        model = self.plan.aliases.get(model or "", model)
        target = self.plan.models.get(model or "")
        if target is None and model and ":" not in model:
            # Ollama's own rule: a bare name means its ":latest" tag.
            target = self.plan.models.get(f"{model}:latest")
        return None if target is None else self._lookup(target)

    def acquire(self, request: object = None) -> Deferred[Lease]:
        model = request.model if isinstance(request, RouteRequest) else None
        target = self.target_for(model)
        if target is None:
            # intercept() answers these before any acquire; this is for other callers.
            return fail(GatewayError(f"no target serves model {model!r}", service=self.name, state=self.state.value))
        return target.acquire(request)

    def acquire_passive(self, request: object = None) -> Deferred[Lease] | None:
        target = self.target_for(request.model if isinstance(request, RouteRequest) else None)
        return None if target is None else target.acquire_passive(request)

    def start(self, reason: str = "api") -> Deferred[None]:
        # Which model is wanted is not known: targets start on their first request.
        return succeed(None)

    def stop(self, reason: str = "api") -> Deferred[None]:
        stops = [target.stop(reason) for target in self.targets()]
        return DeferredList(stops, consumeErrors=True).addCallback(lambda _: None)

    def shutdown(self) -> Deferred[None]:
        return succeed(None)  # The targets are services of their own, shut down as such.

    def add_observer(self, observer: Observer) -> None:
        pass  # The targets' transitions reach observers as the targets' own.

    def lifecycles(self) -> list[ServiceLifecycle]:
        return []  # It runs nothing: its targets are services of their own.

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state.value,
            "backend": "route",
            "route_by": "model",
            "url": None,
            "in_flight": self.in_flight,
            "queued": len(self.queue),
            "keep_warm": False,
            "idle_timeout": self.config.idle_timeout,
            "state_since": None,
            "last_request_at": None,
            "last_error": None,
            "targets": [
                {"name": name, "state": self._lookup(name).state.value, "models": list(self._models.get(name, ()))}
                for name in self.plan.targets
            ],
        }

    def wants_loading_events(self, request: Request, rest: bytes) -> bool:
        """
        Whether this request is a streaming OpenAI completion whose target is
        not ready, on a route with C{loading_events}: it gets its headers now.
        """
        if not self.plan.loading_events or request.method != b"POST":
            return False
        path = rest.split(b"?", 1)[0].rstrip(b"/")
        if path not in (b"/v1/chat/completions", b"/v1/completions"):
            return False
        target = self.target_for(_model_of(request, rest))
        return target is not None and target.state is not State.READY and _streaming(request)

    # -- answering without a backend --------------------------------------------

    def intercept(self, request: Request, rest: bytes) -> bool:
        """
        Answer what needs no backend: model lists, and requests no target can serve.

        @return: C{True} when C{request} was answered here.
        """
        path = rest.split(b"?", 1)[0].rstrip(b"/").decode("utf-8", "replace") or "/"
        method = request.method
        if path == "/api/tags" and method in (b"GET", b"HEAD"):
            _write_json(request, 200, {"models": [_ollama_model(name) for name in self.models()]})
            return True
        if path == "/v1/models" and method in (b"GET", b"HEAD"):
            if request.requestHeaders.hasHeader(b"anthropic-version"):
                # Anthropic's client lists models at the same path, in its own shape.
                _write_json(request, 200, _anthropic_models(self.models()))
                return True
            _write_json(request, 200, {
                "object": "list",
                "data": [{"id": name, "object": "model", "created": 0, "owned_by": self.owner_of(name)}
                         for name in self.models()],
            })
            return True
        openai = path.startswith("/v1/")
        anthropic = path in ANTHROPIC_MODEL_PATHS
        model = _model_of(request, rest)
        if model is not None and self.target_for(model) is not None:
            if model in self.plan.aliases:
                _rewrite_model(request, self.plan.aliases[model])
            return False
        if model is None and path not in OLLAMA_MODEL_PATHS and path not in OPENAI_MODEL_PATHS | ANTHROPIC_MODEL_PATHS:
            message = f"{path} names no model: {self.name} routes by model (JSON body 'model' or ?model=)"
            status = 404
        elif model is None:
            message, status = "model is required", 400
        else:
            message = f"model '{model}' not found"
            status = 404
        if anthropic:
            kind = "not_found_error" if status == 404 else "invalid_request_error"
            _write_json(request, status, {"type": "error", "error": {"type": kind, "message": message}})
        elif openai:
            _write_json(request, status, {"error": {
                "message": message, "type": "invalid_request_error", "param": "model",
                "code": "model_not_found" if status == 404 else None,
            }})
        else:
            _write_json(request, status, {"error": message})
        return True


def _ollama_model(name: str) -> dict[str, Any]:
    return {"name": name, "model": name, "modified_at": "1970-01-01T00:00:00Z", "size": 0, "digest": "",
            "details": {}}


def _streaming(request: Request) -> bool:
    content = request.content
    if content is None:
        return False
    content.seek(0)
    try:
        document = json.loads(content.read())
    except ValueError:
        return False
    finally:
        content.seek(0)
    return isinstance(document, dict) and document.get("stream") is True


def _anthropic_models(names: Sequence[str]) -> dict[str, Any]:
    """The Anthropic Models API's list page: every model at once."""
    return {
        "data": [{"type": "model", "id": name, "display_name": name, "created_at": "1970-01-01T00:00:00Z"}
                 for name in names],
        "has_more": False,
        "first_id": names[0] if names else None,
        "last_id": names[-1] if names else None,
    }


def _rewrite_model(request: Request, model: str) -> None:
    """
    Put the real model's name in the JSON body in place of an alias.

    The body is re-serialised (same content, perhaps other spacing); the
    forwarded C{Content-Length} is recomputed from it (L{hestia.headers}).
    """
    content = request.content
    assert content is not None  # _model_of found the alias in it
    content.seek(0)
    document = json.loads(content.read())
    document["model"] = model
    request.content = BytesIO(json.dumps(document).encode("utf-8"))


def _write_json(request: Request, status: int, document: Any) -> None:
    write_json(request, status, document, hide_server=True)


def build_route(
    service: ServiceConfig, plan: RoutingPlan | None, build_lifecycle: Callable[[ServiceConfig], ServiceLifecycle],
    lookup: Callable[[str], Route], now: Callable[[], float],
) -> Route:
    """
    The composite route of an C{instances:} or C{route_by:} service.

    @param build_lifecycle: makes each instance's lifecycle (with its backend
        plugin and the gateway's state observers).
    @param lookup: finds a target's route by name when a request needs it, so
        that a target rebuilt on reload is used from then on.
    """
    if plan is not None and service.name in plan.multi:
        multi = plan.multi[service.name]
        strategy = load_strategy(multi.strategy, multi.strategy_options)
        instances = [build_lifecycle(instance.service) for instance in multi.instances]
        return MultiInstanceRoute(service, multi, instances, strategy, now)
    if plan is not None and service.name in plan.model_routes:
        return ModelRoute(service, plan.model_routes[service.name], lookup, plan.models)
    raise ValueError(f"{service.name} is not a composite service of this configuration")


def persistent_lifecycles(services: Mapping[str, Route]) -> Iterator[ServiceLifecycle]:
    """
    Every lifecycle whose backend records its state (L{IPersistentBackend}),
    the instances of a multi-instance service included (each is recorded
    under its own name, C{<service>.<index>}).
    """
    for route in list(services.values()):
        for lifecycle in route.lifecycles():
            if IPersistentBackend.providedBy(lifecycle.backend):
                yield lifecycle
