"""
Semaphore UI: its settings, and an asynchronous client for the few API calls
Hestia needs (launch a task, follow it, read its output, stop it).

Semaphore runs the Ansible playbooks that provision and tear down the remote
machines behind C{semaphore} services (L{hestia.backends.semaphore}).  The
client honours what the real server does beyond its OpenAPI description
(the C{x-hestia-notes} of C{tests/support/semaphore_contract.yml}): C{template_id} is a JSON integer,
C{environment} a I{string} holding a JSON object, an unknown task id is a 400
(not a 404), a stop needs a JSON body, and a task may stay C{waiting} or
C{running} for ever, so every wait here has its own limit.

The API token is wrapped in L{Secret} from the moment it is read: its C{repr}
and C{str} never show it, so neither a log line, an exception, a status page
nor a dataclass C{repr} can leak it.  Errors carry only the status code, the
method and the path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.iweb import IAgent

from hestia.config import MAX_ID, Config, Reader, ServiceConfig

log = Logger(namespace="hestia.semaphore")

FINISHED = frozenset({"success", "error", "stopped"})
FIRST_POLL = 0.05
POLL_GROWTH = 1.5

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_HESTIA_URL = re.compile(r"hestia_url=(https?://[^\s\"'\\,}]+)")

SERVER_KEYS = {
    "base_url", "token_env", "token_file", "project_id", "queue_timeout", "poll_interval",
    "request_timeout", "stop_task_timeout", "stop_on_shutdown",
}
SERVICE_KEYS = {"enabled", "machine_id", "start_template_id", "stop_template_id", "extra_vars"}


# -- settings -----------------------------------------------------------------


class Secret:
    """A string that never shows itself: C{repr} and C{str} are C{'***'}."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself: only for the one header that needs it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class SemaphoreServer:
    """
    The Semaphore UI instance (top-level C{semaphore:} and C{SEMAPHORE_*}).

    @ivar queue_timeout: longest a start task may sit in C{waiting} before it
        is stopped (with force) and the start fails.
    @ivar poll_interval: the cap of the polling backoff while a task runs.
    @ivar stop_task_timeout: longest a stop task may take; after it the stop
        is reported as failed (and retried on the next gateway start).
    @ivar stop_on_shutdown: C{True}: a gateway SIGTERM tears remote machines
        down; C{False} (default): they keep running, recorded in the state
        store, and the next gateway resumes (and idle-stops) them.
    """

    base_url: str
    token: Secret
    project_id: int = 1
    queue_timeout: float = 300.0
    poll_interval: float = 1.0
    request_timeout: float = 10.0
    stop_task_timeout: float = 1800.0
    stop_on_shutdown: bool = False


@dataclass(frozen=True)
class SemaphoreService:
    """A service's C{semaphore:} section, resolved against the server settings."""

    server: SemaphoreServer
    machine_id: str
    start_template_id: int
    stop_template_id: int
    extra_vars: Mapping[str, Any] = field(default_factory=dict)


def _server_settings(reader: Reader, raw: Any, environ: Mapping[str, str], base_dir: Path) -> SemaphoreServer:
    section = dict(reader.mapping(raw, "semaphore"))
    reader.check_keys(section, SERVER_KEYS, "semaphore")
    if environ.get("SEMAPHORE_BASE_URL"):
        section["base_url"] = environ["SEMAPHORE_BASE_URL"]
    if environ.get("SEMAPHORE_PROJECT_ID"):
        section["project_id"] = environ["SEMAPHORE_PROJECT_ID"]
    if "base_url" not in section:
        raise reader.fail("semaphore.base_url", "missing (or set SEMAPHORE_BASE_URL)")
    base_url = reader.url(section["base_url"], "semaphore.base_url")
    token = _token(reader, section, environ, base_dir)
    values: dict[str, Any] = {}
    for key in ("queue_timeout", "poll_interval", "request_timeout", "stop_task_timeout"):
        if key in section:
            values[key] = reader.duration(section[key], f"semaphore.{key}")
    if "poll_interval" in values:
        values["poll_interval"] = max(0.05, values["poll_interval"])
    if "stop_on_shutdown" in section:
        values["stop_on_shutdown"] = reader.boolean(section["stop_on_shutdown"], "semaphore.stop_on_shutdown")
    project_id = reader.integer(section.get("project_id", 1), "semaphore.project_id", minimum=1, maximum=MAX_ID)
    return SemaphoreServer(base_url=base_url, token=token, project_id=project_id, **values)


