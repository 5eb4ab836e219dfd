"""
The C{semaphore:} settings: the top-level section (server, token) and each
service's own, the C{<NAME>_SEMAPHORE_*} environment merged in.

Split from the API client so that the loader resolves settings without the
client.  The API token is a L{Secret} from the moment it is read: its C{repr}
and C{str} never show it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hestia.config import MAX_ID, Config, Reader, ServiceConfig

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
