"""A scriptable stand-in for the local services Hestia fronts (``ollama serve`` & co).

Hestia's tests run this file as a *real* subprocess on loopback, because the
things the gateway must get right -- spawning, readiness polling, streaming,
keep-alive, repeated headers, signals, process groups -- only show up with a
real process and a real socket.  Standard library only (Python 3.11+), so it starts in
about 0.1 s and never depends on the code under test.

Usage: python tests/support/backend.py --port PORT [options]   (see ``--help``)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partialmethod
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

JSON = dict[str, Any]
PIECE = 64 * 1024  # write size for /bytes, so big bodies cross the proxy in many reads
CREATED = 1_700_000_000  # fixed "created" stamp keeps answers reproducible
OLLAMA_VERSION = "0.6.3"
GET, POST, ANY = frozenset({"GET", "HEAD"}), frozenset({"POST"}), None

# (path, allowed methods, handler method); a path ending in "/" matches as a prefix
ROUTES: tuple[tuple[str, frozenset[str] | None, str], ...] = (
    ("/health", GET, "health"),
    ("/echo", ANY, "echo"),
    ("/echo/", ANY, "echo"),
    ("/stream", GET, "stream"),
    ("/sse", GET, "sse"),
    ("/bytes", GET, "bytes_"),
    ("/slow", GET, "slow"),
    ("/status/", GET, "status"),
    ("/crash", POST, "crash"),
    ("/sink", ANY, "sink"),
    ("/_stats", GET, "stats"),
    ("/api/tags", GET, "ollama_tags"),
    ("/api/version", GET, "ollama_version"),
    ("/api/chat", POST, "ollama_chat"),
    ("/api/generate", POST, "ollama_generate"),
    ("/api/embed", POST, "ollama_embed"),
    ("/v1/models", GET, "openai_models"),
    ("/v1/chat/completions", POST, "openai_chat"),
    ("/v1/messages", POST, "anthropic_messages"),
)


@dataclass(frozen=True)
class Config:
    """Everything the command line controls; frozen because handler threads share it."""

    port: int
    host: str
    name: str
    models: tuple[str, ...]
    start_delay: float
    fail_start: int | None
    ignore_sigterm: bool
    spawn_child: str | None
    request_log: str | None
    exit_after: float | None
    token_interval: float
    verbose: bool


def parse_args(argv: list[str] | None = None) -> Config:
    """Parse the command line; each option simulates one real-world service behaviour."""
    p = argparse.ArgumentParser(description="Test HTTP backend for Hestia.")
    add = p.add_argument
    add("--port", type=int, required=True, help="0 picks a free port")
    add("--host", default="127.0.0.1")
    add("--name", default="backend", help="shown in /health and in LLM replies")
    add("--models", default="llama3:8b", help="comma-separated model names")
    add("--start-delay", type=float, default=0.0, metavar="SECONDS",
        help="sleep before binding, like a service loading weights")
    add("--fail-start", type=int, metavar="EXITCODE",
        help="write an error to stderr and exit without listening")
    add("--ignore-sigterm", action="store_true",
        help="survive SIGTERM, so callers must escalate to SIGKILL")
    add("--spawn-child", metavar="PIDFILE",
        help="start a long-sleeping grandchild and write its pid here")
    add("--request-log", metavar="FILE", help="append one JSON line per request")
    add("--exit-after", type=float, metavar="SECONDS",
        help="exit(4) this long after listening: a service dying while serving")
    add("--token-interval", type=float, default=0.0, metavar="SECONDS",
        help="pause between streamed LLM tokens")
    add("--verbose", action="store_true", help="log each request to stderr")
    args = vars(p.parse_args(argv))
    args["models"] = tuple(m.strip() for m in args["models"].split(",") if m.strip())
    return Config(**args)


def say(line: str, fd: int = 1) -> None:
    """Write a line straight to fd 1/2: unbuffered (callers read pipes), signal-handler safe."""
    os.write(fd, (line + "\n").encode())


def iso_now() -> str:
    """Ollama-style ``created_at`` timestamp."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def fake_embedding(text: str, dims: int = 8) -> list[float]:
    """A deterministic vector, so equal inputs give equal embeddings across calls."""
    return [round(b / 255 - 0.5, 6) for b in hashlib.sha256(text.encode()).digest()[:dims]]


