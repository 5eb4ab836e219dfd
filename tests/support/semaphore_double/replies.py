"""What the HTTP layer and the handlers pass each other: a request's context, a reply, an error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.web import server

from .spec import Operation


@dataclass
class Reply:
    """What a handler answers: JSON (dict/list), text (str) or nothing (None)."""

    status: int
    body: Any = None
    content_type: str | None = None


class ApiError(Exception):
    """A non-2xx answer; ``kind`` set means the client broke the protocol (a violation)."""

    def __init__(self, status: int, body: Any = None, kind: str | None = None, detail: Any = None):
        super().__init__(f"{status} {kind}: {detail}")
        self.status, self.body, self.kind, self.detail = status, body, kind, detail


@dataclass
class Ctx:
    request: server.Request
    op: Operation
    params: dict[str, Any]
    query: dict[str, str]
    body: Any
    raw_body: bytes


NOT_DONE = object()  # a handler's answer when it took the request over (the WebSocket)
