"""
Upgrade tunnels: WebSockets (and any other C{Connection: Upgrade}) through
the gateway.

HTTP stops at the backend's C{101 Switching Protocols}; after it the two
connections carry whatever protocol they agreed on.  Hestia therefore sends
the upgrade request itself over a dedicated connection, takes the client's
connection away from Twisted's HTTP channel, and splices the two transports:
bytes flow both ways unchanged, and each transport is registered as the
producer of the other, so a slow reader pauses the fast writer (backpressure)
instead of filling memory.

The lease taken for the request is held until either side closes: an open
tunnel counts as in flight, so a service is never idle-stopped under a live
WebSocket.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.server import Request

log = Logger(namespace="hestia.tunnel")

_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3})")


def is_upgrade(request: Request) -> bool:
    """Whether C{request} asks to switch protocols (RFC 9110, section 7.8)."""
    if request.clientproto != b"HTTP/1.1" or not request.requestHeaders.hasHeader(b"upgrade"):
        return False
    tokens = b",".join(request.requestHeaders.getRawHeaders(b"connection", [])).lower()
    return b"upgrade" in (token.strip() for token in tokens.split(b","))


def request_head(method: bytes, target: bytes, headers: Sequence[tuple[bytes, Sequence[bytes]]]) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1"]
    lines.extend(name + b": " + value for name, values in headers for value in values)
    return b"\r\n".join(lines) + b"\r\n\r\n"


class _Side(Protocol):
    """One end of the splice; forwards what it reads to the other end."""

    def __init__(self, tunnel: Tunnel, name: str) -> None:
        self.tunnel = tunnel
        self.name = name

    def dataReceived(self, data: bytes) -> None:
        self.tunnel.received(self, data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.tunnel.side_closed(self)


class Tunnel:
    """
    One spliced connection pair.

    @ivar on_close: called once, with the backend's status code (or C{None}
        when the backend never answered), when both sides are done.
    """

    def __init__(self, on_close: Callable[[int | None, int], None]) -> None:
        self.on_close = on_close
        self.client = _Side(self, "client")
        self.backend = _Side(self, "backend")
        self.status: int | None = None
        self.bytes_to_client = 0
        self._head = b""
        self._closed = False

    def received(self, side: _Side, data: bytes) -> None:
        if side is self.backend:
            if self.status is None:
                self._head += data
                match = _STATUS_LINE.match(self._head)
                if match:
                    self.status = int(match.group(1))
                    self._head = b""
            self.bytes_to_client += len(data)
            target = self.client
        else:
            target = self.backend
        if target.transport is not None:
            target.transport.write(data)

    def side_closed(self, side: _Side) -> None:
        other = self.backend if side is self.client else self.client
        if other.transport is not None and other.connected:
            other.transport.loseConnection()
        if not self._closed:
            self._closed = True
            self.on_close(self.status, self.bytes_to_client)

    def splice(self) -> None:
        """Register each transport as the other's producer: backpressure both ways."""
        client, backend = self.client.transport, self.backend.transport
        assert client is not None and backend is not None
        client.registerProducer(backend, True)  # type: ignore[attr-defined]
        backend.registerProducer(client, True)  # type: ignore[attr-defined]


def take_over_client(request: Request, protocol: Protocol) -> Any:
    """
    Detach the client's connection from Twisted's HTTP channel and give it to
    C{protocol}.

    Twisted has no public API for this (its ticket 3204); this is the approach
    Autobahn's WebSocketResource uses.  Bytes the channel already read past
    the request (the client may send frames eagerly) are returned so that they
    can be forwarded first.
    """
    channel: Any = request.channel
    transport = channel.transport
    channel.transport = None
    channel.setTimeout(None)
    buffered = b"".join(getattr(channel, "_dataBuffer", []))
    if isinstance(transport, ProtocolWrapper):  # TLS wraps the real protocol.
        transport.wrappedProtocol = protocol
    else:
        transport.protocol = protocol
    protocol.makeConnection(transport)
    return buffered


def backend_endpoint(reactor: Any, base_url: str) -> IStreamClientEndpoint:
    """The endpoint of a dedicated connection to the backend at C{base_url} (TLS for https)."""
    parts = urlsplit(base_url)
    host = parts.hostname or "localhost"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host, port, timeout=10)
    if parts.scheme == "https":
        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
    return endpoint


def open_tunnel(
    endpoint: IStreamClientEndpoint,
    base_url: str,
    request: Request,
    target: bytes,
    headers: Sequence[tuple[bytes, Sequence[bytes]]],
    on_close: Callable[[int | None, int], None],
    on_error: Callable[[Failure], None],
) -> None:
    """
    Connect to the backend, send the upgrade request, and splice.

    @param headers: the end-to-end headers to send (without C{Host},
        C{Connection} or C{Upgrade}, which are set here).
    @param on_error: called if the backend cannot be reached; the client
        connection is still Twisted's then, so the caller answers with a 502.
    """
    parts = urlsplit(base_url)
    host = parts.hostname or "localhost"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    tunnel = Tunnel(on_close)
    upgrade = request.requestHeaders.getRawHeaders(b"upgrade", [b""])
    host_header = host.encode("idna") + (b":%d" % port if parts.port else b"")
    head = request_head(
        request.method,
        target,
        [
            (b"Host", [host_header]),
            *headers,
            (b"Connection", [b"Upgrade"]),
            (b"Upgrade", upgrade),
        ],
    )
    assert request.content is not None
    request.content.seek(0)
    body = request.content.read()

    def connected(protocol: _Side) -> None:
        buffered = take_over_client(request, tunnel.client)
        assert protocol.transport is not None
        protocol.transport.write(head + body + buffered)
        tunnel.splice()

    connecting = endpoint.connect(Factory.forProtocol(lambda: tunnel.backend))
    connecting.addCallbacks(connected, on_error)
