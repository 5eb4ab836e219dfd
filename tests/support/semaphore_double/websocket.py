"""``GET /api/ws``: the WebSocket subscribers that status changes and log lines are pushed to."""

from __future__ import annotations

from typing import Any

from twisted.python.failure import Failure
from twisted.web import server

from .state import DoubleState


class WsClient:
    """One /api/ws subscriber; the double only pushes, it ignores what the client says."""

    def __init__(self, double: DoubleState) -> None:
        self.double = double
        self.transport: Any = None

    def negotiationStarted(self, transport: Any) -> None:
        self.transport = transport

    def negotiationFinished(self) -> None:
        self.double._ws_clients.add(self)

    def pongReceived(self, payload: bytes) -> None:
        pass

    def textMessageReceived(self, message: str) -> None:
        pass

    def bytesMessageReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        self.double._ws_clients.discard(self)

    def send(self, text: str) -> None:
        try:
            self.transport.sendTextMessage(text)
        except Exception:  # noqa: BLE001 - a dead subscriber must not break the task
            self.double._ws_clients.discard(self)


class WsFactory:
    def __init__(self, double: DoubleState) -> None:
        self.double = double

    def buildProtocol(self, request: server.Request) -> Any:  # a WebSocketProtocol
        return WsClient(self.double)
