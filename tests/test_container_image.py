"""
The container image and the compose file, built and run for real with Podman.

No image registry is reachable from the test machines, so the suite makes what it
needs: the Dockerfile's base image from Debian packages (C{scripts/podman-engine.sh
base-image}: mmdebstrap, imported and tagged as the Dockerfile's C{FROM}, kept across
runs), Hestia's wheels built on the host and installed in the image with no index
(C{HESTIA_WHEELHOUSE}), and a small stand-in for C{ollama/ollama} (busybox httpd
answering C{/api/tags}).  Then:

* the image runs Hestia as a non-root user; C{/v1/health}, the dashboard and a cold
  start of the demo answer from inside it; its HEALTHCHECK passes;
* C{docker-compose} (Debian's 1.29, the Python one) runs the repository's
  C{docker-compose.yml} against Podman's Docker-API socket (C{DOCKER_HOST}): Hestia
  adopts the Ollama container, stops it when idle, starts it again on the next
  C{/services/ollama/} request, and stops it again; then C{down -v}.

Builds use C{--format docker} (the OCI format drops HEALTHCHECK) and C{--pull=never};
containers get explicit ulimits (root here cannot raise rlimits) and publish on
127.0.0.1 only; every name is unique, and only what a test made is removed (never a
prune).  Timings go to C{tests/artifacts/container-timings.json}.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import require
from support.hestiaproc import free_port, wait_for
from support.wheelhouse import REPO, build_wheelhouse

pytestmark = pytest.mark.container

ENGINE = REPO / "scripts" / "podman-engine.sh"
SOCK = os.environ.get("HESTIA_PODMAN_SOCK", "/run/hestia-podman/podman.sock")
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
COMPOSE_ULIMITS = {"nofile": {"soft": 1024, "hard": 1024}, "nproc": {"soft": 1024, "hard": 1024}}
RUN_ID = uuid.uuid4().hex[:10]
TIMINGS: dict[str, float] = {}


def timed(label: str, action: Callable[[], Any]) -> Any:
    began = time.monotonic()
    try:
        return action()
    finally:
        TIMINGS[label] = round(time.monotonic() - began, 2)


def run(argv: list[str], timeout: float = 300, env: dict[str, str] | None = None,
        cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
                          stdin=subprocess.DEVNULL, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    """podman with the engine's store, runtime and containers.conf (scripts/podman-engine.sh)."""
    return run([str(ENGINE), "podman", *args], timeout=timeout, check=check)


def engine_problem() -> str | None:
    if os.geteuid() != 0:
        return "the container suite drives the rootful Podman engine: run it as root"
    for tool in ("podman", "docker-compose", "mmdebstrap", "busybox"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/install-system-deps.sh installs it)"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(SOCK)
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
            if b" 200 " not in s.recv(4096).split(b"\r\n", 1)[0]:
                return f"the engine at {SOCK} does not answer /_ping"
    except OSError as error:
        return f"no Podman engine at {SOCK} ({error}): run scripts/podman-engine.sh start"
    return None


def get(url: str, timeout: float = 10) -> httpx.Response:
    return httpx.get(url, timeout=timeout, trust_env=False)


def answers(url: str) -> bool:
    try:
        return get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# -- what the suite builds -------------------------------------------------------------


@pytest.fixture(scope="module")
def engine() -> Iterator[None]:
    require(engine_problem() is None, str(engine_problem()))
    yield
    artifacts = REPO / "tests" / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "container-timings.json").write_text(json.dumps(TIMINGS, indent=2) + "\n")


@pytest.fixture(scope="module")
def image(engine: None) -> Iterator[str]:
    """Hestia's image, built from the repository's Dockerfile with no network."""
    timed("base image (cached after the first run)", lambda: run([str(ENGINE), "base-image"], timeout=900))
    # Inside the build context (the Dockerfile installs from it), ignored by git.
    wheelhouse = REPO / ".wheelhouse" / RUN_ID
    tag = f"localhost/hestia-test-{RUN_ID}:latest"
    try:
        timed("host wheels", lambda: build_wheelhouse(wheelhouse))
        timed("image build", lambda: podman(
            "build", "--format", "docker", "--pull=never", *ULIMITS,
            "--build-arg", f"HESTIA_WHEELHOUSE=.wheelhouse/{RUN_ID}", "--tag", tag, str(REPO), timeout=900))
    finally:
        shutil.rmtree(wheelhouse, ignore_errors=True)
    yield tag
    podman("rmi", "--force", tag, check=False)


