"""
A whole Hestia request path in memory: raw client bytes in, raw bytes out.

For tests of Hestia and of what plugs into it (a routing strategy, a backend
plugin): the same site C{twistd hestia} serves, with no socket and no clock.

L{MemoryHestia} builds the site as C{twistd hestia} does (L{hestia.server_tap.build_site}:
guarded channel, authentication, proxy and API) around a L{MemoryGateway}
(its config, reactor, fake backends and backend resource).
Clients are L{StringTransport}s fed bytes by the test; the backend is a
L{Resource} reached through treq's in-memory agent, and an upgrade's dedicated
backend connection is a L{MemoryUpgradeBackend} whose answer the test writes.
Nothing touches a socket or waits on the wall clock: L{MemoryHestia.settle}
turns the in-memory pumps until nothing moves.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent
from zope.interface import implementer

from hestia.auth import Authenticator, parse_auth
from hestia.config import Config, ServerConfig, ServiceConfig
from hestia.gateway import Gateway
from hestia.interfaces import IBackend, IRequestExchange
from hestia.proxy import Exchange
from hestia.server_tap import build_site
from hestia.testing.gateway import ADMIN_TOKEN, ECHO_TOKEN, MemoryGateway, RecordingBackend
from hestia.upstream import Upstream

__all__ = ["ADMIN_TOKEN", "ECHO_TOKEN", "MemoryClient", "MemoryHestia", "MemoryUpgradeBackend", "MemoryUpstream",
           "RecordingBackend", "RecordingGateway", "UpgradeConnection", "body_of", "statuses"]


@dataclass
class UpgradeConnection:
    """One dedicated backend connection that an upgrade request opened."""

    protocol: IProtocol
    transport: StringTransport

    def sent(self) -> bytes:
        return bytes(self.transport.value())

    def answer(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def close(self) -> None:
        self.transport.disconnecting = True
        self.protocol.connectionLost(Failure(ConnectionDone()))


@implementer(IStreamClientEndpoint)
@dataclass
class MemoryUpgradeBackend:
    """The endpoint upgrade requests connect to: every connection is kept for the test."""

    connections: list[UpgradeConnection] = field(default_factory=list)

    def endpoint(self, url: str) -> MemoryUpgradeBackend:
        return self

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9))
        assert protocol is not None
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 9))
        protocol.makeConnection(transport)
        self.connections.append(UpgradeConnection(protocol, transport))
        return succeed(protocol)


class MemoryUpstream(Upstream):
    """An upstream over an in-memory agent whose upgrade connections go to a L{MemoryUpgradeBackend}."""

    def __init__(self, reactor: IReactorTime, server: ServerConfig, agent: IAgent,
                 upgrades: MemoryUpgradeBackend) -> None:
        super().__init__(reactor, server, agent)
        self.upgrades = upgrades

    def upgrade_endpoint(self, url: str) -> IStreamClientEndpoint:
        return self.upgrades.endpoint(url)


class RecordingGateway(Gateway):
    """A gateway that keeps every proxied request's L{Exchange}, by the request id it forwards."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.exchanges: dict[bytes, Exchange] = {}

    def request_began(self, exchange: IRequestExchange) -> None:
        if isinstance(exchange, Exchange):  # the proxy's own, which is what the tests look into
            self.exchanges[exchange.request_id] = exchange
        super().request_began(exchange)


class NegotiatedTransport(StringTransport):
    """
    A client transport that reports an ALPN result, as a TLS transport does:
    for C{b"h2"} Twisted's channel speaks HTTP/2.
    """

    def __init__(self, negotiated: bytes | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.negotiatedProtocol = negotiated


class MemoryClient:
    """One client connection to the in-memory site."""

    def __init__(self, hestia: MemoryHestia, negotiated: bytes | None = None) -> None:
        self.hestia = hestia
        self.transport = NegotiatedTransport(negotiated, peerAddress=IPv4Address("TCP", "10.0.0.7", 40000))
        self.protocol: Protocol = hestia.site.buildProtocol(self.transport.getPeer())
        self.protocol.makeConnection(self.transport)
        self.lost = False
        hestia.clients.append(self)

    def deliver_close(self) -> None:
        """A real transport tells its protocol once a connection it was asked to close is gone."""
        if self.transport.disconnecting and not self.lost:
            self.lost = True
            owner = getattr(self.transport, "protocol", None) or self.protocol
            owner.connectionLost(Failure(ConnectionDone()))

    def send(self, data: bytes) -> MemoryClient:
        if not self.transport.disconnecting:
            self.protocol.dataReceived(data)
        self.hestia.settle()
        return self

    def received(self) -> bytes:
        return bytes(self.transport.value())

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    @property
    def taken_over(self) -> bool:
        """Whether the connection left Twisted's HTTP channel (an upgrade tunnel owns it)."""
        owner = getattr(self.transport, "protocol", None)
        return owner is not None and owner is not self.protocol


class MemoryHestia:
    """
    The gateway of a config mapping, built as the daemon builds it, in memory.

    Services named in C{services} are static (always ready); C{auth=True}
    configures an admin token and a token for C{echo} only.
    """

    def __init__(self, services: dict[str, Any] | None = None, auth: bool = False,
                 server: dict[str, Any] | None = None) -> None:
        self.upgrades = MemoryUpgradeBackend()
        self.clients: list[MemoryClient] = []
        upgrades = self.upgrades

        def recording_gateway(config: Config, reactor: IReactorTime, *, agent: IAgent,
                              build_backend: Callable[[ServiceConfig], IBackend]) -> Gateway:
            upstream = MemoryUpstream(reactor, config.server, agent, upgrades)
            return RecordingGateway(config, reactor, build_backend=build_backend, upstream=upstream)

        self.memory = MemoryGateway(services, server=server, auth=auth, gateway_factory=recording_gateway)
        self.reactor = self.memory.reactor
        self.backend: RecordingBackend = cast(RecordingBackend, self.memory.backend)
        self.fakes = self.memory.fakes
        self.agent = self.memory.traversal
        self.gateway = cast(RecordingGateway, self.memory.gateway)
        config = self.memory.config
        self.authenticator = Authenticator(parse_auth(config, environ={}), self.reactor.seconds)
        self.site = build_site(self.gateway, self.memory.api.resource(), self.authenticator, config.server,
                               reactor=self.reactor)

    def connect(self) -> MemoryClient:
        return MemoryClient(self)

    def connect_with(self, negotiated: bytes) -> MemoryClient:
        """A connection whose transport negotiated C{negotiated} (C{b"h2"}) by ALPN."""
        return MemoryClient(self, negotiated)

    def settle(self) -> None:
        for _ in range(10):
            self.memory.settle(rounds=1)
            for client in self.clients:
                client.deliver_close()

    def advance(self, seconds: float, step: float = 1.0) -> None:
        """Let C{seconds} pass, settling after each C{step} as a reactor would between timers."""
        while seconds > 0:
            self.reactor.advance(min(step, seconds))
            seconds -= step
            self.settle()

    def request(self, data: bytes) -> MemoryClient:
        return self.connect().send(data)


def body_of(raw: bytes) -> bytes:
    """The body of the (first) response in C{raw}, its chunked encoding undone."""
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        return body
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2:]
    return out


def statuses(raw: bytes) -> list[int]:
    """The status codes of the responses in C{raw}, in order (interim ones included)."""
    return [int(match.group(1)) for match in _STATUS_LINE.finditer(raw)]


_STATUS_LINE = re.compile(rb"(?:^|\n)HTTP/1\.[01] (\d{3})[ \r]")
