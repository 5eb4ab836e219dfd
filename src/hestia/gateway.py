"""
The gateway: every service's lifecycle, the shared HTTP client, reloads.

One L{Gateway} per running Hestia.  It owns the connection pool the proxy and
the health probes share, builds a lifecycle (with its backend plugin) for each
configured service, and swaps configurations on reload without dropping the
services that did not change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import IAgent

from hestia.backends import find_backend
from hestia.config import Config, ServiceConfig
from hestia.errors import UnknownService
from hestia.health import BackendEndpointFactory
from hestia.interfaces import IBackend
from hestia.lifecycle import Observer, ServiceLifecycle, State

if TYPE_CHECKING:
    from hestia.proxy import Exchange, ServiceProxyResource

log = Logger(namespace="hestia.gateway")

RequestObserver = Callable[["Exchange"], None]


class _ClientProtocol(HTTP11ClientProtocol):
    """
    Keeps a response's connection headers, which Twisted's parser sets apart.

    The proxy must drop the headers a backend's C{Connection} names, but
    C{response.headers} never shows C{Connection}: it is set on the response as
    C{connection_headers} (a L{Headers}) instead.
    """

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


def make_agent(reactor: Any, connect_timeout: float = 5.0) -> tuple[IAgent, HTTPConnectionPool]:
    """
    An HTTP/1.1 client with keep-alive to the backends.

    The pool's default of two idle connections per backend would make every
    burst above two open fresh connections; keep enough for real concurrency.
    """
    pool = QuietConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 128
    pool.cachedConnectionTimeout = 120
    pool.retryAutomatically = True
    return Agent.usingEndpointFactory(reactor, BackendEndpointFactory(reactor, connect_timeout), pool=pool), pool


class Gateway:
    """
    The services Hestia manages and the client it reaches them with.

    @ivar request_observers: called with each finished L{Exchange} (access
        log, metrics).
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        agent: IAgent | None = None,
        pool: HTTPConnectionPool | None = None,
        cooperator: Any = None,
        build_backend: Callable[[ServiceConfig], IBackend] | None = None,
    ) -> None:
        """
        @param build_backend: makes each service's backend; by default the
            backend plugin named by the service's configuration.  Tests pass
            one that returns L{hestia.testing.FakeBackend}s.
        """
        self.config = config
        self.reactor = reactor
        if agent is None:
            agent, pool = make_agent(reactor)
        self.agent = agent
        self.pool = pool
        self.cooperator = cooperator or task.Cooperator(scheduler=lambda work: reactor.callLater(0, work))
        self._build_backend = build_backend or (
            lambda service: find_backend(service.backend).build(service, reactor, self.agent)
        )
        self.services: dict[str, ServiceLifecycle] = {}
        self.state_observers: list[Observer] = []
        self.request_observers: list[RequestObserver] = []
        self._proxies: dict[str, ServiceProxyResource] = {}
        self._in_flight_requests = 0
        self._drained: list[Deferred[None]] = []
        for service in config.services.values():
            self._add(service)

    # -- services ----------------------------------------------------------------

    def lifecycle(self, name: str) -> ServiceLifecycle:
        try:
            return self.services[name]
        except KeyError:
            raise UnknownService("no such service", service=name) from None

    def proxy_resource(self, name: str) -> ServiceProxyResource:
        from hestia.proxy import ServiceProxyResource

        if name not in self._proxies:
            self.lifecycle(name)
            self._proxies[name] = ServiceProxyResource(self, name)
        return self._proxies[name]

    def add_state_observer(self, observer: Observer) -> None:
        """Tell C{observer} of every transition of every service, present and future."""
        self.state_observers.append(observer)
        for lifecycle in self.services.values():
            lifecycle.add_observer(observer)

    def _build(self, service: ServiceConfig) -> ServiceLifecycle:
        return ServiceLifecycle(service, self._build_backend(service), self.reactor, list(self.state_observers))

    def _add(self, service: ServiceConfig) -> ServiceLifecycle:
        lifecycle = self._build(service)
        self.services[service.name] = lifecycle
        return lifecycle

    def start_keep_warm(self) -> None:
        """Start every C{keep_warm} service now: they are wanted before any request."""
        for lifecycle in self.services.values():
            if lifecycle.config.keep_warm and lifecycle.state is State.STOPPED:
                lifecycle.start("keep_warm").addErrback(lambda failure: None)

    # -- reloading -------------------------------------------------------------------

    def apply(self, config: Config) -> dict[str, list[str]]:
        """
        Switch to C{config}, touching only the services that changed.

        A changed service is stopped (its in-flight requests are cut) and built
        anew; it starts again on its next request.  A removed one is stopped.

        @return: the names added, removed, changed and kept, for the log.
        """
        summary: dict[str, list[str]] = {"added": [], "removed": [], "changed": [], "unchanged": []}
        for name in list(self.services):
            if name not in config.services:
                self.services.pop(name).stop("reload")
                self._proxies.pop(name, None)
                summary["removed"].append(name)
        for name, service in config.services.items():
            current = self.services.get(name)
            if current is None:
                self._add(service)
                summary["added"].append(name)
            elif current.config != service:
                current.stop("reload")
                self._add(service)
                self._proxies.pop(name, None)
                summary["changed"].append(name)
            else:
                summary["unchanged"].append(name)
        self.config = config
        self.start_keep_warm()
        return summary

    # -- requests ----------------------------------------------------------------------

    def request_began(self, exchange: Exchange) -> None:
        self._in_flight_requests += 1

    def request_ended(self, exchange: Exchange) -> None:
        self._in_flight_requests -= 1
        for observer in self.request_observers:
            try:
                observer(exchange)
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
        stops = [lifecycle.shutdown() for lifecycle in self.services.values()]
        done = DeferredList(stops, consumeErrors=True)
        if self.pool is not None:
            pool = self.pool
            done.addBoth(lambda result: pool.closeCachedConnections())
        return done