def _token(reader: Reader, section: Mapping[str, Any], environ: Mapping[str, str], base_dir: Path) -> Secret:
    """The token from C{$SEMAPHORE_API_TOKEN}, C{token_env}, or a file: never from the YAML itself."""
    env_name = reader.string(section.get("token_env", "SEMAPHORE_API_TOKEN"), "semaphore.token_env")
    file_name = environ.get("SEMAPHORE_API_TOKEN_FILE") or section.get("token_file")
    if environ.get(env_name):
        return Secret(environ[env_name].strip())
    if file_name:
        path = Path(reader.string(file_name, "semaphore.token_file"))
        path = path if path.is_absolute() else base_dir / path
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as error:
            raise reader.fail("semaphore.token_file", f"cannot read {str(path)!r}: {error.strerror}") from None
        if not token:
            raise reader.fail("semaphore.token_file", f"{str(path)!r} is empty")
        return Secret(token)
    raise reader.fail("semaphore.token_env", f"no API token: set ${env_name} or SEMAPHORE_API_TOKEN_FILE")


def _service_settings(reader: Reader, service: ServiceConfig, server: SemaphoreServer) -> SemaphoreService:
    key = f"services.{service.name}.semaphore"
    raw = dict(reader.mapping(service.sections.get("semaphore"), key))
    reader.check_keys(raw, SERVICE_KEYS, key)
    prefix = service.name.upper().replace("-", "_") + "_SEMAPHORE_"
    templates = {}
    for name in ("start_template_id", "stop_template_id"):
        if name not in raw:
            raise reader.fail(f"{key}.{name}", f"missing (or set {prefix}{name.upper()})")
        templates[name] = reader.integer(raw[name], f"{key}.{name}", minimum=1, maximum=MAX_ID)
    extra = raw.get("extra_vars", {})
    if isinstance(extra, str):  # from <NAME>_SEMAPHORE_EXTRA_VARS: a JSON object
        try:
            extra = json.loads(extra)
        except ValueError:
            raise reader.fail(f"{key}.extra_vars", "expected a JSON object") from None
    extra = reader.mapping(extra, f"{key}.extra_vars")
    machine_id = reader.string(str(raw.get("machine_id", service.name)), f"{key}.machine_id")
    return SemaphoreService(server=server, machine_id=machine_id, extra_vars=dict(extra), **templates)


def resolve_semaphore(config: Config, environ: Mapping[str, str]) -> Config:
    """
    Validate the Semaphore settings and put the resolved L{SemaphoreService} in
    each semaphore service's C{sections["semaphore"]}.

    Called by L{hestia.loader.parse_config}, so a bad section fails at load
    time with one line naming file, service and key, like every other key.
    """
    reader = Reader(config.source)
    uses = [service for service in config.services.values() if service.backend == "semaphore"]
    if not uses and "semaphore" not in config.sections:
        return config
    base_dir = Path(config.source).resolve().parent if not config.source.startswith("<") else Path.cwd()
    server = _server_settings(reader, config.sections.get("semaphore"), environ, base_dir)
    services = dict(config.services)
    for service in uses:
        sections = dict(service.sections)
        sections["semaphore"] = _service_settings(reader, service, server)
        services[service.name] = replace(service, sections=sections)
    return replace(config, services=services)


# -- errors -------------------------------------------------------------------


class SemaphoreError(Exception):
    """Semaphore said no, or could not be reached.  The message never holds the token."""


class SemaphoreUnauthorized(SemaphoreError):
    """401: the API token is unknown or expired."""


