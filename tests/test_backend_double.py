"""Checks that tests/support/backend.py behaves the way the gateway tests assume.

If the double drifts (a header merged, a stream buffered, a signal mishandled),
gateway tests would fail or, worse, pass for the wrong reason; these pin it down.
Everything runs against a real subprocess via BackendProcess, as the suite does.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.backendproc import BackendProcess, pid_alive, port_open, wait_for

Spawn = Callable[..., BackendProcess]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start backends with given args (waiting until they listen); always cleaned up."""
    started: list[BackendProcess] = []

    def start(*args: str, listen: bool = True) -> BackendProcess:
        backend = BackendProcess()
        started.append(backend)
        backend.start(args)
        if listen:
            backend.wait_listening()
        return backend

    yield start
    for backend in started:
        backend.close()


@pytest.fixture(scope="module")
def shared() -> Iterator[BackendProcess]:
    """One long-lived backend for the stateless endpoint checks, to keep the module fast."""
    with BackendProcess() as backend:
        backend.start(["--name", "shared", "--models", "llama3:8b,tiny:1b"])
        backend.wait_listening()
        yield backend


def connect(backend: BackendProcess) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(backend.host, backend.port, timeout=5)


def fetch(conn: http.client.HTTPConnection, method: str, path: str,
          body: bytes | None = None) -> tuple[http.client.HTTPResponse, bytes]:
    conn.request(method, path, body=body)
    resp = conn.getresponse()
    return resp, resp.read()


def get_json(conn: http.client.HTTPConnection, path: str) -> Any:
    resp, data = fetch(conn, "GET", path)
    assert resp.status == 200, data
    return json.loads(data)


def test_start_delay_refuses_then_listens(spawn: Spawn) -> None:
    began = time.monotonic()
    backend = spawn("--start-delay", "0.8", "--name", "slowpoke", listen=False)
    backend.wait_output("starting slowpoke")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((backend.host, backend.port), timeout=1).close()
    backend.wait_listening(timeout=5)
    assert time.monotonic() - began >= 0.8
    backend.wait_output(f"listening on 127.0.0.1:{backend.port}")


def test_echo_keeps_repeated_headers_and_reuses_the_connection(shared: BackendProcess) -> None:
    conn = connect(shared)
    before = get_json(conn, "/_stats")

    conn.putrequest("POST", "/echo/a/b?x=1&x=2", skip_accept_encoding=True)
    for name, value in [("X-Dup", "one"), ("X-Other", "z"), ("X-Dup", "two")]:
        conn.putheader(name, value)
    conn.putheader("Content-Length", "5")
    conn.endheaders(b"hello")
    resp = conn.getresponse()
    echo = json.loads(resp.read())
    assert echo["method"] == "POST"
    assert echo["path"] == "/echo/a/b?x=1&x=2"
    assert [h for h in echo["headers"] if h[0].startswith("X-")] == [
        ["X-Dup", "one"], ["X-Other", "z"], ["X-Dup", "two"]]
    assert echo["body_len"] == 5
    assert resp.headers.get_all("Set-Cookie") == ["a=1", "b=2"]
    assert resp.headers.get_all("X-Multi") == ["one", "two"]

    conn.request("PUT", "/echo", body=iter([b"chunk-1 ", b"chunk-2"]))  # sent chunked
    echo = json.loads(conn.getresponse().read())
    assert ["Transfer-Encoding", "chunked"] in echo["headers"]
    assert (echo["body"], echo["body_len"]) == ("chunk-1 chunk-2", 15)

    after = get_json(conn, "/_stats")
    assert after["connections"] == before["connections"]  # all on one keep-alive connection
    assert after["requests"] == before["requests"] + 3


def test_stream_arrives_incrementally(shared: BackendProcess) -> None:
    conn = connect(shared)
    conn.request("GET", "/stream?n=3&interval=0.3")
    resp = conn.getresponse()
    assert resp.getheader("Transfer-Encoding") == "chunked"
    assert resp.getheader("Content-Type") == "application/x-ndjson"
    first = json.loads(resp.readline())
    first_seen = time.time()
    rest = [json.loads(line) for line in resp.read().splitlines()]
    assert [tick["i"] for tick in [first, *rest]] == [0, 1, 2]
    assert first_seen < rest[-1]["t"], "first line only arrived after the last was sent"
    assert rest[-1]["t"] - first["t"] >= 0.55


def test_sse_bytes_status_and_errors(shared: BackendProcess) -> None:
    conn = connect(shared)
    resp, data = fetch(conn, "GET", "/sse?n=2&interval=0")
    assert resp.getheader("Content-Type") == "text/event-stream"
    events = [json.loads(e.removeprefix("data: ")) for e in data.decode().split("\n\n") if e]
    assert [e["i"] for e in events] == [0, 1]

    resp, data = fetch(conn, "GET", "/bytes?n=200000")
    assert (resp.getheader("Content-Length"), data) == ("200000", b"x" * 200_000)
    resp, data = fetch(conn, "GET", "/status/204")
    assert (resp.status, data, resp.getheader("Content-Length")) == (204, b"", None)
    resp, data = fetch(conn, "GET", "/status/418")
    assert (resp.status, data) == (418, b"status 418")
    assert get_json(conn, "/slow?seconds=0.05") == {"slept": 0.05}
    assert get_json(conn, "/health") == {"status": "ok", "name": "shared"}
    resp, data = fetch(conn, "GET", "/nope")
    assert resp.status == 404 and json.loads(data)["path"] == "/nope"
    resp, data = fetch(conn, "GET", "/crash")
    assert resp.status == 405 and resp.getheader("Allow") == "POST"


