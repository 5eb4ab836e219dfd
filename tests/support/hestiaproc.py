"""Run Hestia as a real ``twistd -n hestia`` subprocess, for the integration tests.

L{HestiaProcess} writes a YAML configuration, starts the gateway in a session of
its own (so that a last-resort SIGKILL reaches its whole process group), sends
its output to files, and waits until C{GET /v1/health} answers.  The backends
Hestia starts live in sessions of their own (that is the process backend's
job), so L{reap_leftovers} finds whatever outlived a test by a marker in its
command line -- every backend command built by L{backend_command} names a file
under the test's C{tmp_path} -- and kills those sessions too.  Nothing a test
starts survives it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from support.backendproc import BACKEND, free_port, pid_alive, wait_for

GRACEFUL = (0, -signal.SIGTERM)  # twistd re-raises the signal it shut down on
VENV_BIN = Path(sys.executable).parent
TWISTD = str(VENV_BIN / "twistd")
PYTHON = sys.executable
TIMED_BACKEND = Path(__file__).with_name("timed_backend.py")

# Variables of the developer's shell that would change what Hestia reads.
_SCRUBBED_PREFIXES = ("HESTIA_",)
_SCRUBBED = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


def clean_environ(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without Hestia's own variables, plus C{extra}."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(_SCRUBBED_PREFIXES) and name.lower() not in _SCRUBBED
    }
    env.update(extra or {})
    return env


def backend_command(
    port: int, *args: str, request_log: Path, start_file: Path | None = None, timed: bool = False
) -> list[str] | str:
    """
    The command Hestia should run for a C{tests/support/backend.py} on C{port}.

    @param request_log: always given: it is also the marker that lets
        L{reap_leftovers} find the process.
    @param start_file: when given, the command is a shell line that appends
        C{started} to this file before exec-ing the backend: one line per start.
    @param timed: run C{tests/support/timed_backend.py}, whose request log stamps each
        request with the time it arrived.
    """
    script = TIMED_BACKEND if timed else BACKEND
    argv = [PYTHON, str(script), "--port", str(port), "--request-log", str(request_log), *args]
    if start_file is None:
        return argv
    quoted = " ".join(_sh_quote(part) for part in argv)
    return f"echo started >> {_sh_quote(str(start_file))}; exec {quoted}"


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def read_lines(path: Path) -> list[str]:
    """The lines of C{path} so far ([] when it does not exist yet)."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []


def read_request_log(path: Path) -> list[dict[str, Any]]:
    """The JSON entries a backend's C{--request-log} holds so far."""
    entries = []
    for line in read_lines(path):
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return entries