class SemaphoreForbidden(SemaphoreError):
    """403: the token's role cannot run tasks in this project."""


class SemaphoreNotFound(SemaphoreError):
    """404: no such project (or not a member), or no such template."""


class SemaphoreUnreachable(SemaphoreError):
    """No HTTP answer at all: refused, timed out, reset."""


class NoSuchTask(SemaphoreError):
    """The task id is unknown (Semaphore answers 400, sometimes 404)."""


class TaskStuck(SemaphoreError):
    """A task stayed C{waiting} longer than allowed."""

    def __init__(self, message: str, task: dict[str, Any]) -> None:
        super().__init__(message)
        self.task = task


def clean_lines(entries: list[dict[str, Any]]) -> list[str]:
    """Task output entries as plain text lines (ANSI colour codes removed)."""
    lines: list[str] = []
    for entry in entries:
        text = str(entry.get("output", ""))
        lines.extend(_ANSI.sub("", text).splitlines() or [""])
    return lines


def find_hestia_url(lines: list[str]) -> str | None:
    """The last C{hestia_url=<url>} a task printed (plain or in a debug message)."""
    found = None
    for line in lines:
        for match in _HESTIA_URL.finditer(line):
            found = match.group(1).rstrip("/")
    return found


# -- the client -----------------------------------------------------------------


