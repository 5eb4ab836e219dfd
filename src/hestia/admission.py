"""
Admission to a backend: how many requests it is sent at once (issue 13).

A crowd held through a cold start must not be thrown at the fresh backend all
at once: a backend's listen backlog (5 for Python's C{http.server}) overflows,
the kernel drops SYNs, and connects wait out seconds of retransmission backoff.
Each backend URL therefore has an L{Admission}: a I{window} of requests that may
be in progress with it, and an in-order queue for the rest.

The release rules (documented in docs/architecture.md):

  - B{slow start}: after every start of the service (L{Admission.restart}) the
    window is C{INITIAL_WINDOW} (or C{max_concurrency} if smaller).  Each full
    round of answers (as many response heads as the window is wide) doubles
    it, up to C{max_concurrency}.
  - B{back off on a failed connect}: a connect that was refused or timed out
    halves the window (never below 1) and starts a new round; from then on
    (until the next start) a round widens the window by one, not twice:
    TCP's additive increase above its threshold.
  - B{in order}: a request that finds no room waits, oldest first; a request
    that retries a failed connect goes back to the head of the queue.  Each
    waiter is bounded like a held request: at most C{queue_limit} wait (503
    with C{Retry-After} beyond that) and none waits past its deadline (504).

L{ConnectRetry} is the rule for retrying a connect that failed: the request
never reached the backend, so it is safe for every method.  Each attempt has
a short connect timeout (a dropped SYN costs milliseconds, not the kernel's
1 s retransmission), both the timeout and the pause between attempts grow, and
the retries last as long as the request's time in the queue does.

Time comes from an injected reactor; every rule here is tested with a
L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from hestia.errors import QueueFull, QueueTimedOut, Where


class _Turn:
    """One request waiting for room in the window."""

    __slots__ = ("deferred", "enqueued_at", "timer")

    def __init__(self, deferred: Deferred[None], enqueued_at: float) -> None:
        self.deferred = deferred
        self.enqueued_at = enqueued_at
        self.timer: IDelayedCall | None = None


class Admission:
    """
    The window of requests in progress with one backend, and the queue behind it.

    @ivar window: how many requests may be in progress now.
    @ivar active: how many are.
    @ivar max_concurrency: the widest the window grows.
    """

    INITIAL_WINDOW = 4

    def __init__(
        self,
        reactor: IReactorTime,
        max_concurrency: int,
        queue_limit: int,
        describe: Callable[[], Where],
        retry_after: Callable[[], float] = lambda: 1.0,
        cap: int | None = None,
    ) -> None:
        """
        @param describe: C{service} and C{state} for a 503 or 504.
        @param retry_after: seconds a refused client is told to wait.
        @param cap: what C{max_concurrency} never exceeds, whatever the
            service asks (C{server.max_backend_connections}).
        """
        self._reactor = reactor
        self._cap = cap
        self.max_concurrency = self._capped(max_concurrency)
        self.queue_limit = queue_limit
        self._describe = describe
        self._retry_after = retry_after
        self.window = min(self.INITIAL_WINDOW, self.max_concurrency)
        # Above this the window grows by one per round, not twice (TCP's
        # ssthresh): set to half the window at a failed connect.
        self.threshold = self.max_concurrency
        self.active = 0
        self._answered = 0  # answers in the current round
        # The oldest waiter first; a retry is put first.  An OrderedDict: its
        # popitem(last=False) and move_to_end(last=False) are O(1), where a
        # dict's first item is found by scanning past the removed ones.
        self._turns: OrderedDict[Deferred[None], _Turn] = OrderedDict()

    def __len__(self) -> int:
        """How many requests wait for room."""
        return len(self._turns)

    def _capped(self, max_concurrency: int) -> int:
        return max(1, max_concurrency if self._cap is None else min(max_concurrency, self._cap))

    def configure(self, max_concurrency: int, queue_limit: int) -> None:
        """New limits (a reload): the window is clipped, never widened here."""
        self.max_concurrency = self._capped(max_concurrency)
        self.queue_limit = queue_limit
        self.window = min(self.window, self.max_concurrency)
        self.threshold = min(self.threshold, self.max_concurrency)
        self._admit()

    def restart(self) -> None:
        """The service (re)started: slow start again from a narrow window."""
        self.window = min(self.INITIAL_WINDOW, self.max_concurrency)
        self.threshold = self.max_concurrency
        self._answered = 0

    # -- taking and giving back turns ----------------------------------------

    def try_take(self) -> bool:
        """Take a turn if there is room and nobody waits before us."""
        if self.active < self.window and not self._turns:
            self.active += 1
            return True
        return False

    def wait(self, deadline: float | None, first: bool = False) -> Deferred[None]:
        """
        Wait for a turn; the Deferred fires with the turn taken.

        @param deadline: reactor time after which the wait fails with
            L{QueueTimedOut} (C{None}: never).
        @param first: go to the head of the queue (a request retrying a
            failed connect was first in line already).
        @raise QueueFull: when C{queue_limit} requests already wait.
        """
        if len(self._turns) >= self.queue_limit and not first:
            raise QueueFull(
                f"queue full: {self.queue_limit} requests already waiting for the backend",
                retry_after=self._retry_after(),
                **self._describe(),
            )
        now = self._reactor.seconds()
        deferred: Deferred[None] = Deferred(self._cancelled)
        turn = _Turn(deferred, now)
        self._turns[deferred] = turn
        if first:
            self._turns.move_to_end(deferred, last=False)
        if deadline is not None:
            turn.timer = self._reactor.callLater(max(0.0, deadline - now), self._timed_out, deferred)
        self._admit()
        return deferred

    def answered(self) -> None:
        """A response head came back: a round of them widens the window."""
        self._answered += 1
        if self._answered >= self.window:
            self._answered = 0
            wider = self.window * 2 if self.window < self.threshold else self.window + 1
            self.window = min(wider, self.max_concurrency)
            self._admit()

    def connect_failed(self) -> None:
        """A connect was refused or timed out: halve the window, and grow slowly from there."""
        self.window = max(1, self.window // 2)
        self.threshold = self.window
        self._answered = 0

    def release(self) -> None:
        """A request is done with the backend: its turn goes to the next."""
        self.active -= 1
        self._admit()

    # -- inside -------------------------------------------------------------------

    def _admit(self) -> None:
        while self._turns and self.active < self.window:
            deferred, turn = self._turns.popitem(last=False)
            if turn.timer is not None and turn.timer.active():
                turn.timer.cancel()
            self.active += 1
            deferred.callback(None)

    def _cancelled(self, deferred: Deferred[None]) -> None:
        turn = self._turns.pop(deferred, None)
        if turn is not None and turn.timer is not None and turn.timer.active():
            turn.timer.cancel()

    def _timed_out(self, deferred: Deferred[None]) -> None:
        turn = self._turns.pop(deferred, None)
        if turn is None:
            return
        waited = self._reactor.seconds() - turn.enqueued_at
        deferred.errback(QueueTimedOut(
            f"request waited {waited:g}s for a turn with the backend ({self.active} in progress)",
            **self._describe(),
        ))

    def status(self) -> dict[str, int]:
        return {
            "window": self.window,
            "threshold": self.threshold,
            "max_concurrency": self.max_concurrency,
            "active": self.active,
            "waiting": len(self._turns),
        }


@dataclass(frozen=True)
class ConnectRetry:
    """
    When to try a failed connect again, and with what connect timeout.

    Attempt C{n} (0 first) connects with C{timeout(n)}; after it fails the
    request waits C{pause(n)} and tries again, for as long as the request's
    queue time lasts (L{next_attempt} says whether there is time).  A connect
    that timed out (a SYN dropped by a full accept queue) is retried that long;
    a I{refused} one means nothing listens, so it is retried only for
    C{refused_for} seconds (a backend re-binding its socket), after which the
    client is told at once that the backend is unreachable.
    """

    first_timeout: float = 0.25
    min_timeout: float = 0.05
    max_timeout: float = 5.0
    first_pause: float = 0.005
    max_pause: float = 0.5
    refused_for: float = 1.0
    # The first timeout is this many times the slowest recent connect (TCP's
    # retransmission timeout is a few round trips, for the same reason).
    slowest_factor: float = 8.0

    def timeout(self, attempt: int, slowest: float | None = None) -> float:
        """
        The connect timeout of attempt C{attempt} (0 first).

        @param slowest: the slowest recent connect to this backend, if any
            was seen: the first timeout is then C{slowest_factor} times it,
            between C{min_timeout} and C{first_timeout}, so that on loopback a
            dropped SYN costs 50 ms and a distant backend still gets its
            round trips.  Not less than 50 ms: Twisted runs due timers before
            it reads events, so after a stall of the reactor a short timeout
            would fire before a connect that did succeed is seen.
        """
        first = self.first_timeout
        if slowest is not None:
            first = min(max(slowest * self.slowest_factor, self.min_timeout), self.first_timeout)
        return float(min(first * 2 ** min(attempt, 30), self.max_timeout))

    def pause(self, attempt: int) -> float:
        return float(min(self.first_pause * 2 ** min(attempt, 30), self.max_pause))

    def next_attempt(
        self, attempt: int, now: float, deadline: float | None, refused_since: float | None = None
    ) -> float | None:
        """
        The pause before attempt C{attempt + 1}, or C{None} when there is no time.

        @param deadline: when the request's queue time ends (C{None}: never).
        @param refused_since: when this request's first refused connect was,
            if one was refused.
        """
        pause = self.pause(attempt)
        end = deadline
        if refused_since is not None:
            refused_end = refused_since + self.refused_for
            end = refused_end if end is None else min(end, refused_end)
        if end is not None and now + pause >= end:
            return None
        return pause


# The rule the proxy follows (a module constant so that tests can read it).
CONNECT_RETRY = ConnectRetry()
