#!/usr/bin/env python3
"""
Hestia's benchmark: Hestia against nginx, Caddy and stock ReverseProxyResource.

    python bench/run.py [--quick] [--out bench/results.md] [--keep]

On loopback only, in one run, it starts a fast backend (Debian's nginx serving
100 bytes at /small and 50 MB at /big), four reverse proxies in front of it
(nginx, Caddy, stock C{twisted.web.proxy.ReverseProxyResource}, Hestia), and
measures with wrk and small clients of its own:

  - small responses at 1, 32 and 128 connections: requests/s, p50, p99;
  - a 50 MB download: MB/s (curl);
  - Server-Sent Events: latency per event, send stamp to receive time;
  - cold start: time to first byte through Hestia minus the backend's own
    time to ready (20 starts);
  - 10,000 concurrent requests held during a 2 s cold start: answers, errors,
    peak RSS of the Hestia process;
  - idle cost: Hestia's CPU seconds over 60 s with 20 configured services.

It prints a table, writes C{bench/results.md}, and stops every process it
started, on success, on an exception and on Ctrl-C.  See C{bench/README.md}.

Standard library only, so it runs with any Python 3.11; the proxies run with
the project's virtualenv (C{.venv}).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
TWISTD = str(VENV_BIN / "twistd") if (VENV_BIN / "twistd").exists() else shutil.which("twistd") or "twistd"
BACKEND_PY = REPO / "tests" / "support" / "backend.py"
STAMPED_BACKEND = BENCH / "stamped_backend.py"
STOCK_PROXY = BENCH / "stock_proxy.py"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CADDY = shutil.which("caddy") or "/usr/bin/caddy"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
CURL = shutil.which("curl") or "/usr/bin/curl"

SMALL_BYTES = 100
BIG_BYTES = 50_000_000  # "50 MB"; MB/s below are 10^6 bytes per second
CONNECTIONS = (1, 32, 128)
COLD_START_DELAY = 0.5  # the cold-start backend sleeps this long before listening
BURST_START_DELAY = 2.0
WANTED_NOFILE = 65536

TARGETS = ("direct", "nginx", "caddy", "stock", "hestia")
LABELS = {
    "direct": "backend direct (nginx)",
    "nginx": "nginx proxy",
    "caddy": "Caddy proxy",
    "stock": "stock ReverseProxyResource",
    "hestia": "Hestia",
}

WRK_LUA = r"""
-- Printed once at the end: wrk's own summary is meant for people, not scripts.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50":%d,"p90":%d,"p99":%d,"mean":%.2f,"max":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max))
end
"""


# -- processes -------------------------------------------------------------------------------------


class Supervisor:
    """
    Starts every process of the run, each in a process group of its own, and
    ends them all: Hestia first with SIGTERM (it stops the services it
    started), the rest after, then a sweep for anything whose command line
    names this run's temporary directory (services Hestia started, should
    Hestia itself have died).
    """

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._closed = False

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        try:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=env, cwd=self.tmp,
            )
        finally:
            log.close()
        self.procs.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    @staticmethod
    def end(proc: subprocess.Popen[bytes], grace: float) -> None:
        """SIGTERM to the process group, SIGKILL after C{grace}; stragglers of the group too."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # A second Ctrl-C (or a SIGTERM) must not cut the clean-up short and leave orphans.
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            ordered = sorted(reversed(self.procs), key=lambda item: not item[0].startswith("hestia"))
            for name, proc in ordered:
                self.end(proc, 15.0 if name.startswith("hestia") else 5.0)
            self.sweep()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def sweep(self) -> None:
        """End whatever still runs with this run's temporary directory on its command line."""
        marker = str(self.tmp).encode()
        me, my_group = os.getpid(), os.getpgrp()
        for attempt in (signal.SIGTERM, signal.SIGKILL):
            groups: set[int] = set()
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or int(entry.name) == me:
                    continue
                try:
                    if marker in (entry / "cmdline").read_bytes():
                        groups.add(os.getpgid(int(entry.name)))
                except (OSError, ProcessLookupError):
                    continue
            groups.discard(my_group)
            if not groups:
                return
            for group in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, attempt)
            time.sleep(1.0)


def raise_nofile() -> int:
    """Raise this process's open-file limit (children inherit it); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = WANTED_NOFILE if hard == resource.RLIM_INFINITY else min(WANTED_NOFILE, hard)
    if wanted > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) ... of C{pid}, in kB."""
    values: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                values[key] = int(rest.split()[0])
    return values


