"""
The C{static} backend: an upstream that is always on.

Hestia proxies to it but never starts or stops it, like a plain reverse proxy
entry; it still gets the gateway's request ids, logs, metrics and errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IAgent
from zope.interface import implementer, provider

from hestia import health
from hestia.config import ServiceConfig
from hestia.interfaces import IBackend, IBackendFactory, IReconfigurableBackend


@implementer(IBackend, IReconfigurableBackend)
class StaticBackend:
    kind = "static"
    has_lifecycle = False

    def __init__(self, service: ServiceConfig, reactor: IReactorTime, agent: IAgent) -> None:
        self.service = service
        self.url = service.url
        self._reactor = reactor
        self._agent = agent

    def start(self) -> Deferred[None]:
        return succeed(None)

    def probe(self) -> Deferred[bool]:
        return health.probe(self._agent, self._reactor, self.url, self.service.health)

    def stop(self, timeout: float) -> Deferred[None]:
        return succeed(None)

    def set_exit_handler(self, handler: Callable[[str, list[str]], None]) -> None:
        """A static upstream never exits as far as Hestia knows."""

    def reconfigure(self, service: ServiceConfig) -> None:
        # IReconfigurableBackend: a reload's in-place settings (the health check).
        self.service = service

    def describe(self) -> dict[str, Any]:
        return {}

    def recent_output(self) -> list[str]:
        return []


@provider(IBackendFactory)
class StaticBackendFactory:
    name = "static"

    @staticmethod
    def build(service: ServiceConfig, reactor: IReactorTime, agent: IAgent) -> IBackend:
        return StaticBackend(service, reactor, agent)
