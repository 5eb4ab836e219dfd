#!/usr/bin/env python3
"""A faithful test double of Semaphore UI's HTTP API (2.16.x), for Hestia's tests.

Semaphore cannot run on the test machine, yet Hestia starts remote services by
launching Semaphore tasks.  A hand-rolled mock that answers whatever the gateway
expects would let protocol bugs through, so this double is held to two
independent references and records every departure from them:

* ``tests/support/semaphore_contract.yml``, the part of Semaphore's own Swagger 2.0
  description that Hestia relies on, copied unchanged into the repository by
  ``tests/support/semaphore_contract.py`` (loaded once; ``$SEMAPHORE_API_DOCS`` may name
  Semaphore's whole ``api-docs.yml`` instead).  Every
  ``in: body`` request is validated against the operation's schema (``#/definitions``
  refs resolved through a ``referencing`` registry, Draft 4 semantics like Swagger
  2.0): a failure is answered 400 and recorded as a *protocol violation*.  Every
  response the double produces is validated against the operation's response
  schema: a failure is a bug in the double and is recorded too.  Requests to paths
  or methods the spec does not have are violations; spec operations the double
  does not model answer 501 and are recorded, so nobody silently relies on them.
* Semaphore's ``NOTES.md`` (behaviour of the real server the spec omits; kept in
  the contract as ``x-hestia-notes``).
  Rules implemented here, in NOTES order:

  - Auth: ``Authorization: Bearer <token>``; unknown or missing token -> 401 with an
    empty body.  Unknown project -> 404.  With ``role: guest`` (a role that cannot
    run tasks) every non-GET project call is a 403 (recorded as a warning, since
    it is server configuration, not a client mistake).
  - ``GET``/``HEAD /api/ping`` -> ``200 pong`` as text/plain, no login needed.
  - ``POST /api/project/{id}/tasks`` -> 201 with the Task in status ``waiting``.
    ``template_id`` must be a JSON integer and booleans JSON booleans (schema);
    ``environment`` must be a *string* holding a JSON object (an object is a 400
    by schema, a string that is not a JSON object is a 400 ``{"error": ...}``);
    ``arguments`` a string holding a JSON array.  ``template_name`` is accepted
    when ``template_id`` is absent.  A missing template is 404 (or, with
    ``legacy_errors``, the older servers' 500 with an empty body, also used for a
    bad ``environment``).
  - A second task for the same template stays ``waiting`` until the first one
    finishes; ``max_parallel_tasks`` holds tasks in ``waiting`` too.  The queue is
    looked at every ``queue_interval_seconds`` (real server: 5 s; default here
    0.2 s so tests stay fast).
  - ``GET .../tasks/{task_id}`` of a task that does not exist -> **400**, not 404.
  - Statuses go ``waiting -> starting -> running -> success|error``, with
    ``stopping``/``stopped`` on stop; the finished ones are exactly ``success``,
    ``error`` and ``stopped``.  Tasks can stay ``waiting`` forever
    (``hang_waiting``) or ``running`` forever (``hang_running``; also every task
    that was unfinished when the double itself was restarted on the same
    ``--state-dir``: it is *stale*, like tasks after a real server restart).
  - ``.../output`` answers the whole log every time as ``[{task_id, time, output}]``;
    ansible lines carry ANSI colour codes.  ``.../raw_output`` is text/plain.
  - ``GET /api/ws`` (same auth) is a WebSocket pushing
    ``{"type": "update", "task_id", "status", ...}`` on every status change (and
    ``{"type": "log", ...}`` per output line, as the real server does).
  - ``POST .../stop`` needs a JSON body (``{}`` or ``{"force": true}``) -> 204; an
    empty body is a 400.  A normal stop of a starting/running task goes
    ``stopping`` then ends ``error`` (NOTES: "often ends as error"; the double
    always does, so clients must remember they asked); a forced stop ends
    ``stopped``.  A normal stop of a waiting task goes ``stopping -> stopped``.
    Stopping a task that already finished rewrites it to ``stopped`` (NOTES name
    ``success``; the real TaskPool does it for every task no longer in the pool,
    so the double does it for ``error``/``stopped`` and stale tasks as well).
  - Errors are a status code with an empty body, except content errors on task
    creation which carry ``{"error": "..."}``.  No rate limiting.

Templates come from a *scenario* (JSON or YAML file, an in-process dict, or at
runtime ``POST /_double/templates/{id}``); each template has a behaviour:

``start``        really starts a backend process standing in for a VM (the
                 scenario's ``command``; ``{port}`` is a free loopback port, other
                 ``{var}``s come from the task's environment JSON plus ``task_id``,
                 ``machine_id`` and ``state_dir``; ``python``/``python3`` as argv[0]
                 means this interpreter), in its own process group; waits for the
                 port to accept connections; prints ``hestia_url=http://127.0.0.1:P``.
                 An alive VM for the same machine is reused (ansible is idempotent).
``stop``         kills the VM process group(s) of the environment's ``machine_id``
                 (else ``hestia_service``): SIGTERM, then SIGKILL after a grace.
``hang_waiting`` stays ``waiting`` until stopped.
``hang_running`` runs forever until stopped.
``error``        prints a failing play (``fatal: [localhost]: FAILED! => ...``), ends ``error``.
``noop``         prints a trivial play and succeeds.

Scenario format (YAML shown; JSON alike; unknown keys are rejected)::

    queue_interval_seconds: 0.2      # how often the queue is looked at (real: 5)
    max_parallel_tasks: 0            # 0 = unlimited
    legacy_errors: false             # true: missing template / bad env -> 500, empty body
    role: task_runner                # or guest: non-GET project calls -> 403
    templates:                       # mapping id -> config, or a list of configs with "id"
      1:
        behaviour: start
        name: Start VM               # optional; also playbook, description
        command: [python, tests/support/backend.py, --port, "{port}", --name, "{hestia_service}"]
        cwd: .                       # relative to the repo root (default: repo root)
        env: {EXTRA: "1"}            # extra environment for the VM process
        waiting_seconds: 0           # minimum time in "waiting"
        starting_seconds: 0.05       # time in "starting"
        running_seconds: 0.1         # time in "running" after the VM is spawned
        ready_timeout_seconds: 10    # port must accept connections by then
        stop_delay_seconds: 0.1      # how long a stop takes to land
        kill_grace_seconds: 3        # SIGTERM -> SIGKILL escalation for "stop"
        reuse_existing: true
        url_output: plain            # plain | debug (ansible debug block) | both
        fail_message: "..."          # for "error"

Out-of-band endpoints for tests (no auth, never validated against the spec):

``GET /_double/info``             port, pid, project, spec version, state dir
``GET|DELETE /_double/violations`` protocol violations (tests assert ``[]``)
``GET|DELETE /_double/warnings``   suspicious but legal use (e.g. stopping a finished task)
``GET /_double/tasks``            every task: template, parsed environment, request,
                                  status history, stop requests (with bodies)
``GET /_double/vms``              ``[{machine_id, service, pid, port, url, alive, ...}]``
``POST /_double/vms/kill``        ``{"machine_id"|"service"|"pid": ..., "signal": "KILL"}``:
                                  simulate a VM dying behind the gateway's back
``GET /_double/templates``, ``POST|DELETE /_double/templates/{id}``
``GET|POST /_double/settings``    the scenario's top-level keys, changeable at runtime
``POST /_double/reset``           kill all VMs, cancel tasks, clear tasks/violations/warnings

Violation kinds -- the client's fault: ``unauthorized`` (401), ``unknown_project``,
``unknown_endpoint``, ``unknown_template`` (404), ``method_not_allowed`` (405),
``request_schema``, ``empty_body``, ``invalid_json``, ``path_parameter``,
``missing_template``, ``environment_not_json``, ``environment_not_object``,
``arguments_not_array`` (400; 500 with ``legacy_errors`` where the old server did);
the double's fault or limit: ``double_response_schema``, ``double_undeclared_status``,
``double_internal_error``, ``not_modelled_by_double`` (501).  A 400 for an unknown
task id is *not* a violation (a client may poll a task a restarted server forgot).

VMs and tasks persist in ``--state-dir`` (``vms.json``, ``tasks.json``; VM logs
``vm-*.log``; ``double.json`` with the port once listening) so a restarted double
still knows its VMs.  SIGTERM/SIGINT kill the VM processes unless
``--keep-vms-on-exit``.

Run:  ``python tests/support/semaphore_double.py --port 0 --token T --project-id 1 --state-dir DIR
[--scenario-file FILE]``; in-process: ``SemaphoreDouble(...).listen()``; from tests:
``DoubleProcess(...)`` (a context manager that runs the real subprocess).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import yaml
from jsonschema import Draft4Validator, Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4
from twisted.internet import defer
from twisted.internet import task as ttask
from twisted.internet.interfaces import IListeningPort
from twisted.python.failure import Failure
from twisted.web import resource, server

JSON = dict[str, Any]
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SPEC_PATH = REPO_ROOT / "tests" / "support" / "semaphore_contract.yml"
SPEC_URI = "urn:semaphore:api-docs"

FINISHED = frozenset({"success", "error", "stopped"})
ACTIVE = frozenset({"starting", "running", "stopping"})
BEHAVIOURS = ("start", "stop", "hang_waiting", "hang_running", "error", "noop")

GREEN, YELLOW, RED, CYAN, RESET = "\x1b[0;32m", "\x1b[0;33m", "\x1b[0;31m", "\x1b[0;36m", "\x1b[0m"


def now_iso() -> str:
    """Timestamps look like Go's RFC 3339 output, which is what a client parses."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _str_keys(node: Any) -> Any:
    """YAML turns ``200:`` into an int key; JSON pointers and JSON Schema need strings."""
    if isinstance(node, dict):
        return {str(k): _str_keys(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_str_keys(v) for v in node]
    return node


def _pointer_escape(segment: str) -> str:
    return segment.replace("~", "~0").replace("/", "~1")


# --------------------------------------------------------------------------- spec


@dataclass
class Operation:
    """One (method, path) of the spec, with pointers to the schemas that judge it."""

    method: str
    path: str
    public: bool
    params: list[JSON]
    body_required: bool
    body_pointer: str | None
    responses: dict[str, str | None]  # status code -> pointer to schema (None: no schema)


@dataclass
class Route:
    path: str
    regex: re.Pattern[str]
    literal_segments: int
    operations: dict[str, Operation]


class ApiSpec:
    """Semaphore's Swagger document, compiled once into routes and cached validators."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open(encoding="utf-8") as fh:
            # The C loader parses the 4000-line spec ~10x faster: double start-up is test latency.
            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
            self.doc: JSON = _str_keys(yaml.load(fh, Loader=loader))
        self.version = str(self.doc.get("info", {}).get("version", "?"))
        self.base_path = str(self.doc.get("basePath", "")).rstrip("/")
        self.registry: Registry = Registry().with_resource(
            SPEC_URI, Resource.from_contents(self.doc, default_specification=DRAFT4)
        )
        self._validators: dict[str, Draft4Validator] = {}
        self.routes = self._compile_routes()

    def _resolve_param(self, param: JSON) -> tuple[JSON, str | None]:
        """Follow a ``#/parameters/x`` ref; also return where the real object lives."""
        ref = param.get("$ref")
        if not ref:
            return param, None
        name = ref.rsplit("/", 1)[-1]
        return self.doc["parameters"][name], f"/parameters/{_pointer_escape(name)}"

    def _compile_routes(self) -> list[Route]:
        routes: list[Route] = []
        global_security = self.doc.get("security", [])
        for path, item in self.doc.get("paths", {}).items():
            esc = _pointer_escape(path)
            path_params = [self._resolve_param(p)[0] for p in item.get("parameters", [])]
            ops: dict[str, Operation] = {}
            for method, op in item.items():
                if method not in {"get", "put", "post", "delete", "patch", "head", "options"}:
                    continue
                params = {(p["in"], p["name"]): p for p in path_params}
                body_pointer: str | None = None
                body_required = False
                for i, raw in enumerate(op.get("parameters", [])):
                    p, where = self._resolve_param(raw)
                    params[(p["in"], p["name"])] = p
                    if p["in"] == "body":
                        body_pointer = (where or f"/paths/{esc}/{method}/parameters/{i}") + "/schema"
                        body_required = bool(p.get("required", False))
                responses = {
                    code: (f"/paths/{esc}/{method}/responses/{code}/schema" if "schema" in r else None)
                    for code, r in op.get("responses", {}).items()
                }
                ops[method.upper()] = Operation(
                    method=method.upper(),
                    path=path,
                    public=op.get("security", global_security) == [],
                    params=list(params.values()),
                    body_required=body_required,
                    body_pointer=body_pointer,
                    responses=responses,
                )
            pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path))
            literal = sum(1 for seg in path.split("/") if seg and not seg.startswith("{"))
            routes.append(Route(path, re.compile(f"^{pattern}$"), literal, ops))
        # "/tasks/last" must win over "/tasks/{task_id}": more literal segments first.
        routes.sort(key=lambda r: -r.literal_segments)
        return routes

    def match(self, path: str) -> tuple[Route, dict[str, str]] | None:
        for route in self.routes:
            m = route.regex.match(path)
            if m:
                return route, m.groupdict()
        return None

    def validator(self, pointer: str) -> Draft4Validator:
        """A validator for the schema at ``pointer``; refs inside resolve against the whole doc."""
        v = self._validators.get(pointer)
        if v is None:
            v = Draft4Validator({"$ref": f"{SPEC_URI}#{pointer}"}, registry=self.registry)
            self._validators[pointer] = v
        return v

    def errors(self, pointer: str, instance: Any) -> list[str]:
        out = []
        for e in self.validator(pointer).iter_errors(instance):
            where = "/".join(str(x) for x in e.absolute_path) or "<root>"
            out.append(f"{where}: {e.message}")
        return sorted(out)


