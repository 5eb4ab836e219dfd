"""
GPU memory as the unit of sharing (issue 17).

Configuration::

    gpus:
      gpu0: {vram: 24GiB, min_residency: 30s, max_skips: 2}
    services:
      llama: {..., gpu: {device: gpu0, vram: 16GiB}}
      qwen:  {..., gpu: {device: gpu0, vram: 6GiB}}

Each service declares what it takes of one device.  A start is admitted to
its device (L{Device.admit}, the lifecycle's C{memory_gate}, passed after the
exclusive-group and dependency gate) once its memory is free.  If it is not:

  - ready residents that have been ready for the device's C{min_residency}
    make room: idle ones (no request or stream in flight, nothing queued) are
    stopped, least recently used first; if that is not enough, busy ones
    finish what they have in flight (never cut) while their new requests
    wait for their next turn, and then stop;
  - meanwhile the start waits, and its requests wait in its queue under the
    usual rules (503 when the queue is full, 504 after C{queue_timeout} or
    C{start_timeout}): nothing waits for ever.

Declared memory is reserved from admission until the service is stopped or
failed, so starting, ready and stopping services all count: the memory in use
by declaration never exceeds the device's size.

Which waiting start goes next when memory frees: the one with the most
requests queued (one start serves a whole batch of requests for that model),
oldest first among equals; but a start that has been overtaken C{max_skips}
times goes next whatever the others (the anti-starvation bound), and none
overtakes it.

An exclusive group is the special case "every member takes the whole device".
Where C{nvidia-smi} exists, the status shows the measured use beside the
declared one (L{NvidiaSmi}); the rules run on declared sizes only.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from hestia.config import Reader, ServiceConfig
from hestia.errors import StartFailed

log = Logger(namespace="hestia.gpu")

DEVICE_KEYS = {"vram", "min_residency", "max_skips", "index"}
CLAIM_KEYS = {"device", "vram"}
MAX_VRAM = 1024**5  # a PiB: far beyond any card, still a plain integer


# -- configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceConfig:
    """
    One GPU.

    @ivar index: its index for C{nvidia-smi} (the measured use in the status).
    """

    name: str
    vram: int
    min_residency: float = 0.0
    max_skips: int = 2
    index: int | None = None


@dataclass(frozen=True)
class GpuClaim:
    """What one service takes of one device."""

    device: str
    vram: int


def _vram(reader: Reader, value: Any, key: str) -> int:
    size = reader.size(value, key, maximum=MAX_VRAM)
    if size <= 0:
        raise reader.fail(key, "expected a size above 0 (e.g. 16GiB)")
    return size


def parse_devices(reader: Reader, raw: Any) -> dict[str, DeviceConfig]:
    devices = {}
    for name, section in reader.mapping(raw, "gpus").items():
        key = f"gpus.{name}"
        if not isinstance(name, str) or not name:
            raise reader.fail("gpus", f"expected device names, got {name!r}")
        section = reader.mapping(section, key)
        reader.check_keys(section, DEVICE_KEYS, key)
        if "vram" not in section:
            raise reader.fail(f"{key}.vram", "missing: the device's memory, e.g. 24GiB")
        index = section.get("index")
        if index is None:
            digits = "".join(ch for ch in name if ch.isdigit())
            index = int(digits) if digits and name.rstrip("0123456789") + digits == name else None
        else:
            index = reader.integer(index, f"{key}.index")
        devices[name] = DeviceConfig(
            name=name,
            vram=_vram(reader, section["vram"], f"{key}.vram"),
            min_residency=reader.duration(section.get("min_residency", 0), f"{key}.min_residency"),
            max_skips=reader.integer(section.get("max_skips", 2), f"{key}.max_skips"),
            index=index,
        )
    return devices


def resolve_gpus(
    source: str, raw: Any, services_raw: Mapping[str, Any], services: Mapping[str, ServiceConfig]
) -> tuple[dict[str, DeviceConfig], dict[str, ServiceConfig]]:
    """
    The devices of top-level C{gpus:}, and each service with its C{gpu:} claim.

    @raise ConfigError: naming the file and key.
    """
    reader = Reader(source)
    devices = parse_devices(reader, raw) if raw is not None else {}
    resolved = dict(services)
    for name, service in services.items():
        section = services_raw.get(name)
        if not isinstance(section, dict) or section.get("gpu") is None:
            continue
        key = f"services.{name}.gpu"
        if service.backend in ("instances", "route"):
            raise reader.fail(key, "only a single-instance service takes GPU memory (set it on its targets)")
        claim_raw = reader.mapping(section["gpu"], key)
        reader.check_keys(claim_raw, CLAIM_KEYS, key)
        device = claim_raw.get("device")
        if len(devices) == 1 and device is None:
            device = next(iter(devices))
        if device not in devices:
            known = ", ".join(devices) or "none: add a top-level gpus: section"
            raise reader.fail(f"{key}.device", f"no GPU named {device!r} (gpus: {known})")
        if "vram" not in claim_raw:
            raise reader.fail(f"{key}.vram", "missing: the memory the service takes, e.g. 16GiB")
        vram = _vram(reader, claim_raw["vram"], f"{key}.vram")
        if vram > devices[device].vram:
            raise reader.fail(f"{key}.vram", f"{_gib(vram)} does not fit on {device} ({_gib(devices[device].vram)})")
        resolved[name] = replace(service, gpu=GpuClaim(device, vram))
    return devices, resolved


def _gib(size: int) -> str:
    return f"{size / 1024**3:g} GiB"


# -- the rules -------------------------------------------------------------------------


class Member(Protocol):
    """What a device needs of a service: a L{hestia.lifecycle.ServiceLifecycle} has it."""

    @property
    def name(self) -> str: ...

    @property
    def state(self) -> Any: ...

    @property
    def state_since(self) -> float: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def queue(self) -> Any: ...

    @property
    def last_request_at(self) -> float | None: ...

    def stop(self, reason: str = "api") -> Deferred[None]: ...

    def yield_when_drained(self, reason: str) -> Deferred[None]:
        """Hold new requests, let those in flight finish, then stop."""


@dataclass
class _Admission:
    member: Member
    vram: int
    seq: int
    deferred: Deferred[None]
    skips: int = 0


@dataclass
class _Resident:
    member: Member
    vram: int


_HOLDING = ("starting", "ready", "stopping")


@dataclass
class Device:
    """
    The declared memory of one GPU and who holds it: the pure rules, driven by
    the members' state changes and idle moments and by the reactor's clock.
    """

    config: DeviceConfig
    reactor: IReactorTime
    residents: dict[str, _Resident] = field(default_factory=dict)
    pending: list[_Admission] = field(default_factory=list)
    evicting: set[str] = field(default_factory=set)
    swaps: int = 0
    _seq: int = 0
    _timer: IDelayedCall | None = None
    _next_turn: IDelayedCall | None = None

    @property
    def name(self) -> str:
        return self.config.name

    def used(self) -> int:
        return sum(resident.vram for resident in self.residents.values())

    def adopt(self, member: Member, vram: int) -> None:
        """A member that already runs (on reload) holds its memory."""
        if member.state.value in _HOLDING:
            self.residents[member.name] = _Resident(member, vram)

    def admit(self, member: Member, vram: int) -> Deferred[None]:
        """Fires when C{member} may launch: C{vram} of this device is reserved for it."""
        if member.name in self.residents:
            self.residents[member.name] = _Resident(member, vram)
            return succeed(None)
        if vram > self.config.vram:
            return fail(StartFailed(f"needs {_gib(vram)} of {self.name}, which has {_gib(self.config.vram)}"))
        self._seq += 1
        admission = _Admission(member, vram, self._seq, Deferred(self._withdraw))
        self.pending.append(admission)
        self.consider()
        return admission.deferred

    def _withdraw(self, deferred: Deferred[None]) -> None:
        self.pending = [a for a in self.pending if a.deferred is not deferred]
        self._soon()  # the others may go now

    def member_changed(self, member: Member) -> None:
        """A member's state changed: a stopped or failed one frees its memory."""
        resident = self.residents.get(member.name)
        if resident is not None and resident.member is member and member.state.value not in _HOLDING:
            del self.residents[member.name]
            if member.name in self.evicting:
                self.evicting.discard(member.name)
                self.swaps += 1
        self._soon()

    def member_idle(self, member: Member) -> None:
        if self.pending:
            self._soon()

    def _soon(self) -> None:
        # Not from inside the transition or the lease release being told of:
        # the admissions and evictions it leads to are transitions of their own.
        if self.pending and (self._next_turn is None or not self._next_turn.active()):
            self._next_turn = self.reactor.callLater(0, self.consider)

    # -- deciding ----------------------------------------------------------------------

    def _order(self) -> list[_Admission]:
        forced = [a for a in self.pending if a.skips >= self.config.max_skips]
        if forced:
            return [min(forced, key=lambda a: a.seq)]
        return sorted(self.pending, key=lambda a: (-len(a.member.queue), a.seq))

    def consider(self) -> None:
        """Admit what fits, evict what must go, in the order of the rules."""
        while self.pending:
            for candidate in self._order():
                free = self.config.vram - self.used()
                if candidate.vram <= free:
                    self._grant(candidate)
                    break
                coming = free + sum(self.residents[name].vram for name in self.evicting if name in self.residents)
                if coming >= candidate.vram:
                    return  # what is being stopped makes room for it: wait for that
                if self._evict_for(candidate, coming):
                    return
            else:
                return  # nothing can go now

    def _grant(self, admission: _Admission) -> None:
        self.pending.remove(admission)
        for other in self.pending:
            if other.seq < admission.seq:
                other.skips += 1  # overtaken
        self.residents[admission.member.name] = _Resident(admission.member, admission.vram)
        log.info("{service} admitted to {device}: {vram} (in use {used} of {size})", service=admission.member.name,
                 device=self.name, vram=_gib(admission.vram), used=_gib(self.used()), size=_gib(self.config.vram))
        admission.deferred.callback(None)

    def _evict_for(self, candidate: _Admission, coming: int) -> bool:
        """
        Make room for C{candidate} if stopping ready residents can: the idle
        ones first, least recently used first, and only then busy ones, which
        finish their requests in flight (streams too) before they stop, while
        their new requests wait for their next turn on the device.  None that
        has been ready for less than C{min_residency} (the residency timer
        wakes the device when one may go).
        """
        now = self.reactor.seconds()
        ready: list[_Resident] = []
        later: list[float] = []
        for name, resident in self.residents.items():
            member = resident.member
            if name in self.evicting or member.state.value != "ready":
                continue
            resident_until = member.state_since + self.config.min_residency
            if resident_until > now:
                later.append(resident_until)
                continue
            ready.append(resident)

        def busy(resident: _Resident) -> bool:
            return bool(resident.member.in_flight or len(resident.member.queue))

        ready.sort(key=lambda r: (busy(r), r.member.last_request_at or r.member.state_since, r.member.name))
        chosen: list[_Resident] = []
        for resident in ready:
            if coming >= candidate.vram:
                break
            chosen.append(resident)
            coming += resident.vram
        if coming < candidate.vram:
            if later:
                self._wake_at(min(later))
            return False
        for resident in chosen:
            name = resident.member.name
            self.evicting.add(name)
            if busy(resident):
                log.info("{service} finishes its requests, then makes room on {device} for {next}", service=name,
                         device=self.name, next=candidate.member.name)
                stopping = resident.member.yield_when_drained("gpu")
            else:
                log.info("{service} stopped to make room on {device} for {next}", service=name, device=self.name,
                         next=candidate.member.name)
                stopping = resident.member.stop("gpu")
            stopping.addErrback(_log_stop_failure, name)
        return True

    def _wake_at(self, when: float) -> None:
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= when:
                return
            self._timer.cancel()
        self._timer = self.reactor.callLater(max(0.0, when - self.reactor.seconds()), self._wake)

    def _wake(self) -> None:
        self._timer = None
        self.consider()

    def close(self) -> None:
        for call in (self._timer, self._next_turn):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._next_turn = None

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "vram": self.config.vram,
            "used": self.used(),
            "residents": {name: resident.vram for name, resident in self.residents.items()},
            "waiting": [a.member.name for a in sorted(self.pending, key=lambda a: a.seq)],
            "swaps": self.swaps,
        }


