"""
Issue 6, "Bad input": raw bytes at a real Hestia, each refused with a 4xx, and
the test backend behind it receiving nothing.

One gateway serves the module, with small limits so that the tests are quick:
C{max_body_size: 1m}, C{max_header_size: 8k}, C{header_timeout: 1s},
C{connection_idle_timeout: 2s}.  Its C{echo} service is a real
C{tests/backend.py} whose C{--request-log} shows what got through.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from hestiaproc import GRACEFUL, BackendSpec, HestiaProcess, RawResponse, raw_request, reap_leftovers, wait_for

pytestmark = pytest.mark.integration


class Gateway:
    def __init__(self, hestia: HestiaProcess, echo: BackendSpec) -> None:
        self.hestia = hestia
        self.echo = echo

    @property
    def port(self) -> int:
        return self.hestia.port

    def received(self) -> int:
        return len(self.echo.requests())


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("security")
    echo = BackendSpec("echo", tmp)
    config = {
        "server": {"max_body_size": "1m", "max_header_size": "8k", "header_timeout": 1,
                   "connection_idle_timeout": 2},
        "defaults": {"idle_timeout": 0},
        "services": {"echo": echo.service(), "other": echo.service()},
    }
    hestia = HestiaProcess(config, tmp / "hestia").start()
    gateway = Gateway(hestia, echo)
    # Warm the backend, so that "it received nothing" means something.
    assert raw_request(hestia.port, b"GET /services/echo/echo HTTP/1.1\r\nHost: gw").status == 200
    try:
        yield gateway
    finally:
        status = hestia.stop()
        wait_for(lambda: not echo.running(), 5.0)
        reap_leftovers(str(tmp))
        assert status in GRACEFUL, hestia.log_text()


def refused(gw: Gateway, head: bytes, body: bytes = b"", status: int | tuple[int, ...] = 400) -> RawResponse:
    before = gw.received()
    response = raw_request(gw.port, head, body)
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status in statuses, (head[:80], response)
    assert response.header_values("content-type") == ["application/json"], response
    assert "error" in response.json()
    assert gw.received() == before, "the backend received the request"
    return response


ECHO = b"POST /services/echo/echo HTTP/1.1\r\nHost: gw\r\n"


# -- smuggling -----------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked",  # refused by Twisted itself
        b"Transfer-Encoding: chunked\r\nContent-Length: 5",
        b"Content-Length: 5\r\nTransfer-Encoding: identity",  # let through by Twisted, refused by the guard
        b"Content-Length: 5\r\nContent-Length: 6",
        b"Content-Length: 5\r\nContent-Length: 5",
        b"Content-Length: 5, 6",
        b"Content-Length: +5",
        b"Transfer-Encoding: gzip, chunked",
        b"Transfer-Encoding : chunked",
    ],
)
def test_ambiguous_body_length_is_refused(gw: Gateway, headers: bytes) -> None:
    body = b"0\r\n\r\nGET /services/echo/smuggled HTTP/1.1\r\nHost: gw\r\n\r\n"
    refused(gw, ECHO + headers, body)
    assert not gw.echo.requests("/smuggled")


# -- sizes -------------------------------------------------------------------------


def test_a_head_beyond_the_limit_is_431(gw: Gateway) -> None:
    refused(gw, ECHO + b"X-Big: " + b"a" * 9000, status=431)
    many = b"".join(b"X-H%d: %s\r\n" % (n, b"b" * 90) for n in range(100))
    refused(gw, ECHO + many.rstrip(b"\r\n"), status=431)
    refused(gw, b"GET /services/echo/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: gw", status=431)


def test_a_declared_body_beyond_max_body_size_is_413_before_it_is_sent(gw: Gateway) -> None:
    before = gw.received()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        # Only the head: the answer must come without the 2 MB ever being sent.
        sock.sendall(ECHO + b"Content-Length: 2097152\r\nExpect: 100-continue\r\n\r\n")
        answer = b""
        while data := sock.recv(65536):
            answer += data
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b"100 Continue" not in answer
    assert gw.received() == before


def test_a_chunked_body_beyond_max_body_size_is_cut_off_with_413(gw: Gateway) -> None:
    chunk = b"%x\r\n%s\r\n" % (65536, b"z" * 65536)
    body = chunk * 20 + b"0\r\n\r\n"  # 1.25 MiB
    before = gw.received()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(ECHO + b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            sock.sendall(body)
        except OSError:
            pass  # Hestia may close while we still send: that is the point.
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
        except ConnectionResetError:
            pass
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert gw.received() == before


def test_a_body_within_the_limit_is_forwarded_whole(gw: Gateway) -> None:
    body = b"y" * (1024 * 1024)
    response = raw_request(gw.port, ECHO + b"Content-Length: %d" % len(body), body)
    assert response.status == 200 and response.json()["body_len"] == len(body)


# -- never an open proxy --------------------------------------------------------------


@pytest.mark.parametrize(
    "line, status",
    [
        (b"GET http://other.example/ HTTP/1.1", 400),
        (b"GET http://127.0.0.1:1/services/echo/echo HTTP/1.1", 400),
        (b"GET https://gw/services/echo/echo HTTP/1.1", 400),
        (b"GET services/echo/echo HTTP/1.1", 400),
        (b"CONNECT other.example:443 HTTP/1.1", 405),
        (b"CONNECT 127.0.0.1:22 HTTP/1.1", 405),
    ],
)
def test_absolute_form_and_connect_are_refused(gw: Gateway, line: bytes, status: int) -> None:
    refused(gw, line + b"\r\nHost: other.example", status=status)


@pytest.mark.parametrize(
    "path",
    [
        b"/services/echo/../../v1/services",
        b"/services/echo/../other/echo",
        b"/services/echo/%2e%2e/%2e%2e/v1/services",
        b"/services/echo/%2E%2E%2F%2E%2E%2Fv1%2Fservices",
        b"/services/echo/%252e%252e/%252e%252e/v1/services",
        b"/services/echo/%25252e%25252e/v1",
        b"/services/echo/..%5c..%5cv1%5cservices",
        b"/services/echo/..\\..\\v1\\services",
        b"/services/echo/.%2e/other/",
        b"/services/%2e%2e/v1/services",
        b"/services/..%2fv1/services",
    ],
)
def test_paths_climbing_out_of_the_service_never_arrive(gw: Gateway, path: bytes) -> None:
    response = refused(gw, b"GET " + path + b" HTTP/1.1\r\nHost: gw", status=(400, 404))
    assert b"services" not in response.body or response.json().get("error")
    assert "services" not in response.json()  # not the /v1/services listing


@pytest.mark.parametrize("name", [b"Echo", b"-echo", b"_echo", b"ech%6f", b"echo%00", b"e.cho", b"%65cho", b"%C3%A9"])
def test_names_outside_the_pattern_are_404(gw: Gateway, name: bytes) -> None:
    refused(gw, b"GET /services/" + name + b"/echo HTTP/1.1\r\nHost: gw", status=404)


def test_malformed_heads_get_a_json_400(gw: Gateway) -> None:
    refused(gw, b"GET /services/echo/echo HTTP/1.1\r\nHost: gw\r\nBad Header: x")
    refused(gw, b"GET /services/echo/echo HTTP/1.1\r\nHost: gw\r\nX: a\x00b")
    refused(gw, b"GET /services/echo/echo\r\nHost: gw")


# -- slow and idle clients ---------------------------------------------------------------


def test_a_slowloris_client_is_dropped_after_the_header_timeout(gw: Gateway) -> None:
    before = gw.received()
    head = ECHO + b"X-Slow: " + b"s" * 200 + b"\r\n\r\n"
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        answer = b""
        for byte in head:  # one byte every 50 ms: never idle, never finished
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sock.settimeout(0.05)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            answer += data
            break
        sock.settimeout(5)
        try:
            while data := sock.recv(65536):
                answer += data
        except OSError:
            pass
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert 0.9 < elapsed < 4, elapsed
    assert gw.received() == before


def test_an_idle_keep_alive_connection_is_closed(gw: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        tail = b""
        while data := sock.recv(65536):  # blocks until Hestia closes it
            tail += data
        assert tail == b""
        assert 1.5 < time.monotonic() - started < 8


def test_two_thousand_idle_connections_do_not_stop_others(gw: Gateway) -> None:
    idle: list[socket.socket] = []
    try:
        for _ in range(2000):
            sock = socket.socket()
            sock.setblocking(True)
            sock.connect(("127.0.0.1", gw.port))
            idle.append(sock)
        # Half of them start a request head and stop there.
        for sock in idle[::2]:
            sock.sendall(b"GET /services/echo/echo HTTP/1.1\r\n")
        started = time.monotonic()
        response = raw_request(gw.port, b"GET /services/echo/echo?busy=1 HTTP/1.1\r\nHost: gw")
        assert response.status == 200
        assert time.monotonic() - started < 2
    finally:
        for sock in idle:
            sock.close()
    assert len(gw.echo.requests("/echo?busy=1")) == 1
