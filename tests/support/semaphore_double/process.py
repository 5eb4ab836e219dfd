"""The double as a real subprocess, for tests: `DoubleProcess` and a leftover-process check.

`DoubleProcess` runs ``python tests/support/semaphore_double`` (this package's
``__main__``), learns the port from ``double.json`` and talks to the ``/_double``
endpoints; `iter_pids_alive` is for "nothing left behind" checks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

from .common import JSON
from .vms import Vm, proc_start_ticks

PACKAGE_DIR = Path(__file__).resolve().parent


class DoubleProcess:
    """Runs the double as a real subprocess for tests; use as a context manager.

    Listens on a port the double picks itself (``--port 0``) and reports through
    ``double.json``, so two test sessions never race for a port.  ``stop()`` sends
    SIGTERM (the double then kills its VMs) and, as a last resort, kills any VM
    still alive in ``vms.json`` so a test run never leaks processes.
    """

    def __init__(
        self,
        state_dir: str | Path,
        *,
        token: str = "test-token",
        project_id: int = 1,
        scenario: JSON | str | Path | None = None,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.token = token
        self.project_id = project_id
        self.scenario = scenario
        self.extra_args = extra_args
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.url}/api"

    def start(self, timeout: float = 15.0) -> Self:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        info = self.state_dir / "double.json"
        info.unlink(missing_ok=True)
        argv = [sys.executable, str(PACKAGE_DIR), "--port", "0", "--token", self.token,
                "--project-id", str(self.project_id), "--state-dir", str(self.state_dir), *self.extra_args]
        if isinstance(self.scenario, dict):
            scenario_file = self.state_dir / "scenario.json"
            scenario_file.write_text(json.dumps(self.scenario))
            argv += ["--scenario-file", str(scenario_file)]
        elif self.scenario is not None:  # a JSON/YAML file the caller wrote
            argv += ["--scenario-file", str(self.scenario)]
        self.proc = subprocess.Popen(argv, env={**os.environ, **(self.env or {})})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"semaphore double exited with {self.proc.returncode}")
            if info.exists():
                try:
                    self.port = int(json.loads(info.read_text())["port"])
                    return self
                except (ValueError, KeyError):
                    pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("semaphore double did not start in time")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode if self.proc is not None else None
        if sig != signal.SIGKILL:
            self.kill_leftover_vms()
        return code

    def kill_leftover_vms(self) -> None:
        vms_file = self.state_dir / "vms.json"
        if not vms_file.exists():
            return
        for d in json.loads(vms_file.read_text())["vms"]:
            vm = Vm.from_dict(d)
            if vm.refresh():
                vm.signal_group(signal.SIGKILL)

    def __enter__(self) -> Self:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        """Call a /_double endpoint and decode its JSON (None for 204)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}/_double/{path.lstrip('/')}", data=data, method=method,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def violations(self) -> list[JSON]:
        return list(self.admin("GET", "violations"))

    def tasks(self) -> list[JSON]:
        return list(self.admin("GET", "tasks"))

    def vms(self) -> list[JSON]:
        return list(self.admin("GET", "vms"))


def iter_pids_alive(pids: list[int]) -> Iterator[int]:
    """Pids from the list that still exist (not zombies): for "nothing left behind" checks."""
    for pid in pids:
        if proc_start_ticks(pid) is not None:
            yield pid