def paced(items: Iterable[Any], interval: float) -> Iterator[Any]:
    """Yield items with a pause between them (not before the first): a slow producer."""
    for i, item in enumerate(items):
        if i and interval > 0:
            time.sleep(interval)
        yield item


def ndjson(obj: JSON) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def sse(obj: JSON) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def openai_error(message: str, code: str | None) -> JSON:
    return {"error": {"message": message, "type": "invalid_request_error",
                      "param": "model", "code": code}}


def anthropic_error(kind: str, message: str) -> JSON:
    return {"type": "error", "error": {"type": kind, "message": message}}


def sse_event(obj: JSON) -> bytes:
    """An Anthropic stream event: named by its type, in the event: line too."""
    return f"event: {obj['type']}\n".encode() + sse(obj)


class HTTPError(Exception):
    """Raised by handlers *before* any header is sent; turned into a JSON error reply."""

    def __init__(self, status: int, body: JSON, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, list(headers)


class BackendServer(ThreadingHTTPServer):
    """Threaded so a slow or streaming request never blocks /health or /_stats."""

    allow_reuse_address = True  # restart on the same port right after a kill
    daemon_threads = True  # never wait for lingering keep-alive connections on exit
    request_queue_size = 128

    def __init__(self, config: Config) -> None:
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        self.config = config
        self.lock = threading.Lock()
        self.requests = self.connections = 0
        self.log = None
        if config.request_log:
            self.log = open(config.request_log, "a", encoding="utf-8")  # noqa: SIM115
        super().__init__((config.host, config.port), Handler)

    def server_bind(self) -> None:
        """Skip HTTPServer's getfqdn() reverse lookup, which can stall startup for seconds."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def get_request(self) -> tuple[socket.socket, Any]:
        """Count accepted TCP connections so tests can prove a proxy reuses them."""
        conn = super().get_request()
        with self.lock:
            self.connections += 1
        return conn

    def record(self, method: str, path: str, headers: list[list[str]]) -> None:
        """Count and log a request before its body is read: 'received nothing?' must be exact."""
        with self.lock:
            self.requests += 1
            if self.log is not None:
                entry = {"method": method, "path": path, "headers": headers}
                self.log.write(json.dumps(entry) + "\n")
                self.log.flush()


class Handler(BaseHTTPRequestHandler):
    """One instance per connection; HTTP/1.1 so clients and proxies can keep it alive."""

    protocol_version = "HTTP/1.1"
    server_version = "hestia-test-backend/1"
    # Headers and body go out in separate writes: with Nagle on, the body waits for
    # the client's delayed ACK (~40 ms) on every keep-alive request. Real servers
    # (Go's net/http, uvicorn...) set TCP_NODELAY too.
    disable_nagle_algorithm = True
    server: BackendServer
    body: bytes  # the request body, read in full before routing
    query: dict[str, list[str]]  # parsed query string of the current request

    # -- plumbing -----------------------------------------------------------

    def __getattr__(self, name: str) -> Callable[[], None]:
        """Route every method (PROPFIND, PURGE...) through _dispatch, not only GET/POST."""
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    @property
    def cfg(self) -> Config:
        return self.server.config

    def log_message(self, format: str, *args: Any) -> None:
        if self.cfg.verbose:
            super().log_message(format, *args)

    def _dispatch(self) -> None:
        target = urlsplit(self.path)
        self.server.record(self.command, self.path, [[k, v] for k, v in self.headers.items()])
        try:
            self.query = parse_qs(target.query)
            # /sink reads its (possibly huge) body itself, in pieces.
            self.body = b"" if target.path == "/sink" else self._read_body()
            getattr(self, self._lookup(target.path))()
        except HTTPError as exc:
            self._json(exc.body, exc.status, exc.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # client left mid-stream: normal in proxy tests

    def _lookup(self, path: str) -> str:
        for prefix, methods, handler in ROUTES:
            if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
                if methods is not None and self.command not in methods:
                    allow = [("Allow", ", ".join(sorted(methods)))]
                    raise HTTPError(405, {"error": f"method {self.command} not allowed"}, allow)
                return handler
        raise HTTPError(404, {"error": "not found", "path": path})

    def sink(self) -> None:
        """Read a Content-Length body in 1 MiB pieces; answer its size and SHA-256."""
        remaining = int(self.headers.get("Content-Length", "0") or "0")
        digest = hashlib.sha256()
        received = 0
        while remaining > 0:
            piece = self.rfile.read(min(remaining, 1 << 20))
            if not piece:
                break
            digest.update(piece)
            received += len(piece)
            remaining -= len(piece)
        self._json({"body_len": received, "body_sha256": digest.hexdigest()})

    def _read_body(self) -> bytes:
        """Consume the body (Content-Length or chunked) so keep-alive framing stays intact."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = self.headers.get("Content-Length", "0").strip() or "0"
        if not length.isdigit():
            self.close_connection = True
            raise HTTPError(400, {"error": "bad Content-Length"})
        return self.rfile.read(int(length))

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            line = self.rfile.readline(1024).split(b";")[0].strip()
            try:
                size = int(line, 16)
            except ValueError:
                self.close_connection = True
                raise HTTPError(400, {"error": "bad chunk size"}) from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # skip trailers
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline(8)  # the CRLF after the chunk data

    def _send(self, status: int, body: bytes, ctype: str,
              headers: Iterable[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        has_body = status not in (204, 304)  # these must carry neither body nor length
        if has_body:
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if has_body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def _stream(self, ctype: str, pieces: Iterable[bytes]) -> None:
        """Send each piece as its own chunk, at once: a proxy that buffers will show it.

        HTTP/1.0 clients (e.g. twisted.web.proxy) cannot take chunked encoding, so they
        get the raw bytes and the end of the body is marked by closing the connection.
        """
        chunked = self.request_version == "HTTP/1.1"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Cache-Control", "no-cache")
        self.send_header(*(("Transfer-Encoding", "chunked") if chunked else ("Connection", "close")))
        self.end_headers()
        if self.command == "HEAD":
            return
        for piece in pieces:
            if piece:  # an empty chunk would end the body early
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _num(self, name: str, default: float) -> float:
        raw = self.query.get(name, [str(default)])[-1]
        try:
            value = float(raw)
        except ValueError:
            raise HTTPError(400, {"error": f"bad {name}: {raw!r}"}) from None
        if value < 0:
            raise HTTPError(400, {"error": f"{name} must be >= 0"})
        return value

    def _json_body(self) -> JSON:
        try:
            data = json.loads(self.body or b"{}")
        except ValueError as exc:
            raise HTTPError(400, {"error": f"invalid JSON body: {exc}"}) from None
        if not isinstance(data, dict):
            raise HTTPError(400, {"error": "JSON body must be an object"})
        return data

    def _known(self, model: str) -> bool:
        return model in self.cfg.models or f"{model}:latest" in self.cfg.models

    def _words(self) -> list[str]:
        """The canned LLM answer, split like tokens so that concatenation restores it."""
        return re.findall(r"\s*\S+", f"hello from {self.cfg.name}")

    # -- generic endpoints --------------------------------------------------

    def health(self) -> None:
        self._json({"status": "ok", "name": self.cfg.name})

    def echo(self) -> None:
        """Mirror the request exactly, plus repeated response headers a proxy must not merge."""
        self._json(
            {"method": self.command, "path": self.path,
             "headers": [[k, v] for k, v in self.headers.items()],
             "body": self.body.decode("utf-8", errors="replace"),
             "body_len": len(self.body), "body_sha256": hashlib.sha256(self.body).hexdigest()},
            headers=[("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
                     ("X-Multi", "one"), ("X-Multi", "two")],
        )

    def _ticks(self, encode: Callable[[JSON], bytes]) -> Iterator[bytes]:
        """Parse ?n=&interval= now (errors must precede headers); stamp each tick when sent."""
        n, interval = int(self._num("n", 5)), self._num("interval", 0.1)
        return (encode({"i": i, "t": time.time()}) for i in paced(range(n), interval))

    def stream(self) -> None:
        self._stream("application/x-ndjson", self._ticks(ndjson))

    def sse(self) -> None:
        self._stream("text/event-stream", self._ticks(sse))

    def bytes_(self) -> None:
        n = int(self._num("n", 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        block = b"x" * PIECE
        for start in range(0, n if self.command != "HEAD" else 0, PIECE):
            self.wfile.write(block[: n - start])

    def slow(self) -> None:
        seconds = self._num("seconds", 1.0)
        time.sleep(seconds)
        self._json({"slept": seconds})

    def status(self) -> None:
        code = urlsplit(self.path).path.removeprefix("/status/")
        if not code.isdigit() or int(code) not in range(200, 600):
            raise HTTPError(400, {"error": f"bad status {code!r}"})
        self._send(int(code), f"status {code}".encode(), "text/plain; charset=utf-8")

    def crash(self) -> None:
        say(f"crashing {self.cfg.name}", 2)
        os._exit(3)

    def stats(self) -> None:
        with self.server.lock:  # snapshot, then write outside the lock
            counts = {"requests": self.server.requests, "connections": self.server.connections}
        self._json(counts)

    # -- Ollama API (shapes checked against ollama-python's _types.py) -------

    def _ollama_model(self, data: JSON) -> str:
        model = data.get("model")
        if not model or not isinstance(model, str):
            raise HTTPError(400, {"error": "model is required"})
        if not self._known(model):
            raise HTTPError(404, {"error": f"model '{model}' not found"})
        return model

    def ollama_tags(self) -> None:
        details = {"parent_model": "", "format": "gguf", "family": "llama",
                   "families": ["llama"], "parameter_size": "8.0B", "quantization_level": "Q4_0"}
        self._json({"models": [
            {"name": m, "model": m, "modified_at": "2024-05-01T12:00:00Z", "size": 4_661_224_676,
             "digest": hashlib.sha256(m.encode()).hexdigest(), "details": details}
            for m in self.cfg.models
        ]})

    def ollama_version(self) -> None:
        self._json({"version": OLLAMA_VERSION})

    def _ollama_reply(self, field: str) -> None:
        """Chat and generate differ only in where the text goes ("message" or "response")."""
        data = self._json_body()
        model = self._ollama_model(data)
        words, reason = self._words(), "stop"
        if field == "response" and not data.get("prompt"):
            words, reason = [], "load"  # empty prompt = "just load the model", as Ollama does

        def part(text: str, done: bool) -> JSON:
            out: JSON = {"model": model, "created_at": iso_now()}
            out[field] = {"role": "assistant", "content": text} if field == "message" else text
            out["done"] = done
            if done:
                out |= {"done_reason": reason, "total_duration": 1_000_000,
                        "load_duration": 100_000, "prompt_eval_count": 3,
                        "prompt_eval_duration": 200_000, "eval_count": len(words),
                        "eval_duration": 700_000}
                if field == "response":
                    out["context"] = [1, 2, 3]
            return out

        def parts() -> Iterator[bytes]:
            for word in paced(words, self.cfg.token_interval):
                yield ndjson(part(word, False))
            yield ndjson(part("", True))

        if data.get("stream", True):  # Ollama streams unless told not to
            self._stream("application/x-ndjson", parts())
        else:
            self._json(part("".join(words), True))

    ollama_chat = partialmethod(_ollama_reply, "message")
    ollama_generate = partialmethod(_ollama_reply, "response")

    def ollama_embed(self) -> None:
        data = self._json_body()
        model = self._ollama_model(data)
        inputs = data.get("input", "")
        texts = [inputs] if isinstance(inputs, str) else [str(t) for t in inputs]
        self._json({"model": model, "embeddings": [fake_embedding(t) for t in texts],
                    "total_duration": 1_000_000, "load_duration": 100_000,
                    "prompt_eval_count": len(texts)})

    # -- OpenAI API (shapes checked against openai-python's types/chat) -----

    def openai_models(self) -> None:
        self._json({"object": "list", "data": [
            {"id": m, "object": "model", "created": CREATED, "owned_by": self.cfg.name}
            for m in self.cfg.models
        ]})

    def openai_chat(self) -> None:
        data = self._json_body()
        model = data.get("model")
        if not model or not isinstance(model, str):
            raise HTTPError(400, openai_error("you must provide a model parameter", None))
        if not self._known(model):
            raise HTTPError(404, openai_error(f"The model '{model}' does not exist",
                                              "model_not_found"))
        words = self._words()
        usage = {"prompt_tokens": 3, "completion_tokens": len(words),
                 "total_tokens": 3 + len(words)}
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": model}
        if not data.get("stream"):
            message = {"role": "assistant", "content": "".join(words), "refusal": None}
            choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
            self._json(head | {"object": "chat.completion", "choices": [choice], "usage": usage})
            return

        def chunk(choices: list[JSON], **extra: Any) -> bytes:
            return sse(head | {"object": "chat.completion.chunk", "choices": choices} | extra)

        def events() -> Iterator[bytes]:
            deltas = [{"role": "assistant", "content": ""}] + [{"content": w} for w in words]
            for delta in paced(deltas, self.cfg.token_interval):
                yield chunk([{"index": 0, "delta": delta, "finish_reason": None}])
            yield chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
            if (data.get("stream_options") or {}).get("include_usage"):
                yield chunk([], usage=usage)
            yield b"data: [DONE]\n\n"

        self._stream("text/event-stream", events())


    # -- Anthropic Messages API (shapes checked against anthropic-python's types) --

    def anthropic_messages(self) -> None:
        data = self._json_body()
        model = data.get("model")
        if not model or not isinstance(model, str):
            raise HTTPError(400, anthropic_error("invalid_request_error", "model: Field required"))
        if not self._known(model):
            raise HTTPError(404, anthropic_error("not_found_error", f"model: {model}"))
        if not isinstance(data.get("max_tokens"), int):
            raise HTTPError(400, anthropic_error("invalid_request_error", "max_tokens: Field required"))
        words = self._words()
        message: JSON = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
                         "model": model, "content": [], "stop_reason": None, "stop_sequence": None,
                         "usage": {"input_tokens": 3, "output_tokens": 0}}
        if not data.get("stream"):
            self._json(message | {"content": [{"type": "text", "text": "".join(words)}],
                                  "stop_reason": "end_turn",
                                  "usage": {"input_tokens": 3, "output_tokens": len(words)}})
            return

        def events() -> Iterator[bytes]:
            yield sse_event({"type": "message_start", "message": message})
            yield sse_event({"type": "content_block_start", "index": 0,
                             "content_block": {"type": "text", "text": ""}})
            yield sse_event({"type": "ping"})
            for word in paced(words, self.cfg.token_interval):
                yield sse_event({"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": word}})
            yield sse_event({"type": "content_block_stop", "index": 0})
            yield sse_event({"type": "message_delta",
                             "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                             "usage": {"output_tokens": len(words)}})
            yield sse_event({"type": "message_stop"})

        self._stream("text/event-stream", events())


# -- process life cycle ------------------------------------------------------


def install_signal_handlers(cfg: Config) -> None:
    """SIGTERM exits 0 at once like a well-behaved service; --ignore-sigterm makes a stubborn one.

    Ignoring uses a Python handler, not SIG_IGN, which exec() would pass on: the
    grandchild must still die from a SIGTERM sent to the whole process group.
    """

    def on_term(signum: int, _frame: object) -> None:
        if signum == signal.SIGTERM and cfg.ignore_sigterm:
            say(f"ignoring SIGTERM ({cfg.name})")
            return
        say(f"stopping {cfg.name}")
        os._exit(0)  # nothing to clean up, and busy daemon threads must not delay the exit

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)


def spawn_grandchild(pidfile: str) -> None:
    """Leave a long-lived process in our group, to catch gateways that only kill the leader.

    Its stdio is /dev/null so that it cannot hold the gateway's output pipes open.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(3600)"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    with open(f"{pidfile}.tmp", "w", encoding="ascii") as f:
        f.write(f"{child.pid}\n")
    os.replace(f"{pidfile}.tmp", pidfile)  # atomic: a polling test never sees half a pid


def exit_later(seconds: float) -> None:
    """Die with status 4 after `seconds`, mid-service, as a crashing backend would."""

    def die() -> None:
        say(f"exiting: --exit-after {seconds}", 2)
        os._exit(4)

    timer = threading.Timer(seconds, die)
    timer.daemon = True
    timer.start()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    install_signal_handlers(cfg)
    say(f"starting {cfg.name}")
    if cfg.spawn_child:
        spawn_grandchild(cfg.spawn_child)
    if cfg.start_delay > 0:
        time.sleep(cfg.start_delay)
    if cfg.fail_start is not None:  # after the delay: "loads for a while, then dies"
        say("error: cannot load model weights", 2)
        say(f"error: {cfg.name} failed to initialise (simulated by --fail-start)", 2)
        say(f"error: exiting with status {cfg.fail_start}", 2)
        return cfg.fail_start
    try:
        server = BackendServer(cfg)
    except OSError as exc:
        say(f"error: cannot listen on {cfg.host}:{cfg.port}: {exc}", 2)
        return 1
    say(f"listening on {server.server_name}:{server.server_port}")
    if cfg.exit_after is not None:
        exit_later(cfg.exit_after)
    server.serve_forever(poll_interval=0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
