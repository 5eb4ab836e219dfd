"""The assembled double: `SemaphoreDouble` and its HTTP front, routed by the spec.

Every request goes to `SemaphoreDouble.handle`: ``/_double/...`` to the admin
endpoints, everything else is matched against the spec (unknown path -> 404, method ->
405), checked (bearer token, project, role, path parameters, body schema), answered by
the handler of `api.SemaphoreEndpoints`, and the reply itself is validated against the
operation's response schema.  Departures are recorded as violations.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Any

from twisted.internet.interfaces import IListeningPort
from twisted.web import resource, server

from .admin import AdminEndpoints
from .api import SemaphoreEndpoints
from .pool import TaskPool
from .replies import NOT_DONE, ApiError, Ctx, Reply
from .spec import Operation


class SemaphoreDouble(AdminEndpoints, SemaphoreEndpoints, TaskPool):
    """The double's state machine and HTTP front; one instance per fake Semaphore server.

    The endpoints (`AdminEndpoints`, `SemaphoreEndpoints`) and the queue (`TaskPool`, over
    `runner.TaskRunner`) are mixins on one `state.DoubleState`: one object, as before the split.
    """

    def __init__(self, **settings: Any) -> None:
        """C{settings}: those of L{DoubleState} (token, state_dir, project_id, scenario, spec_path, ...)."""
        super().__init__(**settings)
        self._handlers = self._build_handlers()
        self.resource = _Root(self)

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> IListeningPort:
        self.start()
        listening: IListeningPort = self.reactor.listenTCP(
            port, server.Site(self.resource), interface=interface
        )
        return listening

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
        if reply_or_marker is NOT_DONE:
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


class _Root(resource.Resource):
    """Every path goes to the double: routing follows the spec, not a resource tree."""

    isLeaf = True

    def __init__(self, double: SemaphoreDouble) -> None:
        super().__init__()
        self.double = double

    def render(self, request: server.Request) -> bytes | int:
        return self.double.handle(request)
