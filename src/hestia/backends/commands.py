"""
Commands that run to completion: the C{exec} backend's start, stop and status,
the C{wol} backend's C{stop_command}.

Unlike the C{process} backend's service, such a command is expected to end
(C{aws ec2 start-instances} returns at once, C{ssh box systemctl suspend} when
the box is going down).  Each one runs in a session of its own with stdin
closed, its output is logged line by line under the service's name, and it has
a timeout: past it the whole session gets SIGTERM, then SIGKILL
L{KILL_GRACE} seconds later.  Nothing here waits for ever.
"""

from __future__ import annotations

import os
import signal
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from hestia.backends.environment import child_environment
from hestia.backends.process import session_command
from hestia.config import Reader, describe, describe_command

# Between SIGTERM and SIGKILL for a command past its timeout (or abandoned).
KILL_GRACE = 5.0
# A command may leave a background child holding its stdout (``nohup srv &``):
# once the command itself has exited, its output is read this much longer.
OUTPUT_GRACE = 1.0
OUTPUT_LINES_KEPT = 200
_PARTIAL_LINE_LIMIT = 8192


def parse_command(reader: Reader, value: Any, key: str) -> tuple[str, ...]:
    """
    A command as configured: a list of arguments, or a string run by
    C{/bin/sh -c} (as the service's C{command} is).  Empty is an error.
    """
    if isinstance(value, str):
        if not value.strip():
            raise reader.fail(key, "must not be empty")
        return ("/bin/sh", "-c", value)
    if isinstance(value, list):
        if not value:
            raise reader.fail(key, "must not be empty")
        if not all(isinstance(part, (str, int, float)) and not isinstance(part, bool) for part in value):
            raise reader.fail(key, f"expected a list of arguments (strings), got {describe(value)}")
        argv = tuple(str(part) for part in value)
        if not argv[0].strip():
            raise reader.fail(key, "the program (first argument) must not be empty")
        return argv
    raise reader.fail(key, f"expected a list of arguments or a shell command string, got {describe(value)}")


MAX_COMMAND_TIMEOUT = 86400.0


def parse_command_timeout(reader: Reader, value: Any, key: str) -> float:
    """A command's timeout: more than 0, at most a day (so never NaN or infinite)."""
    seconds = reader.duration(value, key, maximum=MAX_COMMAND_TIMEOUT)
    if not 0 < seconds <= MAX_COMMAND_TIMEOUT:
        raise reader.fail(key, f"must be more than 0 and at most 24h, got {value!r}")
    return seconds


@dataclass(frozen=True)
class CommandResult:
    """
    How a command ended.

    @ivar exit_code: its exit status, or C{None} when a signal ended it.
    @ivar timed_out: it ran past its timeout and was killed.
    @ivar lines: what it wrote (stdout and stderr, in order of arrival).
    """

    command: tuple[str, ...]
    exit_code: int | None
    signal: int | None
    timed_out: bool
    lines: tuple[str, ...]
    timeout: float

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def describe(self) -> str:
        """C{exit status 3}, C{timed out after 60s (killed)}, C{killed by signal 9 (SIGKILL)}."""
        if self.timed_out:
            return f"timed out after {self.timeout:g}s (killed)"
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = "unknown"
            return f"killed by signal {self.signal} ({name})"
        return f"exit status {self.exit_code}"

    def last_line(self) -> str:
        """The last non-blank line of output: usually the reason it failed."""
        return next((line.strip() for line in reversed(self.lines) if line.strip()), "")

    def reason(self, what: str) -> str:
        """C{stop command ssh box suspend: exit status 255}: what a client may be told (no output)."""
        return f"{what} {describe_command(self.command)}: {self.describe()}"

    def summary(self, what: str) -> str:
        """C{stop command ssh box suspend: exit status 255: ssh: connect ... refused}: for the log."""
        last = self.last_line()
        return f"{self.reason(what)}: {last}" if last else self.reason(what)


class _Protocol(ProcessProtocol):
    def __init__(self, run: _Run) -> None:
        self._run = run
        self._partial = {1: b"", 2: b""}

    def connectionMade(self) -> None:
        # A command that reads stdin (a prompt) gets end-of-file, not a hang.
        IProcessTransport(self.transport).closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._partial.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        if len(rest) > _PARTIAL_LINE_LIMIT:
            # Output without newlines must not grow this for ever.
            lines.append(rest)
            rest = b""
        self._partial[childFD] = rest
        for line in lines:
            self._run.line(line, childFD)

    def processExited(self, reason: Failure) -> None:
        self._run.exited()

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self._run.line(rest, fd)
        self._partial = {1: b"", 2: b""}
        self._run.ended(reason)


