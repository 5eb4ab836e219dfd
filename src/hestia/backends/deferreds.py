"""What the backends that keep state across gateways share: L{Recall}, the once-read record."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from hestia.coroutines import Outcome
from hestia.interfaces import IStateStore


class Recall:
    """
    A service's record in the state store, read once however many wait for it.

    A backend that keeps state across gateways (a remote VM, a sleeping machine)
    must know what the previous gateway recorded before its first start, stop or
    status; every caller waits on the same read and gets its own Deferred
    (L{hestia.coroutines.Outcome}), so one that gives up cancels nothing for the others.  A read
    that fails is logged and counts as "nothing recorded".
    """

    def __init__(self, service: str, apply: Callable[[dict[str, dict[str, Any]]], None], log: Logger) -> None:
        """@param apply: given every stored record (C{{name: record}}), takes this service's."""
        self._service = service
        self._apply = apply
        self._log = log
        self._read: Outcome[None] | None = None

    def __call__(self, store: IStateStore | None) -> Deferred[None]:
        """Fires once the record has been read from C{store} (at once without one)."""
        if self._read is None:
            reading = succeed(None) if store is None else store.load_services().addCallbacks(self._apply, self._failed)
            self._read = Outcome(reading)
        return self._read.wait()

    def _failed(self, failure: Failure) -> None:
        self._log.failure("cannot read the state of {service}", failure, service=self._service)
