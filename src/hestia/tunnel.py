"""
Upgrade tunnels: WebSockets through the gateway.

HTTP stops at the backend's C{101 Switching Protocols}; after it the two
connections carry whatever protocol they agreed on.  Hestia therefore sends
the upgrade request itself over a dedicated connection and reads the
backend's answer with h11 (Twisted's HTTP client skips a C{101} as an
interim response).  What happens next depends on that answer:

  - C{101} switching to C{websocket}: the client's connection is taken away
    from Twisted's HTTP channel and the two transports are spliced: bytes flow
    both ways unchanged, and each transport is registered as the producer of
    the other, so a slow reader pauses the fast writer (backpressure) instead
    of filling memory;
  - anything else (404, 200, 426, ...): the answer is relayed to the client as
    an ordinary response and the channel goes on parsing the client's next
    request, which is checked like any other.  Splicing without a C{101} would
    hand every later byte of that client to the backend unchecked.

Only C{websocket} is passed on: an h2c upgrade (or any other token) is
forwarded as a plain request without its C{Upgrade} (see L{is_upgrade}), so
no HTTP/2 stream reaches a backend unchecked.

The lease taken for the request is held until either side closes: an open
tunnel counts as in flight, so a service is never idle-stopped under a live
WebSocket.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import h11
from twisted.internet.interfaces import IConsumer, IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.server import Request

from hestia.errors import BadRequest, UpstreamUnreachable
from hestia.headers import headers_for_client

log = Logger(namespace="hestia.tunnel")

WEBSOCKET = b"websocket"


def _tokens(request: Request, name: bytes) -> list[bytes]:
    joined = b",".join(request.requestHeaders.getRawHeaders(name, []))
    return [token.strip().lower() for token in joined.split(b",") if token.strip()]


def is_upgrade(request: Request) -> bool:
    """
    Whether C{request} asks to switch to WebSocket (RFC 9110 section 7.8, RFC 6455).

    Only C{websocket}: Hestia understands what it lets through.  Another token
    (C{h2c}) makes the request a plain one, whose C{Upgrade} is hop-by-hop and
    dropped like any other.
    """
    if request.clientproto != b"HTTP/1.1" or not request.requestHeaders.hasHeader(b"upgrade"):
        return False
    return b"upgrade" in _tokens(request, b"connection") and WEBSOCKET in _tokens(request, b"upgrade")


class _Side(Protocol):
    """One end of the splice; forwards what it reads to the other end."""

    def __init__(self, tunnel: Tunnel, name: str) -> None:
        self.tunnel = tunnel
        self.name = name

    def dataReceived(self, data: bytes) -> None:
        self.tunnel.received(self, data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.tunnel.side_closed(self, reason)


class Tunnel:
    """
    One upgrade request on its own backend connection, and the splice after a C{101}.

    @ivar on_close: called once, with the backend's status code (or C{None}
        when the backend never answered), when both sides of a splice are done.
    @ivar on_refused: called with the status when the backend answered
        anything but C{101}; the answer then goes to the client through the
        request, which finishes as usual (the caller's C{notifyFinish}).
    @ivar on_error: called when no response can be relayed (the backend is
        unreachable, broke off, or spoke no HTTP); the client connection is
        still Twisted's then, so the caller answers with an error.
    @ivar on_body: called with each piece of a refused upgrade's response
        body as it is relayed (the caller's C{response_idle_timeout} clock).
    """

    def __init__(
        self,
        request: Request,
        on_close: Callable[[int | None, int], None],
        on_refused: Callable[[int], None],
        on_error: Callable[[Failure], None],
        on_body: Callable[[bytes], None] | None = None,
    ) -> None:
        self.request = request
        self.on_close = on_close
        self.on_refused = on_refused
        self.on_error = on_error
        self.on_body = on_body
        self.client = _Side(self, "client")
        self.backend = _Side(self, "backend")
        self.status: int | None = None
        self.bytes_to_client = 0
        self.switched = False
        self._http = h11.Connection(h11.CLIENT)
        self._received = bytearray()  # The backend's bytes until it decides: a 101 is passed on as sent.
        self._responding = False
        self._done = False
        self._closed = False

    # -- before the backend's answer ------------------------------------------------------

    def request_bytes(self, method: bytes, target: bytes, headers: Sequence[tuple[bytes, Sequence[bytes]]],
                      body: bytes) -> bytes:
        fields = [(name, value) for name, values in headers for value in values]
        if body:
            fields.append((b"Content-Length", b"%d" % len(body)))
        data = self._http.send(h11.Request(method=method, target=target, headers=fields)) or b""
        if body:
            data += self._http.send(h11.Data(data=body)) or b""
        return data + (self._http.send(h11.EndOfMessage()) or b"")

    def abort(self) -> None:
        """The client went away before the backend decided: drop the backend connection."""
        self._done = True
        if self.backend.transport is not None:
            self.backend.transport.loseConnection()

    def received(self, side: _Side, data: bytes) -> None:
        if self.switched:
            self._relay(side, data)
        elif side is self.backend and not self._done:
            self._received += data
            self._http.receive_data(data)
            self._read_answer()

    def _read_answer(self) -> None:
        while not self._done:
            try:
                event = self._http.next_event()
            except h11.RemoteProtocolError as error:
                self._broken(f"backend sent a malformed response: {error}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                if event is h11.PAUSED and self._http.their_state is h11.SWITCHED_PROTOCOL:
                    self._switch()
                return
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    upgrade = [value.lower() for name, value in event.headers if name == b"upgrade"]
                    if not any(WEBSOCKET in value for value in upgrade):
                        self._broken("backend switched to a protocol other than websocket")
                        return
                    self.status = 101
                continue  # 100, 103: nothing the client asked for.
            if isinstance(event, h11.Response):
                self._respond(event)
            elif isinstance(event, h11.Data):
                self.bytes_to_client += len(event.data)
                if self.on_body is not None:
                    self.on_body(bytes(event.data))
                self.request.write(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._finish_response()

    def _respond(self, response: h11.Response) -> None:
        """A refused upgrade: an ordinary response, through Twisted's request."""
        self.status = response.status_code
        self._responding = True
        self.on_refused(response.status_code)
        request = self.request
        request.setResponseCode(response.status_code, bytes(response.reason) or None)
        request.defaultContentType = None  # No type is made up for an untyped answer.
        for name in (b"server", b"date"):  # The backend's own (or none) are the truthful ones.
            request.responseHeaders.removeHeader(name)
        grouped: dict[bytes, list[bytes]] = {}
        for name, value in response.headers:
            grouped.setdefault(bytes(name), []).append(bytes(value))
        for name, values in headers_for_client(grouped.items()):
            request.responseHeaders.setRawHeaders(name, values)
        if self.backend.transport is not None:
            request.registerProducer(self.backend.transport, True)

    def _finish_response(self) -> None:
        self._done = True
        request = self.request
        request.unregisterProducer()
        if not request.finished and not getattr(request, "_disconnected", False):
            request.finish()
        if self.backend.transport is not None:
            self.backend.transport.loseConnection()  # A dedicated connection: never reused.

    def _broken(self, reason: str) -> None:
        self._done = True
        if self.backend.transport is not None:
            self.backend.transport.loseConnection()
        if self._responding:
            # Headers are out: the only honest signal left is a cut connection.
            self.request.unregisterProducer()
            self.request.loseConnection()
        else:
            self.on_error(Failure(UpstreamUnreachable(reason)))

    def _switch(self) -> None:
        """The backend said 101: take the client's connection and splice."""
        self.switched = True
        self._done = True
        buffered = take_over_client(self.request, self.client)
        head = bytes(self._received)
        self.bytes_to_client += len(head)
        assert self.client.transport is not None and self.backend.transport is not None
        self.client.transport.write(head)
        if buffered:
            self.backend.transport.write(buffered)
        self.splice()

    # -- after the 101 -------------------------------------------------------------------

    def _relay(self, side: _Side, data: bytes) -> None:
        if side is self.backend:
            self.bytes_to_client += len(data)
            target = self.client
        else:
            target = self.backend
        if target.transport is not None:
            target.transport.write(data)

    def side_closed(self, side: _Side, reason: Failure | None = None) -> None:
        if not self.switched:
            if side is self.backend and not self._done:
                if self._responding:
                    # Maybe a body that runs to the close (h11 then ends it), maybe a broken one.
                    self._http.receive_data(b"")
                    self._read_answer()
                if not self._done:
                    self._broken("backend closed the connection before it answered the upgrade")
            return
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
        IConsumer(client).registerProducer(IPushProducer(backend), True)
        IConsumer(backend).registerProducer(IPushProducer(client), True)


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
    # The channel is the transport's producer (Twisted pauses it when the
    # client reads slowly); the tunnel registers the backend there instead.
    transport.unregisterProducer()
    buffered = b"".join(getattr(channel, "_dataBuffer", []))
    if isinstance(transport, ProtocolWrapper):  # TLS wraps the real protocol.
        transport.wrappedProtocol = protocol
    else:
        transport.protocol = protocol
    protocol.makeConnection(transport)
    return buffered


def open_tunnel(
    endpoint: IStreamClientEndpoint,
    base_url: str,
    request: Request,
    target: bytes,
    headers: Sequence[tuple[bytes, Sequence[bytes]]],
    on_close: Callable[[int | None, int], None],
    on_error: Callable[[Failure], None],
    on_refused: Callable[[int], None],
    on_body: Callable[[bytes], None] | None = None,
) -> Tunnel:
    """
    Connect to the backend, send the upgrade request, and act on its answer.

    @param headers: the end-to-end headers to send (without C{Host},
        C{Connection} or C{Upgrade}, which are set here).
    @param on_error: called if the backend cannot be reached or gives no
        usable answer; the client connection is still Twisted's then, so the
        caller answers with a 502.
    @param on_refused: called with the status of a non-101 answer, before it is relayed.
    @param on_body: called with each piece of that answer's body as it is relayed.
    @return: the L{Tunnel}, which the caller L{Tunnel.abort}s if the client leaves first.
    """
    parts = urlsplit(base_url)
    host = parts.hostname or "localhost"
    tunnel = Tunnel(request, on_close, on_refused, on_error, on_body)
    host_header = host.encode("idna") + (b":%d" % parts.port if parts.port else b"")
    assert request.content is not None
    request.content.seek(0)
    body = request.content.read()
    try:
        data = tunnel.request_bytes(
            request.method,
            target,
            [(b"Host", [host_header]), *headers, (b"Connection", [b"Upgrade"]), (b"Upgrade", [WEBSOCKET])],
            body,
        )
    except h11.LocalProtocolError as error:
        on_error(Failure(BadRequest(f"cannot forward this upgrade request: {error}")))
        return tunnel

    def connected(protocol: _Side) -> None:
        if tunnel._done:  # The client left while we connected.
            if protocol.transport is not None:
                protocol.transport.loseConnection()
            return
        assert protocol.transport is not None
        protocol.transport.write(data)

    def failed(failure: Failure) -> None:
        if not tunnel._done:
            tunnel._done = True
            on_error(failure)

    connecting = endpoint.connect(Factory.forProtocol(lambda: tunnel.backend))
    connecting.addCallbacks(connected, failed)
    return tunnel
