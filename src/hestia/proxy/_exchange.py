"""
One proxied request: its lease, its turn in the backend's window, the forwarding,
the streamed answer, its timers and its end (L{Exchange}).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ConnectionRefusedError, TimeoutError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone, ResponseFailed, readBody
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.server import Request
from zope.interface import implementer

from hestia.admission import CONNECT_RETRY, Admission
from hestia.errors import (
    GatewayError,
    QueueFull,
    ResponseTimedOut,
    UpstreamUnreachable,
    in_instance,
)
from hestia.headers import (
    HOP_BY_HOP,
    connection_tokens,
    headers_for_backend,
    join_url,
)
from hestia.interfaces import ILease, IRequestExchange
from hestia.proxy._errors import write_error
from hestia.records import RequestRecord, credentials_of
from hestia.routing import Route, RouteRequest
from hestia.tunnel import Tunnel, is_upgrade, open_tunnel

if TYPE_CHECKING:
    from hestia.gateway import Gateway

log = Logger(namespace="hestia.proxy")


_BODY_HEADERS = (b"content-length", b"transfer-encoding")


class RequestBody(FileBodyProducer):
    """
    The client's (buffered) body on its way to the backend, stoppable at any time.

    A backend may answer before it has read the whole body (a 413, a 401, or
    at once to a C{Content-Length: 0}); the client's request then finishes and
    Twisted closes the buffer under a producer that is still reading it, which
    ends in a logged traceback.  L{halt} stops it first.
    """

    _started = False

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self._started = True
        return super().startProducing(consumer)

    def halt(self) -> None:
        if self._started:
            self.stopProducing()  # Quiet: FileBodyProducer swallows its own TaskStopped.


class _BodyRelay(Protocol):
    """Copies the backend's body to the client as it arrives."""

    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange

    def connectionMade(self) -> None:
        # The backend transport is a push producer: the client's channel pauses
        # it when its write buffer fills, which pauses reading from the backend.
        self._exchange.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self._exchange.body_received(data)

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        self._exchange.body_ended(reason)


