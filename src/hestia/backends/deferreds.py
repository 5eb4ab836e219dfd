"""Deferred helpers shared by the backends that keep state across gateways."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred


def detached(shared: Deferred[Any]) -> Deferred[None]:
    """
    A new Deferred firing (with C{None}) when C{shared} fires, whatever its result.

    Several callers wait on one shared operation (the recall of a recorded machine); a caller
    that cancels its wait must not cancel the operation the others are waiting on.
    """
    fresh: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        if not fresh.called:
            fresh.callback(None)
        return result

    shared.addBoth(fire)
    return fresh
