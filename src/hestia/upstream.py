"""
The client side: how Hestia reaches its backends.

One L{Upstream} per gateway owns what every request to a backend shares: the
HTTP/1.1 client (an L{Agent} over one keep-alive L{HTTPConnectionPool}), the
endpoints it connects with (short connect timeouts that follow each backend's
recent connect times, L{AttemptEndpointFactory}), the dedicated connections of
upgrade requests (WebSockets, L{Upstream.upgrade_endpoint}) and the admission
window of each backend URL (L{hestia.admission.Admission}: how many requests it
is sent at once).  The gateway keeps the registry of routes; the proxy asks
this module how to reach the backend a lease names.

It uses two private Twisted names, listed with their reasons in
docs/architecture.md: the client protocol and the pool's factory.
"""

from __future__ import annotations

from collections import deque
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from hestia.admission import CONNECT_RETRY, Admission, ConnectRetry
from hestia.config import ServerConfig
from hestia.guard import set_no_delay
from hestia.health import endpoint_for
from hestia.lifecycle import ServiceLifecycle, State, StateChange
from hestia.routing import Route

# An upgrade's own connection: the backend has been answering (it is ready).
UPGRADE_CONNECT_TIMEOUT = 10.0


class _ClientProtocol(HTTP11ClientProtocol):
    """
    Keeps a response's connection headers, which Twisted's parser sets apart.

    The proxy must drop the headers a backend's C{Connection} names, but
    C{response.headers} never shows C{Connection}: it is set on the response as
    C{connection_headers} (a L{Headers}) instead.
    """

    def connectionMade(self) -> None:
        super().connectionMade()
        # A request's head and its body may go out in separate writes: with
        # Nagle's algorithm the second would wait for the first's ACK.
        set_no_delay(self.transport)

    def request(self, request: Any) -> Deferred[Any]:
        finished: Deferred[Any] = super().request(request)
        parser = self._parser
        if parser is not None:

            def remember(response: Any) -> Any:
                response.connection_headers = parser.connHeaders
                return response

            finished.addCallback(remember)
        return finished


class _QuietClientFactory(_HTTP11ClientFactory):
    # One "Starting factory" line per backend connection would drown the log.
    noisy = False

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _ClientProtocol(self._quiescentCallback)


class QuietConnectionPool(HTTPConnectionPool):
    _factory = _QuietClientFactory


def make_agent(
    reactor: IReactorTime, max_connections: int, connect_timeout: float = 5.0
) -> tuple[IAgent, HTTPConnectionPool]:
    """
    An HTTP/1.1 client with keep-alive to the backends.

    The pool's default of two idle connections per backend would make every
    burst above two open fresh connections: it keeps as many as may be in use
    at once (C{server.max_backend_connections}), so none is thrown away.
    """
    pool = QuietConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_connections
    pool.cachedConnectionTimeout = 120
    pool.retryAutomatically = True
    return Agent.usingEndpointFactory(reactor, BackendEndpointFactory(reactor, connect_timeout), pool=pool), pool



@implementer(IAgentEndpointFactory)
class BackendEndpointFactory:
    """The endpoints the gateway's L{Agent} connects to backends with (see L{endpoint_for})."""

    def __init__(self, reactor: IReactorTime, connect_timeout: float, tls: IPolicyForHTTPS | None = None) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = tls or BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        endpoint = endpoint_for(self._reactor, uri.host.decode("ascii"), uri.port, self._timeout)
        if uri.scheme == b"https":
            return wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint



class ConnectTimes:
    """The most recent connect durations per backend address (host, port)."""

    SAMPLES = 32

    def __init__(self) -> None:
        self._seen: dict[tuple[str, int], deque[float]] = {}

    def record(self, address: tuple[str, int], seconds: float) -> None:
        seen = self._seen.get(address)
        if seen is None:
            seen = self._seen[address] = deque(maxlen=self.SAMPLES)
        seen.append(seconds)

    def slowest(self, address: tuple[str, int]) -> float | None:
        seen = self._seen.get(address)
        return max(seen) if seen else None


@implementer(IStreamClientEndpoint)
class _TimedEndpoint:
    """An endpoint that records how long its successful connects took."""

    def __init__(self, endpoint: IStreamClientEndpoint, reactor: IReactorTime, times: ConnectTimes,
                 address: tuple[str, int]) -> None:
        self._endpoint = endpoint
        self._reactor = reactor
        self._times = times
        self._address = address

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        began = self._reactor.seconds()

        def connected(protocol: IProtocol) -> IProtocol:
            self._times.record(self._address, self._reactor.seconds() - began)
            return protocol

        connecting: Deferred[IProtocol] = self._endpoint.connect(protocolFactory)
        return connecting.addCallback(connected)