@implementer(IRequestExchange)
class Exchange:
    """One client request, from arrival to the last byte of its response."""

    def __init__(
        self,
        gateway: Gateway,
        lifecycle: Route,
        request: Request,
        rest: bytes,
        request_id: bytes,
        prefix: bytes | None = None,
        loading_events: bool = False,
    ) -> None:
        """
        @param lifecycle: the service's route (L{hestia.routing.Route}): its
            lifecycle, or a route that picks an instance or target per request.
        @param prefix: sent as C{X-Forwarded-Prefix}; by default
            C{/services/<name>}, empty for a host-routed request.
        @param loading_events: a streaming OpenAI request (issue 17): if it
            has to wait for a start, its SSE headers go out at once, then a
            keep-alive comment every L{KEEP_ALIVE} seconds, so that a chat
            front end does not time out; a failed start ends it with an error
            event in OpenAI's shape.
        """
        self.gateway = gateway
        self.lifecycle = lifecycle
        self.request = request
        self.rest = rest
        self.request_id = request_id
        self.prefix = b"/services/" + lifecycle.name.encode("ascii") if prefix is None else prefix
        self._pending: Deferred[Any] | None = None
        self._relay: _BodyRelay | None = None
        self._lease: ILease | None = None
        self._gone = False
        self._tunnelled = False
        self._tunnel: Tunnel | None = None
        self._body: RequestBody | None = None
        # The turn with the backend this request holds (hestia.admission).
        self._admission: Admission | None = None
        self._backend_headers: list[tuple[bytes, list[bytes]]] = []
        self._attempt = 0  # connect attempts made so far, less one
        self._refused_since: float | None = None
        # The response_timeout timer until the head arrives, then the
        # response_idle_timeout one while the body streams.
        self._response_timer: IDelayedCall | None = None
        self._body_at = 0.0
        # A 504 for response_timeout went out: the cancelled backend request's
        # own failure must not answer again.
        self._answered_by_gateway = False
        self._forwarded_at = 0.0
        self.loading_events = loading_events
        self._early = False  # the client has its headers already (loading events)
        self._keep_alive: LoopingCall | None = None
        now = gateway.reactor.seconds()
        self.record = RequestRecord(
            request_id=request_id.decode("ascii"),
            service=lifecycle.name,
            method=request.method.decode("ascii", "replace"),
            path=request.uri.decode("ascii", "replace"),
            client=_client_ip(request),
            began=now,
            token_name=credentials_of(request).token_name,
        )

    def begin(self) -> None:
        self._begin(self.lifecycle.acquire(RouteRequest(self.request, self.rest, self.record.began)))

    def begin_passive(self) -> bool:
        """
        Forward a monitor's request if the service is ready (L{hestia.passive}).

        @return: C{False}, having done nothing, when it is not ready.
        """
        waiting = self.lifecycle.acquire_passive(RouteRequest(self.request, self.rest, self.record.began))
        if waiting is None:
            return False
        self._begin(waiting)
        return True

    def _begin(self, waiting: Deferred[Any]) -> None:
        self.request.notifyFinish().addBoth(self._finished)
        self.gateway.request_began(self)
        if waiting.called and ILease.providedBy(waiting.result):
            # A ready service leases at once (the warm path): go straight on.
            self._forward(waiting.result)
            return
        self._pending = waiting
        if self.loading_events and not waiting.called:  # held for a start (an at-once refusal stays plain JSON)
            self._open_early()
        waiting.addCallbacks(self._forward, self._failed)

    # -- loading events (issue 17) ---------------------------------------------

    KEEP_ALIVE = 2.0

    def _open_early(self) -> None:
        request = self.request
        self._early = True
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/event-stream"])
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-cache"])
        request.responseHeaders.setRawHeaders(b"x-request-id", [self.request_id])
        request.responseHeaders.setRawHeaders(b"x-hestia-state", [b"starting"])
        request.responseHeaders.removeHeader(b"server")
        request.write(b": hestia: the model is loading\n\n")
        keep_alive = self._keep_alive = LoopingCall(self._send_keep_alive)
        keep_alive.clock = self.gateway.reactor
        keep_alive.start(self.KEEP_ALIVE, now=False)

    def _send_keep_alive(self) -> None:
        if not self._gone:
            self.request.write(b": hestia: still loading\n\n")

    def _stop_keep_alive(self) -> None:
        keep_alive, self._keep_alive = self._keep_alive, None
        if keep_alive is not None and keep_alive.running:
            keep_alive.stop()

    def _end_with_error_event(self, message: str, kind: str = "server_error", code: str | None = None,
                              error: Any = None) -> None:
        """End an early-opened stream the way OpenAI ends one that failed: an error event."""
        self._stop_keep_alive()
        if self._gone:
            return
        if not isinstance(error, dict):
            error = {"message": message, "type": kind, "param": None, "code": code}
        self.request.write(b"data: " + json.dumps({"error": error}).encode("utf-8") + b"\n\n")
        self.request.finish()

    # -- forwarding ------------------------------------------------------------

    def _forward(self, lease: ILease) -> None:
        self._pending = None
        self._stop_keep_alive()
        self._lease = lease
        now = self.gateway.reactor.seconds()
        self.record.queued = now - self.record.began
        self.record.leased = True
        if self._gone:
            lease.release()
            return
        request = self.request
        headers = headers_for_backend(
            request.requestHeaders.getAllRawHeaders(),
            client_ip=self.record.client,
            scheme=b"https" if request.isSecure() else b"http",
            host=request.getHeader(b"host"),
            prefix=self.prefix,
            request_id=self.request_id,
            drop=credentials_of(request).consumed,
        )
        if is_upgrade(request):
            self._open_tunnel(lease, headers)
            return
        self._backend_headers = headers
        self._take_turn(self.gateway.upstream.admission(lease.url, self.lifecycle))

    # -- turns with the backend (issue 13: hestia.admission) -------------------------

    def _queue_deadline(self) -> float | None:
        """When this request's time in the queue ends: arrival + the serving service's C{queue_timeout}."""
        timeout = (self.lifecycle.config if self._lease is None else self._lease.config).queue_timeout
        return self.record.began + timeout if timeout > 0 else None

    def _take_turn(self, admission: Admission, first: bool = False) -> None:
        """
        Send the request once the backend's admission window has room.

        @param first: a retry after a failed connect, which goes back to the
            head of the queue (it was first in line already).
        """
        if not first and admission.try_take():
            # Room, and nobody waiting before us: the warm path, no Deferred.
            self._send(admission)
            return
        try:
            turn = admission.wait(self._queue_deadline(), first=first)
        except QueueFull as full:
            self._failed(Failure(full))
            return
        if turn.called:
            self._send(admission)
            return
        self._pending = turn
        turn.addCallbacks(lambda _: self._send(admission), self._failed)

    def _send(self, admission: Admission) -> None:
        self._pending = None
        self._admission = admission
        if self._gone:
            self._release_slot()
            return
        lease = self._lease
        assert lease is not None
        request = self.request
        body = None
        if any(request.requestHeaders.hasHeader(name) for name in _BODY_HEADERS):
            assert request.content is not None  # Twisted buffers every request body.
            request.content.seek(0)  # a fresh producer per attempt (a retried connect)
            body = self._body = RequestBody(request.content, cooperator=self.gateway.cooperator)
        reactor = self.gateway.reactor
        self._forwarded_at = reactor.seconds()
        if self.record.slot_wait is None:
            self.record.slot_wait = self._forwarded_at - self.record.began - self.record.queued
        sending = self.gateway.upstream.agent_for_attempt(self._attempt).request(
            request.method, join_url(lease.url, self.rest), Headers(dict(self._backend_headers)), body
        )
        timeout = lease.config.response_timeout  # the serving service's, not a router's
        if timeout > 0 and not sending.called:
            self._response_timer = reactor.callLater(timeout, self._response_timed_out, timeout)
        self._pending = sending
        sending.addCallbacks(self._respond, self._failed)

    def _release_slot(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission.release()

    def _cancel_response_timer(self) -> None:
        timer, self._response_timer = self._response_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _response_timed_out(self, timeout: float) -> None:
        """
        No response head within C{response_timeout}: answer 504, cancel the
        backend request (which closes its connection) and free the slot.
        """
        self._response_timer = None
        sending, self._pending = self._pending, None
        self._release_slot()
        self._answer_response_timeout(timeout)
        if sending is not None:
            sending.cancel()

    def _answer_response_timeout(self, timeout: float) -> None:
        self._answered_by_gateway = True
        error = ResponseTimedOut(
            f"backend sent no response within response_timeout {timeout:g}s",
            service=self.lifecycle.name,
            state=self.lifecycle.state.value,
        )
        self.record.status = error.status
        self.record.error = error.reason
        self.record.error_kind = "response_timeout"
        log.warn("{service}: no response within {timeout}s to {method} {path}: answered 504",
                 service=self.lifecycle.name, timeout=timeout, method=self.record.method, path=self.record.path)
        if self._early:  # loading events: the stream is open, its end says why
            self._end_with_error_event(error.reason, code=type(error).__name__)
            return
        write_error(self.request, error, self.request_id)

    def _retry_connect(self, failure: Failure) -> bool:
        """
        Try again a connect that failed, while the request's queue time lasts.

        The request never reached the backend, so this is safe whatever its
        method (L{hestia.admission.ConnectRetry} has the rule).
        """
        if self._lease is None or self._tunnelled:
            return False
        now = self.gateway.reactor.seconds()
        if self._refused_since is None and _refused(failure):
            self._refused_since = now
        pause = CONNECT_RETRY.next_attempt(self._attempt, now, self._queue_deadline(), self._refused_since)
        if pause is None:
            return False
        self._attempt += 1
        self.record.connect_retries += 1
        admission = self.gateway.upstream.admission(self._lease.url, self.lifecycle)
        waiting = deferLater(self.gateway.reactor, pause, lambda: None)
        self._pending = waiting
        waiting.addCallbacks(lambda _: self._take_turn(admission, first=True), self._failed)
        return True

    def _open_tunnel(self, lease: ILease, headers: list[tuple[bytes, list[bytes]]]) -> None:
        """
        Send an upgrade request (a WebSocket) on a connection of its own.

        Only the backend's C{101} makes it a tunnel (L{hestia.tunnel}): from
        then on Twisted's channel no longer owns the client connection, so the
        tunnel's end, not C{notifyFinish}, releases the lease.  Any other
        answer is relayed as a normal response and the request ends as usual.
        """

        def closed(status: int | None, sent: int) -> None:
            self._cancel_response_timer()
            now = self.gateway.reactor.seconds()
            self.record.status = status
            self.record.bytes = sent
            self.record.upstream = now - self._forwarded_at
            self.record.duration = now - self.record.began
            self._gone = True
            self._tunnel = None
            lease.release()
            self.gateway.request_ended(self)

        def refused(status: int) -> None:
            # A normal response after all: notifyFinish ends it.  Its body has
            # the same silence limit as any response body's (nothing waits forever).
            self._cancel_response_timer()
            self._start_body_idle_timer()
            self._tunnelled = False
            self.record.status = status
            self.record.upstream = self.gateway.reactor.seconds() - self._forwarded_at
            self.request.responseHeaders.setRawHeaders(b"x-request-id", [self.request_id])

        def unreachable(failure: Failure) -> None:
            # The client connection is still Twisted's: answer 502 the usual way.
            self._cancel_response_timer()
            self._tunnelled = False
            self._tunnel = None
            self._failed(failure)

        def undecided(timeout: float) -> None:
            # No 101 and no other answer within response_timeout (issue 12,
            # hole 4): drop the backend connection and answer 504.
            self._response_timer = None
            tunnel = self._tunnel
            if tunnel is None or tunnel.switched or tunnel.status is not None:
                return
            tunnel.abort()
            self._tunnelled = False
            self._tunnel = None
            self._answer_response_timeout(timeout)

        self._tunnelled = True
        self._forwarded_at = self.gateway.reactor.seconds()
        endpoint = self.gateway.upstream.upgrade_endpoint(lease.url)
        self._tunnel = open_tunnel(endpoint, lease.url, self.request, self.rest,
                                   headers, closed, unreachable, refused, self._note_body)
        timeout = lease.config.response_timeout
        if timeout > 0 and self._tunnel is not None and self._tunnelled:
            self._response_timer = self.gateway.reactor.callLater(timeout, undecided, timeout)

    def _start_body_idle_timer(self) -> None:
        idle = (self.lifecycle.config if self._lease is None else self._lease.config).response_idle_timeout
        if idle > 0 and not self._gone:
            # One timer for the whole body: each piece only notes the time,
            # and the timer, when due, waits out the rest of the period.
            self._body_at = self.gateway.reactor.seconds()
            self._response_timer = self.gateway.reactor.callLater(idle, self._body_idle, idle)

    def _note_body(self, data: bytes) -> None:
        self._body_at = self.gateway.reactor.seconds()

    def _respond(self, response: IResponse) -> None:
        self._pending = None
        self._cancel_response_timer()
        self._start_body_idle_timer()
        if self._admission is not None:
            self._admission.answered()
        self.record.upstream = self.gateway.reactor.seconds() - self._forwarded_at
        self.record.status = response.code
        request = self.request
        if self._gone:
            response.deliverBody(Protocol())  # Read nothing; drops the connection.
            self._release_slot()
            return
        if self._early:
            if response.code == 200:
                self._relay = _BodyRelay(self)  # the client has its headers: the body follows
                response.deliverBody(self._relay)
            else:
                readBody(response).addCallbacks(lambda body: self._backend_refused(response.code, body),
                                                lambda failure: self._backend_refused(response.code, b""))
            return
        request.setResponseCode(response.code, response.phrase)
        # Twisted would add "Content-Type: text/html" to a response without
        # one; the backend's response goes out as the backend sent it.
        request.defaultContentType = None
        connection = getattr(response, "connection_headers", None)  # see gateway._ClientProtocol
        request.responseHeaders = _client_headers(request.responseHeaders, response.headers, connection)
        if connection is not None and (length := connection.getRawHeaders(b"content-length")):
            # Twisted's client files Content-Length with the connection headers:
            # without this the client would get a chunked body of unknown size.
            request.responseHeaders.setRawHeaders(b"content-length", length[-1:])
        request.responseHeaders.setRawHeaders(b"x-request-id", [self.request_id])
        self._relay = _BodyRelay(self)
        response.deliverBody(self._relay)

    def body_received(self, data: bytes) -> None:
        if not self._gone:
            self.record.bytes += len(data)
            self._body_at = self.gateway.reactor.seconds()
            self.request.write(data)

    def _body_idle(self, idle: float) -> None:
        """No byte moved for C{response_idle_timeout}: cut both connections (issue 12: nothing waits forever)."""
        self._response_timer = None
        silent = self.gateway.reactor.seconds() - self._body_at
        if silent < idle:
            self._response_timer = self.gateway.reactor.callLater(idle - silent, self._body_idle, idle)
            return
        self.record.error = f"response body silent for response_idle_timeout {idle:g}s"
        self.record.error_kind = "truncated"
        log.warn("{service}: response body to {method} {path} silent for {idle}s: cut",
                 service=self.lifecycle.name, idle=idle, method=self.record.method, path=self.record.path)
        relay = self._relay
        if relay is not None and relay.transport is not None:
            cast(Any, relay.transport).stopProducing()  # drops the backend connection
        tunnel = self._tunnel
        if tunnel is not None and not tunnel.switched:
            tunnel.abort()  # A refused upgrade's relayed answer: its own backend connection.
        self.request.loseConnection()

    def body_ended(self, reason: Failure) -> None:
        self._relay = None
        self._cancel_response_timer()
        self._release_slot()
        if self._gone:
            return
        self.request.unregisterProducer()
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):  # cheaper than Failure.check
            self.request.finish()
        else:
            # The backend broke off mid-body: cut the client off too, so that it
            # does not take a truncated body for a whole one.
            self.record.error = self.record.error or f"backend broke off the response: {reason.getErrorMessage()}"
            self.record.error_kind = "truncated"
            self.request.loseConnection()

    def _backend_refused(self, code: int, body: bytes) -> None:
        """The backend answered an early-opened stream with an error: pass it on as an event."""
        self._cancel_response_timer()
        self._release_slot()
        try:
            error = json.loads(body).get("error")
        except (ValueError, AttributeError):
            error = None
        text = body.decode("utf-8", "replace")[:500]
        self._end_with_error_event(f"backend answered {code}: {text}", error=error)

    # -- failures and endings -------------------------------------------------------

    def _failed(self, failure: Failure) -> None:
        self._pending = None
        self._cancel_response_timer()
        connect_failed = self._admission is not None and _connect_failure(failure)
        if connect_failed:
            assert self._admission is not None
            self._admission.connect_failed()
        self._release_slot()
        if self._gone or self._answered_by_gateway or failure.check(CancelledError):
            return
        if self._fail_over(failure):
            return
        if connect_failed and self._retry_connect(failure):
            return
        error = failure.value
        if not isinstance(error, GatewayError):
            error = self._upstream_error(failure)
        if error.service is not None and error.service not in self.gateway.services:
            # An instance's own error (its start, its queue, its admission window) names the
            # instance, which /v1 does not know: name the service asked for, and the instance.
            error = in_instance(error, self.lifecycle.name)
        self.record.status = error.status
        self.record.error = error.reason
        self.record.error_kind = self.record.error_kind or type(error).__name__
        if self._early:
            self._end_with_error_event(f"{error.service or self.lifecycle.name}: {error.reason}",
                                       code=type(error).__name__)
            return
        write_error(self.request, error, self.request_id)

    def _fail_over(self, failure: Failure) -> bool:
        """
        Try another instance when a ready one refused the connection.

        Only for a connect failure: the request never reached the backend, so
        sending it elsewhere is safe whatever its method.  Only the routes of
        strategies that retry (failover, prefer-warm) offer a fallback.
        """
        lease = self._lease
        fallback = lease.fallback if lease is not None else None
        if fallback is None or self._tunnelled or not failure.check(ConnectError, TimeoutError):
            return False
        assert lease is not None
        self._lease = None
        lease.release()
        log.info("{service}: {url} refused the connection, trying the next instance",
                 service=self.lifecycle.name, url=lease.url)
        waiting = fallback()
        self._pending = waiting
        waiting.addCallbacks(self._forward, self._failed)
        return True

    def _upstream_error(self, failure: Failure) -> GatewayError:
        reason = _describe_upstream_failure(failure)
        self.record.error_kind = "connect" if _connect_failure(failure) else "upstream"
        return UpstreamUnreachable(
            f"backend unreachable: {reason}",
            service=self.lifecycle.name,
            state=self.lifecycle.state.value,
            detail=self.lifecycle.backend.recent_output()[-20:],
        )

    def _finished(self, result: object) -> None:
        """The response is complete, or the client went away: clean up."""
        if self._tunnelled and not isinstance(result, Failure):
            return  # The tunnel's own end does this.
        self._stop_keep_alive()
        self._cancel_response_timer()
        if self._tunnel is not None and not self._tunnelled:
            self.record.bytes = self._tunnel.bytes_to_client  # A refused upgrade, relayed.
        body, self._body = self._body, None
        if body is not None:
            body.halt()
        if isinstance(result, Failure):
            self._gone = True
            pending, self._pending = self._pending, None
            if pending is not None:
                pending.cancel()
            if self._relay is not None and self._relay.transport is not None:
                # A TransportProxyProducer: stopping it drops the backend connection.
                cast(Any, self._relay.transport).stopProducing()
            tunnel, self._tunnel = self._tunnel, None
            if tunnel is not None and not tunnel.switched:
                tunnel.abort()  # An upgrade request the backend has not answered yet.
            self.record.error = self.record.error or "client went away"
            self.record.error_kind = self.record.error_kind or "client_gone"
        self._release_slot()
        if self._lease is not None:
            self._lease.release()
        self.record.duration = self.gateway.reactor.seconds() - self.record.began
        self.gateway.request_ended(self)