@pytest.fixture(scope="module")
def ollama_stand_in(engine: None) -> Iterator[str]:
    """A 2 MB image answering GET /api/tags on port 11434, as ollama/ollama does."""
    tag = f"localhost/hestia-test-ollama-{RUN_ID}:latest"
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "root"
        for folder in ("bin", "www/api", "tmp"):
            (root / folder).mkdir(parents=True)
        shutil.copy2(shutil.which("busybox") or "/bin/busybox", root / "bin" / "busybox")
        for applet in ("sh", "httpd"):
            (root / "bin" / applet).symlink_to("busybox")
        (root / "www" / "api" / "tags").write_text('{"models": []}\n')
        archive = Path(scratch) / "rootfs.tar"
        run(["tar", "-C", str(root), "-cf", str(archive), "."])
        podman("import", "--quiet", "--change", 'CMD ["/bin/httpd", "-f", "-p", "11434", "-h", "/www"]',
               "--change", "LABEL org.opencontainers.image.title=hestia-test-ollama-stand-in",
               str(archive), tag)
    yield tag
    podman("rmi", "--force", tag, check=False)


# -- the image ---------------------------------------------------------------------------


def test_the_image_runs_as_non_root_and_cold_starts_the_demo(image: str) -> None:
    name = f"hestia-test-{RUN_ID}-image"
    port = free_port()
    began = time.monotonic()
    podman("run", "--detach", "--name", name, *ULIMITS, "--publish", f"127.0.0.1:{port}:8080", image)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: answers(f"{base}/v1/health"), 60.0, 0.1), podman("logs", name).stderr[-3000:]
        TIMINGS["image: container up to /v1/health"] = round(time.monotonic() - began, 2)
        assert get(f"{base}/v1/health").json()["status"] == "ok"
        dashboard = get(f"{base}/v1/ui/")
        assert dashboard.status_code == 200 and "<html" in dashboard.text.lower()

        assert get(f"{base}/v1/services/demo/status").json()["state"] == "stopped"
        cold = time.monotonic()
        page = get(f"{base}/services/demo/", timeout=60)
        TIMINGS["image: demo cold start"] = round(time.monotonic() - cold, 2)
        assert page.status_code == 200, page.text
        assert re.search(r"started on demand by Hestia in \d+ ms", page.text), page.text
        assert get(f"{base}/v1/services/demo/status").json()["state"] == "ready"
        assert get(f"{base}/services/demo/.git/HEAD").status_code == 404

        assert podman("exec", name, "id", "-u").stdout.strip() != "0"
        container = json.loads(podman("inspect", name).stdout)[0]
        config = container["Config"]
        assert config["User"] == "hestia"
        # The state volume: an anonymous one here, hestia-state in docker-compose.yml.
        assert "/var/lib/hestia" in [mount["Destination"] for mount in container["Mounts"]]
        assert "/var/lib/hestia" in json.loads(podman("image", "inspect", image).stdout)[0]["Config"]["Volumes"]
        assert "/v1/health" in " ".join(config["Healthcheck"]["Test"])
        assert podman("healthcheck", "run", name, check=False).returncode == 0
        # The plugin cache was written at build time; /src is gone.
        podman("exec", name, "sh", "-c",
               "test -f /opt/hestia/lib/python3*/site-packages/twisted/plugins/dropin.cache && test ! -e /src")
        assert podman("port", name).stdout.split() == ["8080/tcp", "->", f"127.0.0.1:{port}"]
    finally:
        podman("rm", "--force", "--volumes", name, check=False)


# -- docker-compose.yml ------------------------------------------------------------------