def test_fail_start_exits_with_code_and_stderr(spawn: Spawn) -> None:
    backend = spawn("--fail-start", "7", listen=False)
    assert backend.proc is not None
    assert backend.proc.wait(timeout=5) == 7
    lines = backend.stderr().splitlines()
    assert len(lines) == 3 and "cannot load model weights" in lines[0]
    assert "listening" not in backend.stdout()
    assert not port_open(backend.port)


def test_sigterm_exits_zero(spawn: Spawn) -> None:
    backend = spawn("--name", "termy")
    assert backend.proc is not None
    backend.proc.send_signal(signal.SIGTERM)
    assert backend.proc.wait(timeout=5) == 0
    assert "stopping termy" in backend.stdout()


def test_ignore_sigterm_needs_sigkill(spawn: Spawn) -> None:
    backend = spawn("--ignore-sigterm")
    assert backend.proc is not None
    backend.proc.send_signal(signal.SIGTERM)
    backend.wait_output("ignoring SIGTERM")
    assert backend.proc.poll() is None
    assert get_json(connect(backend), "/health")["status"] == "ok"
    assert backend.stop(timeout=0.3) == -signal.SIGKILL


def test_spawn_child_shares_the_process_group(spawn: Spawn, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    backend = spawn("--spawn-child", str(pidfile))
    assert backend.proc is not None
    assert wait_for(pidfile.exists, timeout=5)
    child = int(pidfile.read_text())
    assert pid_alive(child)
    backend.proc.send_signal(signal.SIGTERM)  # leader only: the grandchild is orphaned
    assert backend.proc.wait(timeout=5) == 0
    assert pid_alive(child)
    backend.stop()  # kills the group, as the gateway must
    assert wait_for(lambda: not pid_alive(child), timeout=5)


def test_exit_after_and_crash(spawn: Spawn) -> None:
    dying, crashing = spawn("--exit-after", "0.2"), spawn()
    assert dying.proc is not None and crashing.proc is not None
    assert dying.proc.wait(timeout=5) == 4
    with pytest.raises(http.client.RemoteDisconnected):
        fetch(connect(crashing), "POST", "/crash")
    assert crashing.proc.wait(timeout=5) == 3


def test_request_log_records_each_request(spawn: Spawn, tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    backend = spawn("--request-log", str(log))
    assert log.read_text() == ""  # the wait_listening probe sent no request
    conn = connect(backend)
    conn.request("GET", "/health?probe=1", headers={"X-Probe": "yes"})
    conn.getresponse().read()
    [entry] = [json.loads(line) for line in log.read_text().splitlines()]
    assert (entry["method"], entry["path"]) == ("GET", "/health?probe=1")
    assert ["X-Probe", "yes"] in entry["headers"]


def test_ollama_client(shared: BackendProcess) -> None:
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=shared.url)
    assert [m.model for m in client.list().models] == ["llama3:8b", "tiny:1b"]

    messages = [{"role": "user", "content": "hi"}]
    parts = list(client.chat(model="llama3:8b", messages=messages, stream=True))
    assert len(parts) > 2
    assert "".join(p.message.content for p in parts) == "hello from shared"
    assert parts[-1].done and parts[-1].done_reason == "stop"
    assert client.chat(model="llama3:8b", messages=messages).message.content == "hello from shared"
    assert client.generate(model="tiny:1b", prompt="hey").response == "hello from shared"
    embeddings = client.embed(model="tiny:1b", input=["a", "b"]).embeddings
    assert len(embeddings) == 2 and embeddings[0] != embeddings[1]

    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="missing", messages=messages)
    assert err.value.status_code == 404 and err.value.error == "model 'missing' not found"


def test_openai_client(shared: BackendProcess) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{shared.url}/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list()] == ["llama3:8b", "tiny:1b"]

    messages = [{"role": "user", "content": "hi"}]
    chunks = list(client.chat.completions.create(model="tiny:1b", messages=messages, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "hello from shared"
    assert chunks[-1].choices[0].finish_reason == "stop"
    reply = client.chat.completions.create(model="tiny:1b", messages=messages)
    assert reply.choices[0].message.content == "hello from shared"

    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="missing", messages=messages)
    assert err.value.code == "model_not_found"


def test_anthropic_client(shared: BackendProcess) -> None:
    anthropic = pytest.importorskip("anthropic")
    # Its own HTTP client class (the SDK rejects an httpx one), without the environment's proxies.
    client = anthropic.Anthropic(base_url=shared.url, api_key="x", max_retries=0,
                                 http_client=anthropic.DefaultHttpxClient(trust_env=False))
    messages = [{"role": "user", "content": "hi"}]
    reply = client.messages.create(model="tiny:1b", max_tokens=16, messages=messages)
    assert reply.type == "message" and reply.stop_reason == "end_turn"
    assert "".join(block.text for block in reply.content) == "hello from shared"

    events = list(client.messages.create(model="llama3:8b", max_tokens=16, messages=messages, stream=True))
    assert [e.type for e in events][:2] == ["message_start", "content_block_start"]
    assert events[-1].type == "message_stop"
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == "hello from shared"
    with client.messages.stream(model="tiny:1b", max_tokens=16, messages=messages) as stream:
        assert "".join(stream.text_stream) == "hello from shared"
        assert stream.get_final_message().model == "tiny:1b"

    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="missing", max_tokens=16, messages=messages)
    assert err.value.status_code == 404 and err.value.body["error"]["type"] == "not_found_error"
