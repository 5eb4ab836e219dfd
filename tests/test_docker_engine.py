"""
Tests of L{hestia.backends.docker.engine} against a REAL Podman engine.

The engine is the one C{scripts/podman-engine.sh start} runs; its socket is
C{$HESTIA_PODMAN_SOCK} (default C{/run/hestia-podman/podman.sock}) and the
image C{localhost/hestia-busybox:latest} is built by the same script. When the
engine is missing these tests skip with the reason, except under C{CI=true},
where they fail: a CI run that skipped them would prove nothing.

They are C{twisted.trial.unittest.TestCase}s so that a test can return a
Deferred (or be a coroutine) and trial spins the reactor until it fires; this
works under pytest too. A few tests use tiny fake engines on a unix socket for
what a real engine cannot be made to do on demand (drop an event stream, never
answer).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from hestia.backends.docker.engine import (
    DockerEngine,
    EngineAddress,
    EngineError,
    EnginePermissionDenied,
    EngineTimeout,
    EngineUnreachable,
    NoSuchContainer,
    _negotiate,
    _split_lines,
    _translate,
    demultiplex,
    parse_engine_host,
)

SOCK = os.environ.get("HESTIA_PODMAN_SOCK", "/run/hestia-podman/podman.sock")
IMAGE = "localhost/hestia-busybox:latest"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# What a container needs to start on this kind of machine (see
# scripts/podman-engine.sh): rlimits at or below the engine's own hard limits,
# because even root lacks CAP_SYS_RESOURCE here; and an init (catatonit) so
# that httpd, not being PID 1, dies on SIGTERM instead of waiting for SIGKILL.
SANDBOX_HOST_CONFIG: dict[str, Any] = {
    "Init": True,
    "Ulimits": [
        {"Name": "nofile", "Soft": 1024, "Hard": 1024},
        {"Name": "nproc", "Soft": 1024, "Hard": 1024},
    ],
}


def _probe_engine() -> str | None:
    """
    Why the real engine cannot be used, or None if it can. Blocking on
    purpose: it runs once, before any reactor work, in test code only.
    """
    if not os.path.exists(SOCK):
        return f"no engine socket at {SOCK}"

    def get(path: str) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(SOCK)
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: d\r\n\r\n".encode())
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    try:
        if not get("/_ping").split(b"\r\n", 1)[0].endswith(b" 200 OK"):
            return f"the engine at {SOCK} does not answer /_ping with 200"
        if b" 200 " not in get(f"/v1.41/images/{IMAGE}/json").split(b"\r\n", 1)[0]:
            return f"image {IMAGE} is missing (scripts/podman-engine.sh start builds it)"
    except OSError as e:
        return f"cannot talk to the engine at {SOCK}: {e}"
    return None


_probe_result: list[str | None] = []


def engine_problem() -> str | None:
    if not _probe_result:
        _probe_result.append(_probe_engine())
    return _probe_result[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.1) -> Any:
    """Poll C{check} (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if isinstance(result, Deferred) or hasattr(result, "__await__"):
                result = await result
            if result:
                return result
        except Exception as e:  # noqa: BLE001 (polled condition not met yet)
            last_error = e
        await deferLater(reactor, interval, lambda: None)
    raise AssertionError(f"condition not met within {timeout} s (last error: {last_error})")


def require_engine(case: unittest.TestCase) -> None:
    """Skip C{case} without the real engine; under CI=true, fail it instead."""
    problem = engine_problem()
    if problem:
        message = f"{problem}; run: scripts/podman-engine.sh install && scripts/podman-engine.sh start"
        if IN_CI:
            case.fail(f"the real Podman engine is required under CI=true: {message}")
        raise unittest.SkipTest(message)


@pytest.mark.container
class RealEngineTests(unittest.TestCase):
    """The client against the Podman engine run by scripts/podman-engine.sh."""

    timeout = 60

    def setUp(self) -> None:
        require_engine(self)
        self.engine = DockerEngine(f"unix://{SOCK}")
        self.addCleanup(self.engine.close)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = Agent(reactor, pool=self.pool)

    # -- helpers ---------------------------------------------------------

    async def make_container(self, port: int | None = None, **labels: str) -> str:
        """
        Create (not start) a busybox httpd container publishing container
        port 8080 on 127.0.0.1:C{port}; removed when the test ends.
        """
        name = f"hestia-test-{uuid.uuid4().hex[:10]}"
        host_config = dict(SANDBOX_HOST_CONFIG)
        if port is not None:
            host_config["PortBindings"] = {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
        await self.engine.create(
            name,
            {
                "Image": IMAGE,
                "Cmd": [
                    "sh",
                    "-c",
                    "echo hestia-ready; echo hestia-on-stderr >&2; exec httpd -f -p 8080 -h /www",
                ],
                "Labels": {"hestia.enable": "true", "hestia.test": name, **labels},
                "ExposedPorts": {"8080/tcp": {}},
                "HostConfig": host_config,
            },
        )
        self.addCleanup(self.remove_quietly, name)
        return name

    async def remove_quietly(self, name: str) -> None:
        try:
            await self.engine.remove(name, force=True)
        except NoSuchContainer:
            pass

    async def http_get(self, port: int) -> bytes | None:
        response = await treq.get(f"http://127.0.0.1:{port}/", agent=self.http)
        body = await treq.content(response)
        return body if response.code == 200 else None

    # -- tests -----------------------------------------------------------

    async def test_ping_and_version(self) -> None:
        self.assertEqual(await self.engine.ping(), "OK")
        info = await self.engine.version()
        self.assertIn("ApiVersion", info)
        self.assertEqual(self.engine._api_version, _negotiate(info, "1.41"))

    async def test_start_serves_http_and_inspect_shows_running(self) -> None:
        port = free_port()
        name = await self.make_container(port)
        self.assertFalse((await self.engine.inspect(name))["State"]["Running"])
        await self.engine.start(name)
        await self.engine.start(name)  # 304 Not Modified: already started, no error
        body = await eventually(lambda: self.http_get(port))
        self.assertEqual(body, b"hestia-busybox ok\n")
        info = await self.engine.inspect(name)
        self.assertTrue(info["State"]["Running"])
        self.assertEqual(info["Name"].lstrip("/"), name)
        self.assertEqual(info["NetworkSettings"]["Ports"]["8080/tcp"][0]["HostPort"], str(port))

    async def test_pause_and_unpause(self) -> None:
        port = free_port()
        name = await self.make_container(port)
        await self.engine.start(name)
        await eventually(lambda: self.http_get(port))
        await self.engine.pause(name)
        state = (await self.engine.inspect(name))["State"]
        self.assertTrue(state["Paused"])
        self.assertEqual(state["Status"], "paused")
        await self.engine.unpause(name)
        self.assertFalse((await self.engine.inspect(name))["State"]["Paused"])
        self.assertEqual(await eventually(lambda: self.http_get(port)), b"hestia-busybox ok\n")

    async def test_stop_twice_is_not_an_error(self) -> None:
        name = await self.make_container()
        await self.engine.start(name)
        started = time.monotonic()
        await self.engine.stop(name, timeout=5)
        # With Init=true the SIGTERM reaches httpd: no 5 s wait for SIGKILL.
        self.assertLess(time.monotonic() - started, 4)
        self.assertFalse((await self.engine.inspect(name))["State"]["Running"])
        await self.engine.stop(name, timeout=5)  # 304 Not Modified: already stopped

    async def test_logs_lines_from_stdout_and_stderr(self) -> None:
        name = await self.make_container()
        await self.engine.start(name)
        lines = await eventually(
            lambda: self.engine.logs(name, tail=50).addCallback(lambda got: got if "hestia-on-stderr" in got else None)
        )
        self.assertIn("hestia-ready", lines)
        self.assertIn("hestia-on-stderr", lines)
        # No 8-byte frame headers leaked into the text.
        self.assertFalse(any("\x00" in line for line in lines))

    async def test_list_containers_by_label(self) -> None:
        tag = uuid.uuid4().hex
        name = await self.make_container(**{"hestia.test.run": tag})
        other = await self.make_container()
        found = await self.engine.list_containers({"label": [f"hestia.test.run={tag}"]})
        self.assertEqual([c["Names"][0].lstrip("/") for c in found], [name])
        self.assertEqual(found[0]["Labels"]["hestia.enable"], "true")
        # all=True (the default) includes created/stopped containers; all=False not.
        self.assertEqual(
            await self.engine.list_containers({"label": f"hestia.test.run={tag}"}, all=False),
            [],
        )
        enabled = await self.engine.list_containers({"label": ["hestia.enable=true"]})
        names = {c["Names"][0].lstrip("/") for c in enabled}
        self.assertTrue({name, other} <= names)

    async def test_events_report_start_and_stop(self) -> None:
        tag = uuid.uuid4().hex
        seen: list[dict[str, Any]] = []
        subscribed_at = time.time()
        stream = await self.engine.events({"type": ["container"], "label": [f"hestia.test.run={tag}"]}, seen.append)
        self.addCleanup(stream.stop)
        name = await self.make_container(**{"hestia.test.run": tag})
        await self.engine.start(name)
        await self.engine.stop(name, timeout=5)

        def actions() -> list[str]:
            return [e.get("Action") or e.get("status") for e in seen]

        # Podman 4.3 reports a stop as "die" (+ "cleanup"), sometimes without
        # Docker's "stop": the backend must treat "die" as stopped.
        await eventually(lambda: "start" in actions() and {"stop", "die"} & set(actions()))
        self.assertTrue(all(e["Actor"]["Attributes"]["name"] == name for e in seen), seen)
        self.assertLess(actions().index("start"), max(i for i, a in enumerate(actions()) if a in ("stop", "die")))
        self.assertIsNotNone(stream.last_time)
        await stream.stop()
        self.assertIsNone(await stream.done)

        # A subscriber that reconnects with since= gets what it missed.
        replayed: list[dict[str, Any]] = []
        again = await self.engine.events(
            {"type": ["container"], "label": [f"hestia.test.run={tag}"]}, replayed.append, since=subscribed_at - 1
        )
        self.addCleanup(again.stop)
        await eventually(lambda: "start" in [e.get("Action") for e in replayed])

    async def test_missing_container_raises_no_such_container(self) -> None:
        missing = f"hestia-test-missing-{uuid.uuid4().hex[:8]}"
        for call in (
            self.engine.inspect,
            self.engine.start,
            self.engine.stop,
            self.engine.pause,
            self.engine.logs,
            self.engine.remove,
        ):
            with self.assertRaises(NoSuchContainer) as caught:
                await call(missing)
            self.assertEqual(caught.exception.name, missing)
            self.assertEqual(caught.exception.status, 404)
            self.assertEqual(str(caught.exception), f"no such container: {missing}")

    async def test_engine_error_carries_the_engine_message(self) -> None:
        with self.assertRaises(EngineError) as caught:
            await self.engine.create(
                f"hestia-test-{uuid.uuid4().hex[:10]}",
                {"Image": "localhost/hestia-no-such-image:latest"},
            )
        self.assertNotIsInstance(caught.exception, NoSuchContainer)
        self.assertIn("hestia-no-such-image", caught.exception.message)


class UnreachableEngineTests(unittest.TestCase):
    """Typed, readable errors when there is no engine to talk to."""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="hestia-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    async def test_missing_socket_file(self) -> None:
        path = os.path.join(self.tmp, "nothing-here.sock")
        engine = DockerEngine(f"unix://{path}")
        with self.assertRaises(EngineUnreachable) as caught:
            await engine.ping()
        self.assertEqual(
            str(caught.exception),
            f"cannot reach the container engine at unix://{path}: "
            "no such file (is the engine running? is the socket path right?)",
        )
        with self.assertRaises(EngineUnreachable):
            await engine.inspect("anything")  # negotiation fails the same way
        await engine.close()

    async def test_socket_nobody_listens_on(self) -> None:
        path = os.path.join(self.tmp, "dead.sock")
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path)  # bound, never listening: like a socket left by a dead engine
            engine = DockerEngine(f"unix://{path}")
            with self.assertRaises(EngineUnreachable) as caught:
                await engine.ping()
        self.assertIn("connection refused", str(caught.exception))
        await engine.close()

    def test_permission_denied_says_what_to_do(self) -> None:
        # Root bypasses socket permissions, so the EACCES case is checked on
        # the translation of the error Twisted reports for it.
        address = parse_engine_host("unix:///var/run/docker.sock")
        error = _translate(address, ConnectError(errno.EACCES, "Permission denied"))
        self.assertIsInstance(error, EnginePermissionDenied)
        self.assertIn("docker' group", str(error))
        self.assertIn("rootless Podman", str(error))


class _FakeEngine(Protocol):
    """Answers one request with a canned reply, then does what it is told."""

    reply: bytes = b""
    close_after_reply = True

    def dataReceived(self, data: bytes) -> None:
        self.factory.connections.append(self)  # type: ignore[attr-defined]
        if self.reply:
            self.transport.write(self.reply)  # type: ignore[union-attr]
        if self.close_after_reply:
            self.transport.loseConnection()  # type: ignore[union-attr]


class FakeEngineTests(unittest.TestCase):
    """Behaviour a real engine cannot be made to show on demand."""

    def serve(self, reply: bytes, close_after_reply: bool) -> DockerEngine:
        tmp = tempfile.mkdtemp(prefix="hestia-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        path = os.path.join(tmp, "fake.sock")
        factory = Factory.forProtocol(_FakeEngine)
        factory.connections = []  # type: ignore[attr-defined]
        _FakeEngine.reply = reply
        _FakeEngine.close_after_reply = close_after_reply
        port = reactor.listenUNIX(path, factory)  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)

        def drop_connections() -> None:
            for connection in factory.connections:  # type: ignore[attr-defined]
                connection.transport.abortConnection()

        self.addCleanup(drop_connections)
        engine = DockerEngine(f"unix://{path}", api_version="1.41", request_timeout=0.5)
        self.addCleanup(engine.close)
        return engine

    async def test_event_stream_loss_is_reported(self) -> None:
        event = {
            "Type": "container",
            "Action": "start",
            "time": 1700000000,
            "timeNano": 1700000000123456789,
            "Actor": {"ID": "x", "Attributes": {}},
        }
        line = json.dumps(event).encode() + b"\n"
        engine = self.serve(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(line):x}\r\n".encode() + line + b"\r\n",
            close_after_reply=True,  # then the "engine" dies mid-stream
        )
        seen: list[dict[str, Any]] = []
        stream = await engine.events({"type": "container"}, seen.append)
        with self.assertRaises(EngineUnreachable) as caught:
            await stream.done
        self.assertIn("event stream was cut", str(caught.exception))
        self.assertEqual(seen, [event])
        self.assertAlmostEqual(stream.last_time or 0, 1700000000.123456789)
        await stream.stop()  # harmless after a loss

    async def test_no_answer_is_a_timeout(self) -> None:
        engine = self.serve(b"", close_after_reply=False)
        with self.assertRaises(EngineTimeout) as caught:
            await engine.inspect("anything")
        self.assertIsInstance(caught.exception, EngineUnreachable)
        self.assertIn("no answer within 0.5 s", str(caught.exception))


