"""
One async style: C{async def}, handed to Twisted as a L{Deferred}.

A function written as a coroutine and decorated with L{as_deferred} returns a
L{Deferred} (through L{Deferred.fromCoroutine}), so callers that chain
callbacks, Klein and trial see what they always saw, and the function itself
reads top to bottom with C{await}.  It starts running at once, as an
C{inlineCallbacks} function did, and cancelling its Deferred cancels the
Deferred it is waiting on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, Generic, ParamSpec, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

P = ParamSpec("P")
T = TypeVar("T")


def as_deferred(function: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Deferred[T]]:
    """C{function} (an C{async def}) as a function returning a L{Deferred} of its result."""

    @functools.wraps(function)
    def run(*args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        return Deferred.fromCoroutine(function(*args, **kwargs))

    return run


class Outcome(Generic[T]):
    """
    The result of one piece of work, for any number of waiters, each on its own L{Deferred}.

    A waiter that gives up (its Deferred cancelled: a client that left) cancels
    neither the work nor the other waiters, and a waiter that comes after the
    end gets the result at once.  The work's result is consumed here: a failure
    nobody waits for is dropped (the work reports it itself: status, log).
    """

    def __init__(self, work: Deferred[T]) -> None:
        self._ended: list[T | Failure] = []
        self._waiters: list[Deferred[T]] = []
        work.addBoth(self._end)

    def _end(self, result: T | Failure) -> None:
        self._ended.append(result)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            _fire(waiter, result)

    def wait(self) -> Deferred[T]:
        waiter: Deferred[T] = Deferred()
        if self._ended:
            _fire(waiter, self._ended[0])
        else:
            self._waiters.append(waiter)
        return waiter


def _fire(waiter: Deferred[T], result: T | Failure) -> None:
    if waiter.called:  # cancelled: it stopped waiting
        return
    if isinstance(result, Failure):
        waiter.errback(result)
    else:
        waiter.callback(result)


def shielded(work: Deferred[T]) -> Deferred[T]:
    """
    C{work}'s result, on a L{Deferred} whose cancellation leaves C{work} going.

    For work that must finish whoever waits for it (a restart asked for with
    C{?wait=true}: Klein cancels the route's Deferred when its client leaves, and a
    cancelled restart would leave the service stopped).
    """
    return Outcome(work).wait()
