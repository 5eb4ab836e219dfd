"""Scenarios: the templates the double offers, how each behaves, and the top-level settings.

A scenario is a JSON or YAML file, an in-process dict, or at runtime
``POST /_double/templates/{id}`` and ``POST /_double/settings``; it is validated up
front (unknown keys are rejected) so a typo in a test's scenario fails loudly.  The
format is in the package docstring (`support.semaphore_double`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator

from .common import JSON, str_keys

BEHAVIOURS = ("start", "stop", "hang_waiting", "hang_running", "error", "noop")

_NUM = {"type": "number", "minimum": 0}
TEMPLATE_SCHEMA: JSON = {
    "type": "object",
    "additionalProperties": False,
    "required": ["behaviour"],
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "behaviour": {"enum": list(BEHAVIOURS)},
        "name": {"type": "string"},
        "playbook": {"type": "string"},
        "description": {"type": "string"},
        "command": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "cwd": {"type": "string"},
        "env": {"type": "object", "additionalProperties": {"type": "string"}},
        "waiting_seconds": _NUM,
        "starting_seconds": _NUM,
        "running_seconds": _NUM,
        "ready_timeout_seconds": _NUM,
        "stop_delay_seconds": _NUM,
        "kill_grace_seconds": _NUM,
        "reuse_existing": {"type": "boolean"},
        "url_output": {"enum": ["plain", "debug", "both"]},
        "fail_message": {"type": "string"},
    },
    "if": {"properties": {"behaviour": {"const": "start"}}},
    "then": {"required": ["command"]},
}
SCENARIO_SCHEMA: JSON = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "queue_interval_seconds": {"type": "number", "exclusiveMinimum": 0},
        "max_parallel_tasks": {"type": "integer", "minimum": 0},
        "legacy_errors": {"type": "boolean"},
        "role": {"enum": ["task_runner", "guest"]},
        # Each entry is checked by TemplateConfig.from_config, for messages naming the template.
        "templates": {"type": ["object", "array"]},
    },
}


@dataclass
class TemplateConfig:
    """How one Semaphore template behaves in the double (a scenario entry plus defaults)."""

    id: int
    behaviour: str
    name: str = ""
    playbook: str = ""
    description: str = ""
    command: list[str] | None = None
    cwd: str = "."
    env: dict[str, str] = field(default_factory=dict)
    waiting_seconds: float = 0.0
    starting_seconds: float = 0.05
    running_seconds: float = 0.1
    ready_timeout_seconds: float = 10.0
    stop_delay_seconds: float = 0.1
    kill_grace_seconds: float = 3.0
    reuse_existing: bool = True
    url_output: str = "plain"
    fail_message: str = "simulated provisioning failure"

    @classmethod
    def from_config(cls, template_id: int, raw: JSON) -> TemplateConfig:
        errors = sorted(e.message for e in Draft202012Validator(TEMPLATE_SCHEMA).iter_errors(raw))
        if errors:
            raise ValueError(f"template {template_id}: " + "; ".join(errors))
        data = {k: v for k, v in raw.items() if k != "id"}
        tpl = cls(id=template_id, **data)
        tpl.name = tpl.name or f"{tpl.behaviour} (template {template_id})"
        tpl.playbook = tpl.playbook or f"{tpl.behaviour}.yml"
        return tpl

    def as_dict(self) -> JSON:
        return dict(self.__dict__)


def parse_scenario(raw: JSON | None) -> tuple[JSON, dict[int, TemplateConfig]]:
    """Validate a scenario up front: a typo in a test's scenario should fail loudly."""
    raw = str_keys(raw or {})
    errors = sorted(e.message for e in Draft202012Validator(SCENARIO_SCHEMA).iter_errors(raw))
    if errors:
        raise ValueError("invalid scenario: " + "; ".join(errors))
    templates: dict[int, TemplateConfig] = {}
    entries = raw.get("templates", {})
    if isinstance(entries, dict):
        items = list(entries.items())
    else:
        items = [(e.get("id") if isinstance(e, dict) else None, e) for e in entries]
    for key, cfg in items:
        if not (isinstance(key, int) or (isinstance(key, str) and key.isdigit())):
            raise ValueError(f"invalid scenario: template key {key!r} is not a positive integer id")
        templates[int(key)] = TemplateConfig.from_config(int(key), cfg)
    settings = {k: v for k, v in raw.items() if k != "templates"}
    return settings, templates


def load_scenario_file(path: str | Path) -> JSON:
    text = Path(path).read_text(encoding="utf-8")
    return json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text) or {}
