"""
What Hestia adds to a container's cold start (run on demand, not in the test suite).

For one busybox httpd container on the real engine (``scripts/podman-engine.sh
start``), ``--runs`` times each (default 10):

  - direct: ``POST /containers/<id>/start``, then ``GET /`` on its published
    port every 5 ms (fresh connections, overlapping) until it answers 200:
    what a perfect gateway could do;
  - through Hestia: with the container stopped (``POST /v1/services/web/stop``),
    time one ``GET /services/web/`` to its full response, while watching the
    container's port the same way: Hestia's answer minus the container's own
    first answer, in the same start, is what Hestia adds.

It prints the median and min/max of each.  The engine's own start time varies
a lot between runs (Podman: 150-600 ms here), so the paired figure is the one
to read; the difference of medians is printed too.  Usage::

    .venv/bin/python bench/container_cold_start.py [--runs 10] [--sock /run/hestia-podman/podman.sock]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import treq
import yaml
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool

from hestia.backends.docker.engine import DockerEngine, NoSuchContainer

IMAGE = "localhost/hestia-busybox:latest"
TWISTD = str(Path(sys.executable).parent / "twistd")
HOST_CONFIG: dict[str, Any] = {
    "Init": True,
    "Ulimits": [{"Name": "nofile", "Soft": 1024, "Hard": 1024}, {"Name": "nproc", "Soft": 1024, "Hard": 1024}],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def sleep(reactor: Any, seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def get_ok(agent: Agent, url: str) -> bool:
    try:
        response = await treq.get(url, agent=agent, timeout=2)
        await treq.content(response)
    except Exception:
        return False
    return bool(response.code == 200)


async def wait_ok(reactor: Any, agent: Agent, url: str, interval: float, timeout: float = 30.0) -> float:
    """
    When C{url} first answered 200: a new attempt every C{interval}, without
    waiting for the previous one (a connection to a port whose container is
    still coming up can hang rather than be refused, and must not hide the
    moment it answers).
    """
    deadline = time.monotonic() + timeout
    answered: list[float] = []

    async def attempt() -> None:
        if await get_ok(agent, url):
            answered.append(time.monotonic())

    while not answered:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout}s")
        Deferred.fromCoroutine(attempt())
        await sleep(reactor, interval)
    return min(answered)


async def through_hestia(agent: Agent, url: str) -> tuple[int, bytes, float]:
    """One request through Hestia: its status, body, and when it was complete."""
    response = await treq.get(url, agent=agent, timeout=60)
    body = await treq.content(response)
    return response.code, body, time.monotonic()


def summary(label: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"{label:<16} median {statistics.median(ms):7.1f} ms   min {min(ms):7.1f}   max {max(ms):7.1f}   (n={len(ms)})"


async def main(reactor: Any, runs: int, sock: str) -> None:
    engine = DockerEngine(f"unix://{sock}", reactor=reactor)
    fresh = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    name = f"hestia-test-bench-{uuid.uuid4().hex[:8]}"
    port = free_port()
    await engine.create(name, {
        "Image": IMAGE,
        "Cmd": ["httpd", "-f", "-p", "8080", "-h", "/www"],
        "ExposedPorts": {"8080/tcp": {}},
        "HostConfig": {**HOST_CONFIG, "PortBindings": {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}},
    })
    workdir = Path(tempfile.mkdtemp(prefix="hestia-bench-"))
    hestia: subprocess.Popen[bytes] | None = None
    try:
        direct: list[float] = []
        for _ in range(runs):
            began = time.monotonic()
            await engine.start(name)
            direct.append(await wait_ok(reactor, fresh, f"http://127.0.0.1:{port}/", 0.005) - began)
            await engine.stop(name, timeout=5)

        # What Hestia asks the engine before its POST start (inspect, subscribe
        # to the container's events): the container starts that much later,
        # which the paired figure below does not see.
        before_start: list[float] = []
        for _ in range(runs):
            began = time.monotonic()
            await engine.inspect(name)
            stream = await engine.events({"type": ["container"], "container": [name]}, lambda event: None)
            before_start.append(time.monotonic() - began)
            await stream.stop()

        gw_port = free_port()
        config = {
            "server": {"listen": f"tcp:{gw_port}:interface=127.0.0.1", "state_path": str(workdir / "h.db")},
            "services": {"web": {
                "url": f"http://127.0.0.1:{port}", "health": {"path": "/"}, "idle_timeout": 0,
                "docker": {"container": name, "host": f"unix://{sock}", "adopt": False},
            }},
        }
        (workdir / "hestia.yml").write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("HESTIA_")}
        with open(workdir / "hestia.log", "wb") as out:
            hestia = subprocess.Popen([TWISTD, "-n", "--pidfile=", "hestia", "--config", str(workdir / "hestia.yml")],
                                      stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)
        gateway = f"http://127.0.0.1:{gw_port}"
        await wait_ok(reactor, fresh, f"{gateway}/v1/health", 0.05)
        through: list[float] = []
        paired: list[float] = []
        for _ in range(runs):
            response = await treq.post(f"{gateway}/v1/services/web/stop", agent=fresh)
            await treq.content(response)
            began = time.monotonic()
            held = Deferred.fromCoroutine(through_hestia(fresh, f"{gateway}/services/web/"))
            # Meanwhile, watch the container ourselves: when did it first answer?
            ready_at = await wait_ok(reactor, fresh, f"http://127.0.0.1:{port}/", 0.005)
            code, body, answered_at = await held
            if code != 200:
                raise RuntimeError(f"through Hestia: {code} {body[:300]!r}")
            through.append(answered_at - began)
            paired.append(answered_at - ready_at)
        print(f"container cold start, {runs} runs each (busybox httpd on {sock})")
        print(summary("direct", direct))
        print(summary("through Hestia", through))
        print(summary("added by Hestia", paired)
              + "   (its answer minus the container's own first answer, same start)")
        print(summary("before start", before_start) + "   (inspect + event subscription, before POST start)")
        print(f"medians: through Hestia - direct = "
              f"{(statistics.median(through) - statistics.median(direct)) * 1000:.1f} ms "
              "(engine start times vary from run to run; the paired figure is the overhead)")
    finally:
        if hestia is not None:
            hestia.terminate()
            hestia.wait(30)
        try:
            await engine.remove(name, force=True)
        except NoSuchContainer:
            pass
        await engine.close()


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--sock", default=os.environ.get("HESTIA_PODMAN_SOCK", "/run/hestia-podman/podman.sock"))
    options = parser.parse_args()

    def go(reactor: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(main(reactor, options.runs, options.sock))

    task.react(go)


if __name__ == "__main__":
    run()
