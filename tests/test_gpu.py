"""
Issue 17: GPU memory as the unit of sharing (hestia.gpu).

The rules (fit, eviction order, batching, the anti-starvation bound) with a
Clock and members whose state the test drives, a Hypothesis property over any
sequence of requests and sizes, the configuration, and the wiring into real
lifecycles.  The live "must show" is in tests/test_gpu_live.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from hestia.config import ConfigError
from hestia.errors import StartFailed
from hestia.gpu import Device, DeviceConfig, GpuClaim, GpuCoordinator, parse_nvidia_smi
from hestia.lifecycle import ServiceLifecycle, State
from hestia.loader import parse_config
from hestia.testing import FakeBackend

pytestmark = pytest.mark.unit
GiB = 1024**3


@dataclass
class Member:
    """A service as the device sees it; the test moves it through its states."""

    name: str
    clock: Clock
    state: State = State.STOPPED
    state_since: float = 0.0
    in_flight: int = 0
    queue: list[int] = field(default_factory=list)
    last_request_at: float | None = None
    stops: list[Deferred[None]] = field(default_factory=list)
    draining: bool = False

    def set(self, state: State) -> None:
        self.state = state
        self.state_since = self.clock.seconds()

    def stop(self, reason: str = "api") -> Deferred[None]:
        assert self.in_flight == 0, f"{self.name} stopped with {self.in_flight} requests in flight"
        self.set(State.STOPPING)
        stopped: Deferred[None] = Deferred()
        self.stops.append(stopped)
        return stopped

    def yield_when_drained(self, reason: str) -> Deferred[None]:
        self.draining = True  # new requests wait in its queue from now on; finish() stops it
        return Deferred()


def finish(gpu: Device, member: Member) -> None:
    """One request in flight ends (what a lease's release does)."""
    member.in_flight -= 1
    member.last_request_at = member.clock.seconds()
    if member.in_flight == 0:
        if member.draining:
            member.draining = False
            member.stop("gpu")
        gpu.member_idle(member)
        member.clock.advance(0)


def device(vram: int = 24, **settings: Any) -> tuple[Device, Clock]:
    clock = Clock()
    return Device(DeviceConfig("gpu0", vram * GiB, **settings), clock), clock


def admitted(gpu: Device, member: Member, vram: int) -> Deferred[None]:
    member.set(State.STARTING)
    return gpu.admit(member, vram * GiB)


def ready(gpu: Device, member: Member, used_at: float | None = None) -> None:
    member.set(State.READY)
    member.last_request_at = used_at
    gpu.member_changed(member)


def stopped(gpu: Device, clock: Clock, member: Member) -> None:
    member.set(State.STOPPED)
    gpu.member_changed(member)
    clock.advance(0)


def test_a_16_and_a_6_fit_side_by_side() -> None:
    gpu, clock = device(24)
    big, small = Member("big", clock), Member("small", clock)
    assert admitted(gpu, big, 16).called and admitted(gpu, small, 6).called
    assert gpu.used() == 22 * GiB and not big.stops and not small.stops


def test_what_does_not_fit_evicts_idle_residents_least_recently_used_first() -> None:
    gpu, clock = device(24)
    a, b, c = Member("a", clock), Member("b", clock), Member("c", clock)
    admitted(gpu, a, 8)
    admitted(gpu, b, 8)
    ready(gpu, a, used_at=5.0)
    ready(gpu, b, used_at=3.0)  # used longer ago than a
    clock.advance(10)
    waiting = admitted(gpu, c, 16)
    assert not waiting.called
    assert b.state is State.STOPPING and a.state is State.READY  # one is enough: only the LRU goes
    assert gpu.used() == 16 * GiB  # b holds its memory until it has stopped
    stopped(gpu, clock, b)
    assert waiting.called and gpu.used() == 24 * GiB and gpu.swaps == 1


def test_a_resident_with_a_request_or_stream_in_flight_is_never_evicted() -> None:
    gpu, clock = device(24)
    busy, other = Member("busy", clock), Member("other", clock)
    admitted(gpu, busy, 16)
    ready(gpu, busy)
    busy.in_flight = 1  # a stream
    waiting = admitted(gpu, other, 16)
    clock.advance(3600)
    # It finishes what it serves (new requests wait for its next turn), and is not stopped under it.
    assert not waiting.called and busy.state is State.READY and busy.draining
    finish(gpu, busy)
    assert busy.state is State.STOPPING
    stopped(gpu, clock, busy)
    assert waiting.called


def test_min_residency_is_respected() -> None:
    gpu, clock = device(24, min_residency=30.0)
    first, second = Member("first", clock), Member("second", clock)
    admitted(gpu, first, 16)
    ready(gpu, first)
    clock.advance(10)
    waiting = admitted(gpu, second, 16)
    assert first.state is State.READY
    clock.advance(19.9)
    assert first.state is State.READY
    clock.advance(0.1)  # 30 s after it became ready: the device's own timer
    assert first.state is State.STOPPING
    stopped(gpu, clock, first)
    assert waiting.called


def test_the_start_with_the_biggest_batch_goes_first() -> None:
    gpu, clock = device(24)
    holder, few, many = Member("holder", clock), Member("few", clock), Member("many", clock)
    admitted(gpu, holder, 20)
    ready(gpu, holder)
    holder.in_flight = 1
    few.queue, many.queue = [1], [1, 2, 3, 4, 5]
    first, second = admitted(gpu, few, 20), admitted(gpu, many, 20)
    finish(gpu, holder)
    stopped(gpu, clock, holder)
    assert second.called and not first.called  # five requests for one model before one for another


def test_no_start_is_overtaken_more_than_max_skips_times() -> None:
    gpu, clock = device(24, max_skips=1, min_residency=10.0)
    holder = Member("holder", clock)
    admitted(gpu, holder, 12)
    ready(gpu, holder)  # at t=0: may not be stopped before t=10
    clock.advance(1)
    big = Member("big", clock)
    order: list[str] = []
    admitted(gpu, big, 20).addCallback(lambda _: order.append("big"))
    small = Member("small", clock)
    assert admitted(gpu, small, 6).called  # fits beside the holder: overtakes big once
    ready(gpu, small)  # at t=1: may not be stopped before t=11
    later = Member("later", clock)
    later_admitted = admitted(gpu, later, 2).addCallback(lambda _: order.append("later"))
    assert not later_admitted.called  # would fit, but big has been overtaken max_skips times
    assert gpu.status()["waiting"] == ["big", "later"]
    clock.advance(9)  # t=10: the holder may go, but that alone is not room enough for big
    assert holder.state is State.READY
    clock.advance(1)  # t=11: both may go: both make room for big
    assert holder.state is State.STOPPING and small.state is State.STOPPING
    stopped(gpu, clock, holder)
    stopped(gpu, clock, small)
    assert order == ["big", "later"]  # big first; then later fits beside it


def test_a_claim_bigger_than_the_device_is_refused_and_a_cancelled_one_leaves() -> None:
    gpu, clock = device(24)
    failures: list[Any] = []
    admitted(gpu, Member("huge", clock), 25).addErrback(failures.append)
    assert failures and failures[0].check(StartFailed) and "needs 25 GiB of gpu0" in failures[0].value.reason
    holder = Member("holder", clock)
    admitted(gpu, holder, 24)
    ready(gpu, holder)
    holder.in_flight = 1
    waiting = admitted(gpu, Member("gone", clock), 24)
    waiting.cancel()
    waiting.addErrback(lambda _: None)
    assert gpu.pending == []


# -- the property ----------------------------------------------------------------------

OPERATIONS = st.lists(
    st.tuples(st.sampled_from(["request", "finish", "ready", "stop-done", "idle-stop", "time"]),
              st.integers(0, 4)),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(1, 24), min_size=1, max_size=5), operations=OPERATIONS,
       min_residency=st.sampled_from([0.0, 5.0]), max_skips=st.integers(0, 3))