def cpu_seconds(pid: int) -> float:
    """utime + stime of C{pid}, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tcp_counters() -> dict[str, int]:
    """System-wide TcpExt counters: listen-queue overflows show a backlog too small for a burst."""
    wanted = ("ListenOverflows", "ListenDrops", "SyncookiesSent", "TCPReqQFullDrop")
    counters: dict[str, int] = {}
    with contextlib.suppress(OSError):
        lines = Path("/proc/net/netstat").read_text().splitlines()
        for names, values in zip(lines[::2], lines[1::2], strict=False):
            if names.startswith("TcpExt:"):
                counters = {k: int(v) for k, v in zip(names.split()[1:], values.split()[1:], strict=False)
                            if k in wanted}
    return counters


def listen_backlog(port: int) -> int | None:
    """The accept-queue length of the socket listening on C{port} (Send-Q in ss)."""
    if not shutil.which("ss"):
        return None
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2].isdigit():
            return int(fields[2])
    return None


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


# -- small HTTP helpers ------------------------------------------------------------------------


def http(method: str, url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_http(
    url: str, sup: Supervisor, name: str, proc: subprocess.Popen[bytes] | None, timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{sup.log_tail(name)}")
        try:
            status, _ = http("GET", url, timeout=2)
            if status == 200:
                return
            last = f"status {status}"
        except OSError as error:
            last = str(error)
        time.sleep(0.05)
    raise RuntimeError(f"{name} not ready at {url} after {timeout:g}s ({last}):\n{sup.log_tail(name)}")


def read_response(sock: socket.socket, first: bytes = b"") -> tuple[int, bytes]:
    """Read one HTTP/1.1 response with a Content-Length body from C{sock}."""
    data = first
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} bytes")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    length = int(match.group(1)) if match else 0
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, body


def get_request(port: int, path: str, close: bool = True) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{connection}\r\n".encode()


# -- statistics ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return a / b


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


# -- the setup -----------------------------------------------------------------------------------


@dataclass
class Ports:
    backend: int
    sse: int
    nginx: int
    caddy: int
    stock: int
    hestia: int
    hestia_idle: int
    cold: int
    burst: int
    spare: list[int]


@dataclass
class Setup:
    tmp: Path
    ports: Ports
    hestia: subprocess.Popen[bytes]
    hestia_idle: subprocess.Popen[bytes]
    nofile: int
    small_url: dict[str, str] = field(default_factory=dict)
    big_url: dict[str, str] = field(default_factory=dict)
    sse_addr: dict[str, tuple[int, str]] = field(default_factory=dict)


def nginx_common(prefix: Path) -> str:
    temp = prefix / "temp"
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (temp / name).mkdir(parents=True, exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""  # as root, workers would otherwise be nobody
    return (
        f"{user}worker_processes 1;\n"
        f"pid {prefix}/nginx.pid;\n"
        f"error_log {prefix}/error.log warn;\n"
        "worker_rlimit_nofile 20000;\n"
        "events { worker_connections 19000; }\n"
    )


def nginx_http_common(prefix: Path) -> str:
    temp = prefix / "temp"
    return (
        "access_log off;\n"
        "keepalive_requests 10000000; keepalive_timeout 75s;\n"
        "default_type application/octet-stream;\n"
        f"client_body_temp_path {temp}/body; proxy_temp_path {temp}/proxy;\n"
        f"fastcgi_temp_path {temp}/fastcgi; uwsgi_temp_path {temp}/uwsgi; scgi_temp_path {temp}/scgi;\n"
    )


def nginx_argv(prefix: Path) -> list[str]:
    return [NGINX, "-p", f"{prefix}/", "-c", f"{prefix}/nginx.conf", "-e", f"{prefix}/error.log",
            "-g", "daemon off;"]


def write_static_nginx(prefix: Path, port: int, www: Path) -> None:
    """nginx serving the files in C{www}: the fast backend."""
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "nginx.conf").write_text(
        nginx_common(prefix)
        + "http {\n" + nginx_http_common(prefix)
        + "sendfile on; tcp_nopush on; tcp_nodelay on;\n"
        + f"server {{ listen 127.0.0.1:{port} backlog=4096; root {www}; location / {{ }} }}\n"
        + "}\n"
    )


def write_proxy_nginx(prefix: Path, port: int, backend: int, sse: int) -> None:
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "nginx.conf").write_text(
        nginx_common(prefix)
        + "http {\n" + nginx_http_common(prefix)
        + f"upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}\n"
        + f"server {{ listen 127.0.0.1:{port} backlog=4096;\n"
        + "  location / { proxy_pass http://backend; proxy_http_version 1.1;"
        + " proxy_set_header Connection \"\"; }\n"
        + f"  location /sse {{ proxy_pass http://127.0.0.1:{sse}; proxy_http_version 1.1;"
        + " proxy_set_header Connection \"\"; proxy_buffering off; }\n"
        + "}\n}\n"
    )


def write_caddyfile(path: Path, port: int, backend: int, sse: int) -> None:
    path.write_text(
        "{\n\tadmin off\n\tauto_https off\n\tdefault_bind 127.0.0.1\n}\n"
        f":{port} {{\n"
        f"\treverse_proxy /sse* 127.0.0.1:{sse}\n"
        f"\treverse_proxy 127.0.0.1:{backend}\n"
        "}\n"
    )


def hestia_main_config(tmp: Path, ports: Ports) -> dict[str, Any]:
    return {
        "server": {"listen": f"tcp:{ports.hestia}:interface=127.0.0.1",
                   "state_path": str(tmp / "hestia.db"), "shutdown_timeout": 3},
        "defaults": {"stop_timeout": 3},
        "services": {
            # A service with only url: is `static` (always on, no lifecycle).
            "fast": {"url": f"http://127.0.0.1:{ports.backend}"},
            "sse": {"url": f"http://127.0.0.1:{ports.sse}"},
            "cold": {
                "url": f"http://127.0.0.1:{ports.cold}",
                "command": [PYTHON, str(STAMPED_BACKEND), "--stamp", str(tmp / "cold.stamp"),
                            "--port", str(ports.cold), "--start-delay", str(COLD_START_DELAY)],
                "health": {"path": "/health"},
                "idle_timeout": 3600,
            },
        },
    }


def hestia_idle_config(tmp: Path, ports: Ports) -> dict[str, Any]:
    """20 services: the burst one (nginx after a 2 s sleep), 9 process and 10 static ones."""
    prefix = tmp / "burst-nginx"
    write_static_nginx(prefix, ports.burst, tmp / "www")
    burst_cmd = f"sleep {BURST_START_DELAY:g}; exec " + shlex.join(nginx_argv(prefix))
    services: dict[str, Any] = {
        "burst": {
            "url": f"http://127.0.0.1:{ports.burst}",
            "command": burst_cmd,
            "health": {"path": "/small"},
            "queue_limit": 20000,
            "queue_timeout": 120,
            "start_timeout": 60,
            "idle_timeout": 3600,
        }
    }
    for i in range(9):
        port = ports.spare[i]
        services[f"proc{i:02d}"] = {
            "url": f"http://127.0.0.1:{port}",
            "command": [PYTHON, str(BACKEND_PY), "--port", str(port)],
            "health": {"path": "/health"},
            "idle_timeout": 300,
        }
    for i in range(10):
        services[f"static{i:02d}"] = {"url": f"http://127.0.0.1:{ports.backend}"}
    return {
        "server": {"listen": f"tcp:{ports.hestia_idle}:interface=127.0.0.1",
                   "state_path": str(tmp / "hestia-idle.db"), "shutdown_timeout": 3},
        "defaults": {"stop_timeout": 3},
        "services": services,
    }


def clean_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HESTIA_")}
    env.update(HOME=str(tmp / "home"), XDG_DATA_HOME=str(tmp / "home" / "data"),
               XDG_CONFIG_HOME=str(tmp / "home" / "config"))
    (tmp / "home").mkdir(exist_ok=True)
    return env


def start_all(sup: Supervisor, tmp: Path, nofile: int) -> Setup:
    p = free_ports(30)
    ports = Ports(backend=p[0], sse=p[1], nginx=p[2], caddy=p[3], stock=p[4], hestia=p[5],
                  hestia_idle=p[6], cold=p[7], burst=p[8], spare=p[9:])
    env = clean_env(tmp)

    www = tmp / "www"
    www.mkdir()
    (www / "small").write_bytes(b"x" * (SMALL_BYTES - 1) + b"\n")
    with (www / "big").open("wb") as big:
        block = os.urandom(1 << 20)
        written = 0
        while written < BIG_BYTES:
            piece = block[: BIG_BYTES - written]
            big.write(piece)
            written += len(piece)

    write_static_nginx(tmp / "backend-nginx", ports.backend, www)
    backend = sup.spawn("backend-nginx", nginx_argv(tmp / "backend-nginx"), env)
    sse = sup.spawn("sse-backend", [PYTHON, str(BACKEND_PY), "--port", str(ports.sse), "--name", "sse"], env)
    write_proxy_nginx(tmp / "proxy-nginx", ports.nginx, ports.backend, ports.sse)
    nginx = sup.spawn("proxy-nginx", nginx_argv(tmp / "proxy-nginx"), env)
    write_caddyfile(tmp / "Caddyfile", ports.caddy, ports.backend, ports.sse)
    caddy = sup.spawn("caddy", [CADDY, "run", "--config", str(tmp / "Caddyfile"), "--adapter", "caddyfile"], env)
    stock = sup.spawn("stock", [PYTHON, str(STOCK_PROXY), "--port", str(ports.stock),
                                "--backend", f"127.0.0.1:{ports.backend}", "--sse", f"127.0.0.1:{ports.sse}"], env)
    configs = {"hestia": hestia_main_config(tmp, ports), "hestia-idle": hestia_idle_config(tmp, ports)}
    hestias = {}
    for name, config in configs.items():
        path = tmp / f"{name}.yml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        hestias[name] = sup.spawn(name, [TWISTD, "-n", "--pidfile=", "hestia", "--config", str(path)], env)

    setup = Setup(tmp=tmp, ports=ports, hestia=hestias["hestia"], hestia_idle=hestias["hestia-idle"], nofile=nofile)
    bases = {
        "direct": f"http://127.0.0.1:{ports.backend}",
        "nginx": f"http://127.0.0.1:{ports.nginx}",
        "caddy": f"http://127.0.0.1:{ports.caddy}",
        "stock": f"http://127.0.0.1:{ports.stock}",
        "hestia": f"http://127.0.0.1:{ports.hestia}/services/fast",
    }
    setup.small_url = {name: f"{base}/small" for name, base in bases.items()}
    setup.big_url = {name: f"{base}/big" for name, base in bases.items()}
    setup.sse_addr = {
        "direct": (ports.sse, "/sse"),
        "nginx": (ports.nginx, "/sse"),
        "caddy": (ports.caddy, "/sse"),
        "stock": (ports.stock, "/sse"),
        "hestia": (ports.hestia, "/services/sse/sse"),
    }

    wait_http(f"http://127.0.0.1:{ports.backend}/small", sup, "backend-nginx", backend)
    wait_http(f"http://127.0.0.1:{ports.sse}/health", sup, "sse-backend", sse)
    wait_http(f"http://127.0.0.1:{ports.hestia}/v1/health", sup, "hestia", setup.hestia)
    wait_http(f"http://127.0.0.1:{ports.hestia_idle}/v1/health", sup, "hestia-idle", setup.hestia_idle)
    procs = {"nginx": nginx, "caddy": caddy, "stock": stock, "hestia": setup.hestia, "direct": backend}
    for name, url in setup.small_url.items():
        log = {"nginx": "proxy-nginx", "direct": "backend-nginx"}.get(name, name)
        wait_http(url, sup, log, procs[name])
        status, body = http("GET", url)
        if status != 200 or len(body) != SMALL_BYTES:
            raise RuntimeError(f"{name}: GET {url} gave {status} with {len(body)} bytes")
    return setup


# -- measurements --------------------------------------------------------------------------------


def wrk(url: str, connections: int, duration: float, lua: Path) -> dict[str, Any]:
    threads = min(2, connections)
    argv = [WRK, "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s", "--timeout", "5s",
            "-s", str(lua), url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            data: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
            seconds = data["duration_us"] / 1e6
            data["rps"] = data["requests"] / seconds if seconds else 0.0
            data["errors"] = sum(data[key] for key in ("connect", "read", "write", "status", "timeout"))
            return data
    raise RuntimeError(f"wrk gave no summary for {url}:\n{out.stdout}\n{out.stderr}")


def bench_small(setup: Setup, duration: float, warmup: float, lua: Path) -> dict[str, dict[int, dict[str, Any]]]:
    results: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in TARGETS}
    for name in TARGETS:
        wrk(setup.small_url[name], 32, warmup, lua)  # warm caches, JITs and connection pools
    for connections in CONNECTIONS:
        for name in TARGETS:
            result = wrk(setup.small_url[name], connections, duration, lua)
            results[name][connections] = result
            print(f"  small c={connections:<3} {LABELS[name]:<28} {result['rps']:>10,.0f} req/s  "
                  f"p50 {result['p50'] / 1000:7.3f} ms  p99 {result['p99'] / 1000:7.3f} ms"
                  + (f"  ERRORS {result['errors']}" if result["errors"] else ""), flush=True)
    return results


def bench_download(setup: Setup, runs: int) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for name in TARGETS:
        speeds, failures = [], []
        for attempt in range(runs + 1):  # the first is a warm-up
            out = subprocess.run(
                [CURL, "-sS", "--http1.1", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}",
                 setup.big_url[name]],
                capture_output=True, text=True, timeout=300, check=False,
            )
            try:
                code, size, total = out.stdout.split()
            except ValueError:
                failures.append(out.stderr.strip() or f"curl exit {out.returncode}")
                continue
            if code != "200" or int(size) != BIG_BYTES:
                failures.append(f"status {code}, {size} bytes")
                continue
            if attempt:
                speeds.append(int(size) / float(total) / 1e6)
        results[name] = {"mbps": statistics.median(speeds) if speeds else None, "runs": speeds, "failures": failures}
        print(f"  50 MB download {LABELS[name]:<28} {fmt(results[name]['mbps'], 0)} MB/s"
              + (f"  FAILURES {failures}" if failures else ""), flush=True)
    return results


_EVENT = re.compile(rb"data: (\{[^\n]*\})\n\n")


def sse_latencies(port: int, path: str, events: int, interval: float) -> list[float]:
    """Seconds from each event's send stamp (C{t}) to its arrival here."""
    latencies: list[float] = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(get_request(port, f"{path}?n={events}&interval={interval}"))
        buffer, position = b"", 0
        while len(latencies) < events:
            data = sock.recv(65536)
            now = time.time()
            if not data:
                break
            buffer += data
            for match in _EVENT.finditer(buffer, position):
                latencies.append(now - json.loads(match.group(1))["t"])
                position = match.end()
    if len(latencies) < events:
        raise RuntimeError(f"SSE through port {port}: {len(latencies)} of {events} events")
    return latencies


