"""
Semaphore UI: an asynchronous client for the few API calls
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
from collections.abc import Callable, Mapping
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.iweb import IAgent

from hestia.backends.semaphore.settings import SemaphoreServer
from hestia.coroutines import as_deferred

log = Logger(namespace="hestia.semaphore")

FINISHED = frozenset({"success", "error", "stopped"})
FIRST_POLL = 0.05
POLL_GROWTH = 1.5

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_HESTIA_URL = re.compile(r"hestia_url=(https?://[^\s\"'\\,}]+)")



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

    @as_deferred
    async def _call(
        self, method: str, path: str, body: Any = None, expect: tuple[int, ...] = (200,)
    ) -> Any:
        if self._detached:
            await Deferred()
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
            response = await request
            reading = treq.content(response)
            reading.addTimeout(self.server.request_timeout, self._reactor)
            content = await reading
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

    @as_deferred
    async def task(self, task_id: int) -> Any:
        """The Task; L{NoSuchTask} for an unknown id (400 or 404)."""
        try:
            task = await self._call("GET", f"{self._project}/tasks/{int(task_id)}")
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

    @as_deferred
    async def output(self, task_id: int) -> Any:
        """The task's whole output so far, as plain lines."""
        try:
            entries = await self._call("GET", f"{self._project}/tasks/{int(task_id)}/output")
        except SemaphoreError as error:
            if isinstance(error, (SemaphoreNotFound, SemaphoreUnauthorized, SemaphoreUnreachable)):
                raise
            raise NoSuchTask(f"Semaphore has no task {task_id}") from None
        return clean_lines(entries if isinstance(entries, list) else [])

    def stop(self, task_id: int, force: bool = False) -> Deferred[None]:
        """Ask Semaphore to stop a task (only call it for an unfinished one)."""
        body = {"force": True} if force else {}
        return self._call("POST", f"{self._project}/tasks/{int(task_id)}/stop", body, expect=(204, 200))

    @as_deferred
    async def follow(
        self,
        task_id: int,
        waiting_timeout: float | None = None,
        timeout: float | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> Any:
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
            task = await self.task(task_id)
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
                await Deferred()
            await deferLater(self._reactor, delay, lambda: None)
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