@functools.lru_cache(maxsize=4)
def load_spec(path: str | None = None) -> ApiSpec:
    """The spec is ~4000 lines of YAML: parse it once per process and path."""
    chosen = Path(path or os.environ.get("SEMAPHORE_API_DOCS") or DEFAULT_SPEC_PATH)
    return ApiSpec(chosen)


# ----------------------------------------------------------------------- scenario

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
    raw = _str_keys(raw or {})
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


# -------------------------------------------------------------------------- VMs


def _proc_start_ticks(pid: int) -> int | None:
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
            ticks = _proc_start_ticks(self.pid)
            dead = ticks is None or (self.start_ticks is not None and ticks != self.start_ticks)
        if dead:
            self.alive = False
            self.exit_code = code
            self.stopped_at = now_iso()
        return self.alive

    def signal_group(self, sig: int) -> None:
        """Signal the whole process group: a VM going away takes its children with it."""
        recycled = (self.proc is None and self.start_ticks is not None
                    and _proc_start_ticks(self.pid) != self.start_ticks)
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


# ------------------------------------------------------------------------ tasks


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


# ---------------------------------------------------------------------- replies


@dataclass
class Reply:
    """What a handler answers: JSON (dict/list), text (str) or nothing (None)."""

    status: int
    body: Any = None
    content_type: str | None = None


