"""The task runner: one task from ``starting`` to its end, playing its template's behaviour.

Each behaviour prints ansible-like output (with ANSI colours, as the real server's log
has) and does what the playbook would: ``start`` spawns a VM process in its own
session and waits for its port, ``stop`` kills the VM process group(s) of a machine,
``error`` fails, ``noop`` succeeds, ``hang_running`` runs until stopped.  Every wait
goes through `TaskRunner._sleep`, so a stop can interrupt it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer
from twisted.internet import task as ttask

from .common import REPO_ROOT, now_iso
from .state import DoubleState
from .tasks import TaskKilled, TaskRecord
from .vms import Vm, free_port, port_open, proc_start_ticks

GREEN, YELLOW, RED, CYAN, RESET = "\x1b[0;32m", "\x1b[0;33m", "\x1b[0;31m", "\x1b[0;36m", "\x1b[0m"


class TaskRunner(DoubleState):
    """`_run` takes one task through its template's behaviour; the queue (`pool.TaskPool`) decides when."""

    async def _sleep(self, t: TaskRecord, seconds: float | None) -> None:
        """Every wait of a runner goes through here, so a stop can interrupt it."""
        if t.kill_requested:
            raise TaskKilled
        d: defer.Deferred[Any] = (
            defer.Deferred() if seconds is None else ttask.deferLater(self.reactor, seconds, lambda: None)
        )
        t.sleeping = d
        try:
            await d
        except defer.CancelledError:
            raise TaskKilled from None
        finally:
            t.sleeping = None
        if t.kill_requested:
            raise TaskKilled

    async def _run(self, t: TaskRecord) -> None:
        tpl = t.template
        try:
            await self._sleep(t, float(tpl["starting_seconds"]))
            self._set_status(t, "running")
            self._out(t, "")
            self._out(t, f"PLAY [{tpl['name']}] " + "*" * 60)
            runner: Callable[[TaskRecord], Awaitable[bool]] = getattr(self, f"_behaviour_{tpl['behaviour']}")
            ok = await runner(t)
            self._finish(t, "success" if ok else "error")
        except TaskKilled:
            if t.status == "stopping":
                self._out(t, f"{RED}[ERROR]: User interrupted execution{RESET}")
                self._out(t, "Running playbook failed: signal: terminated")
                self._finish(t, "error")
        self._save_tasks()

    def _ansible_task(self, t: TaskRecord, name: str) -> None:
        self._out(t, "")
        self._out(t, f"TASK [{name}] " + "*" * max(3, 70 - len(name)))

    def _recap(self, t: TaskRecord, ok: int, changed: int, failed: int) -> None:
        self._out(t, "")
        self._out(t, "PLAY RECAP " + "*" * 69)
        colour = RED if failed else (YELLOW if changed else GREEN)
        self._out(
            t,
            f"{colour}localhost{RESET}                  : {GREEN}ok={ok}   {RESET} "
            f"{YELLOW}changed={changed}   {RESET} unreachable=0    "
            f"{RED if failed else ''}failed={failed}{RESET if failed else ''}    "
            "skipped=0    rescued=0    ignored=0",
        )

    def _fatal(self, t: TaskRecord, msg: str, ok: int = 1) -> bool:
        self._out(t, f'{RED}fatal: [localhost]: FAILED! => {{"changed": false, "msg": {json.dumps(msg)}}}{RESET}')
        self._recap(t, ok=ok, changed=0, failed=1)
        self._out(t, "Running playbook failed: exit status 2")
        return False

    def _machine_of(self, t: TaskRecord) -> str:
        env = t.environment
        return str(env.get("machine_id") or env.get("hestia_service") or f"task-{t.id}")

    async def _behaviour_noop(self, t: TaskRecord) -> bool:
        self._ansible_task(t, "Gathering Facts")
        self._out(t, f"{GREEN}ok: [localhost]{RESET}")
        await self._sleep(t, float(t.template["running_seconds"]))
        self._recap(t, ok=1, changed=0, failed=0)
        return True

    async def _behaviour_error(self, t: TaskRecord) -> bool:
        self._ansible_task(t, "Gathering Facts")
        self._out(t, f"{GREEN}ok: [localhost]{RESET}")
        await self._sleep(t, float(t.template["running_seconds"]))
        self._ansible_task(t, "provision vm")
        return self._fatal(t, t.template["fail_message"])

    async def _behaviour_hang_running(self, t: TaskRecord) -> bool:
        self._ansible_task(t, "wait for capacity")
        await self._sleep(t, None)
        return True  # pragma: no cover - only a stop ends it

    async def _behaviour_hang_waiting(self, t: TaskRecord) -> bool:  # pragma: no cover
        return True  # never scheduled: the queue keeps it waiting

    async def _behaviour_start(self, t: TaskRecord) -> bool:
        tpl = t.template
        env = t.environment
        machine = self._machine_of(t)
        t.machine_id = machine
        self._ansible_task(t, "Gathering Facts")
        self._out(t, f"{GREEN}ok: [localhost]{RESET}")
        self._ansible_task(t, "provision vm")
        existing = next((vm for vm in self.vms if vm.machine_id == machine and vm.refresh()), None)
        if existing is not None and tpl["reuse_existing"]:
            vm = existing
            self._out(t, f"{GREEN}ok: [localhost]{RESET}")
        else:
            port = free_port(self._ports)
            variables: dict[str, Any] = {
                k: (v if isinstance(v, str) else json.dumps(v)) for k, v in env.items()
            }
            variables.update(port=port, task_id=t.id, machine_id=machine, state_dir=str(self.state_dir))
            try:
                argv = [arg.format_map(variables) for arg in tpl["command"]]
            except KeyError as e:
                return self._fatal(
                    t, f"The task includes an option with an undefined variable. {e.args[0]!r} is undefined"
                )
            try:
                vm = self._spawn_vm(t, machine, port, argv)
            except OSError as e:
                return self._fatal(t, f"failed to start VM: {e}")
            self._out(t, f"{YELLOW}changed: [localhost]{RESET}")
        await self._sleep(t, float(tpl["running_seconds"]))
        self._ansible_task(t, "wait for service")
        deadline = time.monotonic() + float(tpl["ready_timeout_seconds"])
        while not port_open(vm.port):
            if not vm.refresh():
                self._save_vms()
                return self._fatal(t, f"VM process exited with {vm.exit_code} before listening", ok=2)
            if time.monotonic() > deadline:
                return self._fatal(t, f"Timeout when waiting for 127.0.0.1:{vm.port}", ok=2)
            await self._sleep(t, 0.05)
        self._out(t, f"{GREEN}ok: [localhost]{RESET}")
        self._ansible_task(t, "report url")
        line = f"hestia_url={vm.url}"
        if tpl["url_output"] in {"debug", "both"}:
            self._out(t, f"{GREEN}ok: [localhost] => {{{RESET}")
            self._out(t, f'{GREEN}    "msg": "{line}"{RESET}')
            self._out(t, f"{GREEN}}}{RESET}")
        if tpl["url_output"] in {"plain", "both"}:
            self._out(t, line)
        self._recap(t, ok=4, changed=0 if vm is existing else 1, failed=0)
        return True

    def _spawn_vm(self, t: TaskRecord, machine: str, port: int, argv: list[str]) -> Vm:
        """Start the VM stand-in in its own session, so killing its group powers it off."""
        tpl = t.template
        if argv[0] in {"python", "python3"}:
            argv[0] = sys.executable
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", machine)
        log_path = self.state_dir / f"vm-{safe}-{t.id}.log"
        with log_path.open("ab") as logf:
            proc = subprocess.Popen(
                argv, cwd=REPO_ROOT / tpl["cwd"], stdin=subprocess.DEVNULL, stdout=logf,
                stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **tpl["env"]},
            )
        vm = Vm(machine_id=machine, service=t.environment.get("hestia_service"), pid=proc.pid,
                port=port, url=f"http://127.0.0.1:{port}", task_id=t.id, argv=argv,
                log=str(log_path), started_at=now_iso(),
                start_ticks=proc_start_ticks(proc.pid), proc=proc)
        self.vms.append(vm)
        self._save_vms()
        return vm

    async def _behaviour_stop(self, t: TaskRecord) -> bool:
        env = t.environment
        self._ansible_task(t, "Gathering Facts")
        self._out(t, f"{GREEN}ok: [localhost]{RESET}")
        self._ansible_task(t, "destroy vm")
        if "machine_id" in env:
            t.machine_id = str(env["machine_id"])
            targets = [vm for vm in self.vms if vm.machine_id == t.machine_id and vm.refresh()]
        elif "hestia_service" in env:
            targets = [vm for vm in self.vms if vm.service == env["hestia_service"] and vm.refresh()]
        else:
            return self._fatal(t, "The task includes an option with an undefined variable. "
                                  "'machine_id' is undefined")
        await self._sleep(t, float(t.template["running_seconds"]))
        grace = float(t.template["kill_grace_seconds"])
        for vm in targets:
            vm.killed_by = f"task {t.id}"
            vm.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(vm.refresh() for vm in targets) and time.monotonic() < deadline:
            await self._sleep(t, 0.02)
        for vm in targets:
            vm.signal_group(signal.SIGKILL)  # also sweeps children that outlived their leader
        while any(vm.refresh() for vm in targets):
            await self._sleep(t, 0.02)
        self._save_vms()
        self._out(t, f"{YELLOW}changed: [localhost]{RESET}" if targets else f"{GREEN}ok: [localhost]{RESET}")
        self._recap(t, ok=2, changed=1 if targets else 0, failed=0)
        return True