def _client_headers(gateway_set: Headers, backend: Headers, connection: Headers | None) -> Headers:
    """
    The response headers for the client: the backend's end-to-end ones.

    The rule is L{headers_for_client}'s (the Hypothesis-tested one); this is
    its fast form for the hot path.  The backend's L{Headers} object is reused
    rather than copied header by header (nothing reads the backend response's
    headers after this), dropping hop-by-hop names and those its
    C{Connection} lists.  Headers the gateway had set are kept where the
    backend sent none of the same name, except Twisted's default C{Server}
    and C{Date}: the backend's own (or none) are the truthful ones.
    """
    listed = list(backend.getRawHeaders(b"connection", ()))
    if connection is not None:
        listed.extend(connection.getRawHeaders(b"connection", ()))
    drop = HOP_BY_HOP | connection_tokens([(b"connection", listed)]) if listed else HOP_BY_HOP
    for name, _ in list(backend.getAllRawHeaders()):
        if name.lower() in drop:
            backend.removeHeader(name)
    for name, values in gateway_set.getAllRawHeaders():
        if name.lower() not in _TWISTED_DEFAULTS and not backend.hasHeader(name):
            backend.setRawHeaders(name, values)
    return backend


_TWISTED_DEFAULTS = frozenset({b"server", b"date"})