def bench_sse(setup: Setup, events: int) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for name in TARGETS:
        port, path = setup.sse_addr[name]
        try:
            sse_latencies(port, path, 3, 0.01)  # warm-up
            values = sse_latencies(port, path, events, 0.02)
            results[name] = {"p50": statistics.median(values) * 1000, "p99": percentile(values, 99) * 1000,
                             "max": max(values) * 1000, "over_5ms": sum(v > 0.005 for v in values),
                             "n": len(values), "error": None}
        except (OSError, RuntimeError, ValueError) as error:
            results[name] = {"p50": None, "p99": None, "max": None, "over_5ms": None, "n": 0, "error": str(error)}
    for name in TARGETS:
        added = ratio_diff(results[name]["p50"], results["direct"]["p50"])
        label = "backend direct" if name == "direct" else LABELS[name]
        print(f"  SSE {label:<28} p50 {fmt(results[name]['p50'], 3)} ms  p99 {fmt(results[name]['p99'], 3)} ms"
              f"  added p50 {fmt(added, 3)} ms" + (f"  ERROR {results[name]['error']}" if results[name]["error"] else ""),
              flush=True)
    return results


def ratio_diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def first_byte(port: int, path: str, timeout: float = 60.0) -> tuple[float, float, int]:
    """(sent at, first byte at, status) of one GET, on a fresh connection."""
    sent = time.time()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(get_request(port, path))
        first = sock.recv(65536)
        arrived = time.time()
        if not first:
            raise ConnectionError("closed without an answer")
        status, _ = read_response(sock, first)
    return sent, arrived, status


