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
from typing import Any, ParamSpec, TypeVar

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


def shielded(work: Deferred[T]) -> Deferred[T]:
    """
    A L{Deferred} of C{work}'s result whose cancellation leaves C{work} going.

    For work that must finish whoever waits for it (a restart asked for with
    C{?wait=true}: Klein cancels the route's Deferred when its client leaves, and a
    cancelled restart would leave the service stopped).  C{work} must be the
    caller's own: its result is consumed here, and a failure after the waiter left
    is dropped (the work reports it itself: status, log).
    """
    waiter: Deferred[T] = Deferred()

    def relay(result: T | Failure) -> None:
        if waiter.called:  # the waiter was cancelled
            return
        if isinstance(result, Failure):
            waiter.errback(result)
        else:
            waiter.callback(result)

    work.addBoth(relay)
    return waiter