def _connect_failure(failure: Failure) -> bool:
    """Whether the backend could not be reached at all (as opposed to failing a reply)."""
    # ResponseNeverReceived is a ResponseFailed: one check covers both.
    if failure.check(ResponseFailed):
        return any(_connect_failure(reason) for reason in getattr(failure.value, "reasons", []))
    return failure.check(ConnectError, TimeoutError) is not None


def _refused(failure: Failure) -> bool:
    """Whether a connect failure was a refusal (nothing listens), not a timeout."""
    if failure.check(ResponseFailed):
        return any(_refused(reason) for reason in getattr(failure.value, "reasons", []))
    return failure.check(ConnectionRefusedError) is not None


def _describe_upstream_failure(failure: Failure) -> str:
    if failure.check(ResponseFailed):
        reasons = getattr(failure.value, "reasons", [])
        if reasons:
            return "; ".join(_describe_upstream_failure(reason) for reason in reasons)
    if failure.check(ConnectionRefusedError):
        return "connection refused"
    if failure.check(TimeoutError):
        return "connect timed out"
    if failure.check(ConnectError):
        return f"cannot connect: {failure.getErrorMessage()}"
    return failure.getErrorMessage()


def _client_ip(request: Request) -> str:
    address = request.getClientAddress()
    return str(getattr(address, "host", "unix"))