def own_ready(sup: Supervisor, setup: Setup, stamp: Path) -> tuple[float, dict[str, float]]:
    """
    The cold-start backend's own time to ready: spawn it directly and poll its
    /health every millisecond; seconds from spawn to the first byte of a 200.
    """
    stamp.unlink(missing_ok=True)
    port = setup.ports.cold
    spawned = time.time()
    proc = sup.spawn("cold-direct", [PYTHON, str(STAMPED_BACKEND), "--stamp", str(stamp), "--port", str(port),
                                     "--start-delay", str(COLD_START_DELAY)])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                _, arrived, status = first_byte(port, "/health", timeout=5)
            except ConnectionRefusedError:
                time.sleep(0.001)
                continue
            if status == 200:
                stamps = json.loads(stamp.read_text())
                stamps["spawned"], stamps["arrived"] = spawned, arrived
                return arrived - spawned, stamps
        raise RuntimeError("the cold-start backend did not answer when run directly")
    finally:
        sup.end(proc, 5)


def bench_cold(sup: Supervisor, setup: Setup, starts: int, baseline_runs: int) -> dict[str, Any]:
    """
    Cold starts through Hestia, against the backend's own time to ready.

    The backend's own time to ready in start i is its interpreter start-up
    (spawn -> first line of Python, measured by spawning it directly) plus its
    own first line -> listening (stamped in that very start, so the jitter of
    its imports and its sleep cancels out).  Hestia's overhead in start i is
    the rest of the time to first byte: TTFB_i - own_i
    = (sent -> first line)_i - direct(spawn -> first line) + (listening -> first byte)_i.
    """
    hestia = f"http://127.0.0.1:{setup.ports.hestia}"
    stamp = setup.tmp / "cold.stamp"
    direct_stamp = setup.tmp / "cold-direct.stamp"
    baseline = []
    for _ in range(baseline_runs):
        seconds, stamps = own_ready(sup, setup, direct_stamp)
        baseline.append({"ready": seconds, "to_code": stamps["began"] - stamps["spawned"],
                         "code_to_listen": stamps["listening"] - stamps["began"],
                         "after_listen": stamps["arrived"] - stamps["listening"]})
        time.sleep(0.1)
    own = statistics.median(b["ready"] for b in baseline)
    direct_to_code = statistics.median(b["to_code"] for b in baseline)
    runs: list[dict[str, float]] = []
    failures: list[str] = []
    for _ in range(starts):
        _status_code, body = http("GET", f"{hestia}/v1/services/cold/status")
        state = json.loads(body).get("state")
        if state != "stopped":
            failures.append(f"state before start: {state}")
        stamp.unlink(missing_ok=True)
        try:
            sent, arrived, status = first_byte(setup.ports.hestia, "/services/cold/health")
        except OSError as error:
            failures.append(f"request failed: {error}")
            status, sent, arrived = 0, 0.0, 0.0
        if status == 200:
            stamps = json.loads(stamp.read_text())
            own_i = direct_to_code + stamps["listening"] - stamps["began"]
            runs.append({
                "ttfb": arrived - sent,
                "own": own_i,
                "overhead": arrived - sent - own_i,
                "naive": arrived - sent - own,
                "to_code": stamps["began"] - sent,
                "code_to_listen": stamps["listening"] - stamps["began"],
                "after_listen": arrived - stamps["listening"],
            })
        else:
            failures.append(f"status {status}")
        code, body = http("POST", f"{hestia}/v1/services/cold/stop", timeout=30)
        if code != 200:
            failures.append(f"stop answered {code}: {body[:200]!r}")
        if stamp.exists():
            pid = json.loads(stamp.read_text())["pid"]
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        time.sleep(0.1)

    def ms(values: list[float], how: str) -> float | None:
        if not values:
            return None
        scaled = [v * 1000 for v in values]
        if how == "median":
            return statistics.median(scaled)
        return percentile(scaled, 95) if how == "p95" else max(scaled)

    column = {key: [r[key] for r in runs] for key in ("ttfb", "own", "overhead", "naive", "to_code",
                                                        "code_to_listen", "after_listen")}
    result: dict[str, Any] = {
        "starts": len(runs),
        "failures": failures,
        "baseline_runs": len(baseline),
        "direct_ready_ms": own * 1000,
        "direct_to_code_ms": direct_to_code * 1000,
        "direct_code_to_listen_ms": ms([b["code_to_listen"] for b in baseline], "median"),
        "direct_after_listen_ms": ms([b["after_listen"] for b in baseline], "median"),
        "ttfb_median_ms": ms(column["ttfb"], "median"),
        "own_median_ms": ms(column["own"], "median"),
        "overhead_median_ms": ms(column["overhead"], "median"),
        "overhead_p95_ms": ms(column["overhead"], "p95"),
        "overhead_max_ms": ms(column["overhead"], "max"),
        "naive_median_ms": ms(column["naive"], "median"),
        "to_code_median_ms": ms(column["to_code"], "median"),
        "code_to_listen_median_ms": ms(column["code_to_listen"], "median"),
        "after_listen_median_ms": ms(column["after_listen"], "median"),
        "after_listen_p95_ms": ms(column["after_listen"], "p95"),
    }
    print(f"  cold start: TTFB through Hestia median {fmt(result['ttfb_median_ms'], 1)} ms, backend's own "
          f"{fmt(result['own_median_ms'], 1)} ms; overhead median {fmt(result['overhead_median_ms'], 1)} ms, "
          f"p95 {fmt(result['overhead_p95_ms'], 1)} ms; listening->first byte median "
          f"{fmt(result['after_listen_median_ms'], 1)} ms ({len(runs)} starts"
          + (f", FAILURES {failures}" if failures else "") + ")", flush=True)
    return result