def _log_stop_failure(failure: Any, name: str) -> None:
    log.failure("stopping {service}", failure, service=name)


# -- measured use ----------------------------------------------------------------------


def parse_nvidia_smi(output: str) -> dict[int, tuple[int, int]]:
    """
    C{nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv,noheader,nounits}
    -> index: (used, total) in bytes.  Lines that do not parse are skipped.
    """
    measured = {}
    for line in output.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 3 or not all(part.isdigit() for part in parts):
            continue
        index, used, total = (int(part) for part in parts)
        measured[index] = (used * 1024**2, total * 1024**2)  # MiB
    return measured


class NvidiaSmi:
    """
    The measured memory of each GPU, read only, refreshed at most every C{interval}.

    Absent C{nvidia-smi} (this machine, most CI), it measures nothing and the
    status says C{measured: null}.
    """

    def __init__(self, reactor: IReactorTime, interval: float = 10.0, executable: str | None = None) -> None:
        self.reactor = reactor
        self.interval = interval
        self.executable = executable if executable is not None else shutil.which("nvidia-smi")
        self.measured: dict[int, tuple[int, int]] = {}
        self._last = float("-inf")
        self._running = False

    def refresh(self) -> None:
        if self.executable is None or self._running or self.reactor.seconds() - self._last < self.interval:
            return
        from twisted.internet.utils import getProcessOutput

        self._running = True
        self._last = self.reactor.seconds()
        args = ("--query-gpu=index,memory.used,memory.total", "--format=csv,noheader,nounits")
        reading: Deferred[bytes] = getProcessOutput(self.executable, args, reactor=self.reactor)

        def read(output: bytes) -> None:
            self.measured = parse_nvidia_smi(output.decode("ascii", "replace"))

        def done(result: object) -> None:
            self._running = False

        reading.addCallbacks(read, lambda failure: log.warn("nvidia-smi: {error}", error=failure.getErrorMessage()))
        reading.addBoth(done)

    def of(self, index: int | None) -> dict[str, int] | None:
        self.refresh()
        if index is None or index not in self.measured:
            return None
        used, total = self.measured[index]
        return {"used": used, "total": total}


