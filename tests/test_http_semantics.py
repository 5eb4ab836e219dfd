"""
HTTP/1.1 message framing through a real Hestia, as RFC 9112 (and RFC 9110) say.

A proxy that gets framing wrong does not fail loudly: it leaves a stray body
on a keep-alive connection, or cuts a body short, and the *next* request on
that connection is the one that breaks.  So these tests speak raw HTTP over
one socket, read each response exactly as its framing says (RFC 9112 section
6.3), and then send another request on the same connection to show that
nothing was left over.

Covered: HEAD (no body, Content-Length kept), 204 and 304 (no body, no
chunking), HTTP/1.0 clients (no chunked coding; close or keep-alive as asked),
chunked responses of unknown length (streamed, not buffered), and
C{Expect: 100-continue} uploads (the client gets 100 Continue before it sends
the body; the backend gets the body and no C{Expect}), and form uploads passed
through unparsed.  Large bodies and slow readers are in C{test_large_bodies.py}.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.backendproc import free_port
from support.hestiaproc import HestiaProcess, backend_command

pytestmark = pytest.mark.integration

TIMEOUT = 10.0


@dataclass
class Response:
    """One response as read off the wire."""

    version: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    # When each body piece arrived (chunked bodies): (time, chunk).
    pieces: list[tuple[float, bytes]] = field(default_factory=list)

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def tokens(self, name: str) -> set[str]:
        return {token.strip().lower() for value in self.values(name) for token in value.split(",") if token.strip()}


class Connection:
    """A client connection that reads responses by RFC 9112's framing rules, nothing more."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self._buffer = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, target: str, version: str = "HTTP/1.1", headers: dict[str, str] | None = None,
                body: bytes = b"") -> Response:
        head = f"{method} {target} {version}\r\nHost: gw.test\r\n"
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        self.send(head.encode("latin-1") + b"\r\n" + body)
        return self.response(method)

    # -- reading ---------------------------------------------------------------

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self._buffer += data
        return bool(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            if not self._fill():
                raise ConnectionError("connection closed in the middle of a line")
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line

    def _exactly(self, count: int) -> bytes:
        while len(self._buffer) < count:
            if not self._fill():
                raise ConnectionError(f"connection closed with {count - len(self._buffer)} body bytes missing")
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    def head(self) -> Response:
        version, status, *_ = self._line().decode("latin-1").split(" ", 2)
        headers = []
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        return Response(version, int(status), headers)

    def response(self, method: str = "GET") -> Response:
        """The next final response (1xx interim responses are skipped), body read by its framing."""
        response = self.head()
        while 100 <= response.status < 200 and response.status != 101:
            response = self.head()
        # RFC 9112 section 6.3, in order.
        if method == "HEAD" or response.status in (204, 304):
            return response
        if "chunked" in response.tokens("transfer-encoding"):
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line():  # trailer section
                        pass
                    return response
                piece = self._exactly(size)
                response.pieces.append((time.monotonic(), piece))
                response.body += piece
                assert self._line() == b"", "chunk data not followed by CRLF"
        lengths = response.values("content-length")
        if lengths:
            assert len(set(lengths)) == 1, f"conflicting Content-Length: {lengths}"
            response.body = self._exactly(int(lengths[0]))
            return response
        # Neither: the body runs to the end of the connection.
        while self._fill():
            pass
        response.body, self._buffer = self._buffer, b""
        return response

    def closed_by_peer(self) -> bool:
        """Whether the server closed the connection (after what was read), without waiting long."""
        if self._buffer:
            return False
        self.sock.settimeout(TIMEOUT)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


@dataclass
class Gateway:
    gw: HestiaProcess
    request_log: Path

    def connect(self) -> Connection:
        return Connection(self.gw.port)

    def backend_requests(self, path: str) -> list[dict[str, Any]]:
        lines = self.request_log.read_text().splitlines() if self.request_log.exists() else []
        return [entry for entry in map(json.loads, lines) if entry.get("path", "").startswith(path)]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("http-semantics")
    port = free_port()
    request_log = tmp / "requests.log"
    # A process service (so Hestia starts and reaps the backend), kept up for the whole module.
    command = backend_command(port, "--name", "semantics", request_log=request_log)
    gw = HestiaProcess({"services": {"b": {"url": f"http://127.0.0.1:{port}", "command": command,
                                           "health": {"path": "/health"}, "idle_timeout": 0}}},
                       tmp / "hestia")
    gw.start()
    try:
        conn = Connection(gw.port)
        assert conn.request("GET", "/services/b/health").status == 200  # the cold start
        conn.close()
        yield Gateway(gw, request_log)
    finally:
        gw.stop()


def still_usable(conn: Connection) -> None:
    """Another request on the same connection is answered whole: nothing was left over."""
    response = conn.request("GET", "/services/b/health")
    assert response.status == 200, response
    assert json.loads(response.body) == {"status": "ok", "name": "semantics"}


# -- HEAD ---------------------------------------------------------------------------


def test_head_has_no_body_and_keeps_content_length(gateway: Gateway) -> None:
    conn = gateway.connect()
    try:
        response = conn.request("HEAD", "/services/b/bytes?n=123457")
        assert response.status == 200
        # The length of the body a GET would get (RFC 9110 section 9.3.2), not 0.
        assert response.values("content-length") == ["123457"]
        assert response.values("transfer-encoding") == []
        still_usable(conn)  # a body sent after the HEAD would be read as this response
    finally:
        conn.close()
    assert gateway.backend_requests("/bytes")[-1]["method"] == "HEAD"


def test_head_of_a_chunked_resource_has_no_body(gateway: Gateway) -> None:
    conn = gateway.connect()
    try:
        response = conn.request("HEAD", "/services/b/stream?n=3&interval=0")
        assert response.status == 200
        assert response.values("content-length") == []
        still_usable(conn)
    finally:
        conn.close()


# -- 204 and 304 --------------------------------------------------------------------


@pytest.mark.parametrize("code", [204, 304])
def test_no_content_and_not_modified_have_no_body(gateway: Gateway, code: int) -> None:
    conn = gateway.connect()
    try:
        response = conn.request("GET", f"/services/b/status/{code}")
        assert response.status == code
        assert response.values("transfer-encoding") == []  # no chunked coding: there is no body
        if code == 204:
            assert response.values("content-length") in ([], ["0"])
        still_usable(conn)
    finally:
        conn.close()


# -- HTTP/1.0 clients ---------------------------------------------------------------


def test_http10_client_gets_no_chunking_and_the_connection_closes(gateway: Gateway) -> None:
    conn = gateway.connect()
    try:
        response = conn.request("GET", "/services/b/stream?n=4&interval=0", version="HTTP/1.0")
        assert response.status == 200
        assert response.version in ("HTTP/1.0", "HTTP/1.1")
        # An HTTP/1.0 client cannot take the chunked coding (RFC 9112 section 6.1)...
        assert response.values("transfer-encoding") == []
        # ...so a body of unknown length ends with the connection.
        ticks = [json.loads(line) for line in response.body.splitlines()]
        assert [tick["i"] for tick in ticks] == [0, 1, 2, 3]
        assert conn.closed_by_peer()
    finally:
        conn.close()


def test_http10_client_without_keep_alive_is_closed_after_a_sized_response(gateway: Gateway) -> None:
    conn = gateway.connect()
    try:
        response = conn.request("GET", "/services/b/bytes?n=1000", version="HTTP/1.0")
        assert response.status == 200
        assert response.values("content-length") == ["1000"] and response.body == b"x" * 1000
        assert conn.closed_by_peer()  # HTTP/1.0 without keep-alive: one request per connection
    finally:
        conn.close()


def test_http10_keep_alive_is_honoured_only_when_the_response_says_so(gateway: Gateway) -> None:
    """
    HTTP/1.0 keep-alive is optional for a server (RFC 9112 section 9.3): what
    matters is that the response tells the truth.  Hestia (Twisted's channel)
    closes HTTP/1.0 connections, so it must not echo C{keep-alive}; were it to
    echo it, the connection would have to carry the next request.
    """
    conn = gateway.connect()
    try:
        response = conn.request("GET", "/services/b/bytes?n=1000", version="HTTP/1.0",
                                headers={"Connection": "keep-alive"})
        assert response.status == 200
        assert response.values("transfer-encoding") == []
        assert response.values("content-length") == ["1000"] and response.body == b"x" * 1000
        if "keep-alive" in response.tokens("connection"):
            second = conn.request("GET", "/services/b/bytes?n=10", version="HTTP/1.0",
                                  headers={"Connection": "keep-alive"})
            assert second.status == 200 and second.body == b"x" * 10
        else:
            assert conn.closed_by_peer()
    finally:
        conn.close()


# -- chunked responses of unknown length -----------------------------------------------


def test_a_response_of_unknown_length_is_chunked_and_streamed(gateway: Gateway) -> None:
    conn = gateway.connect()
    try:
        response = conn.request("GET", "/services/b/stream?n=4&interval=0.25")
        assert response.status == 200
        assert "chunked" in response.tokens("transfer-encoding")
        assert response.values("content-length") == []
        ticks = [json.loads(line) for line in response.body.splitlines()]
        assert [tick["i"] for tick in ticks] == [0, 1, 2, 3]
        # Streamed as the backend wrote it: the first tick was relayed before
        # the backend had written the last one (wall clock: same machine).
        first_arrival = response.pieces[0][0] - time.monotonic() + time.time()
        assert first_arrival < ticks[-1]["t"], "the body was buffered, not streamed"
        still_usable(conn)
    finally:
        conn.close()


# -- Expect: 100-continue ---------------------------------------------------------------


def test_expect_100_continue_upload(gateway: Gateway) -> None:
    body = b"0123456789" * 10_000
    conn = gateway.connect()
    try:
        conn.send(
            b"POST /services/b/echo/upload HTTP/1.1\r\nHost: gw.test\r\nContent-Type: application/octet-stream\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        # The client waits for 100 Continue before it sends the body (RFC 9110 section 10.1.1).
        interim = conn.head()
        assert interim.status == 100, interim
        conn.send(body)
        response = conn.response("POST")
        assert response.status == 200
        echoed = json.loads(response.body)
        assert echoed["method"] == "POST" and echoed["body_len"] == len(body)
        # The gateway answered the expectation itself; the backend got the body, not the Expect.
        assert "expect" not in {name.lower() for name, _ in echoed["headers"]}
        still_usable(conn)
    finally:
        conn.close()
    received = gateway.backend_requests("/echo/upload")
    assert len(received) == 1
    assert "expect" not in {name.lower() for name, _ in received[0]["headers"]}


# -- form bodies are forwarded, not parsed ----------------------------------------------


def test_a_form_upload_reaches_the_backend_unparsed(gateway: Gateway) -> None:
    """
    Twisted's Site parses form POSTs by default, reading a multipart body whole
    into memory and answering 400 itself to one it cannot parse.  A proxy must
    pass the body through, whatever it holds, and let the backend judge it.
    """
    body = b"--b\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\nnot closed properly"
    conn = gateway.connect()
    try:
        response = conn.request("POST", "/services/b/echo/form", headers={
            # No boundary parameter: Twisted's own form parser would refuse it with a 400.
            "Content-Type": "multipart/form-data", "Content-Length": str(len(body))}, body=body)
        assert response.status == 200, response
        echoed = json.loads(response.body)
        assert echoed["body_len"] == len(body) and echoed["body"] == body.decode()
        still_usable(conn)
    finally:
        conn.close()