@dataclass
class BackendSpec:
    """
    One C{tests/support/backend.py} service for a Hestia configuration, and what it left.

    @ivar dir: where its request log, start counter and pid files go (the test's
        C{tmp_path}, which makes them markers for L{reap_leftovers}).
    """

    name: str
    dir: Path
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def request_log(self) -> Path:
        return self.dir / f"{self.name}.requests.jsonl"

    @property
    def start_file(self) -> Path:
        return self.dir / f"{self.name}.starts"

    @property
    def child_pidfile(self) -> Path:
        return self.dir / f"{self.name}.child.pid"

    def service(self, *args: str, timed: bool = False, **settings: Any) -> dict[str, Any]:
        """The C{services.<name>} entry: health on C{/health}, one start-counter line per start."""
        command = backend_command(
            self.port, "--name", self.name, *args,
            request_log=self.request_log, start_file=self.start_file, timed=timed,
        )
        return {"url": self.url, "health": {"path": "/health"}, "command": command, **settings}

    def starts(self) -> int:
        """How many times Hestia has run the command."""
        return len(read_lines(self.start_file))

    def requests(self, path_prefix: str = "") -> list[dict[str, Any]]:
        return [entry for entry in read_request_log(self.request_log) if entry["path"].startswith(path_prefix)]

    def running(self) -> list[int]:
        """Live processes of this backend (and of its session)."""
        return processes_marked(str(self.request_log))

    def grandchild_pid(self, timeout: float = 5.0) -> int:
        """The pid C{--spawn-child} wrote (waiting for the file)."""
        if not wait_for(lambda: read_lines(self.child_pidfile), timeout):
            raise TimeoutError(f"{self.child_pidfile} never written")
        return int(read_lines(self.child_pidfile)[0])


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header_values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 10.0) -> RawResponse:
    """
    Send C{head} (request line and headers, without the blank line) byte for byte.

    C{Connection: close} is added (unless C{head} has a C{Connection} header,
    which should then say C{close}) so the response ends with the connection; no
    client library gets a chance to normalise the path or the headers.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        head = head.rstrip(b"\r\n")
        if b"\nconnection:" not in head.lower():
            head += b"\r\nConnection: close"
        sock.sendall(head + b"\r\n\r\n" + body)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    raw = b"".join(chunks)
    head_bytes, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    headers = [(name.strip(), value.strip()) for name, _, value in (line.partition(":") for line in header_lines)]
    if any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in headers):
        rest = _dechunk(rest)
    return RawResponse(int(status_line.split()[1]), headers, rest)


def _dechunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out.append(data[:size])
        data = data[size + 2:]
    return b"".join(out)


def _session_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return int(fields[3]) if len(fields) > 3 else None  # state ppid pgrp session


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def processes_marked(marker: str) -> list[int]:
    """Live processes in the sessions of any process whose command line holds C{marker}."""
    me = os.getpid()
    pids = _all_pids()
    sessions = {
        session
        for pid in pids
        if pid != me and marker in _cmdline(pid) and (session := _session_of(pid)) is not None
    }
    sessions.discard(_session_of(me))
    return [pid for pid in pids if pid != me and _session_of(pid) in sessions and pid_alive(pid)]


def reap_leftovers(marker: str) -> list[int]:
    """SIGKILL every process found by L{processes_marked}; return their pids."""
    leftovers = processes_marked(marker)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return leftovers


class HestiaProcess:
    """
    One ``twistd -n hestia`` on a free loopback port.

    @param config: the configuration as a dict, written as YAML (its
        C{server.listen} is set to a free loopback port); C{None} runs Hestia
        with no configuration file at all, in an empty directory, listening
        where C{HESTIA_LISTEN} says.
    @param env: extra environment variables for the gateway (C{HESTIA_*} ones of
        the test runner's environment are never passed on).
    @param config_from_env: name the file in C{HESTIA_CONFIG} instead of C{--config}.
    """

    def __init__(
        self,
        config: dict[str, Any] | None,
        tmp_path: Path,
        env: Mapping[str, str] | None = None,
        *,
        port: int | None = None,
        args: Sequence[str] = (),
        config_from_env: bool = False,
    ) -> None:
        self.dir = Path(tmp_path)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.listen = f"tcp:{self.port}:interface=127.0.0.1"
        self.env = clean_environ(env)
        self.config_path: Path | None = None
        self.args = list(args)
        self.config_from_env = config_from_env
        if config is None:
            self.env.setdefault("HESTIA_LISTEN", self.listen)
        else:
            config = dict(config)
            config["server"] = {"listen": self.listen, **dict(config.get("server") or {})}
            self.write_config(config)
        self.stdout_path = self.dir / "hestia.out"
        self.stderr_path = self.dir / "hestia.err"
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed = False  # stop() had to SIGKILL it
        self.http = httpx.Client(base_url=self.url, trust_env=False, timeout=10.0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def service_url(self, name: str) -> str:
        return f"{self.url}/services/{name}"

    def write_config(self, config: dict[str, Any]) -> Path:
        """(Re)write the configuration file; it takes effect on start or reload."""
        self.config_path = self.dir / "hestia_config.yml"
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        os.replace(tmp, self.config_path)
        return self.config_path

    @property
    def argv(self) -> list[str]:
        argv = [TWISTD, "-n", "--pidfile=", "hestia"]
        if self.config_path is not None and not self.config_from_env:
            argv += ["--config", str(self.config_path)]
        return argv + self.args

    def start(self, wait: bool = True, timeout: float = 15.0) -> HestiaProcess:
        """Start twistd; with C{wait}, return once C{/v1/health} answers."""
        cwd = self.dir / "cwd"
        cwd.mkdir(exist_ok=True)
        if self.config_from_env and self.config_path is not None:
            self.env["HESTIA_CONFIG"] = str(self.config_path)
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                env=self.env, cwd=cwd, start_new_session=True,
            )
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 15.0) -> None:
        proc = self._require()
        if not wait_for(lambda: proc.poll() is not None or self._healthy(), timeout, 0.02):
            raise TimeoutError(f"Hestia not healthy after {timeout}s:\n{self.log_text()}")
        if proc.poll() is not None:
            raise RuntimeError(f"Hestia exited with {proc.returncode}:\n{self.log_text()}")

    def _healthy(self) -> bool:
        try:
            return self.http.get("/v1/health", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    # -- talking to it ---------------------------------------------------------

    def status(self, name: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/services/{name}/status")
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def state(self, name: str) -> str:
        return str(self.status(name)["state"])

    def wait_state(self, name: str, state: str, timeout: float = 10.0) -> dict[str, Any]:
        """Poll the status until the service is in C{state}; return that status."""
        seen: list[dict[str, Any]] = []

        def reached() -> bool:
            seen.append(self.status(name))
            return seen[-1]["state"] == state

        if not wait_for(reached, timeout, 0.02):
            raise AssertionError(f"{name} not {state} after {timeout}s: {seen[-1] if seen else None}")
        return seen[-1]

    def wait_status(self, name: str, key: str, value: Any, timeout: float = 10.0) -> dict[str, Any]:
        seen: list[dict[str, Any]] = []

        def reached() -> bool:
            seen.append(self.status(name))
            return bool(seen[-1][key] == value)

        if not wait_for(reached, timeout, 0.01):
            raise AssertionError(f"{name}: {key} != {value!r} after {timeout}s: {seen[-1] if seen else None}")
        return seen[-1]

    def log_text(self) -> str:
        return _read(self.stdout_path) + _read(self.stderr_path)

    def stderr_text(self) -> str:
        return _read(self.stderr_path)

    # -- ending it -----------------------------------------------------------------

    def signal(self, sig: int) -> None:
        os.kill(self._require().pid, sig)

    def wait_exit(self, timeout: float = 15.0) -> int:
        """Wait for twistd to exit by itself; its exit status."""
        return self._require().wait(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """
        SIGTERM, wait for the exit, SIGKILL the whole group as a last resort.

        @return: the exit status, or C{None} when it never ran.  After a clean
            shutdown on SIGTERM twistd ends itself with that signal, so a
            graceful stop returns C{-SIGTERM} (L{GRACEFUL}).
        """
        self.http.close()
        if self.proc is None:
            return None
        proc = self.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.killed = True
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait(5.0)
        _killpg(proc.pid, signal.SIGKILL)
        return proc.returncode

    def _require(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise RuntimeError("Hestia not started")
        return self.proc


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def run_to_exit(
    config: dict[str, Any] | str, tmp_path: Path, env: Mapping[str, str] | None = None, timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    """Run twistd with a configuration that should make it exit; its result."""
    path = Path(tmp_path) / "hestia_config.yml"
    text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "hestia", "--config", str(path)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        env=clean_environ(env), cwd=tmp_path, start_new_session=True, check=False,
    )


__all__ = [
    "BackendSpec",
    "HestiaProcess",
    "RawResponse",
    "raw_request",
    "backend_command",
    "clean_environ",
    "free_port",
    "pid_alive",
    "processes_marked",
    "read_lines",
    "read_request_log",
    "reap_leftovers",
    "run_to_exit",
    "wait_for",
]


def stop_cleanly(gateway: HestiaProcess, marker: Path) -> None:
    """
    Stop C{gateway} at the end of a shared fixture, and fail unless it stopped
    gracefully and left no process whose command line names C{marker} behind.
    """
    status = gateway.stop()
    # Orphans are reparented and die asynchronously: give them a moment.
    wait_for(lambda: not processes_marked(str(marker)), 2.0)
    leftovers = reap_leftovers(str(marker))
    assert status in GRACEFUL, gateway.log_text()
    assert not leftovers, f"left behind: {leftovers}"
