"""
The gateway in memory, driven through its HTTP face (re-exported by L{hestia.testing}).

L{MemoryGateway} builds a L{Gateway} from a config mapping over a
L{MemoryReactorClock}: each service's backend is a L{FakeBackend} the test
steps through its start, the backends' HTTP answers come from one
L{Resource} reached through treq's L{RequestTraversalAgent} (optionally
behind an upstream double of L{hestia.testing.upstream}), and the client is a
L{StubTreq} over the proxy's L{GatewayRoot} and the management API.  Nothing
touches a socket or the wall clock: L{MemoryGateway.settle} turns the
in-memory pumps until nothing moves.

Example::

    memory = MemoryGateway({"svc": {"url": "http://backend:1", "command": ["serve"]}})
    answer = memory.get("/services/svc/hello")
    memory.start("svc")                     # finish the fake start, answer its probe
    response = memory.result(answer)
    assert response.code == 200 and memory.json(response)["uri"] == "/hello"
    assert memory.status("svc")["state"] == "ready"

For raw client bytes through the whole site (authentication, request hygiene,
HTTP/2, upgrades) use L{hestia.testing.MemoryHestia}, which is built on this.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent, IResponse
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from hestia.api import ManagementAPI
from hestia.auth import digest
from hestia.config import Config, ServiceConfig
from hestia.gateway import Gateway
from hestia.interfaces import IBackend
from hestia.loader import parse_config
from hestia.metrics import HestiaMetrics
from hestia.proxy import GatewayRoot
from hestia.records import RequestRecord
from hestia.testing.backends import FakeBackend

# The tokens MemoryGateway(auth=True) configures: one for /v1, one for the echo service only.
ADMIN_TOKEN = "admin-token-0123456789"  # noqa: S105 (a test double's known token)
ECHO_TOKEN = "echo-token-0123456789"  # noqa: S105

ORIGIN = "http://gw:8080"
"""Where the client's requests go (the host the proxy sees)."""

DEFAULT_SERVICES: Mapping[str, Any] = {"echo": {"url": "http://backend:8000"}, "other": {"url": "http://backend:8001"}}


class GatewayFactory(Protocol):
    """Builds the gateway under test: L{Gateway} itself, or a subclass that records more."""

    def __call__(self, config: Config, reactor: IReactorTime, *, agent: IAgent,
                 build_backend: Callable[[ServiceConfig], IBackend]) -> Gateway: ...


