#!/usr/bin/env python3
"""
The part of Semaphore UI's API that Hestia relies on, as a file in this repository.

C{tests/support/semaphore_contract.yml} is a Swagger 2.0 document: the path items Hestia's
C{semaphore} backend calls and the test double (C{tests/support/semaphore_double/})
models, with every parameter and definition they refer to, copied unchanged from
Semaphore's own C{api-docs.yml}; plus C{x-hestia-notes}, the server behaviour the
spec does not say (from the C{NOTES.md} beside it), which the double implements.
The double validates every request and response against this file, so the test
suite needs nothing outside the repository.

Where Semaphore's own file is at hand (in the directory C{shared/semaphore/} beside the
repository, or C{SEMAPHORE_API_DOCS}), regenerate with::

    python tests/support/semaphore_contract.py path/to/api-docs.yml

and C{tests/test_semaphore_contract.py} checks that the two still agree.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

CONTRACT_PATH = Path(__file__).resolve().parent / "semaphore_contract.yml"

# Relative to basePath (/api). Whole path items are kept: an operation the double does
# not model then still answers 501 (recorded), not 405.
PATHS = (
    "/ping",
    "/ws",
    "/project/{project_id}/templates",
    "/project/{project_id}/templates/{template_id}",
    "/project/{project_id}/tasks",
    "/project/{project_id}/tasks/last",
    "/project/{project_id}/tasks/{task_id}",
    "/project/{project_id}/tasks/{task_id}/output",
    "/project/{project_id}/tasks/{task_id}/raw_output",
    "/project/{project_id}/tasks/{task_id}/stop",
)

# Top-level keys copied as they are: they decide base path and authentication.
COPIED = ("swagger", "consumes", "produces", "schemes", "basePath", "securityDefinitions", "security")

# From NOTES.md: what the real server does that its spec does not say.
NOTES = {
    "auth": "Authorization: Bearer <token>; an unknown or expired token is a 401 with an empty body. "
    "Not a member of the project: 404. A role that cannot run tasks, on a non-GET: 403.",
    "ping": "GET /api/ping (and HEAD) answers 200 'pong' as text/plain with no login: the only health endpoint.",
    "create_task": "POST /project/{project_id}/tasks answers 201 with the Task in status 'waiting'. "
    "template_id must be a JSON integer ('5' is a 400); booleans JSON booleans. environment is a "
    "string holding a JSON object; arguments a string holding a JSON array. Older servers answer a "
    "missing template or a bad environment with 500 and an empty body; newer ones 404/400.",
    "queue": "A second task for the same template waits until the first finishes; max_parallel_tasks "
    "holds tasks in 'waiting' too. The queue is looked at every 5 s.",
    "unknown_task": "GET .../tasks/{task_id} of a task that does not exist is a 400, not a 404: "
    "treat 400 and 404 alike as 'no such task'.",
    "statuses": "Unfinished: waiting, starting, waiting_confirmation, confirmed, rejected, running, "
    "stopping. Finished: exactly success, error, stopped. Tasks can stay waiting or running forever "
    "(after a server restart): a client needs its own time limits.",
    "output": ".../output answers the whole log every time as [{task_id, time, output}], lines may "
    "carry ANSI colour codes; .../raw_output is text/plain.",
    "websocket": "GET /api/ws (same auth) pushes {type: update, task_id, status} on every status change.",
    "stop": "POST .../stop needs a JSON body ({} or {force: true}) and answers 204; an empty body is a "
    "400. A normal stop often ends as 'error', not 'stopped'. Stopping a task that finished with "
    "'success' rewrites it to 'stopped': only stop unfinished tasks.",
    "errors": "Mostly a status code with an empty body; some 400/403 carry {error: ...}. No rate limiting.",
}


def _refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                found.add(value)
            else:
                found |= _refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= _refs(value)
    return found


def extract(doc: dict[str, Any]) -> dict[str, Any]:
    """The contract's spec part, from Semaphore's whole document (no notes)."""
    contract: dict[str, Any] = {key: doc[key] for key in COPIED if key in doc}
    contract["info"] = {"title": doc["info"]["title"], "version": doc["info"]["version"]}
    paths = {path: doc["paths"][path] for path in PATHS}
    sections: dict[str, dict[str, Any]] = {"parameters": {}, "definitions": {}}
    pending = _refs(paths)
    seen: set[str] = set()
    while pending:
        ref = pending.pop()
        if ref in seen:
            continue
        seen.add(ref)
        _, section, name = ref.split("/", 2)  # "#/definitions/Task"
        target = doc[section][name]
        sections[section][name] = target
        pending |= _refs(target) - seen
    contract["parameters"] = dict(sorted(sections["parameters"].items()))
    contract["definitions"] = dict(sorted(sections["definitions"].items()))
    contract["paths"] = paths
    return contract


def spec_part(contract: dict[str, Any]) -> dict[str, Any]:
    """A contract without its notes, to compare with a fresh extract()."""
    return {key: value for key, value in contract.items() if not key.startswith("x-")}


def load(path: Path = CONTRACT_PATH) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        loaded: dict[str, Any] = yaml.safe_load(handle)
    return loaded


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print(f"usage: {argv[0]} path/to/semaphore/api-docs.yml", file=sys.stderr)
        return 2
    source = Path(argv[1])
    try:
        spec = load(source)
    except (OSError, yaml.YAMLError) as error:
        print(f"{argv[0]}: cannot read {source}: {error}", file=sys.stderr)
        return 2
    contract = extract(spec)
    contract["x-hestia-notes"] = NOTES
    header = (
        "# Generated by tests/support/semaphore_contract.py from Semaphore UI's api-docs.yml "
        f"(info.version {contract['info']['version']}) and its NOTES.md.\n"
        "# The Semaphore API Hestia relies on; the test double validates against it. Do not edit by hand.\n"
    )
    CONTRACT_PATH.write_text(header + yaml.safe_dump(contract, sort_keys=False, width=100), encoding="utf-8")
    print(f"wrote {CONTRACT_PATH} ({len(contract['paths'])} paths, {len(contract['definitions'])} definitions)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