def test_declared_use_never_exceeds_the_device_and_every_start_is_answered(
    sizes: list[int], operations: list[tuple[str, int]], min_residency: float, max_skips: int
) -> None:
    gpu, clock = device(24, min_residency=min_residency, max_skips=max_skips)
    members = [Member(f"m{i}", clock) for i in range(len(sizes))]
    outcomes: list[tuple[Deferred[None], list[Any]]] = []

    def check() -> None:
        assert gpu.used() <= 24 * GiB  # (and Member.stop asserts nothing is in flight)

    def request(member: Member, vram: int) -> None:
        member.queue.append(1)
        if member.state in (State.STOPPED, State.FAILED):
            box: list[Any] = []
            waiting = admitted(gpu, member, vram)
            waiting.addBoth(box.append)
            outcomes.append((waiting, box))
        elif member.state is State.READY and not member.draining:
            member.queue.pop()
            member.in_flight += 1

    def step(kind: str, member: Member, vram: int) -> None:
        if kind == "request":
            request(member, vram)
        elif kind == "finish" and member.in_flight:
            finish(gpu, member)
        elif kind == "ready" and member.state is State.STARTING and member.name in gpu.residents:
            member.in_flight += len(member.queue)  # the whole batch goes through
            member.queue.clear()
            ready(gpu, member, clock.seconds())
        elif kind == "stop-done" and member.state is State.STOPPING:
            member.stops[-1].callback(None)
            stopped(gpu, clock, member)
            if member.queue:  # requests held while it drained start it again, as the lifecycle does
                box: list[Any] = []
                waiting = admitted(gpu, member, vram)
                waiting.addBoth(box.append)
                outcomes.append((waiting, box))
        elif kind == "idle-stop" and member.state is State.READY and not member.in_flight and not member.draining:
            member.stop("idle")
        elif kind == "time":
            clock.advance(1 + vram)

    for kind, which in operations:
        index = which % len(members)
        step(kind, members[index], sizes[index])
        clock.advance(0)
        check()

    # Then everything ends: requests finish, stops complete, time passes.
    for _ in range(10 * len(members) + 10):
        for member, vram in zip(members, sizes, strict=True):
            while member.in_flight:
                step("finish", member, vram)
            step("ready", member, vram)
            step("stop-done", member, vram)
        clock.advance(min_residency + 1)
        check()
        if all(box for _, box in outcomes):
            break
    assert all(box for _, box in outcomes), gpu.status()  # every start admitted (or refused)


