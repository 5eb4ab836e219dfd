"""
A simulated Hestia on a L{Clock}: the real lifecycle, cost ledger, schedule
keeper and prewarmer, driving a backend that starts in a fixed time.

Used by C{bench/costs_simulation.py} to replay weeks of request traces in
seconds, and by the unit tests of issue 16.  Nothing here is a stand-in for
the rules: only the backend and the clock are simulated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from zope.interface import implementer

from hestia.config import Config
from hestia.costs import CostLedger
from hestia.interfaces import IBackend
from hestia.lifecycle import Lease, ServiceLifecycle, State
from hestia.loader import parse_config
from hestia.prewarm import Prewarmer
from hestia.schedule import ScheduleKeeper


@implementer(IBackend)
class SimulatedBackend:
    """Starts in C{start_time} seconds of the reactor's time; stops at once."""

    kind = "simulated"
    has_lifecycle = True
    url = "http://127.0.0.1:9"

    def __init__(self, reactor: IReactorTime, start_time: float) -> None:
        self._reactor = reactor
        self.start_time = start_time
        self.started_at: float | None = None

    def start(self) -> Deferred[None]:
        started: Deferred[None] = Deferred()
        self.started_at = self._reactor.seconds()
        started.callback(None)
        return started

    def probe(self) -> Deferred[bool]:
        probed: Deferred[bool] = Deferred()
        ready = self.started_at is not None and self._reactor.seconds() - self.started_at >= self.start_time
        probed.callback(ready)
        return probed

    def stop(self, timeout: float) -> Deferred[None]:
        stopped: Deferred[None] = Deferred()
        self.started_at = None
        stopped.callback(None)
        return stopped

    def set_exit_handler(self, handler: Callable[[str, list[str]], None]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"simulated": True}

    def recent_output(self) -> list[str]:
        return []


def run_until(clock: Clock, until: float) -> None:
    """Advance C{clock} to C{until}, running each call at its own time."""
    while clock.calls and clock.calls[0].getTime() <= until:
        clock.advance(max(0.0, clock.calls[0].getTime() - clock.seconds()))
    if until > clock.seconds():
        clock.advance(until - clock.seconds())


@dataclass
class Outcome:
    first_uses: int = 0
    cold_first_uses: int = 0
    requests: int = 0


class SimulatedGateway:
    """
    One service, as Hestia would run it, on a L{Clock} starting at C{epoch}.

    @param service: the service's configuration keys (as in YAML); a
        C{command} is implied, so it has a lifecycle.
    """

    def __init__(self, service: dict[str, Any], epoch: float, start_time: float = 30.0,
                 top: dict[str, Any] | None = None, name: str = "svc") -> None:
        self.clock = Clock()
        self.clock.advance(epoch)
        raw = {**(top or {}), "services": {name: {"url": "http://127.0.0.1:9", "command": "true", **service}}}
        self.config: Config = parse_config(raw, "<simulation>", {})
        self.name = name
        self.backend = SimulatedBackend(self.clock, start_time)
        self.lifecycle = ServiceLifecycle(self.config.services[name], self.backend, self.clock)
        self.routes = {name: self.lifecycle}
        self.ledger = CostLedger(self.clock, lambda: self.config)
        self.lifecycle.add_observer(self.ledger.state_changed)
        self.schedules = ScheduleKeeper(self.clock, self.routes, lambda n: self.config.services[n].schedule,
                                        self.ledger.zone)
        self.prewarmer = Prewarmer(self.clock, self.routes, lambda n: self.config.services[n].prewarm, self.ledger)
        self.outcome = Outcome()
        if self.config.services[name].keep_warm:
            self.lifecycle.start("keep_warm")
        self.schedules.start()
        self.prewarmer.start()

    def request(self, at: float, duration: float, who: str = "client") -> None:
        """A request arriving at C{at}, answered C{duration} seconds after it got the service."""
        run_until(self.clock, at)
        self.outcome.requests += 1
        cold = self.lifecycle.state is not State.READY
        first = self.ledger.note_request(self.name, at, at, who)
        if first:
            self.outcome.first_uses += 1
            self.outcome.cold_first_uses += cold

        def served(lease: Lease) -> None:
            self.clock.callLater(duration, lease.release)

        self.lifecycle.acquire().addCallback(served).addErrback(lambda failure: None)

    def finish(self, at: float) -> None:
        run_until(self.clock, at)

    def cost(self) -> float:
        return self.ledger.totals(self.name)[1]

    def running_seconds(self) -> float:
        return self.ledger.totals(self.name)[0]
