"""Run ``tests/support/backend.py`` as a real subprocess, for any test that needs a live backend.

Each backend gets its own session (and so its own process group) so that ``stop()``
can kill it *and* anything it spawned, and no test leaves processes behind even
when the code under test does.  Output goes to temporary files rather than pipes:
nothing has to drain them, and a chatty backend can never block on a full pipe.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

BACKEND = Path(__file__).with_name("backend.py")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it, so parallel tests rarely clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    """True if something accepts TCP connections on host:port right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    """True if `pid` runs; zombies count as dead since they no longer do anything."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux): trust kill(0)
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.02) -> bool:
    """Poll `predicate()` until it is truthy or `timeout` passes; never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class BackendProcess:
    """One ``tests/support/backend.py`` subprocess on loopback; use as a context manager or call stop()."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.port = port if port is not None else free_port(host)
        self.host = host
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None
        self._err: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def argv(self) -> list[str]:
        """The command line without extra args, e.g. to hand to the gateway's config."""
        return [sys.executable, str(BACKEND), "--port", str(self.port), "--host", self.host]

    def start(self, args: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        """Spawn the backend in a new session; returns at once (see wait_listening)."""
        if self.proc is not None:
            raise RuntimeError("backend already started")
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self._err = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self.argv, *args], stdin=subprocess.DEVNULL, stdout=self._out,
            stderr=self._err, start_new_session=True,
        )
        return self.proc

    def wait_listening(self, timeout: float = 10.0) -> None:
        """Block until the port accepts connections; fail fast if the process died instead."""
        proc = self._require()
        if not wait_for(lambda: proc.poll() is not None or port_open(self.port, self.host),
                        timeout):
            raise TimeoutError(f"backend not listening after {timeout}s: {self.output()}")
        if proc.poll() is not None:
            raise RuntimeError(f"backend exited with {proc.returncode}: {self.output()}")

    def wait_output(self, text: str, timeout: float = 5.0, stream: str = "stdout") -> None:
        """Block until `text` appears on the backend's stdout (or stderr)."""
        read = self.stdout if stream == "stdout" else self.stderr
        if not wait_for(lambda: text in read(), timeout):
            raise TimeoutError(f"{text!r} not seen after {timeout}s: {self.output()}")

    def stdout(self) -> str:
        return _read(self._out)

    def stderr(self) -> str:
        return _read(self._err)

    def output(self) -> str:
        return f"stdout={self.stdout()!r} stderr={self.stderr()!r}"

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `timeout`; reap; return the exit status.

        The group is SIGKILLed at the end whatever happened, so grandchildren never
        outlive the test even when the backend itself already exited.
        """
        if self.proc is None:
            return None
        proc = self.proc
        if not _exited(proc):
            _killpg(proc.pid, signal.SIGTERM)
            if not wait_for(lambda: _exited(proc), timeout):
                _killpg(proc.pid, signal.SIGKILL)
        # The leader is at worst an unreaped zombie here, so its pid (= the group id)
        # cannot have been reused: this can only hit our own leftovers.
        _killpg(proc.pid, signal.SIGKILL)
        return proc.wait(timeout)

    def close(self) -> None:
        """stop() and release the output files."""
        self.stop()
        for f in (self._out, self._err):
            if f is not None:
                f.close()

    def _require(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise RuntimeError("backend not started")
        return self.proc

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Has it exited? Unlike poll(), leaves it unreaped so its pid stays reserved."""
    if proc.returncode is not None:
        return True
    try:
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        return os.waitid(os.P_PID, proc.pid, flags) is not None
    except ChildProcessError:
        return True


def _read(f: IO[bytes] | None) -> str:
    """Read all output so far; pread() because seeking would move the child's write offset."""
    if f is None or f.closed:
        return ""
    fd = f.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", errors="replace")
