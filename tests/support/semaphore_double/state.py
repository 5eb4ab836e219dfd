"""The double's state and its persistence, the records tests read, and the task state machine.

`DoubleState` holds the settings, templates, tasks and VMs of one fake Semaphore server,
saves tasks and VMs in ``--state-dir`` (``tasks.json``, ``vms.json``; tasks unfinished in
a previous life come back *stale*), records protocol violations and warnings, moves
tasks through their statuses (broadcasting each change to WebSocket subscribers) and
powers VMs off when the reactor may not turn again.  The task pool, the runner and the
HTTP endpoints are the mixins built on it (`pool`, `runner`, `api`, `admin`, `double`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from jsonschema import Draft202012Validator
from twisted.internet import task as ttask

from .common import JSON, now_iso
from .scenario import SCENARIO_SCHEMA, parse_scenario
from .spec import load_spec
from .tasks import FINISHED, TaskRecord
from .vms import Vm


class Subscriber(Protocol):
    """A WebSocket client that status changes and log lines are pushed to (`websocket.WsClient`)."""

    def send(self, text: str) -> None: ...


class DoubleState:
    """The double's state: settings, templates, tasks, VMs, records; persisted in ``--state-dir``."""

    def __init__(
        self,
        *,
        token: str,
        state_dir: str | Path,
        project_id: int = 1,
        scenario: JSON | None = None,
        spec_path: str | Path | None = None,
        reactor: Any = None,
        keep_vms_on_exit: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.token = token
        self.spec = load_spec(str(spec_path) if spec_path else None)
        settings, self.templates = parse_scenario(scenario)
        self.project_id = int(project_id)
        self.queue_interval = 0.2
        self.max_parallel = 0
        self.legacy_errors = False
        self.role = "task_runner"
        self.apply_settings(settings)
        self.keep_vms_on_exit = keep_vms_on_exit
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._log = log or (lambda msg: print(f"[semaphore-double] {msg}", file=sys.stderr, flush=True))
        self.tasks: dict[int, TaskRecord] = {}
        self.next_task_id = 1
        self.vms: list[Vm] = []
        self.violations: list[JSON] = []
        self.warnings: list[JSON] = []
        self._ports: set[int] = set()
        self._ws_clients: set[Subscriber] = set()
        self._loop: ttask.LoopingCall | None = None
        self._load_state()

    def apply_settings(self, settings: JSON) -> None:
        """Top-level scenario keys; also applied at runtime by POST /_double/settings."""
        errors = sorted(e.message for e in Draft202012Validator(SCENARIO_SCHEMA).iter_errors(settings))
        if errors or "templates" in settings:
            raise ValueError("invalid settings: " + "; ".join(errors or ["use /_double/templates"]))
        self.queue_interval = float(settings.get("queue_interval_seconds", self.queue_interval))
        self.max_parallel = int(settings.get("max_parallel_tasks", self.max_parallel))
        self.legacy_errors = bool(settings.get("legacy_errors", self.legacy_errors))
        self.role = str(settings.get("role", self.role))

    def settings(self) -> JSON:
        return {"queue_interval_seconds": self.queue_interval, "max_parallel_tasks": self.max_parallel,
                "legacy_errors": self.legacy_errors, "role": self.role}

    # ---- persistence

    def _load_state(self) -> None:
        """Tasks unfinished in a previous life are *stale*: stuck forever, as after a real restart."""
        vms_file, tasks_file = self.state_dir / "vms.json", self.state_dir / "tasks.json"
        if vms_file.exists():
            self.vms = [Vm.from_dict(d) for d in json.loads(vms_file.read_text())["vms"]]
            for vm in self.vms:
                vm.refresh()
        if tasks_file.exists():
            data = json.loads(tasks_file.read_text())
            self.next_task_id = int(data.get("next_id", 1))
            for d in data["tasks"]:
                t = TaskRecord.from_state(d)
                if t.status not in FINISHED:
                    t.stale = True
                self.tasks[t.id] = t

    def _write(self, name: str, data: JSON) -> None:
        path = self.state_dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)

    def _save_vms(self) -> None:
        self._write("vms.json", {"vms": [vm.public() for vm in self.vms]})

    def _save_tasks(self) -> None:
        self._write(
            "tasks.json",
            {"next_id": self.next_task_id, "tasks": [t.to_state() for t in self.tasks.values()]},
        )

    # ---- reset

    def reset(self) -> None:
        """Back to a fresh double; task ids keep growing so stale ids never come back."""
        for t in list(self.tasks.values()):
            t.kill_requested = True
            if t.sleeping is not None:
                t.sleeping.cancel()
        self.kill_vms_blocking([vm for vm in self.vms if vm.refresh()], "reset")
        self.tasks.clear()
        self.vms.clear()
        self.violations.clear()
        self.warnings.clear()
        self._save_vms()
        self._save_tasks()

    # ---- records

    def violation(self, kind: str, method: str, path: str, status: int | None, detail: Any) -> None:
        entry = {"time": now_iso(), "kind": kind, "method": method, "path": path,
                 "status": status, "detail": detail}
        self.violations.append(entry)
        self._log(f"VIOLATION {kind} {method} {path} -> {status}: {detail}")

    def warning(self, kind: str, method: str, path: str, detail: Any) -> None:
        self.warnings.append({"time": now_iso(), "kind": kind, "method": method,
                              "path": path, "detail": detail})

    # ---- task state machine

    def _history(self, t: TaskRecord, status: str) -> None:
        t.status = status
        t.history.append({"status": status, "time": now_iso()})

    def _set_status(self, t: TaskRecord, status: str) -> None:
        if t.status == status:
            return
        self._history(t, status)
        if status == "running" and t.start is None:
            t.start = now_iso()
        self._save_tasks()
        self._broadcast({"type": "update", "task_id": t.id, "template_id": t.template_id,
                         "project_id": self.project_id, "status": status,
                         "start": t.start, "end": t.end, "version": None})

    def _finish(self, t: TaskRecord, status: str) -> None:
        assert status in FINISHED
        t.end = now_iso()
        self._set_status(t, status)
        if t.sleeping is not None:
            t.kill_requested = True
            self.reactor.callLater(0, self._cancel_sleep, t)

    def _finish_if(self, t: TaskRecord, expected: str, status: str) -> None:
        if t.status == expected:
            self._finish(t, status)

    def _cancel_sleep(self, t: TaskRecord) -> None:
        if t.sleeping is not None:
            t.sleeping.cancel()

    def _out(self, t: TaskRecord, line: str) -> None:
        entry = {"time": now_iso(), "output": line}
        t.output.append(entry)
        self._broadcast({"type": "log", "task_id": t.id, "project_id": self.project_id, **entry})

    # ---- VMs

    def _refresh_vms(self) -> None:
        changed = False
        for vm in self.vms:
            if vm.alive and not vm.refresh():
                changed = True
        if changed:
            self._save_vms()

    def kill_vms_blocking(self, vms: list[Vm], reason: str, grace: float = 3.0) -> None:
        """Used on shutdown/reset when the reactor may not turn again."""
        for vm in vms:
            vm.killed_by = vm.killed_by or reason
            vm.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(vm.refresh() for vm in vms) and time.monotonic() < deadline:
            time.sleep(0.02)
        for vm in vms:
            vm.signal_group(signal.SIGKILL)
        deadline = time.monotonic() + 2.0
        while any(vm.refresh() for vm in vms) and time.monotonic() < deadline:
            time.sleep(0.02)

    # ---- websocket

    def _broadcast(self, message: JSON) -> None:
        text = json.dumps(message)
        for client in list(self._ws_clients):
            client.send(text)