# -- wiring ----------------------------------------------------------------------------


class GpuCoordinator:
    """
    Puts a configuration's GPU claims on the services' lifecycles: each claimant
    gets the device's memory gate, idle and state observers and a status section.

    Built anew on every (re)load; L{detach} undoes the wiring of the old one.
    """

    def __init__(self, devices: Mapping[str, DeviceConfig], reactor: IReactorTime,
                 meter: NvidiaSmi | None = None) -> None:
        self.devices = {name: Device(config, reactor) for name, config in devices.items()}
        self.meter = meter
        self._wired: list[tuple[Any, Callable[[Any], None]]] = []
        self._attached = False

    def attach(self, lifecycles: Mapping[str, Any]) -> None:
        """C{lifecycles}: service name -> L{hestia.lifecycle.ServiceLifecycle}, for those with a claim."""
        self._attached = True
        for lifecycle in lifecycles.values():
            claim: GpuClaim = lifecycle.config.gpu
            device = self.devices[claim.device]
            device.adopt(lifecycle, claim.vram)
            lifecycle.memory_gate = self._gate(device, claim.vram)
            idle = self._idle(device)
            lifecycle.idle_observers.append(idle)
            lifecycle.add_observer(self._changed(device, lifecycle))
            lifecycle.status_sections["gpu"] = self._status(device, claim)
            self._wired.append((lifecycle, idle))

    def detach(self) -> None:
        self._attached = False
        for lifecycle, idle in self._wired:
            lifecycle.memory_gate = None
            if idle in lifecycle.idle_observers:
                lifecycle.idle_observers.remove(idle)
            lifecycle.status_sections.pop("gpu", None)
        self._wired.clear()
        for device in self.devices.values():
            device.close()

    def _gate(self, device: Device, vram: int) -> Callable[[Any], Deferred[None]]:
        return lambda lifecycle: device.admit(lifecycle, vram)

    def _idle(self, device: Device) -> Callable[[Any], None]:
        def idle(lifecycle: Any) -> None:
            if self._attached:
                device.member_idle(lifecycle)

        return idle

    def _changed(self, device: Device, lifecycle: Any) -> Callable[[Any], None]:
        def changed(change: Any) -> None:
            if self._attached:
                device.member_changed(lifecycle)

        return changed

    def _status(self, device: Device, claim: GpuClaim) -> Callable[[], dict[str, Any]]:
        def status() -> dict[str, Any]:
            measured = self.meter.of(device.config.index) if self.meter is not None else None
            return {"device": device.name, "vram": claim.vram, "device_status": device.status(), "measured": measured}

        return status