# -- configuration ---------------------------------------------------------------------


def config(**service: Any) -> Any:
    return parse_config({
        "gpus": {"gpu0": {"vram": "24GiB", "min_residency": "30s"}},
        "services": {"llama": {"url": "http://127.0.0.1:9", "command": ["true"], **service}},
    }, "hestia_config.yml", environ={})


def test_claims_and_devices_parse() -> None:
    parsed = config(gpu={"device": "gpu0", "vram": "16GiB"})
    assert parsed.services["llama"].gpu == GpuClaim("gpu0", 16 * GiB)
    assert parsed.sections["gpus"]["gpu0"] == DeviceConfig("gpu0", 24 * GiB, 30.0, 2, 0)
    assert config(gpu={"vram": "6g"}).services["llama"].gpu == GpuClaim("gpu0", 6 * GiB)  # the only device


@pytest.mark.parametrize(("claim", "expected"), [
    ({"device": "gpu1", "vram": "1g"}, "services.llama.gpu.device: no GPU named 'gpu1' (gpus: gpu0)"),
    ({"vram": "32GiB"}, "services.llama.gpu.vram: 32 GiB does not fit on gpu0 (24 GiB)"),
    ({"device": "gpu0"}, "services.llama.gpu.vram: missing"),
    ({"vram": "lots"}, "services.llama.gpu.vram: expected a size in bytes"),
    ({"vram": "1g", "cores": 2}, "services.llama.gpu.cores: unknown key"),
])
def test_claim_errors_name_the_key(claim: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(gpu=claim)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"hestia_config.yml: {expected}")


def test_device_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"hestia_config.yml: gpus.gpu0.vram: missing"):
        parse_config({"gpus": {"gpu0": {}}, "services": {}}, "hestia_config.yml", environ={})
    with pytest.raises(ConfigError, match=r"services.ai.gpu: only a single-instance service"):
        parse_config({"gpus": {"gpu0": {"vram": "8g"}}, "services": {
            "ai": {"route_by": "model", "gpu": {"vram": "1g"}},
            "llama": {"url": "http://127.0.0.1:9", "models": ["a"]},
        }}, "hestia_config.yml", environ={})


