"""Tasks: one Semaphore task's record (status, history, output, stop requests) and its views.

`TaskRecord.api` is the Task as the real API shows it, `TaskRecord.admin` what
``GET /_double/tasks`` shows tests; `TaskRecord.to_state` what ``tasks.json`` keeps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer

from .common import JSON, now_iso

FINISHED = frozenset({"success", "error", "stopped"})
ACTIVE = frozenset({"starting", "running", "stopping"})


class TaskKilled(Exception):
    """Raised inside a task runner when a stop lands, like ansible receiving a signal."""


@dataclass
class TaskRecord:
    id: int
    template_id: int
    template: JSON  # snapshot of the TemplateConfig when the task was created
    request: JSON
    environment_raw: str
    environment: JSON
    status: str = "waiting"
    created: str = field(default_factory=now_iso)
    start: str | None = None
    end: str | None = None
    history: list[JSON] = field(default_factory=list)
    output: list[JSON] = field(default_factory=list)
    stop_requests: list[JSON] = field(default_factory=list)
    stale: bool = False
    machine_id: str | None = None
    enqueued_at: float = field(default_factory=time.monotonic)
    kill_requested: bool = False
    sleeping: defer.Deferred[Any] | None = field(default=None, repr=False)

    PERSISTED = (
        "id", "template_id", "template", "request", "environment_raw", "environment",
        "status", "created", "start", "end", "history", "output", "stop_requests",
        "stale", "machine_id",
    )

    def to_state(self) -> JSON:
        return {k: getattr(self, k) for k in self.PERSISTED}

    @classmethod
    def from_state(cls, d: JSON) -> TaskRecord:
        return cls(**{k: d[k] for k in cls.PERSISTED if k in d})

    def api(self, project_id: int, inventory_id: int = 1) -> JSON:
        """The Task as the real API shows it (fields outside the spec are unconstrained)."""
        r = self.request
        return {
            "id": self.id,
            "template_id": self.template_id,
            "project_id": project_id,
            "status": self.status,
            "debug": bool(r.get("debug", False)),
            "dry_run": bool(r.get("dry_run", False)),
            "diff": bool(r.get("diff", False)),
            "playbook": r.get("playbook", ""),
            "environment": self.environment_raw,
            "secret": "",
            "limit": r.get("limit", ""),
            "git_branch": r.get("git_branch", ""),
            "arguments": r.get("arguments", ""),
            "inventory_id": r.get("inventory_id", inventory_id),
            "message": r.get("message", ""),
            "params": {
                "debug": bool(r.get("debug", False)),
                "dry_run": bool(r.get("dry_run", False)),
                "diff": bool(r.get("diff", False)),
            },
            "user_id": None,
            "created": self.created,
            "start": self.start,
            "end": self.end,
            "commit_hash": None,
            "commit_message": "",
            "build_task_id": None,
            "version": None,
        }

    def admin(self) -> JSON:
        return {
            "id": self.id,
            "template_id": self.template_id,
            "template_name": self.template.get("name"),
            "behaviour": self.template.get("behaviour"),
            "environment": self.environment,
            "environment_raw": self.environment_raw,
            "request": self.request,
            "status": self.status,
            "status_history": self.history,
            "created": self.created,
            "start": self.start,
            "end": self.end,
            "machine_id": self.machine_id,
            "stop_requested": bool(self.stop_requests),
            "stop_requests": self.stop_requests,
            "stale_after_restart": self.stale,
            "output_lines": len(self.output),
        }
