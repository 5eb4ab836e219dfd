"""
The failures a client can be told about, each with the HTTP status it maps to.

Every error the proxy or the API answers with is one of these, so that a client
always receives the same JSON shape (``{"error", "service", "state"}``) and a
status code that says whose fault it was: 404 unknown service, 502 the start
failed or the backend is unreachable, 503 the queue is full, 504 a timeout.
"""

from __future__ import annotations

import copy
import json
from typing import Any, TypedDict

from twisted.web.server import Request


class Where(TypedDict):
    """Which service an error is about, and the state it was in."""

    service: str
    state: str


class GatewayError(Exception):
    """
    A failure that is answered to the client as a JSON error.

    @ivar status: the HTTP status code to answer with.
    @ivar retry_after: seconds a client should wait, sent as C{Retry-After}.
    @ivar instance: for a service with C{instances:}, the instance the error
        happened in (C{service} is then the service the client asked for).
    """

    instance: str | None = None

    status = 500

    def __init__(
        self,
        reason: str,
        *,
        service: str | None = None,
        state: str | None = None,
        detail: list[str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.service = service
        self.state = state
        self.detail = detail or []
        self.retry_after = retry_after

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.reason}
        if self.service is not None:
            body["service"] = self.service
        if self.state is not None:
            body["state"] = self.state
        if self.instance is not None:
            body["instance"] = self.instance
        if self.detail:
            # The last lines of the service's own output: usually the real cause.
            body["detail"] = self.detail
        if self.retry_after is not None:
            body["retry_after"] = round(self.retry_after)
        return body


def in_instance(error: GatewayError, service: str) -> GatewayError:
    """
    C{error} as the client of C{service} (a service with C{instances:}) sees it:
    it names C{service}, which the API knows, and the instance it came from.
    The instance's own error is shared by its waiters and left as it is.
    """
    if error.service is None or error.service == service:
        return error
    seen = copy.copy(error)
    seen.instance, seen.service = error.service, service
    return seen


class UnknownService(GatewayError):
    status = 404


class BadRequest(GatewayError):
    status = 400


class StartFailed(GatewayError):
    """The service could not be started, or stopped while requests waited."""

    status = 502


class UpstreamUnreachable(GatewayError):
    status = 502


class QueueFull(GatewayError):
    status = 503


class ServiceUnavailable(GatewayError):
    """The gateway is shutting down or the service was stopped mid-start."""

    status = 503


class StartTimedOut(GatewayError):
    status = 504


class QueueTimedOut(GatewayError):
    status = 504


class ResponseTimedOut(GatewayError):
    """The backend took the request but sent no response head within C{response_timeout}."""

    status = 504


def refusal_document(reason: str, service: str | None = None, retry_after: float | None = None) -> dict[str, Any]:
    """
    The JSON of a refusal (authentication, request hygiene), the same whether it is
    written to a request (L{write_json}) or as raw bytes before one exists (hestia.guard).
    """
    document: dict[str, Any] = {"error": reason, "service": service, "state": None}
    if retry_after is not None:
        document["retry_after"] = max(1, round(retry_after))
    return document


def write_json(
    request: Request,
    status: int,
    document: object,
    *,
    retry_after: float | None = None,
    request_id: bytes | None = None,
    hide_server: bool = False,
) -> None:
    """
    The one writer of Hestia's own JSON answers (errors and refusals alike):
    the proxy, authentication, request hygiene and model routing all answer
    through it, so every one has the same headers.

    @param retry_after: seconds, sent as C{Retry-After} (at least 1); a 401
        also gets C{WWW-Authenticate: Bearer}.
    @param hide_server: leave out Twisted's C{Server} header (an answer in a
        backend's place should not name the gateway's software).
    """
    body = json.dumps(document).encode("utf-8") + b"\n"
    headers = request.responseHeaders
    request.setResponseCode(status)
    if status == 401:
        headers.setRawHeaders(b"www-authenticate", [b'Bearer realm="hestia"'])
    if retry_after is not None:
        headers.setRawHeaders(b"retry-after", [str(max(1, round(retry_after))).encode()])
    headers.setRawHeaders(b"content-type", [b"application/json"])
    headers.setRawHeaders(b"content-length", [str(len(body)).encode()])
    if hide_server:
        headers.removeHeader(b"server")
    if request_id is not None:
        headers.setRawHeaders(b"x-request-id", [request_id])
    if request.method != b"HEAD":
        request.write(body)
    request.finish()