class SemaphoreClient:
    """
    The API calls Hestia makes, over the gateway's own L{IAgent} (via treq).

    L{detach} makes the client go quiet: every later call returns a Deferred
    that never fires, so a gateway shutting down leaves remote tasks alone
    without turning their abandonment into failures.
    """

    def __init__(self, server: SemaphoreServer, reactor: IReactorTime, agent: IAgent) -> None:
        self.server = server
        self._reactor = reactor
        self._http = HTTPClient(agent)
        self._detached = False

    def __repr__(self) -> str:
        return f"<SemaphoreClient {self.server.base_url} project {self.server.project_id}>"

    def detach(self) -> None:
        self._detached = True

    @property
    def _project(self) -> str:
        return f"/project/{self.server.project_id}"

    @inlineCallbacks
    def _call(
        self, method: str, path: str, body: Any = None, expect: tuple[int, ...] = (200,)
    ) -> Generator[Deferred[Any], Any, Any]:
        if self._detached:
            yield Deferred()
        url = f"{self.server.base_url}/api{path}"
        headers: dict[bytes | str, list[bytes | str]] = {
            b"Authorization": [b"Bearer " + self.server.token.reveal().encode("utf-8")],
            b"Accept": [b"application/json"],
        }
        data = None
        if body is not None:
            headers[b"Content-Type"] = [b"application/json"]
            data = json.dumps(body).encode("utf-8")
        where = f"{method} {path}"
        try:
            request = self._http.request(method, url, headers=headers, data=data)
            request.addTimeout(self.server.request_timeout, self._reactor)
            response = yield request
            reading = treq.content(response)
            reading.addTimeout(self.server.request_timeout, self._reactor)
            content = yield reading
        except CancelledError:
            raise
        except TimeoutError:
            raise SemaphoreUnreachable(
                f"Semaphore at {self.server.base_url} did not answer {where} within "
                f"{self.server.request_timeout:g}s"
            ) from None
        except Exception as error:
            raise SemaphoreUnreachable(
                f"Semaphore at {self.server.base_url} is unreachable ({type(error).__name__}) for {where}"
            ) from None
        code = response.code
        if code in expect:
            if not content:
                return None
            try:
                return json.loads(content)
            except ValueError:
                return content.decode("utf-8", "replace")
        message = _error_text(content)
        if code == 401:
            raise SemaphoreUnauthorized(f"Semaphore rejected the API token (401) for {where}")
        if code == 403:
            raise SemaphoreForbidden(
                f"Semaphore refused {where} (403): the token's role cannot run tasks in project "
                f"{self.server.project_id}{message}"
            )
        if code == 404:
            raise SemaphoreNotFound(f"Semaphore has no such project or template (404) for {where}{message}")
        raise SemaphoreError(f"Semaphore answered {code} to {where}{message}")

    # -- tasks ------------------------------------------------------------------

    def launch(self, template_id: int, environment: Mapping[str, Any], message: str = "") -> Deferred[dict[str, Any]]:
        """
        Start a task of C{template_id}; fires with the Task (status C{waiting}).

        C{environment} becomes the playbook's extra vars; Semaphore wants it as
        a string holding a JSON object.
        """
        body: dict[str, Any] = {"template_id": int(template_id), "environment": json.dumps(dict(environment))}
        if message:
            body["message"] = message
        return self._call("POST", f"{self._project}/tasks", body, expect=(201, 200))

    @inlineCallbacks
    def task(self, task_id: int) -> Generator[Deferred[Any], Any, Any]:
        """The Task; L{NoSuchTask} for an unknown id (400 or 404)."""
        try:
            task = yield self._call("GET", f"{self._project}/tasks/{int(task_id)}")
        except SemaphoreNotFound:
            raise NoSuchTask(f"Semaphore has no task {task_id}") from None
        except SemaphoreError as error:
            if str(error).startswith("Semaphore answered 400"):
                raise NoSuchTask(f"Semaphore has no task {task_id}") from None
            raise
        return task

    def tasks(self) -> Deferred[list[dict[str, Any]]]:
        """Every task of the project (to find one launched just before a crash)."""
        return self._call("GET", f"{self._project}/tasks")

    @inlineCallbacks
    def output(self, task_id: int) -> Generator[Deferred[Any], Any, Any]:
        """The task's whole output so far, as plain lines."""
        try:
            entries = yield self._call("GET", f"{self._project}/tasks/{int(task_id)}/output")
        except SemaphoreError as error:
            if isinstance(error, (SemaphoreNotFound, SemaphoreUnauthorized, SemaphoreUnreachable)):
                raise
            raise NoSuchTask(f"Semaphore has no task {task_id}") from None
        return clean_lines(entries if isinstance(entries, list) else [])

    def stop(self, task_id: int, force: bool = False) -> Deferred[None]:
        """Ask Semaphore to stop a task (only call it for an unfinished one)."""
        body = {"force": True} if force else {}
        return self._call("POST", f"{self._project}/tasks/{int(task_id)}/stop", body, expect=(204, 200))

    @inlineCallbacks
    def follow(
        self,
        task_id: int,
        waiting_timeout: float | None = None,
        timeout: float | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> Generator[Deferred[Any], Any, Any]:
        """
        Poll a task until it finishes; fires with the finished Task.

        Polls quickly at first, backing off to C{server.poll_interval}.

        @param waiting_timeout: fail with L{TaskStuck} when it is still
            C{waiting} this long after we first saw it.
        @param timeout: fail with L{TaskStuck} when it has not finished by then.
        """
        began = self._reactor.seconds()
        waiting_since: float | None = None
        delay = FIRST_POLL
        while True:
            task = yield self.task(task_id)
            if on_update is not None:
                on_update(task)
            status = task.get("status")
            if status in FINISHED:
                return task
            now = self._reactor.seconds()
            if status == "waiting":
                waiting_since = now if waiting_since is None else waiting_since
                if waiting_timeout is not None and now - waiting_since > waiting_timeout:
                    raise TaskStuck(
                        f"task {task_id} stayed waiting in Semaphore's queue for more than "
                        f"queue_timeout {waiting_timeout:g}s",
                        task,
                    )
            else:
                waiting_since = None
            if timeout is not None and now - began > timeout:
                raise TaskStuck(f"task {task_id} did not finish within {timeout:g}s (status {status})", task)
            if self._detached:
                yield Deferred()
            yield deferLater(self._reactor, delay, lambda: None)
            delay = min(delay * POLL_GROWTH, self.server.poll_interval)


def _error_text(content: bytes) -> str:
    """A short C{": reason"} from an error body like C{{"error": "..."}}, else nothing."""
    try:
        data = json.loads(content)
    except ValueError:
        return ""
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return f": {data['error'][:200]}"
    return ""

