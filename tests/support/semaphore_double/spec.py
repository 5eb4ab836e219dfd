"""Semaphore's Swagger 2.0 contract compiled for the double: routes, operations, validators.

``tests/support/semaphore_contract.yml`` (or ``$SEMAPHORE_API_DOCS``) is parsed once per
process and path (`load_spec`); `ApiSpec` matches a request path to its route and
operation and validates bodies against the operation's schemas (``#/definitions`` refs
resolved through a ``referencing`` registry, Draft 4 semantics like Swagger 2.0).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft4Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from .common import JSON, REPO_ROOT, str_keys

DEFAULT_SPEC_PATH = REPO_ROOT / "tests" / "support" / "semaphore_contract.yml"
SPEC_URI = "urn:semaphore:api-docs"


def _pointer_escape(segment: str) -> str:
    return segment.replace("~", "~0").replace("/", "~1")


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
            self.doc: JSON = str_keys(yaml.load(fh, Loader=loader))
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