class _Run:
    """One run of one command."""

    def __init__(self, runner: CommandRunner, command: tuple[str, ...], timeout: float) -> None:
        self.runner = runner
        self.command = command
        self.timeout = timeout
        self.lines: list[str] = []
        self.process: Any = None
        self.timed_out = False
        self.result: Deferred[CommandResult] = Deferred(self._cancel)
        self._calls: list[IDelayedCall] = []

    def start(self, env: Mapping[str, str], cwd: str | None) -> None:
        executable, argv = session_command(self.command)
        self.process = IReactorProcess(self.runner.reactor).spawnProcess(
            _Protocol(self), executable, argv, env=dict(env), path=cwd, childFDs={0: "w", 1: "r", 2: "r"}
        )
        if self.timeout > 0:
            self._later(self.timeout, self._timed_out)

    def line(self, raw: bytes, fd: int) -> None:
        text = raw.rstrip(b"\r").decode("utf-8", "replace")
        self.lines.append(text)
        self.runner.output_line("stdout" if fd == 1 else "stderr", text)

    def exited(self) -> None:
        # The command is gone; a background child may still hold its output
        # pipes, and the process would count as "ended" only when it lets go.
        self._later(OUTPUT_GRACE, self._close_output)

    def ended(self, reason: Failure) -> None:
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []
        value = reason.value
        code: int | None = None
        signum: int | None = None
        if isinstance(value, (ProcessDone, ProcessTerminated)):
            code, signum = value.exitCode, value.signal
        result = CommandResult(self.command, code, signum, self.timed_out, tuple(self.lines), self.timeout)
        if not self.result.called:
            self.result.callback(result)

    # -- ending it early ------------------------------------------------------

    def _later(self, delay: float, action: Callable[[], None]) -> None:
        self._calls.append(self.runner.reactor.callLater(delay, action))

    def _timed_out(self) -> None:
        self.timed_out = True
        self.runner.log.warn(
            "{command} still running after {timeout}s: stopping it",
            command=describe_command(self.command), timeout=self.timeout, service=self.runner.service,
        )
        self._terminate()

    def _cancel(self, result: Deferred[CommandResult]) -> None:
        """Whoever waited has given up (a start abandoned): the command must not go on unobserved."""
        self._terminate()

    def _terminate(self) -> None:
        self._signal(signal.SIGTERM)
        self._later(KILL_GRACE, lambda: self._signal(signal.SIGKILL))

    def _signal(self, signum: int) -> None:
        pid = self.process.pid if self.process is not None else None
        if pid is None:
            return  # Already reaped.
        try:
            self.runner.signal_group(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def _close_output(self) -> None:
        for fd in (1, 2):
            try:
                self.process.closeChildFD(fd)
            except Exception:  # noqa: S110 - already closed
                pass


class CommandRunner:
    """
    Runs one service's commands and keeps their output.

    @ivar output: the last lines written by any command, newest last.
    @param signal_group: C{os.killpg}; tests with a fake reactor pass a recorder.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        service: str,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        signal_group: Callable[[int, int], None] = os.killpg,
    ) -> None:
        self.reactor = reactor
        self.service = service
        self.env = dict(env or {})
        self.cwd = cwd
        self.signal_group = signal_group
        self.output: deque[str] = deque(maxlen=OUTPUT_LINES_KEPT)
        self.log = Logger(namespace=f"hestia.service.{service}")
        self._listeners: list[Callable[[str, str], None]] = []

    def add_line_listener(self, listener: Callable[[str, str], None]) -> None:
        """Call C{listener(stream, line)} for each line a command writes (see L{hestia.logs})."""
        self._listeners.append(listener)

    def output_line(self, stream: str, line: str) -> None:
        self.output.append(line)
        self.log.info("{line}", line=line, stream=stream, service=self.service, event="service_output")
        for listener in self._listeners:
            listener(stream, line)

    def run(self, command: tuple[str, ...], timeout: float, what: str = "command") -> Deferred[CommandResult]:
        """
        Run C{command} to its end, or until C{timeout} seconds have passed.

        @return: a L{Deferred} firing with a L{CommandResult} (a failing command
            is a result, not an error); failing with L{OSError} when it cannot be
            run at all.  Cancelling it stops the command.
        """
        run = _Run(self, command, timeout)
        env = child_environment(self.env)
        self.log.info("running {what} {command}", what=what, command=describe_command(command),
                      service=self.service)
        run.start(env, self.cwd)

        def logged(result: CommandResult) -> CommandResult:
            self.log.info("{what} {command}: {outcome}", what=what, command=describe_command(command),
                          outcome=result.describe(), service=self.service)
            return result

        return run.result.addCallback(logged)
