"""
The C{semaphore} backend: a remote machine provisioned and torn down by
Semaphore UI tasks (Ansible playbooks).

Start runs the service's start template and follows the task to its end; a
line C{hestia_url=<url>} in its output replaces the configured url until the
service is stopped; readiness is then the service's own health check at that
url.  Stop runs the stop template and follows it to its end: only then is the
service C{stopped}.

A machine Hestia forgets keeps costing money, so every fact needed to find it
again is written to the state store I{before} Hestia acts on it: the launch
(with a random C{hestia_launch_id} that is also passed to the task, so that a
task whose id never came back can still be found), the task id, the url.  A
restarted gateway recalls them (L{hestia.reconcile}, or the first start or
stop): a start task in flight is followed again rather than launched twice; a
stop in flight is finished.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent
from zope.interface import implementer, provider

from hestia import health
from hestia.backends.deferreds import Recall
from hestia.backends.semaphore.client import (
    FINISHED,
    NoSuchTask,
    SemaphoreClient,
    SemaphoreError,
    SemaphoreUnreachable,
    TaskStuck,
    find_hestia_url,
)
from hestia.backends.semaphore.settings import SemaphoreService
from hestia.config import ServiceConfig
from hestia.coroutines import as_deferred
from hestia.errors import GatewayError, StartFailed, StartTimedOut
from hestia.interfaces import IBackend, IBackendFactory, IPersistentBackend, IReconfigurableBackend, IStateStore

OUTPUT_LINES_KEPT = 200
# After a normal stop of a start task, how long it may take to end.
STOP_START_TASK_TIMEOUT = 60.0


class StopFailed(Exception):
    """The stop task did not end with C{success}: the machine may still run."""



@implementer(IPersistentBackend, IReconfigurableBackend)
class SemaphoreBackend:
    """Starts and stops one service's remote machine through Semaphore tasks."""

    kind = "semaphore"
    has_lifecycle = True

    def __init__(
        self, service: ServiceConfig, reactor: IReactorTime, agent: IAgent, client: SemaphoreClient | None = None
    ) -> None:
        settings = service.sections.get("semaphore")
        if not isinstance(settings, SemaphoreService):
            raise TypeError(f"service {service.name!r} has no resolved semaphore settings")
        self.service = service
        self.settings = settings
        self._reactor = reactor
        self._agent = agent
        self.client = client or SemaphoreClient(settings.server, reactor, agent)
        self._store: IStateStore | None = None
        self._recorded_state: str | None = None
        self._remote_url: str | None = None
        self._task_id: int | None = None
        self._phase: str | None = None  # None (nothing provisioned), launching, start, stop-launching, stop
        self._nonce: str | None = None
        self._task_status: str | None = None
        self._output: list[str] = []
        self._detached = False
        self._log = Logger(namespace=f"hestia.service.{service.name}")
        self._recall = Recall(service.name, self._apply_record, self._log)

    def __repr__(self) -> str:
        return f"<SemaphoreBackend {self.service.name} machine {self.settings.machine_id!r}>"

    # -- IPersistentBackend ---------------------------------------------------------

    @property
    def survives_gateway(self) -> bool:
        return not self.settings.server.stop_on_shutdown

    def use_store(self, store: IStateStore) -> None:
        self._store = store

    def detach(self) -> None:
        self._detached = True
        self.client.detach()

    @as_deferred
    async def recorded_up(self) -> Any:
        await self._recalled()
        if self._recorded_state != "ready" or not self.url:
            return False
        for _attempt in range(3):
            up = await health.probe(self._agent, self._reactor, self.url, self.service.health)
            if up:
                return True
            await deferLater(self._reactor, 0.2, lambda: None)
        return False

    # -- IBackend -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._remote_url or self.service.url

    def set_exit_handler(self, handler: Callable[[str, list[str]], None]) -> None:
        # A remote machine does not tell us when it dies; a dead one shows as
        # upstream errors, and the next start re-runs the (idempotent) playbook.
        pass

    def start(self) -> Deferred[None]:
        started: Deferred[None] = self._start()
        return started.addErrback(self._start_error)

    def probe(self) -> Deferred[bool]:
        if not self.url:
            raise StartFailed(f"{self.service.name} has no url: the start task printed no hestia_url= line")
        return health.probe(self._agent, self._reactor, self.url, self.service.health)

    def stop(self, timeout: float) -> Deferred[None]:
        stopped: Deferred[None] = self._stop()
        return stopped

    def reconfigure(self, service: ServiceConfig) -> None:
        # IReconfigurableBackend: a reload's in-place settings (the health check).
        self.service = service

    def describe(self) -> dict[str, Any]:
        return {
            "semaphore": self.settings.server.base_url,
            "project_id": self.settings.server.project_id,
            "machine_id": self.settings.machine_id,
            "start_template_id": self.settings.start_template_id,
            "stop_template_id": self.settings.stop_template_id,
            "task_id": self._task_id,
            "task_phase": self._phase,
            "task_status": self._task_status,
            "remote_url": self._remote_url,
        }

    def recent_output(self) -> list[str]:
        return list(self._output)

    # -- recalling and recording ---------------------------------------------------------

    def _recalled(self) -> Deferred[None]:
        """Fires once what the store holds for this service has been read (once)."""
        return self._recall(self._store)

    def _apply_record(self, records: dict[str, Any]) -> None:
        record = records.get(self.service.name)
        if record is None:
            return
        data = record.get("data") or {}
        self._recorded_state = record.get("state")
        self._remote_url = record.get("url") or None
        self._task_id = record.get("task_id")
        self._phase = data.get("phase")
        self._nonce = data.get("nonce")
        if self._phase or self._remote_url:
            self._log.info(
                "recalled {service}: {state}, task {task} ({phase}), url {url}",
                service=self.service.name, state=self._recorded_state, task=self._task_id,
                phase=self._phase, url=self._remote_url,
            )

    def _save(self, state: str, url: str | None = None) -> Deferred[Any]:
        """Commit the current task facts; fires once they are on disk."""
        if self._detached:
            return Deferred()  # The gateway is going away: the store is closing.
        if self._store is None:
            return succeed(None)
        now = self._reactor.seconds()
        data = {"phase": self._phase, "nonce": self._nonce, "machine_id": self.settings.machine_id}
        written: Deferred[Any] = self._store.save_service(
            self.service.name, state, now, url=url, task_id=self._task_id, data=data, now=now
        )
        return self._store.track(written)

    @as_deferred
    async def _forget(self) -> Any:
        """The machine is gone: no url, no task, nothing to find again."""
        self._remote_url = None
        self._task_id = None
        self._phase = None
        self._nonce = None
        self._recorded_state = None
        if self._store is not None and not self._detached:
            await self._store.track(self._store.clear_service_fields(self.service.name, "url", "task_id", "data"))

    def _environment(self, action: str) -> dict[str, Any]:
        """The extra vars a task receives (see docs/semaphore-integration.md)."""
        return {
            **self.settings.extra_vars,
            "hestia_service": self.service.name,
            "machine_id": self.settings.machine_id,
            "hestia_action": action,
            "hestia_launch_id": self._nonce,
        }

    def _seen(self, task: dict[str, Any]) -> None:
        self._task_status = task.get("status")

    # -- starting ---------------------------------------------------------------------------

    @as_deferred
    async def _start(self) -> Any:
        await self._recalled()
        self._recorded_state = None
        if self._phase == "stop-launching":
            await self._find_launched_stop()
        if self._phase == "stop" and self._task_id is not None:
            # A previous gateway died while stopping: let that stop end first.
            self._log.info("waiting for stop task {task} before starting", task=self._task_id)
            await self._follow_stop(self._task_id, adopted=True)
            await self._forget()
        if self._phase == "launching":
            await self._find_launched()
        before = None
        if self._phase == "start" and self._task_id is not None:
            try:
                before = await self.client.task(self._task_id)
            except NoSuchTask:
                # Semaphore forgot it (deleted, or a new database): nothing to follow.
                self._log.warn("start task {task} is unknown to Semaphore", task=self._task_id)
                self._phase = None
        if before is not None:
            # Never a second start task: follow the one recorded.
            task_id = int(before["id"])
            self._log.info("following start task {task} already launched", task=task_id)
            task = await self._follow_start(task_id)
            if before.get("status") in FINISHED and task.get("status") == "success":
                up = False
                if self.url:
                    up = await health.probe(self._agent, self._reactor, self.url, self.service.health)
                if not up:
                    # That task had finished before and its machine no longer answers:
                    # provisioning is idempotent, so run the start template again.
                    task_id = await self._launch_start()
                    await self._follow_start(task_id)
            return
        task_id = await self._launch_start()
        await self._follow_start(task_id)

    @as_deferred
    async def _launch_start(self) -> Any:
        self._nonce = uuid.uuid4().hex
        self._phase = "launching"
        self._output = []
        self._remote_url = None
        await self._save("starting")  # On disk before the task can exist.
        try:
            task = await self.client.launch(
                self.settings.start_template_id,
                self._environment("start"),
                message=f"hestia: start {self.service.name}",
            )
        except SemaphoreError as error:
            if not isinstance(error, SemaphoreUnreachable):
                # A definite refusal: no task exists, nothing was provisioned.
                self._phase = None
                await self._save("starting")
            raise
        self._task_id = int(task["id"])
        self._phase = "start"
        self._task_status = task.get("status")
        await self._save("starting")  # The task id is on disk before we follow it.
        self._log.info("launched start task {task} (template {template})", task=self._task_id,
                       template=self.settings.start_template_id)
        return self._task_id

    @as_deferred
    async def _find_launched(self) -> Any:
        """A start launch whose answer never came back: find its task by our launch id."""
        found = await self._find_task(self.settings.start_template_id)
        if found is None:
            self._phase = None
        else:
            self._task_id = found
            self._phase = "start"
            await self._save("starting")

    @as_deferred
    async def _find_task(self, template_id: int) -> Any:
        """The id of the newest task of C{template_id} carrying our launch id, or None."""
        for task in reversed((await self.client.tasks()) or []):
            if task.get("template_id") not in (None, template_id):
                continue
            try:
                environment = json.loads(task.get("environment") or "{}")
            except ValueError:
                continue
            if (
                isinstance(environment, dict)
                and environment.get("hestia_launch_id") == self._nonce
                and environment.get("machine_id", self.settings.machine_id) == self.settings.machine_id
            ):
                return int(task["id"])
        return None

    @as_deferred
    async def _find_launched_stop(self) -> Any:
        """
        A stop launch whose answer never came back (the gateway died between sending it and
        recording its id): follow that task if Semaphore has it.  If it has not, that stop
        never reached Semaphore: no phase is left, and a stop launches it again, a start
        starts anew (a start is idempotent).
        """
        found = await self._find_task(self.settings.stop_template_id)
        if found is None:
            self._phase = None
        else:
            self._task_id = found
            self._phase = "stop"
            await self._save("stopping")

    @as_deferred
    async def _follow_start(self, task_id: int) -> Any:
        server = self.settings.server
        try:
            task = await self.client.follow(task_id, waiting_timeout=server.queue_timeout, on_update=self._seen)
        except TaskStuck as stuck:
            await self._quietly(self.client.stop(task_id, force=True))
            self._output = (await self._quietly(self.client.output(task_id))) or self._output
            raise StartTimedOut(f"{stuck}; stopped it with force", detail=self._output[-20:]) from None
        except NoSuchTask:
            self._phase = None
            raise StartFailed(f"Semaphore has no start task {task_id} any more") from None
        self._output = (await self.client.output(task_id))[-OUTPUT_LINES_KEPT:]
        status = task.get("status")
        if status != "success":
            raise StartFailed(
                f"start task {task_id} (template {self.settings.start_template_id}) ended with status {status}",
                detail=self._output[-20:],
            )
        url = find_hestia_url(self._output)
        if url:
            self._remote_url = url
            await self._save("starting", url=url)  # The VM's address is on disk before we use it.
            self._log.info("{service} is at {url}", service=self.service.name, url=url)
        elif not self.service.url:
            raise StartFailed(
                f"start task {task_id} printed no hestia_url= line and {self.service.name} has no url",
                detail=self._output[-20:],
            )
        return task

    def _start_error(self, failure: Failure) -> Failure:
        if failure.check(CancelledError, GatewayError):
            return failure
        error = failure.value
        if isinstance(error, SemaphoreError):
            raise StartFailed(f"{error}", detail=self._output[-20:])
        return failure

    # -- stopping --------------------------------------------------------------------------------

    @as_deferred
    async def _stop(self) -> Any:
        await self._recalled()
        self._recorded_state = None
        if self._phase is None and not self._remote_url:
            return  # Nothing was launched since the last stop: nothing to tear down.
        if self._phase == "launching":
            await self._find_launched()
            if self._phase is None and not self._remote_url:
                await self._forget()  # That launch never reached Semaphore.
                return
        if self._phase == "start" and self._task_id is not None:
            await self._end_start_task(self._task_id)
        if self._phase == "stop-launching":
            await self._find_launched_stop()
        if self._phase == "stop" and self._task_id is not None:
            stop_id = self._task_id
        else:
            # On disk before the task can exist, as for a start: a crash between the launch
            # and recording its id must not make the next gateway launch a second stop.
            self._nonce = uuid.uuid4().hex
            self._phase = "stop-launching"
            await self._save("stopping")
            task = await self.client.launch(
                self.settings.stop_template_id,
                self._environment("stop"),
                message=f"hestia: stop {self.service.name}",
            )
            self._task_id = stop_id = int(task["id"])
            self._phase = "stop"
            await self._save("stopping")
            self._log.info("launched stop task {task} (template {template})", task=stop_id,
                           template=self.settings.stop_template_id)
        await self._follow_stop(stop_id)
        await self._forget()

    @as_deferred
    async def _end_start_task(self, task_id: int) -> Any:
        """A start task must not go on unobserved: stop it if it has not finished."""
        try:
            task = await self.client.task(task_id)
        except NoSuchTask:
            return
        if task.get("status") in FINISHED:
            return
        self._log.info("stopping start task {task} ({status})", task=task_id, status=task.get("status"))
        force = task.get("status") == "waiting"
        await self.client.stop(task_id, force=force)
        try:
            await self.client.follow(task_id, timeout=STOP_START_TASK_TIMEOUT, on_update=self._seen)
        except TaskStuck:
            await self.client.stop(task_id, force=True)

    @as_deferred
    async def _follow_stop(self, task_id: int, adopted: bool = False) -> Any:
        try:
            task = await self.client.follow(
                task_id, timeout=self.settings.server.stop_task_timeout, on_update=self._seen
            )
        except NoSuchTask:
            if adopted:
                return
            raise
        self._output = ((await self._quietly(self.client.output(task_id))) or [])[-OUTPUT_LINES_KEPT:]
        if task.get("status") != "success" and not adopted:
            last = next((line for line in reversed(self._output) if line.strip()), "")
            raise StopFailed(f"stop task {task_id} ended with status {task.get('status')}: {last}".rstrip(": "))

    @as_deferred
    async def _quietly(self, work: Deferred[Any]) -> Any:
        """Best effort: a failure is logged, not raised."""
        try:
            result = await work
        except CancelledError:
            raise
        except Exception as error:
            self._log.warn("{service}: {error}", service=self.service.name, error=str(error))
            return None
        return result


@provider(IBackendFactory)
class SemaphoreBackendFactory:
    name = "semaphore"

    @staticmethod
    def build(service: ServiceConfig, reactor: IReactorTime, agent: IAgent) -> IBackend:
        return SemaphoreBackend(service, reactor, agent)
