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

Run:  ``python tests/support/semaphore_double --port 0 --token T --project-id 1 --state-dir DIR
[--scenario-file FILE]`` (the package directory; ``python -m support.semaphore_double ...``
with ``tests/`` on ``sys.path`` alike); in-process: ``SemaphoreDouble(...).listen()``; from
tests: ``DoubleProcess(...)`` (a context manager that runs the real subprocess).

Layout (each module imports only the ones above it; this package re-exports their public
names, so ``from support.semaphore_double import X`` is the way in):

``common``     the JSON alias, the repository root, timestamps
``spec``       the contract compiled into routes, operations and validators (`load_spec`)
``scenario``   templates and settings: schemas, `TemplateConfig`, `parse_scenario`
``vms``        `Vm` (a backend process standing in for a VM), free ports
``tasks``      `TaskRecord` and the status sets `FINISHED`, `ACTIVE`
``replies``    `Reply`, `ApiError`, `Ctx`: what the HTTP front and the handlers exchange
``state``      `DoubleState`: settings, tasks, VMs, persistence, records, status changes
``websocket``  the ``/api/ws`` subscribers
``runner``     `TaskRunner`: one task's run and the template behaviours (VMs spawned, killed)
``pool``       `TaskPool`: the queue of waiting tasks, start and shutdown
``api``        `SemaphoreEndpoints`: the Semaphore endpoints the double models
``admin``      `AdminEndpoints`: the ``/_double/...`` endpoints
``double``     `SemaphoreDouble`: the mixins assembled, and the HTTP front routed by the spec
``process``    `DoubleProcess` (the double as a subprocess, for tests), `iter_pids_alive`
``cli``        `main`, the process entry point (``__main__`` runs it)
"""

from __future__ import annotations

from .admin import AdminEndpoints
from .api import SemaphoreEndpoints
from .cli import main
from .common import JSON, REPO_ROOT, now_iso
from .double import SemaphoreDouble
from .pool import TaskPool
from .process import DoubleProcess, iter_pids_alive
from .replies import ApiError, Ctx, Reply
from .runner import CYAN, GREEN, RED, RESET, YELLOW, TaskRunner
from .scenario import (
    BEHAVIOURS,
    SCENARIO_SCHEMA,
    TEMPLATE_SCHEMA,
    TemplateConfig,
    load_scenario_file,
    parse_scenario,
)
from .spec import DEFAULT_SPEC_PATH, SPEC_URI, ApiSpec, Operation, Route, load_spec
from .state import DoubleState
from .tasks import ACTIVE, FINISHED, TaskKilled, TaskRecord
from .vms import Vm, free_port, port_open

__all__ = [
    "ACTIVE",
    "AdminEndpoints",
    "ApiError",
    "ApiSpec",
    "BEHAVIOURS",
    "CYAN",
    "Ctx",
    "DEFAULT_SPEC_PATH",
    "DoubleProcess",
    "DoubleState",
    "FINISHED",
    "GREEN",
    "JSON",
    "Operation",
    "RED",
    "REPO_ROOT",
    "RESET",
    "Reply",
    "Route",
    "SCENARIO_SCHEMA",
    "SPEC_URI",
    "SemaphoreDouble",
    "SemaphoreEndpoints",
    "TEMPLATE_SCHEMA",
    "TaskKilled",
    "TaskPool",
    "TaskRecord",
    "TaskRunner",
    "TemplateConfig",
    "Vm",
    "YELLOW",
    "free_port",
    "iter_pids_alive",
    "load_scenario_file",
    "load_spec",
    "main",
    "now_iso",
    "parse_scenario",
    "port_open",
]