class ApiError(Exception):
    """A non-2xx answer; ``kind`` set means the client broke the protocol (a violation)."""

    def __init__(self, status: int, body: Any = None, kind: str | None = None, detail: Any = None):
        super().__init__(f"{status} {kind}: {detail}")
        self.status, self.body, self.kind, self.detail = status, body, kind, detail


@dataclass
class Ctx:
    request: server.Request
    op: Operation
    params: dict[str, Any]
    query: dict[str, str]
    body: Any
    raw_body: bytes


_NOT_DONE = object()


# ------------------------------------------------------------------ the double


class SemaphoreDouble:
    """The double's state machine and HTTP front; one instance per fake Semaphore server."""

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
        self._ws_clients: set[_WsClient] = set()
        self._loop: ttask.LoopingCall | None = None
        self._handlers = self._build_handlers()
        self.resource = _Root(self)
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
        loop = getattr(self, "_loop", None)
        if loop is not None and "queue_interval_seconds" in settings:
            self._loop = None
            loop.stop()
            self.start()

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

    # ---- lifecycle

    def start(self) -> None:
        """Start looking at the queue (the real server's 5-second task-pool tick)."""
        if self._loop is None:
            self._loop = ttask.LoopingCall(self._tick)
            self._loop.clock = self.reactor
            self._loop.start(self.queue_interval, now=False)

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> IListeningPort:
        self.start()
        listening: IListeningPort = self.reactor.listenTCP(
            port, server.Site(self.resource), interface=interface
        )
        return listening

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

    # ---- HTTP

    def handle(self, request: server.Request) -> bytes | int:
        method = request.method.decode("latin-1").upper()
        path = urllib.parse.unquote(request.path.decode("latin-1"))
        raw_body = request.content.read() if request.content is not None else b""
        if path == "/_double" or path.startswith("/_double/"):
            try:
                reply = self._admin(method, path, raw_body)
            except ApiError as e:
                reply = Reply(e.status, e.body)
            return self._write_reply(request, reply)
        op: Operation | None = None
        try:
            op, reply_or_marker = self._api(request, method, path, raw_body)
        except ApiError as e:
            if e.kind:
                self.violation(e.kind, method, path, e.status, e.detail)
            reply_or_marker = Reply(e.status, e.body)
        except Exception as e:  # noqa: BLE001 - a double crash must be loud, not a hung test
            self.violation("double_internal_error", method, path, 500, repr(e))
            reply_or_marker = Reply(500)
        if reply_or_marker is _NOT_DONE:
            return server.NOT_DONE_YET
        assert isinstance(reply_or_marker, Reply)
        if op is not None:
            self._check_reply(op, method, path, reply_or_marker)
        return self._write_reply(request, reply_or_marker)

    def _write_reply(self, request: server.Request, reply: Reply) -> bytes:
        request.setResponseCode(reply.status)
        if reply.body is None:
            request.defaultContentType = None
            return b""
        if isinstance(reply.body, str):
            request.setHeader(b"content-type", (reply.content_type or "text/plain; charset=utf-8").encode())
            return reply.body.encode("utf-8")
        request.setHeader(b"content-type", (reply.content_type or "application/json").encode())
        return json.dumps(reply.body).encode("utf-8")

    def _check_reply(self, op: Operation, method: str, path: str, reply: Reply) -> None:
        """Responses are judged by the same spec as requests: a mismatch is a double bug."""
        code = str(reply.status)
        if reply.status < 400 and code not in op.responses:
            self.violation("double_undeclared_status", method, path, reply.status,
                           f"spec declares {sorted(op.responses)}")
        pointer = op.responses.get(code)
        if pointer is not None:
            if reply.body is None:
                self.violation("double_response_schema", method, path, reply.status, "empty body")
            else:
                errs = self.spec.errors(pointer, reply.body)
                if errs:
                    self.violation("double_response_schema", method, path, reply.status, errs)
        if reply.status == 204 and reply.body is not None:
            self.violation("double_response_schema", method, path, 204, "204 with a body")

    def _api(
        self, request: server.Request, method: str, path: str, raw_body: bytes
    ) -> tuple[Operation | None, Reply | object]:
        base = self.spec.base_path
        if not path.startswith(base + "/"):
            raise ApiError(404, kind="unknown_endpoint", detail="outside basePath")
        sub = path[len(base):]
        found = self.spec.match(sub)
        if found is None:
            raise ApiError(404, kind="unknown_endpoint", detail="no such path in the spec")
        route, raw_params = found
        lookup = "GET" if method == "HEAD" and route.path == "/ping" else method
        op = route.operations.get(lookup)
        if op is None:
            raise ApiError(405, kind="method_not_allowed", detail=f"spec allows {sorted(route.operations)}")
        if not op.public:
            auth = request.getHeader("authorization") or ""
            if auth != f"Bearer {self.token}":
                raise ApiError(401, kind="unauthorized", detail="missing or wrong bearer token")
        params: dict[str, Any] = {}
        args: dict[bytes, list[bytes]] = request.args or {}
        query = {k.decode(): v[-1].decode() for k, v in args.items()}
        for p in op.params:
            if p["in"] == "path":
                value = raw_params.get(p["name"])
                if p.get("type") == "integer":
                    if value is None or not re.fullmatch(r"-?\d+", value):
                        raise ApiError(400, kind="path_parameter", detail=f"{p['name']}={value!r} is not an integer")
                    params[p["name"]] = int(value)
                else:
                    params[p["name"]] = value
            elif p["in"] == "query":
                if p["name"] not in query:
                    if p.get("required"):
                        self.warning("missing_query_parameter", method, path, p["name"])
                elif "enum" in p and query[p["name"]] not in p["enum"]:
                    self.warning("query_parameter_enum", method, path, f"{p['name']}={query[p['name']]!r}")
        if "project_id" in params and params["project_id"] != self.project_id:
            raise ApiError(404, kind="unknown_project", detail=f"project {params['project_id']}")
        if "project_id" in params and self.role == "guest" and method not in {"GET", "HEAD"}:
            self.warning("forbidden", method, path, "role guest cannot run tasks")
            raise ApiError(403)
        body: Any = None
        if op.body_pointer is not None:
            if not raw_body.strip():
                raise ApiError(400, kind="empty_body", detail="this endpoint needs a JSON body (NOTES)")
            ctype = (request.getHeader("content-type") or "").split(";")[0].strip().lower()
            if ctype != "application/json":  # Semaphore does not care; proxies and logs do
                self.warning("content_type", method, path, ctype or "<none>")
            try:
                body = json.loads(raw_body)
            except ValueError as e:
                raise ApiError(400, kind="invalid_json", detail=str(e)) from None
            errs = self.spec.errors(op.body_pointer, body)
            if errs:
                raise ApiError(400, kind="request_schema", detail=errs)
        elif raw_body.strip() and method not in {"GET", "HEAD"}:
            self.warning("unexpected_body", method, path, raw_body[:200].decode("utf-8", "replace"))
        handler = self._handlers.get((op.method, route.path))
        if handler is None:
            raise ApiError(501, kind="not_modelled_by_double", detail=f"{op.method} {route.path}")
        ctx = Ctx(request, op, params, query, body, raw_body)
        return op, handler(ctx)

    def _build_handlers(self) -> dict[tuple[str, str], Callable[[Ctx], Reply | object]]:
        p = "/project/{project_id}"
        return {
            ("GET", "/ping"): lambda ctx: Reply(200, "pong", "text/plain; charset=utf-8"),
            ("GET", "/ws"): self._h_ws,
            ("GET", f"{p}/templates"): self._h_templates,
            ("GET", f"{p}/templates/{{template_id}}"): self._h_template,
            ("GET", f"{p}/tasks"): lambda ctx: Reply(200, [self._task_api(t) for t in self.tasks.values()]),
            ("GET", f"{p}/tasks/last"): lambda ctx: Reply(
                200, [self._task_api(t) for t in list(self.tasks.values())[-200:]]
            ),
            ("POST", f"{p}/tasks"): self._h_create_task,
            ("GET", f"{p}/tasks/{{task_id}}"): lambda ctx: Reply(200, self._task_api(self._task(ctx))),
            ("GET", f"{p}/tasks/{{task_id}}/output"): self._h_output,
            ("GET", f"{p}/tasks/{{task_id}}/raw_output"): self._h_raw_output,
            ("POST", f"{p}/tasks/{{task_id}}/stop"): self._h_stop,
        }

    # ---- API handlers

    def _task(self, ctx: Ctx) -> TaskRecord:
        t = self.tasks.get(ctx.params["task_id"])
        if t is None:
            raise ApiError(400)  # NOTES: a task that does not exist is a 400, and not a violation
        return t

    def _task_api(self, t: TaskRecord) -> JSON:
        return t.api(self.project_id)

    def _template_api(self, tpl: TemplateConfig) -> JSON:
        return {
            "id": tpl.id,
            "project_id": self.project_id,
            "inventory_id": 1,
            "repository_id": 1,
            "environment_id": 1,
            "name": tpl.name,
            "playbook": tpl.playbook,
            "arguments": "[]",
            "description": tpl.description,
            "allow_override_args_in_task": False,
            "suppress_success_alerts": False,
            "app": "ansible",
            "type": "",
            "autorun": False,
            "survey_vars": [],
            "vaults": [],
            "task_params": {},
        }

    def _h_templates(self, ctx: Ctx) -> Reply:
        items = []
        for tpl in self.templates.values():
            d = self._template_api(tpl)
            mine = [t for t in self.tasks.values() if t.template_id == tpl.id]
            if mine:
                d["last_task"] = self._task_api(mine[-1])
            items.append(d)
        key = ctx.query.get("sort", "name")
        if key in {"name", "playbook"}:
            items.sort(key=lambda d: str(d[key]), reverse=ctx.query.get("order") == "desc")
        return Reply(200, items)

    def _h_template(self, ctx: Ctx) -> Reply:
        tpl = self.templates.get(ctx.params["template_id"])
        if tpl is None:
            raise ApiError(404, kind="unknown_template", detail=ctx.params["template_id"])
        return Reply(200, self._template_api(tpl))

    def _content_error(self, kind: str, detail: str) -> ApiError:
        if self.legacy_errors:
            return ApiError(500, kind=kind, detail=detail)
        return ApiError(400, {"error": detail}, kind=kind, detail=detail)

    def _h_create_task(self, ctx: Ctx) -> Reply:
        body: JSON = ctx.body
        if not isinstance(body, dict):
            raise ApiError(400, kind="request_schema", detail="body must be an object")
        tpl: TemplateConfig | None
        if "template_id" in body:
            tpl = self.templates.get(body["template_id"])
        elif "template_name" in body:
            tpl = next((t for t in self.templates.values() if t.name == body["template_name"]), None)
        else:
            raise self._content_error("missing_template", "template_id or template_name is required")
        if tpl is None:
            detail = f"no template {body.get('template_id', body.get('template_name'))!r}"
            raise ApiError(500 if self.legacy_errors else 404, kind="unknown_template", detail=detail)
        env_raw = body.get("environment", "")
        env: JSON = {}
        if env_raw:
            try:
                env = json.loads(env_raw)
            except ValueError:
                raise self._content_error("environment_not_json", "environment is not valid JSON") from None
            if not isinstance(env, dict):
                raise self._content_error("environment_not_object", "environment must hold a JSON object")
        args = body.get("arguments")
        if args:
            try:
                parsed_args = json.loads(args)
            except ValueError:
                parsed_args = None
            if not isinstance(parsed_args, list):
                raise self._content_error("arguments_not_array", "arguments must hold a JSON array")
        known = set(self.spec.doc["paths"]["/project/{project_id}/tasks"]["post"]["parameters"][0]["schema"]["properties"])
        unknown = sorted(set(body) - known)
        if unknown:
            self.warning("unknown_task_fields", ctx.op.method, ctx.op.path, unknown)
        t = TaskRecord(
            id=self.next_task_id, template_id=tpl.id, template=tpl.as_dict(), request=body,
            environment_raw=env_raw, environment=env,
        )
        self.next_task_id += 1
        self.tasks[t.id] = t
        self._history(t, "waiting")
        self._out(t, f"Task {t.id} added to queue")
        self._save_tasks()
        return Reply(201, self._task_api(t))

    def _h_output(self, ctx: Ctx) -> Reply:
        t = self._task(ctx)
        return Reply(200, [{"task_id": t.id, "time": o["time"], "output": o["output"]} for o in t.output])

    def _h_raw_output(self, ctx: Ctx) -> Reply:
        t = self._task(ctx)
        return Reply(200, "".join(o["output"] + "\n" for o in t.output), "text/plain; charset=utf-8")

    def _h_stop(self, ctx: Ctx) -> Reply:
        t = self._task(ctx)
        force = bool(ctx.body.get("force", False)) if isinstance(ctx.body, dict) else False
        before = t.status
        t.stop_requests.append({"time": now_iso(), "body": ctx.body, "status_before": before})
        delay = float(t.template.get("stop_delay_seconds", 0.1))
        if before in FINISHED or t.stale:
            # Not in the task pool any more: the real server just writes "stopped".
            if before in FINISHED:
                self.warning("stop_finished_task", "POST", ctx.request.path.decode(),
                             f"task {t.id} was {before}; now stopped")
            self._finish(t, "stopped")
        elif before == "waiting":
            if force:
                self._finish(t, "stopped")
            else:
                self._set_status(t, "stopping")
                self.reactor.callLater(delay, self._finish_if, t, "stopping", "stopped")
        elif before in ACTIVE:
            if force:
                self._out(t, "Task stopped by user (force)")
                self._finish(t, "stopped")
            elif before != "stopping":
                self._set_status(t, "stopping")
            t.kill_requested = True
            self.reactor.callLater(delay, self._cancel_sleep, t)
        self._save_tasks()
        return Reply(204)

    def _h_ws(self, ctx: Ctx) -> object:
        try:
            from twisted.web.websocket import WebSocketResource
        except ImportError:  # pragma: no cover - twisted[websocket] extra missing
            raise ApiError(501, kind="not_modelled_by_double", detail="websocket needs wsproto") from None
        result = WebSocketResource(_WsFactory(self)).render_GET(ctx.request)
        if not isinstance(result, bytes):  # NOT_DONE_YET: the connection is a websocket now
            return _NOT_DONE
        return Reply(ctx.request.code, result.decode("utf-8", "replace"), "text/plain")

    # ---- admin endpoints

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

    def _refresh_vms(self) -> None:
        changed = False
        for vm in self.vms:
            if vm.alive and not vm.refresh():
                changed = True
        if changed:
            self._save_vms()

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
                start_ticks=_proc_start_ticks(proc.pid), proc=proc)
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