def bench_idle(setup: Setup, seconds: float) -> dict[str, Any]:
    pid = setup.hestia_idle.pid
    time.sleep(2.0)  # let start-up settle
    rss_before = proc_status(pid).get("VmRSS")
    began, cpu_began = time.monotonic(), cpu_seconds(pid)
    time.sleep(seconds)
    elapsed, used = time.monotonic() - began, cpu_seconds(pid) - cpu_began
    result = {"window_s": elapsed, "cpu_s": used, "cpu_per_min": used * 60 / elapsed,
              "services": 20, "rss_kb": rss_before, "clock_tick_s": 1 / os.sysconf("SC_CLK_TCK")}
    print(f"  idle: {used:.2f} CPU-s in {elapsed:.1f} s = {result['cpu_per_min']:.3f} CPU-s/min "
          f"(20 services, RSS {fmt((rss_before or 0) / 1024, 1)} MB)", flush=True)
    return result


async def _burst(port: int, path: str, count: int, pid: int, status_url: str) -> dict[str, Any]:
    request = get_request(port, path)
    gate = asyncio.Semaphore(256)
    connect_errors: Counter[str] = Counter()

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        async with gate:
            try:
                return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 60)
            except (OSError, TimeoutError) as error:
                connect_errors[f"{type(error).__name__}: {error}"[:120]] += 1
                return None

    errors: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    counters_before = tcp_counters()
    began = time.perf_counter()
    opened = [s for s in await asyncio.gather(*(connect() for _ in range(count))) if s is not None]
    connect_seconds = time.perf_counter() - began
    counters_after = tcp_counters()
    listen_counters = {k: counters_after[k] - counters_before.get(k, 0) for k in counters_after}
    other_bodies: Counter[str] = Counter()

    samples: dict[str, int] = {"rss_peak_kb": 0, "fds_peak": 0}
    timeline: list[dict[str, float]] = []  # every 0.25 s from sending: RSS, fds, CPU, answers so far
    done = asyncio.Event()
    sent_at = [0.0]

    async def monitor() -> None:
        tick = 0
        while not done.is_set():
            status = proc_status(pid)
            samples["rss_peak_kb"] = max(samples["rss_peak_kb"], status.get("VmRSS", 0))
            if tick % 5 == 0 and sent_at[0]:
                fds = await asyncio.to_thread(fd_count, pid)
                samples["fds_peak"] = max(samples["fds_peak"], fds)
                with contextlib.suppress(OSError):
                    timeline.append({"t": time.perf_counter() - sent_at[0], "rss_mb": status.get("VmRSS", 0) / 1024,
                                     "fds": fds, "cpu_s": cpu_seconds(pid), "answered": len(latencies),
                                     "failed": sum(errors.values())})
            tick += 1
            await asyncio.sleep(0.05)

    polls: list[dict[str, Any]] = []  # /v1 status every 0.5 s: how long the gateway took to answer

    async def poll_status() -> None:
        """Ask /v1 for the service's state every 0.5 s; a slow answer is a blocked reactor."""
        while not done.is_set():
            asked = time.perf_counter()
            try:
                _code, body = await asyncio.to_thread(http, "GET", status_url, 60.0)
                data = json.loads(body)
                point = {"t": asked - sent_at[0], "took": time.perf_counter() - asked, "state": data.get("state"),
                         "queued": data.get("queued"), "in_flight": data.get("in_flight")}
            except (OSError, ValueError) as error:
                point = {"t": asked - sent_at[0], "took": time.perf_counter() - asked, "error": str(error)[:100]}
            polls.append(point)
            await asyncio.sleep(max(0.0, 0.5 - (time.perf_counter() - asked)))

    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sent: float) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            body = await reader.readexactly(int(match.group(1))) if match else b""
            if status != 200:
                other_bodies[f"{status}: {body[:400].decode('utf-8', 'replace').strip()}"] += 1
            statuses[status] += 1
            latencies.append(time.perf_counter() - sent)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as error:
            errors[f"{type(error).__name__}: {error}"[:120]] += 1
        finally:
            writer.close()

    watcher = asyncio.create_task(monitor())
    counters_sent = tcp_counters()
    sent = sent_at[0] = time.perf_counter()
    for _, writer in opened:
        writer.write(request)
    send_seconds = time.perf_counter() - sent
    poller = asyncio.create_task(poll_status())
    gathered = asyncio.gather(*(exchange(r, w, sent) for r, w in opened))
    gathered.add_done_callback(lambda future: future.cancelled() or future.exception())  # quiet on Ctrl-C
    try:
        await asyncio.wait_for(gathered, 300)
    except TimeoutError:
        errors["no answer within 300 s"] += len(opened) - len(latencies) - sum(errors.values())
    total_seconds = time.perf_counter() - sent
    counters_end = tcp_counters()
    release_counters = {k: counters_end[k] - counters_sent.get(k, 0) for k in counters_end}
    done.set()
    await watcher
    await poller
    ready_at = next((p["t"] + p["took"] for p in polls if p.get("state") == "ready"), None)
    return {
        "requests": count,
        "connected": len(opened),
        "connect_seconds": connect_seconds,
        "connect_errors": dict(connect_errors),
        "listen_counters": listen_counters,
        "release_counters": release_counters,
        "other_bodies": other_bodies.most_common(3),
        "send_seconds": send_seconds,
        "statuses": dict(statuses),
        "errors": dict(errors),
        "ok": statuses.get(200, 0),
        "first_answer_s": min(latencies) if latencies else None,
        "median_answer_s": statistics.median(latencies) if latencies else None,
        "last_answer_s": max(latencies) if latencies else None,
        "total_s": total_seconds,
        "rss_peak_sampled_kb": samples["rss_peak_kb"],
        "fds_peak": samples["fds_peak"],
        "max_queued": max((p.get("queued") or 0 for p in polls), default=None),
        "polls": polls,
        "status_slowest_s": max((p["took"] for p in polls), default=None),
        "first_seen_ready_s": ready_at,
        "timeline": timeline,
    }


