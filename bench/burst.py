"""
Issue 13's benchmark: a crowd held through a cold start, against the same crowd sent directly.

For each backend -- (a) a listen-backlog-5 Python C{ThreadingHTTPServer}
(C{tests/support/backlog_backend.py}, what C{python3 -m http.server} is) and (b) nginx
-- and each N in C{--sizes} (50, 200, 1000, 10000):

  - B{through Hestia}: the service is stopped; N clients connect to Hestia and
    send a GET at once; Hestia starts the backend (which listens after
    C{START_DELAY}) and releases the crowd to it;
  - B{direct}: the backend is started alone; the moment it listens the same N
    clients connect to it directly.

Printed for each: answered (200) / errors, and p50/p99/max of the time from
the moment the backend listened to each answer's last byte, and Hestia's
ratio to direct.  The backend's listening moment is exact: the Python backend
stamps it (C{--stamp}); for nginx it is its pid file's modification time
(nginx writes it after it has opened its listening sockets).

C{--readiness K} also measures K single requests held through a cold start:
listening -> answered, the delay issue 13 asks to bring under 20 ms.

Everything runs in one process tree (L{run.Supervisor}); the machine may be
shared, so figures are noisy: compare within one run.  Standard library only::

    .venv/bin/python bench/burst.py [--sizes 50,200,1000,10000] [--readiness 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # bench/run.py: its process supervision and nginx configuration

BACKLOG_BACKEND = run.REPO / "tests" / "support" / "backlog_backend.py"
START_DELAY = 1.0
CLIENT_TIMEOUT = 60.0


@dataclass
class Kind:
    """One backend kind: how to start it, and how to tell when it listened."""

    name: str
    label: str
    argv: list[str]
    path: str  # what the crowd asks for
    listened: Callable[[], float | None]  # wall-clock seconds, None until it listens
    reset: Callable[[], None]  # forget the last listening moment


def python_kind(tmp: Path, port: int) -> Kind:
    stamp = tmp / "py.stamp"

    def listened() -> float | None:
        try:
            return float(json.loads(stamp.read_text())["listening"])
        except (OSError, ValueError, KeyError):
            return None

    argv = [run.PYTHON, str(BACKLOG_BACKEND), "--port", str(port), "--start-delay", str(START_DELAY),
            "--stamp", str(stamp)]
    return Kind("python", "Python ThreadingHTTPServer, backlog 5", argv, "/small", listened,
                lambda: stamp.unlink(missing_ok=True))


def keepalive_kind(tmp: Path, port: int) -> Kind:
    """C{tests/support/backend.py} (HTTP/1.1 keep-alive) as bench/run.py's cold start runs it."""
    stamp = tmp / "ka.stamp"

    def listened() -> float | None:
        try:
            return float(json.loads(stamp.read_text())["listening"])
        except (OSError, ValueError, KeyError):
            return None

    argv = [run.PYTHON, str(run.STAMPED_BACKEND), "--stamp", str(stamp), "--port", str(port),
            "--start-delay", str(START_DELAY)]
    return Kind("keepalive", "tests/support/backend.py (HTTP/1.1)", argv, "/health", listened,
                lambda: stamp.unlink(missing_ok=True))


def nginx_kind(tmp: Path, port: int) -> Kind:
    prefix = tmp / "nginx-backend"
    www = tmp / "www"
    www.mkdir(exist_ok=True)
    (www / "small").write_bytes(b"x" * 99 + b"\n")
    run.write_static_nginx(prefix, port, www)
    pid = prefix / "nginx.pid"

    def listened() -> float | None:
        try:
            return pid.stat().st_mtime_ns / 1e9
        except OSError:
            return None

    argv = ["/bin/sh", "-c", f"sleep {START_DELAY:g}; exec " + shlex.join(run.nginx_argv(prefix))]
    return Kind("nginx", "nginx (1 worker, backlog 4096)", argv, "/small", listened,
                lambda: pid.unlink(missing_ok=True))


# -- the crowd ------------------------------------------------------------------------