def test_nvidia_smi_output_is_read() -> None:
    output = "0, 15012, 24564\n1, 3, 24564\nNo devices were found\n"
    assert parse_nvidia_smi(output) == {0: (15012 * 1024**2, 24564 * 1024**2), 1: (3 * 1024**2, 24564 * 1024**2)}


# -- wired into lifecycles ---------------------------------------------------------------


def test_two_lifecycles_on_one_device_take_turns() -> None:
    parsed = parse_config({
        "gpus": {"gpu0": {"vram": "24GiB"}},
        "services": {name: {"url": "http://127.0.0.1:9", "command": ["true"], "gpu": {"vram": "16GiB"}}
                     for name in ("a", "b")},
    }, "hestia_config.yml", environ={})
    clock = Clock()
    backends = {name: FakeBackend() for name in "ab"}
    lifecycles = {name: ServiceLifecycle(parsed.services[name], backends[name], clock) for name in "ab"}
    gpus = GpuCoordinator(parsed.sections["gpus"], clock)
    gpus.attach(lifecycles)
    a, b = lifecycles["a"], lifecycles["b"]
    lease_a = a.acquire()
    assert len(backends["a"].starts) == 1
    backends["a"].finish_start()
    clock.advance(0)
    backends["a"].answer_probe(True)
    assert a.state is State.READY and a.status()["gpu"]["device_status"]["used"] == 16 * GiB
    lease_b = b.acquire()
    clock.advance(0)
    assert backends["b"].starts == [] and a.state is State.READY  # a's request is in flight
    held = a.acquire()  # a finishes what it serves; this one waits for a's next turn
    assert not held.called and a.in_flight == 1
    lease_a.result.release()
    clock.advance(0)
    assert a.state is State.STOPPING and a.state_reason == "gpu"
    backends["a"].finish_stop()
    clock.advance(0)
    assert len(backends["b"].starts) == 1 and not lease_b.called
    backends["b"].finish_start()
    clock.advance(0)
    backends["b"].answer_probe(True)
    assert lease_b.called and b.status()["gpu"]["device_status"]["residents"] == {"b": 16 * GiB}
    assert b.status()["gpu"]["device_status"]["waiting"] == ["a"]  # the held request restarted a: it waits
    lease_b.result.release()  # b's batch is done: b makes room
    clock.advance(0)
    backends["b"].finish_stop()
    clock.advance(0)
    backends["a"].finish_start()
    clock.advance(0)
    backends["a"].answer_probe(True)
    assert held.called and a.in_flight == 1 and b.state is State.STOPPED
    held.result.release()
    gpus.detach()
    assert a.memory_gate is None and "gpu" not in a.status()


def test_the_worked_example_in_the_docs_loads(tmp_path: Any) -> None:
    import re
    from pathlib import Path

    from hestia.loader import load_config

    page = (Path(__file__).resolve().parents[1] / "docs" / "gpu-sharing.md").read_text(encoding="utf-8")
    block = re.findall(r"```yaml\n(.*?)```", page, re.S)[0]
    path = tmp_path / "gpu.yml"
    path.write_text(block)
    loaded = load_config(str(path), environ={})
    claims = {name: service.gpu for name, service in loaded.services.items() if service.gpu}
    assert claims == {"llama": GpuClaim("gpu0", 16 * GiB), "qwen": GpuClaim("gpu0", 6 * GiB),
                      "mixtral": GpuClaim("gpu0", 16 * GiB)}
    assert loaded.routing.model_routes["ai"].aliases == {"gpt-4o-mini": "qwen2.5:7b"}


def gateway_with(document: dict[str, Any]) -> tuple[Any, dict[str, FakeBackend], Clock]:
    from hestia.gateway import Gateway

    clock = Clock()
    backends: dict[str, FakeBackend] = {}

    def build(service: Any) -> FakeBackend:
        backends[service.name] = FakeBackend()
        return backends[service.name]

    parsed = parse_config(document, "hestia_config.yml", environ={})
    return Gateway(parsed, clock, agent=object(), build_backend=build), backends, clock  # type: ignore[arg-type]


