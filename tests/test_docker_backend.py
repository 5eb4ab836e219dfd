"""
The C{docker} backend and label discovery, through a real Hestia, on a REAL engine.

Hestia runs as a real C{twistd -n hestia} (L{hestiaproc.HestiaProcess}); the
containers are busybox httpd on the Podman engine that
C{scripts/podman-engine.sh start} runs, created here through
L{hestia.backends.docker.engine.DockerEngine} and removed at the end of each test
(every name starts with C{hestia-test-}).  Under C{CI=true} a missing engine
fails these tests instead of skipping them.

The tests are trial C{TestCase}s so that the engine client (Twisted) can be
awaited; talking to Hestia uses the blocking httpx client of
L{HestiaProcess}, which is fine because Hestia is another process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.hestiaproc import HestiaProcess, wait_for
from test_docker_engine import IMAGE, SANDBOX_HOST_CONFIG, SOCK, free_port, require_engine
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import implementer

from hestia.backends.docker import DockerSettings, parse_docker_section
from hestia.backends.docker.discovery import DiscoverySettings, service_from_labels
from hestia.backends.docker.engine import DockerEngine, NoSuchContainer
from hestia.config import ConfigError, Reader, Tunables
from hestia.gateway import Gateway
from hestia.interfaces import IAdoptableBackend
from hestia.loader import parse_config
from hestia.testing import FakeBackend

ENGINE_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "podman-engine.sh"
HTTPD = "echo hestia-ready; exec httpd -f -p 8080 -h /www"


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=1, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


class ContainerTestCase(unittest.TestCase):
    """Engine checks, container creation and clean-up, Hestia processes."""

    timeout = 120

    def setUp(self) -> None:
        require_engine(self)
        self.engine = DockerEngine(f"unix://{SOCK}")
        self.addCleanup(self.engine.close)
        self.tmp = Path(tempfile.mkdtemp(prefix="hestia-test-docker-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)

    async def container(
        self, port: int | None, script: str = HTTPD, labels: dict[str, str] | None = None, **host: Any
    ) -> str:
        """Create (not start) a container; removed when the test ends (after Hestia stopped)."""
        name = f"hestia-test-{uuid.uuid4().hex[:10]}"
        host_config = {**SANDBOX_HOST_CONFIG, **host}
        if port is not None:
            host_config["PortBindings"] = {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
        await self.engine.create(name, {
            "Image": IMAGE,
            "Cmd": ["sh", "-c", script],
            "Labels": {"hestia.test": name, **(labels or {})},
            "ExposedPorts": {"8080/tcp": {}},
            "HostConfig": host_config,
        })
        self.addCleanup(self.remove, name)
        return name

    async def remove(self, name: str) -> None:
        try:
            await self.engine.remove(name, force=True)
        except NoSuchContainer:
            pass

    async def state_of(self, name: str) -> dict[str, Any]:
        info = await self.engine.inspect(name)
        state: dict[str, Any] = info["State"]
        return state

    def hestia(self, config: dict[str, Any], env: dict[str, str] | None = None) -> HestiaProcess:
        gateway = HestiaProcess(config, self.tmp / f"hestia-{uuid.uuid4().hex[:6]}", env)
        self.addCleanup(self.stop_hestia, gateway)
        return gateway.start()

    def stop_hestia(self, gateway: HestiaProcess) -> None:
        gateway.stop()
        log = gateway.log_text()
        # Engine trouble is reported in words, never as a traceback.
        assert "Traceback" not in log, log

    def service(self, name: str, port: int, **docker: Any) -> dict[str, Any]:
        return {
            "url": f"http://127.0.0.1:{port}",
            "health": {"path": "/"},
            "idle_timeout": 1,
            "stop_timeout": 2,
            "start_timeout": 20,
            "docker": {"container": name, "host": f"unix://{SOCK}", **docker},
        }


@pytest.mark.container
class DockerBackendTests(ContainerTestCase):
    async def test_cold_start_on_request_then_idle_stop(self) -> None:
        port = free_port()
        name = await self.container(port)
        gateway = self.hestia({"services": {"web": self.service(name, port)}})
        self.assertEqual(gateway.state("web"), "stopped")
        self.assertFalse((await self.state_of(name))["Running"])

        response = gateway.http.get("/services/web/", timeout=30)
        self.assertEqual((response.status_code, response.text), (200, "hestia-busybox ok\n"))
        status = gateway.status("web")
        self.assertEqual(status["backend"], "docker")
        self.assertEqual(status["details"]["container"], name)
        self.assertEqual(status["details"]["container_state"], "running")
        self.assertTrue((await self.state_of(name))["Running"])

        gateway.wait_state("web", "stopped", timeout=15)
        self.assertEqual(gateway.status("web")["state_reason"], "idle")
        # "stopped" is reported once the engine has stopped it.
        self.assertFalse((await self.state_of(name))["Running"])

        # A second cold start works the same (the container is started again).
        self.assertEqual(gateway.http.get("/services/web/", timeout=30).status_code, 200)

    async def test_not_ready_until_the_docker_healthcheck_says_healthy(self) -> None:
        port = free_port()
        name = f"hestia-test-{uuid.uuid4().hex[:10]}"
        self.addCleanup(self.remove, name)
        # A healthcheck that passes only once /tmp/ok exists.
        host_config = {**SANDBOX_HOST_CONFIG,
                       "PortBindings": {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}}
        await self.engine.create(name, {
            "Image": IMAGE, "Cmd": ["sh", "-c", HTTPD], "ExposedPorts": {"8080/tcp": {}},
            "Healthcheck": {"Test": ["CMD-SHELL", "test -f /tmp/ok"], "Interval": 3_600_000_000_000},
            "HostConfig": host_config,
        })
        gateway = self.hestia({"services": {"web": self.service(name, port)}})
        self.assertEqual(gateway.http.post("/v1/services/web/start").status_code, 202)
        # The app answers, but the engine's healthcheck has not passed: not ready.
        self.assertTrue(wait_for(lambda: _answers(port), 15))
        await self.run_healthcheck(name)
        self.assertEqual((await self.state_of(name))["Health"]["Status"], "starting")
        status = gateway.status("web")
        self.assertEqual((status["state"], status["details"]["health"]), ("starting", "starting"))
        # Podman runs healthchecks from systemd timers, absent here: the test runs them.
        exec_id = (await self.engine._call("POST", f"/containers/{name}/exec",
                                           body={"Cmd": ["sh", "-c", "echo ok > /tmp/ok"]}))["Id"]
        await self.engine._call("POST", f"/exec/{exec_id}/start", body={"Detach": True})
        await self.run_healthcheck(name)
        status = gateway.wait_state("web", "ready", timeout=10)
        self.assertEqual(status["details"]["health"], "healthy")

    async def run_healthcheck(self, name: str) -> None:
        """Podman's own endpoint that runs a container's healthcheck once."""
        await self.engine._call("GET", f"/v4.0.0/libpod/containers/{name}/healthcheck", versioned=False)

    async def test_pause_mode(self) -> None:
        port = free_port()
        name = await self.container(port)
        gateway = self.hestia({"services": {"web": self.service(name, port, stop_mode="pause")}})
        self.assertEqual(gateway.http.get("/services/web/", timeout=30).status_code, 200)
        gateway.wait_state("web", "stopped", timeout=15)
        state = await self.state_of(name)
        self.assertTrue(state["Paused"], state)
        # Unpausing is the cold start now: the same container, running again.
        pid = state["Pid"]
        response = gateway.http.get("/services/web/", timeout=30)
        self.assertEqual(response.status_code, 200)
        state = await self.state_of(name)
        self.assertEqual((state["Running"], state["Paused"], state["Pid"]), (True, False, pid))

    async def test_exit_while_starting_is_a_502_with_code_and_log(self) -> None:
        port = free_port()
        name = await self.container(port, script="echo boom-line; echo on-stderr >&2; exit 3")
        gateway = self.hestia({"services": {"web": self.service(name, port)}})
        response = gateway.http.get("/services/web/", timeout=30)
        self.assertEqual(response.status_code, 502)
        body = response.json()
        self.assertEqual((body["service"], body["state"]), ("web", "failed"))
        self.assertIn("exit code 3", body["error"])
        self.assertIn("boom-line", body["detail"])
        self.assertIn("on-stderr", body["detail"])
        status = gateway.status("web")
        self.assertEqual(status["state"], "failed")
        self.assertIn("exited during start: exit code 3", status["last_error"])
        self.assertIn("boom-line", status["last_error_detail"])
        self.assertEqual(status["details"]["last_exit"], "exit code 3")

    async def test_exit_while_serving_is_seen_from_events(self) -> None:
        port = free_port()
        name = await self.container(port)
        gateway = self.hestia({"services": {"web": self.service(name, port, adopt=False) | {"idle_timeout": 0}}})
        self.assertEqual(gateway.http.get("/services/web/", timeout=30).status_code, 200)
        # Stopped behind Hestia's back (docker stop): the die event tells it.
        await self.engine.stop(name, timeout=2)
        status = gateway.wait_state("web", "failed", timeout=10)
        self.assertRegex(status["last_error"], r"^exited while serving: exit code \d+")
        self.assertIn("hestia-ready", status["last_error_detail"])
        # The next request starts it again.
        self.assertEqual(gateway.http.get("/services/web/", timeout=30).status_code, 200)

    async def test_running_container_is_adopted_and_idle_stopped(self) -> None:
        port, other_port = free_port(), free_port()
        adopted = await self.container(port)
        left_alone = await self.container(other_port)
        await self.engine.start(adopted)
        await self.engine.start(left_alone)
        gateway = self.hestia({"services": {
            "adopted": self.service(adopted, port),
            "manual": self.service(left_alone, other_port, adopt=False),
        }})
        gateway.wait_state("adopted", "ready", timeout=10)
        self.assertEqual(gateway.state("manual"), "stopped")
        gateway.wait_state("adopted", "stopped", timeout=15)
        self.assertFalse((await self.state_of(adopted))["Running"])
        # adopt: false leaves a running container to whoever started it.
        self.assertTrue((await self.state_of(left_alone))["Running"])
        self.assertEqual(gateway.state("manual"), "stopped")

    async def test_group_members_start_first_and_stop_after(self) -> None:
        port = free_port()
        member = await self.container(None, script="exec sleep 1000")
        name = await self.container(port)
        gateway = self.hestia({"services": {"web": self.service(name, port, group=[member])}})
        self.assertEqual(gateway.http.get("/services/web/", timeout=30).status_code, 200)
        self.assertTrue((await self.state_of(member))["Running"])
        gateway.wait_state("web", "stopped", timeout=20)
        self.assertFalse((await self.state_of(member))["Running"])
        self.assertFalse((await self.state_of(name))["Running"])

    async def test_missing_container_and_unreachable_engine_are_clear_502s(self) -> None:
        missing = f"hestia-test-missing-{uuid.uuid4().hex[:8]}"
        nowhere = self.tmp / "no-engine.sock"
        gateway = self.hestia({"services": {
            "missing": self.service(missing, free_port()),
            "offline": self.service("whatever", free_port()) | {
                "docker": {"container": "whatever", "host": f"unix://{nowhere}"}},
        }})
        response = gateway.http.get("/services/missing/", timeout=30)
        self.assertEqual(response.status_code, 502)
        self.assertEqual(response.json()["error"], f"no such container: {missing}")
        response = gateway.http.get("/services/offline/", timeout=30)
        self.assertEqual(response.status_code, 502)
        self.assertEqual(
            response.json()["error"],
            f"cannot reach the container engine at unix://{nowhere}: "
            "no such file (is the engine running? is the socket path right?)",
        )
        status = gateway.status("offline")
        self.assertEqual(status["state"], "failed")
        self.assertIn("cannot reach the container engine", status["last_error"])
        self.assertIn("cannot reach the container engine", status["details"]["engine_error"])


@pytest.mark.container
class DiscoveryTests(ContainerTestCase):
    async def test_labelled_container_becomes_a_service_and_goes_away(self) -> None:
        gateway = self.hestia({"docker": {"discover": True, "host": f"unix://{SOCK}"}, "services": {}})
        service = f"disc-{uuid.uuid4().hex[:8]}"
        port = free_port()
        # A container with a bad label is ignored (and logged), not fatal.
        bad = await self.container(None, labels={"hestia.enable": "true", "hestia.port": "not-a-port",
                                                 "hestia.name": f"{service}-bad"})
        name = await self.container(port, labels={
            "hestia.enable": "true", "hestia.port": str(port), "hestia.name": service,
            "hestia.idle_timeout": "1", "hestia.health_path": "/",
        })

        def listed() -> set[str]:
            return {entry["name"] for entry in gateway.http.get("/v1/services").json()["services"]}

        self.assertTrue(wait_for(lambda: service in listed(), 10), listed())
        self.assertNotIn(f"{service}-bad", listed())
        status = gateway.status(service)
        self.assertEqual((status["backend"], status["url"], status["idle_timeout"]),
                         ("docker", f"http://127.0.0.1:{port}", 1.0))
        self.assertEqual(status["details"]["container"], name)
        response = gateway.http.get(f"/services/{service}/", timeout=30)
        self.assertEqual((response.status_code, response.text), (200, "hestia-busybox ok\n"))
        gateway.wait_state(service, "stopped", timeout=15)

        await self.engine.remove(name, force=True)
        self.assertTrue(wait_for(lambda: service not in listed(), 10), listed())
        self.assertEqual(gateway.http.get(f"/services/{service}/").status_code, 404)
        self.assertIn(f"not a service: container {bad}: hestia.port: expected a whole number", gateway.log_text())


@pytest.mark.container
class EngineRestartTests(ContainerTestCase):
    """A second engine on its own socket, so that restarting it disturbs no other test."""

    timeout = 180

    def engine_script(self, command: str) -> None:
        env = {**os.environ, "HESTIA_PODMAN_SOCK": str(self.sock)}
        subprocess.run([str(ENGINE_SCRIPT), command], env=env, check=True, capture_output=True, timeout=90)

    async def test_engine_restart_while_serving(self) -> None:
        if os.geteuid() != 0:
            raise unittest.SkipTest("the engine script runs a rootful engine")
        self.sock = Path(tempfile.mkdtemp(prefix="hestia-test-engine-")) / "podman.sock"
        self.addCleanup(shutil.rmtree, self.sock.parent, True)
        self.engine_script("start")
        self.addCleanup(self.engine_script, "stop")
        port = free_port()
        name = await self.container(port)
        gateway = self.hestia({"services": {"web": self.service(name, port) | {
            "idle_timeout": 0, "docker": {"container": name, "host": f"unix://{self.sock}"}}}})
        self.assertEqual(gateway.http.get("/services/web/", timeout=30).status_code, 200)

        self.engine_script("stop")
        # The container outlives its engine's API: still ready, still served.
        self.assertTrue(wait_for(lambda: gateway.status("web")["details"]["engine_error"], 10))
        self.assertEqual(gateway.state("web"), "ready")
        self.assertEqual(gateway.http.get("/services/web/", timeout=10).status_code, 200)

        self.engine_script("start")
        status = gateway.wait_status("web", "details", {**gateway.status("web")["details"], "engine_error": None},
                                     timeout=30)
        self.assertEqual(status["state"], "ready")
        # Watching again: an exit now is noticed through the new event stream.
        await self.engine.stop(name, timeout=2)
        status = gateway.wait_state("web", "failed", timeout=10)
        self.assertIn("exited while serving", status["last_error"])


@pytest.mark.unit
class ConfigTests(unittest.SynchronousTestCase):
    """The C{docker:} sections and labels, without an engine."""

    def parse(self, document: dict[str, Any]) -> Any:
        return parse_config(document, "hestia.yml", {})

    def test_service_section(self) -> None:
        config = self.parse({"services": {"jf": {"url": "http://127.0.0.1:8096", "docker": {
            "host": "unix:///run/x.sock", "stop_mode": "pause", "group": ["db"], "adopt": False}}}})
        service = config.services["jf"]
        self.assertEqual(service.backend, "docker")
        self.assertEqual(service.sections["docker"],
                         DockerSettings(container="jf", host="unix:///run/x.sock", stop_mode="pause",
                                        group=("db",), adopt=False))

    def test_bad_service_sections_name_file_service_and_key(self) -> None:
        cases = [
            ({"stop_mode": "freeze"}, "hestia.yml: services.jf.docker.stop_mode: expected stop or pause"),
            ({"contianer": "x"}, "hestia.yml: services.jf.docker.contianer: unknown key"),
            ({"host": "ssh://me@nas"}, "hestia.yml: services.jf.docker.host: unsupported container engine"),
            ({"group": "db", "adopt": "maybe"}, "hestia.yml: services.jf.docker.adopt: expected true or false"),
            ({"group": [""]}, "hestia.yml: services.jf.docker.group[0]: expected a non-empty string"),
        ]
        for docker, message in cases:
            with self.assertRaises(ConfigError) as caught:
                self.parse({"services": {"jf": {"url": "http://127.0.0.1:1", "docker": docker}}})
            self.assertTrue(str(caught.exception).startswith(message), str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))
        self.assertEqual(
            parse_docker_section(Reader("f"), {"group": "db"}, "k", "svc").group, ("db",)
        )

    def test_top_level_section(self) -> None:
        config = self.parse({"docker": {"discover": True, "stop_mode": "pause"}})
        self.assertEqual(config.sections["docker"], DiscoverySettings(discover=True, stop_mode="pause"))
        with self.assertRaises(ConfigError) as caught:
            self.parse({"docker": {"discovery": True}})
        self.assertTrue(str(caught.exception).startswith("hestia.yml: docker.discovery: unknown key"))

    def test_labels(self) -> None:
        settings = DiscoverySettings(discover=True, host="unix:///run/x.sock")
        container = {"Id": "abc123", "Names": ["/Jelly_Fin"], "Labels": {
            "hestia.enable": "true", "hestia.port": "8096", "hestia.name": "jellyfin",
            "hestia.idle_timeout": "5m", "hestia.health_path": "/health"}}
        service = service_from_labels(container, settings, Tunables())
        self.assertEqual((service.name, service.url, service.idle_timeout, service.health.path),
                         ("jellyfin", "http://127.0.0.1:8096", 300.0, "/health"))
        self.assertEqual(service.sections["docker"].container, "abc123")
        self.assertEqual(service.sections["docker"].shown_as, "Jelly_Fin")
        bad = [
            ({"hestia.port": "80"}, "container Jelly_Fin: hestia.name: service names must match"),
            ({"hestia.name": "jf"}, "container Jelly_Fin: hestia.url: missing"),
            ({"hestia.name": "jf", "hestia.url": "ftp://x"}, "container Jelly_Fin: hestia.url: expected an http"),
            ({"hestia.name": "jf", "hestia.port": "99999"}, "container Jelly_Fin: hestia.port: must be at most 65535"),
            ({"hestia.name": "jf", "hestia.port": "1", "hestia.health_path": "x"},
             "container Jelly_Fin: hestia.health_path: must start with '/'"),
        ]
        for labels, message in bad:
            with self.assertRaises(ConfigError) as caught:
                service_from_labels({**container, "Labels": labels}, settings, Tunables())
            self.assertTrue(str(caught.exception).startswith(message), str(caught.exception))


@implementer(IAdoptableBackend)
class _AdoptableFake(FakeBackend):
    """A FakeBackend that says it already runs (as a running container would)."""

    running = True

    def running_already(self) -> Deferred[bool]:
        return succeed(self.running)


@pytest.mark.unit
class GatewayRuntimeServicesTests(unittest.SynchronousTestCase):
    """Gateway.add_service / remove_service / adopt_running, with a Clock and fakes."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.backends: dict[str, _AdoptableFake] = {}
        self.config = parse_config({"services": {"file": {"url": "http://127.0.0.1:1", "command": "x"}}}, "f", {})

        def build(service: Any) -> FakeBackend:
            backend = self.backends[service.name] = _AdoptableFake(service.url)
            backend.running = service.name.startswith("up")
            return backend

        self.gateway = Gateway(self.config, self.clock, agent=object(), build_backend=build)  # type: ignore[arg-type]

    def discovered(self, name: str, port: int = 2) -> Any:
        return service_from_labels(
            {"Id": f"id-{name}", "Names": [f"/{name}"], "Labels": {"hestia.port": str(port)}},
            DiscoverySettings(discover=True), Tunables())

    def test_add_remove_and_reload_keeps_discovered(self) -> None:
        self.assertTrue(self.gateway.add_service(self.discovered("web")))
        self.assertFalse(self.gateway.add_service(self.discovered("web")))  # unchanged: kept as is
        first = self.gateway.services["web"]
        self.assertTrue(self.gateway.add_service(self.discovered("web", port=3)))  # changed: rebuilt
        self.assertIsNot(self.gateway.services["web"], first)
        # A name the file defines is never taken over by a container.
        self.assertFalse(self.gateway.add_service(self.discovered("file")))
        self.assertEqual(self.gateway.services["file"].config.backend, "process")
        summary = self.gateway.apply(self.config)
        self.assertIn("web", self.gateway.services)
        self.assertEqual(summary["removed"], [])
        self.gateway.remove_service("web")
        self.assertNotIn("web", self.gateway.services)
        self.gateway.remove_service("file")  # not discovered: left alone
        self.assertIn("file", self.gateway.services)

    def test_running_service_is_adopted(self) -> None:
        self.gateway.add_service(self.discovered("up-one"))
        self.gateway.add_service(self.discovered("down-one"))
        adopted, cold = self.gateway.services["up-one"], self.gateway.services["down-one"]
        self.assertEqual((adopted.state.value, adopted.state_reason), ("starting", "adopted"))
        self.assertEqual(cold.state.value, "stopped")
        self.backends["up-one"].finish_start()
        self.clock.advance(0)
        self.backends["up-one"].answer_probe(True)
        self.assertEqual(adopted.state.value, "ready")
        # ...and idle-stopped like the rest.
        self.clock.advance(adopted.config.idle_timeout)
        self.assertEqual((adopted.state.value, adopted.state_reason), ("stopping", "idle"))