async def _one(port: int, path: str) -> tuple[int, float]:
    """One GET on a new connection: (status or 0, wall-clock time of its last byte)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), CLIENT_TIMEOUT)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), CLIENT_TIMEOUT)
        writer.close()
    except (OSError, TimeoutError):
        return 0, time.time()
    status = int(data[9:12]) if data[:5] == b"HTTP/" and len(data) >= 12 else 0
    return status, time.time()


async def _crowd(port: int, paths: list[str], before: Callable[[], Any] | None = None) -> list[tuple[int, float]]:
    tasks = [asyncio.ensure_future(_one(port, path)) for path in paths]
    if before is not None:
        await asyncio.get_running_loop().run_in_executor(None, before)
    return list(await asyncio.gather(*tasks))


def wait_listening(kind: Kind, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (at := kind.listened()) is not None:
            return at
        time.sleep(0.0005)
    raise RuntimeError(f"{kind.name} did not listen within {timeout:g}s")


def summarise(answers: list[tuple[int, float]], listened: float) -> dict[str, Any]:
    ok = sorted((done - listened) * 1000 for status, done in answers if status == 200)
    return {
        "answered": len(ok),
        "errors": len(answers) - len(ok),
        "p50": run.percentile(ok, 50) if ok else None,
        "p99": run.percentile(ok, 99) if ok else None,
        "max": ok[-1] if ok else None,
    }


def http(method: str, url: str, timeout: float = 30.0) -> dict[str, Any]:
    _, body = run.http(method, url, timeout)
    return json.loads(body)  # type: ignore[no-any-return]


def stop_service(hestia: str, name: str) -> None:
    http("POST", f"{hestia}/v1/services/{name}/stop")
    deadline = time.monotonic() + 30
    while http("GET", f"{hestia}/v1/services/{name}/status")["state"] != "stopped":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not stop")
        time.sleep(0.05)


def connect_retries(hestia: str, name: str) -> float:
    _, body = run.http("GET", f"{hestia}/v1/metrics")
    for line in body.decode().splitlines():
        if line.startswith(f'hestia_connect_retries_total{{service="{name}"}}'):
            return float(line.split()[-1])
    return 0.0


def through_hestia(hestia_port: int, kind: Kind, count: int) -> dict[str, Any]:
    hestia = f"http://127.0.0.1:{hestia_port}"
    stop_service(hestia, kind.name)
    retries_before = connect_retries(hestia, kind.name)
    kind.reset()
    paths = [f"/services/{kind.name}{kind.path}?{i}" for i in range(count)]
    answers = asyncio.run(_crowd(hestia_port, paths))
    listened = kind.listened()
    if listened is None:
        raise RuntimeError(f"{kind.name}: no listening stamp")
    status = http("GET", f"{hestia}/v1/services/{kind.name}/status")
    result = summarise(answers, listened)
    result["window"] = (status.get("concurrency") or {}).get("window")
    result["retries"] = connect_retries(hestia, kind.name) - retries_before
    return result


def direct(sup: run.Supervisor, kind: Kind, port: int, count: int) -> dict[str, Any]:
    kind.reset()
    proc = sup.spawn(f"direct-{kind.name}", kind.argv)
    try:
        paths = [f"{kind.path}?{i}" for i in range(count)]
        listened = wait_listening(kind)
        answers = asyncio.run(_crowd(port, paths))
        return summarise(answers, listened)
    finally:
        sup.end(proc, 5)


def readiness(hestia_port: int, kind: Kind, starts: int) -> list[tuple[float, float]]:
    """
    Per cold start of a single held request, in ms: (listening -> answered,
    listening -> Hestia saw it ready, from the status's C{state_since}).
    """
    hestia = f"http://127.0.0.1:{hestia_port}"
    delays = []
    for _ in range(starts):
        stop_service(hestia, kind.name)
        kind.reset()
        [(status, done)] = asyncio.run(_crowd(hestia_port, [f"/services/{kind.name}{kind.path}"]))
        listened = kind.listened()
        since = http("GET", f"{hestia}/v1/services/{kind.name}/status")["state_since"]
        ready = datetime.fromisoformat(since.replace("Z", "+00:00")).timestamp()
        if status == 200 and listened is not None:
            delays.append(((done - listened) * 1000, (ready - listened) * 1000))
    return delays


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", default="50,200,1000,10000")
    parser.add_argument("--kinds", default="python,nginx")
    parser.add_argument("--readiness", type=int, default=10, help="single-request cold starts to time (0: none)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="override the default, to compare")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    nofile = run.raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="hestia-burst-"))
    sup = run.Supervisor(tmp)
    try:
        ports = run.free_ports(4)
        kinds = {kind.name: kind for kind in (python_kind(tmp, ports[0]), nginx_kind(tmp, ports[1]),
                                              keepalive_kind(tmp, ports[3]))}
        chosen = [kinds[name] for name in args.kinds.split(",")]
        hestia_port = ports[2]
        tunables: dict[str, Any] = {"queue_limit": 20000, "queue_timeout": 120, "start_timeout": 60,
                                    "idle_timeout": 0, "stop_timeout": 3}
        if args.max_concurrency:
            tunables["max_concurrency"] = args.max_concurrency
        config = {
            "server": {"listen": f"tcp:{hestia_port}:interface=127.0.0.1", "state_path": str(tmp / "h.db"),
                       "shutdown_timeout": 3},
            "defaults": tunables,
            "services": {
                kind.name: {"url": f"http://127.0.0.1:{port}", "command": kind.argv, "health": {"path": kind.path}}
                for kind, port in zip(kinds.values(), [ports[0], ports[1], ports[3]], strict=True)
            },
        }
        (tmp / "hestia.yml").write_text(json.dumps(config))
        hestia = sup.spawn("hestia", [run.TWISTD, "-n", "--pidfile=", "hestia", "--config", str(tmp / "hestia.yml")],
                           run.clean_env(tmp))
        run.wait_http(f"http://127.0.0.1:{hestia_port}/v1/health", sup, "hestia", hestia)
        print(f"burst benchmark: open-file limit {nofile}, start delay {START_DELAY:g}s, "
              f"max_concurrency {args.max_concurrency or 'default'}", flush=True)
        if args.readiness:
            for kind in [*chosen, kinds["keepalive"]]:
                timings = readiness(hestia_port, kind, args.readiness)
                delays = [answered for answered, _ in timings]
                seen = [ready for _, ready in timings]
                print(f"readiness {kind.name}: listening -> answered, median {fmt(statistics.median(delays), 1)} ms "
                      f"(min {fmt(min(delays), 1)}, max {fmt(max(delays), 1)}; {len(delays)} starts); "
                      f"listening -> seen ready median {fmt(statistics.median(seen), 1)} ms", flush=True)
        header = (f"| {'backend':<7} | {'N':>6} | {'path':<7} | {'200':>6} | {'errors':>6} | {'p50 ms':>8} "
                  f"| {'p99 ms':>8} | {'max ms':>8} | p99 ratio |")
        print(header)
        print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|", flush=True)
        for kind in chosen:
            port = {"python": ports[0], "nginx": ports[1], "keepalive": ports[3]}[kind.name]
            for count in sizes:
                via = through_hestia(hestia_port, kind, count)
                stop_service(f"http://127.0.0.1:{hestia_port}", kind.name)
                alone = direct(sup, kind, port, count)
                ratio = via["p99"] / alone["p99"] if via["p99"] and alone["p99"] else None
                for name, r in (("hestia", via), ("direct", alone)):
                    print(f"| {kind.name:<7} | {count:>6} | {name:<7} | {r['answered']:>6} | {r['errors']:>6} "
                          f"| {fmt(r['p50']):>8} | {fmt(r['p99']):>8} | {fmt(r['max']):>8} "
                          f"| {fmt(ratio, 2) if name == 'hestia' else '':>9} |"
                          + (f" connect retries {r['retries']:.0f}, window {r['window']}" if name == "hestia" else ""),
                          flush=True)
    finally:
        sup.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