def bench_burst(sup: Supervisor, setup: Setup, count: int) -> dict[str, Any]:
    pid = setup.hestia_idle.pid
    hestia = f"http://127.0.0.1:{setup.ports.hestia_idle}"
    before = proc_status(pid)
    backlog = listen_backlog(setup.ports.hestia_idle)
    log_lines_before = len((sup.logs / "hestia-idle.log").read_text(errors="replace").splitlines())
    result = asyncio.run(_burst(setup.ports.hestia_idle, "/services/burst/small", count, pid,
                                f"{hestia}/v1/services/burst/status"))
    after = proc_status(pid)
    result["listen_backlog"] = backlog
    result["rss_before_kb"] = before.get("VmRSS")
    result["rss_after_kb"] = after.get("VmRSS")
    result["hwm_kb"] = after.get("VmHWM")
    _, body = http("GET", f"{hestia}/v1/services/burst/status")
    status = json.loads(body)
    result["start_duration_s"] = status.get("last_start_duration")
    result["state_after"] = status.get("state")
    # What the gateway logged about it: errors are evidence.
    lines = (sup.logs / "hestia-idle.log").read_text(errors="replace").splitlines()[log_lines_before:]
    # Error-level lines, tracebacks and EMFILE in the gateway's log are evidence.
    patterns = {"error/critical log lines": re.compile(r"#(error|critical)\]"), "warnings": re.compile(r"#warn\]"),
                "Traceback": re.compile(r"Traceback"), "Too many open files": re.compile(r"Too many open files|EMFILE")}
    interesting: Counter[str] = Counter()
    samples: list[str] = []
    for line in lines:
        hits = [name for name, pattern in patterns.items() if pattern.search(line)]
        interesting.update(hits)
        if hits and len(samples) < 8:
            samples.append(line[:300])
    result["log_lines"] = len(lines)
    result["log_counts"] = dict(interesting)
    result["log_samples"] = samples
    ok = result["ok"]
    print(f"  burst: {ok}/{count} answered 200, statuses {result['statuses']}, errors {result['errors']}, "
          f"connect errors {result['connect_errors']}; answers {fmt(result['first_answer_s'], 2)}.."
          f"{fmt(result['last_answer_s'], 2)} s after sending; peak RSS (VmHWM) "
          f"{fmt((result['hwm_kb'] or 0) / 1024, 1)} MB; peak fds {result['fds_peak']}; "
          f"most queued {result['max_queued']}; slowest /v1 answer {fmt(result['status_slowest_s'], 2)} s",
          flush=True)
    return result


# -- the report ----------------------------------------------------------------------------------


def command_output(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=20, check=False)
    except OSError as error:
        return f"unavailable ({error})"
    return (out.stdout + out.stderr).strip()


