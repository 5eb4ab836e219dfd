"""The out-of-band ``/_double/...`` endpoints tests use (no auth, never validated against the spec).

They list and change what the double holds (settings, templates, tasks, VMs), return
the violations and warnings it recorded, kill a VM behind the gateway's back and reset
the double.  The list is in the package docstring (`support.semaphore_double`).
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from .common import JSON
from .replies import ApiError, Reply
from .scenario import TemplateConfig
from .state import DoubleState


class AdminEndpoints(DoubleState):
    """``/_double/...``: what tests read and change behind the API's back."""

    def _admin(self, method: str, path: str, raw_body: bytes) -> Reply:
        parts = [p for p in path.split("/") if p][1:]
        body: Any = None
        if raw_body.strip():
            try:
                body = json.loads(raw_body)
            except ValueError:
                raise ApiError(400, {"error": "body is not JSON"}) from None
        route = (method, parts[0] if parts else "")
        if route == ("GET", "info"):
            return Reply(200, {"pid": os.getpid(), "project_id": self.project_id, "token_set": bool(self.token),
                               "spec_version": self.spec.version, "spec_path": str(self.spec.path),
                               "state_dir": str(self.state_dir), **self.settings()})
        if route == ("GET", "settings"):
            return Reply(200, self.settings())
        if route == ("POST", "settings"):
            try:
                self.apply_settings(body or {})
            except ValueError as e:
                raise ApiError(400, {"error": str(e)}) from None
            return Reply(200, self.settings())
        if route == ("GET", "violations"):
            return Reply(200, self.violations)
        if route == ("DELETE", "violations"):
            self.violations.clear()
            return Reply(204)
        if route == ("GET", "warnings"):
            return Reply(200, self.warnings)
        if route == ("DELETE", "warnings"):
            self.warnings.clear()
            return Reply(204)
        if route == ("GET", "tasks"):
            return Reply(200, [t.admin() for t in self.tasks.values()])
        if route == ("GET", "vms"):
            self._refresh_vms()
            return Reply(200, [vm.public() for vm in self.vms])
        if route == ("POST", "vms") and parts[1:] == ["kill"]:
            return Reply(200, self._admin_kill_vms(body or {}))
        if route == ("GET", "templates"):
            return Reply(200, [t.as_dict() for t in self.templates.values()])
        if parts[:1] == ["templates"] and len(parts) == 2 and parts[1].isdigit():
            tid = int(parts[1])
            if method == "POST":
                try:
                    self.templates[tid] = TemplateConfig.from_config(tid, body or {})
                except (ValueError, TypeError) as e:
                    raise ApiError(400, {"error": str(e)}) from None
                return Reply(200, self.templates[tid].as_dict())
            if method == "DELETE":
                self.templates.pop(tid, None)
                return Reply(204)
        if route == ("POST", "reset"):
            self.reset()
            return Reply(204)
        raise ApiError(404, {"error": f"no double endpoint {method} {path}"})

    def _admin_kill_vms(self, body: JSON) -> list[JSON]:
        sig = getattr(signal, "SIG" + str(body.get("signal", "KILL")).upper().removeprefix("SIG"))
        killed = []
        for vm in self.vms:
            if not vm.refresh():
                continue
            if any(k in body and body[k] == v for k, v in
                   (("machine_id", vm.machine_id), ("service", vm.service), ("pid", vm.pid))):
                vm.killed_by = "double-admin"
                vm.signal_group(sig)
                killed.append(vm.public())
        self._save_vms()
        return killed
