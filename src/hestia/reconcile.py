"""
Taking up, at gateway start, what a previous gateway left running.

Services whose backends outlive the gateway (L{IPersistentBackend}: remote VMs
started through Semaphore) record their state in the L{StateStore}.  When
Hestia starts again -- after a SIGTERM, or a SIGKILL in any phase -- each such
service is put back where it was:

  - recorded C{ready}: its recorded url is probed; healthy, it resumes
    C{ready} with its idle clock running from the recorded last request (so
    an idle VM is still torn down); not answering, it is stopped (the stop
    template runs), because a machine that cannot be reached still costs;
  - recorded C{starting}: the start resumes, and the backend follows the task
    it recorded instead of launching a second one;
  - recorded C{stopping}, or C{failed} with a machine possibly left: the stop
    is finished (the recorded stop task is followed, or one is launched).

A request that arrives before reconciliation is done is safe too: the
backend's own start recalls the same record first.

The idle clock needs the last request time, which the lifecycle keeps in
memory: L{request_time_recorder} writes it for persistent services, at most
every L{REQUEST_TIME_EVERY} seconds per service, so the hot path does not
wait for the disk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from hestia.coroutines import as_deferred
from hestia.interfaces import IPersistentBackend
from hestia.lifecycle import ServiceLifecycle, State
from hestia.records import RequestRecord
from hestia.routing import persistent_lifecycles

if TYPE_CHECKING:
    from hestia.gateway import Gateway
    from hestia.state import StateStore

log = Logger(namespace="hestia.reconcile")

REQUEST_TIME_EVERY = 2.0


@as_deferred
async def reconcile(gateway: Gateway, store: StateStore) -> Any:
    """
    Resume every persistent service from its recorded state.

    @return: a Deferred firing with C{{name: what was done}}.
    """
    records = await store.load_services()
    done: dict[str, str] = {}
    for lifecycle in persistent_lifecycles(gateway.services):
        name = lifecycle.name
        record = records.get(name)
        if record is None:
            continue
        try:
            outcome = await _reconcile_one(lifecycle, record)
        except Exception:
            log.failure("cannot reconcile {service}", service=name)
            outcome = "error"
        if outcome:
            done[name] = outcome
            log.info("reconciled {service}: {outcome}", service=name, outcome=outcome)
    return done


@as_deferred
async def _reconcile_one(lifecycle: ServiceLifecycle, record: dict[str, Any]) -> Any:
    state = record.get("state")
    leftover = bool(record.get("url") or record.get("task_id") or (record.get("data") or {}).get("phase"))
    if lifecycle.state is not State.STOPPED:
        return "already taken up by a request"
    if state == State.READY.value:
        up = await IPersistentBackend(lifecycle.backend).recorded_up()
        if lifecycle.state is not State.STOPPED:
            return "already taken up by a request"
        if up:
            last = max(filter(None, (record.get("last_request_at"), record.get("state_since"))), default=None)
            lifecycle.resume(State.READY, "resumed after a gateway restart", last_request_at=last)
            return "ready"
        lifecycle.resume(State.STOPPING, "recorded up but not answering")
        return "stopping"
    if state == State.STARTING.value:
        lifecycle.resume(State.STARTING, "start resumed after a gateway restart")
        return "starting"
    if state == State.STOPPING.value or (state == State.FAILED.value and leftover):
        lifecycle.resume(State.STOPPING, "stop resumed after a gateway restart")
        return "stopping"
    return None


def request_time_recorder(
    gateway: Gateway, store: StateStore, now: Callable[[], float]
) -> Callable[[RequestRecord], None]:
    """
    A request observer recording the last request time of persistent services
    (throttled), so that a resumed service keeps its idle clock.
    """
    written: dict[str, float] = {}

    def record(request: RequestRecord) -> None:
        lifecycle = gateway.services.get(request.service)
        if lifecycle is None or not IPersistentBackend.providedBy(lifecycle.backend):
            return
        if lifecycle.last_request_at is None or lifecycle.state is not State.READY:
            return
        at = now()
        if at - written.get(lifecycle.name, float("-inf")) < REQUEST_TIME_EVERY:
            return
        written[lifecycle.name] = at
        saving = store.save_service(
            lifecycle.name, lifecycle.state.value, lifecycle.state_since,
            last_request_at=lifecycle.last_request_at, now=at,
        )
        saving.addErrback(lambda failure: log.failure("cannot record the last request time", failure))
        store.track(saving)

    return record
