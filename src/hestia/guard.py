"""
Request hygiene: what a request must look like before any resource sees it.

The checks live in the HTTP/1.1 channel, where a request is still bytes, so
that a bad one is answered and dropped before its body is read and before it
can start anything:

  - the head (request line and headers) has a size limit (431) and a time
    limit counted from its first byte, which ends slowloris clients that send
    one byte a second and so keep Twisted's idle timer from ever firing (408);
  - C{Content-Length} together with C{Transfer-Encoding} is refused (400).
    Twisted 26.10 already refuses two length headers of any kind and any
    transfer coding but C{chunked}; it lets C{Transfer-Encoding: identity}
    with a C{Content-Length} through, and that is the ambiguity added here;
  - a declared body over C{server.max_body_size} is refused (413) before it
    is read (and before C{100 Continue}); a chunked body is cut off at the
    limit;
  - only origin-form targets (C{/path}) are served: an absolute-form target
    or C{CONNECT} would make Hestia an open proxy (400 and 405);
  - Twisted's own refusals (bad header names, NUL bytes, malformed chunks)
    answer with a JSON body instead of an empty one.

Idle keep-alive connections close after C{server.connection_idle_timeout}
(Twisted's per-connection timer).  HTTP/2 streams get the request-level checks
(target, method, body size) from L{GuardedRequest}; the h2 library itself
validates the framing.
"""

from __future__ import annotations

import json
import resource
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.server import Request, Site

from hestia.config import ServerConfig

log = Logger(namespace="hestia.guard")

_REASONS = {
    400: b"Bad Request",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
}


@dataclass(frozen=True)
class Limits:
    """The limits one listener enforces (from C{server:})."""

    max_body_size: int = ServerConfig.max_body_size
    max_header_size: int = ServerConfig.max_header_size
    header_timeout: float = ServerConfig.header_timeout
    idle_timeout: float = ServerConfig.connection_idle_timeout

    @classmethod
    def from_server(cls, server: ServerConfig) -> Limits:
        return cls(server.max_body_size, server.max_header_size, server.header_timeout,
                   server.connection_idle_timeout)


