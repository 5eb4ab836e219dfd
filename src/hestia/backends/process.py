"""
The C{process} backend: a local command, such as C{ollama serve}.

The command runs in a session (and so a process group) of its own, so that
stopping it reaches everything it spawned: SIGTERM to the group, SIGKILL after
C{stop_timeout}, and SIGKILL to whatever of the group outlives its leader.
Nothing the gateway started is left behind as an orphan.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent
from zope.interface import implementer, provider

from hestia import health
from hestia.backends.environment import child_environment
from hestia.config import ServiceConfig, describe_command
from hestia.errors import StartFailed
from hestia.interfaces import IBackend, IBackendFactory, IReconfigurableBackend

OUTPUT_LINES_KEPT = 200

# util-linux's setsid execs the command in a new session without forking (the
# spawned child is never a group leader), so the pid we get is the command's.
_SETSID = shutil.which("setsid")


def session_command(argv: tuple[str, ...]) -> tuple[str, list[str]]:
    """The executable and argv that run C{argv} in a new session."""
    if _SETSID:
        return _SETSID, [_SETSID, "--", *argv]
    wrapper = "import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])"
    return sys.executable, [sys.executable, "-c", wrapper, *argv]


def find_program(argv: tuple[str, ...], env: dict[str, str], cwd: str | None) -> tuple[str, ...]:
    """
    C{argv} with a program that exists, or L{StartFailed} saying where it was looked for.

    A bare name is looked up on the service's C{PATH}, then beside the Python running
    Hestia: commands installed with Hestia (C{hestia-demo}, or any tool of the same
    virtualenv) work when the virtualenv's C{twistd} runs without the virtualenv being
    activated, as under systemd or C{/opt/hestia/bin/twistd}. Checking before spawning
    says "command not found" instead of the exec wrapper's bare exit status 127.
    """
    program = argv[0]
    if os.sep in program:
        where = os.path.join(cwd or "", program)  # the child runs in cwd
        if os.path.isfile(where) and os.access(where, os.X_OK):
            return argv
        raise StartFailed(f"command not found: {program} is not an executable file"
                          + (f" (relative to cwd {cwd})" if cwd and not os.path.isabs(program) else ""))
    search = env.get("PATH", os.defpath)
    if shutil.which(program, path=search):
        return argv
    own_bin = os.path.dirname(sys.executable)
    beside_hestia = shutil.which(program, path=own_bin)
    if beside_hestia:
        return (beside_hestia, *argv[1:])
    also = "" if own_bin in search.split(os.pathsep) else f" and in {own_bin}"
    raise StartFailed(f"command not found: {program} (looked in PATH={search}{also})")


def describe_exit(reason: Failure) -> str:
    """C{exit status 3} or C{killed by signal 9 (SIGKILL)}."""
    value = reason.value
    if isinstance(value, (ProcessDone, ProcessTerminated)):
        if value.signal is not None:
            try:
                name = signal.Signals(value.signal).name
            except ValueError:
                name = "unknown"
            return f"killed by signal {value.signal} ({name})"
        return f"exit status {value.exitCode}"
    return str(value)


class _OutputCollector(ProcessProtocol):
    """Keeps the last lines of output, logs each line, reports the exit."""

    def __init__(self, backend: ProcessBackend) -> None:
        self._backend = backend
        self._partial = {1: b"", 2: b""}
        self.pid: int | None = None

    def connectionMade(self) -> None:
        # Read the pid now: the transport forgets it once the child is reaped, which for a
        # process that exits at once can happen inside spawnProcess, before it returns.
        transport = self.transport
        self.pid = transport.pid if transport is not None else None

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._partial.get(childFD, b"") + data
        *lines, self._partial[childFD] = buffered.split(b"\n")
        for line in lines:
            self._backend._line(line, childFD)
        if len(self._partial[childFD]) > 8192:
            # A process that never writes a newline must not grow this forever.
            self._backend._line(self._partial[childFD], childFD)
            self._partial[childFD] = b""

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self._backend._line(rest, fd)
        self._backend._ended(reason)


@implementer(IBackend, IReconfigurableBackend)
class ProcessBackend:
    """Runs C{service.command} and probes C{service.url}."""

    kind = "process"
    has_lifecycle = True

    def __init__(self, service: ServiceConfig, reactor: IReactorTime, agent: IAgent) -> None:
        assert service.command is not None
        self.service = service
        self.url = service.url
        self._reactor = reactor
        self._agent = agent
        self._process: Any = None
        self._protocol: _OutputCollector | None = None
        self._stopping = False
        self._exit_handler: Callable[[str, list[str]], None] = lambda reason, lines: None
        self._ended_waiters: list[Deferred[None]] = []
        self._kill_call: IDelayedCall | None = None
        self._exit_reason: str | None = None
        self.output: deque[str] = deque(maxlen=OUTPUT_LINES_KEPT)
        self._line_listeners: list[Callable[[str, str], None]] = []
        self._log = Logger(namespace=f"hestia.service.{service.name}")

    # -- IBackend ----------------------------------------------------------------

    def set_exit_handler(self, handler: Callable[[str, list[str]], None]) -> None:
        self._exit_handler = handler

    def start(self) -> Deferred[None]:
        if self._process is not None:
            return succeed(None)
        env = child_environment(self.service.env)
        try:
            command = find_program(self.service.command or (), env, self.service.cwd)
        except StartFailed as error:
            # The transition line says only "start failed": the log says why, as the
            # output of a command that ran would.
            self._log.warn("{error}", error=str(error), service=self.service.name)
            raise
        executable, argv = session_command(command)
        self._stopping = False
        self._exit_reason = None
        # Each start's output on its own: a failed start's detail shows what this attempt
        # printed, not the same lines again for every earlier retry.
        self.output.clear()
        self._protocol = protocol = _OutputCollector(self)
        reactor = IReactorProcess(self._reactor)
        try:
            self._process = reactor.spawnProcess(
                protocol,
                executable,
                argv,
                env=env,
                path=self.service.cwd,
                childFDs={0: "w", 1: "r", 2: "r"},
            )
        except OSError as error:
            self._process = None
            raise StartFailed(f"cannot run {describe_command(self.service.command)}: {error}") from None
        self._log.info(
            "started {command} (pid {pid})",
            command=describe_command(self.service.command),
            pid=protocol.pid,
            service=self.service.name,
        )
        return succeed(None)

    def probe(self) -> Deferred[bool]:
        if self._process is None:
            raise StartFailed(f"exited during start: {self._exit_reason or 'not running'}", detail=list(self.output))
        return health.probe(self._agent, self._reactor, self.url, self.service.health)

    def stop(self, timeout: float) -> Deferred[None]:
        if self._process is None:
            return succeed(None)
        self._stopping = True
        ended: Deferred[None] = Deferred()
        self._ended_waiters.append(ended)
        self._signal_group(signal.SIGTERM)
        if self._kill_call is None:
            self._kill_call = self._reactor.callLater(timeout, self._signal_group, signal.SIGKILL)
        return ended

    def reconfigure(self, service: ServiceConfig) -> None:
        # IReconfigurableBackend: a reload's in-place settings (the health check).
        self.service = service

    def describe(self) -> dict[str, Any]:
        return {
            "command": describe_command(self.service.command),
            "pid": self._process.pid if self._process is not None else None,
            "last_exit": self._exit_reason,
        }

    def recent_output(self) -> list[str]:
        return list(self.output)

    # -- output --------------------------------------------------------------------

    def add_line_listener(self, listener: Callable[[str, str], None]) -> None:
        """Call C{listener(stream, line)} for each line the process writes."""
        self._line_listeners.append(listener)

    def _line(self, raw: bytes, fd: int) -> None:
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        stream = "stdout" if fd == 1 else "stderr"
        self.output.append(line)
        self._log.info("{line}", line=line, stream=stream, service=self.service.name, event="service_output")
        for listener in self._line_listeners:
            listener(stream, line)

    # -- ending ----------------------------------------------------------------------

    def _signal_group(self, signum: int) -> None:
        if signum == signal.SIGKILL:
            self._kill_call = None
        if self._process is None or self._process.pid is None:
            return
        try:
            os.killpg(self._process.pid, signum)
        except ProcessLookupError:
            pass

    def _ended(self, reason: Failure) -> None:
        process, self._process = self._process, None
        self._exit_reason = describe_exit(reason)
        if process is not None and process.pid is not None:
            # Children that outlive the leader would be orphans: end them too.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill_call = None
        self._log.info(
            "{command} ended: {exit}",
            command=describe_command(self.service.command),
            exit=self._exit_reason,
            service=self.service.name,
        )
        waiters, self._ended_waiters = self._ended_waiters, []
        if self._stopping:
            self._stopping = False
        else:
            self._exit_handler(self._exit_reason, list(self.output))
        for waiter in waiters:
            waiter.callback(None)


@provider(IBackendFactory)
class ProcessBackendFactory:
    name = "process"

    @staticmethod
    def build(service: ServiceConfig, reactor: IReactorTime, agent: IAgent) -> IBackend:
        return ProcessBackend(service, reactor, agent)
