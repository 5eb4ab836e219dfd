"""
Issue 2, "Proxy behaviour": what crosses a real Hestia, byte for byte.

One real ``twistd -n hestia`` serves the whole module; its ``echo`` service is a
real ``tests/support/backend.py`` that Hestia itself starts (cold, on the first request)
and never idle-stops, so the tests see exactly what a backend receives and what
a client gets back.  Raw sockets are used wherever a client library would
normalise what is being checked (paths, hop-by-hop headers).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.backendproc import free_port, port_open
from support.hestiaproc import BackendSpec, HestiaProcess, raw_request, stop_cleanly

pytestmark = pytest.mark.integration


class RawUpstream:
    """
    A fixed HTTP/1.1 answer on loopback, for what tests/support/backend.py cannot send.

    Used as a C{static} service to show which response headers Hestia drops.
    """

    RESPONSE = (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/plain\r\n"
        b"Content-Length: 2\r\n"
        b"Connection: keep-alive, X-Hop-Secret\r\n"
        b"X-Hop-Secret: must-not-cross\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Authenticate: Basic realm=x\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Upgrade: foo/1\r\n"
        b"Set-Cookie: a=1\r\n"
        b"Set-Cookie: b=2\r\n"
        b"X-End-To-End: kept\r\n"
        b"\r\n"
        b"ok"
    )

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            buffered = b""
            try:
                while data := conn.recv(65536):
                    buffered += data
                    while b"\r\n\r\n" in buffered:
                        _, _, buffered = buffered.partition(b"\r\n\r\n")
                        conn.sendall(self.RESPONSE)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


class Gateway:
    def __init__(self, hestia: HestiaProcess, echo: BackendSpec, raw: RawUpstream, dead_port: int) -> None:
        self.hestia = hestia
        self.echo = echo
        self.raw = raw
        self.dead_port = dead_port
        self.http = httpx.Client(base_url=hestia.url, trust_env=False, timeout=10.0)

    @property
    def port(self) -> int:
        return self.hestia.port

    def echoed(self, response: httpx.Response | Any) -> dict[str, Any]:
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("proxy")
    echo = BackendSpec("echo", tmp)
    raw = RawUpstream()
    dead_port = free_port()
    config = {
        "defaults": {"idle_timeout": 0},
        "services": {
            "echo": echo.service(),
            "raw": {"url": f"http://127.0.0.1:{raw.port}"},
            "down": {"url": f"http://127.0.0.1:{dead_port}"},
        },
    }
    hestia = HestiaProcess(config, tmp / "hestia").start()
    gateway = Gateway(hestia, echo, raw, dead_port)
    try:
        yield gateway
    finally:
        gateway.http.close()
        raw.close()
        stop_cleanly(hestia, tmp)


def backend_headers(echoed: dict[str, Any]) -> list[tuple[str, str]]:
    return [(name.lower(), value) for name, value in echoed["headers"]]


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in headers if key == name.lower()]


# -- routing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "rest",
    [
        b"/echo",
        b"/echo/a%2Fb/c%20d;p=1?q=1&q=2&x=%26&empty=&flag",
        b"/echo/%E2%98%83/~user/@host:1/x+y?a=%2F%3F&b=caf%C3%A9#not-sent",
        b"/echo//double//slashes/?trailing=/",
        b"/echo/UPPER/Case.JSON?Z=9&a=0",
    ],
)
def test_path_and_query_reach_the_backend_byte_for_byte(gw: Gateway, rest: bytes) -> None:
    expected = rest.split(b"#", 1)[0]
    if b"#" in rest:  # a fragment is never sent by a client; send the URI without it
        rest = expected
    response = raw_request(gw.port, b"GET /services/echo" + rest + b" HTTP/1.1\r\nHost: gw.test")
    assert response.status == 200, response.body
    assert response.json()["path"] == expected.decode("ascii")


def test_bare_service_path_is_the_backend_root(gw: Gateway) -> None:
    response = raw_request(gw.port, b"GET /services/echo?x=1 HTTP/1.1\r\nHost: gw.test")
    # tests/support/backend.py answers 404 for "/" but names the path it received.
    assert response.status == 404
    assert response.json() == {"error": "not found", "path": "/"}


def test_path_climbing_out_of_the_service_is_refused(gw: Gateway) -> None:
    before = len(gw.echo.requests())
    for path in (b"/services/echo/../v1/health", b"/services/echo/echo/%2e%2e/%2e%2e/v1/health"):
        response = raw_request(gw.port, b"GET " + path + b" HTTP/1.1\r\nHost: gw.test")
        assert response.status in (400, 404), (path, response)
        assert response.header_values("content-type") == ["application/json"]
        assert "error" in response.json()
    assert len(gw.echo.requests()) == before


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"])
def test_every_method_is_forwarded_with_its_body(gw: Gateway, method: str) -> None:
    body = os.urandom(3000) + b"\x00\xff" + method.encode()
    response = gw.http.request(method, f"/services/echo/echo/m?method={method}", content=body)
    echoed = gw.echoed(response)
    assert echoed["method"] == method
    assert echoed["path"] == f"/echo/m?method={method}"
    assert echoed["body_len"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_large_and_chunked_request_bodies_arrive_whole(gw: Gateway) -> None:
    big = os.urandom(4 * 1024 * 1024)
    echoed = gw.echoed(gw.http.post("/services/echo/echo", content=big))
    assert (echoed["body_len"], echoed["body_sha256"]) == (len(big), hashlib.sha256(big).hexdigest())

    pieces = [os.urandom(1000) for _ in range(20)]
    echoed = gw.echoed(gw.http.put("/services/echo/echo", content=iter(pieces)))  # chunked upload
    whole = b"".join(pieces)
    assert (echoed["body_len"], echoed["body_sha256"]) == (len(whole), hashlib.sha256(whole).hexdigest())

    echoed = gw.echoed(gw.http.post("/services/echo/echo", content=b""))
    assert echoed["body_len"] == 0


def test_content_length_is_kept(gw: Gateway) -> None:
    response = raw_request(gw.port, b"GET /services/echo/bytes?n=123457 HTTP/1.1\r\nHost: gw.test")
    assert response.status == 200
    assert response.header_values("content-length") == ["123457"]
    assert response.header_values("transfer-encoding") == []
    assert len(response.body) == 123457


def test_head_is_forwarded_without_a_body(gw: Gateway) -> None:
    response = raw_request(gw.port, b"HEAD /services/echo/health HTTP/1.1\r\nHost: gw.test")
    assert response.status == 200
    assert response.body == b""
    assert response.header_values("content-type") == ["application/json"]
    assert gw.echo.requests("/health")[-1]["method"] == "HEAD"


def test_backend_status_codes_pass_through(gw: Gateway) -> None:
    for code in (201, 204, 301, 404, 418, 500, 503):
        response = gw.http.get(f"/services/echo/status/{code}", follow_redirects=False)
        assert response.status_code == code
        if code != 204:
            assert response.text == f"status {code}"


# -- headers ------------------------------------------------------------------------


def test_repeated_request_headers_keep_every_value(gw: Gateway) -> None:
    head = (
        b"GET /services/echo/echo HTTP/1.1\r\nHost: gw.test\r\n"
        b"X-Multi: one\r\nCookie: a=1\r\nX-Multi: two\r\nCookie: b=2\r\nX-Multi: three, four"
    )
    got = backend_headers(raw_request(gw.port, head).json())
    # Either as separate lines or joined by the comma RFC 9110 allows: every value, in order.
    assert ", ".join(values(got, "x-multi")) == "one, two, three, four"
    assert values(got, "cookie") in (["a=1", "b=2"], ["a=1; b=2"], ["a=1, b=2"])


def test_repeated_response_headers_keep_every_value(gw: Gateway) -> None:
    response = raw_request(gw.port, b"GET /services/echo/echo HTTP/1.1\r\nHost: gw.test")
    assert response.header_values("set-cookie") == ["a=1", "b=2"]  # never merged
    assert response.header_values("x-multi") == ["one", "two"]


def test_hop_by_hop_request_headers_are_dropped(gw: Gateway) -> None:
    head = (
        b"GET /services/echo/echo HTTP/1.1\r\n"
        b"Host: gw.test\r\n"
        b"Connection: X-Hop-Secret, close\r\n"
        b"X-Hop-Secret: must-not-cross\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Proxy-Authorization: Basic c2VjcmV0\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Upgrade: foo/1\r\n"
        b"X-End-To-End: kept"
    )
    response = raw_request(gw.port, head)
    assert response.status == 200, response.body
    got = dict(backend_headers(response.json()))
    for name in ("x-hop-secret", "keep-alive", "te", "trailer", "proxy-authorization", "proxy-connection", "upgrade"):
        assert name not in got, (name, got)
    assert "close" not in got.get("connection", "").lower()  # the gateway's own, if any
    assert got["x-end-to-end"] == "kept"


def test_hop_by_hop_response_headers_are_dropped(gw: Gateway) -> None:
    response = raw_request(gw.port, b"GET /services/raw/anything HTTP/1.1\r\nHost: gw.test")
    assert response.status == 200
    assert response.body == b"ok"
    names = {name.lower() for name, _ in response.headers}
    for name in ("x-hop-secret", "keep-alive", "proxy-authenticate", "proxy-connection", "upgrade"):
        assert name not in names, (name, response.headers)
    assert response.header_values("x-end-to-end") == ["kept"]
    assert response.header_values("set-cookie") == ["a=1", "b=2"]


def test_forwarded_headers_are_appended_or_set(gw: Gateway) -> None:
    head = (
        b"GET /services/echo/echo HTTP/1.1\r\n"
        b"Host: public.example:8443\r\n"
        b"X-Forwarded-For: 203.0.113.7, 10.0.0.1\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: spoofed.example\r\n"
        b"X-Forwarded-Prefix: /spoofed"
    )
    got = backend_headers(raw_request(gw.port, head).json())
    assert values(got, "x-forwarded-for") == ["203.0.113.7, 10.0.0.1, 127.0.0.1"]
    assert values(got, "x-forwarded-proto") == ["http"]
    assert values(got, "x-forwarded-host") == ["public.example:8443"]
    assert values(got, "x-forwarded-prefix") == ["/services/echo"]
    assert values(got, "host") == [f"127.0.0.1:{gw.echo.port}"]


def test_request_id_is_kept_and_returned(gw: Gateway) -> None:
    response = gw.http.get("/services/echo/echo", headers={"X-Request-ID": "client-id-42"})
    assert values(backend_headers(gw.echoed(response)), "x-request-id") == ["client-id-42"]
    assert response.headers.get_list("x-request-id") == ["client-id-42"]


def test_request_id_is_generated_when_missing_or_unusable(gw: Gateway) -> None:
    seen = set()
    for sent in ({}, {"X-Request-ID": "has spaces/and{braces}"}, {"X-Request-ID": ""}):
        response = gw.http.get("/services/echo/echo", headers=sent)
        returned = response.headers.get_list("x-request-id")
        assert len(returned) == 1 and returned[0] not in ("", sent.get("X-Request-ID"))
        assert values(backend_headers(gw.echoed(response)), "x-request-id") == returned
        seen.add(returned[0])
    assert len(seen) == 3  # a fresh id per request


def test_errors_carry_a_request_id_too(gw: Gateway) -> None:
    response = gw.http.get("/services/no-such/x", headers={"X-Request-ID": "err-1"})
    assert response.status_code == 404
    assert response.headers["x-request-id"] == "err-1"


# -- the backend connection ------------------------------------------------------------------


def test_connections_to_the_backend_are_kept_alive(gw: Gateway) -> None:
    gw.echoed(gw.http.get("/services/echo/echo"))  # warm: started and one connection pooled
    before = gw.echoed(gw.http.get("/services/echo/_stats"))
    for i in range(50):
        # A fresh client connection each time: only the gateway's pool can reuse anything.
        connection = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        try:
            connection.request("GET", f"/services/echo/echo?i={i}")
            assert connection.getresponse().status == 200
        finally:
            connection.close()
    after = gw.echoed(gw.http.get("/services/echo/_stats"))
    assert after["requests"] - before["requests"] == 51
    assert after["connections"] - before["connections"] <= 2, (before, after)


# -- streaming ---------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "prefix"), [("/stream", ""), ("/sse", "data: ")])
def test_streamed_responses_arrive_incrementally(gw: Gateway, path: str, prefix: str) -> None:
    n, interval = 6, 0.25
    arrivals: list[tuple[float, dict[str, Any]]] = []
    with gw.http.stream("GET", f"/services/echo{path}?n={n}&interval={interval}") as response:
        assert response.status_code == 200
        expected_type = "application/x-ndjson" if not prefix else "text/event-stream"
        assert response.headers["content-type"] == expected_type
        for line in response.iter_lines():
            if line.strip():
                arrivals.append((time.time(), json.loads(line.removeprefix(prefix))))
    assert [tick["i"] for _, tick in arrivals] == list(range(n))
    first_arrived = arrivals[0][0]
    last_sent = arrivals[-1][1]["t"]
    # The first line was in the client's hands long before the backend wrote the last one.
    assert first_arrived < last_sent - (n - 2) * interval, (first_arrived, last_sent)
    for arrived, tick in arrivals:
        assert arrived - tick["t"] < 0.2, "a line was held back by the gateway"


def test_a_client_leaving_mid_stream_releases_the_request(gw: Gateway) -> None:
    with gw.http.stream("GET", "/services/echo/stream?n=400&interval=0.05") as response:
        lines = response.iter_lines()
        assert json.loads(next(lines))["i"] == 0
        assert gw.hestia.status("echo")["in_flight"] == 1
    # The client closed its connection: the gateway lets go of the backend stream at once.
    gw.hestia.wait_status("echo", "in_flight", 0, timeout=2.0)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_slow_reader_slows_the_backend_not_the_gateway_memory(gw: Gateway) -> None:
    size = 200 * 1024 * 1024
    pid = gw.hestia.proc.pid if gw.hestia.proc else 0
    baseline = _rss_kib(pid)
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(f"GET /services/echo/bytes?n={size} HTTP/1.1\r\nHost: gw.test\r\n\r\n".encode())
        received = len(sock.recv(65536))
        # Not reading: without backpressure the gateway would buffer the whole body.
        # Watch for a moment (loopback moves 200 MB in well under that).
        peak = baseline
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:
            peak = max(peak, _rss_kib(pid))
            time.sleep(0.05)
        assert peak - baseline < 64 * 1024, f"gateway grew by {(peak - baseline) // 1024} MiB"
        # And the stream still completes once the client reads.
        sock.settimeout(20)
        while received < size and (data := sock.recv(1 << 20)):
            received += len(data)
    assert received >= size


# -- errors -------------------------------------------------------------------------------


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert isinstance(body["error"], str) and body["error"]
    return body


def test_unknown_service_is_404_json(gw: Gateway) -> None:
    body = _error(gw.http.post("/services/nope/api/chat", content=b"{}"), 404)
    assert body["service"] == "nope"
    _error(gw.http.get("/services/"), 404)
    _error(gw.http.get("/elsewhere"), 404)


def test_unreachable_backend_is_502_json(gw: Gateway) -> None:
    assert not port_open(gw.dead_port)
    body = _error(gw.http.get("/services/down/x"), 502)
    assert body["service"] == "down"
    assert body["state"] == "ready"  # a static service has no lifecycle
    assert "refused" in body["error"]
