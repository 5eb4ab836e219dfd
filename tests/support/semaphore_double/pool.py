"""The task pool: the queue of waiting tasks, looked at every ``queue_interval_seconds``.

Like Semaphore's TaskPool it starts waiting tasks in order, one at a time per template
and within ``max_parallel_tasks``, and hands each to the runner (`runner.TaskRunner`).
"""

from __future__ import annotations

import time

from twisted.internet import defer
from twisted.internet import task as ttask
from twisted.python.failure import Failure

from .common import JSON
from .runner import TaskRunner
from .tasks import ACTIVE, FINISHED, TaskRecord


class TaskPool(TaskRunner):
    """The queue and its LoopingCall; `shutdown` stops it and powers the VMs off."""

    def apply_settings(self, settings: JSON) -> None:
        """A new ``queue_interval_seconds`` restarts the queue's LoopingCall at the new pace."""
        super().apply_settings(settings)
        loop = getattr(self, "_loop", None)
        if loop is not None and "queue_interval_seconds" in settings:
            self._loop = None
            loop.stop()
            self.start()

    def start(self) -> None:
        """Start looking at the queue (the real server's 5-second task-pool tick)."""
        if self._loop is None:
            self._loop = ttask.LoopingCall(self._tick)
            self._loop.clock = self.reactor
            self._loop.start(self.queue_interval, now=False)

    def shutdown(self) -> None:
        """Stop the queue and, unless asked to keep them, power off every VM (blocking)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for t in self.tasks.values():
            if t.sleeping is not None:
                t.kill_requested = True
        if not self.keep_vms_on_exit:
            self.kill_vms_blocking([vm for vm in self.vms if vm.refresh()], "double-shutdown")
        self._save_vms()
        self._save_tasks()

    def _tick(self) -> None:
        """One look at the queue; a crash is recorded, never allowed to stop the LoopingCall."""
        try:
            self._tick_once()
        except Exception as e:  # noqa: BLE001 - a dead task pool would hang every test
            self.violation("double_internal_error", "-", "task pool", None, repr(e))

    def _tick_once(self) -> None:
        """The task pool: start waiting tasks in order, one per template, within max_parallel."""
        self._refresh_vms()
        active = [t for t in self.tasks.values() if t.status in ACTIVE and not t.stale]
        busy_templates = {t.template_id for t in active}
        now = time.monotonic()
        for t in sorted(self.tasks.values(), key=lambda x: x.id):
            if t.status != "waiting" or t.stale:
                continue
            tpl = t.template
            blocked = (
                tpl["behaviour"] == "hang_waiting"
                or t.template_id in busy_templates
                or now - t.enqueued_at < float(tpl["waiting_seconds"])
                or (self.max_parallel and len(active) >= self.max_parallel)
            )
            busy_templates.add(t.template_id)  # FIFO: later tasks of this template wait too
            if blocked:
                continue
            active.append(t)
            self._set_status(t, "starting")
            self._out(t, f"Started: {t.id}")
            self._out(t, f"Run TaskRunner with template: {tpl['name']}")
            defer.ensureDeferred(self._run(t)).addErrback(self._runner_crashed, t)

    def _runner_crashed(self, failure: Failure, t: TaskRecord) -> None:
        self.violation("double_internal_error", "-", f"task {t.id}", None, failure.getTraceback())
        if t.status not in FINISHED:
            self._finish(t, "error")