def machine_and_versions() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    py = command_output([PYTHON, "-c", "import sys, twisted; print(sys.version.split()[0], twisted.__version__)"])
    py_version, _, twisted_version = py.partition(" ")
    commit = command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = command_output(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"])
    digest = hashlib.sha256()
    for path in sorted((REPO / "src").rglob("*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "kernel": f"{platform.system()} {platform.release()}",
        "memory": memory,
        "python": py_version,
        "twisted": twisted_version,
        "nginx": command_output([NGINX, "-v"]).removeprefix("nginx version: "),
        "caddy": command_output([CADDY, "version"]).split()[0] if Path(CADDY).exists() else "missing",
        "wrk": command_output([WRK, "-v"]).splitlines()[0].split(" Copyright")[0],
        "curl": command_output([CURL, "--version"]).splitlines()[0].split(" (")[0],
        "hestia": commit + (f" + uncommitted changes in src/ (sha256 of src/**/*.py: {digest.hexdigest()[:12]})"
                            if dirty else ""),
    }


def report(args: argparse.Namespace, info: dict[str, str], setup: Setup, results: dict[str, Any]) -> str:
    small, download, sse = results["small"], results["download"], results["sse"]
    cold, burst, idle = results["cold"], results["burst"], results["idle"]
    out: list[str] = []
    w = out.append
    mode = "quick" if args.quick else "full"
    w("# Hestia benchmark results\n")
    w(f"Generated by `python bench/run.py{' --quick' if args.quick else ''}` ({mode} run) on {info['date']}. "
      "Everything on loopback; all proxies run at once, each measured alone. See `bench/README.md`.\n")
    w("## Machine and versions\n")
    w("| | |\n|---|---|")
    for key, label in (("nproc", "CPUs (nproc)"), ("cpu", "CPU model"), ("kernel", "kernel"), ("memory", "memory"),
                       ("python", "Python"), ("twisted", "Twisted"), ("nginx", "nginx"), ("caddy", "Caddy"),
                       ("wrk", "wrk"), ("curl", "curl"), ("hestia", "Hestia commit")):
        w(f"| {label} | {info[key]} |")
    w(f"| open-file limit (soft) | {setup.nofile} |")
    w(f"| load average (1 min) at start / end | {results['load_start']:.2f} / {os.getloadavg()[0]:.2f} |")
    w("")
    w(f"Settings: wrk {results['small_duration']:g} s per point (2 threads at most; 1 at c=1), "
      f"50 MB download x{results['download_runs']} (median), {results['sse_events']} SSE events at 20 ms, "
      f"{cold['starts']} cold starts, burst of {burst['requests']:,}, idle window {idle['window_s']:.0f} s.\n")

    w("## Small responses (100 bytes)\n")
    w("| target | conns | req/s | p50 ms | p99 ms | errors |")
    w("|---|---:|---:|---:|---:|---:|")
    for connections in CONNECTIONS:
        for name in TARGETS:
            r = small[name][connections]
            w(f"| {LABELS[name]} | {connections} | {r['rps']:,.0f} | {r['p50'] / 1000:.3f} | {r['p99'] / 1000:.3f} "
              f"| {r['errors'] or ''} |")
    w("")
    w("Hestia / other, requests per second (higher is better) and p50 latency (lower is better):\n")
    w("| conns | req/s vs direct | vs nginx | vs Caddy | vs stock | p50 vs direct | vs nginx | vs Caddy | vs stock |")
    w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for connections in CONNECTIONS:
        h = small["hestia"][connections]
        rps = [fmt_ratio(ratio(h["rps"], small[n][connections]["rps"])) for n in TARGETS[:4]]
        p50 = [fmt_ratio(ratio(h["p50"], small[n][connections]["p50"])) for n in TARGETS[:4]]
        w(f"| {connections} | " + " | ".join(rps + p50) + " |")
    added = (small["hestia"][1]["p50"] - small["direct"][1]["p50"]) / 1000
    w(f"\nAdded p50 latency at 1 connection (Hestia minus direct): **{added:.3f} ms** "
      f"(nginx {(small['nginx'][1]['p50'] - small['direct'][1]['p50']) / 1000:.3f}, "
      f"Caddy {(small['caddy'][1]['p50'] - small['direct'][1]['p50']) / 1000:.3f}, "
      f"stock {(small['stock'][1]['p50'] - small['direct'][1]['p50']) / 1000:.3f} ms).\n")

    w("## 50 MB download\n")
    w("| target | MB/s (median) | runs | Hestia / this |")
    w("|---|---:|---|---:|")
    for name in TARGETS:
        d = download[name]
        runs = ", ".join(f"{v:.0f}" for v in d["runs"]) + (f"; failures: {d['failures']}" if d["failures"] else "")
        w(f"| {LABELS[name]} | {fmt(d['mbps'], 0)} | {runs} | {fmt_ratio(ratio(download['hestia']['mbps'], d['mbps']))} |")
    w("")

    w("## Server-Sent Events: latency per event (send stamp to receipt)\n")
    w("| target | p50 ms | p99 ms | max ms | events > 5 ms | added p50 ms | added p99 ms |")
    w("|---|---:|---:|---:|---:|---:|---:|")
    sse_labels = dict(LABELS, direct="backend direct (tests/support/backend.py)")
    for name in TARGETS:
        s = sse[name]
        if s["error"]:
            w(f"| {sse_labels[name]} | error: {s['error']} | | | | | |")
            continue
        w(f"| {sse_labels[name]} | {fmt(s['p50'], 3)} | {fmt(s['p99'], 3)} | {fmt(s['max'], 1)} | {s['over_5ms']} | "
          f"{fmt(ratio_diff(s['p50'], sse['direct']['p50']), 3)} | {fmt(ratio_diff(s['p99'], sse['direct']['p99']), 3)} |")
    w("")

    w(f"## Cold start ({cold['starts']} starts of tests/support/backend.py --start-delay {COLD_START_DELAY:g})\n")
    w("Per start: *own* = the backend's interpreter start-up (spawn -> its first line of Python, median of "
      f"{cold['baseline_runs']} direct spawns) + its own first line -> listening (stamped in that start); "
      "*overhead* = time to first byte through Hestia - own.\n")
    w("| figure | ms |\n|---|---:|")
    w(f"| time to first byte through Hestia (request sent to a stopped service), median "
      f"| {fmt(cold['ttfb_median_ms'], 1)} |")
    w(f"| backend's own time to ready, median | {fmt(cold['own_median_ms'], 1)} |")
    w(f"| **overhead, median** | **{fmt(cold['overhead_median_ms'], 1)}** |")
    w(f"| **overhead, p95** | **{fmt(cold['overhead_p95_ms'], 1)}** |")
    w(f"| overhead, max | {fmt(cold['overhead_max_ms'], 1)} |")
    w(f"| part of it: request sent -> backend's first line (Hestia spawning it), median "
      f"| {fmt(cold['to_code_median_ms'], 1)} (direct spawn: {fmt(cold['direct_to_code_ms'], 1)}) |")
    w(f"| part of it: backend listening -> first byte at the client (readiness probe + forwarding), median "
      f"| {fmt(cold['after_listen_median_ms'], 1)} (p95 {fmt(cold['after_listen_p95_ms'], 1)}; direct, "
      f"polling every 1 ms: {fmt(cold['direct_after_listen_ms'], 1)}) |")
    w(f"| backend's first line -> listening (imports, the 0.5 s delay, bind), median "
      f"| {fmt(cold['code_to_listen_median_ms'], 1)} (direct spawns: {fmt(cold['direct_code_to_listen_ms'], 1)}) |")
    w(f"| for reference: TTFB - median time to ready of the direct spawns (spawn -> first 200 when polled "
      f"every 1 ms: {fmt(cold['direct_ready_ms'], 1)}), median | {fmt(cold['naive_median_ms'], 1)} |")
    if cold["failures"]:
        w(f"| failures | {cold['failures']} |")
    w("")

    w(f"## Burst: {burst['requests']:,} concurrent requests held during a {BURST_START_DELAY:g} s cold start\n")
    w("| figure | value |\n|---|---|")
    w(f"| connections opened (before sending) | {burst['connected']:,} in {burst['connect_seconds']:.2f} s"
      + (f"; connect errors {burst['connect_errors']}" if burst["connect_errors"] else "") + " |")
    w(f"| Hestia's listen backlog (ss Send-Q) | {burst['listen_backlog']} |")
    w(f"| TCP listen-queue counters during the connect phase (system-wide) | {burst['listen_counters']} |")
    w(f"| TCP listen-queue counters from sending to the last answer (system-wide: Hestia's connects to the "
      f"backend, listen backlog 4096) | {burst['release_counters']} |")
    w(f"| all requests written in | {burst['send_seconds'] * 1000:.0f} ms |")
    starting = [p for p in burst["polls"] if p.get("state") == "starting"]
    held = (f"{burst['max_queued']:,}" if starting else
            "not seen: no /v1 answer came while the service was starting (the gateway was busy)")
    w(f"| most requests seen held (`queued` in a /v1 status answer) | {held} |")
    slow = burst["status_slowest_s"]
    w(f"| /v1 status polled every 0.5 s during the burst: slowest answer | {fmt(slow, 2)} s "
      f"(a long wait means the gateway's event loop was blocked) |")
    w(f"| /v1 status first said `ready` (answer time after sending) | {fmt(burst['first_seen_ready_s'], 2)} s |")
    w(f"| **answered 200** | **{burst['ok']:,} / {burst['requests']:,}** |")
    w(f"| other statuses | {({k: v for k, v in burst['statuses'].items() if k != 200}) or 'none'} |")
    w(f"| client-side errors | {burst['errors'] or 'none'} |")
    for body, times in burst["other_bodies"]:
        w(f"| non-200 answer (x{times:,}) | `{body.replace('|', '/')}` |")
    w(f"| answers arrived (after sending) | first {fmt(burst['first_answer_s'], 2)} s, median "
      f"{fmt(burst['median_answer_s'], 2)} s, last {fmt(burst['last_answer_s'], 2)} s |")
    w(f"| service start duration (/v1 last_start_duration) | {fmt(burst['start_duration_s'], 2)} s |")
    w(f"| Hestia RSS before / after | {fmt((burst['rss_before_kb'] or 0) / 1024, 1)} MB / "
      f"{fmt((burst['rss_after_kb'] or 0) / 1024, 1)} MB |")
    w(f"| **Hestia peak RSS (VmHWM)** | **{fmt((burst['hwm_kb'] or 0) / 1024, 1)} MB** |")
    w(f"| Hestia peak open fds (sampled) | {burst['fds_peak']:,} (limit {setup.nofile:,}) |")
    w(f"| Hestia log during the burst | {burst['log_lines']} lines; {burst['log_counts'] or 'no error lines'} |")
    w("")
    if burst["timeline"]:
        w("Timeline of the burst (seconds after the requests were written; Hestia's RSS, open fds, "
          "CPU seconds used since sending; answers received so far):\n")
        w("| t s | RSS MB | fds | CPU s | answered | failed |\n|---:|---:|---:|---:|---:|---:|")
        cpu0 = burst["timeline"][0]["cpu_s"]
        next_t = 0.0
        for point in burst["timeline"]:
            if point["t"] + 1e-9 >= next_t:
                w(f"| {point['t']:.1f} | {point['rss_mb']:.0f} | {point['fds']:,} | {point['cpu_s'] - cpu0:.2f} | "
                  f"{point['answered']:,} | {point['failed']:,} |")
                next_t = point["t"] + 1.0
        w("")
    if burst["polls"]:
        w("/v1 status polls during the burst (asked at t seconds after sending; took = answer time):\n")
        w("| asked at t s | took s | state | queued | in flight |\n|---:|---:|---|---:|---:|")
        previous: tuple[Any, ...] = ()
        for poll in burst["polls"]:
            seen = (poll.get("state"), poll.get("error"))
            if seen != previous or poll["took"] > 0.25:
                w(f"| {poll['t']:.1f} | {poll['took']:.2f} | {poll.get('state') or poll.get('error')} | "
                  f"{poll.get('queued', '')} | {poll.get('in_flight', '')} |")
            previous = seen
        w("")
    if burst["log_samples"]:
        w("Gateway log lines matching errors or warnings (first few):\n")
        w("```")
        out.extend(burst["log_samples"])
        w("```\n")

    w("## Idle cost\n")
    w(f"Hestia with 20 configured services (1 burst + 9 process + 10 static), none started, nothing happening: "
      f"**{idle['cpu_s']:.2f} CPU-s in {idle['window_s']:.0f} s = {idle['cpu_per_min']:.3f} CPU-s per minute** "
      f"(resolution {idle['clock_tick_s']:.2f} s; RSS {fmt((idle['rss_kb'] or 0) / 1024, 1)} MB).\n")

    w("## Issue 9 targets\n")
    w("| target | figure | met? |\n|---|---|---|")
    for target, figure, met in targets(results):
        w(f"| {target} | {figure} | {'met' if met else '**not met**'} |")
    w("")
    other = results.get("hestia_hwm_kb")
    if other:
        w(f"Main Hestia instance (small responses, downloads, SSE, cold starts): peak RSS {other / 1024:.1f} MB.\n")
    return "\n".join(out)


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    small, download, cold, burst, idle = (results[k] for k in ("small", "download", "cold", "burst", "idle"))
    rows = []
    caddy = [ratio(small["hestia"][c]["rps"], small["caddy"][c]["rps"]) or 0 for c in CONNECTIONS]
    rows.append(("Warm small responses: >= 0.3x Caddy's req/s",
                 ", ".join(f"c={c}: {r:.2f}x" for c, r in zip(CONNECTIONS, caddy, strict=True)),
                 all(r >= 0.3 for r in caddy)))
    stock = [ratio(small["hestia"][c]["rps"], small["stock"][c]["rps"]) or 0 for c in CONNECTIONS]
    rows.append(("Warm small responses: >= 1.5x stock ReverseProxyResource's req/s",
                 ", ".join(f"c={c}: {r:.2f}x" for c, r in zip(CONNECTIONS, stock, strict=True)),
                 all(r >= 1.5 for r in stock)))
    added = (small["hestia"][1]["p50"] - small["direct"][1]["p50"]) / 1000
    rows.append(("Added p50 latency at 1 connection < 0.5 ms", f"{added:.3f} ms", added < 0.5))
    dl = ratio(download["hestia"]["mbps"], download["caddy"]["mbps"])
    rows.append(("50 MB download >= 0.5x Caddy's MB/s",
                 f"{fmt(download['hestia']['mbps'], 0)} vs {fmt(download['caddy']['mbps'], 0)} MB/s = {fmt_ratio(dl)}",
                 dl is not None and dl >= 0.5))
    overhead = cold["overhead_median_ms"]
    rows.append(("Cold-start overhead median < 50 ms",
                 f"median {fmt(overhead, 1)} ms, p95 {fmt(cold['overhead_p95_ms'], 1)} ms",
                 overhead is not None and overhead < 50 and not cold["failures"]))
    errors = burst["requests"] - burst["ok"]
    rows.append((f"{burst['requests']:,} held requests: zero errors", f"{burst['ok']:,} x 200, {errors:,} not 200",
                 errors == 0))
    hwm = (burst["hwm_kb"] or 0) / 1024
    rows.append((f"{burst['requests']:,} held requests: peak RSS < 300 MB", f"{hwm:.1f} MB", 0 < hwm < 300))
    rows.append(("Idle: < 0.1 CPU-second per minute (20 services)", f"{idle['cpu_per_min']:.3f} CPU-s/min",
                 idle["cpu_per_min"] < 0.1))
    return rows


# -- main --------------------------------------------------------------------------------------------


def check_tools() -> None:
    missing = [tool for tool in (NGINX, CADDY, WRK, CURL, TWISTD) if not Path(tool).exists()]
    if missing:
        sys.exit(f"missing: {', '.join(missing)} (apt-get install -y nginx caddy wrk curl; "
                 f"and ./scripts/dev.sh for the virtualenv)")


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """
    SIGINT, SIGTERM and SIGHUP end the run through every finally.  SIGINT is
    set explicitly because a shell starts background jobs with it ignored.
    """

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark Hestia against nginx, Caddy and ReverseProxyResource.")
    parser.add_argument("--quick", action="store_true", help="2 s per wrk point, 10 s idle window, fewer repeats")
    parser.add_argument("--out", default=str(BENCH / "results.md"), help="where to write the Markdown results")
    parser.add_argument("--burst", type=int, default=10_000, help="concurrent requests in the burst (10000)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    args = parser.parse_args(argv)
    check_tools()

    quick = args.quick
    small_duration = 2.0 if quick else 5.0
    warmup = 1.0  # wrk takes whole seconds
    download_runs = 2 if quick else 5
    sse_events = 50 if quick else 200
    cold_starts, baseline_runs = (8, 3) if quick else (20, 7)
    idle_seconds = 10.0 if quick else 60.0

    nofile = raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="hestia-bench-"))
    sup = Supervisor(tmp)
    atexit.register(sup.close)
    began = time.monotonic()
    try:
        with signals_raise():
            print(f"Hestia benchmark ({'quick' if quick else 'full'}); temporary directory {tmp}", flush=True)
            info = machine_and_versions()
            load_start = os.getloadavg()[0]
            setup = start_all(sup, tmp, nofile)
            lua = tmp / "percentiles.lua"
            lua.write_text(WRK_LUA)
            results: dict[str, Any] = {"small_duration": small_duration, "download_runs": download_runs,
                                       "sse_events": sse_events, "load_start": load_start}
            print("Small responses (wrk):", flush=True)
            results["small"] = bench_small(setup, small_duration, warmup, lua)
            print("Downloads (curl):", flush=True)
            results["download"] = bench_download(setup, download_runs)
            print("Server-Sent Events:", flush=True)
            results["sse"] = bench_sse(setup, sse_events)
            print("Cold starts:", flush=True)
            results["cold"] = bench_cold(sup, setup, cold_starts, baseline_runs)
            results["hestia_hwm_kb"] = proc_status(setup.hestia.pid).get("VmHWM")
            print(f"Idle ({idle_seconds:g} s):", flush=True)
            results["idle"] = bench_idle(setup, idle_seconds)
            print(f"Burst ({args.burst:,} requests):", flush=True)
            results["burst"] = bench_burst(sup, setup, args.burst)
            text = report(args, info, setup, results)
            text += f"\nTotal run time: {time.monotonic() - began:.0f} s.\n"
            Path(args.out).write_text(text)
            print("\n" + text)
            print(f"Written to {args.out}")
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        sup.close()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
