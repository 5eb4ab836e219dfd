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

P = ParamSpec("P")
T = TypeVar("T")


def as_deferred(function: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Deferred[T]]:
    """C{function} (an C{async def}) as a function returning a L{Deferred} of its result."""

    @functools.wraps(function)
    def run(*args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        return Deferred.fromCoroutine(function(*args, **kwargs))

    return run