class PureTests(unittest.SynchronousTestCase):
    """Parsing that needs no engine at all."""

    def test_parse_engine_host(self) -> None:
        self.assertEqual(
            parse_engine_host("unix:///run/x.sock"),
            EngineAddress(url="unix:///run/x.sock", path="/run/x.sock"),
        )
        self.assertEqual(parse_engine_host("/run/x.sock").path, "/run/x.sock")
        tcp = parse_engine_host("tcp://127.0.0.1:2376")
        self.assertEqual((tcp.host, tcp.port, tcp.is_unix), ("127.0.0.1", 2376, False))
        self.assertEqual(parse_engine_host("http://localhost").port, 2375)
        self.assertEqual(parse_engine_host("tcp://[::1]:1234").url, "tcp://[::1]:1234")
        for bad in ("ssh://me@host", "https://host:2376", "unix://", "npipe:////./pipe/x"):
            with self.assertRaises(ValueError):
                parse_engine_host(bad)

    def test_default_host_from_environment(self) -> None:
        self.patch(os, "environ", {"DOCKER_HOST": "tcp://10.0.0.9:2375"})
        self.assertEqual(parse_engine_host(None).host, "10.0.0.9")
        self.patch(os, "environ", {})
        self.assertEqual(parse_engine_host(None).path, "/var/run/docker.sock")

    def test_demultiplex_and_lines(self) -> None:
        def frame(stream: int, payload: bytes) -> bytes:
            return bytes([stream, 0, 0, 0]) + len(payload).to_bytes(4, "big") + payload

        data = frame(1, b"out one\nout ") + frame(2, b"err one\n") + frame(1, b"two\n")
        frames = demultiplex(data)
        self.assertEqual(frames, [(1, b"out one\nout "), (2, b"err one\n"), (1, b"two\n")])
        self.assertEqual(_split_lines(frames), ["out one", "err one", "out two"])
        self.assertEqual(demultiplex(frame(1, b"abc")[:-1]), [(1, b"ab")])

    def test_negotiation(self) -> None:
        podman = {"ApiVersion": "1.41", "MinAPIVersion": "1.24"}
        docker29 = {"ApiVersion": "1.52", "MinAPIVersion": "1.44"}
        old = {"ApiVersion": "1.40", "MinAPIVersion": "1.12"}
        self.assertEqual(_negotiate(podman, "1.41"), "1.41")
        self.assertEqual(_negotiate(docker29, "1.41"), "1.44")
        self.assertEqual(_negotiate(old, "1.41"), "1.40")
        self.assertEqual(_negotiate({}, "1.41"), "1.41")