class RecordingBackend(Resource):
    """
    Answers every request, recording it.  The status comes from the path's
    C{status=NNN} query parameter (default 200); C{notype} answers without a
    C{Content-Type}.  Every response carries C{X-From-Backend}, so a client
    can tell the backend's statuses from the gateway's own.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Request] = []
        self.bodies: list[bytes] = []

    def render(self, request: Request) -> bytes:
        self.seen.append(request)
        self.bodies.append(request.content.read() if request.content is not None else b"")
        wanted = (request.args.get(b"status") or [b"200"])[0]
        status = int(wanted) if wanted.isdigit() and 200 <= int(wanted) <= 599 else 200
        request.setResponseCode(status)
        request.setHeader(b"x-from-backend", b"1")
        body = json.dumps({"uri": request.uri.decode("latin-1"), "body": self.bodies[-1].decode("latin-1")})
        if b"notype" in request.args:
            request.defaultContentType = None
        else:
            request.setHeader(b"content-type", b"application/json")
        return body.encode()


def auth_section() -> dict[str, Any]:
    """The C{auth:} section of C{auth=True}: C{ADMIN_TOKEN} with the admin scope, C{ECHO_TOKEN} for C{echo} only."""
    return {"tokens": [
        {"name": "admin", "token_sha256": digest(ADMIN_TOKEN).hex(), "scopes": ["admin"]},
        {"name": "echo", "token_sha256": digest(ECHO_TOKEN).hex(), "services": ["echo"]},
    ]}


class MemoryGateway:
    """
    A gateway of a config mapping, in memory, with a client in front.

    @ivar reactor: the L{MemoryReactorClock} everything runs on.
    @ivar config: the parsed configuration.
    @ivar backend: the L{Resource} answering every proxied request
        (a L{RecordingBackend} unless another is given).
    @ivar fakes: each service's L{FakeBackend}, by service name; an
        C{instances:} service's instances are C{<name>.0}, C{<name>.1}, ...
    @ivar traversal: the in-memory agent in front of C{backend}.
    @ivar agent: the agent the gateway sends with: C{traversal}, or what the
        C{agent} wrapper made of it.
    @ivar gateway: the L{Gateway}.
    @ivar client: a L{StubTreq} over the proxy's L{GatewayRoot} and the management API.
    @ivar records: every finished request's L{RequestRecord}, in order.
    @ivar metrics: the L{HestiaMetrics} fed by the gateway (C{metrics=True}), served at C{/v1/metrics}.
    """

    def __init__(
        self,
        services: Mapping[str, Any] | None = None,
        *,
        groups: Mapping[str, Any] | None = None,
        server: Mapping[str, Any] | None = None,
        auth: bool | Mapping[str, Any] = False,
        backend: IResource | None = None,
        agent: Callable[[IAgent], IAgent] | None = None,
        metrics: bool = False,
        gateway_factory: GatewayFactory = Gateway,
    ) -> None:
        """
        @param services: the C{services:} section (default: two static
            services, C{echo} and C{other}).
        @param groups: the C{groups:} section.
        @param server: the C{server:} section.
        @param auth: an C{auth:} section, or C{True} for L{auth_section}'s tokens.
        @param backend: what answers the proxied requests.
        @param agent: wraps the in-memory agent, e.g.
            C{agent=lambda inner: StallingAgent(inner, times=1)}.
        @param metrics: feed a L{HestiaMetrics} (see L{metric}).
        @param gateway_factory: builds the gateway (L{Gateway} by default).
        """
        self.reactor = MemoryReactorClock()
        raw: dict[str, Any] = {"services": dict(services if services is not None else DEFAULT_SERVICES)}
        if groups:
            raw["groups"] = dict(groups)
        if server:
            raw["server"] = dict(server)
        if auth:
            raw["auth"] = auth_section() if auth is True else dict(auth)
        self.config = parse_config(raw, "test.yml", environ={})
        self.backend: IResource = backend if backend is not None else RecordingBackend()
        self.fakes: dict[str, FakeBackend] = {}
        self.traversal = RequestTraversalAgent(self.backend)
        self.agent: IAgent = agent(self.traversal) if agent is not None else self.traversal
        self.gateway = gateway_factory(self.config, self.reactor, agent=self.agent, build_backend=self._build)
        self.records: list[RequestRecord] = []
        self.gateway.request_observers.append(self.records.append)
        self.metrics: HestiaMetrics | None = None
        if metrics:
            self.metrics = HestiaMetrics(self.gateway)
            self.gateway.add_state_observer(self.metrics.state_changed)
            self.gateway.request_observers.append(self.metrics.request_finished)
        # A reload applies the same configuration again, as SIGHUP with an unchanged file does.
        self.api = ManagementAPI(self.gateway, reload=lambda: self.gateway.apply(self.config), metrics=self.metrics)
        # Any: StubTreq makes its request/get/content/... attributes at run time.
        self.client: Any = StubTreq(GatewayRoot(self.gateway, self.api.resource()))

    def _build(self, service: ServiceConfig) -> FakeBackend:
        fake = FakeBackend(url=service.url, has_lifecycle=service.backend != "static")
        self.fakes[service.name] = fake
        return fake

    # -- the client ------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> Deferred[IResponse]:
        """Send C{method} C{path} (from C{/}) with StubTreq's C{kwargs}; the answer once L{settle}d."""
        answer: Deferred[IResponse] = self.client.request(method, ORIGIN + path, **kwargs)
        return answer

    def get(self, path: str, **kwargs: Any) -> Deferred[IResponse]:
        return self.request("GET", path, **kwargs)

    def _outcome(self, deferred: Deferred[Any]) -> Any:
        """What C{deferred} fired with (a L{Failure} if it failed), once everything settled."""
        self.settle()
        results: list[Any] = []
        deferred.addBoth(results.append)
        self.settle()
        assert results, "no result yet"
        return results[0]

    def result(self, deferred: Deferred[Any]) -> Any:
        """What C{deferred} fired with once everything settled; raises the failure if it failed."""
        outcome = self._outcome(deferred)
        if isinstance(outcome, Failure):
            outcome.raiseException()
        return outcome

    def failure(self, deferred: Deferred[Any]) -> Failure:
        """The L{Failure} C{deferred} ended with once everything settled (an assertion error if it succeeded)."""
        outcome = self._outcome(deferred)
        assert isinstance(outcome, Failure), f"succeeded with {outcome!r}"
        return outcome

    def json(self, response: IResponse) -> Any:
        """The body of C{response}, as JSON."""
        return json.loads(self.result(self.client.content(response)))

    def status(self, name: str) -> dict[str, Any]:
        """C{GET /v1/services/<name>/status}."""
        document: dict[str, Any] = self.json(self.result(self.get(f"/v1/services/{name}/status")))
        return document

    # -- time and the fakes ------------------------------------------------------------

    def settle(self, rounds: int = 20) -> None:
        """Turn the in-memory pumps (and due timers of zero delay) C{rounds} times: until nothing moves."""
        for _ in range(rounds):
            self.reactor.advance(0)
            self.traversal.flush()
            self.client.flush()

    def advance(self, seconds: float, step: float = 1.0) -> None:
        """Let C{seconds} pass, settling after each C{step} as a reactor would between timers."""
        # Steps are measured to the end time, not subtracted: 300 steps of 0.1 s add up to 30 s exactly.
        end = self.reactor.seconds() + seconds
        while (left := end - self.reactor.seconds()) > 0:
            self.reactor.advance(min(step, left))
            self.settle()

    def start(self, name: str) -> None:
        """
        Finish the pending start of service C{name}'s fake and answer its probe ready.

        The first probe may be scheduled a moment after the start (a
        backend's probe interval): reactor time moves on, in 10 ms steps,
        only until it is sent.
        """
        fake = self.fakes[name]
        self.settle()
        probes = len(fake.probes)
        fake.finish_start()
        self.settle()
        for _ in range(1000):
            if len(fake.probes) > probes:
                break
            self.reactor.advance(0.01)
            self.settle()
        fake.answer_probe(True)
        self.settle()

    def metric(self, name: str, **labels: str) -> float:
        """A sample of C{metrics=True}'s registry (0 when it has none yet)."""
        assert self.metrics is not None, "MemoryGateway(metrics=True) keeps metrics"
        value = self.metrics.registry.get_sample_value(name, labels)
        return float(value or 0.0)
