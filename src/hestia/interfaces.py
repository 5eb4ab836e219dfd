"""
The interfaces Hestia's parts meet at.

Backends (how a service is started and stopped) are plugins: Hestia itself
only drives the lifecycle state machine in L{hestia.lifecycle}, and asks an
L{IBackend} to do the work.  A third party can add a backend by registering an
L{IBackendFactory} in the C{hestia.backends} entry-point group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IAgent
from zope.interface import Attribute, Interface


class IBackend(Interface):
    """
    Starts, stops and probes one service instance.

    A backend knows nothing of queues, idle clocks or HTTP clients waiting:
    that is the lifecycle's job.  It only says when the thing it runs is up.
    """

    kind = Attribute("Short name of the backend, e.g. C{process}.  Shown in status.")
    has_lifecycle = Attribute(
        "C{False} for an always-on upstream that Hestia never starts or stops."
    )
    url = Attribute("The URL requests are forwarded to now (may change when started).")

    def start() -> Any:
        """
        Launch the service.

        @return: a L{Deferred} that fires once it has been launched (not
            necessarily ready: readiness is L{probe}'s answer), or fails with a
            L{hestia.errors.StartFailed} saying why.  Cancelling it abandons the
            launch; the lifecycle then calls L{stop}.
        """

    def probe() -> Any:
        """
        Check readiness once.

        @return: a L{Deferred} firing C{True} when the service answers its health
            check, C{False} when not yet; failing with L{StartFailed} when it
            never will (for example the process has exited).
        """

    def stop(timeout: float) -> Any:
        """
        Stop the service, forcibly after C{timeout} seconds.

        @return: a L{Deferred} that fires once it is really stopped.
        """

    def set_exit_handler(handler: Callable[[str, list[str]], None]) -> None:
        """
        Register C{handler(reason, last_lines)}, called when the service ends by
        itself (crashed, exited, container died), not when L{stop} ended it.
        """

    def describe() -> dict[str, Any]:
        """Backend-specific facts for the status API (pid, command, container...)."""

    def recent_output() -> list[str]:
        """The last lines the service wrote, newest last (may be empty)."""


class IReconfigurableBackend(IBackend):
    """
    A backend that follows in-place settings of a reload (issue 19) while it runs.
    """

    def reconfigure(service: Any) -> None:
        """
        Use C{service} (a L{hestia.config.ServiceConfig}) for what it reads while
        running, such as the health check.  How it runs (command, url, backend
        section) is the same as before: L{hestia.reload.running_settings} made it so.
        """


class IAdoptableBackend(IBackend):
    """
    A backend whose service may already run when Hestia starts (a container
    started by hand or by Compose): the gateway asks, and adopts it as ready.
    """

    def running_already() -> Any:
        """
        @return: a L{Deferred} firing C{True} when the service runs now and
            should be adopted (taken as started, then idle-stopped like the
            rest); C{False} otherwise, including when that cannot be told.
        """


class IStateStore(Interface):
    """
    The durable record of each service (L{hestia.state.StateStore}, SQLite):
    what a backend that keeps state across gateways reads and writes.
    """

    def load_services() -> Deferred[dict[str, dict[str, Any]]]:
        """Every stored service, as C{{name: {state, state_since, url, task_id, last_request_at, data}}}."""

    def save_service(name: str, state: str, state_since: float, *, url: str | None = None,
                     task_id: int | None = None, last_request_at: float | None = None,
                     data: dict[str, Any] | None = None, now: float) -> Deferred[None]:
        """Record a service's current facts; fires once they are on disk."""

    def clear_service_fields(name: str, *fields: str) -> Deferred[None]:
        """Forget C{url}, C{task_id} or C{data}."""

    def track(write: Deferred[Any]) -> Deferred[Any]:
        """Remember C{write} until it ends, so that a shutdown can wait for it; returns it."""


class IPersistentBackend(IBackend):
    """
    A backend whose service outlives the gateway (a remote VM): it records what
    it launched in the state store before acting on it, and a restarted gateway
    takes it up again (L{hestia.reconcile}).
    """

    survives_gateway = Attribute(
        "C{True}: a gateway shutdown leaves the service running (see L{detach})."
    )

    def use_store(store: IStateStore) -> None:
        """Record into (and recall from) this L{hestia.state.StateStore}."""

    def detach() -> None:
        """The gateway is going away: stop following anything, write nothing more."""

    def recorded_up() -> Deferred[bool]:
        """
        @return: a L{Deferred} firing C{True} when the store says the service
            was up and it still answers its health check at the recorded url.
        """


class IBackendFactory(Interface):
    """
    Builds the backend for services whose configuration asks for it.

    Registered under its L{name} in the C{hestia.backends} entry-point group.
    """

    name = Attribute("The backend's name: the value of C{ServiceConfig.backend}.")

    def build(service: Any, reactor: IReactorTime, agent: IAgent) -> IBackend:
        """
        Build a backend for C{service} (a L{hestia.config.ServiceConfig}).

        @param agent: the gateway's L{twisted.web.iweb.IAgent}, for health probes.
        """


class ILease(Interface):
    """
    One request's claim on a service, as the proxy holds it.

    Every kind of lease (a lifecycle's, a group member's, an instance's) has
    the same attributes: the proxy reads them all, and a missing one used to
    surface as an C{AttributeError} lost in a Deferred, with the lease never
    released (issue 12, hole 10).  Issue 15 formalises the route side.
    """

    url = Attribute("The URL the request is forwarded to.")
    config = Attribute(
        "The L{hestia.config.ServiceConfig} of the service that granted it: its per-request"
        " rules (response_timeout, response_idle_timeout) apply, whatever route led there."
    )
    fallback = Attribute(
        "C{None}, or a callable returning a L{Deferred} of another L{ILease}: for a"
        " route that may retry elsewhere when this lease's backend refuses the connection."
    )

    def release() -> None:
        """End the claim; idempotent, so every exit path may call it."""


class IRoute(Interface):
    """
    What a service name leads to in the gateway's registry (C{Gateway.services}):
    one service's L{hestia.lifecycle.ServiceLifecycle}, a multi-instance or a
    model route (L{hestia.routing}), or a member of an exclusive group
    (L{hestia.groups}).  The proxy, the API and the observers use only this.
    L{hestia.routing.Route} is its static type (a C{Protocol} mypy checks).
    """

    name = Attribute("The service's name.")
    state = Attribute("The route's L{hestia.lifecycle.State} (for a composite: the best of its parts).")
    in_flight = Attribute("Requests holding a lease now.")
    state_since = Attribute("When C{state} last changed (reactor seconds).")
    backend = Attribute("The backend serving it (for a composite: the first part's).")
    config = Attribute("Its L{hestia.config.ServiceConfig}.")
    queue = Attribute("The requests held for it (a C{Sized}; for a composite: all its parts').")
    last_request_at = Attribute("When its last request ended (reactor seconds), or C{None}.")

    def acquire(request: object = None) -> Deferred[Any]:
        """A L{Deferred} of an L{ILease}: starts the service if needed, holds the request meanwhile."""

    def acquire_passive(request: object = None) -> Deferred[Any] | None:
        """A monitor's lease when ready, else C{None}: nothing starts (L{hestia.passive})."""

    def start(reason: str = "api") -> Deferred[None]:
        """Start now (the API's C{POST /start}); fires when ready or failed."""

    def stop(reason: str = "api") -> Deferred[None]:
        """Stop now, after the requests in flight."""

    def shutdown() -> Deferred[None]:
        """The gateway is stopping: refuse new work, stop (or detach from a surviving machine)."""

    def status() -> dict[str, Any]:
        """The JSON status the API and C{hestia status} show."""

    def add_observer(observer: Callable[[Any], None]) -> None:
        """Tell C{observer} of every transition of this route's lifecycles."""

    def lifecycles() -> list[Any]:
        """The L{hestia.lifecycle.ServiceLifecycle}s this route runs (none for a model route)."""


class IInterceptingRoute(Interface):
    """
    A route that looks at a request before a lease is asked for it (a
    C{route_by: model} route): it answers some itself, and may want a
    streaming client to be given its headers at once.
    """

    def intercept(request: Any, rest: bytes) -> bool:
        """Answer C{request} here if no backend is needed (a model list, an unknown model); C{True} if it did."""

    def wants_loading_events(request: Any, rest: bytes) -> bool:
        """Whether C{request} is a streaming completion that should get loading events while its target starts."""


class IServiceObserver(Interface):
    """Something told of every lifecycle transition (logs, metrics, state store)."""

    def state_changed(event: Any) -> None:
        """Called with a L{hestia.lifecycle.StateChange}."""


class IHeadCheck(Interface):
    """
    A resource that can refuse a request from its head alone (hestia.guard).

    The channel asks it when a body follows, before C{100 Continue} and before
    reading the body, so that an unauthorised client cannot make Hestia read
    or spool gigabytes.  The resource's C{render} must come to the same answer
    (the authenticator keeps the decision on the request, so a wrong token
    counts once).
    """

    def check_head(request: Any) -> Any:
        """
        @param request: the L{twisted.web.server.Request} whose method, target,
            headers and traversal (C{prepath}/C{postpath}) are set, but not its body.
        @return: a L{hestia.auth.Denied} (status, reason, retry_after) or C{None}.
        """


class IRequestExchange(Interface):
    """
    One proxied request on its way (L{hestia.proxy.Exchange}): what the
    gateway counts while it is in flight and hands, as its record, to the
    request observers (access log, metrics, costs, the event stream).
    """

    record = Attribute("the request's L{hestia.records.RequestRecord}, complete once it has ended")
