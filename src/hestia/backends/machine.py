"""
What the C{wol} and C{exec} backends share: a machine that Hestia wakes (or
starts with a command) and puts back to sleep, and that outlives the gateway.

An awake machine costs electricity or money, so the backend writes to the state
store that it may be awake I{before} it sends the magic packet or runs the
start command, and forgets it only once the machine has been put to sleep.  A
gateway restarted after a SIGTERM or a SIGKILL finds the record
(L{hestia.reconcile}): a machine recorded as ready and still answering its
health check is taken up with its idle clock, and put to sleep when idle; one
whose stop failed is stopped again.  The record is the service's row in the
store, with C{data = {"phase": "awake" | "sleep_failed", "adopted": bool}}.

A machine found awake when the gateway starts (its health check answers, or the
C{exec} backend's C{status} command exits 0) is adopted: taken as ready, and put
to sleep when idle like one Hestia woke.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.iweb import IAgent
from zope.interface import implementer

from hestia import health
from hestia.backends.commands import CommandResult, CommandRunner
from hestia.backends.deferreds import Recall
from hestia.config import ServiceConfig
from hestia.coroutines import as_deferred
from hestia.errors import GatewayError, StartFailed
from hestia.interfaces import IAdoptableBackend, IPersistentBackend, IReconfigurableBackend, IStateStore

AWAKE = "awake"
SLEEP_FAILED = "sleep_failed"
PHASES = (AWAKE, SLEEP_FAILED)
# How often a resumed gateway probes a machine recorded as ready before it
# concludes that it does not answer.
RECORDED_UP_PROBES = 3


class StopFailed(GatewayError):
    """
    The stop command failed: the machine may still be awake (and costing).

    Its reason holds no output (anyone granted the service may read it on the
    waiting page); the command's last lines are its C{detail}, for admin tokens.
    """

    status = 502



@implementer(IPersistentBackend, IAdoptableBackend, IReconfigurableBackend)
class MachineBackend:
    """
    The state-keeping half of a sleeping-machine backend.

    Subclasses say how to wake the machine (L{_wake}), how to put it to sleep
    (L{_sleep}), how to tell it is up without Hestia (L{_check_running}).

    @ivar phase: C{None} (asleep as far as Hestia knows), C{awake} (Hestia woke
        or adopted it), C{sleep_failed} (the stop failed: it may be awake).
    """

    kind = "machine"
    has_lifecycle = True

    def __init__(
        self,
        service: ServiceConfig,
        reactor: IReactorTime,
        agent: IAgent,
        *,
        adopt: bool,
        stop_on_shutdown: bool,
        commands: CommandRunner | None = None,
    ) -> None:
        self.service = service
        self.url = service.url
        self._reactor = reactor
        self._agent = agent
        self._adopt = adopt
        self._stop_on_shutdown = stop_on_shutdown
        self.commands = commands or CommandRunner(reactor, service.name, service.env, service.cwd)
        self.phase: str | None = None
        self.adopted = False
        self.last_stop_error: str | None = None
        self._adopting = False
        self._stops_begun = 0
        self._store: IStateStore | None = None
        self._detached = False
        self._log = Logger(namespace=f"hestia.service.{service.name}")
        self._recall = Recall(service.name, self._apply_record, self._log)

    # -- what subclasses provide ------------------------------------------------------

    def _wake(self) -> Deferred[None]:
        """Wake the machine (fails with L{StartFailed})."""
        raise NotImplementedError

    def _sleep(self) -> Deferred[Any]:
        """Put it to sleep: fires with the stop command's L{CommandResult}, or C{None} when there is none."""
        raise NotImplementedError

    def _check_running(self) -> Deferred[bool]:
        """Is it up now, whoever woke it?"""
        raise NotImplementedError

    def _woken(self) -> None:
        """It answers its health check (the C{wol} backend stops sending packets)."""

    def _details(self) -> dict[str, Any]:
        return {}

    # -- IPersistentBackend ------------------------------------------------------------

    @property
    def survives_gateway(self) -> bool:
        return not self._stop_on_shutdown

    def use_store(self, store: IStateStore) -> None:
        self._store = store

    def detach(self) -> None:
        self._detached = True
        self._woken()

    @as_deferred
    async def recorded_up(self) -> Any:
        await self._recalled()
        if self.phase is None:
            return False
        for attempt in range(RECORDED_UP_PROBES):
            if attempt:
                await deferLater(self._reactor, 0.2, lambda: None)
            up = await health.probe(self._agent, self._reactor, self.url, self.service.health)
            if up:
                return True
        return False

    # -- IAdoptableBackend ---------------------------------------------------------------

    @as_deferred
    async def running_already(self) -> Any:
        if not self._adopt:
            return False
        stops = self._stops_begun
        running = bool(await self._check_running())
        if running and stops == self._stops_begun:
            # The start that the gateway now asks for takes it as it is.  (Had a
            # stop begun meanwhile, the answer would be stale: the next start wakes it.)
            self._adopting = True
        return running

    # -- IBackend ---------------------------------------------------------------------------

    def set_exit_handler(self, handler: Callable[[str, list[str]], None]) -> None:
        # A machine does not tell Hestia when it goes down: a dead one shows as
        # upstream errors, and the next start wakes it again.
        pass

    def start(self) -> Deferred[None]:
        started: Deferred[None] = self._start()
        return started

    @as_deferred
    async def _start(self) -> Any:
        await self._recalled()
        adopting, self._adopting = self._adopting, False
        self.phase = AWAKE
        self.adopted = adopting
        self.last_stop_error = None
        await self._save("starting")  # On disk before anything can wake it.
        if adopting:
            self._log.info("{service} is already up: adopting it", service=self.service.name)
            return
        await self._wake()

    def probe(self) -> Deferred[bool]:
        probing: Deferred[bool] = health.probe(self._agent, self._reactor, self.url, self.service.health)

        def seen(up: bool) -> bool:
            if up:
                self._woken()
            return up

        return probing.addCallback(seen)

    def stop(self, timeout: float) -> Deferred[None]:
        stopped: Deferred[None] = self._stop()
        return stopped

    @as_deferred
    async def _stop(self) -> Any:
        self._stops_begun += 1
        self._adopting = False
        await self._recalled()
        self._woken()
        if self.phase is None:
            return  # Hestia did not wake it: not Hestia's to put to sleep.
        try:
            result = await self._sleep()
        except OSError as error:
            result = None
            await self._sleep_failed(f"cannot run the stop command: {error}")
        if result is None:
            self._log.info("{service}: no stop command, the machine is left as it is", service=self.service.name)
        elif not result.succeeded:
            self._log.error("{service}: {error}", service=self.service.name, error=result.summary("stop command"))
            await self._sleep_failed(result.reason("stop command"), list(result.lines[-20:]))
        await self._forget()

    @as_deferred
    async def _sleep_failed(self, reason: str, detail: list[str] | None = None) -> Any:
        self.phase = SLEEP_FAILED
        self.last_stop_error = f"{reason} (the machine may still be awake)"
        self._log.error("{service}: {error}", service=self.service.name, error=self.last_stop_error)
        await self._save("failed")  # The next gateway tries again (hestia.reconcile).
        raise StopFailed(self.last_stop_error, detail=detail)

    def reconfigure(self, service: ServiceConfig) -> None:
        # IReconfigurableBackend (issue 19): a reload's in-place settings (the health check).
        self.service = service

    def describe(self) -> dict[str, Any]:
        machine = {None: "asleep", AWAKE: "awake", SLEEP_FAILED: "may be awake (stop failed)"}[self.phase]
        return {
            "machine": machine,
            "adopted": self.adopted,
            "last_stop_error": self.last_stop_error,
            **self._details(),
        }

    def recent_output(self) -> list[str]:
        return list(self.commands.output)

    def add_line_listener(self, listener: Callable[[str, str], None]) -> None:
        """Each line a command writes also goes to C{listener(stream, line)} (see L{hestia.logs})."""
        self.commands.add_line_listener(listener)

    # -- the record ----------------------------------------------------------------------------

    def _recalled(self) -> Deferred[None]:
        """Fires once what the store holds for this service has been read (once)."""
        return self._recall(self._store)

    def _apply_record(self, records: dict[str, Any]) -> None:
        record = records.get(self.service.name) or {}
        data = record.get("data") or {}
        phase = data.get("phase")
        if phase in PHASES and self.phase is None:
            self.phase = phase
            self.adopted = bool(data.get("adopted"))
            self.last_stop_error = data.get("last_stop_error")
            self._log.info("recalled {service}: {phase} (recorded {state})", service=self.service.name,
                           phase=phase, state=record.get("state"))

    def _save(self, state: str) -> Deferred[Any]:
        """Commit the machine's phase; fires once it is on disk."""
        if self._store is None or self._detached:
            return succeed(None)
        now = self._reactor.seconds()
        data = {"phase": self.phase, "adopted": self.adopted, "last_stop_error": self.last_stop_error}
        written: Deferred[Any] = self._store.save_service(self.service.name, state, now, data=data, now=now)
        return self._store.track(written)

    @as_deferred
    async def _forget(self) -> Any:
        """It is asleep (or not Hestia's any more): nothing to find again."""
        self.phase = None
        self.adopted = False
        if self._store is not None and not self._detached:
            await self._store.track(self._store.clear_service_fields(self.service.name, "data"))


def start_failed(result: CommandResult, what: str) -> StartFailed:
    """The error a failed start command gives waiting clients."""
    # The output is the detail (admin tokens only): the reason is what anyone granted the service reads.
    return StartFailed(result.reason(what), detail=list(result.lines[-20:]))
