"""
Issue 16 wired into a running gateway: the cost ledger, schedules, prewarm.

One L{Planning} per gateway.  It subscribes the L{CostLedger} to the
gateway's state and request observers, registers the cost metrics, and runs
the L{ScheduleKeeper} and L{Prewarmer} on the gateway's reactor.  After a
reload, L{apply} re-reads every service's windows and prewarm settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from hestia.costs import CostCollector, CostLedger
from hestia.prewarm import Prewarmer
from hestia.schedule import ScheduleKeeper, Window

if TYPE_CHECKING:
    from hestia.costs_config import PrewarmSettings
    from hestia.gateway import Gateway
    from hestia.metrics import HestiaMetrics
    from hestia.state import StateStore

log = Logger(namespace="hestia.planning")


class Planning:
    def __init__(self, gateway: Gateway, store: StateStore | None, metrics: HestiaMetrics | None = None) -> None:
        self.gateway = gateway
        self.store = store
        reactor = gateway.reactor
        self.ledger = CostLedger(reactor, lambda: gateway.config, store)
        gateway.add_state_observer(self.ledger.state_changed)
        gateway.request_observers.append(self.ledger.request_finished)
        if metrics is not None:
            metrics.registry.register(CostCollector(self.ledger, lambda: list(gateway.services)))
        self.schedules = ScheduleKeeper(reactor, gateway.services, self._windows, self.ledger.zone)
        self.prewarmer = Prewarmer(reactor, gateway.services, self._prewarm, self.ledger, self._record)

    def _service(self, name: str) -> Any:
        return self.gateway.config.services.get(name)

    def _windows(self, name: str) -> tuple[Window, ...]:
        service = self._service(name)
        return tuple(service.schedule) if service is not None else ()

    def _prewarm(self, name: str) -> PrewarmSettings | None:
        service = self._service(name)
        return service.prewarm if service is not None else None

    def _record(self, name: str, message: str) -> None:
        if self.store is None:
            return
        writing = self.store.record_event(name, "prewarm", self.gateway.reactor.seconds(), reason=message)
        writing.addErrback(lambda failure: log.failure("cannot record a prewarm decision", failure))
        self.store.track(writing)

    def start(self) -> None:
        self.ledger.start()
        self.schedules.start()
        self.prewarmer.start()

    def apply(self) -> None:
        """The configuration changed (a reload): take up the new windows and settings."""
        self.schedules.start()
        self.prewarmer.start()

    def stop(self) -> None:
        self.schedules.stop()
        self.prewarmer.stop()
        self.ledger.stop()
