"""
The C{exec} backend: something started and stopped by commands that return
(C{aws ec2 start-instances}, C{gcloud compute instances start}, C{virsh start},
C{ssh box systemctl start ...}).

C{start} runs to completion (a non-zero exit is a failed start, with the
command's last lines shown to the waiting clients); readiness is then the
service's health check, within the usual C{start_timeout}.  Idle, C{stop} runs
to completion; if it fails the service shows the error and the machine is
recorded as possibly awake.  C{status} (optional) exits 0 when the thing runs:
on gateway start it is asked, and a running one is adopted.  Every command has
C{command_timeout}; its output goes to the service's log lines.

What the machine's state is, and why it is kept in the state store, is in
L{hestia.backends.machine}.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IAgent
from zope.interface import provider

from hestia.backends.commands import CommandResult, parse_command, parse_command_timeout
from hestia.backends.machine import MachineBackend, start_failed
from hestia.config import Reader, ServiceConfig, describe_command
from hestia.coroutines import as_deferred
from hestia.errors import StartFailed
from hestia.interfaces import IBackend, IBackendFactory

EXEC_KEYS = {"start", "stop", "status", "command_timeout", "stop_on_shutdown"}


@dataclass(frozen=True)
class ExecSettings:
    """A service's validated C{exec:} section."""

    start: tuple[str, ...]
    stop: tuple[str, ...]
    status: tuple[str, ...] | None = None
    command_timeout: float = 120.0
    stop_on_shutdown: bool = False


def parse_exec_section(reader: Reader, raw: Mapping[str, Any], key: str, service: str) -> ExecSettings:
    """Validate a service's C{exec:} mapping (called by L{hestia.config})."""
    reader.check_keys(raw, EXEC_KEYS, key)
    for required in ("start", "stop"):
        if raw.get(required) is None:
            raise reader.fail(f"{key}.{required}", f"missing: the command that {required}s {service}")
    values: dict[str, Any] = {
        "start": parse_command(reader, raw["start"], f"{key}.start"),
        "stop": parse_command(reader, raw["stop"], f"{key}.stop"),
    }
    if raw.get("status") is not None:
        values["status"] = parse_command(reader, raw["status"], f"{key}.status")
    if "command_timeout" in raw:
        values["command_timeout"] = parse_command_timeout(reader, raw["command_timeout"], f"{key}.command_timeout")
    if "stop_on_shutdown" in raw:
        values["stop_on_shutdown"] = reader.boolean(raw["stop_on_shutdown"], f"{key}.stop_on_shutdown")
    return ExecSettings(**values)


def settings_of(service: ServiceConfig) -> ExecSettings:
    section = service.sections.get("exec")
    if isinstance(section, ExecSettings):
        return section
    # Built by hand (tests, plugins): validate it the same way.
    return parse_exec_section(Reader("<service>"), dict(section or {}), f"services.{service.name}.exec",
                              service.name)


class ExecBackend(MachineBackend):
    """Runs C{settings.start} and C{settings.stop}; C{settings.status} finds a running one."""

    kind = "exec"

    def __init__(self, service: ServiceConfig, reactor: IReactorTime, agent: IAgent) -> None:
        self.settings = settings_of(service)
        super().__init__(
            service, reactor, agent,
            adopt=self.settings.status is not None, stop_on_shutdown=self.settings.stop_on_shutdown,
        )
        self.last_command: str | None = None

    def __repr__(self) -> str:
        return f"<ExecBackend {self.service.name}>"

    def _run(self, command: tuple[str, ...], what: str) -> Deferred[CommandResult]:
        running = self.commands.run(command, self.settings.command_timeout, what)

        def remember(result: CommandResult) -> CommandResult:
            self.last_command = f"{what}: {result.describe()}"
            return result

        return running.addCallback(remember)

    @as_deferred
    async def _wake(self) -> Any:
        try:
            result = await self._run(self.settings.start, "start command")
        except OSError as error:
            raise StartFailed(f"cannot run the start command {describe_command(self.settings.start)}: {error}") \
                from None
        if not result.succeeded:
            raise start_failed(result, "start command")

    def _sleep(self) -> Deferred[Any]:
        return self._run(self.settings.stop, "stop command")

    @as_deferred
    async def _check_running(self) -> Any:
        if self.settings.status is None:
            return False
        try:
            result = await self._run(self.settings.status, "status command")
        except OSError as error:
            self._log.warn("cannot run the status command: {error}", error=str(error), service=self.service.name)
            return False
        return result.succeeded

    def _details(self) -> dict[str, Any]:
        return {
            "start": describe_command(self.settings.start),
            "stop": describe_command(self.settings.stop),
            "status": describe_command(self.settings.status),
            "last_command": self.last_command,
        }


@provider(IBackendFactory)
class ExecBackendFactory:
    name = "exec"

    @staticmethod
    def build(service: ServiceConfig, reactor: IReactorTime, agent: IAgent) -> IBackend:
        return ExecBackend(service, reactor, agent)