@implementer(IAgentEndpointFactory)
class AttemptEndpointFactory:
    """
    The endpoints of connect attempt C{attempt}: their timeout follows
    L{ConnectRetry.timeout} and the backend's recent connect times.
    """

    def __init__(self, reactor: IReactorTime, attempt: int, times: ConnectTimes, rule: ConnectRetry | None = None,
                 tls: IPolicyForHTTPS | None = None) -> None:
        self._reactor = reactor
        self._attempt = attempt
        self._times = times
        self._rule = rule or CONNECT_RETRY
        self._tls = tls or BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        address = (host, uri.port)
        timeout = self._rule.timeout(self._attempt, self._times.slowest(address))
        endpoint: IStreamClientEndpoint = _TimedEndpoint(
            endpoint_for(self._reactor, host, uri.port, timeout), self._reactor, self._times, address
        )
        if uri.scheme == b"https":
            return wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


def backend_endpoint(reactor: IReactorTime, base_url: str) -> IStreamClientEndpoint:
    """The endpoint of a dedicated connection to the backend at C{base_url} (TLS for https)."""
    parts = urlsplit(base_url)
    host = parts.hostname or "localhost"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host, port, timeout=UPGRADE_CONNECT_TIMEOUT)
    if parts.scheme == "https":
        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
    return endpoint


class Upstream:
    """
    How the gateway reaches its backends: one client, one pool, a window per backend.

    @ivar agent: the client the health probes and backends use, and the proxy
        when the agent was injected (tests).
    @ivar pool: its connection pool (C{None} for an injected agent).
    """

    def __init__(self, reactor: IReactorTime, server: ServerConfig, agent: IAgent | None = None,
                 pool: HTTPConnectionPool | None = None) -> None:
        self.reactor = reactor
        self._server = server
        self._own_agent = agent is None
        if agent is None:
            agent, pool = make_agent(reactor, server.max_backend_connections)
        self.agent: IAgent = agent
        self.pool = pool
        # Backend URL -> its admission window (hestia.admission).
        self._admissions: dict[str, Admission] = {}
        self._connect_agents: dict[int, IAgent] = {}
        self._connect_times = ConnectTimes()

    def configure(self, server: ServerConfig) -> None:
        """A reload's server settings: windows made from now on take its cap."""
        self._server = server

    # -- admission (issue 13, hestia.admission) ----------------------------------

    def admission(self, url: str, route: Route) -> Admission:
        """
        The admission window to the backend at C{url}.

        At most C{max_concurrency} (and C{server.max_backend_connections})
        requests are in progress with one backend at a time; the rest wait in
        order inside L{Admission} (they already hold their lease, so the
        service stays up for them).

        @param route: whose settings a window made here takes (the lifecycle
            that owns C{url} registers its own first, see L{watch}).
        """
        admission = self._admissions.get(url)
        if admission is None:
            admission = self._admissions[url] = self._new_admission(route)
        return admission

    def _new_admission(self, route: Route) -> Admission:
        config = route.config
        return Admission(
            self.reactor,
            config.max_concurrency,
            config.queue_limit,
            lambda: {"service": route.name, "state": route.state.value},
            cap=self._server.max_backend_connections,
        )

    def watch(self, lifecycle: ServiceLifecycle) -> None:
        """Give C{lifecycle} its backend's window, and slow start again each time it becomes ready."""
        url = lifecycle.backend.url
        admission = self._admissions.get(url)
        if admission is None:
            admission = self._admissions[url] = self._new_admission(lifecycle)
        else:  # a rebuilt service (reload): its new limits
            admission.configure(lifecycle.config.max_concurrency, lifecycle.config.queue_limit)
        lifecycle.admission = admission

        def restarted(change: StateChange) -> None:
            if change.new is State.READY:
                # The URL of a backend may be known only once it runs.
                current = self.admission(lifecycle.backend.url, lifecycle)
                current.configure(lifecycle.config.max_concurrency, lifecycle.config.queue_limit)
                lifecycle.admission = current
                current.restart()

        lifecycle.add_observer(restarted)

    # -- connecting -----------------------------------------------------------------

    def agent_for_attempt(self, attempt: int) -> IAgent:
        """
        The client for connect attempt C{attempt} of one request.

        The gateway's own client comes in several connect timeouts over one
        connection pool (L{ConnectRetry.timeout}, from the backend's recent
        connect times): a first connect gives up on a dropped SYN after a few
        round trips rather than waiting out the kernel's 1 s retransmission.
        An injected client (tests) is used as is.
        """
        if not self._own_agent:
            return self.agent
        attempt = min(attempt, 12)  # the timeout stops growing well before
        agent = self._connect_agents.get(attempt)
        if agent is None:
            agent = self._connect_agents[attempt] = Agent.usingEndpointFactory(
                self.reactor, AttemptEndpointFactory(self.reactor, attempt, self._connect_times), pool=self.pool
            )
        return agent

    def upgrade_endpoint(self, url: str) -> IStreamClientEndpoint:
        """Where an upgrade request (a WebSocket) to the backend at C{url} gets its own connection."""
        return backend_endpoint(self.reactor, url)

    def close(self) -> Deferred[None]:
        """Close the pool's idle connections (the gateway's last step)."""
        if self.pool is None:
            return succeed(None)
        closed: Deferred[None] = self.pool.closeCachedConnections()
        return closed