def up(gateway: Any, backends: dict[str, FakeBackend], clock: Clock, name: str) -> Any:
    waiting = gateway.route(name).acquire()
    clock.advance(0)
    backends[name].finish_start()
    clock.advance(0)
    backends[name].answer_probe(True)
    assert waiting.called, name
    return waiting.result


def test_an_exclusive_group_and_a_device_together() -> None:
    service = {"url": "http://127.0.0.1:9", "command": ["true"]}
    gateway, backends, clock = gateway_with({
        "gpus": {"gpu0": {"vram": "24GiB"}},
        "groups": {"big": {"exclusive": True, "min_residency": 0}},
        "services": {
            "a": {**service, "group": "big", "gpu": {"vram": "12GiB"}},
            "b": {**service, "group": "big", "gpu": {"vram": "12GiB"}},
            "small": {**service, "gpu": {"vram": "8GiB"}},
        },
    })
    up(gateway, backends, clock, "a").release()
    up(gateway, backends, clock, "small").release()
    assert gateway.route("a").state is State.READY  # 20 of 24: both fit by memory
    waiting = gateway.route("b").acquire()  # would fit by memory beside small, not beside a: the group says one
    clock.advance(0)
    assert gateway.route("a").state is State.STOPPING and gateway.route("small").state is State.READY
    backends["a"].finish_stop()
    clock.advance(0)
    backends["b"].finish_start()
    clock.advance(0)
    backends["b"].answer_probe(True)
    assert waiting.called
    status = gateway.route("b").status()
    assert status["gpu"]["device_status"]["residents"] == {"small": 8 * GiB, "b": 12 * GiB}
    assert status["group"]["holder"] == "b"


def test_a_reload_keeps_what_runs_on_the_device() -> None:
    service = {"url": "http://127.0.0.1:9", "command": ["true"]}
    document = {
        "gpus": {"gpu0": {"vram": "24GiB"}},
        "services": {"a": {**service, "gpu": {"vram": "16GiB"}}, "b": {**service, "gpu": {"vram": "16GiB"}}},
    }
    gateway, backends, clock = gateway_with(document)
    up(gateway, backends, clock, "a").release()
    gateway.apply(parse_config({**document, "defaults": {"queue_limit": 100}}, "hestia_config.yml", environ={}))
    a = gateway.route("a")
    assert a.state is State.READY and a.status()["gpu"]["device_status"]["residents"] == {"a": 16 * GiB}
    gateway.route("b").acquire()
    clock.advance(0)
    assert a.state is State.STOPPING  # the new wiring knows a holds 16 GiB
    assert backends["b"].starts == []


def test_a_start_stopped_while_it_waits_for_memory_leaves_the_queue() -> None:
    parsed = parse_config({
        "gpus": {"gpu0": {"vram": "24GiB"}},
        "services": {name: {"url": "http://127.0.0.1:9", "command": ["true"], "gpu": {"vram": "16GiB"}}
                     for name in ("a", "b")},
    }, "hestia_config.yml", environ={})
    clock = Clock()
    backends = {name: FakeBackend() for name in "ab"}
    lifecycles = {name: ServiceLifecycle(parsed.services[name], backends[name], clock) for name in "ab"}
    gpus = GpuCoordinator(parsed.sections["gpus"], clock)
    gpus.attach(lifecycles)
    lease = lifecycles["a"].acquire()
    backends["a"].finish_start()
    clock.advance(0)
    backends["a"].answer_probe(True)
    assert lease.called  # a holds 16 GiB with its request in flight
    waiting = lifecycles["b"].acquire()
    waiting.addErrback(lambda _: None)
    clock.advance(0)
    assert gpus.devices["gpu0"].status()["waiting"] == ["b"]
    lifecycles["b"].stop("api")
    clock.advance(0)
    assert gpus.devices["gpu0"].status()["waiting"] == [] and backends["b"].starts == []
    assert lifecycles["a"].state is State.READY
