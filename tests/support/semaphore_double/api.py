"""The Semaphore API endpoints the double models: ping, templates, tasks, output, stop, ws.

`SemaphoreEndpoints._build_handlers` is the table of (method, spec path) -> handler;
the HTTP front (`double.SemaphoreDouble`) has already matched the route, checked the
token, the project and the body against the spec when a handler runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from .common import JSON, now_iso
from .replies import NOT_DONE, ApiError, Ctx, Reply
from .scenario import TemplateConfig
from .state import DoubleState
from .tasks import ACTIVE, FINISHED, TaskRecord
from .websocket import WsFactory


class SemaphoreEndpoints(DoubleState):
    """The handlers of the spec operations the double models (others answer 501)."""

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
        result = WebSocketResource(WsFactory(self)).render_GET(ctx.request)
        if not isinstance(result, bytes):  # NOT_DONE_YET: the connection is a websocket now
            return NOT_DONE
        return Reply(ctx.request.code, result.decode("utf-8", "replace"), "text/plain")
