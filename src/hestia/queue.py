"""
The bounded queue that holds requests while their service starts.

Each waiting request owns one L{Deferred}.  The queue fires them all at once
when the service becomes ready ("one start serves all waiters"), fails them all
when the start fails, and drops a waiter the moment its client leaves (the
proxy cancels the Deferred).  Its bound protects the gateway: a request beyond
C{limit} is refused at once with L{QueueFull} rather than held.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from hestia.errors import GatewayError, QueueFull, QueueTimedOut, Where


class _Waiter:
    __slots__ = ("deferred", "enqueued_at", "timer")

    def __init__(self, deferred: Deferred[None], timer: IDelayedCall | None, enqueued_at: float) -> None:
        self.deferred = deferred
        self.timer = timer
        self.enqueued_at = enqueued_at


class WaitQueue:
    """
    Requests waiting for one service instance, oldest first.

    @ivar limit: how many may wait at once.
    """

    def __init__(self, reactor: IReactorTime, limit: int, describe: Callable[[], Where]) -> None:
        """
        @param describe: returns C{service} and C{state} for error messages, so
            that a 503 or 504 says which service and in what state.
        """
        self._reactor = reactor
        self.limit = limit
        self._describe = describe
        self._waiters: dict[Deferred[None], _Waiter] = {}
        # Called when the last waiter left by itself (its client went away or
        # it timed out), not when the queue was released or failed: the
        # lifecycle's cancel_abandoned_start hangs on it (issue 17).
        self.on_abandoned: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._waiters)

    def oldest_wait(self) -> float:
        """Seconds the longest-waiting request has waited (0 when empty)."""
        if not self._waiters:
            return 0.0
        first = next(iter(self._waiters.values()))
        return self._reactor.seconds() - first.enqueued_at

    def wait(self, timeout: float, retry_after: float) -> Deferred[None]:
        """
        Hold a request until L{release_all} or L{fail_all}.

        @param timeout: fail with L{QueueTimedOut} after this long (0: never).
        @param retry_after: sent with a L{QueueFull} refusal.
        @raise QueueFull: when C{limit} requests already wait.
        """
        if len(self._waiters) >= self.limit:
            raise QueueFull(
                f"queue full: {self.limit} requests already waiting", retry_after=retry_after, **self._describe()
            )
        deferred: Deferred[None] = Deferred(self._cancelled)
        timer = None
        if timeout > 0:
            timer = self._reactor.callLater(timeout, self._timed_out, deferred, timeout)
        self._waiters[deferred] = _Waiter(deferred, timer, self._reactor.seconds())
        return deferred

    # How many waiters one reactor turn lets through.  Each released request
    # starts its forwarding at once; thousands in one turn would freeze the
    # gateway (the API, other services) for seconds.
    RELEASE_BATCH = 256

    def release_all(self) -> None:
        """The service is ready: let every waiter through, oldest first."""
        self._release(self._take_all())

    def _release(self, waiters: list[_Waiter]) -> None:
        batch, rest = waiters[: self.RELEASE_BATCH], waiters[self.RELEASE_BATCH :]
        for waiter in batch:
            # A client that left after being taken has its Deferred cancelled.
            if not waiter.deferred.called:
                waiter.deferred.callback(None)
        if rest:
            self._reactor.callLater(0, self._release, rest)

    def fail_all(self, error: GatewayError) -> None:
        """The start failed: every waiter gets the same error."""
        for waiter in self._take_all():
            waiter.deferred.errback(error)

    def _take_all(self) -> list[_Waiter]:
        waiters = list(self._waiters.values())
        self._waiters.clear()
        for waiter in waiters:
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
        return waiters

    def _remove(self, deferred: Deferred[None]) -> None:
        waiter = self._waiters.pop(deferred, None)
        if waiter is not None and waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()

    def _cancelled(self, deferred: Deferred[None]) -> None:
        # The client went away: free its place at once.
        self._remove(deferred)
        self._maybe_abandoned()

    def _maybe_abandoned(self) -> None:
        if not self._waiters and self.on_abandoned is not None:
            self.on_abandoned()

    def _timed_out(self, deferred: Deferred[None], timeout: float) -> None:
        self._waiters.pop(deferred, None)
        deferred.errback(QueueTimedOut(f"request waited {timeout:g}s for the service to start", **self._describe()))
        self._maybe_abandoned()
