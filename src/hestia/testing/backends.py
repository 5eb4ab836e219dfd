"""
A backend the test drives (re-exported by L{hestia.testing}).

L{FakeBackend} is an L{IBackend} whose every step the test controls: each
C{start()}, C{probe()} and C{stop()} returns a L{Deferred} the test fires, so
lifecycle rules can be checked step by step with a L{Clock} and no processes.
Integration tests use real processes instead (see C{tests/support/backend.py}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from hestia.interfaces import IBackend


@implementer(IBackend)
class FakeBackend:
    """
    A backend driven by the test.

    @ivar starts: the Deferreds returned by L{start}, in order.
    @ivar probes: the Deferreds returned by L{probe}, in order.
    @ivar stops: the Deferreds returned by L{stop}, in order.
    """

    kind = "fake"

    def __init__(self, url: str = "http://127.0.0.1:9", has_lifecycle: bool = True) -> None:
        self.url = url
        self.has_lifecycle = has_lifecycle
        self.starts: list[Deferred[None]] = []
        self.probes: list[Deferred[bool]] = []
        self.stops: list[Deferred[None]] = []
        self.stop_timeouts: list[float] = []
        self.output: list[str] = []
        self._exit_handler: Callable[[str, list[str]], None] | None = None

    def start(self) -> Deferred[None]:
        started: Deferred[None] = Deferred()
        self.starts.append(started)
        return started

    def probe(self) -> Deferred[bool]:
        probed: Deferred[bool] = Deferred()
        self.probes.append(probed)
        return probed

    def stop(self, timeout: float) -> Deferred[None]:
        stopped: Deferred[None] = Deferred()
        self.stops.append(stopped)
        self.stop_timeouts.append(timeout)
        return stopped

    def set_exit_handler(self, handler: Callable[[str, list[str]], None]) -> None:
        self._exit_handler = handler

    def exit(self, reason: str = "exit status 1") -> None:
        """Pretend the service ended by itself."""
        assert self._exit_handler is not None
        self._exit_handler(reason, list(self.output))

    def describe(self) -> dict[str, Any]:
        return {"fake": True}

    def recent_output(self) -> list[str]:
        return list(self.output)

    # Conveniences for the common "it starts and answers" path.

    def finish_start(self) -> None:
        self.starts[-1].callback(None)

    def answer_probe(self, ready: bool = True) -> None:
        self.probes[-1].callback(ready)

    def finish_stop(self) -> None:
        self.stops[-1].callback(None)
