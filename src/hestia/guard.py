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
    or C{CONNECT} would make Hestia an open proxy (400 and 405); a target may
    hold only visible ASCII (400), since the backend client could not send
    anything else;
  - one C{Host}, of RFC 3986 syntax, and one at all for HTTP/1.1 (400);
  - more header fields than Twisted's C{maxHeaders} are a head too large (431);
  - a chunk size beyond 63 bits is 400, one that would take the body past
    C{max_body_size} 413, both when the size line arrives;
  - a body has a read deadline (C{body_timeout}, extended by one second per
    C{body_min_rate} bytes received, the rule of Apache's mod_reqtimeout), so a
    client that trickles bytes in cannot hold a connection forever (408);
  - a request whose body follows is authorised when its head is in (the
    site's L{GuardedSite.check_head}), before C{100 Continue} and before any
    of the body is read: refused, it is answered and the connection closed;
  - Twisted's own refusals (bad header names, NUL bytes, malformed chunks)
    answer with a JSON body instead of an empty one.

Idle keep-alive connections close after C{server.connection_idle_timeout}
(Twisted's per-connection timer).  HTTP/2 streams get the request-level checks
(target, method, body size) from L{GuardedRequest}; the h2 library itself
validates the framing.
"""

from __future__ import annotations

import json
import re
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

# Twisted's chunked decoder and its error are private: subclassing the decoder
# is the only way to see a chunk's size before its bytes arrive.
from twisted.web.http import (
    HTTPChannel,
    _ChunkedTransferDecoder,
    _GenericHTTPChannelProtocol,
    _MalformedChunkedDataError,
)
from twisted.web.server import Request, Site

from hestia.config import ServerConfig
from hestia.errors import refusal_document, write_json
from hestia.interfaces import IHeadCheck

log = Logger(namespace="hestia.guard")

_REASONS = {
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
}

# RFC 9112 section 3.2: a request target is visible ASCII.  Anything else
# cannot be forwarded (the backend client refuses it) and is the client's error.
_VISIBLE_ASCII = re.compile(rb"[\x21-\x7e]*")
# RFC 3986 section 3.2.2: an IP literal in brackets or a reg-name (which
# covers IPv4 addresses), then an optional port.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|\[v[0-9A-Fa-f]+\.[A-Za-z0-9._~!$&'()*+,;=:-]+\]|"
                   rb"[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::([0-9]*))?")
# A chunk size needs at most 63 bits; Twisted would take any number of digits.
_MAX_CHUNK_SIZE = 2**63 - 1


@dataclass(frozen=True)
class Limits:
    """The limits one listener enforces (from C{server:})."""

    max_body_size: int = ServerConfig.max_body_size
    max_header_size: int = ServerConfig.max_header_size
    header_timeout: float = ServerConfig.header_timeout
    idle_timeout: float = ServerConfig.connection_idle_timeout
    body_timeout: float = ServerConfig.body_timeout
    body_min_rate: int = ServerConfig.body_min_rate

    @classmethod
    def from_server(cls, server: ServerConfig) -> Limits:
        return cls(server.max_body_size, server.max_header_size, server.header_timeout,
                   server.connection_idle_timeout, server.body_timeout, server.body_min_rate)


@dataclass(frozen=True)
class Refusal:
    """A request refused while it is still bytes: what the client is told."""

    status: int
    reason: str
    service: str | None = None
    retry_after: float | None = None


def error_response(refused: Refusal) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection."""
    document = refusal_document(refused.reason, refused.service, refused.retry_after)
    extra = b""
    if refused.status == 401:
        extra += b'WWW-Authenticate: Bearer realm="hestia"\r\n'
    if refused.retry_after is not None:
        extra += b"Retry-After: %d\r\n" % document["retry_after"]
    body = json.dumps(document).encode("utf-8") + b"\n"
    return b"".join([
        b"HTTP/1.1 %d %s\r\n" % (refused.status, _REASONS.get(refused.status, b"Error")),
        b"Content-Type: application/json\r\n",
        b"Content-Length: %d\r\n" % len(body),
        extra,
        b"Connection: close\r\n\r\n",
        body,
    ])


def refusal(method: bytes, uri: bytes) -> tuple[int, str] | None:
    """Why a request line must not be served, or C{None}: a pure function."""
    if not _VISIBLE_ASCII.fullmatch(uri):
        return 400, "the request target may hold only visible ASCII: percent-encode other bytes"
    if method == b"CONNECT":
        return 405, "CONNECT is not served: Hestia is not a forward proxy"
    if not uri.startswith(b"/"):
        if method == b"OPTIONS" and uri == b"*":
            return None
        return 400, "only origin-form targets (/path) are served: Hestia is not a forward proxy"
    return None


def host_problem(values: list[bytes], version: bytes) -> str | None:
    """What is wrong with a request's C{Host} headers (RFC 9112 section 3.2), or C{None}."""
    if len(values) > 1:
        return "more than one Host header"
    if not values:
        return "an HTTP/1.1 request needs a Host header" if version == b"HTTP/1.1" else None
    match = _HOST.fullmatch(values[0])
    if match is None:
        return "Host is not a host name, an IP address or an [IP literal], with an optional :port"
    port = match.group(1)
    if port and int(port) > 65535:
        return "the port in Host is out of range"
    return None


class _BoundedChunkedDecoder(_ChunkedTransferDecoder):
    """
    Twisted's chunked decoder, judging each chunk size as soon as its line is in.

    Twisted takes a size of any number of digits and then waits for that many
    bytes, so one line holds a connection until the idle timeout.
    """

    def __init__(self, data: Callable[[bytes], None], finished: Callable[[bytes], None], limit: int,
                 too_large: Callable[[], None]) -> None:
        super().__init__(data, finished)
        self._limit = limit
        self._too_large = too_large
        self._declared = 0

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        if not super()._dataReceived_CHUNK_LENGTH():
            return False
        if self.length > _MAX_CHUNK_SIZE:
            raise _MalformedChunkedDataError("chunk size beyond 63 bits")
        self._declared += self.length
        if self._limit and self._declared > self._limit:
            self._too_large()
            raise _MalformedChunkedDataError("chunked body larger than the limit")  # Stops the decoder.
        return True


class GuardedChannel(HTTPChannel):
    """An L{HTTPChannel} that enforces L{Limits} while a request is still bytes."""

    def __init__(self, limits: Limits) -> None:
        super().__init__()
        self.limits = limits
        self.totalHeadersSize = limits.max_header_size
        # One line may be as long as the whole head; longer is 431 too.
        self.MAX_LENGTH = limits.max_header_size
        self._head_timer: IDelayedCall | None = None
        self._body_timer: IDelayedCall | None = None
        self._rejected = False

    def connectionMade(self) -> None:
        super().connectionMade()
        # Responses are written as they arrive (streams, Server-Sent Events):
        # Nagle's algorithm would hold a small write back until the previous
        # one is acknowledged, adding up to a delayed-ACK timeout per event.
        set_no_delay(self.transport)

    # -- refusing --------------------------------------------------------------

    def reject(self, status: int, reason: str, service: str | None = None, retry_after: float | None = None) -> None:
        """Answer C{status} and close; nothing more from this client is parsed."""
        if self._rejected:
            return
        self._rejected = True
        self._cancel_head_timer()
        self._cancel_body_timer()
        log.info("refused a request from {peer}: {status} {reason}", peer=_peer(self), status=status,
                 reason=reason)
        if self.transport is not None:
            self.transport.write(error_response(Refusal(status, reason, service, retry_after)))
        self.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's own refusals, with a body that says so.
        if self._receivedHeaderSize > self.totalHeadersSize:
            self.reject(431, f"request head larger than {self.limits.max_header_size} bytes")
        elif self._receivedHeaderCount > self.maxHeaders:
            self.reject(431, f"more than {self.maxHeaders} header fields")
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
        self._cancel_body_timer()
        super().connectionLost(reason)

    # -- the whole head is in ----------------------------------------------------

    def allHeadersReceived(self) -> None:
        self._cancel_head_timer()
        refused = refusal(self._command, self._path)
        if refused is not None:
            self.reject(*refused)
            return
        request = self.requests[-1]
        headers = request.requestHeaders
        if headers.hasHeader(b"content-length") and headers.hasHeader(b"transfer-encoding"):
            self.reject(400, "Content-Length together with Transfer-Encoding is ambiguous")
            return
        problem = host_problem(headers.getRawHeaders(b"host", []), self._version)
        if problem is not None:
            self.reject(400, problem)
            return
        if self.length != 0 or headers.hasHeader(b"expect"):
            # A body follows (or 100 Continue is asked for): decide now, before
            # 100 Continue and before reading the body.
            site = getattr(self, "site", None)  # Set by the Site that built this channel.
            denied = site.check_head(request, self._command, self._path, self._version) \
                if isinstance(site, GuardedSite) else None
            if denied is not None:
                self.reject(denied.status, denied.reason, denied.service, denied.retry_after)
                return
        if self.limits.max_body_size and self.length is not None and self.length > self.limits.max_body_size:
            self.reject(413, f"request body larger than {self.limits.max_body_size} bytes")
            return
        if type(self._transferDecoder) is _ChunkedTransferDecoder:
            limit = self.limits.max_body_size
            self._transferDecoder = _BoundedChunkedDecoder(
                request.handleContentChunk, self._finishRequestBody, limit,
                lambda: self.reject(413, f"request body larger than {limit} bytes"),
            )
        if self.length != 0:
            self._body_timer = self.callLater(self.limits.body_timeout, self._body_too_slow)
        super().allHeadersReceived()

    def _body_too_slow(self) -> None:
        self._body_timer = None
        self.reject(408, f"request body not received in time (body_timeout {self.limits.body_timeout:g}s, "
                         f"then at least {self.limits.body_min_rate} bytes a second)")

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            if self._body_timer.active():
                self._body_timer.cancel()
            self._body_timer = None

    def allContentReceived(self) -> None:
        if self._rejected:
            return
        self._cancel_body_timer()
        super().allContentReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self._rejected:
            return
        if self._body_timer is not None and self.limits.body_min_rate:
            # mod_reqtimeout's MinRate: each byte buys 1/rate seconds more.
            self._body_timer.delay(len(data) / self.limits.body_min_rate)
        super().rawDataReceived(data)


class GuardedRequest(Request):
    """
    Counts body bytes as they arrive, for chunked HTTP/1.1 bodies and HTTP/2.

    Over the limit, an HTTP/1.1 channel is cut at once (413); an HTTP/2 stream
    stops storing and is answered 413 when the request completes.  An HTTP/2
    stream that its head already refuses (L{GuardedSite.check_head}) gets no
    C{100 Continue}, stores none of its body, and is answered the refusal
    when it completes.  An HTTP/2 body has the same read deadline as an
    HTTP/1.1 one; past it the stream is reset.
    """

    _body_bytes = 0
    _too_large = False
    _refused: Refusal | None = None
    _body_deadline: IDelayedCall | None = None  # HTTP/2 only; the HTTP/1.1 channel keeps its own.

    def parseCookies(self) -> None:
        super().parseCookies()
        channel = self.channel
        if isinstance(channel, GuardedChannel):
            return  # HTTP/1.1: the channel decides, in allHeadersReceived.
        # HTTP/2: Twisted's H2Stream calls this once every header is in, just
        # before it answers Expect with 100 Continue, and before any DATA: the
        # one moment a head can be judged alone (there is no public hook).
        # Twisted files :authority as a Host header; a client may send both
        # (the h2 library refuses them unless they are equal).
        hosts = list(dict.fromkeys(self.requestHeaders.getRawHeaders(b"host", [])))
        problem = host_problem(hosts, b"HTTP/2")
        if problem is not None:
            self._refused = Refusal(400, problem)
            return
        site = getattr(channel, "site", None)
        method, path = getattr(channel, "command", None), getattr(channel, "path", None)
        if not isinstance(site, GuardedSite) or method is None or path is None:
            return
        if method in (b"GET", b"HEAD") and not self.requestHeaders.hasHeader(b"content-length"):
            return  # No body follows: the resource decides when it renders, as for HTTP/1.1.
        if refusal(method, path) is not None:
            return  # process() answers it.
        limits = _limits(self)
        self._body_deadline = site.reactor.callLater(limits.body_timeout, self._body_too_slow)
        self._refused = site.check_head(self, method, path, b"HTTP/2")
        if self._refused is not None:
            self.requestHeaders.removeHeader(b"expect")  # No 100 Continue for a refused request.

    def _body_too_slow(self) -> None:
        # HTTP/2: the stream is reset (RST_STREAM), the connection's other streams go on.
        self._body_deadline = None
        log.info("reset an HTTP/2 stream whose body was not received in time (body_timeout {timeout:g}s)",
                 timeout=_limits(self).body_timeout)
        abort = getattr(self.channel, "abortConnection", None)
        if abort is not None:
            abort()

    def _cancel_body_deadline(self) -> None:
        deadline, self._body_deadline = self._body_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._cancel_body_deadline()  # The whole body is in.
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Failure) -> None:
        self._cancel_body_deadline()
        super().connectionLost(reason)

    def handleContentChunk(self, data: bytes) -> None:
        if self._body_deadline is not None and _limits(self).body_min_rate:
            self._body_deadline.delay(len(data) / _limits(self).body_min_rate)  # as GuardedChannel does
        if self._too_large or self._refused is not None:
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
        refused = self._refused
        found = refusal(self.method, self.uri)
        if found is not None:
            refused = Refusal(*found)
        elif self._too_large:
            refused = Refusal(413, f"request body larger than {_limits(self).max_body_size} bytes")
        if refused is None:
            super().process()
            return
        document: dict[str, Any] = {"error": refused.reason, "service": refused.service, "state": None}
        if refused.retry_after is not None:
            document["retry_after"] = max(1, round(refused.retry_after))
        write_json(self, refused.status, document, retry_after=refused.retry_after)


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

    def check_head(self, request: Request, method: bytes, uri: bytes, version: bytes) -> Refusal | None:
        """
        Whether the resource C{request} goes to refuses it from its head alone.

        Called by the channel before a body is read.  Twisted fills in the
        request line when the body is in (C{requestReceived}, which sets all of
        this again); the traversal needs it now.  Only resources that provide
        L{IHeadCheck} (the proxy, the guarded API) are asked.
        """
        path = uri.split(b"?", 1)[0]
        request.method, request.uri, request.path, request.clientproto = method, uri, path, version
        request.prepath = []
        request.postpath = [unquote_to_bytes(segment) for segment in path[1:].split(b"/")]
        target = self.getResourceFor(request)
        check = IHeadCheck(target, None)
        if check is None:
            return None
        denied = check.check_head(request)
        if denied is None:
            return None
        return Refusal(denied.status, denied.reason, denied.service, denied.retry_after)

    def protocol(self) -> _GenericHTTPChannelProtocol:
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
