"""
Upstream doubles: L{IAgent}s that misbehave as backends do (re-exported by L{hestia.testing}).

Each wraps an inner agent (usually the L{treq.testing.RequestTraversalAgent}
of a L{hestia.testing.MemoryGateway}) and misbehaves for the first C{times}
requests (C{None}: every one), optionally only for the URLs starting with one
of C{only} (one instance of several), then hands requests to the inner agent:

 - L{RefusingAgent}: the connect is refused (C{ConnectionRefusedError}).
 - L{FlakyAgent}: the connects fail with the errors listed, in order.
 - L{StallingAgent}: the request is taken and never answered; its L{Deferred}
   fires only when cancelled (as the proxy's C{response_timeout} does).
 - L{TruncatingAgent}: the response head arrives, then the body is cut after
   C{after} bytes (C{ResponseFailed}, or C{PotentialDataLoss} if asked).
 - L{ResettingAgent}: the connection is reset before any response
   (C{ResponseNeverReceived}).

Example (with L{hestia.testing.MemoryGateway})::

    memory = MemoryGateway({"web": {"url": "http://backend:8000", "response_timeout": 5}},
                           agent=lambda inner: StallingAgent(inner, times=1))
    answer = memory.get("/services/web/")
    memory.advance(5)
    assert memory.result(answer).code == 504  # the stalled request, cancelled
    assert memory.agent.cancelled == 1
    assert memory.result(memory.get("/services/web/")).code == 200  # the next one passes

Each records every URL it was asked for (C{asked}) and how many requests it
spoiled (C{spoiled}).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

ErrorFactory = Callable[[], Exception]


def _refused() -> Exception:
    return ConnectionRefusedError("refused")


def _cut(after: int) -> Exception:
    return ResponseFailed([Failure(ConnectionLost(f"the backend cut the body after {after} bytes"))])


def _reset() -> Exception:
    return ResponseNeverReceived([Failure(ConnectionLost("Connection reset by peer"))])


class _Misbehaving:
    """What every double shares: which requests it spoils, and what it was asked."""

    def __init__(self, inner: IAgent | None, times: int | None, only: Iterable[bytes | str] | None) -> None:
        if inner is None and times is not None:
            raise ValueError("a double that behaves after `times` requests needs an inner agent")
        self.inner = inner
        self.times = times
        self.only = None if only is None else tuple(p.encode() if isinstance(p, str) else p for p in only)
        self.asked: list[bytes] = []
        self.spoiled = 0

    def _spoils(self, uri: bytes) -> bool:
        """Whether the request for C{uri} (which is recorded) is to be spoiled: counts it if so."""
        self.asked.append(uri)
        if self.only is not None and not uri.startswith(self.only):
            return False
        if self.times is not None and self.spoiled >= self.times:
            return False
        self.spoiled += 1
        return True

    def _pass_on(self, method: bytes, uri: bytes, headers: Headers | None,
                 body: IBodyProducer | None) -> Deferred[IResponse]:
        if self.inner is None:
            raise AssertionError(f"no inner agent to send {method!r} {uri!r} to")
        answer: Deferred[IResponse] = self.inner.request(method, uri, headers, body)
        return answer


@implementer(IAgent)
class RefusingAgent(_Misbehaving):
    """
    Connects that are refused: nothing listens at the backend's port.

    @param error: what the failed connect raises (C{ConnectionRefusedError} by default).
    """

    def __init__(self, inner: IAgent | None = None, times: int | None = None, *,
                 only: Iterable[bytes | str] | None = None, error: ErrorFactory = _refused) -> None:
        super().__init__(inner, times, only)
        self.error = error

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        if self._spoils(uri):
            return fail(self.error())
        return self._pass_on(method, uri, headers, bodyProducer)


@implementer(IAgent)
class FlakyAgent(_Misbehaving):
    """Connects that fail with each of C{failures} once, in order (a backend still binding its port), then work."""

    def __init__(self, inner: IAgent, failures: Iterable[ErrorFactory], *,
                 only: Iterable[bytes | str] | None = None) -> None:
        self.failures = list(failures)
        super().__init__(inner, len(self.failures), only)

    @property
    def attempts(self) -> int:
        """Every request asked of it, failed or passed on."""
        return len(self.asked)

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        if self._spoils(uri):
            return fail(self.failures[self.spoiled - 1]())
        return self._pass_on(method, uri, headers, bodyProducer)


@implementer(IAgent)
class StallingAgent(_Misbehaving):
    """
    A backend that takes the request and never answers.

    The L{Deferred} of a stalled request never fires by itself: cancelling it
    (the proxy does at C{response_timeout}, or when the client leaves) fails it
    with L{CancelledError} and counts in C{cancelled}.

    @ivar sent: the stalled requests' Deferreds, in order.
    """

    def __init__(self, inner: IAgent | None = None, times: int | None = None, *,
                 only: Iterable[bytes | str] | None = None) -> None:
        super().__init__(inner, times, only)
        self.sent: list[Deferred[IResponse]] = []
        self.cancelled = 0

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        if not self._spoils(uri):
            return self._pass_on(method, uri, headers, bodyProducer)

        def cancel(_: Deferred[IResponse]) -> None:
            # Returning without firing it makes Deferred.cancel fail it with CancelledError.
            self.cancelled += 1

        stalled: Deferred[IResponse] = Deferred(cancel)
        self.sent.append(stalled)
        return stalled

    @property
    def pending(self) -> int:
        """Stalled requests neither answered nor cancelled."""
        return sum(1 for stalled in self.sent if not stalled.called)


@implementer(IAgent)
class ResettingAgent(RefusingAgent):
    """
    A backend that accepts the connection and resets it before any response.

    Unlike a refused connect the request may have reached the backend, so the
    proxy must not retry it.

    @param error: what the broken request fails with (a reset connection by default).
    """

    def __init__(self, inner: IAgent | None = None, times: int | None = None, *,
                 only: Iterable[bytes | str] | None = None, error: ErrorFactory = _reset) -> None:
        super().__init__(inner, times, only=only, error=error)


@implementer(IAgent)
class TruncatingAgent(_Misbehaving):
    """
    A backend whose response body stops short: the head, C{after} bytes, then a broken connection.

    @param error: how the body ends, given C{after}: by default a
        C{ResponseFailed} (a connection lost before the body's announced end);
        C{lambda after: PotentialDataLoss()} is the end of a body whose length
        was never announced, which no one can tell from a whole one.
    @ivar cut: the bytes of each cut body that were let through.
    """

    def __init__(self, inner: IAgent, after: int = 0, times: int | None = None, *,
                 only: Iterable[bytes | str] | None = None,
                 error: Callable[[int], Exception] = _cut) -> None:
        super().__init__(inner, times, only)
        self.after = after
        self.error = error
        self.cut: list[bytes] = []

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        answer = self._pass_on(method, uri, headers, bodyProducer)
        if not self._spoils(uri):
            return answer
        return answer.addCallback(self._truncated)

    def _truncated(self, response: IResponse) -> IResponse:
        let_through = bytearray()
        self.cut.append(b"")
        index = len(self.cut) - 1

        def note(data: bytes) -> None:
            let_through.extend(data)
            self.cut[index] = bytes(let_through)

        return TruncatedResponse(response, self.after, self.error(self.after), note)


@implementer(IResponse)
class TruncatedResponse:
    """An L{IResponse} whose body is the inner response's first C{after} bytes, then C{error}."""

    def __init__(self, inner: IResponse, after: int, error: Exception,
                 note: Callable[[bytes], None] = lambda data: None) -> None:
        self._inner = inner
        self._after = after
        self._error = error
        self._note = note
        self.version = inner.version
        self.code = inner.code
        self.phrase = inner.phrase
        self.headers = inner.headers
        self.length = inner.length
        self.request = inner.request
        self.previousResponse = inner.previousResponse

    def deliverBody(self, protocol: IProtocol) -> None:
        self._inner.deliverBody(_Cutter(protocol, self._after, self._error, self._note))

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response


class _Cutter(Protocol):
    """Relays the first C{after} bytes of a body to C{target}, then drops the connection and fails the body."""

    def __init__(self, target: IProtocol, after: int, error: Exception, note: Callable[[bytes], None]) -> None:
        self._target = target
        self._left = after
        self._error = error
        self._note = note
        self._ended = False

    def connectionMade(self) -> None:
        # The target gets the real body transport: pausing and stopping it reach the backend.
        assert self.transport is not None
        self._target.makeConnection(self.transport)
        if self._left == 0:
            self._cut()

    def dataReceived(self, data: bytes) -> None:
        if self._ended:
            return
        piece = data[: self._left]
        self._left -= len(piece)
        if piece:
            self._note(piece)
            self._target.dataReceived(piece)
        if self._left == 0:
            self._cut()

    def _cut(self) -> None:
        self._ended = True
        stop: Any = getattr(self.transport, "stopProducing", None)
        if stop is not None:
            stop()  # the backend connection goes away, as a real cut one does
        self._target.connectionLost(Failure(self._error))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._ended:  # a body shorter than `after` ends as the backend ended it
            self._ended = True
            self._target.connectionLost(reason)
