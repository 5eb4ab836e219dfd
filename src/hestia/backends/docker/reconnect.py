"""
Trying again after the engine's event stream is lost: one rule for the docker backend and label discovery.

The first retry comes after C{RECONNECT_FIRST} seconds and each failure doubles the wait up to
C{RECONNECT_MAX}; a stream that is up again resets it.  An engine that restarts is found again
within a fraction of a second, and one that is down for long is asked every ten seconds, not
hammered.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

RECONNECT_FIRST = 0.25
RECONNECT_MAX = 10.0


class Reconnect:
    """
    The pending retry of one subscriber, with its backoff.

    @param attempt: called when it is time to try again (it calls L{schedule} again
        if that try fails, and L{succeeded} when the stream is up).
    """

    def __init__(self, reactor: IReactorTime, attempt: Callable[[], object]) -> None:
        self._reactor = reactor
        self._attempt = attempt
        self.delay = RECONNECT_FIRST
        self._call: IDelayedCall | None = None

    @property
    def pending(self) -> bool:
        return self._call is not None and self._call.active()

    def schedule(self) -> None:
        """Try again after the current delay (replacing a retry already pending), then wait longer."""
        self.cancel()
        delay, self.delay = self.delay, min(self.delay * 2, RECONNECT_MAX)
        self._call = self._reactor.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._call = None
        self._attempt()

    def succeeded(self) -> None:
        """The stream is up: the next loss is retried quickly again."""
        self.delay = RECONNECT_FIRST

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