def error_response(status: int, reason: str) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection."""
    body = json.dumps({"error": reason, "service": None, "state": None}).encode("utf-8") + b"\n"
    return b"".join([
        b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error")),
        b"Content-Type: application/json\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"Connection: close\r\n\r\n",
        body,
    ])


def refusal(method: bytes, uri: bytes) -> tuple[int, str] | None:
    """Why a request line must not be served, or C{None}: a pure function."""
    if method == b"CONNECT":
        return 405, "CONNECT is not served: Hestia is not a forward proxy"
    if not uri.startswith(b"/"):
        if method == b"OPTIONS" and uri == b"*":
            return None
        return 400, "only origin-form targets (/path) are served: Hestia is not a forward proxy"
    return None


class GuardedChannel(HTTPChannel):
    """An L{HTTPChannel} that enforces L{Limits} while a request is still bytes."""

    def __init__(self, limits: Limits) -> None:
        super().__init__()
        self.limits = limits
        self.totalHeadersSize = limits.max_header_size
        # One line may be as long as the whole head; longer is 431 too.
        self.MAX_LENGTH = limits.max_header_size
        self._head_timer: IDelayedCall | None = None
        self._rejected = False

    def connectionMade(self) -> None:
        super().connectionMade()
        # Responses are written as they arrive (streams, Server-Sent Events):
        # Nagle's algorithm would hold a small write back until the previous
        # one is acknowledged, adding up to a delayed-ACK timeout per event.
        set_no_delay(self.transport)

    # -- refusing --------------------------------------------------------------

    def reject(self, status: int, reason: str) -> None:
        """Answer C{status} and close; nothing more from this client is parsed."""
        if self._rejected:
            return
        self._rejected = True
        self._cancel_head_timer()
        log.info("refused a request from {peer}: {status} {reason}", peer=_peer(self), status=status,
                 reason=reason)
        if self.transport is not None:
            self.transport.write(error_response(status, reason))
        self.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's own refusals, with a body that says so.
        if self._receivedHeaderSize > self.totalHeadersSize:
            self.reject(431, f"request head larger than {self.limits.max_header_size} bytes")
        else:
            self.reject(400, "malformed request")

    def lineLengthExceeded(self, line: bytes) -> None:
        self.reject(431, f"request head larger than {self.limits.max_header_size} bytes")

    # -- the head's deadline ---------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._rejected:
            return
        if self.line_mode and not self._handlingRequest and self._head_timer is None and data:
            self._head_timer = self.callLater(self.limits.header_timeout, self._head_too_slow)
        super().dataReceived(data)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        self.reject(408, f"request head not received within {self.limits.header_timeout:g}s")

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            if self._head_timer.active():
                self._head_timer.cancel()
            self._head_timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_head_timer()
        super().connectionLost(reason)

    # -- the whole head is in ----------------------------------------------------

    def allHeadersReceived(self) -> None:
        self._cancel_head_timer()
        refused = refusal(self._command, self._path)
        if refused is not None:
            self.reject(*refused)
            return
        headers = self.requests[-1].requestHeaders
        if headers.hasHeader(b"content-length") and headers.hasHeader(b"transfer-encoding"):
            self.reject(400, "Content-Length together with Transfer-Encoding is ambiguous")
            return
        if self.limits.max_body_size and self.length is not None and self.length > self.limits.max_body_size:
            self.reject(413, f"request body larger than {self.limits.max_body_size} bytes")
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self._rejected:
            return
        super().allContentReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self._rejected:
            return
        super().rawDataReceived(data)


class GuardedRequest(Request):
    """
    Counts body bytes as they arrive, for chunked HTTP/1.1 bodies and HTTP/2.

    Over the limit, an HTTP/1.1 channel is cut at once (413); an HTTP/2 stream
    stops storing and is answered 413 when the request completes.
    """

    _body_bytes = 0
    _too_large = False

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large:
            return
        limit = _limits(self).max_body_size
        self._body_bytes += len(data)
        if limit and self._body_bytes > limit:
            self._too_large = True
            if isinstance(self.channel, GuardedChannel):
                self.channel.reject(413, f"request body larger than {limit} bytes")
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        refused = refusal(self.method, self.uri)
        if self._too_large:
            refused = (413, f"request body larger than {_limits(self).max_body_size} bytes")
        if refused is None:
            super().process()
            return
        status, reason = refused
        body = json.dumps({"error": reason, "service": None, "state": None}).encode("utf-8") + b"\n"
        self.setResponseCode(status)
        self.setHeader(b"content-type", b"application/json")
        self.setHeader(b"content-length", str(len(body)).encode())
        self.write(body)
        self.finish()


def _limits(request: Request) -> Limits:
    channel_limits = getattr(request.channel, "limits", None)
    if isinstance(channel_limits, Limits):
        return channel_limits
    site = getattr(getattr(request.channel, "site", None), "limits", None)
    return site if isinstance(site, Limits) else Limits()


def _peer(channel: HTTPChannel) -> str:
    transport = channel.transport
    return str(getattr(transport.getPeer(), "host", "?")) if transport is not None else "?"


class GuardedSite(Site):
    """
    A L{Site} whose connections are L{GuardedChannel}s and requests
    L{GuardedRequest}s, with C{timeOut} the idle keep-alive timeout.
    """

    def __init__(self, resource: Any, limits: Limits | None = None, **kwargs: Any) -> None:
        self.limits = limits or Limits()
        super().__init__(resource, requestFactory=GuardedRequest, timeout=self.limits.idle_timeout, **kwargs)

    def protocol(self) -> _GenericHTTPChannelProtocol:  # type: ignore[override]
        return _GenericHTTPChannelProtocol(GuardedChannel(self.limits))

    def set_limits(self, limits: Limits) -> None:
        """New limits for connections accepted from now on (a reload)."""
        self.limits = limits
        self.timeOut = limits.idle_timeout


def set_no_delay(transport: Any) -> None:
    """Turn on C{TCP_NODELAY} on C{transport} if it is a TCP one (not TLS's, not a pipe)."""
    set_delay = getattr(transport, "setTcpNoDelay", None)
    if set_delay is not None:
        try:
            set_delay(True)
        except OSError:
            pass  # A UNIX socket, or a connection already gone.


def raise_open_file_limit() -> int:
    """
    Raise this process's soft limit on open files to its hard limit.

    Each idle client holds a descriptor; with a soft limit of 1024 (a common
    default) a thousand idle connections would stop Hestia from accepting
    anyone, or from reaching its backends.  Returns the limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft
