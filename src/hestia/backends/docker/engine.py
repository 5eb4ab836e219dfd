"""
A small asynchronous client for the Docker Engine HTTP API, on Twisted.

Hestia's C{docker} backend starts, stops and watches containers through it. The
same API is served by Docker and by Podman (C{podman system service}), so the
client sticks to the part of the API both implement identically, and is tested
against a real Podman engine (see C{scripts/podman-engine.sh}).

Design choices, and why:

  - Transport: L{twisted.web.client.Agent} with an L{IAgentEndpointFactory}
    that always dials the engine (a unix socket, or TCP), whatever host the URL
    names, plus a persistent L{HTTPConnectionPool}: a gateway asks the engine
    for little, but often, and reconnecting for each call is wasted work.
  - API version: negotiated once, lazily, from C{GET /version} (served
    unversioned by both engines). We ask for C{/v1.41} (what Podman 4 speaks,
    and a version Docker has served since 20.10) clamped into the server's
    C{[MinAPIVersion, ApiVersion]} range, because Docker 29 dropped every
    version below 1.44 while Podman 4 stops at 1.41: a fixed prefix would break
    on one of them. Every call used here has the same shape in all of those
    versions. If C{/version} answers but says nothing usable, C{1.41} is used.
  - Errors are typed (L{EngineUnreachable}, L{EnginePermissionDenied},
    L{NoSuchContainer}, L{EngineError}) and carry a sentence a person can act
    on, so that the gateway can show them instead of a traceback.
  - Nothing blocks: every method returns a L{Deferred}.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from io import BytesIO
from typing import Any, TypeVar, cast
from urllib.parse import quote, urlencode, urlsplit

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.error import ConnectError, ConnectionClosed, DNSLookupError
from twisted.internet.error import TimeoutError as TwistedTimeoutError
from twisted.internet.interfaces import IPushProducer, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    IAgentEndpointFactory,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer

__all__ = [
    "DEFAULT_API_VERSION",
    "DEFAULT_HOST",
    "ContainerEngineError",
    "DockerEngine",
    "EngineAddress",
    "EngineError",
    "EnginePermissionDenied",
    "EngineTimeout",
    "EngineUnreachable",
    "EventStream",
    "NoSuchContainer",
    "demultiplex",
    "parse_engine_host",
]

log = Logger()

T = TypeVar("T")

DEFAULT_HOST = "unix:///var/run/docker.sock"
DEFAULT_API_VERSION = "1.41"
_DEFAULT_TCP_PORT = 2375


# --------------------------------------------------------------------------
# Errors


class ContainerEngineError(Exception):
    """Base class of every error this module raises: catch this to catch all."""


class EngineUnreachable(ContainerEngineError):
    """
    No conversation with the engine was possible: nothing listens on the
    socket, the socket file does not exist, the host does not resolve, or the
    connection dropped before an answer. Usually transient (the engine is
    restarting): callers may retry with backoff.
    """

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"cannot reach the container engine at {address}: {reason}")
        self.address = address
        self.reason = reason


class EngineTimeout(EngineUnreachable):
    """The engine accepted the connection but did not answer in time."""


class EnginePermissionDenied(ContainerEngineError):
    """
    The socket exists but this user may not open it (EACCES). Not transient:
    retrying will not help, the deployment has to change.
    """

    def __init__(self, address: str) -> None:
        super().__init__(
            f"permission denied on the container engine socket {address}: add this "
            "user to the 'docker' group (and log in again), or point DOCKER_HOST at "
            "a socket this user owns, such as rootless Podman's "
            "unix://$XDG_RUNTIME_DIR/podman/podman.sock "
            "(systemctl --user enable --now podman.socket)"
        )
        self.address = address


class EngineError(ContainerEngineError):
    """The engine answered with an HTTP error; C{message} is its own words."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"container engine error {status}: {message}")
        self.status = status
        self.message = message


class NoSuchContainer(EngineError):
    """The engine knows no container by that name or id (HTTP 404)."""

    def __init__(self, name: str, message: str | None = None) -> None:
        super().__init__(404, message or f"no such container: {name}")
        self.name = name
        # Override EngineError's wording: the name is what the operator wrote.
        self.args = (f"no such container: {name}",)


# --------------------------------------------------------------------------
# Addresses


@dataclass(frozen=True)
class EngineAddress:
    """
    Where the engine listens: a unix socket C{path}, or a TCP C{host}/C{port}.

    @ivar url: the address as given (normalised), for messages.
    """

    url: str
    path: str | None = None
    host: str | None = None
    port: int | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None


def parse_engine_host(host: str | None = None) -> EngineAddress:
    """
    Parse a Docker-style engine address.

    Accepts C{unix:///path}, a bare absolute path, C{tcp://host:port} and
    C{http://host:port} (TCP without TLS; the port defaults to 2375). C{None}
    means C{$DOCKER_HOST}, else C{unix:///var/run/docker.sock}, the same
    default as the Docker CLI. TLS (C{https://}, C{DOCKER_TLS_VERIFY}) and
    C{ssh://} are not supported: a clear L{ValueError} says so rather than
    silently talking plain HTTP to a TLS port.
    """
    if host is None:
        host = os.environ.get("DOCKER_HOST") or DEFAULT_HOST
    host = host.strip()
    if host.startswith("/"):
        host = "unix://" + host
    if host.startswith("unix://"):
        path = host[len("unix://") :]
        if not path:
            raise ValueError(f"engine address {host!r} names no socket path")
        return EngineAddress(url=f"unix://{path}", path=path)
    parts = urlsplit(host)
    if parts.scheme in ("tcp", "http"):
        if not parts.hostname:
            raise ValueError(f"engine address {host!r} names no host")
        try:
            port = parts.port or _DEFAULT_TCP_PORT
        except ValueError:
            raise ValueError(f"engine address {host!r} has an invalid port") from None
        shown = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return EngineAddress(url=f"{parts.scheme}://{shown}:{port}", host=parts.hostname, port=port)
    raise ValueError(
        f"unsupported container engine address {host!r}: use unix:///path/to/socket, "
        "tcp://host:port or http://host:port (TLS and ssh:// are not supported)"
    )


@implementer(IAgentEndpointFactory)
class _EngineEndpointFactory:
    """
    Dial the engine for every request, whatever host the request URL names.

    The Agent needs an C{http://} URL; for a unix socket the host part is
    meaningless, so every URL names C{localhost} and this factory decides
    where the bytes really go. The pool keys connections by that URL, so they
    are all reused for the one engine.
    """

    def __init__(self, reactor: IReactorTime, address: EngineAddress, connect_timeout: float) -> None:
        self._reactor = reactor
        self._address = address
        self._timeout = connect_timeout

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        if self._address.path is not None:
            return UNIXClientEndpoint(self._reactor, self._address.path, timeout=int(self._timeout))
        assert self._address.host is not None and self._address.port is not None
        return HostnameEndpoint(self._reactor, self._address.host, self._address.port, timeout=self._timeout)


def _connect_failure_reason(exc: BaseException) -> str | None:
    """
    Say in words why a connection failed, or C{None} if C{exc} is not a
    connection failure (so that the caller lets it through untouched).
    """
    if isinstance(exc, ConnectError):
        os_errno = exc.osError
        if os_errno == errno.ENOENT:
            return "no such file (is the engine running? is the socket path right?)"
        if os_errno == errno.ECONNREFUSED:
            return "connection refused (nothing listens there; is the engine running?)"
        if isinstance(exc, DNSLookupError):
            return f"cannot resolve the host name ({exc.args[-1] if exc.args else exc})"
        if os_errno is not None:
            return f"{os.strerror(os_errno).lower()} (errno {os_errno})"
        text = str(exc).strip().rstrip(".")
        return text or type(exc).__name__
    if isinstance(exc, (ResponseNeverReceived, ResponseFailed)):
        return "the connection closed before the engine answered"
    if isinstance(exc, ConnectionClosed):
        return "the connection was lost"
    return None


def _translate(address: EngineAddress, exc: BaseException) -> BaseException:
    """
    Map Twisted's connection failures onto this module's typed errors; any
    other exception is returned unchanged (the caller then re-raises it).
    """
    if isinstance(exc, ConnectError) and exc.osError in (errno.EACCES, errno.EPERM):
        return EnginePermissionDenied(address.url)
    if isinstance(exc, (ResponseNeverReceived, ResponseFailed)) and any(
        reason.check(CancelledError) for reason in exc.reasons
    ):
        # Our own timeout cancelled the request: let addTimeout see a
        # cancellation, which it turns into a timeout.
        return CancelledError()
    reason = _connect_failure_reason(exc)
    if reason is None:
        return exc
    return EngineUnreachable(address.url, reason)


