"""VMs: the backend processes that ``start`` tasks provision, and the ports they listen on.

A `Vm` is a process group standing in for a machine; it is persisted in ``vms.json``
(with the process start time from /proc, so a restarted double never signals a
recycled pid) and re-checked for liveness on every look.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .common import JSON, now_iso


def proc_start_ticks(pid: int) -> int | None:
    """Process start time from /proc: guards against killing a recycled pid after a restart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


@dataclass
class Vm:
    """A backend process standing in for a VM that a ``start`` task provisioned."""

    machine_id: str
    service: str | None
    pid: int
    port: int
    url: str
    task_id: int
    argv: list[str]
    log: str
    started_at: str
    start_ticks: int | None = None
    alive: bool = True
    stopped_at: str | None = None
    exit_code: int | None = None
    killed_by: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def refresh(self) -> bool:
        """Re-check liveness (reaping our own children) and return it."""
        if not self.alive:
            return False
        if self.proc is not None:
            code = self.proc.poll()
            dead = code is not None
        else:
            code = None
            ticks = proc_start_ticks(self.pid)
            dead = ticks is None or (self.start_ticks is not None and ticks != self.start_ticks)
        if dead:
            self.alive = False
            self.exit_code = code
            self.stopped_at = now_iso()
        return self.alive

    def signal_group(self, sig: int) -> None:
        """Signal the whole process group: a VM going away takes its children with it."""
        recycled = (self.proc is None and self.start_ticks is not None
                    and proc_start_ticks(self.pid) != self.start_ticks)
        if recycled:
            return  # not our process any more: never signal a stranger
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def public(self) -> JSON:
        d = {k: v for k, v in self.__dict__.items() if k != "proc"}
        return d

    @classmethod
    def from_dict(cls, d: JSON) -> Vm:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "proc"}
        return cls(**known)


def free_port(avoid: set[int]) -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in avoid:
            avoid.add(port)
            return port
    raise RuntimeError("no free port")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