class _WsClient:
    """One /api/ws subscriber; the double only pushes, it ignores what the client says."""

    def __init__(self, double: SemaphoreDouble) -> None:
        self.double = double
        self.transport: Any = None

    def negotiationStarted(self, transport: Any) -> None:
        self.transport = transport

    def negotiationFinished(self) -> None:
        self.double._ws_clients.add(self)

    def pongReceived(self, payload: bytes) -> None:
        pass

    def textMessageReceived(self, message: str) -> None:
        pass

    def bytesMessageReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        self.double._ws_clients.discard(self)

    def send(self, text: str) -> None:
        try:
            self.transport.sendTextMessage(text)
        except Exception:  # noqa: BLE001 - a dead subscriber must not break the task
            self.double._ws_clients.discard(self)


class _WsFactory:
    def __init__(self, double: SemaphoreDouble) -> None:
        self.double = double

    def buildProtocol(self, request: server.Request) -> Any:  # a WebSocketProtocol
        return _WsClient(self.double)


class _Root(resource.Resource):
    """Every path goes to the double: routing follows the spec, not a resource tree."""

    isLeaf = True

    def __init__(self, double: SemaphoreDouble) -> None:
        super().__init__()
        self.double = double

    def render(self, request: server.Request) -> bytes | int:
        return self.double.handle(request)