def _is_stale_connection(exc: BaseException) -> bool:
    """
    True if a request failed only because the server had quietly closed the
    pooled keep-alive connection we reused: the request never reached it, and
    sending it again on a fresh connection is safe.
    """
    if not isinstance(exc, ResponseNeverReceived):
        return False
    reasons = getattr(exc, "reasons", [])
    return bool(reasons) and all(r.check(ConnectionClosed) for r in reasons)


def _error_message(body: bytes) -> str:
    """The engine's own error sentence, from its JSON body (or the raw text)."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500] or "(empty response)"
    if isinstance(data, dict):
        message = data.get("message") or data.get("cause")
        if isinstance(message, str) and message:
            return message
    return text[:500]


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _negotiate(server: Mapping[str, Any], preferred: str) -> str:
    """
    Pick the API version to speak: C{preferred}, clamped into the server's
    C{[MinAPIVersion, ApiVersion]} when it reports one.
    """
    chosen = preferred
    try:
        maximum = server.get("ApiVersion")
        minimum = server.get("MinAPIVersion")
        if isinstance(maximum, str) and _version_tuple(maximum) < _version_tuple(chosen):
            chosen = maximum
        if isinstance(minimum, str) and _version_tuple(minimum) > _version_tuple(chosen):
            chosen = minimum
    except ValueError:
        return preferred
    return chosen


def _normalise_filters(filters: Mapping[str, str | Iterable[str]] | None) -> str | None:
    """
    Encode filters the way the engine wants them: JSON of name -> list of
    values. A single string value is accepted for convenience
    (C{{"label": "hestia.enable=true"}}).
    """
    if not filters:
        return None
    encoded: dict[str, list[str]] = {}
    for name, values in filters.items():
        encoded[name] = [values] if isinstance(values, str) else list(values)
    return json.dumps(encoded, separators=(",", ":"))


# --------------------------------------------------------------------------
# Log stream demultiplexing


def demultiplex(data: bytes) -> list[tuple[int, bytes]]:
    """
    Split a non-TTY log or attach stream into C{(stream, payload)} frames.

    Without a TTY the engine multiplexes stdout and stderr in one body, each
    chunk preceded by an 8-byte header: one byte for the stream (0 stdin,
    1 stdout, 2 stderr), three zero bytes, and the payload size as a
    big-endian 32-bit integer. A truncated last frame is returned as far as
    it goes.
    """
    frames: list[tuple[int, bytes]] = []
    offset = 0
    while offset + 8 <= len(data):
        stream = data[offset]
        size = int.from_bytes(data[offset + 4 : offset + 8], "big")
        start = offset + 8
        frames.append((stream, data[start : start + size]))
        offset = start + size
    return frames


def _split_lines(chunks: Iterable[tuple[int, bytes]]) -> list[str]:
    """
    Join frames into lines, per stream, in arrival order. A line may be split
    over several frames of its stream; stdout and stderr keep separate partial
    lines so that they do not get glued together.
    """
    partial: dict[int, bytes] = {}
    lines: list[str] = []
    for stream, payload in chunks:
        pending = partial.get(stream, b"") + payload
        *complete, rest = pending.split(b"\n")
        lines.extend(line.rstrip(b"\r").decode("utf-8", "replace") for line in complete)
        partial[stream] = rest
    lines.extend(rest.decode("utf-8", "replace") for rest in partial.values() if rest)
    return lines


# --------------------------------------------------------------------------
# Bodies and events


class _BodyCollector(Protocol):
    """
    Collect a whole response body. Not L{readBody}: the transport Agent hands
    to body protocols has no C{abortConnection}, so readBody emits a
    DeprecationWarning on every call; cancelling this one closes the
    connection through C{stopProducing} instead.
    """

    def __init__(self, finished: Deferred[bytes]) -> None:
        self._finished = finished
        self._chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._finished.called:  # cancelled meanwhile
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._finished.callback(b"".join(self._chunks))
        else:
            self._finished.errback(reason)


def _collect_body(response: IResponse) -> Deferred[bytes]:
    """The whole body of C{response}; cancelling it drops the connection."""

    def cancel(_: Deferred[bytes]) -> None:
        # Body protocols get an IPushProducer (TransportProxyProducer), whose
        # stopProducing closes the connection.
        transport = cast(IPushProducer | None, collector.transport)
        if transport is not None:
            transport.stopProducing()

    finished: Deferred[bytes] = Deferred(cancel)
    collector = _BodyCollector(finished)
    response.deliverBody(collector)
    return finished


class _JSONLinesProtocol(Protocol):
    """
    Receive a JSON-lines body incrementally and hand each object to a
    callback as soon as its line is complete (the events body never ends).
    """

    def __init__(self, on_object: Callable[[dict[str, Any]], None], finished: Deferred[Failure]) -> None:
        self._on_object = on_object
        self._finished = finished
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            line = raw.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                # Logger.emit, not .warn: ruff's G010 "fix" would turn .warn
                # into .warning, which twisted.logger.Logger does not have.
                log.emit(
                    LogLevel.warn,
                    "ignoring a malformed engine event: {line!r}",
                    line=line[:200],
                )
                continue
            if isinstance(event, dict):
                self._on_object(event)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._finished.callback(reason)


class EventStream:
    """
    A running subscription to the engine's C{/events}.

    C{done} fires with C{None} after L{stop}, and fails with
    L{EngineUnreachable} if the stream ends any other way (the engine
    restarted, the socket went away): the caller should then subscribe again,
    after a backoff, passing C{since=stream.last_time} so that no event that
    happened in between is missed.

    @ivar last_time: the C{time} (seconds since the epoch) of the latest event
        received, or C{None}.
    """

    def __init__(self, address: EngineAddress, on_event: Callable[[dict[str, Any]], None]) -> None:
        self._address = address
        self._user_callback = on_event
        self._stopping = False
        self._transport: Any = None
        self.last_time: float | None = None
        self.done: Deferred[None] = Deferred()
        self._lost: Deferred[Failure] = Deferred()
        self._lost.addBoth(self._ended)

    def _deliver(self, event: dict[str, Any]) -> None:
        when = event.get("timeNano")
        if isinstance(when, int):
            self.last_time = when / 1e9
        elif isinstance(event.get("time"), int | float):
            self.last_time = float(event["time"])
        if self._stopping:
            return
        try:
            self._user_callback(event)
        except Exception:
            # One bad handler call must not end the subscription.
            log.failure("the engine event handler raised; the stream goes on")

    def _attach(self, response: IResponse) -> None:
        protocol = _JSONLinesProtocol(self._deliver, self._lost)
        response.deliverBody(protocol)
        self._transport = protocol.transport

    def _ended(self, reason: Failure) -> None:
        if self._stopping:
            self.done.callback(None)
            return
        if reason.check(ResponseDone):
            why = "the engine ended the event stream"
        else:
            why = "the event stream was cut (the engine stopped or restarted?)"
        self.done.errback(EngineUnreachable(self._address.url, why))

    def stop(self) -> Deferred[None]:
        """
        Stop receiving events; the returned Deferred fires once the connection
        is closed (so that nothing is left open on the reactor).
        """
        if not self._stopping:
            self._stopping = True
            if self._transport is not None:
                self._transport.stopProducing()
        result: Deferred[None] = Deferred()

        def finished(outcome: object) -> None:
            # The caller is done with this stream: an earlier loss is moot now.
            result.callback(None)

        self.done.addBoth(finished)
        return result


# --------------------------------------------------------------------------
# The client


class DockerEngine:
    """
    An asynchronous Docker Engine API client.

    @param host: the engine address (see L{parse_engine_host}); C{None} means
        C{$DOCKER_HOST}, else the default Docker socket.
    @param api_version: a fixed API version to speak (e.g. C{"1.41"}); C{None}
        negotiates it on first use.
    @param request_timeout: seconds any single call may take (the stop
        timeout is added for L{stop}); event streams have no timeout.
    """

    def __init__(
        self,
        host: str | None = None,
        *,
        reactor: IReactorTime | None = None,
        api_version: str | None = None,
        request_timeout: float = 30.0,
        connect_timeout: float = 10.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.address = parse_engine_host(host)
        self._reactor = reactor
        self._api_version = api_version
        self._request_timeout = request_timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 4
        self._agent = Agent.usingEndpointFactory(
            reactor,
            _EngineEndpointFactory(reactor, self.address, connect_timeout),
            pool=self._pool,
        )

    # -- plumbing ---------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> Deferred[T]:
        return Deferred.fromCoroutine(coro)

    async def _prefix(self) -> str:
        if self._api_version is None:
            try:
                info = await self._call("GET", "/version", versioned=False)
            except EngineError:
                info = {}
            self._api_version = _negotiate(info if isinstance(info, dict) else {}, DEFAULT_API_VERSION)
        return f"/v{self._api_version}"

    async def _request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        versioned: bool = True,
    ) -> IResponse:
        """Send one request; connection failures become typed errors."""
        prefix = await self._prefix() if versioned else ""
        url = "http://localhost" + prefix + path
        if query:
            url += "?" + urlencode(query)
        headers = Headers({b"User-Agent": [b"hestia"]})
        for attempt in (1, 2):
            producer = None
            if body is not None:
                headers.setRawHeaders(b"Content-Type", [b"application/json"])
                producer = FileBodyProducer(BytesIO(json.dumps(body).encode()))
            try:
                return cast(
                    IResponse,
                    await self._agent.request(method.encode(), url.encode("ascii"), headers, producer),
                )
            except Exception as exc:
                if attempt == 1 and _is_stale_connection(exc):
                    continue
                translated = _translate(self.address, exc)
                if translated is exc:
                    raise
                raise translated from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read(self, response: IResponse) -> bytes:
        try:
            return await _collect_body(response)
        except Exception as exc:
            translated = _translate(self.address, exc)
            if translated is exc:
                raise
            raise translated from None

    async def _call(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        container: str | None = None,
        ok: tuple[int, ...] = (200, 201, 204, 304),
        versioned: bool = True,
        raw: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """
        One complete call: request, read the whole answer, check the status.
        Returns the parsed JSON (or bytes when C{raw}); 404 becomes
        L{NoSuchContainer} when the call is about C{container}.
        """

        async def go() -> Any:
            response = await self._request(method, path, query=query, body=body, versioned=versioned)
            data = await self._read(response)
            if response.code not in ok:
                message = _error_message(data)
                if response.code == 404 and container is not None:
                    raise NoSuchContainer(container, message)
                raise EngineError(response.code, message)
            if raw:
                return data
            if not data.strip():
                return None
            try:
                return json.loads(data)
            except ValueError:
                raise EngineError(response.code, f"unreadable answer: {data[:200]!r}") from None

        limit = timeout if timeout is not None else self._request_timeout
        d = Deferred.fromCoroutine(go())
        d.addTimeout(limit, self._reactor)
        try:
            return await d
        except (DeferredTimeoutError, TwistedTimeoutError, CancelledError):
            raise EngineTimeout(self.address.url, f"no answer within {limit:g} s") from None

    @staticmethod
    def _container_path(container: str, action: str = "") -> str:
        return "/containers/" + quote(container, safe="") + action

    # -- API ----------------------------------------------------------------

    def ping(self) -> Deferred[str]:
        """C{GET /_ping}: the cheapest "is the engine there" check ("OK")."""

        async def go() -> str:
            data = await self._call("GET", "/_ping", versioned=False, raw=True)
            return cast(bytes, data).decode("utf-8", "replace").strip()

        return self._run(go())

    def version(self) -> Deferred[dict[str, Any]]:
        """C{GET /version}; also fixes the API version used from then on."""

        async def go() -> dict[str, Any]:
            info = await self._call("GET", "/version", versioned=False)
            info = info if isinstance(info, dict) else {}
            if self._api_version is None:
                self._api_version = _negotiate(info, DEFAULT_API_VERSION)
            return info

        return self._run(go())

    def inspect(self, container: str) -> Deferred[dict[str, Any]]:
        """The container's full description (C{State.Running}, C{Config}, ...)."""
        return self._run(self._call("GET", self._container_path(container, "/json"), container=container))

    def start(self, container: str) -> Deferred[None]:
        """Start it; an already running container (HTTP 304) is a success."""
        return self._run(self._call("POST", self._container_path(container, "/start"), container=container))

    def stop(self, container: str, timeout: int = 10) -> Deferred[None]:
        """
        Stop it: SIGTERM (or its StopSignal), SIGKILL after C{timeout} seconds.
        An already stopped container (HTTP 304) is a success.
        """
        return self._run(
            self._call(
                "POST",
                self._container_path(container, "/stop"),
                query={"t": str(int(timeout))},
                container=container,
                timeout=self._request_timeout + timeout,
            )
        )

    def pause(self, container: str) -> Deferred[None]:
        """Freeze all its processes (cgroup freezer); memory stays allocated."""
        return self._run(self._call("POST", self._container_path(container, "/pause"), container=container))

    def unpause(self, container: str) -> Deferred[None]:
        """Thaw a paused container."""
        return self._run(self._call("POST", self._container_path(container, "/unpause"), container=container))

    def logs(self, container: str, tail: int = 50) -> Deferred[list[str]]:
        """
        The last C{tail} lines of its stdout and stderr, oldest first.

        Asks C{inspect} whether the container has a TTY: without one the body
        is multiplexed (see L{demultiplex}), with one it is raw text, and
        guessing from the bytes could mangle a raw log that happens to start
        with a 0, 1 or 2 byte.
        """

        async def go() -> list[str]:
            info = await self._call("GET", self._container_path(container, "/json"), container=container)
            tty = bool((info or {}).get("Config", {}).get("Tty"))
            data = await self._call(
                "GET",
                self._container_path(container, "/logs"),
                query={"stdout": "1", "stderr": "1", "tail": str(int(tail))},
                container=container,
                raw=True,
            )
            frames = [(1, data)] if tty else demultiplex(data)
            return _split_lines(frames)

        return self._run(go())

    def list_containers(
        self,
        filters: Mapping[str, str | Iterable[str]] | None = None,
        all: bool = True,
    ) -> Deferred[list[dict[str, Any]]]:
        """
        Containers matching C{filters} (e.g. C{{"label": ["hestia.enable=true"]}}),
        stopped ones too unless C{all} is false.
        """
        query = {"all": "1" if all else "0"}
        encoded = _normalise_filters(filters)
        if encoded:
            query["filters"] = encoded

        async def go() -> list[dict[str, Any]]:
            result = await self._call("GET", "/containers/json", query=query)
            return list(result or [])

        return self._run(go())

    def create(self, name: str, config: Mapping[str, Any]) -> Deferred[str]:
        """
        Create a container named C{name} from a C{POST /containers/create}
        body (C{Image}, C{Cmd}, C{Labels}, C{HostConfig}, ...); returns its id.
        """

        async def go() -> str:
            result = await self._call("POST", "/containers/create", query={"name": name}, body=dict(config))
            return str(result["Id"])

        return self._run(go())

    def remove(self, container: str, force: bool = False) -> Deferred[None]:
        """Delete it (C{force} kills it first if running), with its anonymous volumes."""
        return self._run(
            self._call(
                "DELETE",
                self._container_path(container),
                query={"force": "1" if force else "0", "v": "1"},
                container=container,
            )
        )

    def events(
        self,
        filters: Mapping[str, str | Iterable[str]] | None,
        on_event: Callable[[dict[str, Any]], None],
        since: float | None = None,
    ) -> Deferred[EventStream]:
        """
        Subscribe to C{/events}: C{on_event} is called with each event dict
        (C{Type}, C{Action}, C{Actor.ID}, C{Actor.Attributes.name}, ...) as
        it arrives. Fires with the L{EventStream} once the engine has accepted
        the subscription, so that events caused afterwards are not missed.

        Podman 4 reports a stopped container as C{die} (then C{cleanup}),
        without Docker's C{stop}/C{kill}: treat C{die} as "no longer running".
        """
        query: dict[str, str] = {}
        encoded = _normalise_filters(filters)
        if encoded:
            query["filters"] = encoded
        if since is not None:
            query["since"] = f"{since:.9f}".rstrip("0").rstrip(".")

        async def go() -> EventStream:
            stream = EventStream(self.address, on_event)
            d = Deferred.fromCoroutine(self._request("GET", "/events", query=query))
            d.addTimeout(self._request_timeout, self._reactor)
            try:
                response = await d
            except (DeferredTimeoutError, TwistedTimeoutError, CancelledError):
                raise EngineTimeout(self.address.url, "the event stream did not start") from None
            if response.code != 200:
                raise EngineError(response.code, _error_message(await self._read(response)))
            stream._attach(response)
            return stream

        return self._run(go())

    def close(self) -> Deferred[None]:
        """Close the pooled idle connections (call on shutdown, and in tests)."""
        return cast(Deferred[None], defer.maybeDeferred(self._pool.closeCachedConnections))