class Compose:
    """The repository's docker-compose.yml under a unique project, through Podman's socket."""

    def __init__(self, tmp_path: Path, image: str, ollama: str) -> None:
        self.project = f"hestiatest{RUN_ID}"
        self.port = free_port()
        self.override = tmp_path / "compose.test.yml"
        # What only this machine needs: local images, ulimits, and an init so that busybox
        # httpd (PID 1 would ignore SIGTERM) stops when Hestia stops it.
        self.override.write_text(yaml.safe_dump({"services": {
            "hestia": {"image": image, "ulimits": COMPOSE_ULIMITS},
            "ollama": {"image": ollama, "ulimits": COMPOSE_ULIMITS, "init": True},
        }}))
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path),
            "DOCKER_HOST": f"unix://{SOCK}",
            "DOCKER_SOCKET": SOCK,
            "DOCKER_GID": str(os.stat(SOCK).st_gid),
            "HESTIA_PUBLISH": f"127.0.0.1:{self.port}",
            "OLLAMA_IDLE_TIMEOUT": "3s",
        }
        self.base = f"http://127.0.0.1:{self.port}"

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["docker-compose", "--project-name", self.project, "--file", str(REPO / "docker-compose.yml"),
                    "--file", str(self.override), *args], timeout=timeout, env=self.env, cwd=REPO, check=check)

    def ollama(self) -> dict[str, Any]:
        response = get(f"{self.base}/v1/services/ollama/status")
        return response.json() if response.status_code == 200 else {}

    def container_running(self) -> bool:
        state = podman("inspect", "--format", "{{.State.Running}}", f"{self.project}_ollama_1").stdout.strip()
        return state == "true"

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        names = podman("ps", "--all", "--filter", label, "--format", "{{.Names}}").stdout.split()
        volumes = podman("volume", "ls", "--filter", f"name={self.project}", "--format", "{{.Name}}").stdout.split()
        return names + volumes


def test_compose_hestia_cold_starts_and_idle_stops_ollama(image: str, ollama_stand_in: str,
                                                          tmp_path: Path) -> None:
    compose = Compose(tmp_path, image, ollama_stand_in)
    began = time.monotonic()
    try:
        compose("up", "--detach", "--no-build")
        assert wait_for(lambda: answers(f"{compose.base}/v1/health"), 60.0, 0.1), compose("logs", check=False).stdout[-3000:]
        TIMINGS["compose: up to /v1/health"] = round(time.monotonic() - began, 2)

        # Label discovery: the running ollama container is adopted, then stopped when idle.
        assert wait_for(lambda: compose.ollama().get("state") == "ready", 30.0, 0.2), compose.ollama()
        assert compose.ollama()["backend"] == "docker"
        idle = time.monotonic()
        assert wait_for(lambda: compose.ollama().get("state") == "stopped" and not compose.container_running(),
                        60.0, 0.2), compose.ollama()
        TIMINGS["compose: idle stop (3 s idle_timeout)"] = round(time.monotonic() - idle, 2)
        assert compose.ollama()["state_reason"] == "idle" or any(
            event["reason"] == "idle" for event in compose.ollama()["recent_events"])

        # The first request starts it again and is held until it answers.
        cold = time.monotonic()
        tags = get(f"{compose.base}/services/ollama/api/tags", timeout=60)
        TIMINGS["compose: ollama cold start through Hestia"] = round(time.monotonic() - cold, 2)
        assert tags.status_code == 200, tags.text
        assert tags.json() == {"models": []}
        assert compose.container_running()
        status = compose.ollama()
        assert status["state"] == "ready" and status["requests_total"] >= 1
        news = [(event["old"], event["new"]) for event in status["recent_events"]]
        assert ("stopped", "starting") in news and ("starting", "ready") in news

        # And it is stopped again once idle.
        assert wait_for(lambda: compose.ollama().get("state") == "stopped" and not compose.container_running(),
                        60.0, 0.2), compose.ollama()
        dashboard = get(f"{compose.base}/v1/ui/")
        assert dashboard.status_code == 200
    finally:
        down = time.monotonic()
        compose("down", "--volumes", "--remove-orphans", check=False)
        TIMINGS["compose: down -v"] = round(time.monotonic() - down, 2)
    assert compose.leftovers() == []