# ------------------------------------------------------------- subprocess helper


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
        argv = [sys.executable, str(Path(__file__).resolve()), "--port", "0", "--token", self.token,
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
        if _proc_start_ticks(pid) is not None:
            yield pid


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Semaphore UI test double (see module docstring).")
    ap.add_argument("--port", type=int, required=True, help="0 picks a free port (see double.json)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--token", default="test-token")
    ap.add_argument("--project-id", type=int, default=1)
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--scenario-file")
    ap.add_argument("--spec", help="the spec (default: $SEMAPHORE_API_DOCS or tests/support/semaphore_contract.yml)")
    ap.add_argument("--keep-vms-on-exit", action="store_true",
                    help="leave VM processes running on SIGTERM, to simulate a server restart")
    args = ap.parse_args(argv)

    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor  # zope interfaces confuse type checkers without mypy-zope
    scenario = copy.deepcopy(load_scenario_file(args.scenario_file)) if args.scenario_file else None
    double = SemaphoreDouble(token=args.token, state_dir=args.state_dir, project_id=args.project_id,
                             scenario=scenario, spec_path=args.spec, reactor=reactor,
                             keep_vms_on_exit=args.keep_vms_on_exit)
    listening: Any = double.listen(args.port, args.host)
    port = int(listening.getHost().port)
    double._write("double.json", {"port": port, "pid": os.getpid(), "url": f"http://{args.host}:{port}"})
    print(f"semaphore-double listening on http://{args.host}:{port}", flush=True)
    reactor.addSystemEventTrigger("before", "shutdown", double.shutdown)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
